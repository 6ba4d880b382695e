//! The side that dials an endpoint for a stream that arrived: a node for its own endpoints
//! (streams relayed from other nodes, or opened by the cloud router), cloudcore for cloud
//! endpoints. The same steps on both: authorise the stream against this side's own copy of the
//! metadata, dial the endpoint (a refusal lets the opener fall over to another endpoint),
//! accept, then limit and join:
//!
//! - a Service without a QPS limit: bytes both ways ([`crate::io::join`]);
//! - a limited Service whose stream carries HTTP/1 or HTTP/2 (as the opener said, or as the
//!   first bytes show): the HTTP engine ([`crate::http`]) serves it, each request admitted
//!   against the limit (`429` with `Retry-After` over it);
//! - a limited Service with other bytes: the stream counts as one admission, refused (closed)
//!   over the limit;
//! - a UDP flow (`protocol: udp`): a connected UDP socket to the endpoint, datagrams relayed
//!   with their boundaries ([`crate::io::datagram`]); on a limited Service the flow counts as
//!   one admission (new flows per second), and a flow over the limit is closed, so its
//!   datagrams are dropped.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::balance::{Endpoint, HealthRegistry, OutlierConfig, ServiceBalancer, Tier};
use crate::connect::{Connector, Dialer};
use crate::http::{Http, HttpConfig};
use crate::io::{self, Counters, Moved, Protocol, Rewind, Timeouts};
use crate::limits::{Decision, Limiters, Protocol as Admission};
use crate::model::LbPolicy;
use crate::routes::stats::ServiceStats;
use crate::routes::{Route, ServiceRef};
use crate::tunnel::authorise::authorise_in;
use crate::tunnel::{Incoming, Mux, OpenRefusal, OpenRequest, RefusalKind, TunnelStream};
use crate::view::MeshView;

/// A stream that arrived and waits for this side's answer: over the hub link
/// ([`MuxArrival`]) or over a direct path ([`crate::direct::paths::DirectArrival`]).
pub trait Arrival: Send {
    type Stream: io::Duplex + AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// What the opener asked for (`source` set by the side that authenticated it).
    fn request(&self) -> &OpenRequest;
    /// Answers the opener that the stream is open.
    fn accept(self) -> impl Future<Output = Result<Self::Stream, OpenRefusal>> + Send;
    /// Answers the opener with a refusal.
    fn refuse(self, kind: RefusalKind, message: &str) -> impl Future<Output = ()> + Send;
}

/// A stream opened over a hub link.
pub struct MuxArrival {
    pub mux: Mux,
    pub incoming: Incoming,
}

impl Arrival for MuxArrival {
    type Stream = TunnelStream;

    fn request(&self) -> &OpenRequest {
        &self.incoming.request
    }

    async fn accept(self) -> Result<TunnelStream, OpenRefusal> {
        self.mux.accept(self.incoming)
    }

    async fn refuse(self, kind: RefusalKind, message: &str) {
        self.mux.refuse(self.incoming, kind, message)
    }
}

impl Arrival for crate::direct::paths::DirectArrival {
    type Stream = crate::direct::quic::DirectStream;

    fn request(&self) -> &OpenRequest {
        &self.request
    }

    fn accept(self) -> impl Future<Output = Result<Self::Stream, OpenRefusal>> + Send {
        crate::direct::paths::DirectArrival::accept(self)
    }

    fn refuse(self, kind: RefusalKind, message: &str) -> impl Future<Output = ()> + Send {
        crate::direct::paths::DirectArrival::refuse(self, kind, message)
    }
}

/// How a served stream ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Served {
    /// Bytes both ways (no limit, or a connection within it): `a_to_b` went to the endpoint.
    Joined(Moved),
    /// HTTP requests, each checked against the limit.
    Http,
    /// Over the limit (not HTTP): closed.
    Limited,
    /// Datagrams of a UDP flow: `a_to_b` payload bytes went to the endpoint.
    Datagrams(Moved),
    /// Not accepted: the endpoint could not be dialled, or the link is full.
    Refused(RefusalKind),
}

