//! Endpoint resolution: the route table, which Service port a cluster IP and port (or, in the
//! cloud, a Service's name and port) belong to, and its endpoints with their tiers.
//!
//! Built from a [`MeshView`] every time the view changes and published on a watch channel; a
//! connection takes the table current when it arrives and keeps its route to the end, so
//! updates never disturb established connections. Balancing and health state is carried from
//! one table to the next. The proxy on nodes and the router in cloudcore both use it.

pub mod stats;

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};

use crate::model::ServiceAnnotations;
use crate::view::{EndpointsRecord, MeshView, ObjectName, PortProtocol, PortRecord, ServiceRecord};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

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
    /// Every Service port of the mesh, inline in one allocation, and the indexes hold
    /// positions in it: a node keeps a slot for every port while its pods call few, so a slot
    /// must cost no allocation of its own.
    slots: Vec<Slot>,
    routes: HashMap<ClusterPort, u32>,
    /// UDP Service ports, by cluster IP and port (the UDP proxy's flows).
    udp: HashMap<ClusterPort, u32>,
    /// By Service name and port, headless Services included: only where callers name the
    /// Service (the router), so nodes do not pay for a second index.
    by_name: Option<HashMap<NamedPort, u32>>,
}

/// What routes are made from. The view is looked up when a route is made, not held: a table
/// that held its view would make every later change of the view copy it whole (the stores
/// change their view in place only while nobody else holds it).
#[derive(Debug)]
struct Source {
    views: watch::Receiver<Arc<MeshView>>,
    node: LocalNode,
    health: Arc<HealthRegistry>,
    /// The counters of each Service a route has been made for, here or in the tables before
    /// (while the Service lasts): looked up only when a route is made, so that the ports of a
    /// Service share one set, and a rebuild keeps it, without the slots holding a handle.
    stats: Mutex<HashMap<ObjectName, Arc<ServiceStats>>>,
}

/// One Service port of a table, and its route once made.
#[derive(Debug)]
struct Slot {
    /// The view's own name of the Service, shared.
    service: ObjectName,
    port: u16,
    udp: bool,
    route: OnceLock<Arc<Route>>,
}

/// A cluster IP and port, the key of the address indexes: 20 bytes where a `SocketAddr`
/// (room for an IPv6 flow label and scope, which cluster addresses do not have) takes 32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ClusterPort(IpAddr, u16);

impl ClusterPort {
    fn addr(self) -> SocketAddr {
        SocketAddr::new(self.0, self.1)
    }
}

impl From<SocketAddr> for ClusterPort {
    fn from(addr: SocketAddr) -> ClusterPort {
        ClusterPort(addr.ip(), addr.port())
    }
}

/// A Service port by name, the key of `by_name`: the view's name of the Service and the port.
#[derive(Debug)]
struct NamedPort {
    service: ObjectName,
    port: u16,
}

/// What `by_name` hashes and compares: namespace, name and port apart, so that a caller's
/// `(namespace, name, port)` finds a [`NamedPort`] without joining them into a new name.
trait PortKey {
    fn parts(&self) -> (&str, &str, u16);
}

impl PortKey for NamedPort {
    fn parts(&self) -> (&str, &str, u16) {
        (self.service.namespace(), self.service.name(), self.port)
    }
}

impl PortKey for (&str, &str, u16) {
    fn parts(&self) -> (&str, &str, u16) {
        *self
    }
}

impl Hash for dyn PortKey + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.parts().hash(state)
    }
}

impl PartialEq for dyn PortKey + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn PortKey + '_ {}

impl<'a> Borrow<dyn PortKey + 'a> for NamedPort {
    fn borrow(&self) -> &(dyn PortKey + 'a) {
        self
    }
}

// As the borrowed form, which the map's lookups hash and compare.
impl Hash for NamedPort {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.parts().hash(state)
    }
}

