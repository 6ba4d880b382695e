//! Endpoint resolution: the route table, which Service port a cluster IP and port (or, in the
//! cloud, a Service's name and port) belong to, and its endpoints with their tiers.
//!
//! Built from a [`MeshView`] every time the view changes and published on a watch channel; a
//! connection takes the table current when it arrives and keeps its route to the end, so
//! updates never disturb established connections. Balancing and health state is carried from
//! one table to the next. The proxy on nodes and the router in cloudcore both use it.

pub mod stats;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use crate::model::ServiceAnnotations;
use crate::view::{EndpointsRecord, MeshView, PortProtocol, PortRecord, ServiceRecord};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use stats::ServiceStats;

use crate::balance::{Affinity, Endpoint, HealthRegistry, ServiceBalancer, Tier};

/// Who this side is: a node (its name and configured labels, for topology preference), or
/// cloudcore ([`LocalNode::cloud`]).
#[derive(Clone, Debug, Default)]
pub struct LocalNode {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
}

impl LocalNode {
    /// cloudcore: it hosts the endpoints without a node, and belongs to no unit, so topology
    /// keys do not narrow what it calls (the router reaches every endpoint of a Service).
    pub fn cloud() -> LocalNode {
        LocalNode {
            name: crate::model::CLOUD_NODE.to_string(),
            labels: Default::default(),
        }
    }

    pub fn is_cloud(&self) -> bool {
        self.name == crate::model::CLOUD_NODE
    }

    /// Whether an endpoint on `endpoint_node` (`None`: the cloud) is hosted here.
    pub fn hosts(&self, endpoint_node: Option<&str>) -> bool {
        match endpoint_node {
            None => self.is_cloud(),
            Some(n) => n == self.name,
        }
    }
}

/// `namespace/name:port` of a Service port, for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceRef {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub port: u16,
}

impl std::fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}:{}", self.namespace, self.name, self.port)
    }
}

/// One Service port with its endpoints.
#[derive(Debug)]
pub struct Route {
    pub service: ServiceRef,
    /// Counters of the Service (shared by its ports and kept across rebuilds).
    pub stats: Arc<ServiceStats>,
    /// `edgemesh.io/protocol`, when set.
    pub protocol: Option<String>,
    /// The request header whose value `consistent-hash` hashes (`edgemesh.io/hash-key:
    /// header:NAME`); the client address when `None`. Only HTTP requests have headers: TCP
    /// connections always hash the client address.
    pub hash_header: Option<hyper::header::HeaderName>,
    /// Every ready endpoint, this node's and those reached through the cloud.
    pub endpoints: Vec<Endpoint>,
    /// How many of `endpoints` are on other nodes or in the cloud (reached through streams).
    pub elsewhere: usize,
    pub balancer: Arc<ServiceBalancer>,
}

/// Which Service port each cluster IP and port (and, in the cloud, each Service name and
/// port) belongs to. A port's [`Route`] — its endpoints with their health, its balancer and
/// counters — is made when a connection first needs it, from the view the table was built
/// from, and kept for the table's life: a node syncing 10,000 Services pays for the routes its
/// pods call, not for all of them. Routes a table had made are made again by the next one
/// (with their balancer state and counters), so calls in use stay ready.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub version: u64,
    source: Option<Arc<Source>>,
    routes: HashMap<SocketAddr, Arc<Slot>>,
    /// UDP Service ports, by cluster IP and port (the UDP proxy's flows).
    udp: HashMap<SocketAddr, Arc<Slot>>,
    /// By Service name and port, headless Services included: only where callers name the
    /// Service (the router), so nodes do not pay for a second index.
    by_name: Option<HashMap<ServiceRef, Arc<Slot>>>,
}

/// What routes are made from. The view is looked up when a route is made, not held: a table
/// that held its view would make every later change of the view copy it whole (the stores
/// change their view in place only while nobody else holds it).
#[derive(Debug)]
struct Source {
    views: watch::Receiver<Arc<MeshView>>,
    node: LocalNode,
    health: Arc<HealthRegistry>,
}

/// One Service port of a table, and its route once made.
#[derive(Debug)]
struct Slot {
    service: ServiceRef,
    udp: bool,
    route: OnceLock<Arc<Route>>,
    /// The Service's counters, one set for all its ports (and kept across tables).
    stats: Arc<OnceLock<Arc<ServiceStats>>>,
}

