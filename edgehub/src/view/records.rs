//! Services and Endpoints as the data path reads them: only the fields routing, DNS, stream
//! checks and limits use, parsed once (addresses as `IpAddr`, ports as `u16`, topology keys
//! resolved), in as few allocations as the shape allows.
//!
//! A node holds every Service of the mesh for as long as it runs, so the size of these records
//! is the agent's memory: a typed object with its metadata maps and strings costs about four
//! times as much (issue 13 measured 1.7 KB per object). The full objects stay in the store.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::balance::DEFAULT_AFFINITY_TIMEOUT;
use crate::model::{EndpointAddress, EndpointSubset, Endpoints, Service, ServicePort};

/// The transport of a port (validation admits these three).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PortProtocol {
    Tcp,
    Udp,
    Sctp,
}

impl PortProtocol {
    pub fn parse(s: &str) -> Option<PortProtocol> {
        if s.eq_ignore_ascii_case("tcp") {
            Some(PortProtocol::Tcp)
        } else if s.eq_ignore_ascii_case("udp") {
            Some(PortProtocol::Udp)
        } else if s.eq_ignore_ascii_case("sctp") {
            Some(PortProtocol::Sctp)
        } else {
            None
        }
    }
}

/// A list whose one item, the common case (one cluster IP, one port, one subset), is held
/// inline: a record then costs one allocation, not one per list.
#[derive(Clone, PartialEq, Eq)]
pub enum SmallList<T> {
    One(T),
    Many(Box<[T]>),
}

impl<T> Default for SmallList<T> {
    fn default() -> Self {
        SmallList::Many(Box::default())
    }
}

impl<T> std::ops::Deref for SmallList<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match self {
            SmallList::One(item) => std::slice::from_ref(item),
            SmallList::Many(items) => items,
        }
    }
}

impl<T> FromIterator<T> for SmallList<T> {
    fn from_iter<I: IntoIterator<Item = T>>(items: I) -> Self {
        let mut items = items.into_iter();
        let Some(first) = items.next() else {
            return SmallList::default();
        };
        match items.next() {
            None => SmallList::One(first),
            Some(second) => {
                let all: Vec<T> = [first, second].into_iter().chain(items).collect();
                SmallList::Many(all.into_boxed_slice())
            }
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for SmallList<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// A name many records repeat (a node's, a port's), held once ([`Interner`]) behind a thin
/// pointer: every address and port of the mesh holds one, and a `&str`-sized pointer would
/// make each of them 8 bytes larger. The second allocation is paid once per distinct name.
#[derive(Clone, PartialEq, Eq, Hash)]
#[allow(clippy::box_collection, clippy::redundant_allocation)]
pub struct SharedName(Arc<Box<str>>);

impl SharedName {
    /// Whether both are the same copy.
    pub fn ptr_eq(&self, other: &SharedName) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::ops::Deref for SharedName {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

// Hashes as the `str` it holds (derived: `Arc` and `Box` hash their contents), so a set of
// names can be searched with a `&str`.
impl std::borrow::Borrow<str> for SharedName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SharedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self.0, f)
    }
}

impl fmt::Display for SharedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One copy of each short string many records repeat (node names, port names), for as long as
/// a record uses it.
#[derive(Clone, Debug, Default)]
pub struct Interner {
    names: HashSet<SharedName>,
    /// The size at which unused names are next dropped (twice the size after the last pass,
    /// so the pass costs O(1) per name interned).
    prune_at: usize,
}

impl Interner {
    pub fn get(&mut self, name: &str) -> SharedName {
        if let Some(shared) = self.names.get(name) {
            return shared.clone();
        }
        if self.names.len() >= self.prune_at {
            self.names.retain(|n| Arc::strong_count(&n.0) > 1);
            self.prune_at = (self.names.len() * 2).max(64);
        }
        let shared = SharedName(Arc::new(Box::from(name)));
        self.names.insert(shared.clone());
        shared
    }
}

/// A Service port as the data path serves it. Ports whose number does not fit a port are left
/// out (validation refuses them; an older cloud's object would have them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRecord {
    /// Empty when the port is unnamed.
    pub name: SharedName,
    pub port: u16,
    /// The numeric `targetPort`, or `port` when there is none; `None` for a named `targetPort`
    /// (resolved against the Endpoints' port names) or one out of range.
    pub target: Option<u16>,
    pub protocol: PortProtocol,
}

impl PortRecord {
    fn new(p: &ServicePort, names: &mut Interner) -> Option<PortRecord> {
        Some(PortRecord {
            name: names.get(&p.name),
            port: u16::try_from(p.port).ok()?,
            target: p.target_port_number(),
            protocol: PortProtocol::parse(&p.protocol)?,
        })
    }

