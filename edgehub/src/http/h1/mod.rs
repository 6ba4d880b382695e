//! HTTP/1 through the proxy in one task per client connection, as bytes: each request head is
//! parsed once and written out rewritten for the endpoint ([`head`]), bodies pass through in
//! their own framing ([`framing`]), and the endpoint's connection is a plain byte stream kept
//! in the pool between requests. No second task, no second parse, no copy of a body into
//! frames: what hyper's client and server cost per request, twice, is gone (SPEC §4.3).
//!
//! Per request: [`Attempts`] picks the endpoint (balancing, the Service's limit), the head and
//! the body bytes already read go out in one write; the rest of a body streams while the
//! response is awaited (so `Expect: 100-continue` and early answers work); the response head
//! is rewritten and sent with the first body bytes. A request goes to another endpoint while
//! nothing of it reached one, and again on a new connection when a reused one turns out
//! closed (for an idempotent request whose bytes are all at hand). After a `101` (or a `2xx`
//! to `CONNECT`) both connections are joined by [`crate::io::join`].

mod client;
mod framing;
mod head;
mod timer;

pub use client::RawBody;

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::{debug, debug_span, Instrument};

use self::framing::{Body, BodyError, Framing};
use self::head::{Exchange, FinalHead, RequestHead, ResponseHead};
use self::timer::{within, Deadline};
use super::answer::HttpError;
use super::dispatch::Attempts;
use super::pool::{PoolKey, Reusable};
use super::upstream::Unsent;
use super::{Http, ServeError};
use crate::balance::{Endpoint, InFlight, PickContext};
use crate::connect::Upstream;
use crate::io::{Duplex, Protocol, Rewind};
use crate::routes::Route;

/// Largest request or response head accepted; a larger request gets `431`. It also caps what
/// a client sending endless headers can make the proxy hold.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Room kept free in a connection's read buffer for the next read.
const READ_ROOM: usize = 8 * 1024;
/// How long, and how much, a closing connection keeps reading what the client still sends
/// ([`Conn::linger`]).
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;
/// Kept connections found closed after a request went out that are replaced before the
/// request counts as failed.
const STALE_RETRIES: usize = 2;

impl Reusable for Upstream {
    fn is_usable(&self) -> bool {
        self.is_reusable()
    }
}

/// Serves the HTTP/1 client connection `io`, whose first bytes `prefix` were read already, for
/// `route` until the client is done, the connection must close, or `shutdown` (between
/// requests). `peer`: the client, `None` when its requests were forwarded by a proxy already.
pub(super) async fn serve<I: Duplex>(
    http: &Arc<Http>,
    prefix: bytes::Bytes,
    mut io: I,
    route: &Route,
    peer: Option<SocketAddr>,
    shutdown: &CancellationToken,
) -> Result<(), ServeError> {
    let switched = {
        let (reader, writer) = io.halves();
        let mut conn = Conn {
            http,
            route,
            client_ip: peer.map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |p| p.ip()),
            client_value: peer.map(|p| p.ip().to_string().into_bytes()),
            reader,
            writer,
            buf: BytesMut::from(&prefix[..]),
            out: Vec::new(),
            rout: Vec::new(),
            ubuf: BytesMut::new(),
            head_deadline: Deadline::new(),
            response_deadline: Deadline::new(),
        };
        match conn.serve(shutdown).await? {
            Some((upstream, leftover)) => (upstream, leftover, conn.buf),
            None => return Ok(()),
        }
    };
    // After a `101` (or a `2xx` to `CONNECT`): bytes both ways, starting with what each side
    // sent after the head.
    let (upstream, leftover, unread) = switched;
    let mut client = Rewind::new(unread.freeze(), io);
    let mut endpoint = Rewind::new(leftover.freeze(), upstream);
    crate::io::join(
        &mut client,
        &mut endpoint,
        http.upgraded,
        crate::io::Counters::default(),
    )
    .await
    .map(drop)
    .map_err(ServeError::Upgraded)
}

/// What happens to the client connection after a request.
enum Next {
    KeepAlive,
    Close,
    /// Close, the client possibly still sending what will never be read.
    CloseUnread,
    /// The endpoint accepted an upgrade: bytes both ways, with what it sent after its head.
    Switched(Upstream, BytesMut),
}

