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

/// Sets `SO_MARK` (needs `CAP_NET_ADMIN`).
pub fn set_mark(socket: &impl AsRawFd, mark: u32) -> io::Result<()> {
    let value = mark as libc::c_int;
    // SAFETY: passing a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&value as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