    /// The port to dial on the endpoints of `subset` for this Service port, as Kubernetes
    /// resolves it: the Endpoints port with the same name (what the endpoints controller
    /// resolved `targetPort` to), or the subset's only port for an unnamed Service port, else a
    /// numeric `targetPort`, else the Service port itself.
    pub fn endpoint_port(&self, subset: &SubsetRecord) -> Option<u16> {
        let by_name = subset
            .ports
            .iter()
            .find(|p| p.name == self.name && p.protocol == self.protocol);
        let only = (subset.ports.len() == 1 && self.name.is_empty()).then(|| &subset.ports[0]);
        match by_name.or(only) {
            Some(p) => Some(p.port),
            None => self.target,
        }
    }
}

/// A Service: what routes, DNS, stream checks and limits read of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRecord {
    /// The cluster IPs, the primary first, without repeats; empty for a headless Service, an
    /// `ExternalName` one, or one without an address yet.
    pub cluster_ips: SmallList<IpAddr>,
    pub ports: SmallList<PortRecord>,
    /// What most Services do not set; `None` when none of it is.
    options: Option<Box<ServiceOptions>>,
    pub headless: bool,
    /// Not-ready addresses are published too.
    pub publish_not_ready: bool,
}

/// The parts of a Service most do not set, behind one pointer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ServiceOptions {
    /// The topology keys in effect ([`crate::topology::keys_of`]); empty without topology.
    topology: Box<[Box<str>]>,
    /// `sessionAffinity: ClientIP`, with its timeout.
    affinity: Option<Duration>,
    /// The name an `ExternalName` Service aliases.
    external_name: Option<Box<str>>,
    /// The annotations edgemesh reads (`edgemesh.io/...`), sorted by key.
    annotations: Box<[(Box<str>, Box<str>)]>,
}

/// The prefix of the annotations edgemesh reads; the others are not kept in the view.
const ANNOTATION_PREFIX: &str = "edgemesh.io/";

impl ServiceRecord {
    pub fn new(service: &Service, names: &mut Interner) -> ServiceRecord {
        let headless = service.is_headless();
        let mut cluster_ips: Vec<IpAddr> = Vec::new();
        if !headless {
            let listed = service.spec.cluster_ips.iter().flatten();
            for ip in std::iter::once(&service.spec.cluster_ip).chain(listed) {
                if let Ok(ip) = ip.parse::<IpAddr>() {
                    if !cluster_ips.contains(&ip) {
                        cluster_ips.push(ip);
                    }
                }
            }
        }
        let kept = service.spec.kept();
        let affinity = (service.spec.session_affinity == "ClientIP").then(|| {
            kept.session_affinity_config
                .as_ref()
                .and_then(|c| c.pointer("/clientIP/timeoutSeconds"))
                .and_then(|v| v.as_u64())
                .filter(|&s| s > 0)
                .map_or(DEFAULT_AFFINITY_TIMEOUT, Duration::from_secs)
        });
        let external_name = service
            .is_external_name()
            .then(|| kept.external_name.as_deref().map(Box::from))
            .flatten();
        let options = ServiceOptions {
            topology: crate::topology::keys_of(service)
                .iter()
                .map(|k| Box::from(k.as_str()))
                .collect(),
            affinity,
            external_name,
            // A BTreeMap: already in key order.
            annotations: service
                .metadata
                .annotations
                .iter()
                .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
                .map(|(k, v)| (Box::from(k.as_str()), Box::from(v.as_str())))
                .collect(),
        };
        ServiceRecord {
            cluster_ips: cluster_ips.into_iter().collect(),
            ports: service
                .spec
                .ports
                .iter()
                .filter_map(|p| PortRecord::new(p, names))
                .collect(),
            options: (options != ServiceOptions::default()).then(|| Box::new(options)),
            headless,
            publish_not_ready: service.publishes_not_ready(),
        }
    }

