//! `rest` → `service`: the router's HTTP ingress on `router.listen`. A request under a rule's
//! path goes to an endpoint of the rule's edge Service over a stream from the dialer.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use edgehub::io::Protocol;
use edgehub::model::{Kind, Object, ObjectKey, CLOUD_NODE};
use edgehub::tunnel::{OpenError, OpenRequest, RefusalKind};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use super::forward::{self, error_response, BoxError};
use super::model::{has_dot_segment, Route};
use super::paths::{join, with_query};
use super::stats::{observe, Failure, Outcome};
use super::{LiveRule, Router};

/// Endpoints tried per request when opening fails because of the endpoint.
const MAX_ATTEMPTS: usize = 3;
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
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "router ingress: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
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
    pub(crate) async fn handle_ingress<B>(
        self: &Arc<Self>,
        req: Request<B>,
        peer: Option<IpAddr>,
    ) -> Response<Body>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
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
            rule.finish(result, start)
        }
        .instrument(span)
        .await
    }

    async fn forward_to_service<B>(
        &self,
        rule: &LiveRule,
        req: Request<B>,
        rest: &str,
        peer: Option<IpAddr>,
    ) -> Result<Response<Incoming>, Failure>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
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
        let target = with_query(join(target_path, rest), req.uri().query());
        let req =
            forward::upstream_request(req, &target, None, &format!("{name}.{namespace}"), peer)
                .map_err(Failure::unreachable)?;
        let limit = self.cfg.request_timeout;
        tokio::time::timeout(
            limit,
            self.send_to_service(rule, req, namespace, name, *port),
        )
        .await
        .unwrap_or_else(|_| Err(Failure::timeout(limit)))
    }

    /// Opens a stream to an endpoint of the Service (round-robin; the next one when the
    /// endpoint itself failed) and sends the request over it.
    async fn send_to_service<B>(
        &self,
        rule: &LiveRule,
        req: Request<B>,
        namespace: &str,
        name: &str,
        port: u16,
    ) -> Result<Response<Incoming>, Failure>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let targets = self.resolve(namespace, name, port).await?;
        let first = rule.next.fetch_add(1, Ordering::Relaxed);
        let mut last: Option<Failure> = None;
        for i in 0..targets.len().min(MAX_ATTEMPTS) {
            let (endpoint, node) = targets[(first + i) % targets.len()].clone();
            let open = OpenRequest {
                stream: 0,
                namespace: namespace.to_string(),
                service: name.to_string(),
                endpoint,
                node: node.clone(),
                protocol: Protocol::Http1,
                source: String::new(),
                window: 0,
            };
            match self.dialer.open(open).await {
                Ok(io) => {
                    debug!(%endpoint, node = node.as_deref().unwrap_or(CLOUD_NODE), "stream open");
                    return forward::exchange(io, req).await.map_err(|e| {
                        Failure::unreachable(format!(
                            "{namespace}/{name} endpoint {endpoint}: the exchange failed: {e}"
                        ))
                    });
                }
                Err(e) => {
                    info!(%endpoint, error = %e, "cannot open a stream to the endpoint");
                    let next = e.endpoint_failed();
                    last = Some(open_failure(namespace, name, endpoint, &e));
                    if !next {
                        break;
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            Failure::no_endpoints(format!("service {namespace}/{name} has no ready endpoints"))
        }))
    }

    /// The endpoints of Service port `port`: address, port to dial, and the node hosting it
    /// (`None` for cloud endpoints).
    async fn resolve(
        &self,
        namespace: &str,
        name: &str,
        port: u16,
    ) -> Result<Vec<(SocketAddr, Option<String>)>, Failure> {
        let objects = self.objects.clone();
        let (svc_key, ep_key) = (
            ObjectKey::new(Kind::Service, namespace, name),
            ObjectKey::new(Kind::Endpoints, namespace, name),
        );
        let read = tokio::task::spawn_blocking(move || {
            Ok::<_, crate::store::StoreError>((objects.get(&svc_key)?, objects.get(&ep_key)?))
        })
        .await;
        let (svc, eps) = match read {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                warn!(error = %e, "store failure while resolving a router target");
                return Err(Failure::no_endpoints("store failure; see cloudcore's log"));
            }
            Err(e) => return Err(Failure::no_endpoints(format!("internal task failed: {e}"))),
        };
        let service = match svc.map(|r| Object::from_json(Kind::Service, &r.json)) {
            Some(Ok(Object::Service(s))) => s,
            _ => {
                return Err(Failure::no_endpoints(format!(
                    "service {namespace}/{name} not found"
                )))
            }
        };
        let Some(svc_port) = service
            .spec
            .ports
            .iter()
            .find(|p| p.port == i64::from(port) && p.protocol.eq_ignore_ascii_case("TCP"))
        else {
            return Err(Failure::no_endpoints(format!(
                "service {namespace}/{name} has no TCP port {port}"
            )));
        };
        let subsets = match eps.map(|r| Object::from_json(Kind::Endpoints, &r.json)) {
            Some(Ok(Object::Endpoints(e))) => e.subsets,
            _ => Vec::new(),
        };
        let mut out: Vec<(SocketAddr, Option<String>)> = Vec::new();
        for subset in &subsets {
            let Some(target) = svc_port.endpoint_port(subset) else {
                continue;
            };
            for address in &subset.addresses {
                let Ok(ip) = address.ip.parse::<IpAddr>() else {
                    continue;
                };
                let addr = SocketAddr::new(ip, target);
                let node = edgehub::tunnel::authorise::host_of(address).map(str::to_string);
                if !out.iter().any(|(a, _)| *a == addr) {
                    out.push((addr, node));
                }
            }
        }
        if out.is_empty() {
            return Err(Failure::no_endpoints(format!(
                "service {namespace}/{name} has no ready endpoints for port {port}"
            )));
        }
        Ok(out)
    }
}

/// What the caller is answered when no stream could be opened.
fn open_failure(namespace: &str, name: &str, endpoint: SocketAddr, e: &OpenError) -> Failure {
    let message = format!("cannot open a stream to {namespace}/{name} endpoint {endpoint}: {e}");
    match e {
        // The edge enforces the Service's own QPS on opens: the caller should slow down.
        OpenError::Refused {
            kind: RefusalKind::RateLimited,
            ..
        } => Failure {
            retry_after: Some(1),
            ..Failure::new(Outcome::RateLimited, StatusCode::TOO_MANY_REQUESTS, message)
        },
        OpenError::Refused {
            kind: RefusalKind::Busy,
            ..
        }
        | OpenError::TooManyStreams(_) => Failure::new(
            Outcome::Unreachable,
            StatusCode::SERVICE_UNAVAILABLE,
            message,
        ),
        OpenError::Timeout(_) => {
            Failure::new(Outcome::Timeout, StatusCode::GATEWAY_TIMEOUT, message)
        }
        _ => Failure::unreachable(message),
    }
}

impl LiveRule {
    /// Counts the request and makes the caller's answer.
    pub(super) fn finish(
        &self,
        result: Result<Response<Incoming>, Failure>,
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
                forward::downstream_response(resp)
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