enum RequestFailure {
    /// The client broke off while sending a head.
    Client(std::io::Error),
    /// Answered with this status, and the connection closed.
    Refused(u16, String),
}

/// One client connection.
struct Conn<'a, R, W> {
    http: &'a Arc<Http>,
    route: &'a Route,
    client_ip: IpAddr,
    /// The client's address for `X-Forwarded-For`, made once.
    client_value: Option<Vec<u8>>,
    reader: R,
    writer: W,
    /// Bytes from the client not yet passed on.
    buf: BytesMut,
    /// The request's head (and first body bytes) for the endpoint.
    out: Vec<u8>,
    /// The response's head for the client.
    rout: Vec<u8>,
    /// Bytes from the endpoint not yet passed on.
    ubuf: BytesMut,
    /// Times the waits for request heads (`header_read_timeout`).
    head_deadline: Deadline,
    /// Times the requests (`request_timeout`): sending them and waiting for the response head.
    response_deadline: Deadline,
}

/// Where a request stands when it fails.
enum Failure {
    /// Answered by the proxy (nothing of a response reached the client yet).
    Answer(HttpError),
    /// The client went away or broke its request: nothing more to say to it.
    Client(String),
    /// Part of the response reached the client already: the connection can only be closed.
    Broken(String),
}

