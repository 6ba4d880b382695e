//! Protocol detection (SPEC §4.2): what a connection carries, from one bounded read of its
//! first bytes (at most [`DETECT_BYTES`], within a short timeout). The bytes read are handed
//! back with the verdict, to be replayed (with [`super::Rewind`], or written to the
//! endpoint first): nothing is lost.
//!
//! - `PRI * HTTP/2.0` (the HTTP/2 connection preface, prior knowledge) → HTTP/2;
//! - an HTTP/1 request line → HTTP/1;
//! - a TLS ClientHello → opaque TCP, with the server name (SNI) for metrics;
//! - anything else, or nothing within the timeout (protocols where the server speaks first) →
//!   opaque TCP.
//!
//! The read stops as soon as the bytes tell; until then it takes what arrives, since clients
//! that write a request line in pieces (`write!` on a socket, Nagle) are common and must not
//! pass for opaque TCP (they would escape per-request limits). Bytes that still leave it open
//! when the bound or the timeout is reached are opaque TCP, which always works: a client
//! sending a byte a second holds only its own connection, and only for the timeout.

use std::io;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest first read. A request line and its first headers, or a whole ClientHello (about
/// 500 bytes from curl, up to 2 KiB with post-quantum key shares), fit.
const DETECT_BYTES: usize = 4096;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How much of the preface makes a connection HTTP/2: its request-line part, which no HTTP/1
/// client sends (`HTTP/2.0` is not an HTTP/1 version). The rest is checked by the HTTP/2
/// server, which closes the connection when it is wrong.
const H2_PREFACE_LINE: usize = b"PRI * HTTP/2.0".len();

/// What a connection or stream carries: what detection found, what a Service's
/// `edgemesh.io/protocol` annotation says, and what the opener of a tunnelled stream tells the
/// side that dials the endpoint (which limits HTTP/1 per request).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    H2,
    /// A TLS ClientHello: forwarded untouched, as opaque TCP.
    Tls,
    /// Anything else: forwarded as bytes.
    #[default]
    Opaque,
    /// Datagrams of a UDP flow, each framed with its length ([`super::datagram`]); never
    /// detected, only said by the opener of a stream.
    Udp,
}

impl Protocol {
    /// What detection can find (the order of the per-protocol counters).
    pub const ALL: [Protocol; 4] = [
        Protocol::Http1,
        Protocol::H2,
        Protocol::Tls,
        Protocol::Opaque,
    ];

    /// The `protocol` label of metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::H2 => "h2",
            Protocol::Tls => "tls",
            Protocol::Opaque => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// What the `edgemesh.io/protocol` annotation says, when it is set: detection is skipped.
    pub fn from_annotation(value: &str) -> Option<Protocol> {
        match value {
            "http" => Some(Protocol::Http1),
            "h2" | "grpc" => Some(Protocol::H2),
            "tcp" => Some(Protocol::Opaque),
            _ => None,
        }
    }

    /// The name in a stream's open request (`protocol`). TLS travels as `tcp`: to the side
    /// that dials the endpoint it is bytes like any other, and older agents know only `tcp`,
    /// `http` and `h2`.
    pub fn wire_name(self) -> &'static str {
        match self {
            Protocol::Http1 => "http",
            Protocol::H2 => "h2",
            Protocol::Tls | Protocol::Opaque => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// Whether requests are seen one by one (so that limits and balancing apply per request).
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http1 | Protocol::H2)
    }
}

impl serde::Serialize for Protocol {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.wire_name())
    }
}

impl<'de> serde::Deserialize<'de> for Protocol {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Protocol, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        match &*name {
            "http" => Ok(Protocol::Http1),
            "h2" => Ok(Protocol::H2),
            "tcp" => Ok(Protocol::Opaque),
            "tls" => Ok(Protocol::Tls),
            "udp" => Ok(Protocol::Udp),
            other => Err(serde::de::Error::unknown_variant(
                other,
                &["http", "h2", "tcp", "tls", "udp"],
            )),
        }
    }
}

/// The verdict on a connection and the bytes it was based on.
#[derive(Debug)]
pub struct Detected {
    pub protocol: Protocol,
    /// The server name of a TLS ClientHello, lower-cased, when it has a valid one.
    pub sni: Option<String>,
    /// The bytes read; they belong in front of whatever is read from the connection next.
    pub prefix: Bytes,
}

