//! One HTTP/1.1 exchange with a cloud URL (`service` → `rest`), and the request and response
//! rewriting around it (hop-by-hop fields by the rules of the mesh's HTTP engine).
//!

use std::net::IpAddr;

use axum::body::Body;
use axum::http::header::{self, HeaderValue};
use axum::http::{Request, Response, StatusCode, Uri, Version};
use edgehub::http::headers::strip_hop_by_hop;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, Instrument};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Sends `req` over `io`; the answer's body streams from `io` as the caller reads it.
pub async fn exchange<IO, B>(io: IO, req: Request<B>) -> Result<Response<Incoming>, hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    // The connection task moves the bytes; it ends once the answer's body is read (or dropped)
    // because `sender` is dropped after this one request.
    tokio::spawn(
        async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "upstream connection ended with an error");
            }
        }
        .in_current_span(),
    );
    sender.send_request(req).await
}

/// Rewrites a caller's request for the target: new request target, hop-by-hop headers gone,
/// `Host` set when given (or kept, else `default_host`), the caller added to
/// `X-Forwarded-For`.
pub fn upstream_request<B>(
    req: Request<B>,
    path_and_query: &str,
    host: Option<&str>,
    default_host: &str,
    peer: Option<IpAddr>,
) -> Result<Request<B>, String> {
    let (mut parts, body) = req.into_parts();
    parts.uri = path_and_query
        .parse::<Uri>()
        .map_err(|e| format!("invalid target path {path_and_query:?}: {e}"))?;
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    let host = match host {
        Some(h) => Some(h),
        None if parts.headers.contains_key(header::HOST) => None,
        None => Some(default_host),
    };
    if let Some(h) = host {
        let v = HeaderValue::from_str(h).map_err(|_| format!("invalid Host {h:?}"))?;
        parts.headers.insert(header::HOST, v);
    }
    if let Some(ip) = peer {
        let forwarded = match parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip.to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&forwarded) {
            parts.headers.insert("x-forwarded-for", v);
        }
    }
    Ok(Request::from_parts(parts, body))
}

/// The target's answer for the caller: its status, end-to-end headers and streaming body.
pub fn downstream_response(resp: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Body::new(body))
}

/// An answer the router makes itself: `{"error": "..."}`.
pub fn error_response(
    status: StatusCode,
    message: &str,
    retry_after: Option<u64>,
) -> Response<Body> {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let req = Request::builder()
            .uri("/in?x=1")
            .header("connection", "keep-alive, x-secret")
            .header("x-secret", "1")
            .header("transfer-encoding", "chunked")
            .header("upgrade", "websocket")
            .header("x-keep", "2")
            .header("host", "caller.example")
            .header("x-forwarded-for", "10.1.1.1")
            .body(())
            .expect("request");
        let out = upstream_request(req, "/out?x=1", None, "svc", Some([127, 0, 0, 1].into()))
            .expect("rewritten");
        assert_eq!(out.uri(), "/out?x=1");
        let h = out.headers();
        for gone in ["connection", "x-secret", "transfer-encoding", "upgrade"] {
            assert!(!h.contains_key(gone), "{gone}");
        }
        assert_eq!(h["x-keep"], "2");
        assert_eq!(h["host"], "caller.example");
        assert_eq!(h["x-forwarded-for"], "10.1.1.1, 127.0.0.1");

        let req = Request::builder().uri("/").body(()).expect("request");
        let out = upstream_request(req, "/", None, "hello.default", None).expect("rewritten");
        assert_eq!(out.headers()["host"], "hello.default");
        let req = Request::builder()
            .uri("/")
            .header("host", "x")
            .body(())
            .expect("request");
        let out = upstream_request(req, "/", Some("api:9000"), "d", None).expect("rewritten");
        assert_eq!(out.headers()["host"], "api:9000");
    }

    #[test]
    fn error_bodies() {
        let r = error_response(StatusCode::TOO_MANY_REQUESTS, "slow down", Some(2));
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "2");
        assert_eq!(r.headers()["content-type"], "application/json");
    }
}
