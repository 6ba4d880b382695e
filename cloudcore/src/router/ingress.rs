//! `rest` → `service`: the router's HTTP ingress on `router.listen`. A request under a rule's
//! path goes to an endpoint of the rule's Service through the mesh's own data path
//! ([`super::DataPath`]): the Service's balancing policy, affinity and outlier ejection,
//! pooled connections (streams to edge nodes), retries while nothing reached an endpoint.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use edgehub::http::HttpError;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use super::forward::error_response;
use super::model::{has_dot_segment, Route};
use super::paths::{join, with_query};
use super::stats::{observe, Failure, Outcome};
use super::{LiveRule, Router};

/// How often counters are written to the store.
const FLUSH_INTERVAL: Duration = Duration::from_secs(10);
/// Time in-flight requests get to finish at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// A caller has this long to send a request's head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

impl Router {
    /// Serves the ingress on `listener` until `shutdown`, and writes the rules' counters to
    /// the store every few seconds and once more when the last request has finished.
    pub async fn serve_ingress(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) {
        let flusher = tokio::spawn(self.clone().flush_every(FLUSH_INTERVAL, shutdown.clone()));
        let graceful = GracefulShutdown::new();
        loop {
            let Some((tcp, peer)) =
                edgehub::accept::next_connection(&listener, "router", &shutdown).await
            else {
                break;
            };
            let _ = tcp.set_nodelay(true);
            let router = self.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let router = router.clone();
                async move { Ok::<_, Infallible>(router.handle_ingress(req, Some(peer.ip())).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service);
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(%peer, error = %e, "router ingress connection ended with an error");
                }
            });
        }
        if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
            .await
            .is_err()
        {
            warn!("router ingress: requests still running at shutdown were cut");
        }
        let _ = flusher.await;
        self.flush_now().await;
    }

    async fn flush_every(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => self.clone().flush_now().await,
            }
        }
    }

    async fn flush_now(self: Arc<Self>) {
        match tokio::task::spawn_blocking(move || self.flush()).await {
            Ok(Ok(n)) if n > 0 => debug!(rules = n, "router counters saved"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot save router counters; retrying later"),
            Err(e) => warn!(error = %e, "router counter flush failed"),
        }
    }

    /// Answers one ingress request: the edge pod's response, or the router's own error.
    pub(crate) async fn handle_ingress(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: Option<IpAddr>,
    ) -> Response<Body> {
        let start = Instant::now();
        let path = req.uri().path().to_string();
        if has_dot_segment(&path) {
            observe("none", "bad_path", start.elapsed());
            return error_response(
                StatusCode::BAD_REQUEST,
                "the path has a '.' or '..' segment",
                None,
            );
        }
        let Some((rule, rest)) = self.rule_for_path(&path) else {
            observe("none", "no_rule", start.elapsed());
            return error_response(
                StatusCode::NOT_FOUND,
                &format!("no router rule for path {path}"),
                None,
            );
        };
        let span = info_span!(
            "router_request",
            rule = %rule.id(),
            direction = "rest-to-service",
            method = %req.method(),
            path = %path,
        );
        let rest = rest.to_string();
        async {
            let result = self.forward_to_service(&rule, req, &rest, peer).await;
            rule.finish(result.map(|r| r.map(Body::new)), start)
        }
        .instrument(span)
        .await
    }

    async fn forward_to_service(
        &self,
        rule: &LiveRule,
        mut req: Request<Incoming>,
        rest: &str,
        peer: Option<IpAddr>,
    ) -> Result<Response<edgehub::http::ProxyBody>, Failure> {
        let Route::RestToService {
            namespace,
            name,
            port,
            target_path,
            ..
        } = &rule.route
        else {
            return Err(Failure::no_endpoints(
                "the rule does not route to a Service",
            ));
        };
        if let Some(limiter) = &rule.limiter {
            limiter
                .check()
                .map_err(|wait| Failure::rate_limited(&rule.record.name, wait))?;
        }
        let Some(route) = self.data.route(namespace, name, *port) else {
            return Err(Failure::no_endpoints(format!(
                "service {namespace}/{name} not found, or it has no TCP port {port}"
            )));
        };
        let target = with_query(join(target_path, rest), req.uri().query());
        *req.uri_mut() = target
            .parse()
            .map_err(|e| Failure::unreachable(format!("invalid target path {target:?}: {e}")))?;
        *req.version_mut() = hyper::Version::HTTP_11;
        if !req.headers().contains_key(hyper::header::HOST) {
            let host = hyper::header::HeaderValue::from_str(&format!("{name}.{namespace}"))
                .map_err(|_| Failure::unreachable(format!("invalid Host {name}.{namespace}")))?;
            req.headers_mut().insert(hyper::header::HOST, host);
        }
        let limit = self.cfg.request_timeout;
        let forwarded = self.data.http().forward(&route, req, peer);
        match tokio::time::timeout(limit, forwarded).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(failure(&e)),
            Err(_) => Err(Failure::timeout(limit)),
        }
    }
}

/// What the caller is answered when no endpoint answered.
fn failure(e: &HttpError) -> Failure {
    let message = e.to_string();
    match e {
        // The side that dials the endpoint enforces the Service's own QPS: the caller should
        // slow down.
        HttpError::RateLimited { retry_after, .. } => Failure {
            retry_after: Some(edgehub::limits::retry_after_secs(*retry_after)),
            ..Failure::new(Outcome::RateLimited, StatusCode::TOO_MANY_REQUESTS, message)
        },
        HttpError::NoEndpoints { .. } => Failure::no_endpoints(message),
        HttpError::Timeout { .. } => {
            Failure::new(Outcome::Timeout, StatusCode::GATEWAY_TIMEOUT, message)
        }
        HttpError::BadRequest(_) => {
            Failure::new(Outcome::Unreachable, StatusCode::BAD_REQUEST, message)
        }
        HttpError::Unreachable { .. } | HttpError::Failed { .. } => Failure::unreachable(message),
    }
}

impl LiveRule {
    /// Counts the request and makes the caller's answer.
    pub(super) fn finish(
        &self,
        result: Result<Response<Body>, Failure>,
        start: Instant,
    ) -> Response<Body> {
        let elapsed = start.elapsed();
        match result {
            Ok(resp) => {
                let status = resp.status();
                let outcome = if status.is_server_error() {
                    self.stats.fail(format!("the target answered {status}"));
                    Outcome::TargetError
                } else {
                    self.stats.success();
                    Outcome::Success
                };
                observe(self.id(), outcome.as_str(), elapsed);
                debug!(status = status.as_u16(), ?elapsed, "routed");
                resp
            }
            Err(f) => {
                observe(self.id(), f.outcome.as_str(), elapsed);
                if f.outcome == Outcome::RateLimited {
                    debug!(status = f.status.as_u16(), error = %f.message, "not routed");
                } else {
                    info!(status = f.status.as_u16(), error = %f.message, ?elapsed, "not routed");
                }
                let resp = error_response(f.status, &f.message, f.retry_after);
                self.stats.fail(f.message);
                resp
            }
        }
    }
}