#[derive(Clone, Copy, Debug)]
pub struct ServeTimeouts {
    /// How long the first bytes may take to show whether a stream is HTTP.
    pub detect: Duration,
    /// How long a joined stream may go without a byte, and once one side finished.
    pub join: Timeouts,
}

/// Serves the streams that end on this side. One per process; cheap to share.
pub struct StreamServer {
    dialer: Arc<Dialer>,
    limiters: Arc<Limiters>,
    timeouts: ServeTimeouts,
    /// Requests of streams to limited Services, one by one.
    http: Arc<Http>,
    /// This side: a node's name, or `None` in cloudcore.
    here: Option<Arc<str>>,
}

impl StreamServer {
    pub fn new(
        here: Option<&str>,
        dialer: Arc<Dialer>,
        limiters: Arc<Limiters>,
        http: HttpConfig,
        timeouts: ServeTimeouts,
    ) -> StreamServer {
        // The engine dials only the endpoint a stream was authorised for: one attempt.
        let connector = Connector::new(dialer.clone(), 1, here, None);
        let http = Arc::new(Http::new(
            http,
            timeouts.join,
            Arc::new(connector),
            limiters.clone(),
        ));
        StreamServer {
            dialer,
            limiters,
            timeouts,
            http,
            here: here.map(Arc::from),
        }
    }

    /// Closes pooled connections to endpoints as they expire, until `shutdown`.
    pub async fn sweep(self: Arc<Self>, shutdown: CancellationToken) {
        self.http.clone().sweep_pool(shutdown).await
    }

    /// Checks a stream against `view` (the Service exists, the endpoint is one of its ready
    /// addresses, and this side hosts it).
    pub fn authorise(&self, view: &MeshView, request: &OpenRequest) -> Result<(), OpenRefusal> {
        authorise_in(view, request, self.here.as_deref())
    }

    /// Dials the endpoint of an authorised stream, accepts it (then calls `accepted`) and
    /// serves it until it ends.
    pub async fn serve<A: Arrival>(
        &self,
        incoming: A,
        accepted: impl FnOnce(),
        shutdown: &CancellationToken,
    ) -> Served {
        let request = incoming.request().clone();
        if request.protocol == Protocol::Udp {
            return self.serve_datagrams(incoming, accepted).await;
        }
        let mut upstream = match self.dialer.dial(request.endpoint).await {
            Ok(s) => s,
            Err(e) => {
                let message = format!("dial {}: {e}", request.endpoint);
                debug!(%message, "endpoint unreachable");
                incoming.refuse(RefusalKind::Unreachable, &message).await;
                return Served::Refused(RefusalKind::Unreachable);
            }
        };
        let mut stream = match incoming.accept().await {
            Ok(s) => s,
            Err(refusal) => return Served::Refused(refusal.kind),
        };
        accepted();
        let (ns, name) = (&request.namespace, &request.service);
        if self.limiters.limit(ns, name).is_none() {
            return self.join(&mut stream, &mut upstream).await;
        }
        let (prefix, protocol) = match request.protocol {
            p @ (Protocol::Http1 | Protocol::H2) => (bytes::Bytes::new(), p),
            // The opener's word is not enough to skip per-request limits: look at the bytes.
            Protocol::Tls | Protocol::Opaque | Protocol::Udp => {
                match io::detect(&mut stream, self.timeouts.detect).await {
                    Ok(d) => (d.prefix, d.protocol),
                    Err(e) => {
                        debug!(error = %e, "stream failed before its protocol was known");
                        return Served::Joined(Moved::default());
                    }
                }
            }
        };
        let mut stream = Rewind::new(prefix, stream);
        if protocol.is_http() {
            // The engine keeps its own connections to the endpoint.
            drop(upstream);
            let route = Arc::new(self.route_to(ns, name, &request));
            match crate::http::serve(self.http.clone(), stream, protocol, route, None, shutdown)
                .await
            {
                Ok(()) => debug!("closed"),
                Err(e) => debug!(error = %e, "closed"),
            }
            return Served::Http;
        }
        if let Decision::Limited { .. } = self.limiters.admit(ns, name, Admission::Tcp) {
            debug!("over the Service's limit: stream closed");
            return Served::Limited;
        }
        self.join(&mut stream, &mut upstream).await
    }

