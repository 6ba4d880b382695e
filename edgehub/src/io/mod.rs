//! The byte-moving core every data path shares, on nodes and in the cloud:
//!
//! - [`detect`]: what a connection carries, from one bounded read of its first bytes;
//! - [`Rewind`]: those bytes replayed in front of the rest;
//! - [`join`]: the one bidirectional copier (adaptive buffers, half-close, idle and
//!   half-close timeouts, resets noticed both ways, byte counters), for every pair of streams
//!   that implement [`Duplex`]: TCP sockets, tunnelled streams, upgraded HTTP connections;
//! - [`datagram`]: UDP flows over such streams (length-prefixed datagrams) and their pump.

mod copy;
pub mod datagram;
mod detect;
mod rewind;
mod splice;

use std::future::Future;

use futures_util::future::Either;
use std::io;

use tokio::io::{AsyncRead, AsyncWrite, Interest};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

pub use copy::{join, Counters, Moved, Timeouts};
pub use detect::{detect, Detected, Protocol};
pub use rewind::Rewind;

/// A byte stream the copier can drive in both directions at once.
pub trait Duplex: Send {
    type Reader<'a>: Source + 'a
    where
        Self: 'a;
    type Writer<'a>: Sink + 'a
    where
        Self: 'a;

    /// The two directions, usable at the same time.
    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>);

    /// Makes the close abortive after a failed join, so that the far end sees a reset rather
    /// than a clean end (TCP: zero linger).
    fn abort(&mut self) {}
}

/// The reading half of a [`Duplex`].
pub trait Source: AsyncRead + Unpin + Send {
    /// The TCP socket under this half, when reading it directly loses nothing (no bytes kept
    /// in front of it): the copier can then move bulk data socket to socket in the kernel.
    fn socket(&self) -> Option<&TcpStream> {
        None
    }

    /// Resolves once a read would not wait. The copier allocates a buffer only then, so that
    /// idle connections cost no buffer; sources that cannot tell resolve at once.
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send + '_ {
        std::future::ready(Ok(()))
    }

    /// Resolves once the far end has aborted the stream. The copier waits for it while it
    /// waits to write what it read from here, so that an abort ends the pair even when the
    /// other side does not read. Sources whose abort shows on the next read never resolve.
    fn aborted(&self) -> impl Future<Output = io::Error> + Send + '_ {
        std::future::pending()
    }
}

/// The writing half of a [`Duplex`].
pub trait Sink: AsyncWrite + Unpin + Send {
    /// The TCP socket under this half, when writing it directly is the same as writing the
    /// half (see [`Source::socket`]).
    fn socket(&self) -> Option<&TcpStream> {
        None
    }
}

impl Sink for WriteHalf<'_> {
    fn socket(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

impl<T: AsyncWrite + Unpin + Send> Sink for tokio::io::WriteHalf<T> {}

impl Duplex for TcpStream {
    type Reader<'a> = ReadHalf<'a>;
    type Writer<'a> = WriteHalf<'a>;

    fn halves(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        self.split()
    }

    fn abort(&mut self) {
        let _ = self.set_zero_linger();
    }
}

impl Source for ReadHalf<'_> {
    fn socket(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }

    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send + '_ {
        self.as_ref().readable()
    }

    fn aborted(&self) -> impl Future<Output = io::Error> + Send + '_ {
        reset_by_peer(self.as_ref())
    }
}

/// Resolves once the peer of `stream` has reset it.
async fn reset_by_peer(stream: &TcpStream) -> io::Error {
    loop {
        // A RST from the peer shows as error readiness, which reading need not wait for.
        match stream.ready(Interest::ERROR).await {
            Ok(ready) if ready.is_error() => {
                return io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "the peer reset the connection",
                )
            }
            Ok(_) => tokio::task::yield_now().await,
            Err(e) => return e,
        }
    }
}

/// A stream with no halves of its own (hyper's upgraded connections), split behind a lock.
/// Only for streams of protocols the proxy does not speak; its own streams have real halves.
pub struct Whole<T>(pub T);

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for Whole<T> {
    type Reader<'a>
        = tokio::io::ReadHalf<&'a mut T>
    where
        T: 'a;
    type Writer<'a>
        = tokio::io::WriteHalf<&'a mut T>
    where
        T: 'a;

    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        tokio::io::split(&mut self.0)
    }
}

impl<T: AsyncRead + Unpin + Send> Source for tokio::io::ReadHalf<T> {}

/// A stream whose first bytes were read already: they go first, then the rest.
impl<T: Duplex> Duplex for Rewind<T> {
    type Reader<'a>
        = Rewind<T::Reader<'a>>
    where
        T: 'a;
    type Writer<'a>
        = T::Writer<'a>
    where
        T: 'a;

    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        let (prefix, inner) = self.parts_mut();
        let prefix = std::mem::take(prefix);
        let (reader, writer) = inner.halves();
        (Rewind::new(prefix, reader), writer)
    }

    fn abort(&mut self) {
        self.parts_mut().1.abort();
    }
}

impl<S: Source> Source for Rewind<S> {
    fn socket(&self) -> Option<&TcpStream> {
        if self.has_prefix() {
            None
        } else {
            self.get_ref().socket()
        }
    }

    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send + '_ {
        if self.has_prefix() {
            Either::Left(std::future::ready(Ok(())))
        } else {
            Either::Right(self.get_ref().readable())
        }
    }

    fn aborted(&self) -> impl Future<Output = io::Error> + Send + '_ {
        self.get_ref().aborted()
    }
}
