//! The one bidirectional copier: bytes both ways between two streams until both directions
//! have finished (each side's EOF passed on to the other as a shutdown, so half-closed
//! connections keep working), either side fails or aborts, or nothing moved for too long.
//!
//! A direction waiting to write never reads its source, so an abort of that source would go
//! unnoticed until the idle timeout; each direction therefore also watches its source
//! ([`Source::aborted`]) while it writes. On failure both streams are closed abortively
//! ([`Duplex::abort`]), so neither peer mistakes an abort for a clean end.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use metrics::Counter;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::{Duplex, Sink, Source};

/// First buffer of a direction: most exchanges (a request, an answer) never need more.
const SMALL_BUFFER: usize = 8 * 1024;
/// A direction whose reads fill the small buffer is a bulk transfer; it gets this much, so it
/// is not bound by system calls.
const LARGE_BUFFER: usize = 64 * 1024;

/// How long a joined pair may go without moving a byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// While both directions are open.
    pub idle: Duration,
    /// Once one side has finished sending: a peer that vanished after its FIN must not hold
    /// the pair for the whole idle timeout.
    pub half_closed: Duration,
}

/// Bytes moved by a finished join.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// Counters moved as data flows (not only at the end, so long connections show up).
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters<'c> {
    pub a_to_b: Option<&'c Counter>,
    pub b_to_a: Option<&'c Counter>,
}

/// Copies both ways between `a` and `b`; see the module documentation.
pub async fn join<A: Duplex, B: Duplex>(
    a: &mut A,
    b: &mut B,
    timeouts: Timeouts,
    counters: Counters<'_>,
) -> io::Result<Moved> {
    let Timeouts { idle, half_closed } = timeouts;
    let activity = Activity {
        start: Instant::now(),
        last: AtomicU64::new(0),
        one_done: AtomicBool::new(false),
    };
    let result = {
        let (mut a_read, mut a_write) = a.halves();
        let (mut b_read, mut b_write) = b.halves();
        let up = copy_one(&mut a_read, &mut b_write, &activity, counters.a_to_b);
        let down = copy_one(&mut b_read, &mut a_write, &activity, counters.b_to_a);
        let both = async { tokio::try_join!(up, down) };
        tokio::pin!(both);
        // The watchdog wakes at least every `half_closed`, so a FIN that shortens the allowed
        // silence is noticed without the copy loops having to tell it.
        let mut deadline = activity.start + idle.min(half_closed);
        loop {
            tokio::select! {
                r = &mut both => break r.map(|(a_to_b, b_to_a)| Moved { a_to_b, b_to_a }),
                _ = tokio::time::sleep_until(deadline) => {
                    let allowed = if activity.one_done.load(Ordering::Acquire) {
                        idle.min(half_closed)
                    } else {
                        idle
                    };
                    let last = activity.last_moved();
                    let now = Instant::now();
                    if last + allowed <= now {
                        break Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("idle for {allowed:?}"),
                        ));
                    }
                    deadline = (last + allowed).min(now + half_closed);
                }
            }
        }
    };
    if result.is_err() {
        a.abort();
        b.abort();
    }
    result
}

/// What the two directions of one join share.
pub(super) struct Activity {
    start: Instant,
    /// Milliseconds after `start` of the last byte moved, for the idle timeout.
    last: AtomicU64,
    /// Set once one direction has finished.
    one_done: AtomicBool,
}

