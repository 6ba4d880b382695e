//! UDP Service ports. The `mangle` rules mark datagrams to the service CIDR and a policy route
//! delivers them to this host; here one transparent socket per UDP Service IP:port (following
//! the route table) takes them, and they are grouped into flows.
//!
//! A flow is (client address, Service IP:port). Its first datagram picks an endpoint through
//! the route's balancer ([`Connector::connect_datagrams`]: policies, `ClientIP` affinity,
//! topology tiers, outlier ejection); the flow keeps that endpoint until it is idle
//! (`proxy.udp.idle_timeout`, or the short one of `proxy.udp.one_shot_ports`), so endpoint
//! changes move new flows only. An endpoint on this node gets a connected socket of the flow's
//! own, whose ICMP unreachable ends the flow and counts against the endpoint; one elsewhere
//! gets a tunnel stream (`protocol: udp`) carrying length-prefixed datagrams. Replies leave
//! from the socket bound to the Service IP:port the client sent to, so the client sees them
//! come from where it asked. The table holds at most `proxy.udp.max_flows` flows and
//! evicts the oldest.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use edgehub::balance::{Endpoint, PickContext};
use edgehub::connect::{ConnectError, Connector, DatagramUpstream};
use edgehub::io::datagram::{self, DatagramSink, Direction};
use edgehub::limits::{Decision, Limiters, Protocol as Admission};
use edgehub::routes::{Route, RouteTable};
use edgehub::socket;
use metrics::counter;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, debug_span, warn, Instrument};

use super::UdpConfig;
use queue::{FlowReceiver, FlowSender, Offered};

mod queue;

/// Datagrams of one flow waiting for its upstream; more are dropped (`queue_full`).
const FLOW_QUEUE: usize = 256;

/// Flows that count as a crowd whose end is worth returning memory for (see `crowd_gone`).
const CROWD: usize = 1024;

/// Receive buffer of a Service IP:port's socket: 4 MiB holds ~20 ms of 1,400-byte datagrams at
/// 1 Gbit/s, so a busy CPU delays datagrams instead of dropping them.
const SERVICE_RECEIVE_BUFFER: usize = 4 << 20;

type FlowKey = (SocketAddr, SocketAddr);

struct FlowEntry {
    id: u64,
    tx: FlowSender,
    cancel: CancellationToken,
}

/// The flows, and the reply sockets they share (one per Service IP:port).
#[derive(Default)]
struct Flows {
    next_id: u64,
    /// The most flows held since memory was last handed back.
    peak: usize,
    by_key: HashMap<FlowKey, FlowEntry>,
    /// Flow ids in creation order: the first is the oldest.
    order: BTreeMap<u64, FlowKey>,
}

impl Flows {
    fn remove(&mut self, key: &FlowKey, id: u64) {
        if self.by_key.get(key).is_some_and(|e| e.id == id) {
            self.by_key.remove(key);
        }
        self.order.remove(&id);
    }

    /// Whether most of a crowd of flows has ended since the last time: then the table's room and
    /// the memory their tasks freed are given back (a flood of 20,000 one-shot flows would
    /// otherwise stay in the agent's RSS for good).
    fn crowd_gone(&mut self) -> bool {
        if self.peak < CROWD || self.by_key.len() > self.peak / 4 {
            return false;
        }
        self.peak = self.by_key.len();
        self.by_key.shrink_to_fit();
        true
    }

    /// Ends the oldest flow; its Service label, for the drop counter.
    fn evict_oldest(&mut self) -> bool {
        let Some((id, key)) = self.order.pop_first() else {
            return false;
        };
        if let Some(entry) = self.by_key.remove(&key) {
            debug_assert_eq!(entry.id, id);
            entry.cancel.cancel();
        }
        true
    }
}

/// Counters of one Service's UDP flows.
struct Metrics<'a> {
    service: &'a str,
}

