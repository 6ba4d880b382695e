//! Binary frames of tunnelled streams. One websocket binary message is one frame:
//!
//! ```text
//! byte 0     kind: 0 DATA, 1 WINDOW, 2 FIN, 3 RESET
//! bytes 1-4  stream id, big-endian (ids the cloud allocates are odd, a node's are even)
//! DATA       the payload, 1 to MAX_DATA bytes
//! WINDOW     4 bytes: how many more bytes the sender of this frame accepts on the stream
//! FIN        nothing: the sender will send no more data (half-close)
//! RESET      optional UTF-8 reason, at most MAX_REASON bytes: the stream is aborted
//! ```
//!
//! A relay rewrites the id in place and never looks at a payload.

use bytes::{BufMut, Bytes, BytesMut};

pub const HEADER: usize = 5;
/// Largest payload of one DATA frame.
pub const MAX_DATA: usize = 32 * 1024;
pub const MAX_REASON: usize = 128;

const DATA: u8 = 0;
const WINDOW: u8 = 1;
const FIN: u8 = 2;
const RESET: u8 = 3;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Data(u32, Bytes),
    Window(u32, u32),
    Fin(u32),
    Reset(u32, String),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("stream {0}: empty DATA frame")]
    EmptyData(u32),
    #[error("stream {id}: DATA frame of {len} bytes exceeds {MAX_DATA}")]
    Oversized { id: u32, len: usize },
    #[error("stream {0}: malformed WINDOW frame")]
    BadWindow(u32),
    #[error("stream {0}: FIN frame with a payload")]
    BadFin(u32),
    #[error("stream {0}: RESET reason is not short UTF-8")]
    BadReason(u32),
}

impl FrameError {
    /// The stream the bad frame named, when its header was readable: that stream is reset,
    /// while a frame without a readable header ends the link.
    pub fn stream(&self) -> Option<u32> {
        match self {
            FrameError::Short(_) | FrameError::UnknownKind(_) => None,
            FrameError::EmptyData(id)
            | FrameError::Oversized { id, .. }
            | FrameError::BadWindow(id)
            | FrameError::BadFin(id)
            | FrameError::BadReason(id) => Some(*id),
        }
    }
}

impl Frame {
    pub fn id(&self) -> u32 {
        match self {
            Frame::Data(id, _) | Frame::Window(id, _) | Frame::Fin(id) | Frame::Reset(id, _) => *id,
        }
    }

    pub fn encode(&self) -> Bytes {
        let (kind, id) = match self {
            Frame::Data(id, _) => (DATA, *id),
            Frame::Window(id, _) => (WINDOW, *id),
            Frame::Fin(id) => (FIN, *id),
            Frame::Reset(id, _) => (RESET, *id),
        };
        let extra = match self {
            Frame::Data(_, b) => b.len(),
            Frame::Window(..) => 4,
            Frame::Fin(_) => 0,
            Frame::Reset(_, r) => r.len().min(MAX_REASON),
        };
        let mut buf = BytesMut::with_capacity(HEADER + extra);
        buf.put_u8(kind);
        buf.put_u32(id);
        match self {
            Frame::Data(_, b) => buf.put_slice(b),
            Frame::Window(_, n) => buf.put_u32(*n),
            Frame::Fin(_) => {}
            Frame::Reset(_, r) => buf.put_slice(truncate(r, MAX_REASON).as_bytes()),
        }
        buf.freeze()
    }

    /// A DATA frame built straight from a slice (one copy, into the frame).
    pub fn encode_data(id: u32, payload: &[u8]) -> Bytes {
        let mut buf = BytesMut::with_capacity(HEADER + payload.len());
        buf.put_u8(DATA);
        buf.put_u32(id);
        buf.put_slice(payload);
        buf.freeze()
    }

    pub fn decode(mut raw: Bytes) -> Result<Frame, FrameError> {
        if raw.len() < HEADER {
            return Err(FrameError::Short(raw.len()));
        }
        let kind = raw[0];
        let id = stream_id(&raw).unwrap_or_default();
        let body = raw.split_off(HEADER);
        match kind {
            DATA if body.is_empty() => Err(FrameError::EmptyData(id)),
            DATA if body.len() > MAX_DATA => Err(FrameError::Oversized {
                id,
                len: body.len(),
            }),
            DATA => Ok(Frame::Data(id, body)),
            WINDOW => match <[u8; 4]>::try_from(&body[..]) {
                Ok(n) if u32::from_be_bytes(n) > 0 => Ok(Frame::Window(id, u32::from_be_bytes(n))),
                _ => Err(FrameError::BadWindow(id)),
            },
            FIN if body.is_empty() => Ok(Frame::Fin(id)),
            FIN => Err(FrameError::BadFin(id)),
            RESET if body.len() <= MAX_REASON => std::str::from_utf8(&body)
                .map(|r| Frame::Reset(id, r.to_string()))
                .map_err(|_| FrameError::BadReason(id)),
            RESET => Err(FrameError::BadReason(id)),
            other => Err(FrameError::UnknownKind(other)),
        }
    }
}