/// Reads the first bytes of `io` (at most [`DETECT_BYTES`], for at most `timeout`) until they
/// tell what the connection carries. Silence and an immediate end are opaque TCP with an
/// empty prefix.
pub async fn detect<T: AsyncRead + Unpin>(io: &mut T, timeout: Duration) -> io::Result<Detected> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = BytesMut::with_capacity(DETECT_BYTES);
    let (protocol, sni) = loop {
        let room = DETECT_BYTES - buf.len();
        match tokio::time::timeout_at(deadline, io.read_buf(&mut (&mut buf).limit(room))).await {
            // Silence (the server speaks first), or the client is done: decide on what came.
            Err(_) | Ok(Ok(0)) => break classify(&buf, false),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
        if buf.len() >= DETECT_BYTES {
            break classify(&buf, true);
        }
        if let Some(verdict) = decided(&buf) {
            break verdict;
        }
    };
    // A copy the size of what was read: the prefix lives until it is replayed, and should not
    // keep the whole read buffer with it.
    Ok(Detected {
        protocol,
        sni,
        prefix: Bytes::copy_from_slice(&buf),
    })
}

/// The verdict on the first bytes of a connection when they are all there is (or all that
/// fits). `full` says they filled [`DETECT_BYTES`]: a request line that is still unfinished
/// then is a long one (a long URL), not a client that stopped.
fn classify(bytes: &[u8], full: bool) -> (Protocol, Option<String>) {
    let n = bytes.len().min(H2_PREFACE.len());
    if n >= H2_PREFACE_LINE && bytes[..n] == H2_PREFACE[..n] {
        return (Protocol::H2, None);
    }
    if bytes.len() >= 3 && bytes[0] == 0x16 && bytes[1] == 0x03 {
        return (Protocol::Tls, client_hello_sni(bytes));
    }
    match looks_like_http1(bytes) {
        RequestLine::Http1 => (Protocol::Http1, None),
        RequestLine::NeedMore if full => (Protocol::Http1, None),
        _ => (Protocol::Opaque, None),
    }
}

/// The verdict when `bytes` already settle it; `None` while more could change it: a part of
/// the HTTP/2 preface or of an HTTP/1 request line, or a ClientHello not complete yet (its
/// server name comes late in it).
fn decided(bytes: &[u8]) -> Option<(Protocol, Option<String>)> {
    let n = bytes.len().min(H2_PREFACE.len());
    if n < H2_PREFACE_LINE && bytes[..n] == H2_PREFACE[..n] {
        return None;
    }
    if bytes.first() == Some(&0x16) && bytes.get(1).is_none_or(|&b| b == 0x03) {
        let record = bytes
            .get(3..5)
            .map(|l| 5 + usize::from(u16::from_be_bytes([l[0], l[1]])));
        if record.is_none_or(|end| bytes.len() < end.min(DETECT_BYTES)) {
            return None;
        }
    }
    if looks_like_http1(bytes) == RequestLine::NeedMore {
        return None;
    }
    Some(classify(bytes, false))
}