/// Which indexes a [`RouteTable`] keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Index {
    /// Cluster IP and port (the proxy).
    ClusterIp,
    /// Also Service name and port (the router).
    AlsoByName,
}

impl RouteTable {
    pub fn lookup(&self, dst: SocketAddr) -> Option<&Arc<Route>> {
        self.route_of(self.routes.get(&dst)?)
    }

    /// The route of Service port `namespace/name:port`; only in tables built with
    /// [`Index::AlsoByName`].
    pub fn by_name(&self, namespace: &str, name: &str, port: u16) -> Option<&Arc<Route>> {
        let key = ServiceRef {
            namespace: Arc::from(namespace),
            name: Arc::from(name),
            port,
        };
        self.route_of(self.by_name.as_ref()?.get(&key)?)
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Routes made so far (TCP and UDP): those connections have needed.
    pub fn made(&self) -> usize {
        let made = |m: &HashMap<SocketAddr, Arc<Slot>>| {
            let slots: HashSet<*const Slot> = m
                .values()
                .filter(|s| s.route.get().is_some())
                .map(Arc::as_ptr)
                .collect();
            slots.len()
        };
        made(&self.routes) + made(&self.udp)
    }

    /// Every TCP route, for inspection: those not made yet are made for the caller alone (not
    /// kept, and their endpoints' health is read, not registered).
    pub fn routes(&self) -> impl Iterator<Item = (&SocketAddr, Arc<Route>)> {
        self.routes
            .iter()
            .filter_map(|(addr, slot)| Some((addr, self.peek(slot)?)))
    }

    /// The route of the UDP Service port at `dst`.
    pub fn lookup_udp(&self, dst: SocketAddr) -> Option<&Arc<Route>> {
        self.route_of(self.udp.get(&dst)?)
    }

    /// Whether a UDP Service port is at `dst`.
    pub fn has_udp(&self, dst: SocketAddr) -> bool {
        self.udp.contains_key(&dst)
    }

    /// UDP Service ports, by cluster IP and port.
    pub fn udp_addrs(&self) -> impl Iterator<Item = &SocketAddr> {
        self.udp.keys()
    }

    /// Every UDP route, for inspection, like [`RouteTable::routes`].
    pub fn udp_routes(&self) -> impl Iterator<Item = (&SocketAddr, Arc<Route>)> {
        self.udp
            .iter()
            .filter_map(|(addr, slot)| Some((addr, self.peek(slot)?)))
    }

    /// The slot's route, made now if it was not yet.
    fn route_of<'t>(&'t self, slot: &'t Slot) -> Option<&'t Arc<Route>> {
        if let Some(route) = slot.route.get() {
            return Some(route);
        }
        let route = self.source.as_ref()?.make(slot, true)?;
        Some(slot.route.get_or_init(|| Arc::new(route)))
    }

    fn peek(&self, slot: &Slot) -> Option<Arc<Route>> {
        match slot.route.get() {
            Some(route) => Some(route.clone()),
            None => Some(Arc::new(self.source.as_ref()?.make(slot, false)?)),
        }
    }

    /// Builds the table for the current view of `views`. The routes `previous` had made are
    /// made again, keeping balancers whose settings did not change, and counters.
    pub fn build(
        views: &watch::Receiver<Arc<MeshView>>,
        node: &LocalNode,
        health: &Arc<HealthRegistry>,
        previous: &RouteTable,
        index: Index,
    ) -> RouteTable {
        let view = views.borrow().clone();
        let view = &view;
        let source = Arc::new(Source {
            views: views.clone(),
            node: node.clone(),
            health: health.clone(),
        });
        let mut routes = HashMap::new();
        let mut udp = HashMap::new();
        let mut by_name = (index == Index::AlsoByName).then(HashMap::new);
        let mut live = HashSet::new();
        // Namespaces are shared by many routes: one copy each.
        let mut names = Names::default();
        for (key, service) in &view.services {
            let ips = &service.cluster_ips;
            if ips.is_empty() && by_name.is_none() {
                continue;
            }
            let ns = names.get(key.namespace());
            let nm: Arc<str> = Arc::from(key.name());
            let stats = Arc::new(OnceLock::new());
            for port in service.ports.iter() {
                let Some((number, is_udp)) = served(port) else {
                    continue;
                };
                let slot = Arc::new(Slot {
                    service: ServiceRef {
                        namespace: ns.clone(),
                        name: nm.clone(),
                        port: number,
                    },
                    udp: is_udp,
                    route: OnceLock::new(),
                    stats: stats.clone(),
                });
                let (table, previous_table) = if is_udp {
                    (&mut udp, &previous.udp)
                } else {
                    (&mut routes, &previous.routes)
                };
                let previous_route = ips
                    .iter()
                    .find_map(|ip| previous_table.get(&SocketAddr::new(*ip, number)))
                    .or_else(|| {
                        previous
                            .by_name
                            .as_ref()?
                            .get(&slot.service)
                            .filter(|_| !is_udp)
                    })
                    .and_then(|s| s.route.get())
                    .filter(|r| r.service.namespace == ns && r.service.name == nm);
                if let Some(previous_route) = previous_route {
                    if let Some(route) = source.make_in(view, &slot, Some(previous_route), true) {
                        live.extend(route.endpoints.iter().map(|e| e.addr));
                        let _ = slot.route.set(Arc::new(route));
                    }
                }
                for ip in ips.iter() {
                    table.insert(SocketAddr::new(*ip, number), slot.clone());
                }
                // Callers that name a Service (the router) speak HTTP: TCP ports only.
                if let (Some(by_name), false) = (&mut by_name, is_udp) {
                    by_name.insert(slot.service.clone(), slot);
                }
            }
        }
        // Endpoints of routes not made again: their health goes (connections still open to
        // one keep their own reference).
        health.retain(&live);
        RouteTable {
            version: view.version,
            source: Some(source),
            routes,
            udp,
            by_name,
        }
    }
}

/// A Service port the proxy serves: its number, and whether it is UDP (TCP and UDP are
/// proxied; SCTP ports are stored but not served).
fn served(port: &PortRecord) -> Option<(u16, bool)> {
    match port.protocol {
        PortProtocol::Tcp => Some((port.port, false)),
        PortProtocol::Udp => Some((port.port, true)),
        PortProtocol::Sctp => None,
    }
}

impl Source {
    /// The route of `slot`'s Service port, made from the view of the moment (newer than the
    /// table's when it changed since: the next table is on its way), which is held only while
    /// the route is made. `register`: see [`Source::make_in`].
    fn make(&self, slot: &Slot, register: bool) -> Option<Route> {
        let view = self.views.borrow().clone();
        self.make_in(&view, slot, None, register)
    }

