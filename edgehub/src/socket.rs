//! Socket options the transparent proxy needs that tokio does not expose: the original
//! destination of a redirected connection, the firewall mark of upstream sockets, and for UDP
//! (TPROXY) transparent sockets that receive datagrams with their original destination and
//! send replies from an address that is not the host's.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

/// `SO_ORIGINAL_DST` (netfilter), the same number for IPv4 and IPv6 (`IP6T_SO_ORIGINAL_DST`).
const SO_ORIGINAL_DST: libc::c_int = 80;

/// Where the client meant to connect before `REDIRECT` rewrote the destination. `None` when
/// the socket has no connection-tracking entry at all (rare: conntrack is what REDIRECT uses);
/// a connection that was tracked but not redirected reports its own local address, which
/// matches no Service.
pub fn original_destination(stream: &impl AsRawFd) -> Option<SocketAddr> {
    let fd = stream.as_raw_fd();
    original_v4(fd).or_else(|_| original_v6(fd)).ok()
}

fn original_v4(fd: libc::c_int) -> io::Result<SocketAddr> {
    // SAFETY: sockaddr_in is plain old data; getsockopt writes at most `len` bytes into it.
    unsafe {
        let mut addr: libc::sockaddr_in = mem::zeroed();
        let mut len = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        );
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
        Ok(SocketAddr::V4(SocketAddrV4::new(
            ip,
            u16::from_be(addr.sin_port),
        )))
    }
}

fn original_v6(fd: libc::c_int) -> io::Result<SocketAddr> {
    // SAFETY: as above, with sockaddr_in6.
    unsafe {
        let mut addr: libc::sockaddr_in6 = mem::zeroed();
        let mut len = mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::SOL_IPV6,
            SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in6).cast(),
            &mut len,
        );
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
        Ok(SocketAddr::V6(SocketAddrV6::new(
            ip,
            u16::from_be(addr.sin6_port),
            0,
            0,
        )))
    }
}

/// Turns on TCP keepalive with probes after `idle_secs` of silence, every 10 s, 3 times: a
/// client that vanished (a pod killed, a NAT entry expired) frees its connection in about
/// `idle_secs + 30` seconds instead of holding it for the whole idle timeout. Set on the
/// listener, it is inherited by every accepted connection at no cost per connection.
pub fn set_keepalive(socket: &impl AsRawFd, idle_secs: u32) -> io::Result<()> {
    let fd = socket.as_raw_fd();
    for (level, name, value) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (
            libc::IPPROTO_TCP,
            libc::TCP_KEEPIDLE,
            idle_secs as libc::c_int,
        ),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
    ] {
        setsockopt_int(fd, level, name, value)?;
    }
    Ok(())
}

fn setsockopt_int(
    fd: libc::c_int,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passing a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `SO_MARK` (needs `CAP_NET_ADMIN`).
pub fn set_mark(socket: &impl AsRawFd, mark: u32) -> io::Result<()> {
    setsockopt_int(
        socket.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_MARK,
        mark as libc::c_int,
    )
}

/// Asks for a receive buffer of `bytes`: `SO_RCVBUFFORCE` (with `CAP_NET_ADMIN`, past
/// `net.core.rmem_max`), else `SO_RCVBUF` (capped by `rmem_max`). A UDP socket drops whatever
/// arrives while its buffer is full, so one that many clients send to needs room for the
/// datagrams that come in while its task waits for a CPU.
pub fn set_receive_buffer(socket: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let fd = socket.as_raw_fd();
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes)
        .or_else(|_| setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, bytes))
}

/// Asks for a send buffer of `bytes`, like [`set_receive_buffer`]: a socket sent to without
/// waiting (one poller serving many flows) reports `WouldBlock`, and so drops, once its buffer
/// holds datagrams the device has not taken yet.
pub fn set_send_buffer(socket: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let fd = socket.as_raw_fd();
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, bytes)
        .or_else(|_| setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, bytes))
}