/// What the first bytes say about an HTTP/1 request line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RequestLine {
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
fn looks_like_http1(prefix: &[u8]) -> RequestLine {
    let method = prefix
        .iter()
        .enumerate()
        .take_while(|&(i, &b)| b.is_ascii_uppercase() || (i > 0 && b == b'-'))
        .count();
    if method > MAX_METHOD {
        return RequestLine::NotHttp;
    }
    let Some(rest) = after_space(prefix, method) else {
        return RequestLine::NeedMore;
    };
    let Some(rest) = rest else {
        return RequestLine::NotHttp;
    };
    // The target: visible ASCII and, as httparse allows, bytes above 0x7f.
    let target = rest.iter().take_while(|&&b| b > b' ' && b != 0x7f).count();
    let Some(rest) = after_space(rest, target) else {
        return RequestLine::NeedMore;
    };
    let Some(version) = rest else {
        return RequestLine::NotHttp;
    };
    const HTTP1: &[u8] = b"HTTP/1.";
    let n = version.len().min(HTTP1.len());
    if version[..n] != HTTP1[..n] {
        RequestLine::NotHttp
    } else {
        match version.get(HTTP1.len()) {
            None => RequestLine::NeedMore,
            Some(b) if b.is_ascii_digit() => RequestLine::Http1,
            Some(_) => RequestLine::NotHttp,
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

/// The server name (SNI) of a TLS ClientHello, when the bytes hold one with a valid DNS name.
/// Only the first record is looked at; a ClientHello cut short, malformed or without the
/// extension gives `None`. Every length is checked against what is there, so any input is
/// safe.
fn client_hello_sni(bytes: &[u8]) -> Option<String> {
    let mut record = Reader::new(bytes);
    if record.u8()? != 0x16 {
        return None;
    }
    record.skip(2)?; // record version
    let record_len = record.u16()? as usize;
    let mut hs = Reader::new(record.take(record_len.min(record.remaining()))?);
    if hs.u8()? != 0x01 {
        return None; // not a ClientHello
    }
    let hs_len = hs.u24()? as usize;
    let mut hello = Reader::new(hs.take(hs_len.min(hs.remaining()))?);
    hello.skip(2 + 32)?; // client version, random
    let session_id = hello.u8()? as usize;
    hello.skip(session_id)?;
    let suites = hello.u16()? as usize;
    hello.skip(suites)?;
    let compression = hello.u8()? as usize;
    hello.skip(compression)?;
    let extensions_len = hello.u16()? as usize;
    let mut extensions = Reader::new(hello.take(extensions_len)?);
    while extensions.remaining() > 0 {
        let kind = extensions.u16()?;
        let len = extensions.u16()? as usize;
        let data = extensions.take(len)?;
        if kind != 0 {
            continue;
        }
        // server_name: a list of (type, name); type 0 is a host name.
        let mut list = Reader::new(data);
        let list_len = list.u16()? as usize;
        let mut names = Reader::new(list.take(list_len)?);
        while names.remaining() > 0 {
            let name_type = names.u8()?;
            let name_len = names.u16()? as usize;
            let name = names.take(name_len)?;
            if name_type == 0 {
                return valid_host_name(name).then(|| {
                    String::from_utf8_lossy(name)
                        .trim_end_matches('.')
                        .to_ascii_lowercase()
                });
            }
        }
        return None;
    }
    None
}

/// A DNS name as RFC 6066 allows in SNI: letters, digits, `-`, `.`, `_` (seen in the wild),
/// at most 253 bytes, no empty label. Anything else is not recorded.
fn valid_host_name(name: &[u8]) -> bool {
    let name = name.strip_suffix(b".").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split(|&b| b == b'.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Big-endian fields out of a slice; `None` past its end.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    fn remaining(&self) -> usize {
        self.bytes.len()
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.bytes.len() {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(drop)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u24(&mut self) -> Option<u32> {
        self.take(3)
            .map(|b| u32::from_be_bytes([0, b[0], b[1], b[2]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::Rewind;
    use tokio::io::AsyncWriteExt;

    /// A TLS 1.2/1.3-style ClientHello with the given extensions.
    fn client_hello(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut exts = Vec::new();
        for (kind, data) in extensions {
            exts.extend_from_slice(&kind.to_be_bytes());
            exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
            exts.extend_from_slice(data);
        }
        let mut hello = vec![0x03, 0x03];
        hello.extend_from_slice(&[7u8; 32]); // random
        hello.push(32); // session id
        hello.extend_from_slice(&[1u8; 32]);
        hello.extend_from_slice(&4u16.to_be_bytes()); // cipher suites
        hello.extend_from_slice(&[0x13, 0x01, 0x13, 0x02]);
        hello.extend_from_slice(&[1, 0]); // compression: null
        hello.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        hello.extend_from_slice(&exts);
        let mut hs = vec![0x01];
        hs.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&hello);
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        record.extend_from_slice(&hs);
        record
    }

    fn sni(name: &str) -> (u16, Vec<u8>) {
        let mut entry = vec![0];
        entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
        entry.extend_from_slice(name.as_bytes());
        let mut data = (entry.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&entry);
        (0, data)
    }

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
                RequestLine::Http1,
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
                RequestLine::NeedMore,
                "{:?}",
                String::from_utf8_lossy(&line[..end])
            );
        }
        for end in complete..=line.len() {
            assert_eq!(looks_like_http1(&line[..end]), RequestLine::Http1);
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
                RequestLine::NotHttp,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn the_h2_preface_and_http1_request_lines() {
        assert_eq!(classify(H2_PREFACE, false), (Protocol::H2, None));
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04", false).0,
            Protocol::H2
        );
        assert_eq!(classify(b"PRI * HTTP/2.0", false).0, Protocol::H2);
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false).0,
            Protocol::Http1
        );
        assert_eq!(
            classify(b"POST /upload HTTP/1.0\r\n", false).0,
            Protocol::Http1
        );
        // A request line longer than one read is HTTP/1 all the same.
        let mut long = b"GET /".to_vec();
        long.resize(DETECT_BYTES, b'a');
        assert_eq!(classify(&long, true).0, Protocol::Http1);
        // The same bytes from a client that stopped mid-line: not enough to tell.
        assert_eq!(classify(&long[..100], false).0, Protocol::Opaque);
    }

    #[test]
    fn tls_client_hellos_with_and_without_a_server_name() {
        let with = client_hello(&[(0x000a, vec![0, 2, 0, 0x1d]), sni("Web.Default.SVC")]);
        assert_eq!(
            classify(&with, false),
            (Protocol::Tls, Some("web.default.svc".to_string()))
        );
        let without = client_hello(&[(0x000a, vec![0, 2, 0, 0x1d])]);
        assert_eq!(classify(&without, false), (Protocol::Tls, None));
        // Cut short anywhere: still TLS, no name, no panic.
        for end in 3..with.len() {
            let (protocol, name) = classify(&with[..end], false);
            assert_eq!(protocol, Protocol::Tls);
            assert!(name.is_none() || end == with.len(), "{end}");
        }
        // Names that are not DNS names are not recorded.
        for bad in ["", "a..b", "bad name", "x\u{7f}y", &"a".repeat(254)] {
            assert_eq!(
                client_hello_sni(&client_hello(&[sni(bad)])),
                None,
                "{bad:?}"
            );
        }
        // Lengths that lie are refused, not trusted.
        let mut lying = client_hello(&[sni("ok.example")]);
        let at = lying.len() - "ok.example".len() - 2;
        lying[at] = 0xff;
        assert_eq!(client_hello_sni(&lying), None);
    }

    #[test]
    fn anything_else_is_opaque() {
        for bytes in [
            &b"SSH-2.0-OpenSSH_9.2\r\n"[..],
            b"\x00\x00\x00\x01garbage",
            b"get / HTTP/1.1\r\n",
            b"G",
            b"PRI",
            b"\x16",
            b"\x16\x01\x00",
        ] {
            assert_eq!(
                classify(bytes, false).0,
                Protocol::Opaque,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn silence_is_opaque_after_the_timeout() {
        let (_client, mut server) = tokio::io::duplex(1024);
        let started = tokio::time::Instant::now();
        let d = detect(&mut server, Duration::from_millis(300))
            .await
            .expect("detect");
        assert_eq!(d.protocol, Protocol::Opaque);
        assert!(d.prefix.is_empty());
        assert_eq!(started.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn the_bytes_read_are_replayed() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let request = b"GET /a HTTP/1.1\r\nHost: web\r\n\r\n";
        client.write_all(request).await.expect("write");
        let d = detect(&mut server, Duration::from_millis(300))
            .await
            .expect("detect");
        assert_eq!(d.protocol, Protocol::Http1);
        client.write_all(b"more").await.expect("write");
        drop(client);
        let mut rewound = Rewind::new(d.prefix, server);
        let mut all = Vec::new();
        rewound.read_to_end(&mut all).await.expect("read");
        assert_eq!(all, [&request[..], b"more"].concat());
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_line_in_pieces_is_still_http1() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let writer = tokio::spawn(async move {
            for piece in [&b"GET /?i="[..], b"7", b" HTTP/1.1\r\nHost: x\r\n\r\n"] {
                client.write_all(piece).await?;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok::<_, io::Error>(client)
        });
        let d = detect(&mut server, Duration::from_millis(300))
            .await
            .expect("detect");
        assert_eq!(d.protocol, Protocol::Http1);
        assert!(
            d.prefix.starts_with(b"GET /?i=7 HTTP/1.1"),
            "{:?}",
            d.prefix
        );
        let _client = writer.await.expect("join").expect("write");

        // A ClientHello in two pieces: the name in the second one is found.
        let hello = client_hello(&[sni("split.example")]);
        let (mut client, mut server) = tokio::io::duplex(1024);
        let (first, second) = hello.split_at(20);
        let second = second.to_vec();
        client.write_all(first).await.expect("write");
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            client.write_all(&second).await.expect("write");
            client
        });
        let d = detect(&mut server, Duration::from_millis(300))
            .await
            .expect("detect");
        assert_eq!(d.protocol, Protocol::Tls);
        assert_eq!(d.sni.as_deref(), Some("split.example"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_client_holds_the_detection_only_for_the_timeout() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let started = tokio::time::Instant::now();
        let slow = tokio::spawn(async move {
            for b in b"GET / HTTP/1.1\r\n" {
                client.write_all(&[*b]).await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Ok::<_, io::Error>(client)
        });
        let d = detect(&mut server, Duration::from_millis(300))
            .await
            .expect("detect");
        assert_eq!((d.protocol, &d.prefix[..]), (Protocol::Opaque, &b"G"[..]));
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        slow.abort();
    }
}