    /// The route of `slot`'s Service port in `view`. `previous`: the route a former table had
    /// made for it, whose balancer (if its settings still hold) and counters go on.
    /// `register`: the endpoints' health is registered (a route that serves) rather than only
    /// read (one made for inspection).
    fn make_in(
        &self,
        view: &MeshView,
        slot: &Slot,
        previous: Option<&Route>,
        register: bool,
    ) -> Option<Route> {
        let key = &slot.service;
        let service = view.service(&key.namespace, &key.name)?;
        let port = service
            .ports
            .iter()
            .find(|p| served(p) == Some((key.port, slot.udp)))?;
        let annotations = match ServiceAnnotations::parse_from(|k| service.annotation(k)) {
            Ok(a) => a,
            Err(e) => {
                // The cloud validates annotations; this only happens with an older cloud. Not
                // a warning: it would repeat every time the route is made.
                debug!(service = %key, error = %e.message, field = %e.field, "ignoring bad annotations");
                ServiceAnnotations::default()
            }
        };
        let affinity = service.affinity().map(|timeout| Affinity { timeout });
        let (endpoints, elsewhere) = view
            .endpoints_of(&key.namespace, &key.name)
            .map(|e| resolve_endpoints(e, port, &self.node, view, service, &self.health, register))
            .unwrap_or_default();
        let balancer = previous
            .filter(|r| {
                r.balancer.policy() == annotations.lb_policy && r.balancer.affinity() == affinity
            })
            .map(|r| r.balancer.clone())
            .unwrap_or_else(|| Arc::new(ServiceBalancer::new(annotations.lb_policy, affinity)));
        let stats = slot
            .stats
            .get_or_init(|| match previous {
                Some(r) => r.stats.clone(),
                None => Arc::new(ServiceStats::new(Arc::from(format!(
                    "{}/{}",
                    key.namespace, key.name
                )))),
            })
            .clone();
        Some(Route {
            service: key.clone(),
            stats,
            protocol: annotations.protocol.clone(),
            hash_header: annotations
                .hash_key
                .as_deref()
                .and_then(|k| k.strip_prefix("header:"))
                .and_then(|h| hyper::header::HeaderName::from_bytes(h.as_bytes()).ok()),
            endpoints,
            elsewhere,
            balancer,
        })
    }
}

/// The endpoints of one Service port, and how many of them are reached through the cloud.
///
/// Endpoints on this node are dialled directly. An endpoint on another node, or in the cloud
/// (no `nodeName`), is reached through a stream to the side that hosts it (SPEC §4.4), never by
/// dialling its address from here: that address belongs to another site's network, and the
/// same private address on this node's network would be an unrelated host. The balancer's
/// tiers prefer this node's endpoints, then those the topology keys bring close.
fn resolve_endpoints(
    endpoints: &EndpointsRecord,
    port: &PortRecord,
    node: &LocalNode,
    view: &MeshView,
    service: &ServiceRecord,
    health: &HealthRegistry,
    register: bool,
) -> (Vec<Endpoint>, usize) {
    let mut names = Names::default();
    let mut out: Vec<Endpoint> = Vec::new();
    let mut seen: HashSet<SocketAddr> = HashSet::new();
    let mut elsewhere = 0;
    let keys = service.topology();
    for subset in endpoints.subsets.iter() {
        let Some(target) = port.endpoint_port(subset) else {
            continue;
        };
        for address in subset.addresses.iter() {
            let addr = SocketAddr::new(address.ip, target);
            let endpoint_node = address.host();
            // An endpoint no topology key admits is not used (nor answered by DNS).
            let Some(tier) = tier_of(endpoint_node, node, view, keys) else {
                continue;
            };
            if !seen.insert(addr) {
                continue;
            }
            if !node.hosts(endpoint_node) {
                elsewhere += 1;
            }
            out.push(Endpoint {
                addr,
                node: endpoint_node.map(|n| names.get(n)),
                tier,
                health: if register {
                    health.get(addr)
                } else {
                    health.peek(addr)
                },
            });
        }
    }
    // A route lives until the next change of the view: no room for endpoints it will not get
    // (a Vec grows to 4 slots for one or two endpoints).
    out.shrink_to_fit();
    (out, elsewhere)
}

/// One shared copy of each namespace and node name while a table is built.
#[derive(Default)]
struct Names(HashSet<Arc<str>>);

impl Names {
    fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(shared) = self.0.get(name) {
            return shared.clone();
        }
        let shared: Arc<str> = Arc::from(name);
        self.0.insert(shared.clone());
        shared
    }
}

