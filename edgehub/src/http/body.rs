//! The body of a response on its way to the client: the endpoint's, streamed, or one the
//! proxy wrote.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::h1::RawBody;
use super::BoxError;
use crate::balance::InFlight;

/// What the proxy's HTTP servers send back.
pub type ProxyBody = Either<Guarded, Full<Bytes>>;

/// An endpoint's response body (HTTP/2 from hyper, or HTTP/1 read from a kept connection),
/// which counts as a request in flight at that endpoint (for `least-request`) until it has been
/// sent or dropped.
pub struct Guarded {
    // Dropped in this order: the body (an HTTP/1 one offers its connection back) before the
    // endpoint's count goes down.
    inner: Inner,
    _in_flight: Option<InFlight>,
}

enum Inner {
    H2(Incoming),
    H1(Box<RawBody>),
}

impl Guarded {
    pub fn h2(inner: Incoming, in_flight: InFlight) -> Guarded {
        Guarded {
            inner: Inner::H2(inner),
            _in_flight: Some(in_flight),
        }
    }

    /// An HTTP/1 body, which holds its endpoint's in-flight count itself.
    pub fn h1(inner: RawBody) -> Guarded {
        Guarded {
            inner: Inner::H1(Box::new(inner)),
            _in_flight: None,
        }
    }
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.inner {
            Inner::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Inner::H1(b) => Pin::new(b.as_mut()).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::H2(b) => b.is_end_stream(),
            Inner::H1(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::H2(b) => b.size_hint(),
            Inner::H1(b) => b.size_hint(),
        }
    }
}
