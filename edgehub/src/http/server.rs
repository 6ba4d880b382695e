//! The client's side of an HTTP connection: HTTP/1 as bytes in one task ([`super::h1`]);
//! HTTP/2 served by hyper, each request through [`super::service`]. On shutdown the connection
//! is closed gracefully (after the response in progress; HTTP/2 with a GOAWAY).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug_span, Instrument};

use super::exec::ConnTasks;
use super::service::{handle, Conn};
use super::Http;
use crate::io::{Duplex, Protocol, Rewind};
use crate::routes::Route;

/// How often an HTTP/2 client that has been silent is pinged, and how long it may take to
/// answer: a client that vanished frees its connection.
const H2_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(60);
const H2_KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

#[derive(Debug, Error)]
pub enum ServeError {
    /// Malformed HTTP/2 (hyper has answered where it could), a timeout, or the client went
    /// away. Worth a debug line, not an alarm.
    #[error("HTTP connection from the client: {0}")]
    Client(#[source] hyper::Error),
    #[error("upgraded connection: {0}")]
    Upgraded(#[source] std::io::Error),
    /// The client broke off in the middle of a request head.
    #[error("reading a request: {0}")]
    Read(#[source] std::io::Error),
}

/// Serves the client connection `io` (its first bytes replayed) as `protocol` (HTTP/1 or
/// HTTP/2) for `route`, until the client is done or `shutdown`. `peer` is the client's
/// address; `None` for a stream whose requests a proxy forwarded already (the side that dials
/// the endpoint): it adds no `X-Forwarded-For` entry of its own.
pub async fn serve<I>(
    http: Arc<Http>,
    io: Rewind<I>,
    protocol: Protocol,
    route: Arc<Route>,
    peer: Option<SocketAddr>,
    shutdown: &CancellationToken,
) -> Result<(), ServeError>
where
    I: Duplex + AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let active = http.active(protocol);
    if protocol != Protocol::H2 {
        active.increment(1.0);
        let (prefix, io) = io.into_inner();
        let served = super::h1::serve(&http, prefix, io, &route, peer, shutdown).await;
        active.decrement(1.0);
        return served;
    }
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let conn = Arc::new(Conn {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        http: http.clone(),
        route,
        peer,
        peer_value: peer.map(|p| super::headers::client_value(p.ip())),
        protocol,
    });
    let service = {
        let conn = conn.clone();
        service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let span = debug_span!("request", method = %req.method(), path = %req.uri().path());
            handle(conn.clone(), req).instrument(span)
        })
    };
    active.increment(1.0);
    let (exec, mut tasks) = ConnTasks::new();
    let mut builder = http2::Builder::new(exec);
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEPALIVE)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT);
    let c = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(c);
    let served = tokio::select! {
        r = tasks.run(c.as_mut()) => r,
        _ = shutdown.cancelled() => {
            c.as_mut().graceful_shutdown();
            tasks.run(c.as_mut()).await
        }
    };
    tasks.finish().await;
    active.decrement(1.0);
    served.map_err(ServeError::Client)
}
