//! HTTP/1 bodies passed through as they were framed (RFC 9112 §6–7): a length, chunks, or
//! everything until the sender closes. Chunked bodies are not decoded, only scanned, so the
//! proxy knows where a message ends and the next one starts; their bytes go on unchanged.

use std::io;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::timer::within;

/// A read that fills less than this of the free space keeps the buffer small; one that fills
/// it marks a bulk transfer, which gets [`BULK`].
const SMALL: usize = 8 * 1024;
const BULK: usize = 64 * 1024;
/// Longest chunk-size line (the size and its extensions) and trailer section accepted.
const MAX_SIZE_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 64 * 1024;

/// How a message's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    Length(u64),
    Chunked,
    /// Until the sender closes (responses only): the connection cannot be reused.
    UntilClose,
}

#[derive(Debug, Error)]
pub(crate) enum BodyError {
    /// The sending side failed, ended early, or broke the framing.
    #[error("reading the body: {0}")]
    Read(io::Error),
    #[error("writing the body: {0}")]
    Write(io::Error),
}

/// Where a body is: how much of it is still to come.
#[derive(Debug)]
pub(crate) struct Body {
    state: State,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Length(u64),
    /// In a chunk-size line: the size so far, its digits, whether extensions started, and
    /// the line's length.
    Size {
        size: u64,
        digits: u8,
        ext: bool,
        line: usize,
        cr: bool,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// In the trailer section after the last chunk: the current line's length and the
    /// section's.
    Trailers {
        line: usize,
        total: usize,
    },
    UntilClose,
    Done,
}

fn framing_error(what: &'static str) -> BodyError {
    BodyError::Read(io::Error::new(io::ErrorKind::InvalidData, what))
}

impl Body {
    pub(crate) fn new(framing: Framing) -> Body {
        let state = match framing {
            Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Size {
                size: 0,
                digits: 0,
                ext: false,
                line: 0,
                cr: false,
            },
            Framing::UntilClose => State::UntilClose,
        };
        Body { state }
    }

    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Whether the body ends when its sender closes.
    pub(crate) fn ends_at_close(&self) -> bool {
        self.state == State::UntilClose
    }

    /// How many bytes at the start of `bytes` belong to the body; when that is fewer than
    /// all of them, the body ends there.
    pub(crate) fn scan(&mut self, bytes: &[u8]) -> Result<usize, BodyError> {
        self.scan_data(bytes, |_| {})
    }

    /// [`Body::scan`], telling `data` where the message's own bytes are (not chunk sizes, line
    /// ends or trailers): what a receiver that decodes the body keeps.
    pub(crate) fn scan_data(
        &mut self,
        bytes: &[u8],
        mut data: impl FnMut(std::ops::Range<usize>),
    ) -> Result<usize, BodyError> {
        let mut at = 0;
        while at < bytes.len() {
            match &mut self.state {
                State::Done => break,
                State::UntilClose => {
                    data(at..bytes.len());
                    return Ok(bytes.len());
                }
                State::Length(left) | State::Data(left) => {
                    let n = (bytes.len() - at).min(usize::try_from(*left).unwrap_or(usize::MAX));
                    data(at..at + n);
                    at += n;
                    *left -= n as u64;
                    if *left == 0 {
                        self.state = match self.state {
                            State::Data(_) => State::DataCr,
                            _ => State::Done,
                        };
                    }
                }
                State::Size {
                    size,
                    digits,
                    ext,
                    line,
                    cr,
                } => {
                    let b = bytes[at];
                    at += 1;
                    *line += 1;
                    if *line > MAX_SIZE_LINE {
                        return Err(framing_error("chunk-size line too long"));
                    }
                    if *cr {
                        if b != b'\n' {
                            return Err(framing_error("chunk-size line without LF"));
                        }
                        if *digits == 0 {
                            return Err(framing_error("chunk size missing"));
                        }
                        self.state = if *size == 0 {
                            State::Trailers { line: 0, total: 0 }
                        } else {
                            State::Data(*size)
                        };
                        continue;
                    }
                    match b {
                        b'\r' => *cr = true,
                        _ if *ext => {}
                        b';' | b' ' | b'\t' => *ext = true,
                        _ => {
                            let digit = (b as char)
                                .to_digit(16)
                                .ok_or_else(|| framing_error("invalid chunk size"))?;
                            if *digits >= 16 {
                                return Err(framing_error("chunk size too large"));
                            }
                            *digits += 1;
                            *size = *size << 4 | u64::from(digit);
                        }
                    }
                }
                State::DataCr => {
                    if bytes[at] != b'\r' {
                        return Err(framing_error("chunk without CRLF"));
                    }
                    at += 1;
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if bytes[at] != b'\n' {
                        return Err(framing_error("chunk without CRLF"));
                    }
                    at += 1;
                    self.state = State::Size {
                        size: 0,
                        digits: 0,
                        ext: false,
                        line: 0,
                        cr: false,
                    };
                }
                State::Trailers { line, total } => {
                    let b = bytes[at];
                    at += 1;
                    *total += 1;
                    if *total > MAX_TRAILERS {
                        return Err(framing_error("trailer section too large"));
                    }
                    match b {
                        b'\n' if *line == 0 => self.state = State::Done,
                        b'\n' => *line = 0,
                        b'\r' => {}
                        _ => *line += 1,
                    }
                }
            }
        }
        Ok(at)
    }
}

/// Passes `body` from `buf` (bytes read already) and `reader` to `writer` until it ends;
/// what follows it stays in `buf`. `idle`: longest wait for a read or a write.
pub(crate) async fn copy<R, W>(
    body: &mut Body,
    buf: &mut BytesMut,
    reader: &mut R,
    writer: &mut W,
    idle: Duration,
) -> Result<u64, BodyError>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut moved = 0u64;
    let mut bulk = false;
    loop {
        if !buf.is_empty() {
            let n = body.scan(buf)?;
            if n > 0 {
                within(idle, writer.write_all(&buf[..n]))
                    .await
                    .map_err(BodyError::Write)?;
                buf.advance(n);
                moved += n as u64;
            }
        }
        if body.is_done() {
            return Ok(moved);
        }
        let want = if bulk { BULK } else { SMALL };
        if buf.capacity() - buf.len() < want / 2 {
            buf.reserve(want);
        }
        let free = buf.capacity() - buf.len();
        let n = within(idle, reader.read_buf(buf))
            .await
            .map_err(BodyError::Read)?;
        if n == 0 {
            if body.state == State::UntilClose {
                body.state = State::Done;
                return Ok(moved);
            }
            return Err(BodyError::Read(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the body ended early",
            )));
        }
        bulk = n >= free;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `raw` fed in pieces of `step` bytes; returns where the body ended.
    fn end_of(framing: Framing, raw: &[u8], step: usize) -> Result<Option<usize>, String> {
        let mut body = Body::new(framing);
        let mut at = 0;
        while at < raw.len() && !body.is_done() {
            let piece = &raw[at..(at + step).min(raw.len())];
            let n = body.scan(piece).map_err(|e| e.to_string())?;
            at += n;
            if n < piece.len() {
                break;
            }
        }
        Ok(body.is_done().then_some(at))
    }

