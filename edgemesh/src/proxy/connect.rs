//! Reaching an endpoint of a route: pick, then dial it (an endpoint on this node) or open a
//! stream to it through the cloud (an endpoint on another node or in the cloud), and on
//! failure record it (outlier detection) and fall over to another endpoint.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edgehub::io::Protocol;
use edgehub::tunnel::{
    OpenError, OpenRequest, RefusalKind, TunnelHandle, TunnelStream,
};
use thiserror::Error;
use tokio::net::{TcpSocket, TcpStream};
use tracing::{debug, warn};

use super::socket;
use super::table::Route;
use super::ProxyConfig;
use crate::balance::{Endpoint, InFlight, PickContext};

#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("service {service} has no endpoints")]
    NoEndpoints { service: String },
    #[error("service {service}: {tried} endpoint(s) failed, last {endpoint}: {source}")]
    AllFailed {
        service: String,
        tried: usize,
        endpoint: SocketAddr,
        source: io::Error,
    },
    /// The side that dials the endpoint refused the connection: the Service is over its QPS
    /// limit. Another endpoint is not tried, or the limit would mean nothing.
    #[error("service {service} is over its QPS limit")]
    RateLimited { service: String },
}

/// Why one attempt at one endpoint failed.
#[derive(Debug, Error)]
pub enum ReachError {
    /// The side that dials the endpoint refused: the Service is over its limit.
    #[error("over the Service's QPS limit")]
    RateLimited,
    #[error(transparent)]
    Failed(io::Error),
}

/// The connection to an endpoint: a socket of this node's, or a stream through the cloud.
pub enum Upstream {
    Local(TcpStream),
    Tunnel(TunnelStream),
}

/// Dials endpoints on this node: marked sockets (so iptables lets them pass) with a timeout.
pub struct Dialer {
    mark: u32,
    timeout: Duration,
    /// Marking needs CAP_NET_ADMIN; without it, say so once rather than on every connection.
    mark_warned: AtomicBool,
}

impl Dialer {
    pub fn new(cfg: &ProxyConfig) -> Dialer {
        Dialer {
            mark: cfg.mark,
            timeout: cfg.connect_timeout,
            mark_warned: AtomicBool::new(false),
        }
    }

    pub async fn dial(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Err(e) = socket::set_mark(&socket, self.mark) {
            if !self.mark_warned.swap(true, Ordering::Relaxed) {
                warn!(error = %e, "cannot mark upstream sockets (CAP_NET_ADMIN missing?); \
                    connections to cluster IPs from this host could loop");
            }
        }
        let stream = tokio::time::timeout(self.timeout, socket.connect(addr))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {:?}", self.timeout),
                )
            })??;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

pub struct Connector {
    dialer: Arc<Dialer>,
    attempts: u32,
    /// This node's name: endpoints hosted elsewhere are reached through `tunnel`.
    node: Arc<str>,
    tunnel: Option<TunnelHandle>,
}

/// What the far side of a tunnel said, as an I/O error for logs and `AllFailed`.
fn open_error(e: OpenError) -> io::Error {
    let kind = match &e {
        OpenError::Timeout(_) => io::ErrorKind::TimedOut,
        OpenError::Refused {
            kind: RefusalKind::Unreachable,
            ..
        } => io::ErrorKind::ConnectionRefused,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("tunnel: {e}"))
}

pub fn stream_protocol(annotation: Option<&str>) -> Protocol {
    annotation
        .and_then(Protocol::from_annotation)
        .unwrap_or_default()
}

impl Connector {
    pub fn new(
        cfg: &ProxyConfig,
        dialer: Arc<Dialer>,
        node: &str,
        tunnel: Option<TunnelHandle>,
    ) -> Connector {
        Connector {
            dialer,
            attempts: cfg.connect_attempts,
            node: Arc::from(node),
            tunnel,
        }
    }

    /// Whether this node dials `endpoint` itself.
    pub fn is_local(&self, endpoint: &Endpoint) -> bool {
        endpoint.node.as_deref() == Some(&*self.node)
    }

    /// Connects to an endpoint of `route` for a client at `client_ip`. Returns the connection,
    /// the endpoint and its in-flight guard (held for as long as the connection is open).
    pub async fn connect(
        &self,
        route: &Route,
        client_ip: IpAddr,
    ) -> Result<(Upstream, SocketAddr, InFlight), ConnectError> {
        let ctx = PickContext {
            client_ip,
            hash_key: None,
        };
        self.connect_with(route, &ctx, stream_protocol(route.protocol.as_deref()))
            .await
    }

    /// [`Connector::connect`] with a full pick context (a hash key taken from a request) and
    /// the protocol the caller will speak (told to the far side of a tunnel).
    pub async fn connect_with(
        &self,
        route: &Route,
        ctx: &PickContext<'_>,
        protocol: Protocol,
    ) -> Result<(Upstream, SocketAddr, InFlight), ConnectError> {
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last_error = None;
        while tried.len() < self.attempts as usize {
            let Some(endpoint) = route.balancer.pick(&route.endpoints, ctx, &tried) else {
                break;
            };
            tried.push(endpoint.addr);
            let in_flight = InFlight::start(&endpoint.health);
            match self.reach(route, endpoint, protocol).await {
                Ok(upstream) => return Ok((upstream, endpoint.addr, in_flight)),
                Err(ReachError::RateLimited) => {
                    return Err(ConnectError::RateLimited {
                        service: route.service.to_string(),
                    })
                }
                Err(ReachError::Failed(e)) => last_error = Some((endpoint.addr, e)),
            }
        }
        match last_error {
            None => Err(ConnectError::NoEndpoints {
                service: route.service.to_string(),
            }),
            Some((endpoint, source)) => Err(ConnectError::AllFailed {
                service: route.service.to_string(),
                tried: tried.len(),
                endpoint,
                source,
            }),
        }
    }

