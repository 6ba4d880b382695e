//! Opaque TCP forwarding: bytes both ways until both sides are done, with half-close and an
//! idle timeout.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use metrics::Counter;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::tcp::ReadHalf;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// First buffer of a direction: most connections (a request, an answer) never need more.
const SMALL_BUFFER: usize = 8 * 1024;
/// A direction whose reads fill the small buffer is a bulk transfer; it gets this much, so it
/// is not bound by system calls.
const LARGE_BUFFER: usize = 64 * 1024;

/// Bytes moved by a finished forward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfer {
    /// Client to endpoint.
    pub sent: u64,
    /// Endpoint to client.
    pub received: u64,
}

/// Byte counters to move as data flows (not only at the end, so long connections show up).
pub struct ByteCounters<'a> {
    pub sent: &'a Counter,
    pub received: &'a Counter,
}

/// How long a forward may go without moving a byte.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// While both directions are open.
    pub idle: Duration,
    /// Once one side has finished sending: a peer that vanished after its FIN must not hold
    /// the connection for the whole idle timeout.
    pub half_closed: Duration,
}

/// Copies both ways between `client` and `upstream`. When one side finishes sending, its peer
/// gets a FIN and the other direction goes on (half-close); the forward ends when both
/// directions have, when either side fails, or when nothing moved for `idle`. On failure both
/// sockets are set to reset on close, so neither peer mistakes an abort for a clean end.
pub async fn forward(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    timeouts: Timeouts,
    counters: ByteCounters<'_>,
) -> io::Result<Transfer> {
    let Timeouts { idle, half_closed } = timeouts;
    let start = Instant::now();
    let last_activity = AtomicU64::new(0);
    // Set by the direction that finishes first; the second one then leaves the FIN to close().
    let one_done = AtomicBool::new(false);
    let result = {
        let (mut client_read, mut client_write) = client.split();
        let (mut upstream_read, mut upstream_write) = upstream.split();
        let activity = Activity {
            last: &last_activity,
            start,
            one_done: &one_done,
        };
        let up = copy_half(
            &mut client_read,
            &mut upstream_write,
            &activity,
            counters.sent,
        );
        let down = copy_half(
            &mut upstream_read,
            &mut client_write,
            &activity,
            counters.received,
        );
        let both = async { tokio::try_join!(up, down) };
        tokio::pin!(both);
        // The watchdog wakes at least every `half_closed`, so a FIN that shortens the allowed
        // silence is noticed without the copy loops having to tell it.
        let mut deadline = start + idle.min(half_closed);
        loop {
            tokio::select! {
                r = &mut both => break r.map(|(sent, received)| Transfer { sent, received }),
                _ = tokio::time::sleep_until(deadline) => {
                    let allowed = if one_done.load(Ordering::Acquire) { idle.min(half_closed) } else { idle };
                    let last = start + Duration::from_millis(last_activity.load(Ordering::Relaxed));
                    let now = Instant::now();
                    if last + allowed <= now {
                        break Err(io::Error::new(io::ErrorKind::TimedOut, format!("idle for {allowed:?}")));
                    }
                    deadline = (last + allowed).min(now + half_closed);
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

/// What the two directions of one forward share.
struct Activity<'a> {
    /// Milliseconds after `start` of the last byte moved, for the idle timeout.
    last: &'a AtomicU64,
    start: Instant,
    one_done: &'a AtomicBool,
}

/// One direction. The buffer is allocated only once data is there (idle connections cost
/// none) and read into uninitialised; `read_buf` also lets tokio skip the read that would only
/// report "empty" after a short one.
async fn copy_half<W>(
    reader: &mut ReadHalf<'_>,
    writer: &mut W,
    activity: &Activity<'_>,
    counter: &Counter,
) -> io::Result<u64>
where
    W: AsyncWrite + Unpin,
{
    let mut buf: Vec<u8> = Vec::new();
    let mut total = 0u64;
    loop {
        if buf.capacity() == 0 {
            reader.as_ref().readable().await?;
            buf.reserve_exact(SMALL_BUFFER);
        }
        let n = reader.read_buf(&mut buf).await?;
        if n == 0 {
            break;
        }
        // While the peer holds back, nothing reads this side; a RST from it must still end the
        // pair (a client giving up on a stuck endpoint) instead of waiting for the idle timeout.
        // `biased`: a write that completes at once costs no readiness check.
        write_watching(writer, &buf, reader.as_ref()).await?;
        if n == buf.capacity() {
            // The read filled the buffer: a bulk transfer; keep (or grow) the buffer.
            if n < LARGE_BUFFER {
                buf = Vec::with_capacity(LARGE_BUFFER);
            } else {
                buf.clear();
            }
        } else {
            // A short read drained the socket: the connection may now sit idle for hours, so
            // give the buffer back (thousands of idle keep-alive connections must cost nothing).
            buf = Vec::new();
        }
        total += n as u64;
        counter.increment(n as u64);
        activity.last.store(
            activity.start.elapsed().as_millis() as u64,
            Ordering::Relaxed,
        );
    }
    // Pass the FIN on while the other direction may still be running (half-close). When it has
    // already finished, closing the sockets sends the FIN without a system call of its own.
    if activity.one_done.swap(true, Ordering::AcqRel) {
        writer.flush().await?;
    } else {
        writer.shutdown().await?;
    }
    Ok(total)
}

/// Writes all of `buf`, but gives up with `ConnectionReset` as soon as `source` (the socket the
/// bytes came from) is reset. Written piece by piece: a pending `write` has written nothing, so
/// dropping it for the reset loses nothing that was sent.
pub(crate) async fn write_watching<W>(
    writer: &mut W,
    buf: &[u8],
    source: &TcpStream,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut written = 0;
    while written < buf.len() {
        tokio::select! {
            // A write that completes at once costs no readiness check.
            biased;
            w = writer.write(&buf[written..]) => match w? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                k => written += k,
            },
            ready = source.ready(Interest::ERROR) => {
                if ready?.is_error() {
                    return Err(io::Error::new(io::ErrorKind::ConnectionReset, "the peer reset the connection"));
                }
            }
        }
    }
    Ok(())
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

    fn timeouts(idle: u64, half_closed: u64) -> Timeouts {
        Timeouts {
            idle: Duration::from_secs(idle),
            half_closed: Duration::from_secs(half_closed),
        }
    }

    fn counters() -> ByteCounters<'static> {
        static NOOP: std::sync::OnceLock<Counter> = std::sync::OnceLock::new();
        let c = NOOP.get_or_init(Counter::noop);
        ByteCounters {
            sent: c,
            received: c,
        }
    }

    #[tokio::test]
    async fn a_reset_client_ends_the_forward_while_the_endpoint_does_not_read() {
        let (client, mut proxy_in) = pair().await;
        let (mut proxy_out, _server) = pair().await; // never reads
        let fwd = tokio::spawn(async move {
            forward(
                &mut proxy_in,
                &mut proxy_out,
                timeouts(3600, 60),
                counters(),
            )
            .await
        });
        // Fill every buffer on the way, so the forward is stuck writing to the endpoint.
        let chunk = [1u8; 65536];
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
        client.set_zero_linger().expect("linger");
        drop(client);
        let err = tokio::time::timeout(Duration::from_secs(5), fwd)
            .await
            .expect("ended promptly, not at the idle timeout")
            .expect("task")
            .expect_err("reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_and_half_close_is_passed_on() {
        let (mut client, mut proxy_in) = pair().await;
        let (mut proxy_out, mut server) = pair().await;
        let fwd = tokio::spawn(async move {
            forward(&mut proxy_in, &mut proxy_out, timeouts(5, 5), counters()).await
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
    async fn a_half_closed_connection_gets_the_shorter_timeout() {
        let (mut client, mut proxy_in) = pair().await;
        let (mut proxy_out, _server) = pair().await;
        let fwd = tokio::spawn(async move {
            let started = Instant::now();
            let r = forward(
                &mut proxy_in,
                &mut proxy_out,
                timeouts(3600, 60),
                counters(),
            )
            .await;
            (r, started.elapsed())
        });
        client.shutdown().await.expect("half-close");
        let (r, took) = fwd.await.expect("join");
        assert_eq!(r.expect_err("times out").kind(), io::ErrorKind::TimedOut);
        assert!(took < Duration::from_secs(3600), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed() {
        let (mut client, mut proxy_in) = pair().await;
        let (mut proxy_out, _server) = pair().await;
        let fwd = tokio::spawn(async move {
            forward(&mut proxy_in, &mut proxy_out, timeouts(30, 60), counters()).await
        });
        client.write_all(b"x").await.expect("write");
        let err = fwd.await.expect("join").expect_err("times out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
