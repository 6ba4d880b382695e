//! HTTP/1 requests that arrive as hyper's types — the router's ingress, which matched and
//! rewrote them itself — sent over the same kept byte-stream connections as the proxy's own
//! ([`super::serve`]), by the same rule ([`Attempts`]): the head is written out from hyper's
//! fields, the body framed by its length or in chunks, and the response comes back as a hyper
//! response whose body ([`RawBody`]) reads the connection and decodes the framing, returning the
//! connection to the pool when it has been read to its end.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use tokio::io::AsyncWriteExt;
use tracing::debug;

use super::framing::{Body, Framing};
use super::head::{self, Exchange, FinalHead};
use super::{read_response_head, HeadFailure, READ_ROOM, STALE_RETRIES};
use crate::balance::{InFlight, PickContext};
use crate::connect::Upstream;
use crate::http::answer::HttpError;
use crate::http::dispatch::Attempts;
use crate::http::pool::PoolKey;
use crate::http::upstream::Unsent;
use crate::http::Http;
use crate::io::{Duplex, Protocol};
use crate::routes::Route;

/// An endpoint's response head, and its body still to be read from the connection.
pub(crate) struct Answered {
    pub response: Response<RawBody>,
}

impl Http {
    /// Sends `req` (hop-by-hop fields already out) to an endpoint of `route` over a kept
    /// HTTP/1 connection and waits for the response head. The caller bounds the whole request
    /// (the router's `router.request_timeout`).
    pub(crate) async fn send_h1(
        self: &Arc<Self>,
        route: &Route,
        req: Request<Incoming>,
        pick: &PickContext<'_>,
    ) -> Result<Answered, HttpError> {
        let (parts, body) = req.into_parts();
        // A body of known length keeps it; any other is sent in chunks.
        let framing = match body.size_hint().exact() {
            Some(0) if body.is_end_stream() => Framing::Length(0),
            Some(n) if parts.headers.contains_key(hyper::header::CONTENT_LENGTH) => {
                Framing::Length(n)
            }
            _ => Framing::Chunked,
        };
        let mut head = Vec::new();
        write_request_head(&parts, framing, &mut head);
        let mut body = (framing != Framing::Length(0)).then_some(body);
        let idempotent = parts.method.is_idempotent();
        let exchange = Exchange {
            head_method: parts.method == hyper::Method::HEAD,
            upgrade: None,
            client_minor: 1,
        };
        let limited = self
            .limiters
            .limit(&route.service.namespace, &route.service.name)
            .is_some();
        let mut attempts = Attempts::new(route)?;
        loop {
            let endpoint = attempts.next(self, pick)?;
            let key = PoolKey::new(route, endpoint.addr, limited, 0);
            let mut stale = 0;
            let not_sent = loop {
                let (mut upstream, reused) = match self.pool.take_h1(&key) {
                    Some(upstream) => (upstream, true),
                    None => match self.reach(route, endpoint, Protocol::Http1).await {
                        Ok(upstream) => (upstream, false),
                        Err(Unsent::RateLimited) => {
                            return Err(HttpError::RateLimited {
                                service: route.stats.label().to_string(),
                                retry_after: std::time::Duration::from_secs(1),
                            })
                        }
                        Err(Unsent::Failed(e)) => break e,
                    },
                };
                let in_flight = InFlight::start(&endpoint.health);
                let failed = |e: io::Error| HttpError::Failed {
                    service: route.stats.label().to_string(),
                    endpoint: endpoint.addr,
                    source: Box::new(e),
                };
                // The head: while only it went, the request may go again elsewhere.
                match upstream.write_all(&head).await {
                    Err(e) if reused && stale < STALE_RETRIES => {
                        debug!(endpoint = %endpoint.addr, error = %e, "kept connection was closed; another one");
                        stale += 1;
                        continue;
                    }
                    Err(e) => {
                        endpoint.health.record_failure();
                        break Box::new(e);
                    }
                    Ok(()) => {}
                }
                if let Some(body) = body.take() {
                    send_body(body, framing, &mut upstream).await?;
                }
                let mut ubuf = BytesMut::new();
                let mut rout = Vec::new();
                let read = {
                    let (mut reader, _) = upstream.halves();
                    read_response_head(
                        &mut reader,
                        &mut ubuf,
                        &mut rout,
                        exchange,
                        &mut tokio::io::sink(),
                        None,
                        false,
                    )
                    .await
                };
                let final_head = match read {
                    Ok(h) => h,
                    // No deadline was given: the caller times the request.
                    Err(HeadFailure::TimedOut) => {
                        return Err(failed(io::ErrorKind::TimedOut.into()))
                    }
                    Err(HeadFailure::Closed(e))
                        if reused
                            && stale < STALE_RETRIES
                            && idempotent
                            && framing == Framing::Length(0) =>
                    {
                        debug!(endpoint = %endpoint.addr, error = %e, "kept connection closed under the request; another one");
                        stale += 1;
                        continue;
                    }
                    Err(
                        HeadFailure::Closed(e) | HeadFailure::Endpoint(e) | HeadFailure::Client(e),
                    ) => return Err(failed(e)),
                };
                let response = response_of(&rout, &final_head)
                    .map_err(|e| failed(io::Error::new(io::ErrorKind::InvalidData, e)))?;
                let recycle = final_head.reusable.then(|| (self.clone(), key.clone()));
                let body = RawBody {
                    conn: Some(upstream),
                    buf: ubuf,
                    body: Body::new(final_head.framing),
                    recycle,
                    _in_flight: in_flight,
                };
                return Ok(Answered {
                    response: response.map(|()| body),
                });
            };
            attempts.not_sent(endpoint.addr, not_sent);
        }
    }
}