impl<'a> Metrics<'a> {
    fn new(route: &'a Route) -> Metrics<'a> {
        Metrics {
            service: route.stats.label(),
        }
    }

    /// Counts a flow that is being forwarded, and resolves the counters its datagrams add to
    /// (once per flow, not per datagram).
    fn flow(&self) -> FlowCounters {
        let service = self.service.to_string();
        counter!("edgemesh_proxy_udp_flows_total", "service" => service.clone()).increment(1);
        let by = |name: &'static str, direction: &'static str| counter!(name, "service" => service.clone(), "direction" => direction);
        FlowCounters {
            datagrams: [
                by("edgemesh_proxy_udp_datagrams_total", "to_endpoint"),
                by("edgemesh_proxy_udp_datagrams_total", "from_endpoint"),
            ],
            bytes: [
                by("edgemesh_proxy_udp_bytes_total", "to_endpoint"),
                by("edgemesh_proxy_udp_bytes_total", "from_endpoint"),
            ],
        }
    }

    fn drop(&self, reason: &'static str) {
        drop_counted(self.service, reason);
    }
}

/// The datagram and byte counters of one forwarded flow, by direction.
struct FlowCounters {
    datagrams: [metrics::Counter; 2],
    bytes: [metrics::Counter; 2],
}

impl FlowCounters {
    fn datagram(&self, direction: Direction, len: usize) {
        let i = match direction {
            Direction::ToStream => 0,
            Direction::FromStream => 1,
        };
        self.datagrams[i].increment(1);
        self.bytes[i].increment(len as u64);
    }
}

fn drop_counted(service: &str, reason: &'static str) {
    debug!(service, reason, "UDP datagram dropped");
    counter!("edgemesh_proxy_udp_drops_total", "service" => service.to_string(), "reason" => reason)
        .increment(1);
}

pub struct UdpProxy {
    cfg: UdpConfig,
    mark: u32,
    tables: watch::Receiver<Arc<RouteTable>>,
    connector: Arc<Connector>,
    limiters: Arc<Limiters>,
    flows: Mutex<Flows>,
    active: metrics::Gauge,
    tracker: TaskTracker,
}

impl UdpProxy {
    pub fn new(
        cfg: UdpConfig,
        mark: u32,
        tables: watch::Receiver<Arc<RouteTable>>,
        connector: Arc<Connector>,
        limiters: Arc<Limiters>,
    ) -> UdpProxy {
        UdpProxy {
            cfg,
            mark,
            tables,
            connector,
            limiters,
            flows: Mutex::new(Flows::default()),
            active: metrics::gauge!("edgemesh_proxy_udp_flows"),
            tracker: TaskTracker::new(),
        }
    }

    fn flows(&self) -> std::sync::MutexGuard<'_, Flows> {
        self.flows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps one socket on each UDP Service IP:port of the route table until `shutdown`, then
    /// ends every flow.
    pub async fn serve(self, shutdown: CancellationToken) {
        let proxy = Arc::new(self);
        let mut tables = proxy.tables.clone();
        let mut sockets: HashMap<SocketAddr, CancellationToken> = HashMap::new();
        loop {
            let table = tables.borrow_and_update().clone();
            sockets.retain(|addr, stop| {
                let keep = table.lookup_udp(*addr).is_some();
                if !keep {
                    stop.cancel();
                }
                keep
            });
            for (addr, _) in table.udp_routes() {
                if sockets.contains_key(addr) {
                    continue;
                }
                let socket = match socket::transparent_udp(*addr, false, Some(proxy.mark)).and_then(
                    |s| {
                        // Every client of the Service port sends to this one socket.
                        if let Err(e) = socket::set_receive_buffer(&s, SERVICE_RECEIVE_BUFFER) {
                            debug!(%addr, error = %e, "receive buffer left at the default");
                        }
                        UdpSocket::from_std(s)
                    },
                ) {
                    Ok(s) => Arc::new(s),
                    Err(e) => {
                        // Retried at the next table change.
                        warn!(%addr, error = %e, "cannot take UDP on a Service address (CAP_NET_ADMIN missing?)");
                        continue;
                    }
                };
                let stop = shutdown.child_token();
                sockets.insert(*addr, stop.clone());
                proxy
                    .tracker
                    .spawn(proxy.clone().receive(socket, *addr, stop));
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = tables.changed() => if r.is_err() { break },
            }
        }
        let flows: Vec<_> = proxy.flows().by_key.drain().map(|(_, e)| e).collect();
        for flow in flows {
            flow.cancel.cancel();
        }
        proxy.tracker.close();
        proxy.tracker.wait().await;
    }

    /// Reads the datagrams sent to one Service IP:port until `stop`.
    async fn receive(
        self: Arc<Self>,
        socket: Arc<UdpSocket>,
        addr: SocketAddr,
        stop: CancellationToken,
    ) {
        let mut buf = vec![0u8; datagram::MAX_DATAGRAM + 1];
        loop {
            let (n, source) = tokio::select! {
                _ = stop.cancelled() => return,
                r = socket.recv_from(&mut buf) => match r {
                    Ok(r) => r,
                    Err(e) => {
                        // ICMP errors of replies to clients that went away, and the like.
                        debug!(%addr, error = %e, "UDP receive failed");
                        continue;
                    }
                },
            };
            self.datagram(source, addr, &buf[..n], &socket);
        }
    }

