//! HTTP/1 message heads as bytes: parsed once (httparse) and written out again for the next
//! hop in the same pass, with the rewriting of [`super::super::headers`] done on the raw
//! fields: hop-by-hop fields end here (RFC 9110 §7.6.1), an upgrade's own fields are put back,
//! `X-Forwarded-For` gains the client, and the body's framing (RFC 9112 §6) is worked out and
//! written explicitly, so the bytes that follow can be passed through as they are.

use thiserror::Error;

use super::framing::Framing;
use crate::http::answer;
use crate::http::headers::{Upgrade, HOP_BY_HOP};

/// Most header fields in one head; more get `431`, like an oversized head.
const MAX_FIELDS: usize = 100;

/// Why a head could not be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum HeadError {
    #[error("malformed head: {0}")]
    Malformed(&'static str),
    #[error("more than {MAX_FIELDS} header fields")]
    TooManyFields,
}

impl From<httparse::Error> for HeadError {
    fn from(e: httparse::Error) -> Self {
        match e {
            httparse::Error::TooManyHeaders => HeadError::TooManyFields,
            httparse::Error::HeaderName => HeadError::Malformed("invalid header name"),
            httparse::Error::HeaderValue => HeadError::Malformed("invalid header value"),
            httparse::Error::NewLine => HeadError::Malformed("invalid line ending"),
            httparse::Error::Status => HeadError::Malformed("invalid status"),
            httparse::Error::Token => HeadError::Malformed("invalid token"),
            httparse::Error::Version => HeadError::Malformed("invalid version"),
        }
    }
}

/// A client's request head, already written out for the endpoint.
#[derive(Debug)]
pub(crate) struct RequestHead {
    /// Bytes of the head in the client's buffer (up to and including the empty line).
    pub len: usize,
    /// The request's body, framed as the client framed it.
    pub framing: Framing,
    /// `1` for HTTP/1.1, `0` for HTTP/1.0.
    pub minor: u8,
    /// Whether the client wants the connection kept after the response.
    pub keep_alive: bool,
    pub upgrade: Option<Upgrade>,
    /// A `HEAD` request: its response has no body whatever its fields say.
    pub head_method: bool,
    /// Whether sending it twice does no more than sending it once (RFC 9110 §9.2.2): only
    /// such a request is sent again when a reused connection turns out closed after it went.
    pub idempotent: bool,
    /// `content-type: application/grpc...`: failures are answered the gRPC way.
    pub grpc: bool,
    /// The value of the Service's hash header, for consistent hashing.
    pub hash_key: Option<Vec<u8>>,
}

/// What the request head says about its response.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Exchange<'a> {
    pub head_method: bool,
    pub upgrade: Option<&'a Upgrade>,
    /// The client's HTTP/1 minor version.
    pub client_minor: u8,
}

/// An endpoint's response head.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ResponseHead {
    /// `1xx` other than `101`: passed on (to HTTP/1.1 clients), and another head follows.
    Informational {
        len: usize,
    },
    Final(FinalHead),
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct FinalHead {
    pub len: usize,
    pub status: u16,
    pub framing: Framing,
    /// The upgrade the client asked for was accepted: bytes both ways from here on.
    pub switched: bool,
    /// Whether the endpoint keeps the connection for another request.
    pub reusable: bool,
}

