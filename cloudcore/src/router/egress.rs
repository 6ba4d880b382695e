//! `service` → `rest`: HTTP/1.1 served on streams that edge nodes open to a rule's virtual
//! Service, each request sent on to the rule's `target_resource.url`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info_span, Instrument};

use super::forward::{self, error_response, BoxError};
use super::model::{has_dot_segment, Route, TargetUrl};
use super::paths::{join, with_query};
use super::stats::{observe, Failure};
use super::{LiveRule, Router};

/// An edge app has this long to send a request's head (also between keep-alive requests).
const HEADER_TIMEOUT: Duration = Duration::from_secs(60);

impl Router {
    /// Serves HTTP/1.1 (keep-alive) on a stream that `source_node` opened to the virtual
    /// Service `namespace/name`, until the stream closes. Each request is sent to the URL of
    /// the Service's rule as it is at that moment; a request after the rule was deleted is
    /// answered 503.
    pub async fn serve_edge_stream<IO>(
        self: Arc<Self>,
        source_node: String,
        namespace: String,
        name: String,
        io: IO,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let span = info_span!("router_edge_stream", node = %source_node, service = %format!("{namespace}/{name}"));
        let router = self.clone();
        let who = Arc::new((source_node, namespace, name));
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (router, who) = (router.clone(), who.clone());
            async move {
                let (node, namespace, name) = &*who;
                Ok::<_, Infallible>(router.handle_edge_request(node, namespace, name, req).await)
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .keep_alive(true)
            .serve_connection(TokioIo::new(io), service);
        if let Err(e) = conn.instrument(span).await {
            debug!(error = %e, "edge stream ended with an error");
        }
    }

    /// Answers one request from an edge app: the cloud service's response, or the router's
    /// own error.
    pub(crate) async fn handle_edge_request<B>(
        self: &Arc<Self>,
        source_node: &str,
        namespace: &str,
        name: &str,
        req: Request<B>,
    ) -> Response<Body>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let start = Instant::now();
        let Some(rule) = self.rule_for_service(namespace, name) else {
            observe("none", "no_rule", start.elapsed());
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("no router rule for service {namespace}/{name}"),
                None,
            );
        };
        if has_dot_segment(req.uri().path()) {
            observe("none", "bad_path", start.elapsed());
            return error_response(
                StatusCode::BAD_REQUEST,
                "the path has a '.' or '..' segment",
                None,
            );
        }
        let span = info_span!(
            "router_request",
            rule = %rule.id(),
            direction = "service-to-rest",
            node = %source_node,
            method = %req.method(),
            path = %req.uri().path(),
        );
        async {
            let result = self.forward_to_url(&rule, req).await;
            rule.finish(result.map(forward::downstream_response), start)
        }
        .instrument(span)
        .await
    }

    async fn forward_to_url<B>(
        &self,
        rule: &LiveRule,
        req: Request<B>,
    ) -> Result<Response<Incoming>, Failure>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let Route::ServiceToRest { url, .. } = &rule.route else {
            return Err(Failure::no_endpoints("the rule does not route to a URL"));
        };
        if let Some(limiter) = &rule.limiter {
            limiter
                .check()
                .map_err(|wait| Failure::rate_limited(&rule.record.name, wait))?;
        }
        let target = with_query(join(&url.path, req.uri().path()), req.uri().query());
        // The cloud service is addressed by its own name (virtual hosting, TLS-terminating
        // proxies in front of it), not by the virtual Service's.
        let req =
            forward::upstream_request(req, &target, Some(&url.authority), &url.authority, None)
                .map_err(Failure::unreachable)?;
        let limit = self.cfg.request_timeout;
        tokio::time::timeout(limit, send_to_url(url, req))
            .await
            .unwrap_or_else(|_| Err(Failure::timeout(limit)))
    }
}

async fn send_to_url<B>(url: &TargetUrl, req: Request<B>) -> Result<Response<Incoming>, Failure>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| {
            Failure::unreachable(format!("cannot connect to {}:{}: {e}", url.host, url.port))
        })?;
    let _ = tcp.set_nodelay(true);
    forward::exchange(tcp, req)
        .await
        .map_err(|e| Failure::unreachable(format!("{}: the exchange failed: {e}", url.authority)))
}
