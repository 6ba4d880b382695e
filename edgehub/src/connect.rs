//! Reaching an endpoint of a route: pick, then dial it (an endpoint on this node) or open a
//! stream to it through the cloud (an endpoint on another node or in the cloud), and on
//! failure record it (outlier detection) and fall over to another endpoint.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::{TcpSocket, TcpStream};
use tracing::{debug, warn};

use crate::balance::{Endpoint, InFlight, PickContext};
use crate::direct::paths::{DirectOpen, DirectPaths};
use crate::direct::quic::{DirectReader, DirectStream, DirectWriter};
use futures_util::future::Either;

use crate::io::{Duplex, Protocol, Source, Whole};
use crate::routes::Route;
use crate::tunnel::{OpenError, OpenRequest, RefusalKind, TunnelStream};

/// Opens streams to endpoints this side does not dial itself: through the hub link on a
/// node, through the hosting node's link in the cloud.
pub trait Opener: Send + Sync + 'static {
    fn open(
        &self,
        request: OpenRequest,
    ) -> Pin<Box<dyn Future<Output = Result<Upstream, OpenError>> + Send + '_>>;
}

/// A byte stream of any other kind, for [`Upstream::Other`].
pub trait AnyStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> AnyStream for T {}

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

/// The connection to an endpoint: a socket of this side's, or a stream to the side that
/// hosts it.
pub enum Upstream {
    Local(TcpStream),
    Tunnel(TunnelStream),
    /// A stream of a direct path to the node that hosts the endpoint.
    Direct(DirectStream),
    /// Any other byte stream (test doubles): copied through a lock-split.
    Other(Whole<Pin<Box<dyn AnyStream>>>),
}

/// Dials endpoints this side hosts, with a timeout. On nodes the sockets carry the agent's
/// mark, so that iptables lets them pass instead of capturing them again.
pub struct Dialer {
    mark: Option<u32>,
    timeout: Duration,
    /// Marking needs CAP_NET_ADMIN; without it, say so once rather than on every connection.
    mark_warned: AtomicBool,
}

