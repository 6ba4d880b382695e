//! Requests the proxy answers itself, because no endpoint could: each failure is an error
//! whose message says what happened, and becomes a short `text/plain` response with the
//! status a client acts on — or, for a gRPC request, a trailers-only gRPC answer whose
//! `grpc-status` a gRPC library turns into the right error code (an HTTP 503 would reach the
//! application as a bare "UNAVAILABLE: HTTP status code 503" or worse, "UNKNOWN").

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};
use thiserror::Error;

use super::body::ProxyBody;
use super::BoxError;

#[derive(Debug, Error)]
pub enum HttpError {
    #[error("no endpoints for service {service}")]
    NoEndpoints { service: String },
    #[error("service {service} is over its rate limit")]
    RateLimited {
        service: String,
        retry_after: Duration,
    },
    #[error("no endpoint of service {service} could be reached ({tried} tried, last {endpoint}): {source}")]
    Unreachable {
        service: String,
        tried: usize,
        endpoint: SocketAddr,
        source: BoxError,
    },
    #[error("endpoint {endpoint} of service {service} failed the request: {source}")]
    Failed {
        service: String,
        endpoint: SocketAddr,
        source: BoxError,
    },
    #[error("service {service} sent no response within {timeout:?}")]
    Timeout { service: String, timeout: Duration },
    /// hyper refused the request on the way out; mostly the client's body failing (bad
    /// chunking, a client gone mid-upload).
    #[error("the request cannot be forwarded: {0}")]
    BadRequest(BoxError),
}

