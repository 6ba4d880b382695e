//! Opaque TCP forwarding: bytes both ways until both sides are done, with half-close and an
//! idle timeout.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Bytes read per system call. Large enough that a bulk transfer is not syscall-bound, small
/// enough that thousands of idle connections stay cheap (the buffer is only allocated once a
/// direction carries data).
const BUFFER: usize = 32 * 1024;

/// Bytes moved by a finished forward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfer {
    /// Client to endpoint.
    pub sent: u64,
    /// Endpoint to client.
    pub received: u64,
}

/// Byte counters to move as data flows (not only at the end, so long connections show up).
pub struct ByteCounters {
    pub sent: Counter,
    pub received: Counter,
}

/// Copies both ways between `client` and `upstream`. When one side finishes sending, its peer
/// gets a FIN and the other direction goes on (half-close); the forward ends when both
/// directions have, when either side fails, or when nothing moved for `idle`. On failure both
/// sockets are set to reset on close, so neither peer mistakes an abort for a clean end.
pub async fn forward(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    idle: Duration,
    counters: &ByteCounters,
) -> io::Result<Transfer> {
    let start = Instant::now();
    let last_activity = AtomicU64::new(0);
    let result = {
        let (mut client_read, mut client_write) = client.split();
        let (mut upstream_read, mut upstream_write) = upstream.split();
        let up = copy_half(
            &mut client_read,
            &mut upstream_write,
            &last_activity,
            start,
            &counters.sent,
        );
        let down = copy_half(
            &mut upstream_read,
            &mut client_write,
            &last_activity,
            start,
            &counters.received,
        );
        let both = async { tokio::try_join!(up, down) };
        tokio::pin!(both);
        let mut deadline = start + idle;
        loop {
            tokio::select! {
                r = &mut both => break r.map(|(sent, received)| Transfer { sent, received }),
                _ = tokio::time::sleep_until(deadline) => {
                    let last = start + Duration::from_millis(last_activity.load(Ordering::Relaxed));
                    if last + idle <= Instant::now() {
                        break Err(io::Error::new(io::ErrorKind::TimedOut, format!("idle for {idle:?}")));
                    }
                    deadline = last + idle;
                }
            }
        }
    };
    if result.is_err() {
        let _ = client.set_zero_linger();
        let _ = upstream.set_zero_linger();
    }
    result
}

async fn copy_half<R, W>(
    reader: &mut R,
    writer: &mut W,
    last_activity: &AtomicU64,
    start: Instant,
    counter: &Counter,
) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf: Vec<u8> = Vec::new();
    let mut total = 0u64;
    loop {
        if buf.is_empty() {
            // Wait for the first byte before allocating, so idle connections cost no buffer.
            let mut first = [0u8; 1];
            if reader.read(&mut first).await? == 0 {
                break;
            }
            buf = vec![0; BUFFER];
            buf[0] = first[0];
            let n = 1 + read_now(reader, &mut buf[1..]).await?;
            writer.write_all(&buf[..n]).await?;
            total += n as u64;
            counter.increment(n as u64);
            last_activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
            continue;
        }
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        writer.write_all(&buf[..n]).await?;
        total += n as u64;
        counter.increment(n as u64);
        last_activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    // Pass the FIN on; the other direction may still be running.
    writer.shutdown().await?;
    Ok(total)
}

/// Reads what is already available without waiting for more.
async fn read_now<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    struct Now<'a, R>(&'a mut R, &'a mut [u8]);
    impl<R: AsyncRead + Unpin> Future for Now<'_, R> {
        type Output = io::Result<usize>;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let this = self.get_mut();
            let mut rb = tokio::io::ReadBuf::new(this.1);
            match Pin::new(&mut *this.0).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().len())),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Ready(Ok(0)),
            }
        }
    }
    Now(reader, buf).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.expect("connect"), b.expect("accept").0)
    }

    fn counters() -> ByteCounters {
        ByteCounters {
            sent: Counter::noop(),
            received: Counter::noop(),
        }
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_and_half_close_is_passed_on() {
        let (mut client, mut proxy_in) = pair().await;
        let (mut proxy_out, mut server) = pair().await;
        let fwd = tokio::spawn(async move {
            forward(
                &mut proxy_in,
                &mut proxy_out,
                Duration::from_secs(5),
                &counters(),
            )
            .await
        });
        let payload = vec![7u8; 300_000];
        client.write_all(&payload).await.expect("write");
        client.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        server
            .read_to_end(&mut got)
            .await
            .expect("server reads to EOF");
        assert_eq!(got, payload);
        // The server answers after the client's FIN: the other direction is still open.
        server
            .write_all(b"answer after FIN")
            .await
            .expect("write back");
        server.shutdown().await.expect("fin");
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("client reads");
        assert_eq!(back, b"answer after FIN");
        let t = fwd.await.expect("join").expect("forward");
        assert_eq!(
            t,
            Transfer {
                sent: 300_000,
                received: 16
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed() {
        let (mut client, mut proxy_in) = pair().await;
        let (mut proxy_out, _server) = pair().await;
        let fwd = tokio::spawn(async move {
            forward(
                &mut proxy_in,
                &mut proxy_out,
                Duration::from_secs(30),
                &counters(),
            )
            .await
        });
        client.write_all(b"x").await.expect("write");
        let err = fwd.await.expect("join").expect_err("times out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
