//! Sending one HTTP/2 request to one endpoint, over the shared connection to it, else over a
//! new connection opened through [`Connector::reach`] (so endpoints on other nodes and in the
//! cloud are reached through tunnels like any other). (HTTP/1 goes as bytes: [`super::h1`].)
//!
//! hyper hands a request back when it failed before any of it was written
//! (`try_send_request`); only such requests may go elsewhere. A shared connection that turns
//! out to be closed is replaced by another before the endpoint is blamed.

use std::sync::Arc;

use crate::io::Protocol;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tracing::debug;

use super::exec::ConnTasks;
use super::pool::PoolKey;
use super::BoxError;
use super::{H2Sender, Http};
use crate::balance::Endpoint;
use crate::connect::{ReachError, Upstream};
use crate::routes::Route;

/// Pooled connections found closed that are replaced before a request counts as failed at
/// an endpoint.
const STALE_RETRIES: usize = 2;

/// How long an HTTP/2 connection may be silent while calls are open before it is pinged, and
/// how long the ping may take: a dead endpoint (or tunnel) fails its calls instead of hanging
/// them.
const H2_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(20);

/// Why a request did not get a response from an endpoint.
pub enum SendError {
    /// Nothing of the request reached the endpoint; here it is back, for another endpoint.
    NotSent {
        /// Boxed: this is the rare path, and the common ones should not move 280 bytes.
        request: Box<Request<Incoming>>,
        error: BoxError,
    },
    /// The side that dials the endpoint refused: the Service is over its limit.
    RateLimited,
    /// The request went out, at least in part, and failed: it is never sent again.
    Failed(hyper::Error),
}

impl Http {
    /// Sends `req` to `endpoint` of `route` and waits for the response head. `client`: the
    /// client connection's id.
    pub(super) async fn send_h2(
        self: &Arc<Self>,
        route: &Route,
        endpoint: &Endpoint,
        req: Request<Incoming>,
        client: u64,
    ) -> Result<Response<Incoming>, SendError> {
        let limited = self
            .limiters
            .limit(&route.service.namespace, &route.service.name)
            .is_some();
        let own = limited && !self.connector.is_local(endpoint);
        let key = PoolKey::new(route, endpoint.addr, limited, if own { client } else { 0 });
        self.send_on_shared(route, endpoint, key, req).await
    }

    async fn send_on_shared(
        &self,
        route: &Route,
        endpoint: &Endpoint,
        key: PoolKey,
        mut req: Request<Incoming>,
    ) -> Result<Response<Incoming>, SendError> {
        *req.version_mut() = hyper::Version::HTTP_2;
        let mut stale = 0;
        loop {
            let (mut conn, reused) = match self.pool.get_h2(&key) {
                Some(conn) => (conn, true),
                None => match self.shared_h2(route, endpoint, &key).await {
                    Ok(found) => found,
                    Err(e) => return Err(e.with_request(req)),
                },
            };
            match conn.try_send_request(req).await {
                Ok(response) => return Ok(response),
                Err(e) => {
                    self.pool.discard_h2(&key);
                    req = retry_on_stale(endpoint, e, reused, &mut stale)?;
                }
            }
        }
    }

    /// The HTTP/2 connection to `endpoint`: the one another call just made, or a new one.
    /// Returns whether it was made by someone else (then it may already be closed).
    async fn shared_h2(
        &self,
        route: &Route,
        endpoint: &Endpoint,
        key: &PoolKey,
    ) -> Result<(H2Sender, bool), Unsent> {
        let dialing = self.pool.h2_dialing(key);
        let (_dialing, waited) = match dialing.try_lock() {
            Ok(guard) => (guard, false),
            Err(_) => (dialing.lock().await, true),
        };
        if let Some(conn) = self.pool.get_h2(key) {
            return Ok((conn, true));
        }
        if waited && endpoint.health.is_ejected(tokio::time::Instant::now()) {
            // The call that dialled while this one waited failed and ejected the endpoint:
            // another endpoint, rather than every waiting call dialling a dead one in turn.
            return Err(Unsent::Failed(
                "the endpoint failed while this call waited for it".into(),
            ));
        }
        let io = self.reach(route, endpoint, Protocol::H2).await?;
        let (exec, mut tasks) = ConnTasks::new();
        let (sender, conn) = http2::Builder::new(exec)
            .timer(TokioTimer::new())
            .keep_alive_interval(H2_KEEPALIVE)
            .keep_alive_timeout(H2_KEEPALIVE)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| Unsent::Failed(Box::new(e)))?;
        tokio::spawn(async move {
            if let Err(e) = tasks.run(conn).await {
                debug!(error = %e, "endpoint connection ended");
            }
            tasks.finish().await;
        });
        self.pool.set_h2(key, sender.clone());
        Ok((sender, false))
    }

    pub(super) async fn reach(
        &self,
        route: &Route,
        endpoint: &Endpoint,
        protocol: Protocol,
    ) -> Result<Upstream, Unsent> {
        self.connector
            .reach(route, endpoint, protocol)
            .await
            .map_err(|e| match e {
                ReachError::RateLimited => Unsent::RateLimited,
                ReachError::Failed(e) => Unsent::Failed(Box::new(e)),
            })
    }
}

/// No connection for the request.
pub(super) enum Unsent {
    RateLimited,
    Failed(BoxError),
}

impl Unsent {
    fn with_request(self, request: Request<Incoming>) -> SendError {
        match self {
            Unsent::RateLimited => SendError::RateLimited,
            Unsent::Failed(error) => SendError::NotSent {
                request: Box::new(request),
                error,
            },
        }
    }
}

/// After a send failed: the request back for another try on a fresh connection when the
/// connection was a reused one that turned out closed (up to [`STALE_RETRIES`] times), else
/// the error, the endpoint blamed only when nothing of the request reached it.
fn retry_on_stale(
    endpoint: &Endpoint,
    mut e: hyper::client::conn::TrySendError<Request<Incoming>>,
    reused: bool,
    stale: &mut usize,
) -> Result<Request<Incoming>, SendError> {
    match e.take_message() {
        Some(back) if reused && *stale < STALE_RETRIES => {
            debug!(endpoint = %endpoint.addr, error = %e.error(), "reused connection was closed; another one");
            *stale += 1;
            Ok(back)
        }
        Some(back) => {
            endpoint.health.record_failure();
            Err(SendError::NotSent {
                request: Box::new(back),
                error: Box::new(e.into_error()),
            })
        }
        None => Err(SendError::Failed(e.into_error())),
    }
}
