//! One request from a client connection: rewritten for the endpoint, dispatched, answered
//! within the request timeout, counted.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::Either;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response};
use tokio::time::Instant;
use tracing::debug;

use super::answer::{is_grpc, HttpError};
use super::body::{Guarded, ProxyBody};
use super::headers;
use super::Http;
use crate::balance::PickContext;
use edgehub::io::Protocol;
use crate::proxy::table::Route;

/// What the requests of one client connection share.
pub struct Conn {
    /// Unique in the process: connections to endpoints that belong to this client connection
    /// are pooled under it.
    pub id: u64,
    pub http: Arc<Http>,
    pub route: Arc<Route>,
    pub peer: SocketAddr,
    /// `peer`'s address for `X-Forwarded-For`, made once.
    pub peer_value: hyper::header::HeaderValue,
    pub protocol: Protocol,
    /// Both ends of an upgrade the endpoint accepted (client side, endpoint side): once the
    /// `101` is out, the connection task joins them.
    pub upgraded: Mutex<Option<(OnUpgrade, OnUpgrade)>>,
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
    let upgrade =
        headers::prepare_request(&mut req, &conn.peer_value, conn.protocol == Protocol::Http1);
    // The client's half of an upgrade must be taken before the request goes on its way.
    let client_side = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let hash_key = conn
        .route
        .hash_header
        .as_ref()
        .and_then(|name| req.headers().get(name))
        .cloned();
    let pick = PickContext {
        client_ip: conn.peer.ip(),
        hash_key: hash_key.as_ref().map(|v| v.as_bytes()),
    };
    let answered = conn
        .http
        .dispatch(
            &conn.route,
            req,
            &pick,
            conn.protocol,
            upgrade.is_some(),
            conn.id,
        )
        .await?;
    let mut response = answered.response;
    if let (Some(upgrade), Some(client_side)) = (&upgrade, client_side) {
        if upgrade.accepted_by(response.status()) {
            let endpoint_side = hyper::upgrade::on(&mut response);
            *conn.upgraded.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((client_side, endpoint_side));
        }
    }
    headers::prepare_response(&mut response, upgrade.as_ref());
    let (in_flight, recycle) = (answered.in_flight, answered.recycle);
    Ok(response.map(|body| Either::Left(Guarded::new(body, in_flight, recycle))))
}
