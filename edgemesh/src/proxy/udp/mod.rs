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

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use edgehub::balance::PickContext;
use edgehub::connect::{ConnectError, Connector, DatagramUpstream};
use edgehub::io::datagram::{self, DatagramSink};
use edgehub::limits::{Decision, Limiters, Protocol as Admission};
use edgehub::routes::{Route, RouteTable};
use edgehub::socket;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, debug_span, warn, Instrument};

use super::UdpConfig;
use counters::drop_counted;
use local::{Answers, Clock, FlowParts, LocalFlow, Registry, Sent, Upstreams};
use queue::{FlowReceiver, Offered};
use table::{FlowKey, Flows, Forward};

mod counters;
mod local;
mod queue;
mod table;

/// Datagrams of one flow waiting for its task (while its endpoint is picked, or for a tunnel
/// stream); more are dropped (`queue_full`).
const FLOW_QUEUE: usize = 256;

/// Receive buffer of a Service IP:port's socket: 4 MiB holds ~20 ms of 1,400-byte datagrams at
/// 1 Gbit/s, so a busy CPU delays datagrams instead of dropping them. Its send buffer, for the
/// answers of every flow of the port sent without waiting, likewise.
const SERVICE_SOCKET_BUFFER: usize = 4 << 20;

pub struct UdpProxy {
    cfg: UdpConfig,
    mark: u32,
    tables: watch::Receiver<Arc<RouteTable>>,
    connector: Arc<Connector>,
    limiters: Arc<Limiters>,
    flows: Mutex<Flows>,
    clock: Clock,
    /// Taken by `serve`, which runs it.
    upstreams: Option<Upstreams>,
    registry: Registry,
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
    ) -> io::Result<UdpProxy> {
        let (upstreams, registry) = Upstreams::new()?;
        Ok(UdpProxy {
            cfg,
            mark,
            tables,
            connector,
            limiters,
            flows: Mutex::new(Flows::default()),
            clock: Clock::new(),
            upstreams: Some(upstreams),
            registry,
            active: metrics::gauge!("edgemesh_proxy_udp_flows"),
            tracker: TaskTracker::new(),
        })
    }

    fn flows(&self) -> MutexGuard<'_, Flows> {
        self.flows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Updates the flow gauge after the table changed, and hands memory back when a crowd of
    /// flows has gone.
    fn table_changed(&self, mut flows: MutexGuard<'_, Flows>) {
        self.active.set(flows.len() as f64);
        if flows.crowd_gone() {
            drop(flows);
            tokio::task::spawn_blocking(edgehub::process::release_free_memory);
        }
    }

    fn end_flow(&self, key: &FlowKey, id: u64) {
        let mut flows = self.flows();
        flows.remove(key, id);
        self.table_changed(flows);
    }

    /// How often idle socket flows are looked for: a flow ends between its idle timeout and
    /// that plus this.
    fn expiry_tick(&self) -> Duration {
        let shortest = self.cfg.idle_timeout.min(self.cfg.one_shot_idle_timeout);
        (shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    /// Keeps one socket on each UDP Service IP:port of the route table until `shutdown`, then
    /// ends every flow.
    pub async fn serve(mut self, shutdown: CancellationToken) {
        let upstreams = self.upstreams.take();
        let proxy = Arc::new(self);
        if let Some(upstreams) = upstreams {
            proxy
                .tracker
                .spawn(proxy.clone().answers(upstreams, shutdown.clone()));
        }
        let mut tables = proxy.tables.clone();
        let mut sockets: HashMap<SocketAddr, CancellationToken> = HashMap::new();
        loop {
            let table = tables.borrow_and_update().clone();
            sockets.retain(|addr, stop| {
                let keep = table.has_udp(*addr);
                if !keep {
                    stop.cancel();
                }
                keep
            });
            for addr in table.udp_addrs() {
                if sockets.contains_key(&addr) {
                    continue;
                }
                let socket = match socket::transparent_udp(addr, false, Some(proxy.mark)).and_then(
                    |s| {
                        // Every client of the Service port sends to this one socket, and every
                        // answer to them leaves from it.
                        if let Err(e) = socket::set_receive_buffer(&s, SERVICE_SOCKET_BUFFER)
                            .and_then(|()| socket::set_send_buffer(&s, SERVICE_SOCKET_BUFFER))
                        {
                            debug!(%addr, error = %e, "socket buffers left at the default");
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
                sockets.insert(addr, stop.clone());
                proxy
                    .tracker
                    .spawn(proxy.clone().receive(socket, addr, stop));
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = tables.changed() => if r.is_err() { break },
            }
        }
        proxy.flows().clear();
        proxy.active.set(0.0);
        proxy.tracker.close();
        proxy.tracker.wait().await;
    }

    /// Forwards the endpoints' answers of every socket flow, and ends the idle ones, until
    /// `stop`.
    async fn answers(self: Arc<Self>, upstreams: Upstreams, stop: CancellationToken) {
        let mut buf = vec![0u8; datagram::MAX_DATAGRAM + 1];
        let ready = |id: u64, error: bool| {
            let Some((key, flow)) = self.flows().socket_flow(id) else {
                return Answers::Drained; // ended while its answer was on the way
            };
            let answers = if error && flow.error() {
                Answers::Ended
            } else {
                flow.answers(&mut buf)
            };
            if answers == Answers::Ended {
                self.end_flow(&key, id);
            }
            answers
        };
        let mut tick = tokio::time::interval(self.expiry_tick());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let poller = upstreams.run(ready);
        tokio::pin!(poller);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = &mut poller => {
                    // Only a failing epoll set gets here; flows to local endpoints then get
                    // no answers, which the log must say.
                    if let Err(e) = r {
                        warn!(error = %e, "UDP flow poller failed: local flows get no answers");
                    }
                    return;
                }
                _ = tick.tick() => {
                    let mut flows = self.flows();
                    if flows.expire(self.clock.now()) > 0 {
                        self.table_changed(flows);
                    }
                }
            }
        }
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

    /// Hands one datagram to its flow, starting the flow when it is the first. A datagram of a
    /// flow that exists goes to it without looking at the route table.
    fn datagram(
        self: &Arc<Self>,
        source: SocketAddr,
        dst: SocketAddr,
        payload: &[u8],
        socket: &Arc<UdpSocket>,
    ) {
        let key = (source, dst);
        let mut flows = self.flows();
        let ended = match flows.get(&key) {
            None => None,
            Some(entry) => match &entry.forward {
                Forward::Socket(flow) => {
                    let (flow, id) = (flow.clone(), entry.id);
                    drop(flows);
                    if flow.send(payload) == Sent::Unreachable {
                        self.end_flow(&key, id);
                    }
                    return;
                }
                Forward::Task { tx, .. } => match tx.offer(Bytes::copy_from_slice(payload)) {
                    Offered::Queued => return,
                    Offered::Full => {
                        drop(flows);
                        let table = self.tables.borrow().clone();
                        let label = table.lookup_udp(dst).map_or("none", |r| r.stats.label());
                        drop_counted(label, "queue_full");
                        return;
                    }
                    // The flow's task just ended: this datagram starts a new one.
                    Offered::Ended(d) => {
                        let id = entry.id;
                        flows.remove(&key, id);
                        Some(d)
                    }
                },
            },
        };
        let table = self.tables.borrow().clone();
        let Some(route) = table.lookup_udp(dst).cloned() else {
            drop_counted("none", "no_service");
            return;
        };
        if payload.len() > datagram::MAX_DATAGRAM {
            drop_counted(route.stats.label(), "too_large");
            return;
        }
        let first = ended.unwrap_or_else(|| Bytes::copy_from_slice(payload));
        self.start_flow(flows, key, route, first, socket.clone());
    }

    fn start_flow(
        self: &Arc<Self>,
        mut flows: MutexGuard<'_, Flows>,
        key: FlowKey,
        route: Arc<Route>,
        first: Bytes,
        reply: Arc<UdpSocket>,
    ) {
        let (client, _) = key;
        while flows.len() >= self.cfg.max_flows {
            if !flows.evict_oldest() {
                break;
            }
            drop_counted(route.stats.label(), "evicted");
        }
        let (tx, rx) = queue::queue(FLOW_QUEUE);
        tx.offer(first);
        let cancel = CancellationToken::new();
        let id = flows.insert(
            key,
            Forward::Task {
                tx,
                cancel: cancel.clone(),
            },
        );
        self.table_changed(flows);
        let proxy = self.clone();
        let span = debug_span!("udp", %client, service = %route.service);
        self.tracker.spawn(
            async move {
                let handed_over = tokio::select! {
                    handed_over = proxy.run_flow(&route, key, id, rx, reply) => handed_over,
                    () = cancel.cancelled() => {
                        debug!("flow ended (evicted or shutdown)");
                        false
                    }
                };
                if !handed_over {
                    proxy.end_flow(&key, id);
                }
            }
            .instrument(span),
        );
    }

    /// Picks the flow's endpoint and forwards it: a flow to an endpoint on this node is handed
    /// to the poller ([`UdpProxy::hand_to_poller`]) and its task ends (true); one through a tunnel
    /// stream is pumped here until it ends (false, like a flow that could not start).
    async fn run_flow(
        &self,
        route: &Arc<Route>,
        key: FlowKey,
        id: u64,
        rx: FlowReceiver,
        reply: Arc<UdpSocket>,
    ) -> bool {
        let (client, dst) = key;
        let label = route.stats.label();
        let ctx = PickContext {
            client_ip: client.ip(),
            hash_key: None,
        };
        let (upstream, endpoint, in_flight) =
            match self.connector.connect_datagrams(route, &ctx).await {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "flow not forwarded");
                    drop_counted(
                        label,
                        match e {
                            ConnectError::NoEndpoints { .. } => "no_endpoints",
                            ConnectError::RateLimited { .. } => "rate_limited",
                            ConnectError::AllFailed { .. } => "connect_failed",
                        },
                    );
                    return false;
                }
            };
        let idle = self.cfg.idle_for(dst.port());
        match upstream {
            DatagramUpstream::Local(socket) => {
                // The Service's limit is enforced where the endpoint is dialled: here, one
                // admission per new flow.
                let (ns, name) = (&route.service.namespace, &route.service.name);
                if let Decision::Limited { .. } = self.limiters.admit(ns, name, Admission::Udp) {
                    debug!("new flow over the Service's limit: dropped");
                    drop_counted(label, "rate_limited");
                    return false;
                }
                route.stats.udp().flow();
                debug!(endpoint = %endpoint.addr, "flow");
                let flow = LocalFlow::new(
                    socket,
                    FlowParts {
                        client,
                        reply,
                        endpoint,
                        in_flight,
                        stats: route.stats.clone(),
                        clock: self.clock,
                        idle,
                    },
                );
                self.hand_to_poller(key, id, flow, rx)
            }
            DatagramUpstream::Tunnel(mut stream) => {
                let counters = route.stats.udp();
                counters.flow();
                debug!(endpoint = %endpoint.addr, "flow through a tunnel");
                let sink = Reply {
                    socket: reply,
                    client,
                };
                let mut rx = rx;
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
                drop(in_flight);
                false
            }
        }
    }

    /// Hands flow `id` to the poller: from now on its datagrams go straight to `flow`'s socket;
    /// those that waited in the task's queue go first. The flow ends here if its socket cannot
    /// join the poller, or its endpoint is unreachable. Whether the flow went to the poller
    /// (then its entry is the poller's to end).
    fn hand_to_poller(
        &self,
        key: FlowKey,
        id: u64,
        mut flow: LocalFlow,
        mut rx: FlowReceiver,
    ) -> bool {
        // Under the table's lock, so that no datagram overtakes the queued ones and the poller
        // finds the flow when its first answer comes.
        let mut flows = self.flows();
        if !flows.holds(&key, id) {
            return false; // evicted while its endpoint was picked
        }
        if let Err(e) = self.registry.add(&mut flow, id) {
            warn!(error = %e, "cannot poll a UDP flow's socket");
            drop(flows);
            drop_counted(flow.service(), "send_failed");
            return false;
        }
        let flow = Arc::new(flow);
        let deadline = flow.idle_deadline();
        // The task's queue sender goes with the forward it replaces: nothing more is queued.
        let _task = flows.hand_to_socket(&key, id, flow.clone(), deadline);
        for d in rx.drain() {
            if flow.send(&d) == Sent::Unreachable {
                flows.remove(&key, id);
                break;
            }
        }
        self.table_changed(flows);
        debug!(endpoint = %flow.endpoint(), "flow handed to the poller");
        true
    }
}

/// Where a tunnel flow's replies go: to the client, from the Service IP:port it sent to.
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

/// The flows of the table, for tests.
impl UdpProxy {
    #[cfg(test)]
    fn flow_count(&self) -> usize {
        self.flows().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgehub::balance::{Endpoint, HealthRegistry, OutlierConfig, ServiceBalancer, Tier};
    use edgehub::connect::Dialer;
    use edgehub::model::LbPolicy;
    use edgehub::routes::stats::ServiceStats;
    use edgehub::routes::ServiceRef;

    /// An endpoint that answers each datagram with it reversed.
    async fn reversing_endpoint() -> SocketAddr {
        let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = server.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = vec![0u8; 70_000];
            while let Ok((n, from)) = server.recv_from(&mut buf).await {
                let mut d = buf[..n].to_vec();
                d.reverse();
                let _ = server.send_to(&d, from).await;
            }
        });
        addr
    }

    fn route_to(endpoint: SocketAddr) -> Arc<Route> {
        let health = HealthRegistry::new(OutlierConfig::default());
        Arc::new(Route {
            service: ServiceRef {
                namespace: Arc::from("default"),
                name: Arc::from("dns"),
                port: 53,
            },
            stats: Arc::new(ServiceStats::new(Arc::from("default/dns"))),
            protocol: None,
            hash_header: None,
            endpoints: vec![Endpoint {
                addr: endpoint,
                node: Some(Arc::from("here")),
                tier: Tier::LOCAL,
                health: health.get(endpoint),
            }],
            elsewhere: 0,
            balancer: Arc::new(ServiceBalancer::new(LbPolicy::RoundRobin, None)),
        })
    }

    fn proxy(cfg: UdpConfig) -> UdpProxy {
        let dialer = Arc::new(Dialer::new(None, Duration::from_secs(1)));
        let connector = Connector::new(dialer, 1, Some("here"), None);
        let (_tx, tables) = watch::channel(Arc::new(RouteTable::default()));
        UdpProxy::new(
            cfg,
            1,
            tables,
            Arc::new(connector),
            Arc::new(Limiters::default()),
        )
        .expect("poller")
    }

    async fn no_flows_within_5s(proxy: &UdpProxy, what: &str) {
        let ended = async {
            while proxy.flow_count() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .expect(what);
    }

    #[tokio::test]
    async fn a_local_flow_is_served_by_the_poller_and_expires_when_idle() {
        let route = route_to(reversing_endpoint().await);
        let mut proxy = proxy(UdpConfig {
            idle_timeout: Duration::from_millis(300),
            ..UdpConfig::default()
        });
        let upstreams = proxy.upstreams.take().expect("poller");
        let proxy = Arc::new(proxy);
        let stop = CancellationToken::new();
        tokio::spawn(proxy.clone().answers(upstreams, stop.clone()));
        // The client, and the reply socket (plain here: no TPROXY without CAP_NET_ADMIN).
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let reply = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        let key: FlowKey = (
            client.local_addr().expect("addr"),
            "10.96.0.10:9000".parse().expect("a"),
        );
        // Datagrams that came while the endpoint was picked wait in the task's queue.
        let (tx, rx) = queue::queue(8);
        for d in [&b"ab"[..], &[7u8; 1400][..], &[9u8; 65_000][..]] {
            assert_eq!(tx.offer(Bytes::copy_from_slice(d)), Offered::Queued);
        }
        let cancel = CancellationToken::new();
        let id = proxy.flows().insert(key, Forward::Task { tx, cancel });
        assert!(
            proxy.run_flow(&route, key, id, rx, reply.clone()).await,
            "handed to the poller"
        );
        // Later datagrams go straight to the flow's socket (as `datagram` sends them once the
        // route table has the Service).
        let (_, flow) = proxy.flows().socket_flow(id).expect("a socket flow");
        assert_eq!(flow.send(b"xyz"), Sent::Forwarded);
        drop(flow);
        let mut buf = vec![0u8; 70_000];
        let mut answers = Vec::new();
        for _ in 0..4 {
            let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
                .await
                .expect("an answer within 5 s")
                .expect("answer");
            answers.push(buf[..n].to_vec());
        }
        answers.sort_by_key(Vec::len);
        assert_eq!(
            answers.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![2, 3, 1400, 65_000],
            "whole datagrams, each on its own"
        );
        assert_eq!(
            (&answers[0][..], &answers[1][..]),
            (&b"ba"[..], &b"zyx"[..])
        );
        assert_eq!(proxy.flow_count(), 1);
        // No datagram for the idle timeout (300 ms, looked for every 75 ms): the flow ends.
        no_flows_within_5s(&proxy, "the idle flow ended").await;
        stop.cancel();
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_ends_its_flow() {
        // A port nobody listens on: the kernel answers ICMP port unreachable.
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let endpoint = closed.local_addr().expect("addr");
        drop(closed);
        let route = route_to(endpoint);
        let mut proxy = proxy(UdpConfig::default());
        let upstreams = proxy.upstreams.take().expect("poller");
        let proxy = Arc::new(proxy);
        let stop = CancellationToken::new();
        tokio::spawn(proxy.clone().answers(upstreams, stop.clone()));
        let reply = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        let key: FlowKey = (
            "127.0.0.1:40000".parse().expect("a"),
            "10.96.0.10:9000".parse().expect("a"),
        );
        let (tx, rx) = queue::queue(8);
        tx.offer(Bytes::from_static(b"hello"));
        let id = proxy.flows().insert(
            key,
            Forward::Task {
                tx,
                cancel: CancellationToken::new(),
            },
        );
        proxy.run_flow(&route, key, id, rx, reply).await;
        no_flows_within_5s(&proxy, "the flow ended on ICMP unreachable").await;
        assert_eq!(
            route.endpoints[0].health.in_flight(),
            0,
            "its in-flight count released"
        );
        stop.cancel();
    }
}