    /// Hands one datagram to its flow, starting the flow when it is the first.
    fn datagram(
        self: &Arc<Self>,
        source: SocketAddr,
        dst: SocketAddr,
        payload: &[u8],
        socket: &Arc<UdpSocket>,
    ) {
        let table = self.tables.borrow().clone();
        let Some(route) = table.lookup_udp(dst).cloned() else {
            drop_counted("none", "no_service");
            return;
        };
        if payload.len() > datagram::MAX_DATAGRAM {
            drop_counted(route.stats.label(), "too_large");
            return;
        }
        let key = (source, dst);
        let datagram = Bytes::copy_from_slice(payload);
        let mut flows = self.flows();
        if let Some(entry) = flows.by_key.get(&key) {
            match entry.tx.offer(datagram) {
                Offered::Queued => return,
                Offered::Full => {
                    drop_counted(route.stats.label(), "queue_full");
                    return;
                }
                // The flow just ended: this datagram starts a new one.
                Offered::Ended(d) => {
                    let id = entry.id;
                    flows.remove(&key, id);
                    return self.start_flow(flows, key, route, d, socket.clone());
                }
            }
        }
        self.start_flow(flows, key, route, datagram, socket.clone());
    }

    fn start_flow(
        self: &Arc<Self>,
        mut flows: std::sync::MutexGuard<'_, Flows>,
        key: FlowKey,
        route: Arc<Route>,
        first: Bytes,
        reply: Arc<UdpSocket>,
    ) {
        let (client, dst) = key;
        while flows.by_key.len() >= self.cfg.max_flows {
            if !flows.evict_oldest() {
                break;
            }
            drop_counted(route.stats.label(), "evicted");
        }
        let (tx, rx) = queue::queue(FLOW_QUEUE);
        tx.offer(first);
        let cancel = CancellationToken::new();
        let id = flows.next_id;
        flows.next_id += 1;
        flows.by_key.insert(
            key,
            FlowEntry {
                id,
                tx,
                cancel: cancel.clone(),
            },
        );
        flows.order.insert(id, key);
        flows.peak = flows.peak.max(flows.by_key.len());
        drop(flows);
        let proxy = self.clone();
        let span = debug_span!("udp", %client, service = %route.service);
        self.tracker.spawn(
            async move {
                proxy.active.increment(1.0);
                tokio::select! {
                    () = proxy.run_flow(&route, client, dst, rx, reply) => {}
                    () = cancel.cancelled() => debug!("flow ended (evicted or shutdown)"),
                }
                proxy.active.decrement(1.0);
                let mut flows = proxy.flows();
                flows.remove(&key, id);
                if flows.crowd_gone() {
                    drop(flows);
                    tokio::task::spawn_blocking(edgehub::process::release_free_memory);
                }
            }
            .instrument(span),
        );
    }

    async fn run_flow(
        &self,
        route: &Route,
        client: SocketAddr,
        dst: SocketAddr,
        mut rx: FlowReceiver,
        reply: Arc<UdpSocket>,
    ) {
        let metrics = Metrics::new(route);
        let ctx = PickContext {
            client_ip: client.ip(),
            hash_key: None,
        };
        // Boxed: the flow then waits for its datagrams in a task the size of what it waits with
        // (a flow is mostly idle, and there may be tens of thousands), not of the dial.
        let (upstream, endpoint, _in_flight) =
            match Box::pin(self.connector.connect_datagrams(route, &ctx)).await {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "flow not forwarded");
                    metrics.drop(match e {
                        ConnectError::NoEndpoints { .. } => "no_endpoints",
                        ConnectError::RateLimited { .. } => "rate_limited",
                        ConnectError::AllFailed { .. } => "connect_failed",
                    });
                    return;
                }
            };
        let idle = self.cfg.idle_for(dst.port());
        let sink = Reply {
            socket: reply,
            client,
        };
        match upstream {
            DatagramUpstream::Local(socket) => {
                // The Service's limit is enforced where the endpoint is dialled: here, one
                // admission per new flow.
                let (ns, name) = (&route.service.namespace, &route.service.name);
                if let Decision::Limited { .. } = self.limiters.admit(ns, name, Admission::Udp) {
                    debug!("new flow over the Service's limit: dropped");
                    metrics.drop("rate_limited");
                    return;
                }
                let counters = metrics.flow();
                debug!(endpoint = %endpoint.addr, "flow");
                local_flow(
                    &socket, &endpoint, &mut rx, &sink, idle, &metrics, &counters,
                )
                .await;
            }
            DatagramUpstream::Tunnel(mut stream) => {
                let counters = metrics.flow();
                debug!(endpoint = %endpoint.addr, "flow through a tunnel");
                let seen = |d, n| counters.datagram(d, n);
                if let Err(e) = Box::pin(datagram::pump(
                    &mut stream,
                    &mut rx,
                    &sink,
                    Some(idle),
                    seen,
                ))
                .await
                {
                    debug!(error = %e, "flow ended");
                }
            }
        }
    }
}