/// Parses a request head at the start of `buf` and writes it for the endpoint to `out`.
/// `Ok(None)`: the head is not complete yet. `client`: the address appended to
/// `X-Forwarded-For` (`None` when the request was forwarded by a proxy already);
/// `hash_header`: the field whose value picks the endpoint under consistent hashing.
pub(crate) fn request(
    buf: &[u8],
    client: Option<&[u8]>,
    hash_header: Option<&str>,
    out: &mut Vec<u8>,
) -> Result<Option<RequestHead>, HeadError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(buf)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Malformed("incomplete request line"));
    };
    let fields = Fields::read(req.headers)?;
    let framing = if let Some(codings) = &fields.transfer_encoding {
        if !last_is_chunked(codings) {
            // Without chunked last, the end of the body cannot be known (RFC 9112 §6.3).
            return Err(HeadError::Malformed(
                "transfer-encoding without chunked last",
            ));
        }
        Framing::Chunked
    } else {
        Framing::Length(fields.content_length.unwrap_or(0))
    };
    let upgrade = if minor == 0 {
        None
    } else if method == "CONNECT" {
        Some(Upgrade::Connect)
    } else if fields.connection_upgrade {
        fields
            .upgrade
            .and_then(|v| hyper::header::HeaderValue::from_bytes(v).ok())
            .map(Upgrade::Protocol)
    } else {
        None
    };
    let keep_alive = if minor == 0 {
        fields.connection_keep_alive
    } else {
        !fields.connection_close
    };
    let mut hash_key = None;
    let mut grpc = false;

    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(if minor == 0 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    let mut forwarded: Vec<&[u8]> = Vec::new();
    for field in req.headers.iter() {
        let name = field.name;
        if hash_header.is_some_and(|h| h.eq_ignore_ascii_case(name)) {
            hash_key = Some(field.value.to_vec());
        }
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            let v = field.value.trim_ascii();
            if !v.is_empty() {
                forwarded.push(v);
            }
            continue;
        }
        if name.eq_ignore_ascii_case("content-type") {
            grpc = answer::is_grpc_content_type(field.value);
        }
        if fields.drops(name) || (framing == Framing::Chunked && is(name, "content-length")) {
            continue;
        }
        write_field(out, name.as_bytes(), field.value);
    }
    fields.write_common(out, framing);
    if let Some(Upgrade::Protocol(protocols)) = &upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
        write_field(out, b"upgrade", protocols.as_bytes());
    } else if minor == 0 {
        // HTTP/1.0 connections close after each response unless asked not to; the endpoint's
        // connection is the proxy's, kept for the next request whatever the client does.
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    if !forwarded.is_empty() || client.is_some() {
        out.extend_from_slice(b"x-forwarded-for: ");
        let mut first = true;
        for v in forwarded.iter().copied().chain(client) {
            if !first {
                out.extend_from_slice(b", ");
            }
            first = false;
            out.extend_from_slice(v);
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(RequestHead {
        len,
        framing,
        minor,
        keep_alive,
        upgrade,
        head_method: method == "HEAD",
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        ),
        grpc,
        hash_key,
    }))
}