impl HttpError {
    pub fn status(&self) -> StatusCode {
        match self {
            HttpError::NoEndpoints { .. } => StatusCode::SERVICE_UNAVAILABLE,
            HttpError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            HttpError::Unreachable { .. } | HttpError::Failed { .. } => StatusCode::BAD_GATEWAY,
            HttpError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            HttpError::BadRequest(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// The gRPC status code for this failure (the codes of grpc/doc/statuscodes.md).
    pub fn grpc_code(&self) -> u32 {
        const RESOURCE_EXHAUSTED: u32 = 8;
        const DEADLINE_EXCEEDED: u32 = 4;
        const UNAVAILABLE: u32 = 14;
        const INTERNAL: u32 = 13;
        match self {
            HttpError::NoEndpoints { .. }
            | HttpError::Unreachable { .. }
            | HttpError::Failed { .. } => UNAVAILABLE,
            HttpError::RateLimited { .. } => RESOURCE_EXHAUSTED,
            HttpError::Timeout { .. } => DEADLINE_EXCEEDED,
            HttpError::BadRequest(_) => INTERNAL,
        }
    }

    /// The answer to a client: a gRPC one when the request was gRPC (`grpc`), else HTTP.
    pub fn answer(self, grpc: bool) -> Response<ProxyBody> {
        let (status, headers, body) = self.parts(grpc);
        let mut response = Response::new(Either::Right(Full::new(body)));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        response
    }

    /// The answer's status, fields and body, for a server that writes them itself.
    ///
    /// For a gRPC request (`grpc`) a trailers-only gRPC response: HTTP 200 whose headers carry
    /// `grpc-status` and `grpc-message`, as gRPC servers and proxies send an error with no
    /// message body. Else a short text naming the Service but not the endpoint or the cause
    /// (those are in the proxy's debug log): callers learn what failed, not the cluster's
    /// addresses.
    pub fn parts(self, grpc: bool) -> (StatusCode, HeaderMap, Bytes) {
        let text = self.public_text();
        let mut headers = HeaderMap::new();
        if grpc {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert("grpc-status", HeaderValue::from(self.grpc_code()));
            if let Ok(v) = HeaderValue::from_str(&grpc_percent_encode(&text)) {
                headers.insert("grpc-message", v);
            }
            if let HttpError::RateLimited { retry_after, .. } = self {
                // gRPC's retry policy reads this instead of Retry-After.
                let ms = retry_after.as_millis().max(1) as u64;
                headers.insert("grpc-retry-pushback-ms", HeaderValue::from(ms));
            }
            return (StatusCode::OK, headers, Bytes::new());
        }
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let HttpError::RateLimited { retry_after, .. } = self {
            // Whole seconds; rounding down would invite a retry that is refused again.
            let secs = crate::limits::retry_after_secs(retry_after);
            headers.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        (self.status(), headers, Bytes::from(text + "\n"))
    }

    /// What the client is told: the Service, not the endpoint or the cause (those are in the
    /// proxy's debug log).
    fn public_text(&self) -> String {
        match self {
            HttpError::NoEndpoints { .. }
            | HttpError::RateLimited { .. }
            | HttpError::Timeout { .. }
            | HttpError::BadRequest(_) => self.to_string(),
            HttpError::Unreachable { service, .. } => {
                format!("no endpoint of service {service} could be reached")
            }
            HttpError::Failed { service, .. } => {
                format!("the endpoint of service {service} failed the request")
            }
        }
    }
}

/// `grpc-message` is percent-encoded: bytes outside printable ASCII, and `%` itself.
fn grpc_percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether a request is gRPC (`application/grpc`, `application/grpc+proto`, ...).
pub fn is_grpc(headers: &hyper::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| is_grpc_content_type(v.as_bytes()))
}

/// Whether a `Content-Type` value is gRPC's (`application/grpc`, `application/grpc+proto`, ...);
/// the HTTP/1 path checks the raw header bytes with it too.
pub(crate) fn is_grpc_content_type(value: &[u8]) -> bool {
    value
        .get(..16)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"application/grpc"))
        && matches!(value.get(16), None | Some(b'+' | b';'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn answer(e: HttpError) -> (StatusCode, Option<String>, String) {
        let r = e.answer(false);
        let status = r.status();
        let retry = r
            .headers()
            .get(RETRY_AFTER)
            .map(|v| v.to_str().expect("ascii").to_string());
        let body = r.into_body().collect().await.expect("body").to_bytes();
        (
            status,
            retry,
            String::from_utf8(body.to_vec()).expect("utf-8"),
        )
    }

    #[tokio::test]
    async fn answers_say_which_service() {
        let service = "default/web".to_string();
        assert_eq!(
            answer(HttpError::NoEndpoints {
                service: service.clone()
            })
            .await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                "no endpoints for service default/web\n".into()
            )
        );
        assert_eq!(
            answer(HttpError::RateLimited {
                service: service.clone(),
                retry_after: Duration::from_millis(1200)
            })
            .await,
            (
                StatusCode::TOO_MANY_REQUESTS,
                Some("2".into()),
                "service default/web is over its rate limit\n".into()
            )
        );
        let (status, _, body) = answer(HttpError::Timeout {
            service: service.clone(),
            timeout: Duration::from_secs(30),
        })
        .await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(body, "service default/web sent no response within 30s\n");
        let (status, _, body) = answer(HttpError::Unreachable {
            service,
            tried: 3,
            endpoint: "10.244.0.2:8080".parse().expect("addr"),
            source: "connection refused".into(),
        })
        .await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(!body.contains("10.244"), "{body}");
    }

    #[tokio::test]
    async fn grpc_requests_get_grpc_status_codes() {
        let grpc = |e: HttpError| {
            let r = e.answer(true);
            let h = r.headers();
            let get = |k: &str| h.get(k).map(|v| v.to_str().expect("ascii").to_string());
            (
                r.status(),
                get("content-type"),
                get("grpc-status"),
                get("grpc-message"),
                get("grpc-retry-pushback-ms"),
            )
        };
        let service = "default/greeter".to_string();
        assert_eq!(
            grpc(HttpError::NoEndpoints {
                service: service.clone()
            }),
            (
                StatusCode::OK,
                Some("application/grpc".into()),
                Some("14".into()),
                Some("no endpoints for service default/greeter".into()),
                None
            )
        );
        let limited = grpc(HttpError::RateLimited {
            service: service.clone(),
            retry_after: Duration::from_millis(1200),
        });
        assert_eq!(limited.2.as_deref(), Some("8"));
        assert_eq!(limited.4.as_deref(), Some("1200"));
        let timeout = grpc(HttpError::Timeout {
            service,
            timeout: Duration::from_secs(30),
        });
        assert_eq!(timeout.2.as_deref(), Some("4"));
        let body = HttpError::NoEndpoints {
            service: "x".into(),
        }
        .answer(true)
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
        assert!(body.is_empty(), "trailers-only: no message");
    }

    #[test]
    fn grpc_detection_and_message_encoding() {
        let mut h = hyper::HeaderMap::new();
        assert!(!is_grpc(&h));
        for (ct, want) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("Application/GRPC; charset=utf-8", true),
            ("application/grpc-web", false),
            ("application/json", false),
        ] {
            h.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
            assert_eq!(is_grpc(&h), want, "{ct}");
        }
        assert_eq!(grpc_percent_encode("50% done\nö"), "50%25 done%0A%C3%B6");
    }
}
