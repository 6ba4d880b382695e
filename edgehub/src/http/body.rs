//! The body of a response on its way to the client: the endpoint's, streamed, or one the
//! proxy wrote.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::upstream::Recycle;
use crate::balance::InFlight;

/// What the proxy's HTTP servers send back.
pub type ProxyBody = Either<Guarded, Full<Bytes>>;

/// An endpoint's response body, which counts as a request in flight at that endpoint (for
/// `least-request`) until it has been sent or dropped, and whose HTTP/1 connection goes back
/// to the pool then.
pub struct Guarded {
    // Dropped in this order: the body before the connection is offered back.
    inner: Incoming,
    _recycle: Option<Recycle>,
    _in_flight: InFlight,
}

impl Guarded {
    pub fn new(inner: Incoming, in_flight: InFlight, recycle: Option<Recycle>) -> Guarded {
        Guarded {
            inner,
            _recycle: recycle,
            _in_flight: in_flight,
        }
    }
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