/// Parses a response head at the start of `buf` and writes it for the client to `out`.
/// `Ok(None)`: not complete yet. `close`: the client connection ends after this response
/// (the client is told so).
pub(crate) fn response(
    buf: &[u8],
    exchange: Exchange<'_>,
    close: bool,
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, HeadError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut res = httparse::Response::new(&mut fields);
    let len = match res.parse(buf)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    let (Some(status), Some(minor)) = (res.code, res.version) else {
        return Err(HeadError::Malformed("incomplete status line"));
    };
    out.clear();
    if (100..200).contains(&status) && status != 101 {
        // An interim answer (`100 Continue`, `103 Early Hints`); HTTP/1.0 clients know none.
        if exchange.client_minor > 0 {
            out.extend_from_slice(&buf[..len]);
        }
        return Ok(Some(ResponseHead::Informational { len }));
    }
    let fields = Fields::read(res.headers)?;
    let switched = match exchange.upgrade {
        Some(u @ Upgrade::Protocol(_)) => status == 101 && u.accepted_by_code(status),
        Some(Upgrade::Connect) => (200..300).contains(&status),
        None => false,
    };
    if status == 101 && !switched {
        return Err(HeadError::Malformed(
            "101 to a request that asked for no upgrade",
        ));
    }
    let framing = if switched
        || exchange.head_method
        || status == 204
        || status == 304
        || (100..200).contains(&status)
    {
        Framing::Length(0)
    } else if let Some(codings) = &fields.transfer_encoding {
        if last_is_chunked(codings) {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else {
        match fields.content_length {
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    let keeps = if minor == 0 {
        fields.connection_keep_alive
    } else {
        !fields.connection_close
    };
    let reusable = keeps && !switched && framing != Framing::UntilClose;

    out.extend_from_slice(b"HTTP/1.1 ");
    // The status line after the version, as the endpoint wrote it (code and reason).
    let line_end = buf
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(0);
    out.extend_from_slice(buf.get(9..line_end).unwrap_or(b""));
    out.extend_from_slice(b"\r\n");
    for field in res.headers.iter() {
        let name = field.name;
        // A body passed through until the close keeps the codings it was sent with.
        let kept_codings = framing == Framing::UntilClose && is(name, "transfer-encoding");
        if (fields.drops(name) && !kept_codings)
            || (framing == Framing::Chunked && is(name, "content-length"))
        {
            continue;
        }
        write_field(out, name.as_bytes(), field.value);
    }
    fields.write_common(out, framing);
    if switched && status == 101 {
        out.extend_from_slice(b"connection: upgrade\r\n");
        write_field(out, b"upgrade", fields.upgrade.unwrap_or(b""));
    } else if close || framing == Framing::UntilClose {
        out.extend_from_slice(b"connection: close\r\n");
    } else if exchange.client_minor == 0 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(ResponseHead::Final(FinalHead {
        len,
        status,
        framing,
        switched,
        reusable,
    })))
}

/// What a head's fields say about the connection and the body, read before it is written out.
#[derive(Default)]
struct Fields<'h> {
    /// Field names `Connection` lists: hop-by-hop too.
    listed: Vec<&'h str>,
    connection_close: bool,
    connection_keep_alive: bool,
    connection_upgrade: bool,
    upgrade: Option<&'h [u8]>,
    transfer_encoding: Option<Vec<u8>>,
    content_length: Option<u64>,
    /// `TE` lists `trailers`, which still holds for the next hop (gRPC requires it).
    te_trailers: bool,
}

impl<'h> Fields<'h> {
    fn read(headers: &[httparse::Header<'h>]) -> Result<Fields<'h>, HeadError> {
        let mut f = Fields::default();
        for field in headers {
            let name = field.name;
            let value = field.value;
            if is(name, "connection") {
                for token in tokens(value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        f.connection_close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        f.connection_keep_alive = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        f.connection_upgrade = true;
                    } else if let Ok(listed) = std::str::from_utf8(token) {
                        f.listed.push(listed);
                    }
                }
            } else if is(name, "upgrade") {
                f.upgrade = Some(value);
            } else if is(name, "transfer-encoding") {
                let codings = f.transfer_encoding.get_or_insert_with(Vec::new);
                if !codings.is_empty() {
                    codings.push(b',');
                }
                codings.extend_from_slice(value);
            } else if is(name, "content-length") {
                let n = std::str::from_utf8(value)
                    .ok()
                    .map(str::trim)
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or(HeadError::Malformed("invalid content-length"))?;
                if f.content_length.is_some_and(|m| m != n) {
                    return Err(HeadError::Malformed("conflicting content-length"));
                }
                f.content_length = Some(n);
            } else if is(name, "te") {
                f.te_trailers |= tokens(value).any(|t| t.eq_ignore_ascii_case(b"trailers"));
            }
        }
        Ok(f)
    }

    /// Whether a field ends at this hop: the connection's own, and any `Connection` names
    /// (never `Host`: a client must not be able to make the proxy drop the target).
    fn drops(&self, name: &str) -> bool {
        HOP_BY_HOP.iter().any(|h| is(name, h))
            || (!is(name, "host") && self.listed.iter().any(|l| is(name, l)))
    }

    /// The hop-by-hop fields this hop writes itself.
    fn write_common(&self, out: &mut Vec<u8>, framing: Framing) {
        if framing == Framing::Chunked {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        if self.te_trailers {
            out.extend_from_slice(b"te: trailers\r\n");
        }
    }
}

impl Upgrade {
    fn accepted_by_code(&self, status: u16) -> bool {
        hyper::StatusCode::from_u16(status).is_ok_and(|s| self.accepted_by(s))
    }
}

fn is(name: &str, lower: &str) -> bool {
    name.eq_ignore_ascii_case(lower)
}

fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

fn last_is_chunked(codings: &[u8]) -> bool {
    tokens(codings)
        .last()
        .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"))
}

fn write_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes the fields of a head built with hyper's types (an answer of our own, a request the
/// router ingress sends on), leaving out those `skip` names.
pub(super) fn write_fields(
    out: &mut Vec<u8>,
    fields: &hyper::HeaderMap,
    skip: Option<&hyper::header::HeaderName>,
) {
    for (name, value) in fields {
        if Some(name) == skip {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(raw: &str, client: Option<&str>) -> (RequestHead, String) {
        let mut out = Vec::new();
        let head = request(
            raw.as_bytes(),
            client.map(str::as_bytes),
            Some("x-user"),
            &mut out,
        )
        .expect("valid")
        .expect("complete");
        (head, String::from_utf8(out).expect("utf-8"))
    }

    fn res(raw: &str, exchange: Exchange<'_>, close: bool) -> (ResponseHead, String) {
        let mut out = Vec::new();
        let head = response(raw.as_bytes(), exchange, close, &mut out)
            .expect("valid")
            .expect("complete");
        (head, String::from_utf8(out).expect("utf-8"))
    }

    const PLAIN: Exchange<'static> = Exchange {
        head_method: false,
        upgrade: None,
        client_minor: 1,
    };

    #[test]
    fn hop_by_hop_fields_stop_here_and_the_client_is_appended() {
        let raw = "GET /x HTTP/1.1\r\nHost: web\r\nConnection: keep-alive, X-Secret-Hop\r\n\
                   Connection: host\r\nX-Secret-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
                   Proxy-Connection: keep-alive\r\nTE: gzip, trailers\r\nUpgrade: h2c\r\n\
                   X-User: alice\r\nX-Forwarded-For: 203.0.113.7\r\n\
                   x-forwarded-for: 198.51.100.2, 10.0.0.1\r\n\r\nbody";
        let (head, out) = req(raw, Some("10.244.1.5"));
        assert_eq!(head.len, raw.len() - 4);
        assert_eq!(head.framing, Framing::Length(0));
        assert!(head.keep_alive && head.upgrade.is_none() && head.idempotent);
        assert_eq!(head.hash_key.as_deref(), Some(&b"alice"[..]));
        assert_eq!(
            out,
            "GET /x HTTP/1.1\r\nHost: web\r\nX-User: alice\r\nte: trailers\r\n\
             x-forwarded-for: 203.0.113.7, 198.51.100.2, 10.0.0.1, 10.244.1.5\r\n\r\n"
        );
        let (_, out) = req("GET / HTTP/1.1\r\nHost: web\r\n\r\n", None);
        assert_eq!(out, "GET / HTTP/1.1\r\nHost: web\r\n\r\n", "nothing to add");
    }

    #[test]
    fn request_bodies_are_framed_once() {
        let (head, out) = req(
            "POST /u HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: gzip\r\n\
             Transfer-Encoding: chunked\r\n\r\n",
            None,
        );
        assert_eq!(head.framing, Framing::Chunked);
        assert!(!head.idempotent);
        assert_eq!(
            out, "POST /u HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            "chunked wins over a length, which is dropped (no smuggling)"
        );
        let (head, _) = req(
            "PUT /u HTTP/1.1\r\nContent-Length: 7\r\ncontent-length: 7\r\n\r\n",
            None,
        );
        assert_eq!(head.framing, Framing::Length(7));
        let mut out = Vec::new();
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        ] {
            assert!(
                matches!(
                    request(bad.as_bytes(), None, None, &mut out),
                    Err(HeadError::Malformed(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            request(b"GET / HTTP/1.1\r\nHost: w", None, None, &mut out),
            Ok(None)
        ));
        assert!(request(b"GET / HTTP/1.1\r\nHo st: w\r\n\r\n", None, None, &mut out).is_err());
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "a: b\r\n".repeat(101));
        assert_eq!(
            request(many.as_bytes(), None, None, &mut out).err(),
            Some(HeadError::TooManyFields)
        );
    }

    #[test]
    fn keep_alive_follows_the_version() {
        let (head, out) = req("GET / HTTP/1.0\r\n\r\n", None);
        assert!(!head.keep_alive);
        assert_eq!(out, "GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n");
        let (head, _) = req("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", None);
        assert!(head.keep_alive);
        let (head, _) = req("GET / HTTP/1.1\r\nConnection: close\r\n\r\n", None);
        assert!(!head.keep_alive);
    }

    #[test]
    fn upgrades_keep_their_fields() {
        let (head, out) = req(
            "GET /ws HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            Some("10.0.0.1"),
        );
        let upgrade = head.upgrade.expect("upgrade");
        assert_eq!(
            upgrade,
            Upgrade::Protocol(hyper::header::HeaderValue::from_static("websocket"))
        );
        assert_eq!(
            out,
            "GET /ws HTTP/1.1\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             connection: upgrade\r\nupgrade: websocket\r\nx-forwarded-for: 10.0.0.1\r\n\r\n"
        );
        let ws = Exchange {
            upgrade: Some(&upgrade),
            ..PLAIN
        };
        let (head, out) = res(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Accept: x\r\n\r\n",
            ws,
            false,
        );
        assert!(matches!(
            head,
            ResponseHead::Final(FinalHead {
                switched: true,
                reusable: false,
                ..
            })
        ));
        assert_eq!(
            out,
            "HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: x\r\n\
             connection: upgrade\r\nupgrade: websocket\r\n\r\n"
        );
        // A 200 to an upgrade request is an ordinary response; an unasked 101 is refused.
        let (head, out) = res(
            "HTTP/1.1 200 OK\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n",
            ws,
            false,
        );
        assert!(matches!(
            head,
            ResponseHead::Final(FinalHead {
                switched: false,
                ..
            })
        ));
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        let mut o = Vec::new();
        assert!(response(b"HTTP/1.1 101 Switching\r\n\r\n", PLAIN, false, &mut o).is_err());

        let (head, _) = req("CONNECT example.com:443 HTTP/1.1\r\n\r\n", None);
        let connect = head.upgrade.expect("connect");
        let (head, _) = res(
            "HTTP/1.1 200 Connection established\r\n\r\n",
            Exchange {
                upgrade: Some(&connect),
                ..PLAIN
            },
            false,
        );
        assert!(matches!(
            head,
            ResponseHead::Final(FinalHead {
                switched: true,
                framing: Framing::Length(0),
                ..
            })
        ));
    }

    #[test]
    fn response_framing_and_reuse() {
        let cases: [(&str, Exchange<'_>, Framing, bool); 7] = [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n",
                PLAIN,
                Framing::Length(12),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                PLAIN,
                Framing::Chunked,
                true,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", PLAIN, Framing::UntilClose, false),
            (
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
                PLAIN,
                Framing::Length(1),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
                PLAIN,
                Framing::Length(1),
                false,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
                PLAIN,
                Framing::Length(0),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
                Exchange {
                    head_method: true,
                    ..PLAIN
                },
                Framing::Length(0),
                true,
            ),
        ];
        for (raw, exchange, framing, reusable) in cases {
            let (head, _) = res(raw, exchange, false);
            let ResponseHead::Final(head) = head else {
                panic!("{raw}")
            };
            assert_eq!((head.framing, head.reusable), (framing, reusable), "{raw}");
        }
        let (_, out) = res(
            "HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\n",
            PLAIN,
            true,
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\n"
        );
        let (_, out) = res(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            Exchange {
                client_minor: 0,
                ..PLAIN
            },
            false,
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: keep-alive\r\n\r\n"
        );
        let (head, out) = res("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK", PLAIN, false);
        assert_eq!(head, ResponseHead::Informational { len: 25 });
        assert_eq!(out, "HTTP/1.1 100 Continue\r\n\r\n");
        let (_, out) = res(
            "HTTP/1.1 100 Continue\r\n\r\n",
            Exchange {
                client_minor: 0,
                ..PLAIN
            },
            false,
        );
        assert_eq!(out, "", "not for HTTP/1.0 clients");
    }
}
