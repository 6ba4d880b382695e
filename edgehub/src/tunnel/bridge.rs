//! Joining a tunnelled stream and a TCP connection: bytes both ways, half-close passed on,
//! and an idle timeout so a vanished peer cannot hold the pair for ever.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Bytes moved by a finished bridge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// From `a` to `b`.
    pub a_to_b: u64,
    /// From `b` to `a`.
    pub b_to_a: u64,
}

/// Copies both ways between `a` and `b` until both directions finished (each end's EOF is
/// passed on as a shutdown of the other), either side fails, or nothing moved for `idle`.
pub async fn bridge<A, B>(a: &mut A, b: &mut B, idle: Duration) -> io::Result<Moved>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut a = Watched {
        inner: a,
        start,
        last: last.clone(),
    };
    let mut b = Watched {
        inner: b,
        start,
        last: last.clone(),
    };
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, 32 * 1024, 32 * 1024);
    tokio::pin!(copy);
    let mut deadline = start + idle;
    loop {
        tokio::select! {
            r = &mut copy => return r.map(|(a_to_b, b_to_a)| Moved { a_to_b, b_to_a }),
            _ = tokio::time::sleep_until(deadline) => {
                let seen = start + Duration::from_millis(last.load(Ordering::Relaxed));
                if seen + idle <= Instant::now() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, format!("idle for {idle:?}")));
                }
                deadline = seen + idle;
            }
        }
    }
}

/// Notes the time of every read that returned data.
struct Watched<'a, T: ?Sized> {
    inner: &'a mut T,
    start: Instant,
    last: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Watched<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let ms = self.start.elapsed().as_millis() as u64;
            self.last.store(ms, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Watched<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_and_passes_half_close() {
        let (mut client, mut a) = tokio::io::duplex(1024);
        let (mut b, mut server) = tokio::io::duplex(1024);
        let bridge =
            tokio::spawn(async move { bridge(&mut a, &mut b, Duration::from_secs(5)).await });
        client.write_all(b"ping").await.expect("write");
        client.shutdown().await.expect("fin");
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"ping");
        server.write_all(b"pong!").await.expect("answer");
        server.shutdown().await.expect("fin");
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("read back");
        assert_eq!(back, b"pong!");
        let moved = bridge.await.expect("task").expect("bridge");
        assert_eq!(
            moved,
            Moved {
                a_to_b: 4,
                b_to_a: 5
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_pair_times_out() {
        let (_client, mut a) = tokio::io::duplex(64);
        let (mut b, _server) = tokio::io::duplex(64);
        let err = bridge(&mut a, &mut b, Duration::from_secs(30))
            .await
            .expect_err("idle");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