/// The request line and fields for the endpoint, framed as `framing` says.
fn write_request_head(parts: &hyper::http::request::Parts, framing: Framing, out: &mut Vec<u8>) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // A chunked body's length is in its chunks; a stale Content-Length beside it would be
    // request smuggling's raw material.
    let skip = (framing == Framing::Chunked).then_some(&hyper::header::CONTENT_LENGTH);
    head::write_fields(out, &parts.headers, skip);
    if framing == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes the request body to the endpoint in `framing`. Trailers are not passed on.
async fn send_body(
    mut body: Incoming,
    framing: Framing,
    upstream: &mut Upstream,
) -> Result<(), HttpError> {
    let failed = |e: io::Error| HttpError::BadRequest(Box::new(e));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| HttpError::BadRequest(Box::new(e)))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        if framing == Framing::Chunked {
            let size = format!("{:x}\r\n", data.len());
            upstream.write_all(size.as_bytes()).await.map_err(failed)?;
            upstream.write_all(&data).await.map_err(failed)?;
            upstream.write_all(b"\r\n").await.map_err(failed)?;
        } else {
            upstream.write_all(&data).await.map_err(failed)?;
        }
    }
    if framing == Framing::Chunked {
        upstream.write_all(b"0\r\n\r\n").await.map_err(failed)?;
    }
    Ok(())
}

/// A hyper response from the rewritten head in `rout` (hop-by-hop fields out already; the
/// framing fields are hyper's to write).
fn response_of(rout: &[u8], head: &FinalHead) -> Result<Response<()>, String> {
    let mut fields = [httparse::EMPTY_HEADER; 100];
    let mut parsed = httparse::Response::new(&mut fields);
    parsed
        .parse(rout)
        .map_err(|e| format!("response head: {e}"))?;
    let status = StatusCode::from_u16(head.status).map_err(|e| e.to_string())?;
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    for field in parsed.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|e| e.to_string())?;
        if name == hyper::header::CONNECTION || name == hyper::header::TRANSFER_ENCODING {
            continue;
        }
        let value = HeaderValue::from_bytes(field.value).map_err(|e| e.to_string())?;
        headers.append(name, value);
    }
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(response)
}

/// A response body read from an endpoint's HTTP/1 connection, decoded from its framing. The
/// connection goes back to the pool once the body has been read to its end; a body dropped
/// before that closes it. Counts as a request in flight at the endpoint until then.
pub struct RawBody {
    conn: Option<Upstream>,
    buf: BytesMut,
    body: Body,
    recycle: Option<(Arc<Http>, PoolKey)>,
    _in_flight: InFlight,
}

impl RawBody {
    fn finish(&mut self) {
        if let (Some(conn), Some((http, key))) = (self.conn.take(), self.recycle.take()) {
            if self.buf.is_empty() {
                http.pool.put_h1(key, conn);
            }
        }
    }
}

impl Drop for RawBody {
    fn drop(&mut self) {
        // A body read to its end whose last poll did not come round to it.
        if self.body.is_done() {
            self.finish();
        }
    }
}

impl hyper::body::Body for RawBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            if this.body.is_done() {
                this.finish();
                return Poll::Ready(None);
            }
            if !this.buf.is_empty() {
                let mut ranges: Vec<std::ops::Range<usize>> = Vec::new();
                let n = this
                    .body
                    .scan_data(&this.buf, |r| {
                        if !r.is_empty() {
                            ranges.push(r)
                        }
                    })
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                // The common case (a length, or one chunk's data at the start): no copy.
                let whole = matches!(ranges.as_slice(), [only] if only.start == 0 && only.end == n);
                let data = if whole {
                    this.buf.split_to(n).freeze()
                } else {
                    let mut joined = BytesMut::with_capacity(ranges.iter().map(|r| r.len()).sum());
                    for r in &ranges {
                        joined.extend_from_slice(&this.buf[r.clone()]);
                    }
                    this.buf.advance(n);
                    joined.freeze()
                };
                if this.body.is_done() {
                    // Back to the pool now: a server that sees the end of the body does not
                    // poll it again.
                    this.finish();
                }
                if !data.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                continue;
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if this.buf.capacity() - this.buf.len() < READ_ROOM / 2 {
                this.buf.reserve(READ_ROOM);
            }
            match tokio_util::io::poll_read_buf(Pin::new(conn), cx, &mut this.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Ok(0)) => {
                    if this.body.ends_at_close() {
                        this.recycle = None;
                        this.conn = None;
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the endpoint closed within the response body",
                    ))));
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_done()
    }
}