/// The stream id of an encoded frame, without decoding the rest.
pub fn stream_id(raw: &[u8]) -> Option<u32> {
    raw.get(1..HEADER)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
}

/// Whether an encoded frame is DATA, and its payload length.
pub fn data_len(raw: &[u8]) -> Option<usize> {
    (raw.first() == Some(&DATA)).then(|| raw.len().saturating_sub(HEADER))
}

/// The increment of an encoded WINDOW frame.
pub fn window_increment(raw: &[u8]) -> Option<u32> {
    if raw.first() != Some(&WINDOW) {
        return None;
    }
    raw.get(HEADER..HEADER + 4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
}

/// The same encoded frame for stream `id` (what a relay forwards). The header is rewritten in
/// place when `raw` is the only handle to its buffer (as a received message is); otherwise
/// the frame is copied. `raw` must hold at least a header (a decoded frame does).
pub fn with_stream_id(raw: Bytes, id: u32) -> Bytes {
    match raw.try_into_mut() {
        Ok(mut buf) => {
            buf[1..HEADER].copy_from_slice(&id.to_be_bytes());
            buf.freeze()
        }
        Err(shared) => {
            let mut buf = BytesMut::with_capacity(shared.len());
            buf.put_u8(shared[0]);
            buf.put_u32(id);
            buf.put_slice(&shared[HEADER..]);
            buf.freeze()
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        for f in [
            Frame::Data(2, Bytes::from_static(b"hello")),
            Frame::Window(3, 65536),
            Frame::Fin(4),
            Frame::Reset(5, "endpoint closed".into()),
            Frame::Reset(6, String::new()),
        ] {
            assert_eq!(Frame::decode(f.encode()), Ok(f));
        }
        let raw = Frame::encode_data(8, b"abc");
        assert_eq!(
            Frame::decode(raw.clone()),
            Ok(Frame::Data(8, Bytes::from_static(b"abc")))
        );
        assert_eq!(stream_id(&raw), Some(8));
        assert_eq!(data_len(&raw), Some(3));
        let moved = with_stream_id(raw.clone(), 11);
        assert_eq!(
            Frame::decode(moved),
            Ok(Frame::Data(11, Bytes::from_static(b"abc")))
        );
        // The only handle: rewritten in place.
        let ptr = raw.as_ptr();
        let moved = with_stream_id(raw, 13);
        assert_eq!(moved.as_ptr(), ptr);
        assert_eq!(stream_id(&moved), Some(13));
        assert_eq!(window_increment(&Frame::Window(1, 7).encode()), Some(7));
    }

    #[test]
    fn malformed_frames_are_errors_that_name_the_stream_when_they_can() {
        assert_eq!(
            Frame::decode(Bytes::from_static(b"\0\0")),
            Err(FrameError::Short(2))
        );
        assert_eq!(
            Frame::decode(Bytes::from_static(&[9, 0, 0, 0, 1])),
            Err(FrameError::UnknownKind(9))
        );
        let cases: [(&[u8], FrameError); 5] = [
            (&[0, 0, 0, 0, 7], FrameError::EmptyData(7)),
            (&[1, 0, 0, 0, 7, 0, 0], FrameError::BadWindow(7)),
            (&[1, 0, 0, 0, 7, 0, 0, 0, 0], FrameError::BadWindow(7)),
            (&[2, 0, 0, 0, 7, 1], FrameError::BadFin(7)),
            (&[3, 0, 0, 0, 7, 0xff, 0xfe], FrameError::BadReason(7)),
        ];
        for (raw, want) in cases {
            let got = Frame::decode(Bytes::copy_from_slice(raw));
            assert_eq!(got, Err(want.clone()));
            assert_eq!(want.stream(), Some(7));
        }
        let big = vec![0u8; HEADER + MAX_DATA + 1];
        assert!(matches!(
            Frame::decode(Bytes::from(big)),
            Err(FrameError::Oversized { id: 0, .. })
        ));
    }

    #[test]
    fn long_reset_reasons_are_cut_on_a_character_boundary() {
        let reason = "é".repeat(100);
        let raw = Frame::Reset(1, reason).encode();
        let Ok(Frame::Reset(_, r)) = Frame::decode(raw) else {
            panic!("not a reset")
        };
        assert!(r.len() <= MAX_REASON && r.chars().all(|c| c == 'é'));
    }
}