/// A UDP socket for TPROXY: `IP_TRANSPARENT` (and `IPV6_TRANSPARENT`) so that it may take
/// datagrams for, and send from, addresses that are not the host's (a cluster IP), with
/// `SO_REUSEADDR` so that several may share an address. `original_dst` also asks for each
/// datagram's original destination (`IP_RECVORIGDSTADDR`), for the listener. Needs
/// `CAP_NET_ADMIN`.
pub fn transparent_udp(
    addr: SocketAddr,
    original_dst: bool,
    mark: Option<u32>,
) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_nonblocking(true)?;
    socket.set_reuse_address(true)?;
    let fd = socket.as_raw_fd();
    if addr.is_ipv4() {
        setsockopt_int(fd, libc::SOL_IP, libc::IP_TRANSPARENT, 1)?;
    } else {
        // A dual-stack socket takes IPv4 datagrams too: both families' options.
        setsockopt_int(fd, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1)?;
        let _ = setsockopt_int(fd, libc::SOL_IP, libc::IP_TRANSPARENT, 1);
    }
    if original_dst {
        if addr.is_ipv4() {
            setsockopt_int(fd, libc::SOL_IP, libc::IP_RECVORIGDSTADDR, 1)?;
        } else {
            setsockopt_int(fd, libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR, 1)?;
            let _ = setsockopt_int(fd, libc::SOL_IP, libc::IP_RECVORIGDSTADDR, 1);
        }
    }
    if let Some(mark) = mark {
        set_mark(&socket, mark)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// One datagram read by `recvmsg`: its length, its source, and the destination it was sent to
/// before TPROXY took it (`None` when the socket did not ask, or the kernel did not say).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    pub len: usize,
    pub source: SocketAddr,
    pub original_dst: Option<SocketAddr>,
    /// The datagram was longer than the buffer, and cut.
    pub truncated: bool,
}

/// Reads one datagram without waiting (`WouldBlock` when there is none), with the original
/// destination of a socket made by [`transparent_udp`] with `original_dst`.
pub fn recv_original_dst(socket: &impl AsRawFd, buf: &mut [u8]) -> io::Result<Received> {
    // Room for one sockaddr_in6 in a control message, and then some.
    let mut control = [0u64; 16];
    // SAFETY: every pointer in `msg` refers to a live local buffer of the length given with
    // it; recvmsg writes within those lengths and reports how much it wrote.
    unsafe {
        let mut source: libc::sockaddr_storage = mem::zeroed();
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut msg: libc::msghdr = mem::zeroed();
        msg.msg_name = (&mut source as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = mem::size_of_val(&control) as _;
        let n = libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let source = sockaddr_to_std(&source).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "datagram from an unknown family",
            )
        })?;
        let mut original_dst = None;
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let c = &*cmsg;
            let data = libc::CMSG_DATA(cmsg);
            if c.cmsg_level == libc::SOL_IP && c.cmsg_type == libc::IP_ORIGDSTADDR {
                let a: libc::sockaddr_in = std::ptr::read_unaligned(data.cast());
                original_dst = Some(v4_of(&a));
            } else if c.cmsg_level == libc::SOL_IPV6 && c.cmsg_type == libc::IPV6_ORIGDSTADDR {
                let a: libc::sockaddr_in6 = std::ptr::read_unaligned(data.cast());
                original_dst = Some(v6_of(&a));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        Ok(Received {
            len: n as usize,
            source: canonical(source),
            original_dst: original_dst.map(canonical),
            truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        })
    }
}

/// IPv4 peers of a dual-stack socket show as `::ffff:a.b.c.d`; route tables hold `a.b.c.d`.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn v4_of(a: &libc::sockaddr_in) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
        u16::from_be(a.sin_port),
    ))
}

fn v6_of(a: &libc::sockaddr_in6) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::from(a.sin6_addr.s6_addr),
        u16::from_be(a.sin6_port),
        0,
        a.sin6_scope_id,
    ))
}

fn sockaddr_to_std(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    // SAFETY: the family field says which sockaddr type the storage holds.
    unsafe {
        match s.ss_family as libc::c_int {
            libc::AF_INET => Some(v4_of(&*(s as *const libc::sockaddr_storage).cast())),
            libc::AF_INET6 => Some(v6_of(&*(s as *const libc::sockaddr_storage).cast())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_come_with_their_source_and_destination() {
        // Binding a transparent socket needs CAP_NET_ADMIN; without it (a developer's
        // machine) only the plain recvmsg path is checked.
        let receiver = match transparent_udp("127.0.0.1:0".parse().expect("addr"), true, None) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
                setsockopt_int(s.as_raw_fd(), libc::SOL_IP, libc::IP_RECVORIGDSTADDR, 1)
                    .expect("option");
                s
            }
            Err(e) => panic!("transparent socket: {e}"),
        };
        let to = receiver.local_addr().expect("addr");
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        sender.send_to(b"hello", to).expect("send");
        let mut buf = [0u8; 3];
        let got = loop {
            match recv_original_dst(&receiver, &mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                other => break other.expect("recv"),
            }
        };
        assert_eq!(got.source, sender.local_addr().expect("addr"));
        assert_eq!(got.original_dst, Some(to));
        assert!(got.truncated, "5 bytes into 3");
        assert_eq!(&buf, b"hel");
        assert!(matches!(
            recv_original_dst(&receiver, &mut buf),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        ));
    }

    #[tokio::test]
    async fn a_connection_that_was_not_redirected_reports_its_own_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let local = server.local_addr().expect("local");
        // Loopback may or may not be tracked; either way no Service address comes back.
        let got = original_destination(&server);
        assert!(got.is_none() || got == Some(local), "{got:?}");
    }
}
