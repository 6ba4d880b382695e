//! Requests the proxy answers itself, because no endpoint could: each failure is an error
//! whose message says what happened, and becomes a short `text/plain` response with the
//! status a client (or a gRPC library) acts on.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};
use thiserror::Error;

use super::body::ProxyBody;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
        source: hyper::Error,
    },
    #[error("service {service} sent no response within {timeout:?}")]
    Timeout { service: String, timeout: Duration },
    /// hyper refused the request on the way out; mostly the client's body failing (bad
    /// chunking, a client gone mid-upload).
    #[error("the request cannot be forwarded: {0}")]
    BadRequest(hyper::Error),
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

    /// The answer to the client. The body names the Service but not the endpoint or the
    /// cause (those are in the proxy's debug log): callers learn what failed, not the
    /// cluster's addresses.
    pub fn into_response(self) -> Response<ProxyBody> {
        let status = self.status();
        let text = match &self {
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
        };
        let mut response = text_response(status, text);
        if let HttpError::RateLimited { retry_after, .. } = self {
            // Whole seconds; rounding down would invite a retry that is refused again.
            let secs = (retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0)).max(1);
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

fn text_response(status: StatusCode, mut text: String) -> Response<ProxyBody> {
    text.push('\n');
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(text))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn answer(e: HttpError) -> (StatusCode, Option<String>, String) {
        let r = e.into_response();
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
}