    /// A UDP flow: admitted against the Service's limit (one admission per flow), then its
    /// datagrams relayed between the stream and a UDP socket connected to the endpoint until
    /// either side ends or the flow is idle for the join idle timeout.
    async fn serve_datagrams<A: Arrival>(&self, incoming: A, accepted: impl FnOnce()) -> Served {
        let request = incoming.request().clone();
        let (ns, name) = (&request.namespace, &request.service);
        // Refused before it is accepted, so the opener learns at once (and does not try
        // another endpoint: a rate-limited answer ends its search).
        if let Decision::Limited { .. } = self.limiters.admit(ns, name, Admission::Udp) {
            debug!("new UDP flow over the Service's limit: refused");
            incoming
                .refuse(RefusalKind::RateLimited, "over the Service's QPS limit")
                .await;
            return Served::Limited;
        }
        let socket = match self
            .dialer
            .dial_udp(request.endpoint)
            .and_then(tokio::net::UdpSocket::from_std)
        {
            Ok(s) => s,
            Err(e) => {
                let message = format!("udp socket for {}: {e}", request.endpoint);
                incoming.refuse(RefusalKind::Unreachable, &message).await;
                return Served::Refused(RefusalKind::Unreachable);
            }
        };
        let mut stream = match incoming.accept().await {
            Ok(s) => s,
            Err(refusal) => return Served::Refused(refusal.kind),
        };
        accepted();
        let mut source = io::datagram::Connected(&socket);
        let sink = io::datagram::Connected(&socket);
        let idle = Some(self.timeouts.join.idle);
        match io::datagram::pump(&mut stream, &mut source, &sink, idle, |_, _| {}).await {
            Ok(moved) => Served::Datagrams(moved),
            Err(e) => {
                debug!(error = %e, "UDP flow ended with an error");
                Served::Datagrams(Moved::default())
            }
        }
    }

    async fn join<S: io::Duplex>(
        &self,
        stream: &mut S,
        upstream: &mut tokio::net::TcpStream,
    ) -> Served {
        match io::join(stream, upstream, self.timeouts.join, Counters::default()).await {
            Ok(moved) => Served::Joined(moved),
            Err(e) => {
                debug!(error = %e, "stream ended with an error");
                Served::Joined(Moved::default())
            }
        }
    }

    /// A route with the one endpoint the stream was authorised for.
    fn route_to(&self, namespace: &str, name: &str, request: &crate::tunnel::OpenRequest) -> Route {
        let health = HealthRegistry::new(OutlierConfig::default());
        Route {
            service: ServiceRef {
                namespace: Arc::from(namespace),
                name: Arc::from(name),
                port: request.endpoint.port(),
            },
            stats: Arc::new(ServiceStats::new(Arc::from(format!("{namespace}/{name}")))),
            protocol: None,
            hash_header: None,
            endpoints: vec![Endpoint {
                addr: request.endpoint,
                node: self.here.clone(),
                tier: Tier::LOCAL,
                health: health.get(request.endpoint),
            }],
            elsewhere: 0,
            balancer: Arc::new(ServiceBalancer::new(LbPolicy::RoundRobin, None)),
        }
    }
}

/// Counts a stream this side refused, by reason.
pub fn count_refusal(kind: RefusalKind) {
    metrics::counter!(crate::telemetry::name("tunnel_refused_total"), "reason" => kind.as_str())
        .increment(1);
}