impl<R, W> Conn<'_, R, W>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    /// Requests one after the other until the connection ends; an upgraded connection comes
    /// back with the endpoint's.
    async fn serve(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Option<(Upstream, BytesMut)>, ServeError> {
        let mut idle_since = Instant::now();
        // One wait for the whole connection: a wait made per request registers with the
        // listener's token, behind a lock every connection shares, and leaves it again.
        let shutting_down = shutdown.cancelled();
        tokio::pin!(shutting_down);
        loop {
            let deadline = idle_since + self.http.cfg.header_read_timeout;
            let head = match self
                .read_request_head(deadline, shutting_down.as_mut())
                .await
            {
                Ok(Some(head)) => head,
                Ok(None) => return Ok(None),
                Err(RequestFailure::Client(e)) => return Err(ServeError::Read(e)),
                Err(RequestFailure::Refused(status, why)) => {
                    debug!(status, %why, "request refused");
                    if self.write_refusal(status).await.is_ok() {
                        self.linger().await;
                    }
                    return Ok(None);
                }
            };
            let span = debug_span!("request", method = %method_of(&self.out), path = %target_of(&self.out));
            match self.exchange(head).instrument(span).await {
                Next::KeepAlive if !shutdown.is_cancelled() => idle_since = Instant::now(),
                Next::KeepAlive | Next::Close => {
                    let _ = self.writer.shutdown().await;
                    return Ok(None);
                }
                Next::CloseUnread => {
                    self.linger().await;
                    return Ok(None);
                }
                Next::Switched(upstream, leftover) => return Ok(Some((upstream, leftover))),
            }
        }
    }

    /// Reads until a whole request head is in `buf` and writes it for the endpoint to `out`.
    /// `None`: the client closed, stayed silent until `deadline`, or `shutting_down` ended while
    /// no request was under way.
    async fn read_request_head(
        &mut self,
        deadline: Instant,
        mut shutting_down: Pin<&mut WaitForCancellationFuture<'_>>,
    ) -> Result<Option<RequestHead>, RequestFailure> {
        loop {
            if !self.buf.is_empty() {
                let hash_header = self.route.hash_header.as_ref().map(|h| h.as_str());
                match head::request(
                    &self.buf,
                    self.client_value.as_deref(),
                    hash_header,
                    &mut self.out,
                ) {
                    Ok(Some(head)) => return Ok(Some(head)),
                    Ok(None) if self.buf.len() >= MAX_HEAD_BYTES => {
                        return Err(RequestFailure::Refused(431, "head too large".into()))
                    }
                    Ok(None) => {}
                    Err(head::HeadError::TooManyFields) => {
                        return Err(RequestFailure::Refused(431, "too many fields".into()))
                    }
                    Err(e) => return Err(RequestFailure::Refused(400, e.to_string())),
                }
            }
            if self.buf.capacity() - self.buf.len() < READ_ROOM / 2 {
                self.buf.reserve(READ_ROOM);
            }
            let idle = self.buf.is_empty();
            let read = tokio::select! {
                r = self.head_deadline.wait(deadline, self.reader.read_buf(&mut self.buf)) => r,
                _ = shutting_down.as_mut(), if idle => return Ok(None),
            };
            match read {
                Err(_) => {
                    debug!("no request head in time: closed");
                    return Ok(None);
                }
                Ok(Ok(0)) => return Ok(None),
                Ok(Ok(_)) => {}
                Ok(Err(e)) if idle => {
                    debug!(error = %e, "client connection ended");
                    return Ok(None);
                }
                Ok(Err(e)) => return Err(RequestFailure::Client(e)),
            }
        }
    }

    /// One request, from its head (in `out`, its bytes at the start of `buf`) to the end of
    /// its response.
    async fn exchange(&mut self, head: RequestHead) -> Next {
        let started = Instant::now();
        self.buf.advance(head.len);
        let stats = self.route.stats.http(Protocol::Http1);
        let outcome = self.forward(&head, started).await;
        let (status, next) = match outcome {
            Ok((status, next)) => (status, next),
            Err(Failure::Answer(e)) => {
                debug!(error = %e, "answered by the proxy");
                let status = e.status();
                stats.duration.record(started.elapsed().as_secs_f64());
                stats.count(status);
                let (answer_status, fields, body) = e.parts(head.grpc);
                // A body still on its way from the client cannot be told from the next request.
                let keep = head.keep_alive && head.framing == Framing::Length(0);
                let answered = self
                    .write_answer(answer_status, &fields, &body, !keep)
                    .await;
                return if keep && answered.is_ok() {
                    Next::KeepAlive
                } else if head.framing != Framing::Length(0) {
                    Next::CloseUnread
                } else {
                    Next::Close
                };
            }
            Err(Failure::Client(why)) => {
                debug!(%why, "request broken off by the client");
                return Next::Close;
            }
            Err(Failure::Broken(why)) => {
                debug!(%why, "response broken off");
                return Next::Close;
            }
        };
        debug!(status, "response");
        next
    }

    /// Sends the request to an endpoint and passes its response on, following [`Attempts`].
    /// Returns the response's status and what the connection does next.
    async fn forward(
        &mut self,
        head: &RequestHead,
        started: Instant,
    ) -> Result<(u16, Next), Failure> {
        let http = self.http;
        let route = self.route;
        let pick = PickContext {
            client_ip: self.client_ip,
            hash_key: head.hash_key.as_deref(),
        };
        let deadline = started + http.cfg.request_timeout;
        let timeout = || {
            Failure::Answer(HttpError::Timeout {
                service: route.stats.label().to_string(),
                timeout: http.cfg.request_timeout,
            })
        };
        // The head for the endpoint goes out with as much of the body as came with it; while
        // the rest has not been read from the client, the request can be sent again as is.
        let mut body = Body::new(head.framing);
        let first = body
            .scan(&self.buf)
            .map_err(|e| Failure::Answer(HttpError::BadRequest(Box::new(e))))?;
        self.out.extend_from_slice(&self.buf[..first]);
        self.buf.advance(first);

        let limited = http
            .limiters
            .limit(&route.service.namespace, &route.service.name)
            .is_some();
        let mut attempts = Attempts::new(route).map_err(Failure::Answer)?;
        loop {
            let endpoint = attempts.next(http, &pick).map_err(Failure::Answer)?;
            let key = PoolKey::new(route, endpoint.addr, limited, 0);
            let mut stale = 0;
            let not_sent = loop {
                let (upstream, reused) = match http.pool.take_h1(&key) {
                    Some(upstream) => (upstream, true),
                    None => {
                        let reached = tokio::time::timeout_at(
                            deadline,
                            http.reach(route, endpoint, Protocol::Http1),
                        )
                        .await
                        .map_err(|_| timeout())?;
                        match reached {
                            Ok(upstream) => (upstream, false),
                            Err(Unsent::RateLimited) => {
                                return Err(Failure::Answer(HttpError::RateLimited {
                                    service: route.stats.label().to_string(),
                                    retry_after: std::time::Duration::from_secs(1),
                                }))
                            }
                            Err(Unsent::Failed(e)) => break e,
                        }
                    }
                };
                let sent = self
                    .send(head, upstream, &mut body, endpoint, &key, started)
                    .await;
                let failed = |e: std::io::Error| {
                    Failure::Answer(HttpError::Failed {
                        service: route.stats.label().to_string(),
                        endpoint: endpoint.addr,
                        source: Box::new(e),
                    })
                };
                match sent {
                    Sent::Done(result) => return result,
                    Sent::TimedOut => return Err(timeout()),
                    Sent::Undelivered(e) | Sent::Lost(e) if reused && stale < STALE_RETRIES => {
                        debug!(endpoint = %endpoint.addr, error = %e, "kept connection was closed; another one");
                        stale += 1;
                    }
                    Sent::Undelivered(e) => {
                        endpoint.health.record_failure();
                        break Box::new(e) as super::BoxError;
                    }
                    Sent::Lost(e) | Sent::Failed(e) => return Err(failed(e)),
                }
            };
            attempts.not_sent(endpoint.addr, not_sent);
        }
    }

    /// One try of the request (head and first body bytes in `out`) on `upstream`.
    async fn send(
        &mut self,
        head: &RequestHead,
        mut upstream: Upstream,
        body: &mut Body,
        endpoint: &Endpoint,
        key: &PoolKey,
        started: Instant,
    ) -> Sent {
        let http = self.http;
        let _in_flight = InFlight::start(&endpoint.health);
        let exchanged = match self.exchange_on(head, &mut upstream, body, started).await {
            Ok(exchanged) => exchanged,
            Err(sent) => return sent,
        };
        let status = exchanged.status;
        let leftover = std::mem::take(&mut self.ubuf);
        if exchanged.switched {
            return Sent::Done(Ok((status, Next::Switched(upstream, leftover))));
        }
        let ended = exchanged.request_sent;
        if exchanged.reusable && ended && leftover.is_empty() && head.upgrade.is_none() {
            http.pool.put_h1(key.clone(), upstream);
        }
        // The buffer's memory is kept for the next response.
        self.ubuf = leftover;
        self.ubuf.clear();
        // A body the endpoint stopped taking is still (partly) on its way from the client,
        // where the next request would be.
        let next = if head.keep_alive && ended && exchanged.delimited {
            Next::KeepAlive
        } else if !ended {
            Next::CloseUnread
        } else {
            Next::Close
        };
        Sent::Done(Ok((status, next)))
    }

    /// The request and its response over `upstream`'s two halves.
    async fn exchange_on(
        &mut self,
        head: &RequestHead,
        upstream: &mut Upstream,
        body: &mut Body,
        started: Instant,
    ) -> Result<Exchanged, Sent> {
        let http = self.http;
        let route = self.route;
        let idle = http.upgraded.idle;
        let deadline = started + http.cfg.request_timeout;
        let whole = body.is_done();
        let Conn {
            reader,
            writer,
            buf,
            out,
            rout,
            ubuf,
            response_deadline,
            ..
        } = self;
        let exchange = Exchange {
            head_method: head.head_method,
            upgrade: head.upgrade.as_ref(),
            client_minor: head.minor,
        };
        ubuf.clear();
        let (mut ureader, mut uwriter) = upstream.halves();
        match response_deadline
            .wait(deadline, uwriter.write_all(out))
            .await
        {
            Err(_) => return Err(Sent::TimedOut),
            Ok(Err(e)) => return Err(Sent::Undelivered(e)),
            Ok(Ok(())) => {}
        }

        // The rest of the body, if any, streams while the response is awaited: the endpoint
        // may answer first (`100 Continue`, or an error before it has read everything).
        let mut request = RequestProgress {
            done: whole,
            failed: false,
        };
        let request_body = async {
            if whole {
                return Ok(0);
            }
            framing::copy(body, buf, reader, &mut uwriter, idle).await
        };
        tokio::pin!(request_body);

        let final_head = {
            let response_head = read_response_head(
                &mut ureader,
                ubuf,
                rout,
                exchange,
                &mut *writer,
                Some((response_deadline, deadline)),
                !head.keep_alive,
            );
            tokio::pin!(response_head);
            loop {
                tokio::select! {
                    r = &mut request_body, if !request.done => {
                        if let Err(e) = request.ended(r) {
                            let e = HttpError::BadRequest(Box::new(e));
                            return Err(Sent::Done(Err(Failure::Answer(e))));
                        }
                    }
                    r = &mut response_head => break r,
                }
            }
        };
        let final_head = match final_head {
            Ok(h) => h,
            Err(HeadFailure::TimedOut) => return Err(Sent::TimedOut),
            // Nothing came back: the connection was closed before or as the request arrived.
            Err(HeadFailure::Closed(e)) if whole && head.idempotent => return Err(Sent::Lost(e)),
            Err(HeadFailure::Closed(e) | HeadFailure::Endpoint(e)) => return Err(Sent::Failed(e)),
            Err(HeadFailure::Client(e)) => {
                return Err(Sent::Done(Err(Failure::Client(e.to_string()))))
            }
        };
        // Counted when the head is there, like the requests of other protocols: the body may
        // stream for as long as it needs.
        let stats = route.stats.http(Protocol::Http1);
        stats.count(
            hyper::StatusCode::from_u16(final_head.status)
                .unwrap_or(hyper::StatusCode::BAD_GATEWAY),
        );
        stats.duration.record(started.elapsed().as_secs_f64());

        // The response head goes out with the first body bytes, then the rest of the body.
        let mut response = Body::new(final_head.framing);
        let response_body = async {
            let first = response
                .scan(ubuf)
                .map_err(|e| Failure::Broken(e.to_string()))?;
            rout.extend_from_slice(&ubuf[..first]);
            ubuf.advance(first);
            within(idle, writer.write_all(rout))
                .await
                .map_err(|e| Failure::Client(e.to_string()))?;
            framing::copy(&mut response, ubuf, &mut ureader, &mut *writer, idle)
                .await
                .map_err(|e| match e {
                    BodyError::Read(e) => Failure::Broken(e.to_string()),
                    BodyError::Write(e) => Failure::Client(e.to_string()),
                })
        };
        tokio::pin!(response_body);
        let responded = loop {
            tokio::select! {
                r = &mut request_body, if !request.done => {
                    if let Err(e) = request.ended(r) {
                        let why = format!("the client broke off its request: {e}");
                        return Err(Sent::Done(Err(Failure::Broken(why))));
                    }
                }
                r = &mut response_body => break r,
            }
        };
        if let Err(f) = responded {
            return Err(Sent::Done(Err(f)));
        }
        Ok(Exchanged {
            status: final_head.status,
            switched: final_head.switched,
            reusable: final_head.reusable,
            delimited: final_head.framing != Framing::UntilClose,
            request_sent: request.done && !request.failed,
        })
    }

    /// Answers the request itself (`close`: and says the connection ends).
    async fn write_answer(
        &mut self,
        status: hyper::StatusCode,
        fields: &hyper::HeaderMap,
        body: &[u8],
        close: bool,
    ) -> std::io::Result<()> {
        let out = &mut self.rout;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        head::write_fields(out, fields, None);
        out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body);
        within(self.http.upgraded.idle, self.writer.write_all(out)).await
    }

    /// Ends the connection while the client may still be sending (a request refused before its
    /// end, a body not read): the write side is shut, and what the client sends is read and
    /// dropped for a moment, so that closing with unread bytes does not reset the connection
    /// before the client has read the answer.
    async fn linger(&mut self) {
        let _ = self.writer.shutdown().await;
        let until = Instant::now() + LINGER;
        let mut drained = 0;
        while drained < LINGER_BYTES {
            self.buf.clear();
            if self.buf.capacity() < READ_ROOM {
                self.buf.reserve(READ_ROOM);
            }
            match tokio::time::timeout_at(until, self.reader.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => drained += n,
                _ => break,
            }
        }
    }

    /// Answers a request that cannot be served at all; the connection closes after it.
    async fn write_refusal(&mut self, status: u16) -> std::io::Result<()> {
        let status = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::BAD_REQUEST);
        self.write_answer(status, &hyper::HeaderMap::new(), b"", true)
            .await
    }
}

