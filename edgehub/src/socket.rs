//! Socket options the transparent proxy needs that tokio does not expose: the original
//! destination of a redirected connection, and the firewall mark of upstream sockets.

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

#[cfg(test)]
mod tests {
    use super::*;

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
