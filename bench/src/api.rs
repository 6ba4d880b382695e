//! A small keep-alive HTTP/1.1 client for cloudcore's REST API: one TCP connection reused for
//! many requests (token creation and service writes would otherwise pay a connect each).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

pub struct Api {
    addr: SocketAddr,
    host: String,
    auth: String,
    timeout: Duration,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Api {
    pub fn new(addr: SocketAddr, token: &str, timeout: Duration) -> Self {
        Api {
            addr,
            host: addr.to_string(),
            auth: format!("Bearer {token}"),
            timeout,
            sender: None,
        }
    }

    async fn sender(&mut self) -> Result<&mut SendRequest<Full<Bytes>>> {
        let usable = match self.sender.as_mut() {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !usable {
            let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(self.addr))
                .await
                .map_err(|_| anyhow!("connect to the API at {}: timed out", self.addr))?
                .with_context(|| format!("connect to the API at {}", self.addr))?;
            let _ = tcp.set_nodelay(true);
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .context("HTTP handshake with the API")?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        self.sender
            .as_mut()
            .ok_or_else(|| anyhow!("no API connection"))
    }

    /// Sends one request and returns status and body.
    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<(u16, Bytes)> {
        let what = format!("{method} {path}");
        let timeout = self.timeout;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &self.host)
            .header(AUTHORIZATION, &self.auth);
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .context("build request")?;
        let exchange = async {
            let sender = self.sender().await?;
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.sender = None;
                Err(e.context(what))
            }
            Err(_) => {
                self.sender = None;
                Err(anyhow!("{what}: timed out after {timeout:?}"))
            }
        }
    }

    /// Like [`Api::call`], but any status other than `ok` is an error naming the body.
    pub async fn expect(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        ok: &[u16],
    ) -> Result<Bytes> {
        let what = format!("{method} {path}");
        let (status, body) = self.call(method, path, body).await?;
        if !ok.contains(&status) {
            return Err(anyhow!(
                "{what}: HTTP {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ));
        }
        Ok(body)
    }
}