/// How the client's side of a request went.
struct RequestProgress {
    /// Its body has been read from the client to the end, or it failed.
    done: bool,
    /// The endpoint stopped taking it.
    failed: bool,
}

impl RequestProgress {
    /// Takes the end of the request body's copy; the client's own failure comes back.
    fn ended(&mut self, r: Result<u64, BodyError>) -> Result<(), std::io::Error> {
        self.done = true;
        match r {
            Ok(_) => Ok(()),
            Err(BodyError::Read(e)) => Err(e),
            Err(BodyError::Write(e)) => {
                // The endpoint stopped reading; its answer may say why.
                debug!(error = %e, "the endpoint stopped taking the request body");
                self.failed = true;
                Ok(())
            }
        }
    }
}

/// A request that went through to its response's end.
struct Exchanged {
    status: u16,
    switched: bool,
    reusable: bool,
    /// The response's end was known without the connection closing.
    delimited: bool,
    /// The request's body was read from the client to its end and all of it reached the
    /// endpoint.
    request_sent: bool,
}

/// How one try on one connection ended.
enum Sent {
    Done(Result<(u16, Next), Failure>),
    /// No response head within the request timeout.
    TimedOut,
    /// The request did not get through to the endpoint: it may go to another.
    Undelivered(std::io::Error),
    /// The connection closed without a byte of response after the whole request went out. A
    /// kept connection that the endpoint was closing as the request came: sent again on a new
    /// connection (idempotent requests only).
    Lost(std::io::Error),
    /// The endpoint failed the request.
    Failed(std::io::Error),
}