/// The endpoint's tier for this node (`crate::topology`, which DNS uses too); `None` when
/// no topology key admits it.
fn tier_of(
    endpoint_node: Option<&str>,
    node: &LocalNode,
    view: &MeshView,
    keys: &[Box<str>],
) -> Option<Tier> {
    if node.is_cloud() {
        return Some(if endpoint_node.is_none() {
            Tier::LOCAL
        } else {
            Tier(1)
        });
    }
    let local = crate::topology::Local::in_view(&view.nodes, &node.name, &node.labels);
    crate::topology::tier_in(&view.nodes, endpoint_node, &local, keys)
}

/// Rebuilds the table whenever the metadata changes, until `shutdown`. The table for the
/// current view is built by the caller, before anything is served.
pub async fn follow_view(
    mut views: watch::Receiver<Arc<MeshView>>,
    node: LocalNode,
    health: Arc<HealthRegistry>,
    tables: watch::Sender<Arc<RouteTable>>,
    index: Index,
    shutdown: CancellationToken,
) {
    loop {
        if !crate::process::changed(&mut views, &shutdown).await {
            return;
        }
        views.borrow_and_update();
        let previous = tables.borrow().clone();
        let table = RouteTable::build(&views, &node, &health, &previous, index);
        debug!(
            version = table.version,
            routes = table.len(),
            "route table rebuilt"
        );
        metrics::gauge!(crate::telemetry::name("proxy_routes")).set(table.len() as f64);
        tables.send_replace(Arc::new(table));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::OutlierConfig;
    use crate::model::{Kind, Node, Object};

    fn service(json: &str) -> Object {
        Object::from_json(Kind::Service, json).expect("service")
    }

    fn endpoints(json: &str) -> Object {
        Object::from_json(Kind::Endpoints, json).expect("endpoints")
    }

    fn view() -> MeshView {
        let mut v = MeshView::default();
        v.put(service(r#"{"metadata":{"name":"web","namespace":"default","annotations":{"edgemesh.io/lb-policy":"random"}},
            "spec":{"clusterIP":"10.96.0.10","topologyKeys":["zone"],"ports":[
              {"name":"http","port":80,"targetPort":8080},{"name":"dns","port":53,"protocol":"UDP"},
              {"name":"admin","port":9000,"targetPort":"admin"}]}}"#));
        v.put(endpoints(r#"{"metadata":{"name":"web","namespace":"default"},"subsets":[
              {"addresses":[{"ip":"10.244.0.2","nodeName":"a"},{"ip":"10.244.1.2","nodeName":"b"},{"ip":"10.244.2.2","nodeName":"c"},{"ip":"10.244.3.2"}],
               "notReadyAddresses":[{"ip":"10.244.0.9","nodeName":"a"}],
               "ports":[{"name":"http","port":8081},{"name":"admin","port":9001}]}]}"#));
        v.put(service(r#"{"metadata":{"name":"headless","namespace":"default"},"spec":{"clusterIP":"None","ports":[{"port":80}]}}"#));
        let zone = |z: &str| [("zone".to_string(), z.to_string())].into_iter().collect();
        v.nodes
            .insert("b".into(), Arc::new(Node::new("b", zone("z1"))));
        v.nodes
            .insert("c".into(), Arc::new(Node::new("c", zone("z2"))));
        v
    }

    /// Node "a" with `labels`.
    fn node_a(labels: &[(&str, &str)]) -> LocalNode {
        LocalNode {
            name: "a".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// The first ClusterIP table of a node (no routes before it).
    fn first_table(
        views: &watch::Receiver<Arc<MeshView>>,
        node: &LocalNode,
        health: &Arc<HealthRegistry>,
    ) -> RouteTable {
        RouteTable::build(
            views,
            node,
            health,
            &RouteTable::default(),
            Index::ClusterIp,
        )
    }

    #[tokio::test]
    async fn routes_map_cluster_ports_to_endpoint_ports_with_tiers() {
        let node = node_a(&[("zone", "z1")]);
        let health = Arc::new(HealthRegistry::new(OutlierConfig::default()));
        let (_views, views) = watch::channel(Arc::new(view()));
        let table = first_table(&views, &node, &health);
        assert_eq!(table.len(), 2, "TCP ports of the ClusterIP service only");
        let web = table
            .lookup("10.96.0.10:80".parse().expect("a"))
            .expect("route");
        assert_eq!(web.service.to_string(), "default/web:80");
        let eps: Vec<(String, u8)> = web
            .endpoints
            .iter()
            .map(|e| (e.addr.to_string(), e.tier.0))
            .collect();
        // The ready endpoints the keys admit, by tier: this node, then the same zone; another
        // zone and the cloud are left out (no `*`). The second is reached through the cloud.
        assert_eq!(
            eps,
            vec![("10.244.0.2:8081".into(), 0), ("10.244.1.2:8081".into(), 1),]
        );
        assert_eq!(web.elsewhere, 1);
        let keys: [Box<str>; 2] = ["zone".into(), "*".into()];
        let v = view();
        assert_eq!(tier_of(Some("a"), &node, &v, &keys), Some(Tier(0)));
        assert_eq!(
            tier_of(Some("b"), &node, &v, &keys),
            Some(Tier(1)),
            "same zone"
        );
        assert_eq!(tier_of(Some("c"), &node, &v, &keys), Some(Tier(2)), "`*`");
        assert_eq!(
            tier_of(None, &node, &v, &keys),
            Some(Tier(2)),
            "`*` covers cloud endpoints"
        );
        assert_eq!(
            tier_of(None, &node, &v, &keys[..1]),
            None,
            "no key admits it"
        );
        assert_eq!(tier_of(None, &node, &v, &[]), Some(Tier(1)), "no topology");
        let admin = table
            .lookup("10.96.0.10:9000".parse().expect("a"))
            .expect("route");
        assert_eq!(admin.endpoints[0].addr.port(), 9001, "named targetPort");
        assert!(table.lookup("10.96.0.10:53".parse().expect("a")).is_none());
        // The UDP port has a route of its own, with the endpoints of its own port.
        let dns = table
            .lookup_udp("10.96.0.10:53".parse().expect("a"))
            .expect("udp route");
        assert_eq!(dns.service.to_string(), "default/web:53");
        assert_eq!(dns.endpoints[0].addr.to_string(), "10.244.0.2:53");
        assert!(table
            .lookup_udp("10.96.0.10:80".parse().expect("a"))
            .is_none());
        assert_eq!(table.udp_routes().count(), 1);

        // A rebuild keeps the balancer (round-robin position, affinity) of an unchanged Service.
        let again = RouteTable::build(&views, &node, &health, &table, Index::ClusterIp);
        let web2 = again
            .lookup("10.96.0.10:80".parse().expect("a"))
            .expect("route");
        assert!(Arc::ptr_eq(&web.balancer, &web2.balancer));
        let dns2 = again
            .lookup_udp("10.96.0.10:53".parse().expect("a"))
            .expect("udp route");
        assert!(Arc::ptr_eq(&dns.balancer, &dns2.balancer), "UDP too");
        assert!(
            Arc::ptr_eq(&dns.stats, &web2.stats),
            "one Service, one set of counters"
        );
        assert!(Arc::ptr_eq(
            &web.endpoints[0].health,
            &web2.endpoints[0].health
        ));
    }

    #[tokio::test]
    async fn routes_are_made_when_first_needed_and_kept_while_in_use() {
        let node = node_a(&[]);
        let health = Arc::new(HealthRegistry::new(OutlierConfig::default()));
        let (store, views) = watch::channel(Arc::new(view()));
        let table = first_table(&views, &node, &health);
        assert_eq!(
            (table.len(), table.made()),
            (2, 0),
            "nothing made before a call"
        );
        assert_eq!(health.len(), 0, "no endpoint registered");
        // Looking at every route (the debug API) makes none for good.
        assert_eq!(table.routes().count(), 2);
        assert_eq!((table.made(), health.len()), (0, 0));

        let web: SocketAddr = "10.96.0.10:80".parse().expect("a");
        let first = table.lookup(web).expect("route").clone();
        assert!(
            Arc::ptr_eq(&first, table.lookup(web).expect("route")),
            "made once"
        );
        assert_eq!(table.made(), 1);
        assert!(!health.is_empty(), "its endpoints' health is kept");

        // The table holds no view: the store changes its own in place.
        store.send_modify(|v| {
            let before = Arc::as_ptr(v);
            Arc::make_mut(v).version += 1;
            assert_eq!(before, Arc::as_ptr(v), "changed in place, not copied");
        });
        // The next table makes again what was in use, with its balancer; not the rest.
        let again = RouteTable::build(&views, &node, &health, &table, Index::ClusterIp);
        assert_eq!(again.made(), 1);
        let second = again.lookup(web).expect("route");
        assert!(Arc::ptr_eq(&first.balancer, &second.balancer));
        assert!(Arc::ptr_eq(
            &first.endpoints[0].health,
            &second.endpoints[0].health
        ));
    }

    #[test]
    fn target_port_falls_back_to_numbers() {
        let mut v = MeshView::default();
        v.put(service(
            r#"{"metadata":{"name":"x"},"spec":{"ports":[{"name":"a","port":80,"targetPort":8080},{"name":"b","port":81},{"name":"c","port":82,"targetPort":"named"}]}}"#,
        ));
        let svc = v.services.values().next().expect("x");
        let subset = crate::view::SubsetRecord {
            addresses: Box::new([]),
            not_ready: Box::new([]),
            ports: Default::default(),
        };
        let ports: Vec<Option<u16>> = svc.ports.iter().map(|p| p.endpoint_port(&subset)).collect();
        assert_eq!(ports, vec![Some(8080), Some(81), None]);
    }
}