    /// The topology keys in effect ([`crate::topology::keys_of`]); empty without topology.
    pub fn topology(&self) -> &[Box<str>] {
        self.options.as_ref().map_or(&[], |o| &o.topology)
    }

    /// `sessionAffinity: ClientIP`, with its timeout.
    pub fn affinity(&self) -> Option<Duration> {
        self.options.as_ref()?.affinity
    }

    /// The name an `ExternalName` Service aliases.
    pub fn external_name(&self) -> Option<&str> {
        self.options.as_ref()?.external_name.as_deref()
    }

    /// The value of an `edgemesh.io/` annotation.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        let annotations = &self.options.as_ref()?.annotations;
        annotations
            .binary_search_by(|(k, _)| k.as_ref().cmp(key))
            .ok()
            .map(|i| annotations[i].1.as_ref())
    }

    /// The port `number` of `protocol`.
    pub fn port(&self, number: u16, protocol: PortProtocol) -> Option<&PortRecord> {
        self.ports
            .iter()
            .find(|p| p.port == number && p.protocol == protocol)
    }
}

/// An address of an Endpoints subset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressRecord {
    pub ip: IpAddr,
    /// The node that hosts it; `None` for the cloud (no `nodeName`, or `cloud`).
    pub node: Option<SharedName>,
    /// Behind a thin pointer: few addresses have one.
    #[allow(clippy::box_collection, clippy::redundant_allocation)]
    hostname: Option<Box<Box<str>>>,
}

impl AddressRecord {
    fn new(a: &EndpointAddress, names: &mut Interner) -> Option<AddressRecord> {
        Some(AddressRecord {
            ip: a.ip.parse().ok()?,
            node: a.host().map(|n| names.get(n)),
            hostname: a.hostname.as_deref().map(|h| Box::new(Box::from(h))),
        })
    }

    pub fn hostname(&self) -> Option<&str> {
        self.hostname.as_deref().map(|h| &**h)
    }

    /// Who hosts this address: `Some(node)`, or `None` for cloudcore.
    pub fn host(&self) -> Option<&str> {
        self.node.as_deref()
    }
}

/// A port of an Endpoints subset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPortRecord {
    pub name: SharedName,
    pub port: u16,
    pub protocol: PortProtocol,
}

/// One subset of an Endpoints object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubsetRecord {
    pub addresses: Box<[AddressRecord]>,
    pub not_ready: Box<[AddressRecord]>,
    pub ports: SmallList<EndpointPortRecord>,
}

impl SubsetRecord {
    fn new(s: &EndpointSubset, names: &mut Interner) -> SubsetRecord {
        let addresses = |list: &[EndpointAddress], names: &mut Interner| {
            list.iter()
                .filter_map(|a| AddressRecord::new(a, names))
                .collect()
        };
        SubsetRecord {
            addresses: addresses(&s.addresses, names),
            not_ready: addresses(&s.not_ready_addresses, names),
            ports: s
                .ports
                .iter()
                .filter_map(|p| {
                    Some(EndpointPortRecord {
                        name: names.get(&p.name),
                        port: u16::try_from(p.port).ok()?,
                        protocol: PortProtocol::parse(&p.protocol)?,
                    })
                })
                .collect(),
        }
    }
}