/// Why no response head came.
enum HeadFailure {
    TimedOut,
    /// The connection ended before any byte of a response.
    Closed(std::io::Error),
    /// The endpoint failed or sent something that is not HTTP.
    Endpoint(std::io::Error),
    /// Passing an interim answer on to the client failed.
    Client(std::io::Error),
}

/// Reads the endpoint's response head into `ubuf` and writes it for the client to `rout`;
/// interim (`1xx`) answers are passed to the client on the way. `close`: the client
/// connection ends after this response. `deadline`: when the head must have come (and the
/// connection's timer for it), if the caller does not bound the request itself.
async fn read_response_head<R, W>(
    reader: &mut R,
    ubuf: &mut BytesMut,
    rout: &mut Vec<u8>,
    exchange: Exchange<'_>,
    client: &mut W,
    mut deadline: Option<(&mut Deadline, Instant)>,
    close: bool,
) -> Result<FinalHead, HeadFailure>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut got_any = false;
    loop {
        if !ubuf.is_empty() {
            let parsed = head::response(ubuf, exchange, close, rout)
                .map_err(|e| HeadFailure::Endpoint(invalid(e.to_string())))?;
            match parsed {
                Some(ResponseHead::Final(head)) => {
                    ubuf.advance(head.len);
                    return Ok(head);
                }
                Some(ResponseHead::Informational { len }) => {
                    ubuf.advance(len);
                    if !rout.is_empty() {
                        client.write_all(rout).await.map_err(HeadFailure::Client)?;
                    }
                    continue;
                }
                None if ubuf.len() >= MAX_HEAD_BYTES => {
                    return Err(HeadFailure::Endpoint(invalid(
                        "response head too large".into(),
                    )))
                }
                None => {}
            }
        }
        if ubuf.capacity() - ubuf.len() < READ_ROOM / 2 {
            ubuf.reserve(READ_ROOM);
        }
        let read = match &mut deadline {
            Some((timer, at)) => timer
                .wait(*at, reader.read_buf(ubuf))
                .await
                .map_err(|_| HeadFailure::TimedOut)?,
            None => reader.read_buf(ubuf).await,
        };
        match read {
            Ok(0) if !got_any => {
                return Err(HeadFailure::Closed(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed before a response",
                )))
            }
            Ok(0) => {
                return Err(HeadFailure::Endpoint(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed within a response head",
                )))
            }
            Ok(_) => got_any = true,
            Err(e) if !got_any => return Err(HeadFailure::Closed(e)),
            Err(e) => return Err(HeadFailure::Endpoint(e)),
        }
    }
}

fn invalid(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

fn method_of(out: &[u8]) -> &str {
    let line = out.split(|&b| b == b' ').next().unwrap_or_default();
    std::str::from_utf8(line).unwrap_or("?")
}

fn target_of(out: &[u8]) -> &str {
    let target = out.split(|&b| b == b' ').nth(1).unwrap_or_default();
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    std::str::from_utf8(path).unwrap_or("?")
}