impl Dialer {
    pub fn new(mark: Option<u32>, timeout: Duration) -> Dialer {
        Dialer {
            mark,
            timeout,
            mark_warned: AtomicBool::new(false),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sets the agent's mark on an upstream socket, warning once when it cannot.
    fn mark(&self, socket: &impl std::os::fd::AsRawFd) {
        if let Some(mark) = self.mark {
            if let Err(e) = crate::socket::set_mark(socket, mark) {
                if !self.mark_warned.swap(true, Ordering::Relaxed) {
                    warn!(error = %e, "cannot mark upstream sockets (CAP_NET_ADMIN missing?); \
                        connections to cluster IPs from this host could loop");
                }
            }
        }
    }

    pub async fn dial(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        self.mark(&socket);
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

/// Receive and send buffers of a UDP flow's socket to its endpoint (memory is taken only while
/// datagrams wait).
const FLOW_SOCKET_BUFFER: usize = 1 << 20;

impl Dialer {
    /// A UDP socket connected to `addr`, marked like TCP sockets. Connecting sends nothing,
    /// so this fails only for want of sockets; an endpoint that is not there answers the
    /// first datagram with ICMP unreachable, which a later read of the socket reports
    /// (`ConnectionRefused`). The socket is non-blocking and registered with no reactor: the
    /// caller chooses how to wait on it (one task per flow, or one poller for many).
    pub fn dial_udp(&self, addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
        let any: SocketAddr = match addr {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = std::net::UdpSocket::bind(any)?;
        self.mark(&socket);
        // A flow's replies (a stream of video, an iperf3 -R) arrive as fast as the endpoint
        // sends them, and the client's datagrams are sent without waiting: the default buffers
        // hold only a few milliseconds of either.
        let _ = crate::socket::set_receive_buffer(&socket, FLOW_SOCKET_BUFFER);
        let _ = crate::socket::set_send_buffer(&socket, FLOW_SOCKET_BUFFER);
        socket.set_nonblocking(true)?;
        socket.connect(addr)?;
        Ok(socket)
    }
}

/// The far end of a UDP flow: a connected socket of this side's, or a stream to the side that
/// hosts the endpoint, carrying the flow's datagrams framed ([`crate::io::datagram`]).
pub enum DatagramUpstream {
    Local(std::net::UdpSocket),
    Tunnel(Upstream),
}

/// Picks endpoints of a route and reaches them: dialled when this side hosts them, else a
/// stream through [`Opener`]; falls over to another endpoint when one fails.
pub struct Connector {
    dialer: Arc<Dialer>,
    attempts: u32,
    /// Who this side is: a node's name, or `None` for cloudcore. Endpoints hosted elsewhere
    /// are reached through `opener`.
    here: Option<Arc<str>>,
    opener: Option<Arc<dyn Opener>>,
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
    /// `here`: this node's name, or `None` in cloudcore; `attempts`: endpoints tried for one
    /// connection.
    pub fn new(
        dialer: Arc<Dialer>,
        attempts: u32,
        here: Option<&str>,
        opener: Option<Arc<dyn Opener>>,
    ) -> Connector {
        Connector {
            dialer,
            attempts,
            here: here.map(Arc::from),
            opener,
        }
    }

    /// Whether this side dials `endpoint` itself.
    pub fn is_local(&self, endpoint: &Endpoint) -> bool {
        endpoint.node.as_deref() == self.here.as_deref()
    }

    pub fn attempts(&self) -> u32 {
        self.attempts
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
        self.fall_over(route, ctx, |endpoint| self.reach(route, endpoint, protocol))
            .await
            .map(|(upstream, endpoint, in_flight)| (upstream, endpoint.addr, in_flight))
    }

    /// The far end of a new UDP flow from a client at `ctx.client_ip`: a connected socket for
    /// an endpoint on this side, a stream (`protocol: udp`) for one elsewhere; falls over to
    /// another endpoint when a stream cannot be opened. The endpoint comes back with it, so
    /// that what the flow sees later (ICMP unreachable, answers) counts for its health.
    pub async fn connect_datagrams(
        &self,
        route: &Route,
        ctx: &PickContext<'_>,
    ) -> Result<(DatagramUpstream, Endpoint, InFlight), ConnectError> {
        self.fall_over(route, ctx, |endpoint| async move {
            if self.is_local(endpoint) {
                // Only the lack of sockets can fail here: not the endpoint's fault.
                self.dialer
                    .dial_udp(endpoint.addr)
                    .map(DatagramUpstream::Local)
                    .map_err(ReachError::Failed)
            } else {
                self.reach(route, endpoint, Protocol::Udp)
                    .await
                    .map(DatagramUpstream::Tunnel)
            }
        })
        .await
        .map(|(upstream, endpoint, in_flight)| (upstream, endpoint.clone(), in_flight))
    }

    /// Picks an endpoint and tries `reach` on it, then on others while it fails, up to
    /// `attempts` endpoints; a rate-limited answer ends the search.
    async fn fall_over<'r, T, F, Fut>(
        &self,
        route: &'r Route,
        ctx: &PickContext<'_>,
        mut reach: F,
    ) -> Result<(T, &'r Endpoint, InFlight), ConnectError>
    where
        F: FnMut(&'r Endpoint) -> Fut,
        Fut: Future<Output = Result<T, ReachError>>,
    {
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last_error = None;
        while tried.len() < self.attempts as usize {
            let Some(endpoint) = route.balancer.pick(&route.endpoints, ctx, &tried) else {
                break;
            };
            tried.push(endpoint.addr);
            let in_flight = InFlight::start(&endpoint.health);
            match reach(endpoint).await {
                Ok(upstream) => return Ok((upstream, endpoint, in_flight)),
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
                Ok(stream) => Ok(stream),
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
    ) -> Result<Upstream, OpenError> {
        let Some(opener) = &self.opener else {
            return Err(OpenError::LinkDown);
        };
        opener
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

impl Upstream {
    /// Whether a kept connection may carry another request: open, and the endpoint has sent
    /// nothing since the last response (a close, or bytes nobody asked for). Costs a system
    /// call only when the socket has become readable.
    pub fn is_reusable(&self) -> bool {
        match self {
            Upstream::Local(s) => {
                matches!(s.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            Upstream::Tunnel(s) => s.is_idle_open(),
            // Its path is up; a stream that ended anyway fails its next request, which is
            // then sent again on a new connection.
            Upstream::Direct(s) => s.is_usable(),
            // Cannot be told without reading: likewise.
            Upstream::Other(_) => true,
        }
    }
}

/// Implements `AsyncRead`/`AsyncWrite` for an enum of streams by handing each call to the
/// variant's own stream.
macro_rules! delegate_io {
    (read $ty:ty { $($variant:ident),+ }) => {
        impl tokio::io::AsyncRead for $ty {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<io::Result<()>> {
                match self.get_mut() {
                    $(Self::$variant(s) => Pin::new(s).poll_read(cx, buf),)+
                }
            }
        }
    };
    (write $ty:ty { $($variant:ident),+ }) => {
        impl tokio::io::AsyncWrite for $ty {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<io::Result<usize>> {
                match self.get_mut() {
                    $(Self::$variant(s) => Pin::new(s).poll_write(cx, buf),)+
                }
            }

            fn poll_flush(
                self: Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<io::Result<()>> {
                match self.get_mut() {
                    $(Self::$variant(s) => Pin::new(s).poll_flush(cx),)+
                }
            }

            fn poll_shutdown(
                self: Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<io::Result<()>> {
                match self.get_mut() {
                    $(Self::$variant(s) => Pin::new(s).poll_shutdown(cx),)+
                }
            }
        }
    };
}

/// `Other`'s stream as a plain byte stream (hyper needs `AsyncRead + AsyncWrite`).
impl tokio::io::AsyncRead for Whole<Pin<Box<dyn AnyStream>>> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.get_mut().0.as_mut().poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Whole<Pin<Box<dyn AnyStream>>> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        self.get_mut().0.as_mut().poll_write(cx, buf)
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.get_mut().0.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.get_mut().0.as_mut().poll_shutdown(cx)
    }
}

delegate_io!(read Upstream { Local, Tunnel, Direct, Other });
delegate_io!(write Upstream { Local, Tunnel, Direct, Other });
delegate_io!(read UpstreamReader<'_> { Local, Tunnel, Direct, Other });
delegate_io!(write UpstreamWriter<'_> { Local, Tunnel, Direct, Other });

/// The reading half of an [`Upstream`].
pub enum UpstreamReader<'a> {
    Local(tokio::net::tcp::ReadHalf<'a>),
    Tunnel(crate::tunnel::TunnelReader<'a>),
    Direct(DirectReader<'a>),
    Other(tokio::io::ReadHalf<&'a mut Pin<Box<dyn AnyStream>>>),
}

/// The writing half of an [`Upstream`].
pub enum UpstreamWriter<'a> {
    Local(tokio::net::tcp::WriteHalf<'a>),
    Tunnel(crate::tunnel::TunnelWriter<'a>),
    Direct(DirectWriter<'a>),
    Other(tokio::io::WriteHalf<&'a mut Pin<Box<dyn AnyStream>>>),
}

impl Duplex for Upstream {
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
            Upstream::Direct(s) => {
                let (r, w) = s.halves();
                (UpstreamReader::Direct(r), UpstreamWriter::Direct(w))
            }
            Upstream::Other(s) => {
                let (r, w) = tokio::io::split(&mut s.0);
                (UpstreamReader::Other(r), UpstreamWriter::Other(w))
            }
        }
    }

    fn abort(&mut self) {
        match self {
            Upstream::Local(s) => s.abort(),
            Upstream::Tunnel(s) => s.abort(),
            Upstream::Direct(s) => s.abort(),
            Upstream::Other(_) => {}
        }
    }
}

impl crate::io::Sink for UpstreamWriter<'_> {
    fn socket(&self) -> Option<&tokio::net::TcpStream> {
        match self {
            UpstreamWriter::Local(w) => Some(w.as_ref()),
            UpstreamWriter::Tunnel(_) | UpstreamWriter::Direct(_) | UpstreamWriter::Other(_) => {
                None
            }
        }
    }
}

impl Source for UpstreamReader<'_> {
    fn socket(&self) -> Option<&tokio::net::TcpStream> {
        match self {
            UpstreamReader::Local(r) => Some(r.as_ref()),
            UpstreamReader::Tunnel(_) | UpstreamReader::Direct(_) | UpstreamReader::Other(_) => {
                None
            }
        }
    }

    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send + '_ {
        match self {
            UpstreamReader::Local(r) => Either::Left(r.readable()),
            UpstreamReader::Tunnel(_) | UpstreamReader::Direct(_) | UpstreamReader::Other(_) => {
                Either::Right(std::future::ready(Ok(())))
            }
        }
    }

    fn aborted(&self) -> impl Future<Output = io::Error> + Send + '_ {
        match self {
            UpstreamReader::Local(r) => Either::Left(r.aborted()),
            UpstreamReader::Tunnel(r) => Either::Right(Either::Left(r.aborted())),
            UpstreamReader::Direct(_) | UpstreamReader::Other(_) => {
                Either::Right(Either::Right(std::future::pending()))
            }
        }
    }
}

/// A node's way to endpoints on other nodes and in the cloud: a direct path to the node that
/// hosts the endpoint when one is up, else the hub link (the relay). A call never waits for a
/// path to form (the first one starts it); an open the path does not carry takes the relay
/// within [`crate::direct::paths::OPEN_TIMEOUT`], and counts against no endpoint.
pub struct NodeOpener {
    pub tunnel: crate::tunnel::TunnelHandle,
    pub direct: Option<Arc<DirectPaths>>,
}

impl NodeOpener {
    async fn relay(&self, request: OpenRequest) -> Result<Upstream, OpenError> {
        let peer = request.node.clone();
        let mut stream = self.tunnel.open(request).await?;
        if let (Some(direct), Some(peer)) = (&self.direct, peer) {
            if peer != crate::model::CLOUD_NODE {
                metrics::counter!("edgemesh_direct_streams_total", "path" => "relay").increment(1);
                // Kept HTTP connections move to the direct path once it is up.
                stream.superseded_by(direct.path_flag(&peer));
            }
        }
        Ok(Upstream::Tunnel(stream))
    }
}

impl Opener for NodeOpener {
    fn open(
        &self,
        request: OpenRequest,
    ) -> Pin<Box<dyn Future<Output = Result<Upstream, OpenError>> + Send + '_>> {
        Box::pin(async move {
            let peer = request
                .node
                .as_deref()
                .filter(|n| *n != crate::model::CLOUD_NODE);
            let (Some(direct), Some(peer)) = (&self.direct, peer) else {
                return self.relay(request).await;
            };
            match direct.open(peer, request.clone()).await {
                DirectOpen::Opened(stream) => Ok(Upstream::Direct(stream)),
                DirectOpen::Refused(e) => Err(e),
                // Without the cloud there is no relay: a path forming (a LAN peer known from
                // the store) is worth a short wait.
                DirectOpen::NoPath if !self.tunnel.is_up() => {
                    if direct
                        .wait_path(peer, crate::direct::paths::OPEN_TIMEOUT * 3)
                        .await
                    {
                        match direct.open(peer, request.clone()).await {
                            DirectOpen::Opened(stream) => return Ok(Upstream::Direct(stream)),
                            DirectOpen::Refused(e) => return Err(e),
                            DirectOpen::NoPath | DirectOpen::Failed(_) => {}
                        }
                    }
                    self.relay(request).await
                }
                DirectOpen::NoPath => self.relay(request).await,
                DirectOpen::Failed(e) => {
                    metrics::counter!("edgemesh_direct_fallbacks_total").increment(1);
                    debug!(%peer, error = %e, "direct open failed; taking the relay");
                    self.relay(request).await
                }
            }
        })
    }
}

/// A node opens streams through its hub link.
impl Opener for crate::tunnel::TunnelHandle {
    fn open(
        &self,
        request: OpenRequest,
    ) -> Pin<Box<dyn Future<Output = Result<Upstream, OpenError>> + Send + '_>> {
        Box::pin(async move {
            crate::tunnel::TunnelHandle::open(self, request)
                .await
                .map(Upstream::Tunnel)
        })
    }
}