/// The Endpoints of a Service: its subsets. Addresses that do not parse are left out (every
/// reader skipped them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointsRecord {
    pub subsets: SmallList<SubsetRecord>,
}

impl EndpointsRecord {
    pub fn new(endpoints: &Endpoints, names: &mut Interner) -> EndpointsRecord {
        EndpointsRecord {
            subsets: endpoints
                .subsets
                .iter()
                .map(|s| SubsetRecord::new(s, names))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(json: &str) -> Service {
        serde_json::from_str(json).expect("service")
    }

    #[test]
    fn a_service_keeps_what_the_data_path_reads() {
        let mut names = Interner::default();
        let s = service(
            r#"{"metadata":{"name":"web","namespace":"default","labels":{"app":"web"},
                "annotations":{"edgemesh.io/lb-policy":"random","kubectl.kubernetes.io/last-applied-configuration":"{}"}},
               "spec":{"clusterIP":"10.96.0.10","clusterIPs":["10.96.0.10","fd00::10"],
                 "sessionAffinity":"ClientIP","sessionAffinityConfig":{"clientIP":{"timeoutSeconds":60}},
                 "trafficDistribution":"PreferClose",
                 "ports":[{"name":"http","port":80,"targetPort":8080},{"name":"dns","port":53,"protocol":"UDP","targetPort":"dns"}]}}"#,
        );
        let r = ServiceRecord::new(&s, &mut names);
        assert_eq!(
            &r.cluster_ips[..],
            &[
                "10.96.0.10".parse::<IpAddr>().expect("ip"),
                "fd00::10".parse().expect("ip")
            ]
        );
        assert_eq!(r.annotation("edgemesh.io/lb-policy"), Some("random"));
        assert_eq!(
            r.annotation("kubectl.kubernetes.io/last-applied-configuration"),
            None,
            "only edgemesh's annotations are kept"
        );
        assert_eq!(r.affinity(), Some(Duration::from_secs(60)));
        assert_eq!(
            r.topology()
                .iter()
                .map(|k| k.as_ref())
                .collect::<Vec<&str>>(),
            ["topology.kubernetes.io/zone", "*"]
        );
        let http = r.port(80, PortProtocol::Tcp).expect("http");
        assert_eq!((http.target, &*http.name), (Some(8080), "http"));
        let dns = r.port(53, PortProtocol::Udp).expect("dns");
        assert_eq!(dns.target, None, "named target port");
        assert!(names.get("http").ptr_eq(&http.name), "interned");
        assert!(!r.headless && !r.publish_not_ready && r.external_name().is_none());
    }

    #[test]
    fn headless_and_external_name_services_have_no_cluster_ip() {
        let mut names = Interner::default();
        let headless = ServiceRecord::new(
            &service(
                r#"{"metadata":{"name":"h"},"spec":{"clusterIP":"None","publishNotReadyAddresses":true}}"#,
            ),
            &mut names,
        );
        assert!(headless.headless && headless.cluster_ips.is_empty());
        assert!(headless.publish_not_ready);
        let alias = ServiceRecord::new(
            &service(
                r#"{"metadata":{"name":"a"},"spec":{"type":"ExternalName","externalName":"db.example.com"}}"#,
            ),
            &mut names,
        );
        assert_eq!(alias.external_name(), Some("db.example.com"));
        assert!(alias.cluster_ips.is_empty());
    }

