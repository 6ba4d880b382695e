//! The transparent proxy (SPEC §4): accepts what iptables redirects to `proxy.port`, finds the
//! Service port the client meant from the original destination, picks an endpoint and forwards.
//! This module is only the listener and its admission (connection cap, keepalive, drain); every
//! layer below it is the data-plane core in `edgehub`, shared with cloudcore:
//! - [`edgehub::socket`]: the original destination and socket marks;
//! - [`edgehub::routes`]: cluster IP and port → Service port and endpoints, following the view;
//! - [`edgehub::io::detect`]: what the connection carries (HTTP/2, HTTP/1, TLS, other), from
//!   one bounded read of its first bytes, replayed by [`edgehub::io::Rewind`];
//! - [`edgehub::http`]: HTTP/1 and HTTP/2, balanced and limited per request;
//! - [`edgehub::connect`]: picking ([`edgehub::balance`]) and dialling an endpoint, or opening a
//!   tunnel stream to it, falling over to another when one fails;
//! - [`edgehub::io::join`]: moving bytes (opaque TCP, TLS);
//! - [`udp`]: UDP Service ports (a mangle mark and a policy route deliver them to one
//!   transparent socket per Service IP:port), flows of datagrams.

mod config;
mod udp;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use edgehub::view::MeshView;
use metrics::counter;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, debug_span, info, warn, Instrument};

pub use config::{ProxyConfig, UdpConfig};
use edgehub::balance::HealthRegistry;
use edgehub::connect::{self, Connector, Dialer, Opener, Upstream};
use edgehub::http;
use edgehub::io::{self, Detected, Protocol, Rewind};
use edgehub::limits::{Decision, Limiters, Protocol as LimitProtocol};
use edgehub::routes::{self, Index, LocalNode, Route, RouteTable};
use edgehub::socket;

/// Silence after which an accepted connection's peer is probed (TCP keepalive).
const KEEPALIVE_IDLE_SECS: u32 = 60;

/// How long open connections may go on after shutdown begins before they are cut.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Distinct server names recorded in `edgemesh_proxy_tls_connections_total`; later ones are
/// counted as `other`, so clients cannot grow `/metrics` without bound.
const MAX_SNI_LABELS: usize = 256;

/// The listener's shared state.
pub struct Proxy {
    cfg: ProxyConfig,
    tables: watch::Receiver<Arc<RouteTable>>,
    connector: Arc<Connector>,
    limiters: Arc<Limiters>,
    http: Arc<http::Http>,
    connections: Arc<Semaphore>,
    active: metrics::Gauge,
    unmatched: metrics::Counter,
    warn_limit: WarnThrottle,
    warn_failed: WarnThrottle,
    sni_labels: Mutex<HashSet<String>>,
}

/// At most one warning a second for events that can happen thousands of times a second (a
/// client retrying against a dead Service): the ones in between are only counted, and the
/// count goes with the next warning. Metrics count every event.
struct WarnThrottle {
    start: std::time::Instant,
    /// Milliseconds after `start` before which nothing is logged.
    quiet_until: AtomicU64,
    suppressed: AtomicU64,
}

