//! Telling HTTP/1 from anything else by the first bytes of a connection, without losing them:
//! HTTP is limited per request, anything else per connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// What the first bytes of a connection say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detection {
    /// A complete HTTP/1 request line up to the version (`GET /x HTTP/1.1`).
    Http1,
    /// Not HTTP/1 (this includes the HTTP/2 preface `PRI * HTTP/2.0`, which callers that
    /// speak HTTP/2 recognise on their own).
    NotHttp,
    /// A valid beginning of a request line; more bytes are needed.
    NeedMore,
}

/// Longest method accepted. The standard ones have at most 7 letters and WebDAV's at most 16
/// (`BASELINE-CONTROL`); without a bound a long run of capitals would keep a binary protocol
/// waiting for more.
const MAX_METHOD: usize = 20;

/// Whether `prefix` starts with an HTTP/1 request line: `METHOD SP target SP HTTP/1.x`.
///
/// The method is upper-case letters (and `-` after the first, for WebDAV's), which covers the
/// standard methods and extension ones such as `PROPFIND`. A TLS ClientHello (`0x16 0x03`), an
/// SSH banner or a lower-case method are `NotHttp` at the first byte that cannot belong to a
/// request line.
pub fn looks_like_http1(prefix: &[u8]) -> Detection {
    let method = prefix
        .iter()
        .enumerate()
        .take_while(|&(i, &b)| b.is_ascii_uppercase() || (i > 0 && b == b'-'))
        .count();
    if method > MAX_METHOD {
        return Detection::NotHttp;
    }
    let Some(rest) = after_space(prefix, method) else {
        return Detection::NeedMore;
    };
    let Some(rest) = rest else {
        return Detection::NotHttp;
    };
    // The target: visible ASCII and, as httparse allows, bytes above 0x7f.
    let target = rest.iter().take_while(|&&b| b > b' ' && b != 0x7f).count();
    let Some(rest) = after_space(rest, target) else {
        return Detection::NeedMore;
    };
    let Some(version) = rest else {
        return Detection::NotHttp;
    };
    const HTTP1: &[u8] = b"HTTP/1.";
    let n = version.len().min(HTTP1.len());
    if version[..n] != HTTP1[..n] {
        Detection::NotHttp
    } else {
        match version.get(HTTP1.len()) {
            None => Detection::NeedMore,
            Some(b) if b.is_ascii_digit() => Detection::Http1,
            Some(_) => Detection::NotHttp,
        }
    }
}

/// After a field of `len` bytes that must be followed by one space: `None` when the input
/// ends inside the field (need more), `Some(None)` when the field is empty or not followed by
/// a space, else what follows the space.
fn after_space(input: &[u8], len: usize) -> Option<Option<&[u8]>> {
    match input.get(len) {
        None => None,
        Some(b' ') if len > 0 => Some(Some(&input[len + 1..])),
        Some(_) => Some(None),
    }
}

/// Reads the first bytes of `io` until they tell HTTP/1 from anything else, `max` bytes have
/// been read, the peer stops sending, or `timeout` passes. Returns the bytes read (replay them
/// with [`Rewind`]) and [`Detection::Http1`] or [`Detection::NotHttp`], never `NeedMore`: a
/// request line longer than `max` and silence alike (protocols where the server speaks first)
/// mean the connection is treated as opaque TCP, which still works, limited per connection.
pub async fn peek_http1<T: AsyncRead + Unpin>(
    io: &mut T,
    timeout: Duration,
    max: usize,
) -> io::Result<(Bytes, Detection)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = BytesMut::with_capacity(max);
    let detection = loop {
        match looks_like_http1(&buf) {
            Detection::NeedMore if buf.len() < max => {}
            Detection::NeedMore => break Detection::NotHttp,
            decided => break decided,
        }
        let room = max - buf.len();
        let mut room = (&mut buf).limit(room);
        match tokio::time::timeout_at(deadline, io.read_buf(&mut room)).await {
            // Silence (the server speaks first) or the peer done sending: not HTTP/1.
            Err(_) | Ok(Ok(0)) => break Detection::NotHttp,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    };
    // A copy the size of what was read: the connection keeps the prefix until it is replayed,
    // and should not keep `max` bytes of capacity with it.
    Ok((Bytes::copy_from_slice(&buf), detection))
}