    #[test]
    fn chunked_bodies_end_where_the_last_chunk_and_trailers_do() {
        let raw = b"5\r\nhello\r\n1A;name=value\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\ngrpc-status: 0\r\n\r\nGET /next";
        let body_len = raw.len() - "GET /next".len();
        for step in [1, 2, 7, raw.len()] {
            assert_eq!(
                end_of(Framing::Chunked, raw, step),
                Ok(Some(body_len)),
                "step {step}"
            );
        }
        assert_eq!(end_of(Framing::Chunked, b"0\r\n\r\nX", 1), Ok(Some(5)));
        assert_eq!(end_of(Framing::Chunked, b"3\r\nab", 1), Ok(None), "not yet");
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"3\r\nabcX",
            b"11111111111111111\r\n",
            b"3\rX",
        ] {
            assert!(
                end_of(Framing::Chunked, bad, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("1;{}\r\n", "e".repeat(MAX_SIZE_LINE));
        assert!(end_of(Framing::Chunked, long.as_bytes(), 64).is_err());
    }

    #[test]
    fn decoding_keeps_the_data_alone() {
        let raw = b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nt: 1\r\n\r\nNEXT";
        let mut body = Body::new(Framing::Chunked);
        let mut out = Vec::new();
        let mut at = 0;
        for piece in raw.chunks(3) {
            let n = body
                .scan_data(piece, |r| out.extend_from_slice(&piece[r]))
                .expect("valid");
            at += n;
            if n < piece.len() {
                break;
            }
        }
        assert_eq!(out, b"hello world");
        assert_eq!(at, raw.len() - 4);
    }

    #[test]
    fn lengths_and_until_close() {
        assert_eq!(end_of(Framing::Length(3), b"abcdef", 2), Ok(Some(3)));
        assert_eq!(end_of(Framing::Length(0), b"abc", 2), Ok(Some(0)));
        assert_eq!(end_of(Framing::UntilClose, b"abc", 2), Ok(None));
    }

    /// Copies one body in `framing` from `buf` and then `reader`; what it wrote, or how it failed.
    async fn copy_body(
        framing: Framing,
        buf: &mut BytesMut,
        mut reader: &[u8],
    ) -> Result<Vec<u8>, BodyError> {
        let mut out = Vec::new();
        let n = copy(
            &mut Body::new(framing),
            buf,
            &mut reader,
            &mut out,
            Duration::from_secs(1),
        )
        .await?;
        assert_eq!(n, out.len() as u64, "counted what it wrote");
        Ok(out)
    }

    #[tokio::test]
    async fn copy_stops_at_the_end_and_keeps_what_follows() {
        let mut buf = BytesMut::from(&b"4\r\nwi"[..]);
        let out = copy_body(
            Framing::Chunked,
            &mut buf,
            b"ki\r\n0\r\n\r\nGET / HTTP/1.1\r\n",
        )
        .await
        .expect("copied");
        assert_eq!(out, b"4\r\nwiki\r\n0\r\n\r\n");
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\n");

        let mut buf = BytesMut::new();
        let ended = copy_body(Framing::Length(5), &mut buf, b"abc").await;
        assert!(
            matches!(ended, Err(BodyError::Read(e)) if e.kind() == io::ErrorKind::UnexpectedEof)
        );
        let out = copy_body(Framing::UntilClose, &mut buf, b"abc")
            .await
            .expect("until close");
        assert_eq!(out, b"abc");
    }
}
