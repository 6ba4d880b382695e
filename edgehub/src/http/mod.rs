//! HTTP/1.1 and HTTP/2 (gRPC) through the proxy (SPEC §4): requests are balanced one by one
//! over the Service's endpoints, so the calls of one long-lived client connection spread like
//! separate connections would.
//!
//! Modules, outermost first:
//! - [`server`]: the client's connection: HTTP/1 to [`h1`], HTTP/2 to hyper (keep-alive pings,
//!   graceful shutdown with a GOAWAY);
//! - [`h1`]: HTTP/1 in one task per connection, as bytes: heads parsed once and rewritten
//!   (`h1::head`), bodies passed through in their framing (`h1::framing`), upgrades joined by
//!   [`crate::io::join`]; `h1::client` sends hyper's requests (the router's ingress) the same way;
//! - [`service`]: one HTTP/2 request: its span and metrics, the request timeout, header
//!   rewriting ([`headers`]), failures turned into answers ([`answer`]);
//! - [`dispatch`]: the one retry rule ([`dispatch::Attempts`]): the endpoint for a request
//!   (balancing), the Service's QPS limit for this node's endpoints, another endpoint while
//!   nothing of the request has reached one;
//! - [`upstream`]: an HTTP/2 request over the endpoint's shared connection;
//! - [`pool`]: kept connections to endpoints (HTTP/1 byte streams, shared HTTP/2 connections),
//!   opened through [`Connector::reach`] (dialled, or a tunnel to another node or the cloud).

mod answer;
mod body;
mod dispatch;
mod exec;
mod h1;
pub mod headers;
pub mod pool;
mod server;
mod service;
#[cfg(test)]
mod tests;
mod upstream;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::limits::Limiters;
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

use crate::connect::Connector;
use crate::io::Protocol;
use pool::Pool;

pub use answer::HttpError;
pub use body::ProxyBody;
pub use server::{serve, ServeError};

/// A failure from below, kept for the log.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

type H2Sender = hyper::client::conn::http2::SendRequest<Incoming>;

/// `[proxy.http]`: requests of HTTP/1 and HTTP/2 connections, balanced one by one.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// A request without a response head this long after it arrived gets `504`. Only the head
    /// is waited for: bodies (uploads, downloads, gRPC streams) may then take as long as they
    /// need.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// An HTTP/1 client has this long to send a request head, counted from the start of the
    /// connection or the end of the previous response: it closes idle keep-alive connections
    /// and frees the slots of clients that send their headers a byte at a time.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// An idle connection to an endpoint is closed after this long unused.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Idle HTTP/1 connections kept per endpoint for the next requests; more are closed as
    /// they come back. Connections are only made on demand, so this bounds what a burst
    /// leaves behind; below the usual number of concurrent requests it churns connections.
    /// 0 disables reuse. (HTTP/2 uses one connection per endpoint.)
    pub pool_max_idle_per_endpoint: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            request_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(30),
            pool_idle_timeout: Duration::from_secs(30),
            pool_max_idle_per_endpoint: 256,
        }
    }
}

/// What every HTTP connection of the proxy shares: settings, the way to endpoints, the
/// Services' limits and the pooled connections.
pub struct Http {
    cfg: HttpConfig,
    /// `proxy.idle_timeout` and `proxy.half_close_timeout`: upgraded connections (WebSocket)
    /// are byte streams like TCP.
    upgraded: crate::io::Timeouts,
    connector: Arc<Connector>,
    limiters: Arc<Limiters>,
    /// Connections to endpoints: HTTP/1 ones as byte streams ([`h1`]), HTTP/2 ones shared.
    pool: Pool<crate::connect::Upstream, H2Sender>,
    /// Open client connections, `http1` and `h2`.
    active: [metrics::Gauge; 2],
}

impl Http {
    pub fn new(
        cfg: HttpConfig,
        upgraded: crate::io::Timeouts,
        connector: Arc<Connector>,
        limiters: Arc<Limiters>,
    ) -> Http {
        let active = [Protocol::Http1, Protocol::H2].map(
            |p| metrics::gauge!(crate::telemetry::name("proxy_http_active_connections"), "protocol" => p.as_str()),
        );
        Http {
            pool: Pool::new(cfg.pool_max_idle_per_endpoint, cfg.pool_idle_timeout),
            cfg,
            upgraded,
            connector,
            limiters,
            active,
        }
    }

    fn active(&self, protocol: Protocol) -> &metrics::Gauge {
        &self.active[usize::from(protocol == Protocol::H2)]
    }

    /// Closes expired pooled connections every little while, until `shutdown`.
    pub async fn sweep_pool(self: Arc<Self>, shutdown: CancellationToken) {
        let every = self.pool.sweep_interval();
        while shutdown
            .run_until_cancelled(tokio::time::sleep(every))
            .await
            .is_some()
        {
            self.pool.sweep();
        }
    }

    /// Idle HTTP/1 and shared HTTP/2 connections to endpoints.
    pub fn pooled(&self) -> (usize, usize) {
        self.pool.len()
    }
}
