//! After a `101 Switching Protocols` (WebSocket) or a `2xx` to `CONNECT`, the client's and the
//! endpoint's connections carry bytes of a protocol the proxy does not speak: joined both ways
//! until both ends are done, either fails, or nothing moves for the idle timeout (a silent
//! WebSocket must not hold its slot for ever).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Bytes moved by a finished join: (client to endpoint, endpoint to client).
pub async fn join<A, B>(client: A, endpoint: B, idle: Duration) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let mut client = Stamped {
        inner: client,
        start,
        last: &last,
    };
    let mut endpoint = Stamped {
        inner: endpoint,
        start,
        last: &last,
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut endpoint);
    tokio::pin!(copy);
    let mut deadline = start + idle;
    loop {
        tokio::select! {
            moved = &mut copy => return moved,
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
struct Stamped<'a, T> {
    inner: T,
    start: Instant,
    /// Milliseconds after `start`.
    last: &'a AtomicU64,
}

impl<T: AsyncRead + Unpin> AsyncRead for Stamped<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let now = self.start.elapsed().as_millis() as u64;
            self.last.store(now, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stamped<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn bytes_flow_until_both_ends_are_done() {
        let (mut client, proxy_client) = tokio::io::duplex(1024);
        let (proxy_endpoint, mut endpoint) = tokio::io::duplex(1024);
        let joined = tokio::spawn(join(proxy_client, proxy_endpoint, Duration::from_secs(60)));
        client.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        endpoint.read_exact(&mut buf).await.expect("read");
        endpoint.write_all(b"PONG!").await.expect("write");
        drop(endpoint);
        let mut back = Vec::new();
        client.shutdown().await.expect("shutdown");
        client.read_to_end(&mut back).await.expect("read");
        assert_eq!(back, b"PONG!");
        assert_eq!(joined.await.expect("join").expect("moved"), (4, 5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_pair_is_closed_after_the_idle_timeout() {
        let (mut client, proxy_client) = tokio::io::duplex(1024);
        let (proxy_endpoint, _endpoint) = tokio::io::duplex(1024);
        let started = Instant::now();
        let joined = tokio::spawn(join(proxy_client, proxy_endpoint, Duration::from_secs(60)));
        tokio::time::sleep(Duration::from_secs(30)).await;
        client.write_all(b"x").await.expect("write");
        let e = joined.await.expect("join").expect_err("idle");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(90),
            "from the last byte"
        );
    }
}
