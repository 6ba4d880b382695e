//! Bulk bytes from one TCP socket to another without passing through the process: `splice(2)`
//! moves them from the source socket into a pipe and from the pipe into the destination
//! socket, as page references, so the copy in and out of user space is gone. Used by the
//! copier once a direction turns out to be a bulk transfer between two plain TCP sockets
//! (the proxy's local endpoints); everything else (tunnels, replayed bytes) is copied.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use metrics::Counter;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::copy::Activity;

/// Bytes a pipe holds; the kernel's default is 64 KiB. Larger means fewer calls per byte.
const PIPE_BYTES: usize = 256 * 1024;

/// A pipe both ends of which are non-blocking; closed on drop.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds: [libc::c_int; 2] = [-1, -1];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A bigger pipe where the system allows it (`fs.pipe-max-size`); the default otherwise.
        // SAFETY: F_SETPIPE_SZ on a pipe descriptor we own.
        let set = unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_BYTES as libc::c_int,
            )
        };
        let capacity = if set > 0 { set as usize } else { 64 * 1024 };
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain descriptors and null offsets (both are streams); the kernel checks both.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Moves everything `from` sends to `to` until `from` ends; returns the bytes moved. Gives up
/// when `from` is reset while a write waits.
pub(super) async fn socket_to_socket(
    from: &TcpStream,
    to: &TcpStream,
    activity: &Activity,
    counter: Option<&Counter>,
) -> io::Result<u64> {
    let pipe = Pipe::new()?;
    let mut total = 0u64;
    loop {
        let n = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe.write.as_raw_fd(), pipe.capacity)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return Ok(total);
        }
        activity.moved();
        let mut left = n;
        while left > 0 {
            tokio::select! {
                biased;
                ready = to.writable() => ready?,
                e = super::reset_by_peer(from) => return Err(e),
            }
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), to.as_raw_fd(), left)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
        if let Some(c) = counter {
            c.increment(n as u64);
        }
        activity.moved();
    }
}