impl PartialEq for NamedPort {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for NamedPort {}

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
        self.route_at(*self.routes.get(&ClusterPort::from(dst))?)
    }

    /// The route of Service port `namespace/name:port`; only in tables built with
    /// [`Index::AlsoByName`].
    pub fn by_name(&self, namespace: &str, name: &str, port: u16) -> Option<&Arc<Route>> {
        let key: &dyn PortKey = &(namespace, name, port);
        self.route_at(*self.by_name.as_ref()?.get(key)?)
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Routes made so far (TCP and UDP): those connections have needed.
    pub fn made(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.route.get().is_some())
            .count()
    }

    /// Every TCP route, for inspection: those not made yet are made for the caller alone (not
    /// kept, and their endpoints' health is read, not registered).
    pub fn routes(&self) -> impl Iterator<Item = (SocketAddr, Arc<Route>)> + '_ {
        self.peek_all(&self.routes)
    }

    /// The route of the UDP Service port at `dst`.
    pub fn lookup_udp(&self, dst: SocketAddr) -> Option<&Arc<Route>> {
        self.route_at(*self.udp.get(&ClusterPort::from(dst))?)
    }

    /// Whether a UDP Service port is at `dst`.
    pub fn has_udp(&self, dst: SocketAddr) -> bool {
        self.udp.contains_key(&ClusterPort::from(dst))
    }

    /// UDP Service ports, by cluster IP and port.
    pub fn udp_addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.udp.keys().map(|at| at.addr())
    }

    /// Every UDP route, for inspection, like [`RouteTable::routes`].
    pub fn udp_routes(&self) -> impl Iterator<Item = (SocketAddr, Arc<Route>)> + '_ {
        self.peek_all(&self.udp)
    }

    /// The route of the slot at `index`, made now if it was not yet.
    fn route_at(&self, index: u32) -> Option<&Arc<Route>> {
        let slot = self.slots.get(index as usize)?;
        if let Some(route) = slot.route.get() {
            return Some(route);
        }
        let route = self.source.as_ref()?.make(slot, true)?;
        Some(slot.route.get_or_init(|| Arc::new(route)))
    }

    /// The route of the slot at `index` if it was made.
    fn made_at(&self, index: u32) -> Option<&Arc<Route>> {
        self.slots.get(index as usize)?.route.get()
    }

    fn peek_all<'t>(
        &'t self,
        addrs: &'t HashMap<ClusterPort, u32>,
    ) -> impl Iterator<Item = (SocketAddr, Arc<Route>)> + 't {
        addrs
            .iter()
            .filter_map(|(at, &i)| Some((at.addr(), self.peek(self.slots.get(i as usize)?)?)))
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
            stats: Mutex::new(previous.stats_in(view)),
        });
        let named = index == Index::AlsoByName;
        let listed = |service: &ServiceRecord| named || !service.cluster_ips.is_empty();
        // The slots are kept for the table's life: no spare room.
        let count = view
            .services
            .values()
            .filter(|s| listed(s))
            .map(|s| s.ports.iter().filter(|p| served(p).is_some()).count())
            .sum();
        let mut slots = Vec::with_capacity(count);
        let mut routes = HashMap::new();
        let mut udp = HashMap::new();
        let mut by_name = named.then(HashMap::new);
        let mut live = HashSet::new();
        'services: for (key, service) in &view.services {
            if !listed(service) {
                continue;
            }
            let ips = &service.cluster_ips;
            for port in service.ports.iter() {
                let Some((number, is_udp)) = served(port) else {
                    continue;
                };
                // Positions are u32 to keep index entries small; no view comes near.
                let Ok(at) = u32::try_from(slots.len()) else {
                    warn!("more Service ports than a route table holds: the rest have no route");
                    break 'services;
                };
                let slot = Slot {
                    service: key.clone(),
                    port: number,
                    udp: is_udp,
                    route: OnceLock::new(),
                };
                let (table, previous_table) = if is_udp {
                    (&mut udp, &previous.udp)
                } else {
                    (&mut routes, &previous.routes)
                };
                let previous_route = ips
                    .iter()
                    .find_map(|ip| previous_table.get(&ClusterPort(*ip, number)))
                    .or_else(|| {
                        let key: &dyn PortKey = &(key.namespace(), key.name(), number);
                        previous.by_name.as_ref()?.get(key).filter(|_| !is_udp)
                    })
                    .and_then(|&i| previous.made_at(i))
                    .filter(|r| {
                        *r.service.namespace == *key.namespace() && *r.service.name == *key.name()
                    });
                if let Some(previous_route) = previous_route {
                    if let Some(route) = source.make_in(view, &slot, Some(previous_route), true) {
                        live.extend(route.endpoints.iter().map(|e| e.addr));
                        let _ = slot.route.set(Arc::new(route));
                    }
                }
                for ip in ips.iter() {
                    table.insert(ClusterPort(*ip, number), at);
                }
                // Callers that name a Service (the router) speak HTTP: TCP ports only.
                if let (Some(by_name), false) = (&mut by_name, is_udp) {
                    let key = NamedPort {
                        service: key.clone(),
                        port: number,
                    };
                    by_name.insert(key, at);
                }
                slots.push(slot);
            }
        }
        // Endpoints of routes not made again: their health goes (connections still open to
        // one keep their own reference).
        health.retain(&live);
        RouteTable {
            version: view.version,
            source: Some(source),
            slots,
            routes,
            udp,
            by_name,
        }
    }

    /// The counters this table has of Services `view` still has, for the next table: kept
    /// whichever of their ports are made there, under the view's own names.
    fn stats_in(&self, view: &MeshView) -> HashMap<ObjectName, Arc<ServiceStats>> {
        let Some(source) = &self.source else {
            return HashMap::new();
        };
        let made = source.stats.lock().unwrap_or_else(|p| p.into_inner());
        made.iter()
            .filter_map(|(name, stats)| {
                let (name, _) = view.services.get_key_value(name.as_str())?;
                Some((name.clone(), stats.clone()))
            })
            .collect()
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
    /// `register`: the endpoints' health is registered and the counters kept (a route that
    /// serves) rather than only read (one made for inspection).
    fn make_in(
        &self,
        view: &MeshView,
        slot: &Slot,
        previous: Option<&Route>,
        register: bool,
    ) -> Option<Route> {
        let name = &slot.service;
        let service = view.services.get(name.as_str())?;
        let port = service
            .ports
            .iter()
            .find(|p| served(p) == Some((slot.port, slot.udp)))?;
        let key = match previous {
            Some(r) => ServiceRef {
                port: slot.port,
                ..r.service.clone()
            },
            None => ServiceRef {
                namespace: Arc::from(name.namespace()),
                name: Arc::from(name.name()),
                port: slot.port,
            },
        };
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
            .endpoints
            .get(name.as_str())
            .map(|e| resolve_endpoints(e, port, &self.node, view, service, &self.health, register))
            .unwrap_or_default();
        let balancer = previous
            .filter(|r| {
                r.balancer.policy() == annotations.lb_policy && r.balancer.affinity() == affinity
            })
            .map(|r| r.balancer.clone())
            .unwrap_or_else(|| Arc::new(ServiceBalancer::new(annotations.lb_policy, affinity)));
        Some(Route {
            service: key,
            stats: self.stats_of(name, previous, register),
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

    /// The counters of Service `name`: those of its routes made before, else `previous`'s,
    /// else new ones. `keep`: the route serves, and the other ports of the Service, and the
    /// next table, are to find them.
    fn stats_of(
        &self,
        name: &ObjectName,
        previous: Option<&Route>,
        keep: bool,
    ) -> Arc<ServiceStats> {
        let mut made = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(stats) = made.get(name) {
            return stats.clone();
        }
        let stats = match previous {
            Some(r) => r.stats.clone(),
            None => Arc::new(ServiceStats::new(Arc::from(name.as_str()))),
        };
        if keep {
            made.insert(name.clone(), stats.clone());
        }
        stats
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

/// One shared copy of each node name while a route's endpoints are resolved.
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
    use crate::model::{Kind, Node, Object, ObjectKey};

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

    /// `kube-system/dns`, dual-stack, with TCP and UDP port 53 to different endpoint ports.
    fn dns_service(v: &mut MeshView) {
        v.put(service(r#"{"metadata":{"name":"dns","namespace":"kube-system"},
            "spec":{"clusterIP":"10.96.0.53","clusterIPs":["10.96.0.53","fd00::53"],"ports":[
              {"name":"dns-tcp","port":53,"protocol":"TCP"},{"name":"dns","port":53,"protocol":"UDP"}]}}"#));
        v.put(endpoints(r#"{"metadata":{"name":"dns","namespace":"kube-system"},"subsets":[
              {"addresses":[{"ip":"10.244.0.5","nodeName":"a"}],
               "ports":[{"name":"dns-tcp","port":1053,"protocol":"TCP"},{"name":"dns","port":2053,"protocol":"UDP"}]}]}"#));
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[tokio::test]
    async fn ports_of_a_service_share_its_counters_in_and_across_tables() {
        let node = node_a(&[]);
        let health = Arc::new(HealthRegistry::new(OutlierConfig::default()));
        let (store, views) = watch::channel(Arc::new(view()));
        let table = first_table(&views, &node, &health);
        // Made in any order, lazily: one set for the Service, whatever the port or protocol.
        let admin = table
            .lookup(addr("10.96.0.10:9000"))
            .expect("admin")
            .clone();
        let dns = table
            .lookup_udp(addr("10.96.0.10:53"))
            .expect("dns")
            .clone();
        let web = table.lookup(addr("10.96.0.10:80")).expect("web").clone();
        assert!(Arc::ptr_eq(&admin.stats, &dns.stats));
        assert!(Arc::ptr_eq(&admin.stats, &web.stats));
        assert_eq!(web.stats.label(), "default/web");
        assert_eq!(table.made(), 3);

        // A rebuild makes them again with their counters and balancers.
        let again = RouteTable::build(&views, &node, &health, &table, Index::ClusterIp);
        assert_eq!(again.made(), 3);
        for (before, after) in [
            (&web, again.lookup(addr("10.96.0.10:80"))),
            (&admin, again.lookup(addr("10.96.0.10:9000"))),
            (&dns, again.lookup_udp(addr("10.96.0.10:53"))),
        ] {
            let after = after.expect("made again");
            assert!(
                Arc::ptr_eq(&before.stats, &after.stats),
                "{}",
                after.service
            );
            assert!(
                Arc::ptr_eq(&before.balancer, &after.balancer),
                "{}",
                after.service
            );
        }

        // A port made after a rebuild finds the counters too.
        let table = first_table(&views, &node, &health);
        let web = table.lookup(addr("10.96.0.10:80")).expect("web").clone();
        let again = RouteTable::build(&views, &node, &health, &table, Index::ClusterIp);
        assert_eq!(again.made(), 1);
        let admin = again.lookup(addr("10.96.0.10:9000")).expect("admin");
        assert!(Arc::ptr_eq(&web.stats, &admin.stats));

        // Counters are the Service's: they go on when the port that was in use goes, and when
        // a changed policy makes a new balancer.
        store.send_modify(|v| {
            Arc::make_mut(v).put(service(r#"{"metadata":{"name":"web","namespace":"default","annotations":{"edgemesh.io/lb-policy":"round-robin"}},
                "spec":{"clusterIP":"10.96.0.10","ports":[{"name":"http","port":80,"targetPort":8080}]}}"#));
        });
        let changed = RouteTable::build(&views, &node, &health, &again, Index::ClusterIp);
        assert!(changed.lookup(addr("10.96.0.10:9000")).is_none());
        let web2 = changed.lookup(addr("10.96.0.10:80")).expect("web");
        assert!(Arc::ptr_eq(&web.stats, &web2.stats));
        assert!(!Arc::ptr_eq(&web.balancer, &web2.balancer), "new policy");
        store.send_modify(|v| {
            Arc::make_mut(v).put(service(r#"{"metadata":{"name":"web","namespace":"default"},
                "spec":{"clusterIP":"10.96.0.10","ports":[{"name":"admin","port":9000,"targetPort":"admin"}]}}"#));
        });
        let moved = RouteTable::build(&views, &node, &health, &changed, Index::ClusterIp);
        assert_eq!(moved.made(), 0, "the port in use is gone");
        let admin = moved.lookup(addr("10.96.0.10:9000")).expect("admin");
        assert!(Arc::ptr_eq(&web.stats, &admin.stats));
    }

    #[tokio::test]
    async fn a_service_removed_and_added_again_starts_afresh() {
        let node = node_a(&[]);
        let health = Arc::new(HealthRegistry::new(OutlierConfig::default()));
        let (store, views) = watch::channel(Arc::new(view()));
        let table = first_table(&views, &node, &health);
        let web = table.lookup(addr("10.96.0.10:80")).expect("web").clone();
        let key = ObjectKey {
            kind: Kind::Service,
            namespace: "default".into(),
            name: "web".into(),
        };
        store.send_modify(|v| Arc::make_mut(v).set(&key, None));
        let removed = RouteTable::build(&views, &node, &health, &table, Index::ClusterIp);
        assert!(removed.lookup(addr("10.96.0.10:80")).is_none());
        assert!(removed.lookup_udp(addr("10.96.0.10:53")).is_none());
        assert_eq!((removed.len(), removed.made()), (0, 0));
        assert_eq!(health.len(), 0, "its endpoints' health went with it");
        // The table before keeps the route it made; one it had not made is made from the view
        // of the moment, which has no such Service any more.
        let kept = table.lookup(addr("10.96.0.10:80")).expect("kept");
        assert!(Arc::ptr_eq(&web, kept));
        assert!(table.lookup(addr("10.96.0.10:9000")).is_none());

        store.send_modify(|v| *v = Arc::new(view()));
        let back = RouteTable::build(&views, &node, &health, &removed, Index::ClusterIp);
        assert_eq!(back.made(), 0, "nothing was in use in the table before");
        let web2 = back.lookup(addr("10.96.0.10:80")).expect("web");
        assert_eq!(web2.service.to_string(), "default/web:80");
        assert!(!Arc::ptr_eq(&web.stats, &web2.stats));
        assert!(!Arc::ptr_eq(&web.balancer, &web2.balancer));
        let dns = back.lookup_udp(addr("10.96.0.10:53")).expect("dns");
        assert!(Arc::ptr_eq(&web2.stats, &dns.stats));
    }

    #[tokio::test]
    async fn by_name_finds_each_port_of_a_service() {
        let health = Arc::new(HealthRegistry::new(OutlierConfig::default()));
        let mut v = view();
        dns_service(&mut v);
        let (_store, views) = watch::channel(Arc::new(v));
        let cloud = LocalNode::cloud();
        let table = RouteTable::build(
            &views,
            &cloud,
            &health,
            &RouteTable::default(),
            Index::AlsoByName,
        );
        let web = table.by_name("default", "web", 80).expect("web:80");
        assert_eq!(web.service.to_string(), "default/web:80");
        assert_eq!(web.endpoints[0].addr.port(), 8081);
        assert!(Arc::ptr_eq(
            web,
            table.lookup(addr("10.96.0.10:80")).expect("by address")
        ));
        let admin = table.by_name("default", "web", 9000).expect("web:9000");
        assert_eq!(admin.endpoints[0].addr.port(), 9001);
        assert!(Arc::ptr_eq(&web.stats, &admin.stats));
        assert!(table.by_name("default", "web", 53).is_none(), "UDP only");
        assert!(table.by_name("default", "web", 81).is_none());
        assert!(table.by_name("default", "web2", 80).is_none());
        assert!(table.by_name("web", "default", 80).is_none());
        assert!(table.by_name("", "default/web", 80).is_none());
        assert!(table.by_name("default/web", "", 80).is_none());
        let headless = table.by_name("default", "headless", 80).expect("headless");
        assert_eq!(headless.service.to_string(), "default/headless:80");
        // TCP where a UDP port has the same number.
        let dns = table.by_name("kube-system", "dns", 53).expect("dns");
        assert_eq!(dns.endpoints[0].addr.port(), 1053);
        assert_eq!(table.made(), 4);

        // Routes found by name are made again by the next table, headless ones too.
        let again = RouteTable::build(&views, &cloud, &health, &table, Index::AlsoByName);
        assert_eq!(again.made(), 4);
        let headless2 = again.by_name("default", "headless", 80).expect("headless");
        assert!(Arc::ptr_eq(&headless.balancer, &headless2.balancer));
        assert!(Arc::ptr_eq(&headless.stats, &headless2.stats));
        let (node, ips) = (node_a(&[]), Index::ClusterIp);
        assert!(first_table(&views, &node, &health)
            .by_name("default", "web", 80)
            .is_none());
        assert!(RouteTable::build(&views, &node, &health, &again, ips)
            .by_name
            .is_none());
    }

    #[tokio::test]
    async fn tcp_and_udp_ports_of_one_number_have_routes_of_their_own() {
        let node = node_a(&[]);
        let health = Arc::new(HealthRegistry::new(OutlierConfig::default()));
        let mut v = view();
        dns_service(&mut v);
        let (_store, views) = watch::channel(Arc::new(v));
        let table = first_table(&views, &node, &health);
        assert_eq!(table.len(), 4, "two ports of web, TCP 53 at two addresses");
        let tcp = table.lookup(addr("10.96.0.53:53")).expect("tcp").clone();
        let udp = table
            .lookup_udp(addr("10.96.0.53:53"))
            .expect("udp")
            .clone();
        assert_eq!(tcp.endpoints[0].addr.port(), 1053);
        assert_eq!(udp.endpoints[0].addr.port(), 2053);
        assert_eq!(tcp.service, udp.service, "kube-system/dns:53");
        assert!(!Arc::ptr_eq(&tcp.balancer, &udp.balancer));
        assert!(Arc::ptr_eq(&tcp.stats, &udp.stats));
        // Each cluster IP finds the same route.
        let v6 = table.lookup(addr("[fd00::53]:53")).expect("IPv6");
        assert!(Arc::ptr_eq(&tcp, v6));
        let v6 = table.lookup_udp(addr("[fd00::53]:53")).expect("IPv6");
        assert!(Arc::ptr_eq(&udp, v6));
        assert_eq!(table.made(), 2);
        let mut udp_addrs: Vec<SocketAddr> = table.udp_addrs().collect();
        udp_addrs.sort();
        assert_eq!(
            udp_addrs,
            [
                addr("10.96.0.10:53"),
                addr("10.96.0.53:53"),
                addr("[fd00::53]:53")
            ]
        );
        assert!(table.has_udp(addr("[fd00::53]:53")));
        assert!(!table.has_udp(addr("10.96.0.10:80")));
        let mut listed: Vec<(SocketAddr, String)> = table
            .udp_routes()
            .map(|(at, r)| (at, r.endpoints[0].addr.to_string()))
            .collect();
        listed.sort();
        assert_eq!(listed[1], (addr("10.96.0.53:53"), "10.244.0.5:2053".into()));

        // Each keeps its own balancer across a rebuild.
        let again = RouteTable::build(&views, &node, &health, &table, Index::ClusterIp);
        assert_eq!(again.made(), 2);
        let tcp2 = again.lookup(addr("10.96.0.53:53")).expect("tcp");
        let udp2 = again.lookup_udp(addr("10.96.0.53:53")).expect("udp");
        assert!(Arc::ptr_eq(&tcp.balancer, &tcp2.balancer));
        assert!(Arc::ptr_eq(&udp.balancer, &udp2.balancer));
        assert_eq!(tcp2.endpoints[0].addr.port(), 1053);
        assert_eq!(udp2.endpoints[0].addr.port(), 2053);
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
