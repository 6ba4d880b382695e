//! UDP flows over byte streams. A tunnel stream may cut and join writes anywhere, so each
//! datagram travels as a 2-byte big-endian length followed by its bytes: the far side hands
//! on exactly the datagrams that were sent, each whole and on its own, never torn or merged.
//!
//! [`pump`] moves datagrams between such a stream and anything that sends and receives whole
//! datagrams ([`DatagramSource`], [`DatagramSink`]): a connected UDP socket on the side that
//! dials the endpoint, the proxy's flow (its queue and reply socket) on the side that opens.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::{Duplex, Moved};

/// The largest datagram a length prefix can carry (and more than UDP over IPv4 or IPv6 can
/// carry without jumbograms).
pub const MAX_DATAGRAM: usize = u16::MAX as usize;

/// Length prefix of a framed datagram.
const HEADER: usize = 2;

/// Read buffers above this are given back once empty, so a flow that once carried a large
/// datagram does not keep its buffer while idle.
const KEEP_BUFFER: usize = 4096;

/// A datagram with its length prefix, in one buffer so that it is written in one piece.
/// `None` for one longer than [`MAX_DATAGRAM`].
pub fn frame(datagram: &[u8]) -> Option<Bytes> {
    let len = u16::try_from(datagram.len()).ok()?;
    let mut out = BytesMut::with_capacity(HEADER + datagram.len());
    out.put_u16(len);
    out.put_slice(datagram);
    Some(out.freeze())
}

/// Splits a byte stream back into the datagrams [`frame`] made of it.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    /// The next whole datagram, once all its bytes are in.
    pub fn next_datagram(&mut self) -> Option<Bytes> {
        if self.buf.len() < HEADER {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([self.buf[0], self.buf[1]]));
        if self.buf.len() < HEADER + len {
            // Room for the rest in one go, so a large datagram is not read in small steps.
            self.buf.reserve(HEADER + len - self.buf.len());
            return None;
        }
        self.buf.advance(HEADER);
        let datagram = self.buf.split_to(len).freeze();
        if self.buf.is_empty() && self.buf.capacity() > KEEP_BUFFER {
            self.buf = BytesMut::new();
        }
        Some(datagram)
    }

    /// Where the next bytes of the stream go.
    pub fn buffer(&mut self) -> &mut BytesMut {
        if self.buf.capacity() == self.buf.len() {
            self.buf.reserve(KEEP_BUFFER);
        }
        &mut self.buf
    }

    /// Bytes of a datagram that has not arrived whole: at the end of the stream, it was cut.
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty()
    }
}

/// Where datagrams come from.
pub trait DatagramSource: Send {
    /// The next datagram; `None` once there will be no more.
    fn recv(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>> + Send + '_;
}

/// Where datagrams go.
pub trait DatagramSink: Sync {
    fn send<'a>(&'a self, datagram: &'a [u8]) -> impl Future<Output = io::Result<()>> + Send + 'a;
}

/// Which way a datagram went, for [`pump`]'s observer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the source into the stream.
    ToStream,
    /// From the stream to the sink.
    FromStream,
}

thread_local! {
    /// One receive buffer per thread: a datagram is copied out at its own size at once, so
    /// a flow costs no buffer while it waits (thousands of idle flows are common).
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; MAX_DATAGRAM].into_boxed_slice());
}

/// Reads one datagram from `socket` without waiting, at its own size.
pub fn try_recv(socket: &UdpSocket) -> io::Result<Bytes> {
    SCRATCH.with(|scratch| {
        let mut buf = scratch.borrow_mut();
        let n = socket.try_recv(&mut buf)?;
        Ok(Bytes::copy_from_slice(&buf[..n]))
    })
}

/// A connected UDP socket (the endpoint, on the side that dials it) as both ends of a flow.
pub struct Connected<'a>(pub &'a UdpSocket);