    #[test]
    fn endpoints_resolve_ports_by_name_and_leave_out_bad_addresses() {
        let mut names = Interner::default();
        let e: Endpoints = serde_json::from_str(
            r#"{"metadata":{"name":"web"},"subsets":[{"addresses":[{"ip":"10.0.0.1","nodeName":"a"},{"ip":"bad"},{"ip":"10.0.0.2","nodeName":"cloud"}],
                "notReadyAddresses":[{"ip":"10.0.0.3","hostname":"web-2"}],"ports":[{"name":"http","port":9090}]}]}"#,
        )
        .expect("endpoints");
        let r = EndpointsRecord::new(&e, &mut names);
        let subset = &r.subsets[0];
        assert_eq!(subset.addresses.len(), 2);
        assert_eq!(subset.addresses[0].host(), Some("a"));
        assert_eq!(subset.addresses[1].host(), None, "the cloud");
        assert_eq!(subset.not_ready[0].hostname(), Some("web-2"));
        let s = ServiceRecord::new(
            &service(
                r#"{"metadata":{"name":"web"},"spec":{"ports":[{"name":"http","port":80,"targetPort":8080},{"name":"other","port":81}]}}"#,
            ),
            &mut names,
        );
        assert_eq!(s.ports[0].endpoint_port(subset), Some(9090), "by name");
        assert_eq!(s.ports[1].endpoint_port(subset), Some(81), "no such name");
    }

    #[test]
    fn a_small_list_holds_one_item_inline_and_reads_as_a_slice() {
        let none: SmallList<u16> = std::iter::empty().collect();
        assert!(none.is_empty());
        let one: SmallList<u16> = [7].into_iter().collect();
        assert!(matches!(one, SmallList::One(7)));
        assert_eq!(&one[..], &[7]);
        let three: SmallList<u16> = [1, 2, 3].into_iter().collect();
        assert_eq!(&three[..], &[1, 2, 3]);
        assert_eq!(format!("{three:?}"), "[1, 2, 3]");
    }

    #[test]
    fn a_plain_service_and_its_endpoints_are_one_allocation_each() {
        let mut names = Interner::default();
        let s = ServiceRecord::new(
            &service(
                r#"{"metadata":{"name":"web","labels":{"app":"web"},"annotations":{"note":"x"}},
                   "spec":{"clusterIP":"10.96.0.10","ports":[{"name":"http","port":80}]}}"#,
            ),
            &mut names,
        );
        assert!(matches!(s.cluster_ips, SmallList::One(_)));
        assert!(matches!(s.ports, SmallList::One(_)));
        assert!(s.options.is_none(), "{:?}", s.options);
        assert_eq!(
            (s.topology().len(), s.affinity(), s.annotation("note")),
            (0, None, None)
        );
        let e: Endpoints = serde_json::from_str(
            r#"{"metadata":{"name":"web"},"subsets":[{"addresses":[{"ip":"10.0.0.1"},{"ip":"10.0.0.2"}],"ports":[{"name":"http","port":80}]}]}"#,
        )
        .expect("endpoints");
        let e = EndpointsRecord::new(&e, &mut names);
        assert!(matches!(e.subsets, SmallList::One(_)));
        assert!(matches!(e.subsets[0].ports, SmallList::One(_)));
        assert_eq!(e.subsets[0].addresses.len(), 2);
        // The mesh's every address, Service and Endpoints is one of these: an address (IP,
        // node, hostname) in 40 bytes, a Service and an Endpoints in 64 at most.
        use std::mem::size_of;
        assert!(
            size_of::<AddressRecord>() <= 40,
            "{}",
            size_of::<AddressRecord>()
        );
        assert!(
            size_of::<ServiceRecord>() <= 64,
            "{}",
            size_of::<ServiceRecord>()
        );
        assert!(
            size_of::<EndpointsRecord>() <= 64,
            "{}",
            size_of::<EndpointsRecord>()
        );
    }

    #[test]
    fn the_interner_drops_names_no_record_uses() {
        let mut names = Interner::default();
        for i in 0..1000 {
            drop(names.get(&format!("node-{i}")));
        }
        assert!(names.names.len() < 200, "{}", names.names.len());
        let kept = names.get("kept");
        for i in 0..1000 {
            drop(names.get(&format!("other-{i}")));
        }
        assert!(kept.ptr_eq(&names.get("kept")));
    }
}