impl WarnThrottle {
    fn new() -> WarnThrottle {
        WarnThrottle {
            start: std::time::Instant::now(),
            quiet_until: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(events suppressed since the last warning)` when this one may be logged.
    fn allow(&self) -> Option<u64> {
        let now = self.start.elapsed().as_millis() as u64;
        let quiet_until = self.quiet_until.load(Ordering::Relaxed);
        if now < quiet_until
            || self
                .quiet_until
                .compare_exchange(
                    quiet_until,
                    now + 1000,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

impl Proxy {
    pub fn new(
        cfg: ProxyConfig,
        tables: watch::Receiver<Arc<RouteTable>>,
        connector: Arc<Connector>,
        limiters: Arc<Limiters>,
    ) -> Proxy {
        let http = Arc::new(http::Http::new(
            cfg.http.clone(),
            io::Timeouts {
                idle: cfg.idle_timeout,
                half_closed: cfg.half_close_timeout,
            },
            connector.clone(),
            limiters.clone(),
        ));
        Proxy {
            connector,
            limiters,
            http,
            connections: Arc::new(Semaphore::new(cfg.max_connections)),
            active: metrics::gauge!("edgemesh_proxy_active_connections"),
            unmatched: counter!("edgemesh_proxy_unmatched_connections_total"),
            warn_limit: WarnThrottle::new(),
            warn_failed: WarnThrottle::new(),
            sni_labels: Mutex::new(HashSet::new()),
            cfg,
            tables,
        }
    }

    /// Accepts until `shutdown`, then gives open connections [`DRAIN_GRACE`] to finish (HTTP
    /// connections are closed after the response in progress).
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        let proxy = Arc::new(self);
        let tracker = TaskTracker::new();
        // Not in `tracker`: it counts client connections, and the sweeper is none.
        let sweeper = tokio::spawn(proxy.http.clone().sweep_pool(shutdown.clone()));
        while let Some((stream, peer)) =
            edgehub::accept::next_connection(&listener, "proxy", &shutdown).await
        {
            let proxy = proxy.clone();
            let shutdown = shutdown.clone();
            tracker.spawn(async move { proxy.handle(stream, peer, shutdown).await });
        }
        drop(listener);
        tracker.close();
        let open = tracker.len();
        if open > 0 {
            info!(open, "waiting for proxied connections to finish");
        }
        if tokio::time::timeout(DRAIN_GRACE, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                open = tracker.len(),
                "closing proxied connections still open"
            );
        }
        let _ = sweeper.await;
    }

    async fn handle(
        self: Arc<Self>,
        client: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) {
        let dst = match socket::original_destination(&client) {
            Some(dst) => dst,
            None => match client.local_addr() {
                Ok(local) => local,
                Err(_) => return,
            },
        };
        let table = self.tables.borrow().clone();
        let Some(route) = table.lookup(dst).cloned() else {
            // Never guess: a destination that is no Service is refused, not sent elsewhere.
            self.unmatched.increment(1);
            debug!(%peer, %dst, "no Service at this destination; resetting");
            reset(client);
            return;
        };
        let Ok(_permit) = self.connections.clone().try_acquire_owned() else {
            counter!("edgemesh_proxy_refused_connections_total", "reason" => "max_connections")
                .increment(1);
            if let Some(suppressed) = self.warn_limit.allow() {
                warn!(%peer, %dst, limit = self.cfg.max_connections, suppressed, "too many proxied connections; resetting");
            }
            reset(client);
            return;
        };
        // A debug span: at the default level it costs nothing per connection, and with
        // `RUST_LOG=edgemesh::proxy=debug` every line of a connection carries its peer and
        // Service. Warnings inside it still name the Service themselves.
        let span = debug_span!("conn", %peer, service = %route.service);
        async move {
            let _ = client.set_nodelay(true);
            self.active.increment(1.0);
            self.session(client, peer, route, &shutdown).await;
            self.active.decrement(1.0);
        }
        .instrument(span)
        .await
    }

    /// Finds out what the connection carries (unless the Service says), then serves it as
    /// HTTP or forwards it as bytes.
    async fn session(
        self: &Arc<Self>,
        mut client: TcpStream,
        peer: SocketAddr,
        route: Arc<Route>,
        shutdown: &CancellationToken,
    ) {
        let forced = route
            .protocol
            .as_deref()
            .and_then(Protocol::from_annotation);
        let detected = match forced {
            Some(protocol) => Detected {
                protocol,
                sni: None,
                prefix: Bytes::new(),
            },
            None => match io::detect(&mut client, self.cfg.detect_timeout).await {
                Ok(d) => d,
                Err(e) => {
                    debug!(error = %e, "connection failed before its protocol was known");
                    return;
                }
            },
        };
        if forced.is_none() {
            route.stats.get().detected(detected.protocol).increment(1);
        }
        debug!(
            protocol = detected.protocol.as_str(),
            sni = detected.sni.as_deref(),
            annotated = forced.is_some(),
            "protocol"
        );
        match detected.protocol {
            Protocol::Http1 | Protocol::H2 => {
                // Counted as forwarded once: its requests are counted one by one in
                // `edgemesh_proxy_http_requests_total`.
                route.stats.get().forwarded.increment(1);
                let io = Rewind::new(detected.prefix, client);
                let served = http::serve(
                    self.http.clone(),
                    io,
                    detected.protocol,
                    route,
                    Some(peer),
                    shutdown,
                )
                .await;
                match served {
                    Ok(()) => debug!("closed"),
                    Err(e) => debug!(error = %e, "closed"),
                }
            }
            Protocol::Tls => {
                self.count_tls(&route, detected.sni.as_deref());
                tcp_session(self, client, peer, &route, detected.prefix).await;
            }
            Protocol::Opaque | Protocol::Udp => {
                tcp_session(self, client, peer, &route, detected.prefix).await
            }
        }
    }

    /// Counts a TLS connection under its server name, within [`MAX_SNI_LABELS`] names.
    fn count_tls(&self, route: &Route, sni: Option<&str>) {
        let label = match sni {
            None => "none".to_string(),
            Some(name) => {
                let mut seen = self.sni_labels.lock().unwrap_or_else(|p| p.into_inner());
                if seen.contains(name) {
                    name.to_string()
                } else if seen.len() < MAX_SNI_LABELS {
                    seen.insert(name.to_string());
                    name.to_string()
                } else {
                    "other".to_string()
                }
            }
        };
        counter!("edgemesh_proxy_tls_connections_total", "service" => route.stats.label().to_string(), "sni" => label)
            .increment(1);
    }
}

/// Forwards a connection as bytes to one endpoint (picked per connection), `prefix` (the
/// bytes read to detect the protocol) first.
async fn tcp_session(
    proxy: &Proxy,
    client: TcpStream,
    peer: SocketAddr,
    route: &Route,
    prefix: Bytes,
) {
    let stats = route.stats.get();
    let (upstream, endpoint, _in_flight) = match proxy.connector.connect(route, peer.ip()).await {
        Ok(c) => c,
        Err(e @ connect::ConnectError::NoEndpoints { .. }) => {
            // Counted; not logged one by one, so a client looping on an empty Service cannot
            // flood the log.
            debug!(error = %e, "connection not forwarded");
            stats.no_endpoints.increment(1);
            reset(client);
            return;
        }
        Err(e @ connect::ConnectError::RateLimited { .. }) => {
            debug!(error = %e, "connection not forwarded");
            reset(client);
            return;
        }
        Err(e) => {
            if let Some(suppressed) = proxy.warn_failed.allow() {
                warn!(error = %e, suppressed, "connection not forwarded");
            }
            stats.connect_failed.increment(1);
            reset(client);
            return;
        }
    };
    stats.forwarded.increment(1);
    debug!(%endpoint, "forwarding");
    // The Service's limit is enforced where the endpoint is dialled: here for this node's
    // endpoints, per connection (HTTP never comes this way: it is limited per request).
    if let Upstream::Local(_) = upstream {
        let (ns, name) = (&route.service.namespace, &route.service.name);
        if let Decision::Limited { .. } = proxy.limiters.admit(ns, name, LimitProtocol::Tcp) {
            debug!(%endpoint, "over the Service's limit: closed");
            return;
        }
    }
    let timeouts = io::Timeouts {
        idle: proxy.cfg.idle_timeout,
        half_closed: proxy.cfg.half_close_timeout,
    };
    let counters = io::Counters {
        a_to_b: Some(&stats.bytes_sent),
        b_to_a: Some(&stats.bytes_received),
    };
    // The bytes read to detect the protocol go first; an aborted stream reaches the client as
    // a reset, like a direct one.
    let mut client = Rewind::new(prefix, client);
    let mut upstream = upstream;
    match io::join(&mut client, &mut upstream, timeouts, counters).await {
        Ok(moved) => debug!(%endpoint, sent = moved.a_to_b, received = moved.b_to_a, "closed"),
        Err(e) => debug!(%endpoint, error = %e, "aborted"),
    }
}

/// Closes with a RST, so the client fails at once instead of seeing a clean, empty stream.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// A running proxy: its route table (for the admin API) and its tasks.
pub struct RunningProxy {
    pub tables: watch::Receiver<Arc<RouteTable>>,
    pub health: Arc<HealthRegistry>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningProxy {
    /// Waits for the tasks to finish after `shutdown` (connections drained).
    pub async fn join(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// What the proxy shares with the rest of the agent.
pub struct ProxyDeps {
    pub dialer: Arc<Dialer>,
    /// Streams to endpoints on other nodes and in the cloud.
    pub opener: Option<Arc<dyn Opener>>,
    pub limiters: Arc<Limiters>,
}

/// Starts the route table and the listener. The table for the current view is complete before
/// this returns, so that once the agent sends traffic here (iptables), connections right after
/// a restart are not reset as matching no Service.
pub async fn start(
    cfg: &ProxyConfig,
    node: LocalNode,
    views: watch::Receiver<Arc<MeshView>>,
    deps: ProxyDeps,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningProxy> {
    let listener = bind(cfg).await?;
    let health = Arc::new(HealthRegistry::new(cfg.outlier.clone()));
    let mut views = views;
    let first = {
        views.borrow_and_update();
        RouteTable::build(
            &views,
            &node,
            &health,
            &RouteTable::default(),
            Index::ClusterIp,
        )
    };
    metrics::gauge!("edgemesh_proxy_routes").set(first.len() as f64);
    let (table_tx, tables) = watch::channel(Arc::new(first));
    let connector = Connector::new(
        deps.dialer,
        cfg.connect_attempts,
        Some(&node.name),
        deps.opener,
    );
    let mut tasks = vec![tokio::spawn(routes::follow_view(
        views,
        node,
        health.clone(),
        table_tx,
        Index::ClusterIp,
        shutdown.clone(),
    ))];
    let connector = Arc::new(connector);
    let udp = udp::UdpProxy::new(
        cfg.udp.clone(),
        cfg.mark,
        tables.clone(),
        connector.clone(),
        deps.limiters.clone(),
    )
    .map_err(|e| anyhow::anyhow!("UDP flow poller: {e}"))?;
    tasks.push(tokio::spawn(udp.serve(shutdown.clone())));
    let proxy = Proxy::new(cfg.clone(), tables.clone(), connector, deps.limiters);
    tasks.push(tokio::spawn(proxy.serve(listener, shutdown)));
    info!(listen = %SocketAddr::new(cfg.listen_address, cfg.port), "proxy listening");
    Ok(RunningProxy {
        tables,
        health,
        tasks,
    })
}

/// Binds the proxy listener; the error names the key.
pub async fn bind(cfg: &ProxyConfig) -> anyhow::Result<TcpListener> {
    let addr = SocketAddr::new(cfg.listen_address, cfg.port);
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket::set_keepalive(&socket, KEEPALIVE_IDLE_SECS)?;
    socket
        .bind(addr)
        .map_err(|e| anyhow::anyhow!("config key `proxy.port`: cannot listen on {addr}: {e}"))?;
    Ok(socket.listen(4096)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_are_throttled_and_counted() {
        let t = WarnThrottle::new();
        assert_eq!(t.allow(), Some(0));
        for _ in 0..5 {
            assert_eq!(t.allow(), None);
        }
        t.quiet_until.store(0, Ordering::Relaxed);
        assert_eq!(t.allow(), Some(5));
    }
}
