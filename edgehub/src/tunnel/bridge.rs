//! Joining a TCP connection and another byte stream (a tunnelled stream, or a client
//! connection whose first bytes were peeked): bytes both ways, half-close passed on, and
//! timeouts so that neither a silent peer nor a peer that aborted while the other side was not
//! reading can hold the pair.
//!
//! A direction waiting to write never reads its source, so an abort of that source would go
//! unnoticed until the idle timeout. Each direction therefore also watches its source while it
//! writes: the TCP socket's error readiness (a RST), or the other stream's [`AbortSignal`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Resolves, with the reason, once a stream has been aborted by its far side.
pub type Aborted = Pin<Box<dyn Future<Output = String> + Send + 'static>>;

/// A stream that can say it was aborted without being read.
pub trait AbortSignal {
    /// `None` when the stream has no such signal (its abort shows up on the next read).
    fn abort_signal(&self) -> Option<Aborted>;
}

impl AbortSignal for TcpStream {
    fn abort_signal(&self) -> Option<Aborted> {
        // A TCP peer's RST shows up as error readiness, which the bridge watches directly.
        None
    }
}

impl<T: AbortSignal> AbortSignal for crate::limits::Rewind<T> {
    fn abort_signal(&self) -> Option<Aborted> {
        self.get_ref().abort_signal()
    }
}

/// Bytes moved by a finished bridge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// From the TCP connection to the other stream.
    pub from_tcp: u64,
    /// From the other stream to the TCP connection.
    pub to_tcp: u64,
}

/// How long a bridge may go without moving a byte.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// While both directions are open.
    pub idle: Duration,
    /// Once one side has finished sending.
    pub half_closed: Duration,
}

const BUFFER: usize = 32 * 1024;

/// Copies both ways between `tcp` and `other` until both directions finished (each side's
/// EOF is passed on as a shutdown of the other), either side fails or aborts, or nothing moved
/// for the allowed time. On failure the TCP socket is set to reset on close, so its peer does
/// not mistake an abort for a clean end.
pub async fn bridge<O>(tcp: &mut TcpStream, other: &mut O, timeouts: Timeouts) -> io::Result<Moved>
where
    O: AsyncRead + AsyncWrite + AbortSignal + Unpin + ?Sized,
{
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let one_done = AtomicBool::new(false);
    let other_aborted = other.abort_signal();
    let result = {
        let (mut tcp_read, mut tcp_write) = tcp.split();
        let (mut other_read, mut other_write) = tokio::io::split(&mut *other);
        let activity = Activity {
            last: &last,
            start,
            one_done: &one_done,
        };
        let up = async {
            let mut buf = vec![0u8; BUFFER];
            let mut total = 0u64;
            loop {
                let n = tcp_read.read(&mut buf).await?;
                if n == 0 {
                    other_write.shutdown().await?;
                    activity.finished();
                    return Ok::<u64, io::Error>(total);
                }
                activity.moved();
                // While the other side holds back (no credit), a RST from the TCP peer must
                // still end the pair. Written piece by piece: a pending write has written
                // nothing, so giving it up loses no byte that was sent.
                let mut written = 0;
                while written < n {
                    tokio::select! {
                        biased;
                        w = other_write.write(&buf[written..n]) => match w? {
                            0 => return Err(io::ErrorKind::WriteZero.into()),
                            k => written += k,
                        },
                        ready = tcp_read.ready(Interest::ERROR) => {
                            if ready?.is_error() {
                                return Err(io::Error::new(io::ErrorKind::ConnectionReset, "the TCP peer reset the connection"));
                            }
                        }
                    }
                }
                total += n as u64;
            }
        };
        let down = async {
            let mut buf = vec![0u8; BUFFER];
            let mut total = 0u64;
            let mut aborted = other_aborted;
            loop {
                let n = other_read.read(&mut buf).await?;
                if n == 0 {
                    tcp_write.shutdown().await?;
                    activity.finished();
                    return Ok::<u64, io::Error>(total);
                }
                activity.moved();
                match aborted.as_mut() {
                    // Dropping `write_all` for an abort is fine: the stream is dead anyway.
                    Some(signal) => tokio::select! {
                        biased;
                        w = tcp_write.write_all(&buf[..n]) => w?,
                        reason = signal => {
                            return Err(io::Error::new(io::ErrorKind::ConnectionReset, format!("stream reset: {reason}")));
                        }
                    },
                    None => tcp_write.write_all(&buf[..n]).await?,
                }
                total += n as u64;
            }
        };
        let both = async { tokio::try_join!(up, down) };
        tokio::pin!(both);
        let mut deadline = start + timeouts.idle.min(timeouts.half_closed);
        loop {
            tokio::select! {
                r = &mut both => break r.map(|(from_tcp, to_tcp)| Moved { from_tcp, to_tcp }),
                _ = tokio::time::sleep_until(deadline) => {
                    let allowed = if one_done.load(Ordering::Acquire) {
                        timeouts.idle.min(timeouts.half_closed)
                    } else {
                        timeouts.idle
                    };
                    let seen = start + Duration::from_millis(last.load(Ordering::Relaxed));
                    let now = Instant::now();
                    if seen + allowed <= now {
                        break Err(io::Error::new(io::ErrorKind::TimedOut, format!("idle for {allowed:?}")));
                    }
                    // Wake at least every `half_closed`: a FIN shortens the allowed silence.
                    deadline = (seen + allowed).min(now + timeouts.half_closed);
                }
            }
        }
    };
    if result.is_err() {
        let _ = tcp.set_zero_linger();
    }
    result
}