impl DatagramSource for Connected<'_> {
    #[allow(clippy::manual_async_fn)] // the trait's signature: the future must be `Send`
    fn recv(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>> + Send + '_ {
        async move {
            loop {
                self.0.readable().await?;
                match try_recv(self.0) {
                    Ok(d) => return Ok(Some(d)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

impl DatagramSink for Connected<'_> {
    #[allow(clippy::manual_async_fn)]
    fn send<'a>(&'a self, datagram: &'a [u8]) -> impl Future<Output = io::Result<()>> + Send + 'a {
        async move { self.0.send(datagram).await.map(drop) }
    }
}

/// Datagrams handed over by another task (the proxy's listener), in order.
impl DatagramSource for tokio::sync::mpsc::Receiver<Bytes> {
    #[allow(clippy::manual_async_fn)]
    fn recv(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>> + Send + '_ {
        async move { Ok(tokio::sync::mpsc::Receiver::recv(self).await) }
    }
}

/// When a flow last moved a datagram, shared by its two directions.
struct Activity {
    base: Instant,
    last_nanos: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            base: Instant::now(),
            last_nanos: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = self.base.elapsed().as_nanos() as u64;
        self.last_nanos.store(now, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.base + Duration::from_nanos(self.last_nanos.load(Ordering::Relaxed))
    }
}

/// Moves datagrams both ways between `stream` (framed) and `source`/`sink` until either side
/// ends, an error, or (with `idle`) that long without a datagram either way. The stream is
/// half-closed when the source ends. `seen` is told of every datagram and its size.
///
/// Returns the payload bytes moved: `a_to_b` from the stream to the sink, `b_to_a` from the
/// source into the stream. A stream that ends inside a datagram is an error
/// (`UnexpectedEof`): the cut datagram is not delivered.
pub async fn pump<S, Src, Snk, F>(
    stream: &mut S,
    source: &mut Src,
    sink: &Snk,
    idle: Option<Duration>,
    seen: F,
) -> io::Result<Moved>
where
    S: Duplex,
    Src: DatagramSource,
    Snk: DatagramSink,
    F: Fn(Direction, usize) + Sync,
{
    let (mut reader, mut writer) = stream.halves();
    let activity = Activity::new();
    let to_stream = AtomicU64::new(0);
    let from_stream = AtomicU64::new(0);
    let up = async {
        while let Some(datagram) = source.recv().await? {
            // A source yields real datagrams, which fit; anything else cannot be framed.
            let Some(framed) = frame(&datagram) else {
                continue;
            };
            writer.write_all(&framed).await?;
            activity.touch();
            to_stream.fetch_add(datagram.len() as u64, Ordering::Relaxed);
            seen(Direction::ToStream, datagram.len());
        }
        writer.shutdown().await
    };
    let down = async {
        let mut decoder = Decoder::default();
        loop {
            while let Some(datagram) = decoder.next_datagram() {
                sink.send(&datagram).await?;
                activity.touch();
                from_stream.fetch_add(datagram.len() as u64, Ordering::Relaxed);
                seen(Direction::FromStream, datagram.len());
            }
            if reader.read_buf(decoder.buffer()).await? == 0 {
                if decoder.has_partial() {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "stream ended inside a datagram",
                    ));
                }
                return Ok(());
            }
        }
    };
    let quiet = async {
        let Some(idle) = idle else {
            return std::future::pending::<io::Result<()>>().await;
        };
        loop {
            let deadline = activity.last() + idle;
            if Instant::now() >= deadline {
                return Ok(());
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    let result = tokio::select! {
        r = up => r,
        r = down => r,
        r = quiet => r,
    };
    result.map(|()| Moved {
        a_to_b: from_stream.load(Ordering::Relaxed),
        b_to_a: to_stream.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::sync::Mutex;
    use tokio::io::AsyncWriteExt;

    /// Datagrams of every size that matters: empty, one byte, a typical MTU's worth, a
    /// tunnel frame and more, and the largest.
    fn sizes() -> Vec<usize> {
        vec![
            0,
            1,
            2,
            1400,
            32 * 1024,
            32 * 1024 + 1,
            65_000,
            MAX_DATAGRAM,
        ]
    }

    fn datagram(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|j| (i * 31 + j) as u8).collect()
    }

    #[test]
    fn framing_never_tears_or_merges_whatever_the_stream_cuts() {
        let sent: Vec<Vec<u8>> = sizes()
            .into_iter()
            .enumerate()
            .map(|(i, n)| datagram(i, n))
            .collect();
        let mut wire = Vec::new();
        for d in &sent {
            wire.extend_from_slice(&frame(d).expect("fits"));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for round in 0..50 {
            let mut decoder = Decoder::default();
            let mut got = Vec::new();
            let mut at = 0;
            while at < wire.len() {
                // Cuts of one byte, of a few, and of whole frames and more.
                let step = match round % 3 {
                    0 => 1,
                    1 => rng.random_range(1..100),
                    _ => rng.random_range(1..70_000),
                };
                let end = (at + step).min(wire.len());
                decoder.buffer().extend_from_slice(&wire[at..end]);
                at = end;
                while let Some(d) = decoder.next_datagram() {
                    got.push(d.to_vec());
                }
            }
            assert_eq!(got, sent, "round {round}");
            assert!(!decoder.has_partial());
        }
        assert!(frame(&vec![0u8; MAX_DATAGRAM + 1]).is_none());
    }

    #[test]
    fn a_stream_cut_inside_a_datagram_leaves_it_partial() {
        let mut decoder = Decoder::default();
        decoder
            .buffer()
            .extend_from_slice(&frame(b"hello").expect("fits")[..4]);
        assert!(decoder.next_datagram().is_none());
        assert!(decoder.has_partial());
    }

    #[test]
    fn an_idle_decoder_keeps_no_large_buffer() {
        let mut decoder = Decoder::default();
        decoder
            .buffer()
            .extend_from_slice(&frame(&[7u8; 60_000]).expect("fits"));
        assert_eq!(decoder.next_datagram().map(|d| d.len()), Some(60_000));
        assert!(decoder.buf.capacity() <= KEEP_BUFFER, "buffer given back");
    }

    /// A sink that keeps what it gets.
    #[derive(Default)]
    struct Kept(Mutex<Vec<Vec<u8>>>);

    impl DatagramSink for Kept {
        #[allow(clippy::manual_async_fn)]
        fn send<'a>(
            &'a self,
            datagram: &'a [u8],
        ) -> impl Future<Output = io::Result<()>> + Send + 'a {
            async move {
                self.0.lock().expect("lock").push(datagram.to_vec());
                Ok(())
            }
        }
    }

    #[tokio::test]
    async fn the_pump_moves_whole_datagrams_both_ways_through_a_udp_socket() {
        // The endpoint: echoes every datagram.
        let endpoint = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let endpoint_addr = endpoint.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((n, from)) = endpoint.recv_from(&mut buf).await {
                let _ = endpoint.send_to(&buf[..n], from).await;
            }
        });
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        socket.connect(endpoint_addr).await.expect("connect");
        let (mut near, far) = tokio::net::UnixStream::pair().expect("pair");
        let served = tokio::spawn(async move {
            let mut far = crate::io::Whole(far);
            let mut source = Connected(&socket);
            let sink = Connected(&socket);
            pump(&mut far, &mut source, &sink, None, |_, _| {}).await
        });
        // Datagrams written in one piece, so the stream merges them; loopback UDP carries
        // each whole (up to the largest IPv4 payload).
        let sent: Vec<Vec<u8>> = [1usize, 1400, 65_000, 0, 3]
            .into_iter()
            .enumerate()
            .map(|(i, n)| datagram(i, n))
            .collect();
        let mut wire = Vec::new();
        for d in &sent {
            wire.extend_from_slice(&frame(d).expect("fits"));
        }
        near.write_all(&wire).await.expect("write");
        let mut decoder = Decoder::default();
        let mut got = Vec::new();
        while got.len() < sent.len() {
            let n = near.read_buf(decoder.buffer()).await.expect("read");
            assert!(n > 0, "stream ended early");
            while let Some(d) = decoder.next_datagram() {
                got.push(d.to_vec());
            }
        }
        assert_eq!(got, sent);
        near.shutdown().await.expect("shutdown");
        let moved = served.await.expect("task").expect("pump");
        let total: u64 = sent.iter().map(|d| d.len() as u64).sum();
        assert_eq!((moved.a_to_b, moved.b_to_a), (total, total));
    }

    #[tokio::test]
    async fn a_cut_datagram_is_not_delivered() {
        let (mut near, far) = tokio::net::UnixStream::pair().expect("pair");
        let mut far = crate::io::Whole(far);
        let framed = frame(b"whole").expect("fits");
        near.write_all(&framed).await.expect("write");
        near.write_all(&frame(b"cut short").expect("fits")[..5])
            .await
            .expect("write");
        near.shutdown().await.expect("shutdown");
        let (_tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        let sink = Kept::default();
        let r = pump(&mut far, &mut rx, &sink, None, |_, _| {}).await;
        assert_eq!(r.expect_err("cut").kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(*sink.0.lock().expect("lock"), vec![b"whole".to_vec()]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flow_silent_both_ways_ends_after_its_idle_timeout() {
        let (mut near, far) = tokio::net::UnixStream::pair().expect("pair");
        let mut far = crate::io::Whole(far);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let sink = Kept::default();
        let seen = Mutex::new(Vec::new());
        let start = Instant::now();
        let task = async {
            pump(
                &mut far,
                &mut rx,
                &sink,
                Some(Duration::from_secs(30)),
                |d, n| seen.lock().expect("lock").push((d, n)),
            )
            .await
        };
        let traffic = async {
            // A datagram each way at 20 s keeps the flow until 50 s.
            tokio::time::sleep(Duration::from_secs(20)).await;
            tx.send(Bytes::from_static(b"up")).await.expect("send");
            near.write_all(&frame(b"down").expect("fits"))
                .await
                .expect("write");
            std::future::pending::<()>().await
        };
        let moved = tokio::select! {
            r = task => r.expect("pump"),
            () = traffic => unreachable!(),
        };
        let lived = start.elapsed();
        assert!(
            lived >= Duration::from_secs(50) && lived < Duration::from_secs(51),
            "{lived:?}"
        );
        assert_eq!((moved.a_to_b, moved.b_to_a), (4, 2));
        let seen = seen.into_inner().expect("lock");
        assert!(seen.contains(&(Direction::ToStream, 2)), "{seen:?}");
        assert!(seen.contains(&(Direction::FromStream, 4)), "{seen:?}");
    }
}
