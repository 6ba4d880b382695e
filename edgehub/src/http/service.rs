//! One request from an HTTP/2 client connection: rewritten for the endpoint, dispatched, answered
//! within the request timeout, counted.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Either;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::time::Instant;
use tracing::debug;

use super::answer::{is_grpc, HttpError};
use super::body::{Guarded, ProxyBody};
use super::headers;
use super::Http;
use crate::balance::PickContext;
use crate::io::Protocol;
use crate::routes::Route;

/// What the requests of one client connection share.
pub struct Conn {
    /// Unique in the process: connections to endpoints that belong to this client connection
    /// are pooled under it.
    pub id: u64,
    pub http: Arc<Http>,
    pub route: Arc<Route>,
    /// The client; `None` when the requests come forwarded by a proxy already.
    pub peer: Option<SocketAddr>,
    /// `peer`'s address for `X-Forwarded-For`, made once.
    pub peer_value: Option<hyper::header::HeaderValue>,
    pub protocol: Protocol,
}

/// Answers one request; every failure becomes a response, so the client connection lives on.
pub async fn handle(
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let timeout = conn.http.cfg.request_timeout;
    let grpc = is_grpc(req.headers());
    // Only the response head is waited for: a body then streams for as long as it needs.
    let outcome = match tokio::time::timeout(timeout, forward(&conn, req)).await {
        Ok(result) => result,
        Err(_) => Err(HttpError::Timeout {
            service: conn.route.stats.label().to_string(),
            timeout,
        }),
    };
    // A gRPC answer from the proxy is an HTTP 200; the metrics count the failure it stands for.
    let (response, counted) = match outcome {
        Ok(response) => {
            let status = response.status();
            (response, status)
        }
        Err(e) => {
            debug!(error = %e, grpc, "answered by the proxy");
            let status = e.status();
            (e.answer(grpc), status)
        }
    };
    let stats = conn.route.stats.http(conn.protocol);
    stats.count(counted);
    stats.duration.record(started.elapsed().as_secs_f64());
    debug!(status = response.status().as_u16(), "response");
    Ok(response)
}

async fn forward(
    conn: &Conn,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, HttpError> {
    // HTTP/2 has no `Upgrade`, and its `CONNECT` is an ordinary stream.
    headers::prepare_request(&mut req, conn.peer_value.as_ref(), false);
    let hash_key = conn
        .route
        .hash_header
        .as_ref()
        .and_then(|name| req.headers().get(name))
        .cloned();
    let pick = PickContext {
        client_ip: conn
            .peer
            .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |p| p.ip()),
        hash_key: hash_key.as_ref().map(|v| v.as_bytes()),
    };
    let answered = conn.http.dispatch(&conn.route, req, &pick, conn.id).await?;
    let mut response = answered.response;
    headers::prepare_response(&mut response, None);
    let in_flight = answered.in_flight;
    Ok(response.map(|body| Either::Left(Guarded::h2(body, in_flight))))
}

impl Http {
    /// One HTTP/1 request that arrived some other way than [`super::serve`] (the cloud
    /// router's ingress, which rewrites the target itself): hop-by-hop fields out, `client`
    /// appended to `X-Forwarded-For`, balanced over `route`'s endpoints, retried while nothing
    /// of it reached one, counted with the Service's requests. No protocol upgrades.
    pub async fn forward(
        self: &Arc<Self>,
        route: &Route,
        mut req: Request<Incoming>,
        client: Option<std::net::IpAddr>,
    ) -> Result<Response<ProxyBody>, HttpError> {
        let started = Instant::now();
        let client_value = client.map(headers::client_value);
        headers::prepare_request(&mut req, client_value.as_ref(), false);
        let hash_key = route
            .hash_header
            .as_ref()
            .and_then(|name| req.headers().get(name))
            .cloned();
        let pick = PickContext {
            client_ip: client.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()),
            hash_key: hash_key.as_ref().map(|v| v.as_bytes()),
        };
        let answered = self.send_h1(route, req, &pick).await;
        let stats = route.stats.http(Protocol::Http1);
        stats.duration.record(started.elapsed().as_secs_f64());
        let answered = match answered {
            Ok(a) => a,
            Err(e) => {
                stats.count(e.status());
                return Err(e);
            }
        };
        // Hop-by-hop fields are out already: the head was rewritten as it was read.
        let response = answered.response;
        stats.count(response.status());
        Ok(response.map(|body| Either::Left(Guarded::h1(body))))
    }
}