impl Activity {
    pub(super) fn moved(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn last_moved(&self) -> Instant {
        self.start + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }
}

/// One direction. The buffer is allocated only once data is there (idle connections cost
/// none), grows for bulk transfers and is given back after a short read.
async fn copy_one<R: Source, W: Sink>(
    reader: &mut R,
    writer: &mut W,
    activity: &Activity,
    counter: Option<&Counter>,
) -> io::Result<u64> {
    let mut buf: Vec<u8> = Vec::new();
    let mut total = 0u64;
    // Set once a read fills the large buffer.
    let mut bulk = false;
    loop {
        if bulk {
            // A bulk transfer between two plain TCP sockets: the kernel moves the rest.
            if let (Some(from), Some(to)) = (reader.socket(), writer.socket()) {
                drop(std::mem::take(&mut buf));
                total += super::splice::socket_to_socket(from, to, activity, counter).await?;
                break;
            }
        }
        if buf.capacity() == 0 {
            reader.readable().await?;
            buf.reserve_exact(SMALL_BUFFER);
        }
        let n = reader.read_buf(&mut buf).await?;
        if n == 0 {
            break;
        }
        activity.moved();
        write_watching(writer, &buf, reader).await?;
        if n == buf.capacity() {
            // The read filled the buffer: a bulk transfer; keep (or grow) the buffer.
            if n < LARGE_BUFFER {
                buf = Vec::with_capacity(LARGE_BUFFER);
            } else {
                buf.clear();
                bulk = true;
            }
        } else {
            // A short read drained the source: the stream may now sit idle for hours, so give
            // the buffer back (thousands of idle keep-alive connections must cost nothing).
            buf = Vec::new();
        }
        total += n as u64;
        if let Some(c) = counter {
            c.increment(n as u64);
        }
        activity.moved();
    }
    activity.one_done.store(true, Ordering::Release);
    activity.moved();
    match writer.shutdown().await {
        // The other side is gone already: nothing left to tell it.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
        other => other?,
    }
    Ok(total)
}

/// Writes all of `buf`, but gives up as soon as `source` (where the bytes came from) is
/// aborted. Written piece by piece: a pending `write` has written nothing, so giving it up
/// loses nothing that was sent.
async fn write_watching<W: AsyncWrite + Unpin, S: Source>(
    writer: &mut W,
    buf: &[u8],
    source: &mut S,
) -> io::Result<()> {
    let mut written = 0;
    while written < buf.len() {
        tokio::select! {
            // A write that completes at once costs no look at the source.
            biased;
            w = writer.write(&buf[written..]) => match w? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                k => written += k,
            },
            e = source.aborted() => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{Rewind, Whole};
    use bytes::Bytes;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

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

    #[tokio::test]
    async fn bytes_flow_both_ways_and_half_close_is_passed_on() {
        let (mut client, mut proxy_in) = pair().await;
        let (mut proxy_out, mut server) = pair().await;
        let fwd = tokio::spawn(async move {
            join(
                &mut proxy_in,
                &mut proxy_out,
                timeouts(5, 5),
                Counters::default(),
            )
            .await
        });
        let payload = vec![7u8; 300_000];
        client.write_all(&payload).await.expect("write");
        client.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("server reads");
        assert_eq!(got, payload);
        // The server answers after the client's FIN: the other direction is still open.
        server.write_all(b"answer after FIN").await.expect("write");
        server.shutdown().await.expect("fin");
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("client reads");
        assert_eq!(back, b"answer after FIN");
        let moved = fwd.await.expect("join").expect("forward");
        assert_eq!(
            moved,
            Moved {
                a_to_b: 300_000,
                b_to_a: 16
            }
        );
    }

    #[tokio::test]
    async fn bulk_between_sockets_arrives_whole_after_replayed_bytes() {
        let (mut client, proxy_in) = pair().await;
        let (mut proxy_out, mut server) = pair().await;
        let fwd = tokio::spawn(async move {
            // Bytes read already (protocol detection) go first, then the socket's.
            let mut a = Rewind::new(Bytes::from_static(b"HEAD"), proxy_in);
            join(&mut a, &mut proxy_out, timeouts(5, 5), Counters::default()).await
        });
        let payload: Vec<u8> = (0..8_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.expect("write");
            client.shutdown().await.expect("half-close");
            client
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("server reads");
        assert_eq!(got.len(), 4 + payload.len());
        assert!(
            got[..4] == *b"HEAD" && got[4..] == payload[..],
            "intact, in order"
        );
        server.shutdown().await.expect("fin");
        let mut client = writer.await.expect("writer");
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("closed");
        let moved = fwd.await.expect("join").expect("forward");
        assert_eq!(moved.a_to_b, 4 + payload.len() as u64);
    }

    #[tokio::test]
    async fn counters_move_with_the_data() {
        let recorder = metrics_util_free::Recorder;
        let (sent, received) = (recorder.counter(), recorder.counter());
        let (mut client, mut proxy_in) = pair().await;
        let (mut proxy_out, mut server) = pair().await;
        let counters = Counters {
            a_to_b: Some(&sent.0),
            b_to_a: Some(&received.0),
        };
        let copy = join(&mut proxy_in, &mut proxy_out, timeouts(5, 5), counters);
        let talk = async {
            client.write_all(b"12345").await.expect("write");
            client.shutdown().await.expect("fin");
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.expect("read");
            server.write_all(b"abc").await.expect("write");
            server.shutdown().await.expect("fin");
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.expect("read");
        };
        let (moved, ()) = tokio::join!(copy, talk);
        moved.expect("copy");
        assert_eq!((sent.value(), received.value()), (5, 3));
    }

    #[tokio::test]
    async fn a_reset_client_ends_the_pair_while_the_other_side_does_not_read() {
        let (client, mut proxy_in) = pair().await;
        let (mut proxy_out, _server) = pair().await; // never reads
        let fwd = tokio::spawn(async move {
            join(
                &mut proxy_in,
                &mut proxy_out,
                timeouts(3600, 60),
                Counters::default(),
            )
            .await
        });
        // Fill every buffer on the way, so the copier is stuck writing to the endpoint.
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

    #[tokio::test(start_paused = true)]
    async fn a_half_closed_pair_gets_the_shorter_timeout() {
        let (mut client, mut proxy_in) = pair().await;
        let (mut proxy_out, _server) = pair().await;
        client.shutdown().await.expect("half-close");
        let started = Instant::now();
        let err = join(
            &mut proxy_in,
            &mut proxy_out,
            timeouts(3600, 60),
            Counters::default(),
        )
        .await
        .expect_err("times out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(3600));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_pair_is_closed_from_the_last_byte() {
        let (mut client, mut proxy_in) = pair().await;
        let (mut proxy_out, _server) = pair().await;
        let started = Instant::now();
        let copy = join(
            &mut proxy_in,
            &mut proxy_out,
            timeouts(60, 60),
            Counters::default(),
        );
        let late_byte = async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            client.write_all(b"x").await.expect("write");
        };
        let (err, ()) = tokio::join!(copy, late_byte);
        assert_eq!(err.expect_err("idle").kind(), io::ErrorKind::TimedOut);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(90) && took < Duration::from_secs(92),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn a_replayed_prefix_and_a_lock_split_stream_join_like_sockets() {
        let (mut client, proxy_in) = pair().await;
        let (proxy_end, mut endpoint) = tokio::io::duplex(1024);
        let mut rewound = Rewind::new(Bytes::from_static(b"GET "), proxy_in);
        let mut whole = Whole(proxy_end);
        let copy = join(
            &mut rewound,
            &mut whole,
            timeouts(5, 5),
            Counters::default(),
        );
        let talk = async {
            client.write_all(b"/ HTTP/1.1\r\n").await.expect("write");
            client.shutdown().await.expect("fin");
            let mut got = Vec::new();
            endpoint.read_to_end(&mut got).await.expect("read");
            assert_eq!(got, b"GET / HTTP/1.1\r\n");
            endpoint.write_all(b"ok").await.expect("write");
            endpoint.shutdown().await.expect("fin");
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.expect("read");
            assert_eq!(back, b"ok");
        };
        let (moved, ()) = tokio::join!(copy, talk);
        assert_eq!(
            moved.expect("copy"),
            Moved {
                a_to_b: 16,
                b_to_a: 2
            }
        );
    }

    /// Counters without a global recorder: each one its own atomic.
    mod metrics_util_free {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;

        use metrics::{Counter, CounterFn};

        struct Cell(AtomicU64);

        impl CounterFn for Cell {
            fn increment(&self, value: u64) {
                self.0.fetch_add(value, Ordering::Relaxed);
            }
            fn absolute(&self, value: u64) {
                self.0.store(value, Ordering::Relaxed);
            }
        }

        pub struct Recorder;

        pub struct Tracked(pub Counter, Arc<Cell>);

        impl Tracked {
            pub fn value(&self) -> u64 {
                self.1 .0.load(Ordering::Relaxed)
            }
        }

        impl Recorder {
            pub fn counter(&self) -> Tracked {
                let cell = Arc::new(Cell(AtomicU64::new(0)));
                Tracked(Counter::from_arc(cell.clone()), cell)
            }
        }
    }
}