struct Activity<'a> {
    last: &'a AtomicU64,
    start: Instant,
    one_done: &'a AtomicBool,
}

impl Activity<'_> {
    fn moved(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn finished(&self) {
        self.moved();
        self.one_done.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A connected pair of TCP sockets on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.expect("connect"), b.expect("accept").0)
    }

    struct Duplex(tokio::io::DuplexStream);

    impl AbortSignal for Duplex {
        fn abort_signal(&self) -> Option<Aborted> {
            None
        }
    }

    impl AsyncRead for Duplex {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Duplex {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    const T: Timeouts = Timeouts {
        idle: Duration::from_secs(30),
        half_closed: Duration::from_secs(5),
    };

    #[tokio::test]
    async fn copies_both_ways_and_passes_half_close() {
        let (mut client, mut a) = pair().await;
        let (b, mut server) = tokio::io::duplex(1024);
        let mut b = Duplex(b);
        let bridge = tokio::spawn(async move { bridge(&mut a, &mut b, T).await });
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
                from_tcp: 4,
                to_tcp: 5
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_pair_times_out() {
        let (_client, mut a) = pair().await;
        let (b, _server) = tokio::io::duplex(64);
        let err = bridge(&mut a, &mut Duplex(b), T).await.expect_err("idle");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_closed_pair_gets_the_shorter_timeout() {
        let (mut client, mut a) = pair().await;
        let (b, _server) = tokio::io::duplex(64);
        client.shutdown().await.expect("fin");
        let started = Instant::now();
        let err = bridge(&mut a, &mut Duplex(b), T)
            .await
            .expect_err("half closed");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(
            started.elapsed() < T.idle,
            "ended after {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_reset_client_ends_the_pair_while_the_other_side_does_not_read() {
        let (client, mut a) = pair().await;
        // The other side never reads: its buffer fills and the bridge waits to write.
        let (b, _server) = tokio::io::duplex(1024);
        let bridge = tokio::spawn(async move { bridge(&mut a, &mut Duplex(b), T).await });
        let chunk = [7u8; 65536];
        let mut stalled = 0;
        while stalled < 20 {
            match client.try_write(&chunk) {
                Ok(_) => stalled = 0,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    stalled += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("write: {e}"),
            }
        }
        // Reset: zero linger, then close.
        client.set_zero_linger().expect("linger");
        let sock = client;
        drop(sock);
        let err = tokio::time::timeout(Duration::from_secs(5), bridge)
            .await
            .expect("prompt")
            .expect("task")
            .expect_err("reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    }
}
