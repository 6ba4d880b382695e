//! The client's side of an HTTP connection: hyper serves it (HTTP/1 with keep-alive and
//! upgrades, or HTTP/2), each request goes through [`super::service`], and on shutdown the
//! connection is closed gracefully (after the response in progress; HTTP/2 with a GOAWAY).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug_span, Instrument};

use super::exec::ConnTasks;
use super::service::{handle, Conn};
use super::Http;
use edgehub::io::Protocol;
use crate::proxy::table::Route;

/// Largest request head (request line and headers) accepted; larger ones get `431`. It also
/// caps what a client sending endless headers can make the proxy hold.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// How often an HTTP/2 client that has been silent is pinged, and how long it may take to
/// answer: a client that vanished frees its connection.
const H2_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(60);
const H2_KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

#[derive(Debug, Error)]
pub enum ServeError {
    /// Malformed HTTP (hyper has answered `400` where it could), a timeout, or the client
    /// went away. Worth a debug line, not an alarm.
    #[error("HTTP connection from the client: {0}")]
    Client(#[source] hyper::Error),
    #[error("protocol upgrade: {0}")]
    Upgrade(#[source] hyper::Error),
    #[error("upgraded connection: {0}")]
    Upgraded(#[source] std::io::Error),
}

/// Serves the client connection `io` (its first bytes replayed) as `protocol` (HTTP/1 or
/// HTTP/2) for `route`, until the client is done or `shutdown`.
pub async fn serve<I>(
    http: Arc<Http>,
    io: I,
    protocol: Protocol,
    route: Arc<Route>,
    peer: SocketAddr,
    shutdown: &CancellationToken,
) -> Result<(), ServeError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let conn = Arc::new(Conn {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        http: http.clone(),
        route,
        peer,
        peer_value: super::headers::client_value(peer.ip()),
        protocol,
        upgraded: Mutex::new(None),
    });
    let service = {
        let conn = conn.clone();
        service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let span = debug_span!("request", method = %req.method(), path = %req.uri().path());
            handle(conn.clone(), req).instrument(span)
        })
    };
    let active = http.active(protocol);
    active.increment(1.0);
    let served = match protocol {
        Protocol::H2 => {
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
            served
        }
        _ => {
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(http.cfg.header_read_timeout)
                .max_header_size(MAX_HEAD_BYTES)
                // Clients that shut down their write side after the request still get the
                // response.
                .half_close(true);
            let c = builder
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            tokio::pin!(c);
            tokio::select! {
                r = c.as_mut() => r,
                _ = shutdown.cancelled() => {
                    c.as_mut().graceful_shutdown();
                    c.await
                }
            }
        }
    };
    let result = match served {
        Ok(()) => join_upgrade(&conn, &http).await,
        Err(e) => Err(ServeError::Client(e)),
    };
    active.decrement(1.0);
    result
}

/// After a `101` (or a `2xx` to `CONNECT`), bytes both ways between the client and the
/// endpoint until either ends.
async fn join_upgrade(conn: &Conn, http: &Http) -> Result<(), ServeError> {
    let Some((client_side, endpoint_side)) = conn
        .upgraded
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    else {
        return Ok(());
    };
    let (client, endpoint) =
        tokio::try_join!(client_side, endpoint_side).map_err(ServeError::Upgrade)?;
    edgehub::io::join(
        &mut edgehub::io::Whole(TokioIo::new(client)),
        &mut edgehub::io::Whole(TokioIo::new(endpoint)),
        http.upgraded,
        edgehub::io::Counters::default(),
    )
    .await
    .map(drop)
    .map_err(ServeError::Upgraded)
}