/// Where a flow's replies go: to the client, from the Service IP:port it sent to.
struct Reply {
    socket: Arc<UdpSocket>,
    client: SocketAddr,
}

impl DatagramSink for Reply {
    #[allow(clippy::manual_async_fn)] // the trait's signature: the future must be `Send`
    fn send<'a>(&'a self, datagram: &'a [u8]) -> impl Future<Output = io::Result<()>> + Send + 'a {
        async move { self.socket.send_to(datagram, self.client).await.map(drop) }
    }
}

/// A flow to an endpoint on this node: datagrams both ways through a connected socket until
/// the flow is idle for `idle` or the endpoint answers ICMP unreachable (which counts against
/// it, so new flows go elsewhere).
async fn local_flow(
    socket: &UdpSocket,
    endpoint: &Endpoint,
    rx: &mut FlowReceiver,
    reply: &Reply,
    idle: Duration,
    metrics: &Metrics<'_>,
    counters: &FlowCounters,
) {
    let unreachable = |e: &io::Error| e.kind() == io::ErrorKind::ConnectionRefused;
    let mut deadline = tokio::time::Instant::now() + idle;
    loop {
        tokio::select! {
            d = rx.recv() => {
                match socket.send(&d).await {
                    Ok(_) => counters.datagram(Direction::ToStream, d.len()),
                    Err(e) if unreachable(&e) => {
                        endpoint.health.record_failure();
                        metrics.drop("unreachable");
                        return;
                    }
                    Err(e) => {
                        debug!(error = %e, "send to the endpoint failed");
                        metrics.drop("send_failed");
                    }
                }
                deadline = tokio::time::Instant::now() + idle;
            }
            // ICMP unreachable sets only the socket's error (EPOLLERR), not readability; an
            // error ends the flow, so that the next datagram picks anew.
            r = socket.ready(Interest::READABLE | Interest::ERROR) => {
                let Ok(ready) = r else { return };
                if ready.is_error() {
                    match socket.take_error() {
                        Ok(Some(e)) if unreachable(&e) => {
                            debug!(endpoint = %endpoint.addr, "ICMP unreachable");
                            endpoint.health.record_failure();
                            metrics.drop("unreachable");
                        }
                        other => debug!(?other, "upstream socket error"),
                    }
                    return;
                }
                match datagram::try_recv(socket) {
                    Ok(d) => {
                        endpoint.health.record_success();
                        counters.datagram(Direction::FromStream, d.len());
                        if let Err(e) = reply.send(&d).await {
                            debug!(error = %e, "reply to the client failed");
                            metrics.drop("reply_failed");
                        }
                        deadline = tokio::time::Instant::now() + idle;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if unreachable(&e) => {
                        debug!(endpoint = %endpoint.addr, "ICMP unreachable");
                        endpoint.health.record_failure();
                        metrics.drop("unreachable");
                        return;
                    }
                    Err(e) => {
                        debug!(error = %e, "receive from the endpoint failed");
                        return;
                    }
                }
            }
            () = tokio::time::sleep_until(deadline) => return,
        }
    }
}

/// The flows of the table, for tests and the admin API.
impl UdpProxy {
    #[cfg(test)]
    fn flow_count(&self) -> usize {
        self.flows().by_key.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_flow_is_evicted_first() {
        let mut flows = Flows::default();
        let mut cancels = Vec::new();
        for i in 0..3u16 {
            let key: FlowKey = (
                SocketAddr::from(([10, 0, 0, 1], 1000 + i)),
                "10.96.0.10:53".parse().expect("a"),
            );
            let (tx, _rx) = queue::queue(1);
            let cancel = CancellationToken::new();
            cancels.push(cancel.clone());
            flows.by_key.insert(
                key,
                FlowEntry {
                    id: u64::from(i),
                    tx,
                    cancel,
                },
            );
            flows.order.insert(u64::from(i), key);
        }
        assert!(flows.evict_oldest());
        assert!(cancels[0].is_cancelled() && !cancels[1].is_cancelled());
        assert_eq!(flows.by_key.len(), 2);
        // A flow that ended removes itself; a newer flow under the same key is kept.
        let key1 = *flows.order.get(&1).expect("flow 1");
        flows.remove(&key1, 99);
        assert!(flows.by_key.contains_key(&key1), "another flow's id");
        flows.remove(&key1, 1);
        assert_eq!(flows.by_key.len(), 1);
    }

    #[test]
    fn memory_is_handed_back_once_when_a_crowd_of_flows_has_gone() {
        let mut flows = Flows::default();
        let dst: SocketAddr = "10.96.0.10:53".parse().expect("a");
        for i in 0..2000u32 {
            let key = (
                SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 1000)),
                dst,
            );
            let (tx, _rx) = queue::queue(1);
            let entry = FlowEntry {
                id: u64::from(i),
                tx,
                cancel: CancellationToken::new(),
            };
            flows.by_key.insert(key, entry);
            flows.order.insert(u64::from(i), key);
            flows.peak = flows.peak.max(flows.by_key.len());
        }
        let mut handed_back = 0;
        for i in 0..2000u32 {
            let key = (
                SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 1000)),
                dst,
            );
            flows.remove(&key, u64::from(i));
            handed_back += usize::from(flows.crowd_gone());
        }
        // Once, at a quarter of the crowd; the rest were too few to count as a crowd again.
        assert_eq!(handed_back, 1);
        assert!(flows.by_key.is_empty());
    }

    #[tokio::test]
    async fn datagrams_reach_a_local_endpoint_and_answers_come_back() {
        use edgehub::balance::{HealthRegistry, OutlierConfig, ServiceBalancer, Tier};
        use edgehub::connect::Dialer;
        use edgehub::model::LbPolicy;
        use edgehub::routes::stats::ServiceStats;
        use edgehub::routes::ServiceRef;
        // The endpoint: answers each datagram with it reversed.
        let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let server_addr = server.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = vec![0u8; 70_000];
            while let Ok((n, from)) = server.recv_from(&mut buf).await {
                let mut d = buf[..n].to_vec();
                d.reverse();
                let _ = server.send_to(&d, from).await;
            }
        });
        let health = HealthRegistry::new(OutlierConfig::default());
        let route = Route {
            service: ServiceRef {
                namespace: Arc::from("default"),
                name: Arc::from("dns"),
                port: 53,
            },
            stats: Arc::new(ServiceStats::new(Arc::from("default/dns"))),
            protocol: None,
            hash_header: None,
            endpoints: vec![Endpoint {
                addr: server_addr,
                node: Some(Arc::from("here")),
                tier: Tier::LOCAL,
                health: health.get(server_addr),
            }],
            elsewhere: 0,
            balancer: Arc::new(ServiceBalancer::new(LbPolicy::RoundRobin, None)),
        };
        let dialer = Arc::new(Dialer::new(None, Duration::from_secs(1)));
        let connector = Connector::new(dialer, 1, Some("here"), None);
        let (_tx, tables) = watch::channel(Arc::new(RouteTable::default()));
        let proxy = UdpProxy::new(
            UdpConfig::default(),
            1,
            tables,
            Arc::new(connector),
            Arc::new(Limiters::default()),
        );
        // The client, and the reply socket (plain here: no TPROXY without CAP_NET_ADMIN).
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let reply = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        let (tx, rx) = queue::queue(8);
        for d in [&b"a"[..], &[7u8; 1400][..], &[9u8; 65_000][..]] {
            assert_eq!(tx.offer(Bytes::copy_from_slice(d)), Offered::Queued);
        }
        let client_addr = client.local_addr().expect("addr");
        let dst: SocketAddr = "10.96.0.10:53".parse().expect("a");
        let flow = proxy.run_flow(&route, client_addr, dst, rx, reply);
        let check = async {
            let mut buf = vec![0u8; 70_000];
            let mut sizes = Vec::new();
            for _ in 0..3 {
                let n = client.recv(&mut buf).await.expect("answer");
                sizes.push(n);
            }
            sizes.sort();
            assert_eq!(
                sizes,
                vec![1, 1400, 65_000],
                "whole datagrams, each on its own"
            );
        };
        tokio::select! {
            () = flow => panic!("flow ended early"),
            () = check => {}
        }
        assert_eq!(proxy.flow_count(), 0);
    }
}