/// An IO that first yields `prefix` (bytes already read from `inner`) and then reads `inner`;
/// writes go straight to `inner`.
#[derive(Debug)]
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Rewind { prefix, inner }
    }

    /// The inner IO.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The prefix not yet read, and the inner IO.
    pub fn into_inner(self) -> (Bytes, T) {
        (self.prefix, self.inner)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        if self.prefix.is_empty() {
            // Release the buffer now rather than when the connection ends.
            self.prefix = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
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
    use tokio::io::AsyncWriteExt;

    #[test]
    fn request_lines() {
        for line in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST /api/v1?x=1 HTTP/1.0\r\n",
            b"OPTIONS * HTTP/1.1\r\n",
            b"CONNECT example.com:443 HTTP/1.1\r\n",
            b"PROPFIND /dav HTTP/1.1\r\n",
            b"VERSION-CONTROL /dav HTTP/1.1\r\n",
            b"GET http://example.com/ HTTP/1.1",
        ] {
            assert_eq!(
                looks_like_http1(line),
                Detection::Http1,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn every_prefix_of_a_request_line_needs_more() {
        let line = b"GET /index.html HTTP/1.1\r\n";
        let complete = b"GET /index.html HTTP/1.1".len();
        for end in 0..complete {
            assert_eq!(
                looks_like_http1(&line[..end]),
                Detection::NeedMore,
                "{:?}",
                String::from_utf8_lossy(&line[..end])
            );
        }
        for end in complete..=line.len() {
            assert_eq!(looks_like_http1(&line[..end]), Detection::Http1);
        }
    }

    #[test]
    fn other_protocols() {
        let client_hello = [
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ];
        for bytes in [
            &client_hello[..],
            &client_hello[..1],
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"SSH-2.0-OpenSSH_9.2\r\n",
            b"get / HTTP/1.1\r\n",
            b" GET / HTTP/1.1\r\n",
            b"GET  / HTTP/1.1\r\n",
            b"GET / HTTP/1.x\r\n",
            b"GET / FTP/1.1\r\n",
            b"GET /\r\n",
            b"-GET / HTTP/1.1\r\n",
            b"\x00\x00\x00\x01",
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        ] {
            assert_eq!(
                looks_like_http1(bytes),
                Detection::NotHttp,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn peek_waits_for_a_split_request_line_and_replays_it() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let writer = tokio::spawn(async move {
            client.write_all(b"GET /hel").await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.write_all(b"lo HTTP/1.1\r\nHost: x\r\n\r\n").await?;
            Ok::<_, io::Error>(client)
        });
        let (prefix, detection) = peek_http1(&mut server, Duration::from_millis(200), 4096)
            .await
            .expect("peek");
        assert_eq!(detection, Detection::Http1);
        assert!(prefix.starts_with(b"GET /hello HTTP/1.1"), "{prefix:?}");
        let _client = writer.await.expect("join").expect("write");
        // Everything comes back, peeked bytes first, even through a tiny buffer.
        let mut rewound = Rewind::new(prefix, server);
        let mut all = Vec::new();
        let mut small = [0u8; 3];
        while !all.ends_with(b"\r\n\r\n") {
            let n = rewound.read(&mut small).await.expect("read");
            assert!(n > 0);
            all.extend_from_slice(&small[..n]);
        }
        assert_eq!(all, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n");
        rewound
            .write_all(b"HTTP/1.1 200 OK\r\n")
            .await
            .expect("write through");
    }

    #[tokio::test(start_paused = true)]
    async fn peek_gives_up_on_silence_and_on_binary() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let started = tokio::time::Instant::now();
        let (prefix, detection) = peek_http1(&mut server, Duration::from_millis(300), 4096)
            .await
            .expect("peek");
        assert_eq!((prefix.len(), detection), (0, Detection::NotHttp));
        assert_eq!(started.elapsed(), Duration::from_millis(300));

        client
            .write_all(&[0x16, 0x03, 0x01, 0x00])
            .await
            .expect("write");
        let (prefix, detection) = peek_http1(&mut server, Duration::from_secs(5), 4096)
            .await
            .expect("peek");
        assert_eq!(detection, Detection::NotHttp);
        assert_eq!(&prefix[..], &[0x16, 0x03, 0x01, 0x00]);

        // A request line longer than `max` is not waited for.
        client
            .write_all(b"GET /aaaaaaaaaaaaaaa")
            .await
            .expect("write");
        let (prefix, detection) = peek_http1(&mut server, Duration::from_secs(5), 8)
            .await
            .expect("peek");
        assert_eq!(
            (&prefix[..], detection),
            (&b"GET /aaa"[..], Detection::NotHttp)
        );

        // The peer closing before a full line: what was read, as opaque TCP.
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"GET /").await.expect("write");
        drop(client);
        let (prefix, detection) = peek_http1(&mut server, Duration::from_secs(5), 4096)
            .await
            .expect("peek");
        assert_eq!(
            (&prefix[..], detection),
            (&b"GET /"[..], Detection::NotHttp)
        );
    }
}
