//! A minimal HTTP/1.1 client for the command-line tools (`cloudcore get`, `edgemesh status`):
//! one request per connection, optional TLS with a given CA. The data path never uses it.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::tls;

#[derive(Debug, thiserror::Error)]
pub enum HttpClientError {
    #[error("invalid URL {0:?}")]
    BadUrl(String),
    #[error("connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("request to {url} timed out after {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    /// TCP connected but the TLS handshake failed (e.g. a certificate the CA did not sign).
    #[error("TLS handshake with {addr}: {reason}")]
    TlsHandshake { addr: String, reason: String },
    #[error("https:// needs a CA certificate (--ca-cert)")]
    NeedCa,
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("HTTP: {0}")]
    Http(String),
}

/// A response: status code and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Bytes,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request and reads the whole response.
pub async fn request(
    method: Method,
    url: &str,
    bearer: Option<&str>,
    body: Option<Bytes>,
    ca_cert: Option<&Path>,
    timeout: Duration,
) -> Result<Response, HttpClientError> {
    tokio::time::timeout(timeout, send(method, url, bearer, body, ca_cert))
        .await
        .map_err(|_| HttpClientError::Timeout {
            url: url.to_string(),
            timeout,
        })?
}

async fn send(
    method: Method,
    url: &str,
    bearer: Option<&str>,
    body: Option<Bytes>,
    ca_cert: Option<&Path>,
) -> Result<Response, HttpClientError> {
    let uri: Uri = url
        .parse()
        .map_err(|_| HttpClientError::BadUrl(url.to_string()))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(HttpClientError::BadUrl(url.to_string())),
    };
    let host = uri
        .host()
        .ok_or_else(|| HttpClientError::BadUrl(url.to_string()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let addr = format!("{host}:{port}");
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| HttpClientError::Connect {
            addr: addr.clone(),
            reason: e.to_string(),
        })?;
    let mut req = Request::builder()
        .method(method)
        .uri(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .header(
            hyper::header::HOST,
            uri.authority().map(|a| a.as_str()).unwrap_or(&host),
        )
        .header(hyper::header::ACCEPT, "application/json");
    if let Some(token) = bearer {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    if body.is_some() {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(body.unwrap_or_default()))
        .map_err(|e| HttpClientError::Http(e.to_string()))?;
    if tls {
        let ca = ca_cert.ok_or(HttpClientError::NeedCa)?;
        let connector = tokio_rustls::TlsConnector::from(tls::client_config("--ca-cert", ca)?);
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|_| HttpClientError::BadUrl(url.to_string()))?;
        let stream =
            connector
                .connect(name, tcp)
                .await
                .map_err(|e| HttpClientError::TlsHandshake {
                    addr,
                    reason: e.to_string(),
                })?;
        exchange(stream, req).await
    } else {
        exchange(tcp, req).await
    }
}

async fn exchange<S>(stream: S, req: Request<Full<Bytes>>) -> Result<Response, HttpClientError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| HttpClientError::Http(e.to_string()))?;
    let driver = tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| HttpClientError::Http(e.to_string()))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| HttpClientError::Http(e.to_string()))?
        .to_bytes();
    driver.abort();
    Ok(Response { status, body })
}
