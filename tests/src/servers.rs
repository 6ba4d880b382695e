//! Servers that speak real HTTP for the end-to-end tests of the proxy's HTTP path, run by
//! `edgemesh-testserver` (modes `web`, `grpc`, `https`), and the raw-bytes gRPC codec that the
//! tests' gRPC client shares with the `grpc` server.
//!
//! - `web ADDR NAME`: HTTP/1.1 and HTTP/2 without TLS (prior knowledge) on one port (hyper).
//!   `x-served-by: NAME` on every response and, over HTTP/2, as a trailer too. Paths:
//!   `/echo` streams the request body back; `/chunked?n=N` answers N chunks (chunked encoding
//!   over HTTP/1.1); `/headers` lists the request's headers; `/ws` is a WebSocket echo;
//!   anything else answers `NAME\n`.
//! - `grpc ADDR NAME`: a tonic gRPC server; every unary method answers `NAME:` followed by the
//!   request message.
//! - `https ADDR NAME CERT KEY`: HTTPS (rustls, the PEM files given), answering `NAME\n`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes};
use futures_util::{SinkExt, StreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

type Body = BoxBody<Bytes, hyper::Error>;

/// Runs the server of `mode` on `addr`; `None` for a mode this module does not have.
pub fn run(mode: &str, addr: &str, args: &[String]) -> Option<ExitCode> {
    if !matches!(mode, "web" | "grpc" | "https") {
        return None;
    }
    let name: Arc<str> = Arc::from(args.first().map(String::as_str).unwrap_or(""));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start a runtime: {e}");
            return Some(ExitCode::FAILURE);
        }
    };
    let addr = addr.to_string();
    let served = runtime.block_on(async move {
        let addr: SocketAddr = addr.parse().map_err(|e| format!("address {addr}: {e}"))?;
        match mode {
            "web" => web(addr, name).await,
            "grpc" => grpc(addr, name).await,
            _ => {
                let (Some(cert), Some(key)) = (args.get(1), args.get(2)) else {
                    return Err("usage: edgemesh-testserver https ADDR NAME CERT KEY".to_string());
                };
                https(addr, name, cert, key).await
            }
        }
    });
    match served {
        Ok(()) => Some(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("{mode} server: {e}");
            Some(ExitCode::FAILURE)
        }
    }
}

async fn web(addr: SocketAddr, name: Arc<str>) -> Result<(), String> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("listen on {addr}: {e}"))?;
    eprintln!("web server listening on {addr}");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let name = name.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(req, name.clone()));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

async fn answer(req: Request<Incoming>, name: Arc<str>) -> Result<Response<Body>, Infallible> {
    let h2 = req.version() == hyper::Version::HTTP_2;
    let mut response = match req.uri().path() {
        "/echo" => Response::new(req.into_body().boxed()),
        "/chunked" => {
            let n: usize = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("n="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(5);
            let chunks =
                futures_util::stream::iter((0..n).map(|i| {
                    Ok::<_, hyper::Error>(Frame::data(Bytes::from(format!("chunk {i}\n"))))
                }));
            Response::new(BodyExt::boxed(StreamBody::new(chunks)))
        }
        "/headers" => {
            let mut lines: Vec<String> = req
                .headers()
                .iter()
                .map(|(k, v)| format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())))
                .collect();
            lines.sort();
            Response::new(full(lines.concat()))
        }
        "/ws" => websocket(req),
        _ if h2 => {
            // Over HTTP/2 the name comes back as a trailer too, as gRPC's status does.
            let mut trailers = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&name) {
                trailers.insert("x-served-by", v);
            }
            let frames = futures_util::stream::iter([
                Ok::<_, hyper::Error>(Frame::data(Bytes::from(format!("{name}\n")))),
                Ok(Frame::trailers(trailers)),
            ]);
            Response::new(BodyExt::boxed(StreamBody::new(frames)))
        }
        _ => Response::new(full(format!("{name}\n"))),
    };
    if let Ok(v) = HeaderValue::from_str(&name) {
        response.headers_mut().insert("x-served-by", v);
    }
    Ok(response)
}

/// Accepts a WebSocket handshake and echoes every text and binary message.
fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    let key = req.headers().get("sec-websocket-key").cloned();
    let upgrade = req
        .headers()
        .get("upgrade")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let Some(key) = key.filter(|_| upgrade) else {
        let mut r = Response::new(full("a WebSocket handshake was expected\n"));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                return;
            }
        }
    });
    let accept = derive_accept_key(key.as_bytes());
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = r.headers_mut();
    headers.insert("connection", HeaderValue::from_static("upgrade"));
    headers.insert("upgrade", HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        headers.insert("sec-websocket-accept", v);
    }
    r
}

async fn https(addr: SocketAddr, name: Arc<str>, cert: &str, key: &str) -> Result<(), String> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert).map_err(|e| format!("{cert}: {e}"))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .map_err(|e| format!("{cert}: {e}"))?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).map_err(|e| format!("{key}: {e}"))?,
    ))
    .map_err(|e| format!("{key}: {e}"))?
    .ok_or_else(|| format!("{key}: no private key"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate: {e}"))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("listen on {addr}: {e}"))?;
    eprintln!("https server listening on {addr}");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (acceptor, name) = (acceptor.clone(), name.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let service = service_fn(move |_req: Request<Incoming>| {
                let name = name.clone();
                async move { Ok::<_, Infallible>(Response::new(full(format!("{name}\n")))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

/// gRPC messages as raw bytes: enough to exercise a real gRPC implementation (framing,
/// HTTP/2, `grpc-status` trailers) without protobuf code generation.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// The path of the one gRPC method the tests call.
pub const ECHO_METHOD: &str = "/edgemesh.test.Echo/Echo";

async fn grpc(addr: SocketAddr, name: Arc<str>) -> Result<(), String> {
    eprintln!("grpc server listening on {addr}");
    tonic::transport::Server::builder()
        .serve(addr, EchoService { name })
        .await
        .map_err(|e| e.to_string())
}

/// Answers every unary call with `NAME:` and the request message.
#[derive(Clone)]
struct EchoService {
    name: Arc<str>,
}

impl tonic::codegen::Service<hyper::Request<tonic::body::Body>> for EchoService {
    type Response = hyper::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: hyper::Request<tonic::body::Body>) -> Self::Future {
        let name = self.name.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec);
            Ok(grpc.unary(Echo { name }, req).await)
        })
    }
}

struct Echo {
    name: Arc<str>,
}

impl tonic::server::UnaryService<Bytes> for Echo {
    type Response = Bytes;
    type Future = std::future::Ready<Result<tonic::Response<Bytes>, Status>>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let mut out = format!("{}:", self.name).into_bytes();
        out.extend_from_slice(request.get_ref());
        std::future::ready(Ok(tonic::Response::new(Bytes::from(out))))
    }
}