    /// One attempt at one endpoint: dialled when it is on this node, else a stream through the
    /// cloud. Records the outcome in the endpoint's health (outlier detection) and the route's
    /// counters; only the endpoint's own failures count against it.
    pub async fn reach(
        &self,
        route: &Route,
        endpoint: &Endpoint,
        protocol: Protocol,
    ) -> Result<Upstream, ReachError> {
        let attempt = if self.is_local(endpoint) {
            self.dialer.dial(endpoint.addr).await.map(Upstream::Local)
        } else {
            match self.open(route, endpoint, protocol).await {
                Ok(stream) => Ok(Upstream::Tunnel(stream)),
                Err(OpenError::Refused {
                    kind: RefusalKind::RateLimited,
                    ..
                }) => return Err(ReachError::RateLimited),
                Err(e) if !e.endpoint_failed() => {
                    // A missing or full link says nothing about the endpoint.
                    route.stats.get().endpoint_failures.increment(1);
                    debug!(endpoint = %endpoint.addr, error = %e, "tunnel open failed");
                    return Err(ReachError::Failed(open_error(e)));
                }
                Err(e) => Err(open_error(e)),
            }
        };
        match attempt {
            Ok(upstream) => {
                endpoint.health.record_success();
                Ok(upstream)
            }
            Err(e) => {
                route.stats.get().endpoint_failures.increment(1);
                debug!(endpoint = %endpoint.addr, error = %e, "connect failed");
                endpoint.health.record_failure();
                Err(ReachError::Failed(e))
            }
        }
    }

    async fn open(
        &self,
        route: &Route,
        endpoint: &Endpoint,
        protocol: Protocol,
    ) -> Result<TunnelStream, OpenError> {
        let Some(tunnel) = &self.tunnel else {
            return Err(OpenError::LinkDown);
        };
        tunnel
            .open(OpenRequest {
                stream: 0,
                namespace: route.service.namespace.to_string(),
                service: route.service.name.to_string(),
                endpoint: endpoint.addr,
                node: endpoint.node.as_deref().map(str::to_string),
                protocol,
                source: String::new(),
                window: 0,
            })
            .await
    }
}

impl tokio::io::AsyncRead for Upstream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Local(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Upstream::Tunnel(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Upstream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Local(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Upstream::Tunnel(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Local(s) => std::pin::Pin::new(s).poll_flush(cx),
            Upstream::Tunnel(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Local(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Upstream::Tunnel(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The reading half of an [`Upstream`].
pub enum UpstreamReader<'a> {
    Local(tokio::net::tcp::ReadHalf<'a>),
    Tunnel(edgehub::tunnel::TunnelReader<'a>),
}

/// The writing half of an [`Upstream`].
pub enum UpstreamWriter<'a> {
    Local(tokio::net::tcp::WriteHalf<'a>),
    Tunnel(edgehub::tunnel::TunnelWriter<'a>),
}

impl edgehub::io::Duplex for Upstream {
    type Reader<'a> = UpstreamReader<'a>;
    type Writer<'a> = UpstreamWriter<'a>;

    fn halves(&mut self) -> (UpstreamReader<'_>, UpstreamWriter<'_>) {
        match self {
            Upstream::Local(s) => {
                let (r, w) = s.halves();
                (UpstreamReader::Local(r), UpstreamWriter::Local(w))
            }
            Upstream::Tunnel(s) => {
                let (r, w) = s.halves();
                (UpstreamReader::Tunnel(r), UpstreamWriter::Tunnel(w))
            }
        }
    }

    fn abort(&mut self) {
        match self {
            Upstream::Local(s) => s.abort(),
            Upstream::Tunnel(s) => s.abort(),
        }
    }
}

impl edgehub::io::Source for UpstreamReader<'_> {
    fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send + '_ {
        use futures_util::future::Either;
        match self {
            UpstreamReader::Local(r) => Either::Left(r.readable()),
            UpstreamReader::Tunnel(r) => Either::Right(r.readable()),
        }
    }

    fn aborted(&self) -> impl std::future::Future<Output = io::Error> + Send + '_ {
        use futures_util::future::Either;
        match self {
            UpstreamReader::Local(r) => Either::Left(r.aborted()),
            UpstreamReader::Tunnel(r) => Either::Right(r.aborted()),
        }
    }
}

impl tokio::io::AsyncRead for UpstreamReader<'_> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamReader::Local(r) => std::pin::Pin::new(r).poll_read(cx, buf),
            UpstreamReader::Tunnel(r) => std::pin::Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for UpstreamWriter<'_> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamWriter::Local(w) => std::pin::Pin::new(w).poll_write(cx, buf),
            UpstreamWriter::Tunnel(w) => std::pin::Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamWriter::Local(w) => std::pin::Pin::new(w).poll_flush(cx),
            UpstreamWriter::Tunnel(w) => std::pin::Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamWriter::Local(w) => std::pin::Pin::new(w).poll_shutdown(cx),
            UpstreamWriter::Tunnel(w) => std::pin::Pin::new(w).poll_shutdown(cx),
        }
    }
}
