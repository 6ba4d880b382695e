//! The cluster zone: a compact in-memory index of the node's Services and Endpoints, kept in
//! step with the metamanager's view, and the answers it gives.
//!
//! The index holds only what DNS needs (addresses, port names, hostnames, topology tiers),
//! keyed by namespace and name, plus a reverse map from cluster IPs and named pods to their
//! Services. An update compares the view's objects with the ones each entry was built from
//! (the view shares unchanged objects between versions, so a pointer comparison finds what
//! changed) and rebuilds only those entries; entries that depend on node labels (topology,
//! unit names) are rebuilt too when the labels of the nodes change.
//!
//! What depends on the asking node is decided here, for this node, at update time: the tier of
//! every endpoint of a headless Service with topology ([`edgehub::topology`], the function the
//! proxy uses too) and the node's unit for `edgemesh.io/unit-key` names.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use edgehub::model::ANNOTATION_UNIT_KEY;
use edgehub::topology::{self, Labels, Local, Tier};
use edgehub::view::{
    EndpointsRecord, MeshView, ObjectName, PortProtocol, PortRecord, ServiceRecord,
};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use ipnet::IpNet;

/// The version of the Kubernetes DNS-Based Service Discovery specification answered, as
/// `dns-version.<domain>` TXT says.
pub const SCHEMA_VERSION: &str = "1.1.0";

/// CNAMEs followed inside the cluster zone for one query (ExternalName Services naming each
/// other); a longer chain, or a loop, ends with the CNAMEs so far.
const MAX_CHAIN: usize = 8;

/// What the cluster zone says about a name.
#[derive(Debug, Default)]
pub struct Lookup {
    /// The name (the last of a CNAME chain) does not exist.
    pub nxdomain: bool,
    /// The records asked for, after the CNAMEs that led to them.
    pub answers: Vec<Record>,
    /// The zone's SOA, for a negative answer (NXDOMAIN, or NODATA: no record of that type).
    pub authority: Option<Record>,
    /// The addresses of SRV targets.
    pub additionals: Vec<Record>,
    /// The target of the last CNAME when it lies outside the cluster zone: the caller resolves
    /// it (for the same type) and appends what it finds.
    pub chase: Option<Name>,
}

impl Lookup {
    fn answer(answers: Vec<Record>, additionals: Vec<Record>) -> Lookup {
        Lookup {
            answers,
            additionals,
            ..Lookup::default()
        }
    }

    fn nodata(soa: Record) -> Lookup {
        Lookup {
            authority: Some(soa),
            ..Lookup::default()
        }
    }

    fn nxdomain(soa: Record) -> Lookup {
        Lookup {
            nxdomain: true,
            authority: Some(soa),
            ..Lookup::default()
        }
    }

    /// Positive or negative, from whether `answers` has anything.
    fn answer_or_nodata(
        answers: Vec<Record>,
        additionals: Vec<Record>,
        soa: impl FnOnce() -> Record,
    ) -> Lookup {
        if answers.is_empty() {
            Lookup::nodata(soa())
        } else {
            Lookup::answer(answers, additionals)
        }
    }
}
/// The SRV label of a port's protocol, `_tcp`.
fn srv_label(proto: PortProtocol) -> &'static [u8] {
    match proto {
        PortProtocol::Tcp => b"_tcp",
        PortProtocol::Udp => b"_udp",
        PortProtocol::Sctp => b"_sctp",
    }
}

/// A port name, lower case: Kubernetes allows at most 15 characters (IANA service names), so
/// it is kept inline. Empty for unnamed ports, which have no SRV record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PortName {
    len: u8,
    bytes: [u8; 15],
}

impl PortName {
    /// `None` for names that cannot be a port name (too long): such ports get no SRV record.
    fn new(name: &str) -> Option<PortName> {
        let mut bytes = [0u8; 15];
        bytes
            .get_mut(..name.len())?
            .copy_from_slice(name.as_bytes());
        bytes.make_ascii_lowercase();
        Some(PortName {
            len: u8::try_from(name.len()).ok()?,
            bytes,
        })
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// The SRV name of a Service port: `None` for an unnamed port or one whose name cannot be a
/// port name (longer than 15 characters), which have no SRV record.
fn srv_name(port: &PortRecord) -> Option<&str> {
    (!port.name.is_empty() && port.name.len() <= 15).then_some(&*port.name)
}

/// An endpoint's port, as the SRV records of a headless Service give it.
#[derive(Debug, PartialEq)]
struct Port {
    name: PortName,
    proto: PortProtocol,
    port: u16,
}

impl Port {
    fn new(name: &str, proto: PortProtocol, port: u16) -> Port {
        Port {
            name: PortName::new(name).unwrap_or(PortName {
                len: 0,
                bytes: [0; 15],
            }),
            proto,
            port,
        }
    }
}

#[derive(Debug)]
struct Endpoint {
    ip: IpAddr,
    /// Lower-case hostname, when it is a valid DNS label.
    host: Option<Box<str>>,
    /// The ports of the endpoint's subset (shared by its addresses).
    ports: Arc<[Port]>,
    /// Its tier for this node; `None` when the Service's topology keys do not admit it. Without
    /// topology every endpoint is in tier 0: all are answered.
    tier: Option<Tier>,
}

/// What few Services have (a headless Service's endpoints, hostnames, an alias, a unit):
/// kept behind one pointer, so the common entry is its two records and nothing else.
#[derive(Debug, Default)]
struct Detail {
    /// Built from node labels (topology tiers, the unit): rebuilt when they change.
    by_node: bool,
    /// Headless: the distinct addresses of the endpoints in the best tier, which
    /// `<svc>.<ns>.svc.<domain>` resolves to.
    addresses: Box<[IpAddr]>,
    /// Headless: every ready endpoint (and the not-ready ones when the Service publishes
    /// them); otherwise only those with a hostname.
    endpoints: Box<[Endpoint]>,
    /// `ExternalName`: the name `<svc>.<ns>.svc.<domain>` is a CNAME to.
    alias: Option<Name>,
    /// `edgemesh.io/unit-key` is set: `<prefix>-<ordinal>` names the endpoint
    /// `<prefix>-<unit>-<ordinal>`, `unit` being this node's value of that label (lower case);
    /// `None` inside when this node has no value (such names then do not exist).
    unit: Option<Option<Box<str>>>,
}

/// One Service as DNS sees it. The cluster IPs and ports are read from the Service's record,
/// not copied: the index is kept for every Service of the mesh.
#[derive(Debug)]
struct Entry {
    /// The objects this entry was built from; compared by pointer on update.
    service: Arc<ServiceRecord>,
    endpoints_of: Option<Arc<EndpointsRecord>>,
    detail: Option<Box<Detail>>,
}

/// What an entry is built with besides its objects.
struct BuildContext<'a> {
    view: &'a MeshView,
    local: Local<'a>,
}

impl Entry {
    fn build(
        service: &Arc<ServiceRecord>,
        endpoints_of: Option<&Arc<EndpointsRecord>>,
        cx: &BuildContext<'_>,
    ) -> Entry {
        let headless = service.headless;
        let mut detail = Detail {
            alias: service
                .external_name()
                .and_then(|n| Name::from_ascii(n.to_ascii_lowercase()).ok())
                .map(|mut n| {
                    n.set_fqdn(true);
                    n
                }),
            ..Detail::default()
        };
        if let Some(key) = service.annotation(ANNOTATION_UNIT_KEY) {
            let unit = cx
                .local
                .labels
                .get(key)
                .filter(|v| !v.is_empty())
                .map(|v| v.to_ascii_lowercase().into_boxed_str());
            detail.unit = Some(unit);
        }
        let keys = service.topology();
        let topology = headless && !keys.is_empty();
        let publish_not_ready = service.publish_not_ready;
        let mut endpoints = Vec::new();
        for subset in endpoints_of.iter().flat_map(|e| e.subsets.iter()) {
            let subset_ports: Arc<[Port]> = subset
                .ports
                .iter()
                .map(|p| Port::new(&p.name, p.protocol, p.port))
                .collect();
            let not_ready = subset.not_ready.iter().filter(|_| publish_not_ready);
            for address in subset.addresses.iter().chain(not_ready) {
                let ip = address.ip;
                let host = address
                    .hostname()
                    .filter(|h| is_label(h))
                    .map(|h| h.to_ascii_lowercase().into_boxed_str());
                if !headless && host.is_none() {
                    continue;
                }
                let tier = if topology {
                    topology::tier_in(&cx.view.nodes, address.host(), &cx.local, keys)
                } else {
                    Some(Tier::LOCAL)
                };
                endpoints.push(Endpoint {
                    ip,
                    host,
                    ports: subset_ports.clone(),
                    tier,
                });
            }
        }
        if headless {
            let best = best_tier(endpoints.iter());
            let mut seen = HashSet::with_capacity(endpoints.len());
            detail.addresses = endpoints
                .iter()
                .filter(|e| e.tier.is_some() && e.tier == best)
                .map(|e| e.ip)
                .filter(|ip| seen.insert(*ip))
                .collect();
        }
        detail.by_node = topology || detail.unit.is_some();
        detail.endpoints = endpoints.into();
        let has_detail = headless
            || !detail.endpoints.is_empty()
            || detail.alias.is_some()
            || detail.unit.is_some();
        Entry {
            service: service.clone(),
            endpoints_of: endpoints_of.cloned(),
            detail: has_detail.then(|| Box::new(detail)),
        }
    }

    fn headless(&self) -> bool {
        self.service.headless
    }

    fn by_node(&self) -> bool {
        self.detail.as_ref().is_some_and(|d| d.by_node)
    }

    fn ports(&self) -> &[PortRecord] {
        &self.service.ports
    }

    fn endpoints(&self) -> &[Endpoint] {
        self.detail.as_ref().map_or(&[], |d| &d.endpoints)
    }

    fn built_from(
        &self,
        service: &Arc<ServiceRecord>,
        endpoints_of: Option<&Arc<EndpointsRecord>>,
    ) -> bool {
        Arc::ptr_eq(&self.service, service)
            && match (&self.endpoints_of, endpoints_of) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }

    /// The addresses `<svc>.<ns>.svc.<domain>` resolves to: the cluster IPs, or for a
    /// headless Service the addresses of its endpoints in the best tier.
    fn service_addresses(&self) -> &[IpAddr] {
        match &self.detail {
            Some(d) if self.headless() => &d.addresses,
            _ => self.cluster_ips(),
        }
    }

    /// The cluster IPs (none when headless).
    fn cluster_ips(&self) -> &[IpAddr] {
        &self.service.cluster_ips
    }

    fn alias(&self) -> Option<&Name> {
        self.detail.as_ref()?.alias.as_ref()
    }

    /// `Some(unit)` when the Service has `edgemesh.io/unit-key`.
    fn unit(&self) -> Option<Option<&str>> {
        self.detail.as_ref()?.unit.as_ref().map(|u| u.as_deref())
    }

    /// Addresses that own a PTR record pointing into this entry.
    fn reverse_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let named = self.endpoints().iter().filter(|e| e.host.is_some());
        self.cluster_ips()
            .iter()
            .copied()
            .chain(named.map(|e| e.ip))
    }

    /// The endpoints a host label names: its hostname (or dashed address), else for a unit
    /// Service `<prefix>-<ordinal>` the endpoint `<prefix>-<unit>-<ordinal>` of this node's
    /// unit. Every endpoint resolves by its own name, wherever it is.
    fn named<'e>(&'e self, label: &str) -> Vec<&'e Endpoint> {
        let by_ip = undashed(label);
        let exact: Vec<&Endpoint> = self
            .endpoints()
            .iter()
            .filter(|e| match &e.host {
                Some(h) => &**h == label,
                None => by_ip == Some(e.ip),
            })
            .collect();
        if !exact.is_empty() {
            return exact;
        }
        let (Some(Some(unit)), Some((prefix, ordinal))) = (self.unit(), split_ordinal(label))
        else {
            return exact;
        };
        let mut host = String::with_capacity(label.len() + unit.len() + 1);
        host.push_str(prefix);
        host.push('-');
        host.push_str(unit);
        host.push('-');
        host.push_str(ordinal);
        self.endpoints()
            .iter()
            .filter(|e| e.host.as_deref() == Some(host.as_str()))
            .collect()
    }
}

/// The best (lowest) tier among `endpoints`; `None` when none is admitted.
fn best_tier<'e>(endpoints: impl Iterator<Item = &'e Endpoint>) -> Option<Tier> {
    endpoints.filter_map(|e| e.tier).min()
}

/// `web-0` → (`web`, `0`): a StatefulSet pod name split at its ordinal.
fn split_ordinal(label: &str) -> Option<(&str, &str)> {
    let (prefix, ordinal) = label.rsplit_once('-')?;
    let digits = !ordinal.is_empty() && ordinal.bytes().all(|b| b.is_ascii_digit());
    (digits && !prefix.is_empty()).then_some((prefix, ordinal))
}

/// A DNS label as Kubernetes allows it for hostnames: 1-63 of `[a-z0-9-]`, not starting or
/// ending with `-` (upper case accepted and folded).
fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// `10-1-0-5` for 10.1.0.5, `fd00--5` for fd00::5: the name of an endpoint without hostname.
fn dashed(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string().replace('.', "-"),
        IpAddr::V6(v6) => v6.to_string().replace(':', "-"),
    }
}

fn undashed(label: &str) -> Option<IpAddr> {
    if let Ok(v4) = label.replace('-', ".").parse::<Ipv4Addr>() {
        return Some(IpAddr::V4(v4));
    }
    label
        .replace('-', ":")
        .parse::<Ipv6Addr>()
        .ok()
        .map(IpAddr::V6)
}

/// The Services an address has PTR records into: its cluster IP's Service, or the headless
/// Services that name a pod. Kept for every cluster IP of the mesh, so the common case (an
/// IPv4 address, one Service) is a 24-byte entry, and an address's further owners (a pod two
/// headless Services name) are kept apart.
#[derive(Default)]
struct Reverse {
    v4: HashMap<Ipv4Addr, ObjectName>,
    v6: HashMap<Ipv6Addr, ObjectName>,
    /// The owners after the first of an address that has several.
    more: HashMap<IpAddr, Vec<ObjectName>>,
}

impl Reverse {
    fn first(&self, ip: IpAddr) -> Option<&ObjectName> {
        match ip {
            IpAddr::V4(v4) => self.v4.get(&v4),
            IpAddr::V6(v6) => self.v6.get(&v6),
        }
    }

    fn owners(&self, ip: IpAddr) -> impl Iterator<Item = &ObjectName> {
        let more = self.more.get(&ip).map(Vec::as_slice).unwrap_or_default();
        self.first(ip).into_iter().chain(more)
    }

    fn add(&mut self, ip: IpAddr, name: &ObjectName) {
        let first = match ip {
            IpAddr::V4(v4) => self.v4.entry(v4).or_insert_with(|| name.clone()),
            IpAddr::V6(v6) => self.v6.entry(v6).or_insert_with(|| name.clone()),
        };
        if first != name {
            let more = self.more.entry(ip).or_default();
            if !more.contains(name) {
                more.push(name.clone());
            }
        }
    }

    fn remove(&mut self, ip: IpAddr, name: &ObjectName) {
        if let MapEntry::Occupied(mut more) = self.more.entry(ip) {
            let list = more.get_mut();
            if let Some(i) = list.iter().position(|n| n == name) {
                list.swap_remove(i);
                if list.is_empty() {
                    more.remove();
                }
                return;
            }
        }
        if self.first(ip) != Some(name) {
            return;
        }
        // The first owner goes: the next one, if any, takes its place.
        let next = match self.more.entry(ip) {
            MapEntry::Occupied(mut more) => {
                let next = more.get_mut().pop();
                if more.get().is_empty() {
                    more.remove();
                }
                next
            }
            MapEntry::Vacant(_) => None,
        };
        match (ip, next) {
            (IpAddr::V4(v4), Some(next)) => drop(self.v4.insert(v4, next)),
            (IpAddr::V6(v6), Some(next)) => drop(self.v6.insert(v6, next)),
            (IpAddr::V4(v4), None) => drop(self.v4.remove(&v4)),
            (IpAddr::V6(v6), None) => drop(self.v6.remove(&v6)),
        }
    }

    fn reserve(&mut self, additional: usize) {
        self.v4.reserve(additional);
    }
}

#[derive(Default)]
struct Zone {
    version: u64,
    /// By the view's `namespace/name` (the view's own names, shared).
    services: HashMap<ObjectName, Entry>,
    /// Services per namespace (a namespace name exists while it has one).
    namespaces: HashMap<Box<str>, u32>,
    /// Cluster IP or named endpoint → the services' names.
    reverse: Reverse,
    /// Entries built from node labels, and a fingerprint of the labels they were built with.
    by_node: usize,
    nodes_fingerprint: Option<u64>,
}

impl Zone {
    fn get(&self, key: &str) -> Option<&Entry> {
        self.services.get(key)
    }

    fn remove(&mut self, key: &str) {
        let Some((key, old)) = self.services.remove_entry(key) else {
            return;
        };
        let namespace = key.namespace();
        if let Some(count) = self.namespaces.get_mut(namespace) {
            *count -= 1;
            if *count == 0 {
                self.namespaces.remove(namespace);
            }
        }
        self.by_node -= usize::from(old.by_node());
        for ip in old.reverse_ips() {
            self.reverse.remove(ip, &key);
        }
    }

    fn insert(&mut self, key: ObjectName, entry: Entry) {
        self.remove(key.as_str());
        for ip in entry.reverse_ips() {
            self.reverse.add(ip, &key);
        }
        let namespace = key.namespace();
        match self.namespaces.get_mut(namespace) {
            Some(count) => *count += 1,
            None => {
                self.namespaces.insert(namespace.into(), 1);
            }
        }
        self.by_node += usize::from(entry.by_node());
        self.services.insert(key, entry);
    }
}

/// A fingerprint of every node's name and labels and of this node's labels: when it changes,
/// entries built from node labels are rebuilt.
fn nodes_fingerprint(view: &MeshView, local: &Local<'_>) -> u64 {
    let mut h = DefaultHasher::new();
    local.labels.hash(&mut h);
    for (name, node) in &view.nodes {
        name.hash(&mut h);
        node.metadata.labels.hash(&mut h);
    }
    h.finish()
}

/// What an update changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Updated {
    pub changed: usize,
    pub removed: usize,
}

/// The cluster zone of one node.
pub struct ClusterIndex {
    /// `cluster.local.`
    domain: Name,
    domain_lower: LowerName,
    service_cidr: IpNet,
    ttl: u32,
    /// This node: its name, and its configured labels (used until the view has its Node).
    node: String,
    labels: Labels,
    zone: RwLock<Zone>,
}

const IN_ADDR_ARPA_LABELS: usize = 2;

impl ClusterIndex {
    /// An empty zone for `domain` (e.g. `cluster.local`); cluster IPs in `service_cidr` get PTR
    /// records, and the reverse names of that range are answered here rather than forwarded.
    pub fn new(domain: &str, service_cidr: IpNet, ttl: u32) -> Result<Self, String> {
        let mut domain = Name::from_ascii(domain.to_ascii_lowercase())
            .map_err(|e| format!("cluster domain {domain:?}: {e}"))?;
        domain.set_fqdn(true);
        Ok(ClusterIndex {
            domain_lower: LowerName::new(&domain),
            domain,
            service_cidr,
            ttl,
            node: String::new(),
            labels: Labels::new(),
            zone: RwLock::new(Zone::default()),
        })
    }

    /// The zone as node `name` (configured with `labels`) sees it: topology tiers and unit
    /// names are decided for this node.
    pub fn for_node(mut self, name: &str, labels: Labels) -> Self {
        self.node = name.to_string();
        self.labels = labels;
        self
    }

    fn read(&self) -> RwLockReadGuard<'_, Zone> {
        // Updates never leave the zone half-written (each entry is replaced whole), so a
        // poisoned lock still guards a usable zone.
        self.zone.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of services indexed.
    pub fn len(&self) -> usize {
        self.read().services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Brings the index to `view`, rebuilding only the entries whose objects changed (and
    /// those built from node labels, when the labels changed).
    pub fn update(&self, view: &MeshView) -> Updated {
        let local = Local::in_view(&view.nodes, &self.node, &self.labels);
        let mut stale = Vec::new();
        let mut removals = Vec::new();
        let mut added = 0usize;
        let version_changed;
        let mut fingerprint = None;
        {
            let zone = self.read();
            version_changed = zone.version != view.version;
            let nodes_changed = zone.by_node > 0 && {
                let now = nodes_fingerprint(view, &local);
                fingerprint = Some(now);
                zone.nodes_fingerprint != Some(now)
            };
            let mut endpoints = view.endpoints.iter().peekable();
            for (k, service) in &view.services {
                // Both maps are ordered by (namespace, name): walk them together.
                while endpoints.next_if(|(e, _)| *e < k).is_some() {}
                let eps = endpoints.peek().filter(|(e, _)| *e == k).map(|(_, e)| *e);
                let current = zone.get(k.as_str());
                if current
                    .is_some_and(|c| c.built_from(service, eps) && !(nodes_changed && c.by_node()))
                {
                    continue;
                }
                added += usize::from(current.is_none());
                stale.push((k, service, eps));
            }
            if zone.services.len() + added > view.services.len() {
                for key in zone.services.keys() {
                    if !view.services.contains_key(key) {
                        removals.push(key.clone());
                    }
                }
            }
        }
        let updated = Updated {
            changed: stale.len(),
            removed: removals.len(),
        };
        if stale.is_empty() && removals.is_empty() && !version_changed {
            return updated;
        }
        let write = || self.zone.write().unwrap_or_else(|p| p.into_inner());
        {
            let mut zone = write();
            for key in removals {
                zone.remove(key.as_str());
            }
            // Grown once, not by doubling while inserting.
            zone.services.reserve(added);
            zone.reverse.reserve(added);
        }
        let cx = BuildContext { view, local };
        // Entries are built outside the lock, a slice at a time, so queries keep being
        // answered during a large snapshot and little is held besides the index itself.
        for chunk in stale.chunks(256) {
            let entries: Vec<Entry> = chunk
                .iter()
                .map(|(_, service, eps)| Entry::build(service, *eps, &cx))
                .collect();
            let mut zone = write();
            for ((k, _, _), entry) in chunk.iter().zip(entries) {
                zone.insert((*k).clone(), entry);
            }
        }
        let mut zone = write();
        zone.nodes_fingerprint = (zone.by_node > 0)
            .then(|| fingerprint.unwrap_or_else(|| nodes_fingerprint(view, &cx.local)));
        zone.version = view.version;
        updated
    }

    /// The zone's SOA, owned by `owner` (the cluster domain, or a reverse zone).
    fn soa(&self, owner: Name, serial: u64) -> Record {
        let mname = Name::from_ascii("ns.dns")
            .and_then(|n| n.append_domain(&self.domain))
            .unwrap_or_else(|_| self.domain.clone());
        let rname = Name::from_ascii("hostmaster")
            .and_then(|n| n.append_domain(&self.domain))
            .unwrap_or_else(|_| self.domain.clone());
        let soa = SOA::new(mname, rname, serial as u32, 7200, 1800, 86400, self.ttl);
        Record::from_rdata(owner, self.ttl, RData::SOA(soa))
    }

    fn record(&self, owner: &Name, data: RData) -> Record {
        Record::from_rdata(owner.clone(), self.ttl, data)
    }

    fn address_record(&self, owner: &Name, ip: IpAddr) -> Record {
        match ip {
            IpAddr::V4(v4) => self.record(owner, RData::A(A(v4))),
            IpAddr::V6(v6) => self.record(owner, RData::AAAA(AAAA(v6))),
        }
    }

    /// `<svc>.<ns>.svc.<domain>.`
    fn service_name(&self, namespace: &str, name: &str) -> Option<Name> {
        Name::from_labels([name.as_bytes(), namespace.as_bytes(), b"svc"])
            .and_then(|n| n.append_domain(&self.domain))
            .ok()
    }

    /// What the cluster zone says about `name`, or `None` when the name is not the zone's
    /// (it is then forwarded). `name` is lower case, as every query name is made.
    pub fn lookup(&self, name: &LowerName, qtype: RecordType) -> Option<Lookup> {
        if self.domain_lower.zone_of(name) {
            let zone = self.read();
            return Some(self.lookup_cluster(&zone, name, qtype, 0));
        }
        self.lookup_reverse(name, qtype)
    }

    fn lookup_cluster(
        &self,
        zone: &Zone,
        name: &LowerName,
        qtype: RecordType,
        chain: usize,
    ) -> Lookup {
        let owner = Name::from(name);
        let soa = || self.soa(self.domain.clone(), zone.version);
        let nxdomain = || Lookup::nxdomain(soa());
        let nodata = || Lookup::nodata(soa());
        let depth = usize::from(name.num_labels())
            .saturating_sub(usize::from(self.domain_lower.num_labels()));
        // At most `_port._proto.<svc>.<ns>.svc` sits in front of the domain.
        if depth > 5 {
            return nxdomain();
        }
        let mut labels: [&[u8]; 5] = [b""; 5];
        for (slot, label) in labels.iter_mut().zip(owner.iter().take(depth)) {
            *slot = label;
        }
        let labels = &labels[..depth];
        match labels {
            [] => {
                if matches!(qtype, RecordType::SOA | RecordType::ANY) {
                    return Lookup::answer(vec![soa()], Vec::new());
                }
                nodata()
            }
            [b"dns-version"] => {
                if matches!(qtype, RecordType::TXT | RecordType::ANY) {
                    let txt = TXT::new(vec![SCHEMA_VERSION.to_string()]);
                    return Lookup::answer(vec![self.record(&owner, RData::TXT(txt))], Vec::new());
                }
                nodata()
            }
            [b"svc"] => nodata(),
            [.., svc] if *svc != b"svc" => nxdomain(),
            [ns, _] => match std::str::from_utf8(ns) {
                Ok(ns) if zone.namespaces.contains_key(ns) => nodata(),
                _ => nxdomain(),
            },
            [service, ns, _] => {
                let Some((entry, ns, service)) = find(zone, ns, service) else {
                    return nxdomain();
                };
                if let Some(target) = entry.alias() {
                    return self.alias(zone, &owner, target, qtype, chain);
                }
                let mut answers = Vec::new();
                let mut additionals = Vec::new();
                for ip in entry.service_addresses() {
                    if wants(qtype, *ip) {
                        answers.push(self.address_record(&owner, *ip));
                    }
                }
                if qtype == RecordType::SRV {
                    for port in entry.ports().iter().filter(|p| srv_name(p).is_some()) {
                        self.srv(
                            entry,
                            ns,
                            service,
                            &owner,
                            port,
                            &mut answers,
                            &mut additionals,
                        );
                    }
                }
                Lookup::answer_or_nodata(answers, additionals, soa)
            }
            [first, service, ns, _] => {
                let Some((entry, _, _)) = find(zone, ns, service) else {
                    return nxdomain();
                };
                if first.first() == Some(&b'_') {
                    // `_tcp.<svc>...`: exists when a named port uses that protocol.
                    let exists = entry
                        .ports()
                        .iter()
                        .any(|p| srv_name(p).is_some() && srv_label(p.protocol) == *first);
                    return if exists { nodata() } else { nxdomain() };
                }
                let Ok(first) = std::str::from_utf8(first) else {
                    return nxdomain();
                };
                let named = entry.named(first);
                if named.is_empty() {
                    return nxdomain();
                }
                let mut seen = HashSet::new();
                let answers = named
                    .iter()
                    .filter(|e| seen.insert(e.ip) && wants(qtype, e.ip))
                    .map(|e| self.address_record(&owner, e.ip))
                    .collect();
                Lookup::answer_or_nodata(answers, Vec::new(), soa)
            }
            [port, proto, service, ns, _] => {
                let Some((entry, ns, service)) = find(zone, ns, service) else {
                    return nxdomain();
                };
                let Some(port_name) = port.strip_prefix(b"_") else {
                    return nxdomain();
                };
                let Some(port) = entry.ports().iter().find(|p| {
                    srv_name(p).is_some_and(|n| n.as_bytes().eq_ignore_ascii_case(port_name))
                        && srv_label(p.protocol) == *proto
                }) else {
                    return nxdomain();
                };
                if !matches!(qtype, RecordType::SRV | RecordType::ANY) {
                    return nodata();
                }
                let mut answers = Vec::new();
                let mut additionals = Vec::new();
                self.srv(
                    entry,
                    ns,
                    service,
                    &owner,
                    port,
                    &mut answers,
                    &mut additionals,
                );
                Lookup::answer_or_nodata(answers, additionals, soa)
            }
            _ => nxdomain(),
        }
    }

    /// An ExternalName Service: a CNAME to `target`, then what the target has of `qtype`,
    /// looked up here when it is a cluster name, else left for the caller to resolve.
    fn alias(
        &self,
        zone: &Zone,
        owner: &Name,
        target: &Name,
        qtype: RecordType,
        chain: usize,
    ) -> Lookup {
        let cname = self.record(owner, RData::CNAME(CNAME(target.clone())));
        if matches!(qtype, RecordType::CNAME | RecordType::ANY) {
            return Lookup::answer(vec![cname], Vec::new());
        }
        let target_lower = LowerName::new(target);
        if !self.domain_lower.zone_of(&target_lower) {
            let mut l = Lookup::answer(vec![cname], Vec::new());
            l.chase = Some(target.clone());
            return l;
        }
        if chain + 1 >= MAX_CHAIN {
            return Lookup::answer(vec![cname], Vec::new());
        }
        let mut rest = self.lookup_cluster(zone, &target_lower, qtype, chain + 1);
        rest.answers.insert(0, cname);
        rest
    }

    /// SRV records of one service port: the service itself for a cluster IP, each endpoint
    /// serving the port for a headless service (those of the best tier, with topology); the
    /// targets' addresses go to `additionals`.
    #[allow(clippy::too_many_arguments)]
    fn srv(
        &self,
        entry: &Entry,
        namespace: &str,
        service: &str,
        owner: &Name,
        port: &PortRecord,
        answers: &mut Vec<Record>,
        additionals: &mut Vec<Record>,
    ) {
        let Some(service_name) = self.service_name(namespace, service) else {
            return;
        };
        if !entry.headless() {
            if entry.cluster_ips().is_empty() {
                return;
            }
            let srv = SRV::new(0, 100, port.port, service_name.clone());
            answers.push(self.record(owner, RData::SRV(srv)));
            for ip in entry.cluster_ips() {
                additionals.push(self.address_record(&service_name, *ip));
            }
            return;
        }
        let name = srv_name(port).unwrap_or_default().as_bytes();
        let mut serving: Vec<(&Endpoint, u16)> = entry
            .endpoints()
            .iter()
            .filter_map(|e| {
                e.ports
                    .iter()
                    .find(|p| {
                        p.name.as_bytes().eq_ignore_ascii_case(name) && p.proto == port.protocol
                    })
                    .map(|p| (e, p.port))
            })
            .collect();
        let best = best_tier(serving.iter().map(|(e, _)| *e));
        serving.retain(|(e, _)| e.tier.is_some() && e.tier == best);
        let weight = u16::try_from((100 / serving.len().max(1)).max(1)).unwrap_or(1);
        for (e, p) in serving {
            let Some(target) = self.endpoint_name(e, &service_name) else {
                continue;
            };
            additionals.push(self.address_record(&target, e.ip));
            answers.push(self.record(owner, RData::SRV(SRV::new(0, weight, p, target))));
        }
    }

    /// `<hostname>.<svc>.<ns>.svc.<domain>.`, or the dashed address for an endpoint without
    /// a hostname.
    fn endpoint_name(&self, e: &Endpoint, service_name: &Name) -> Option<Name> {
        let label = match &e.host {
            Some(h) => h.to_string(),
            None => dashed(e.ip),
        };
        Name::from_labels([label.as_bytes()])
            .and_then(|n| n.append_domain(service_name))
            .ok()
    }

    /// The PTR targets of `ip`: the Service of a cluster IP, and `<hostname>.<svc>...` of
    /// every named endpoint at that address.
    fn ptr_targets(&self, zone: &Zone, ip: IpAddr) -> Vec<Name> {
        let mut out = Vec::new();
        for key in zone.reverse.owners(ip) {
            let Some(entry) = zone.services.get(key) else {
                continue;
            };
            let Some(service_name) = self.service_name(key.namespace(), key.name()) else {
                continue;
            };
            if entry.cluster_ips().contains(&ip) {
                out.push(service_name.clone());
            }
            for e in entry
                .endpoints()
                .iter()
                .filter(|e| e.ip == ip && e.host.is_some())
            {
                if let Some(name) = self.endpoint_name(e, &service_name) {
                    if !out.contains(&name) {
                        out.push(name);
                    }
                }
            }
        }
        out
    }

    /// PTR records: the reverse names of the service CIDR are this zone's (NXDOMAIN when no
    /// Service holds the address); elsewhere the addresses of named endpoints (Kubernetes'
    /// PTR for headless pods with a hostname) are answered, and every other name forwarded.
    fn lookup_reverse(&self, name: &LowerName, qtype: RecordType) -> Option<Lookup> {
        let net = Name::from(name).parse_arpa_name().ok()?;
        let complete = net.prefix_len() == net.max_prefix_len();
        let owner = Name::from(name);
        let zone = self.read();
        if !self.service_cidr.contains(&net) {
            if !complete {
                return None;
            }
            let targets = self.ptr_targets(&zone, net.addr());
            if targets.is_empty() {
                return None;
            }
            if !matches!(qtype, RecordType::PTR | RecordType::ANY) {
                // `in-addr.arpa.` or `ip6.arpa.`: the apex above the address.
                let apex = owner.trim_to(IN_ADDR_ARPA_LABELS);
                return Some(Lookup::nodata(self.soa(apex, zone.version)));
            }
            return Some(self.ptr_answer(&owner, targets));
        }
        // The SOA of the reverse zone: the whole octets (nibbles) of the service CIDR.
        let zone_labels = match self.service_cidr {
            IpNet::V4(n) => IN_ADDR_ARPA_LABELS + usize::from(n.prefix_len() / 8),
            IpNet::V6(n) => IN_ADDR_ARPA_LABELS + usize::from(n.prefix_len() / 4),
        };
        let soa = self.soa(owner.trim_to(zone_labels), zone.version);
        if !complete {
            // A name between the zone and the addresses: it exists only to hold them.
            return Some(Lookup::nodata(soa));
        }
        let targets = self.ptr_targets(&zone, net.addr());
        if targets.is_empty() {
            return Some(Lookup::nxdomain(soa));
        }
        if !matches!(qtype, RecordType::PTR | RecordType::ANY) {
            return Some(Lookup::nodata(soa));
        }
        Some(self.ptr_answer(&owner, targets))
    }

    fn ptr_answer(&self, owner: &Name, targets: Vec<Name>) -> Lookup {
        let answers = targets
            .into_iter()
            .map(|t| self.record(owner, RData::PTR(PTR(t))))
            .collect();
        Lookup::answer(answers, Vec::new())
    }
}

/// The entry of `<service>.<ns>`, with its namespace and name.
fn find<'z>(zone: &'z Zone, ns: &[u8], service: &[u8]) -> Option<(&'z Entry, &'z str, &'z str)> {
    let separator = |b: &u8| *b == b'.' || *b == b'/';
    if ns.iter().any(separator) || service.iter().any(separator) {
        return None;
    }
    // Labels are at most 63 bytes: the key fits on the stack.
    let mut buf = [0u8; 128];
    let len = ns.len() + 1 + service.len();
    let key = buf.get_mut(..len)?;
    key[..ns.len()].copy_from_slice(ns);
    key[ns.len()] = b'/';
    key[ns.len() + 1..].copy_from_slice(service);
    let key = std::str::from_utf8(key).ok()?;
    let (key, entry) = zone.services.get_key_value(key)?;
    Some((entry, key.namespace(), key.name()))
}

fn wants(qtype: RecordType, ip: IpAddr) -> bool {
    match qtype {
        RecordType::A => ip.is_ipv4(),
        RecordType::AAAA => ip.is_ipv6(),
        RecordType::ANY => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgehub::model::{Endpoints, Service};
    use edgehub::view::{Interner, ObjectName};
    use std::str::FromStr;

    fn service(ns: &str, name: &str, ip: &str, ports: &[(&str, &str, i64)]) -> Arc<ServiceRecord> {
        let ports: Vec<String> = ports
            .iter()
            .map(|(n, p, port)| format!(r#"{{"name":"{n}","protocol":"{p}","port":{port}}}"#))
            .collect();
        let json = format!(
            r#"{{"metadata":{{"name":"{name}","namespace":"{ns}"}},"spec":{{"clusterIP":"{ip}","ports":[{}]}}}}"#,
            ports.join(",")
        );
        obj(&json)
    }

    fn endpoints(
        ns: &str,
        name: &str,
        addrs: &[(&str, Option<&str>)],
        ports: &[(&str, &str, i64)],
    ) -> Arc<EndpointsRecord> {
        let addrs: Vec<String> = addrs
            .iter()
            .map(|(ip, host)| match host {
                Some(h) => format!(r#"{{"ip":"{ip}","hostname":"{h}"}}"#),
                None => format!(r#"{{"ip":"{ip}"}}"#),
            })
            .collect();
        let ports: Vec<String> = ports
            .iter()
            .map(|(n, p, port)| format!(r#"{{"name":"{n}","protocol":"{p}","port":{port}}}"#))
            .collect();
        let json = format!(
            r#"{{"metadata":{{"name":"{name}","namespace":"{ns}"}},"subsets":[{{"addresses":[{}],"notReadyAddresses":[{{"ip":"10.1.9.9"}}],"ports":[{}]}}]}}"#,
            addrs.join(","),
            ports.join(",")
        );
        obj(&json)
    }

    fn key(ns: &str, name: &str) -> ObjectName {
        ObjectName::new(ns, name)
    }

    fn view() -> MeshView {
        let mut v = MeshView::at(7, None);
        v.services.insert(
            key("default", "hello"),
            service(
                "default",
                "hello",
                "10.96.0.10",
                &[("http", "TCP", 80), ("dns", "UDP", 53)],
            ),
        );
        v.services.insert(
            key("default", "db"),
            service("default", "db", "None", &[("pg", "TCP", 5432)]),
        );
        v.endpoints.insert(
            key("default", "db"),
            endpoints(
                "default",
                "db",
                &[
                    ("10.1.0.5", Some("db-0")),
                    ("10.1.0.6", Some("db-1")),
                    ("10.1.0.7", None),
                ],
                &[("pg", "TCP", 15432)],
            ),
        );
        v.services
            .insert(key("other", "v6"), service("other", "v6", "fd00::a", &[]));
        v
    }

    fn index() -> ClusterIndex {
        let i = ClusterIndex::new("cluster.local", "10.96.0.0/12".parse().unwrap(), 5).unwrap();
        i.update(&view());
        i
    }

    fn q(i: &ClusterIndex, name: &str, t: RecordType) -> Option<Lookup> {
        i.lookup(&LowerName::from_str(name).unwrap(), t)
    }

    fn answers(l: Option<Lookup>) -> Vec<String> {
        match l {
            Some(l) if !l.nxdomain && l.authority.is_none() && !l.answers.is_empty() => {
                l.answers.iter().map(|r| r.data.to_string()).collect()
            }
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    /// The SOA of a negative answer: (NXDOMAIN?, the SOA's owner).
    fn negative(l: Option<Lookup>) -> Option<(bool, Record)> {
        let l = l?;
        let soa = l.authority.filter(|r| r.record_type() == RecordType::SOA)?;
        Some((l.nxdomain, soa))
    }

    fn is_nx(l: Option<Lookup>) -> bool {
        negative(l).is_some_and(|(nx, _)| nx)
    }

    fn is_nodata(l: Option<Lookup>) -> bool {
        matches!(&l, Some(l) if l.answers.is_empty()) && negative(l).is_some_and(|(nx, _)| !nx)
    }

    #[test]
    fn an_address_keeps_its_owners_in_any_order_of_removal() {
        let ip: IpAddr = "10.1.0.5".parse().unwrap();
        let v6: IpAddr = "fd00::5".parse().unwrap();
        let (a, b, c) = (key("x", "a"), key("x", "b"), key("x", "c"));
        let owners = |r: &Reverse, ip| r.owners(ip).map(|n| n.to_string()).collect::<Vec<_>>();
        let mut r = Reverse::default();
        for n in [&a, &b, &c, &b] {
            r.add(ip, n);
        }
        r.add(v6, &a);
        assert_eq!(owners(&r, ip), ["x/a", "x/b", "x/c"]);
        r.remove(ip, &key("x", "nobody"));
        assert_eq!(
            owners(&r, ip),
            ["x/a", "x/b", "x/c"],
            "an unknown owner changes nothing"
        );
        r.remove(ip, &a);
        assert_eq!(owners(&r, ip).len(), 2);
        assert!(!owners(&r, ip).contains(&"x/a".to_string()));
        r.remove(ip, &c);
        assert_eq!(owners(&r, ip), ["x/b"]);
        r.remove(ip, &b);
        assert!(owners(&r, ip).is_empty() && r.more.is_empty() && r.v4.is_empty());
        assert_eq!(owners(&r, v6), ["x/a"]);
        r.remove(v6, &a);
        assert!(r.v6.is_empty());
    }

    #[test]
    fn plain_services_hold_nothing_besides_their_records() {
        let mut v = view();
        v.endpoints.insert(
            key("default", "hello"),
            endpoints(
                "default",
                "hello",
                &[("10.1.0.8", None)],
                &[("http", "TCP", 8080)],
            ),
        );
        let i = ClusterIndex::new("cluster.local", "10.96.0.0/12".parse().unwrap(), 5).unwrap();
        i.update(&v);
        let zone = i.read();
        let detail = |ns, name| zone.get(key(ns, name).as_str()).map(|e| e.detail.is_some());
        assert_eq!(
            detail("default", "hello"),
            Some(false),
            "a cluster IP without hostnames"
        );
        assert_eq!(detail("other", "v6"), Some(false));
        assert_eq!(detail("default", "db"), Some(true), "headless");
        assert_eq!(std::mem::size_of::<Entry>(), 24);
    }

    #[test]
    fn answers_every_record_kind() {
        let i = index();
        let a = RecordType::A;
        assert_eq!(
            answers(q(&i, "hello.default.svc.cluster.local.", a)),
            ["10.96.0.10"]
        );
        assert_eq!(
            answers(q(&i, "db.default.svc.cluster.local.", a)),
            ["10.1.0.5", "10.1.0.6", "10.1.0.7"]
        );
        assert_eq!(
            answers(q(&i, "db-1.db.default.svc.cluster.local.", a)),
            ["10.1.0.6"]
        );
        assert_eq!(
            answers(q(&i, "10-1-0-7.db.default.svc.cluster.local.", a)),
            ["10.1.0.7"]
        );
        assert_eq!(
            answers(q(&i, "v6.other.svc.cluster.local.", RecordType::AAAA)),
            ["fd00::a"]
        );
        assert_eq!(
            answers(q(
                &i,
                "_http._tcp.hello.default.svc.cluster.local.",
                RecordType::SRV
            )),
            ["0 100 80 hello.default.svc.cluster.local."]
        );
        assert_eq!(
            answers(q(
                &i,
                "_pg._tcp.db.default.svc.cluster.local.",
                RecordType::SRV
            )),
            [
                "0 33 15432 db-0.db.default.svc.cluster.local.",
                "0 33 15432 db-1.db.default.svc.cluster.local.",
                "0 33 15432 10-1-0-7.db.default.svc.cluster.local."
            ]
        );
        assert_eq!(
            answers(q(&i, "hello.default.svc.cluster.local.", RecordType::SRV)).len(),
            2
        );
        assert_eq!(
            answers(q(&i, "10.0.96.10.in-addr.arpa.", RecordType::PTR)),
            ["hello.default.svc.cluster.local."]
        );
        assert_eq!(answers(q(&i, "cluster.local.", RecordType::SOA)).len(), 1);
    }

    #[test]
    fn negative_answers_carry_the_soa() {
        let i = index();
        let a = RecordType::A;
        assert!(is_nx(q(&i, "nope.default.svc.cluster.local.", a)));
        assert!(is_nx(q(&i, "hello.nons.svc.cluster.local.", a)));
        assert!(is_nx(q(&i, "db-9.db.default.svc.cluster.local.", a)));
        assert!(is_nx(q(
            &i,
            "_nope._tcp.hello.default.svc.cluster.local.",
            RecordType::SRV
        )));
        assert!(is_nx(q(
            &i,
            "_http._udp.hello.default.svc.cluster.local.",
            RecordType::SRV
        )));
        assert!(is_nx(q(&i, "a.b.c.d.e.f.cluster.local.", a)));
        assert!(is_nx(q(&i, "x.pod.cluster.local.", a)));
        assert!(is_nx(q(&i, "11.0.96.10.in-addr.arpa.", RecordType::PTR)));
        assert!(is_nodata(q(
            &i,
            "hello.default.svc.cluster.local.",
            RecordType::AAAA
        )));
        assert!(is_nodata(q(
            &i,
            "hello.default.svc.cluster.local.",
            RecordType::TXT
        )));
        assert!(is_nodata(q(&i, "_tcp.hello.default.svc.cluster.local.", a)));
        assert!(is_nodata(q(&i, "default.svc.cluster.local.", a)));
        assert!(is_nodata(q(&i, "svc.cluster.local.", a)));
        assert!(is_nodata(q(&i, "cluster.local.", a)));
        assert!(is_nodata(q(
            &i,
            "_http._tcp.hello.default.svc.cluster.local.",
            a
        )));
        // Not the zone's: forwarded.
        assert!(q(&i, "example.com.", a).is_none());
        assert!(q(&i, "cluster.local.example.com.", a).is_none());
        assert!(q(&i, "5.0.244.10.in-addr.arpa.", RecordType::PTR).is_none());
        // SOA serial is the metadata version.
        let (_, soa) = negative(q(&i, "nope.default.svc.cluster.local.", a)).expect("soa");
        assert_eq!(soa.name.to_string(), "cluster.local.");
        assert!(soa.data.to_string().contains(" 7 "), "{}", soa.data);
        let (_, soa) = negative(q(&i, "11.0.96.10.in-addr.arpa.", RecordType::PTR)).expect("soa");
        assert_eq!(soa.name.to_string(), "10.in-addr.arpa.");
    }

    #[test]
    fn updates_follow_the_view_and_touch_only_what_changed() {
        let i = index();
        let mut v = view();
        // The same objects: nothing to do.
        let first = view();
        let i2 = ClusterIndex::new("cluster.local", "10.96.0.0/12".parse().unwrap(), 5).unwrap();
        assert_eq!(i2.update(&first).changed, 3);
        assert_eq!(i2.update(&first), Updated::default());
        // New objects (as a snapshot would bring) rebuild entries; removed ones go.
        v.services.remove(&key("other", "v6"));
        v.services.insert(
            key("default", "hello"),
            service("default", "hello", "10.96.0.11", &[("http", "TCP", 8080)]),
        );
        let u = i.update(&v);
        assert_eq!(u.removed, 1);
        assert_eq!(i.len(), 2);
        assert_eq!(
            answers(q(&i, "hello.default.svc.cluster.local.", RecordType::A)),
            ["10.96.0.11"]
        );
        assert!(is_nx(q(&i, "10.0.96.10.in-addr.arpa.", RecordType::PTR)));
        assert!(is_nx(q(
            &i,
            "v6.other.svc.cluster.local.",
            RecordType::AAAA
        )));
        assert!(is_nx(q(&i, "other.svc.cluster.local.", RecordType::A)));
        assert_eq!(
            answers(q(
                &i,
                "_http._tcp.hello.default.svc.cluster.local.",
                RecordType::SRV
            )),
            ["0 100 8080 hello.default.svc.cluster.local."]
        );
        // Endpoints going away empty a headless service but keep its name.
        v.endpoints.clear();
        i.update(&v);
        assert!(is_nodata(q(
            &i,
            "db.default.svc.cluster.local.",
            RecordType::A
        )));
    }

    /// The view's record of an object written as JSON.
    trait Recorded {
        fn from_json(json: &str) -> Self;
    }

    impl Recorded for ServiceRecord {
        fn from_json(json: &str) -> Self {
            let s: Service = serde_json::from_str(json).expect("service json");
            ServiceRecord::new(&s, &mut Interner::default())
        }
    }

    impl Recorded for EndpointsRecord {
        fn from_json(json: &str) -> Self {
            let e: Endpoints = serde_json::from_str(json).expect("endpoints json");
            EndpointsRecord::new(&e, &mut Interner::default())
        }
    }

    fn obj<T: Recorded>(json: &str) -> Arc<T> {
        Arc::new(T::from_json(json))
    }

    fn node(name: &str, location: &str) -> Arc<edgehub::model::Node> {
        let labels = [("location".to_string(), location.to_string())]
            .into_iter()
            .collect();
        Arc::new(edgehub::model::Node::new(name, labels))
    }

    /// Nodes a, b (beijing) and c (guangzhou); `web` (headless, `spec` as given, unit key
    /// `location`) with pods web-beijing-0 on a, web-beijing-1 on b, web-guangzhou-0 on c.
    fn units_view(spec: &str) -> MeshView {
        let mut v = MeshView::at(3, None);
        v.nodes.insert("a".into(), node("a", "beijing"));
        v.nodes.insert("b".into(), node("b", "beijing"));
        v.nodes.insert("c".into(), node("c", "guangzhou"));
        v.services.insert(
            key("default", "web"),
            obj(&format!(
                r#"{{"metadata":{{"name":"web","namespace":"default","annotations":{{"edgemesh.io/unit-key":"location"}}}},"spec":{spec}}}"#
            )),
        );
        v.endpoints.insert(
            key("default", "web"),
            obj(
                r#"{"metadata":{"name":"web","namespace":"default"},"subsets":[{"addresses":[
                {"ip":"10.244.1.10","nodeName":"a","hostname":"web-beijing-0"},
                {"ip":"10.244.2.10","nodeName":"b","hostname":"web-beijing-1"},
                {"ip":"10.244.3.10","nodeName":"c","hostname":"web-guangzhou-0"}],
                "ports":[{"name":"http","port":8080}]}]}"#,
            ),
        );
        v
    }

    fn index_for(node: &str, v: &MeshView) -> ClusterIndex {
        let i = ClusterIndex::new("cluster.local", "10.96.0.0/12".parse().unwrap(), 5)
            .unwrap()
            .for_node(node, Labels::new());
        i.update(v);
        i
    }

    const WEB: &str = "web.default.svc.cluster.local.";

    #[test]
    fn headless_services_with_topology_answer_the_best_tier_for_this_node() {
        let v = units_view(
            r#"{"clusterIP":"None","topologyKeys":["location"],"ports":[{"name":"http","port":8080}]}"#,
        );
        let a = RecordType::A;
        // This node first, then its unit; never another unit without `*`.
        assert_eq!(answers(q(&index_for("a", &v), WEB, a)), ["10.244.1.10"]);
        assert_eq!(answers(q(&index_for("c", &v), WEB, a)), ["10.244.3.10"]);
        let d = index_for("d", &{
            let mut v = v.clone();
            v.nodes.insert("d".into(), node("d", "beijing"));
            v
        });
        assert_eq!(answers(q(&d, WEB, a)), ["10.244.1.10", "10.244.2.10"]);
        assert_eq!(
            answers(q(
                &d,
                "_http._tcp.web.default.svc.cluster.local.",
                RecordType::SRV
            )),
            [
                "0 50 8080 web-beijing-0.web.default.svc.cluster.local.",
                "0 50 8080 web-beijing-1.web.default.svc.cluster.local."
            ]
        );
        // Every pod keeps its own name everywhere.
        assert_eq!(
            answers(q(&d, "web-guangzhou-0.web.default.svc.cluster.local.", a)),
            ["10.244.3.10"]
        );
        // A node in a unit without pods, or without the label: the name exists, no address.
        let mut lonely = v.clone();
        lonely.nodes.insert("e".into(), node("e", "shanghai"));
        assert!(is_nodata(q(&index_for("e", &lonely), WEB, a)));
        assert!(is_nodata(q(&index_for("nobody", &v), WEB, a)));
        // With `*`, the rest of the fleet is the last tier.
        let star = units_view(r#"{"clusterIP":"None","topologyKeys":["location","*"]}"#);
        let mut star = star;
        star.nodes.insert("e".into(), node("e", "shanghai"));
        assert_eq!(
            answers(q(&index_for("e", &star), WEB, a)),
            ["10.244.1.10", "10.244.2.10", "10.244.3.10"]
        );
        // Without topology nothing is filtered.
        let plain = units_view(r#"{"clusterIP":"None"}"#);
        assert_eq!(answers(q(&index_for("a", &plain), WEB, a)).len(), 3);
        // PreferClose: this node, then its unit (the unit key), then any.
        let close = units_view(r#"{"clusterIP":"None","trafficDistribution":"PreferClose"}"#);
        assert_eq!(answers(q(&index_for("c", &close), WEB, a)), ["10.244.3.10"]);
        let mut close_e = close.clone();
        close_e.nodes.insert("e".into(), node("e", "shanghai"));
        assert_eq!(answers(q(&index_for("e", &close_e), WEB, a)).len(), 3);
    }

    #[test]
    fn unit_names_resolve_to_this_units_pod_and_nothing_else() {
        let v = units_view(r#"{"clusterIP":"None"}"#);
        let a = RecordType::A;
        let name = "web-0.web.default.svc.cluster.local.";
        assert_eq!(answers(q(&index_for("a", &v), name, a)), ["10.244.1.10"]);
        assert_eq!(answers(q(&index_for("c", &v), name, a)), ["10.244.3.10"]);
        assert_eq!(
            answers(q(
                &index_for("b", &v),
                "web-1.web.default.svc.cluster.local.",
                a
            )),
            ["10.244.2.10"]
        );
        // No such ordinal in guangzhou; a node without the label: never another unit's pod.
        assert!(is_nx(q(
            &index_for("c", &v),
            "web-1.web.default.svc.cluster.local.",
            a
        )));
        assert!(is_nx(q(&index_for("nobody", &v), name, a)));
        assert!(is_nodata(q(&index_for("a", &v), name, RecordType::AAAA)));
        // The per-unit names resolve from every unit; PTR names them.
        let c = index_for("c", &v);
        assert_eq!(
            answers(q(&c, "web-beijing-0.web.default.svc.cluster.local.", a)),
            ["10.244.1.10"]
        );
        assert_eq!(
            answers(q(&c, "10.1.244.10.in-addr.arpa.", RecordType::PTR)),
            ["web-beijing-0.web.default.svc.cluster.local."]
        );
        // Without the annotation the short name does not exist.
        let mut plain = v.clone();
        plain.services.insert(
            key("default", "web"),
            obj(r#"{"metadata":{"name":"web","namespace":"default"},"spec":{"clusterIP":"None"}}"#),
        );
        assert!(is_nx(q(&index_for("a", &plain), name, a)));
    }

    #[test]
    fn relabelling_a_node_rebuilds_what_depends_on_labels() {
        let mut v = units_view(r#"{"clusterIP":"None","topologyKeys":["location"]}"#);
        v.services.insert(
            key("default", "hello"),
            service("default", "hello", "10.96.0.10", &[]),
        );
        let i = index_for("a", &v);
        let name = "web-0.web.default.svc.cluster.local.";
        assert_eq!(answers(q(&i, name, RecordType::A)), ["10.244.1.10"]);
        // Node a moves to guangzhou: its unit name and (once its own pod is gone) tier change.
        v.nodes.insert("a".into(), node("a", "guangzhou"));
        v.version += 1;
        assert_eq!(i.update(&v).changed, 1, "only the entry built from labels");
        assert_eq!(answers(q(&i, name, RecordType::A)), ["10.244.3.10"]);
        // A change elsewhere that leaves labels as they were rebuilds nothing.
        v.nodes.insert("b".into(), node("b", "beijing"));
        v.version += 1;
        assert_eq!(i.update(&v).changed, 0);
        v.endpoints.insert(
            key("default", "web"),
            obj(
                r#"{"metadata":{"name":"web","namespace":"default"},"subsets":[{"addresses":[
                {"ip":"10.244.2.10","nodeName":"b","hostname":"web-beijing-1"},
                {"ip":"10.244.3.10","nodeName":"c","hostname":"web-guangzhou-0"}]}]}"#,
            ),
        );
        v.version += 1;
        i.update(&v);
        assert_eq!(answers(q(&i, WEB, RecordType::A)), ["10.244.3.10"]);
    }

    #[test]
    fn conformance_records_dns_version_pod_ptr_and_unready_endpoints() {
        let mut v = view();
        v.endpoints.insert(
            key("default", "db"),
            obj(r#"{"metadata":{"name":"db","namespace":"default"},"subsets":[{"addresses":[
                {"ip":"10.244.1.21","hostname":"db-0"},{"ip":"fd00::21","hostname":"db-1"},{"ip":"10.244.1.22"}],
                "notReadyAddresses":[{"ip":"10.244.1.23","hostname":"db-2"}]}]}"#),
        );
        let i = ClusterIndex::new("cluster.local", "10.96.0.0/12".parse().unwrap(), 5).unwrap();
        i.update(&v);
        assert_eq!(
            answers(q(&i, "dns-version.cluster.local.", RecordType::TXT)),
            ["1.1.0"]
        );
        assert!(is_nodata(q(
            &i,
            "dns-version.cluster.local.",
            RecordType::A
        )));
        assert_eq!(
            answers(q(&i, "21.1.244.10.in-addr.arpa.", RecordType::PTR)),
            ["db-0.db.default.svc.cluster.local."]
        );
        let v6 = "1.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.";
        assert_eq!(
            answers(q(&i, v6, RecordType::PTR)),
            ["db-1.db.default.svc.cluster.local."]
        );
        let (nx, soa) = negative(q(&i, v6, RecordType::A)).expect("nodata");
        assert!(!nx);
        assert_eq!(soa.name.to_string(), "ip6.arpa.");
        // A pod without hostname, or not ready, has no PTR here: forwarded.
        assert!(q(&i, "22.1.244.10.in-addr.arpa.", RecordType::PTR).is_none());
        assert!(q(&i, "23.1.244.10.in-addr.arpa.", RecordType::PTR).is_none());
        assert!(is_nx(q(
            &i,
            "db-2.db.default.svc.cluster.local.",
            RecordType::A
        )));
        // The legacy annotation publishes the not-ready one.
        v.services.insert(
            key("default", "db"),
            obj(r#"{"metadata":{"name":"db","namespace":"default","annotations":{"service.alpha.kubernetes.io/tolerate-unready-endpoints":"true"}},"spec":{"clusterIP":"None"}}"#),
        );
        v.version += 1;
        i.update(&v);
        assert_eq!(
            answers(q(&i, "db-2.db.default.svc.cluster.local.", RecordType::A)),
            ["10.244.1.23"]
        );
        assert_eq!(
            answers(q(&i, "db.default.svc.cluster.local.", RecordType::A)).len(),
            3
        );
        assert_eq!(
            answers(q(&i, "23.1.244.10.in-addr.arpa.", RecordType::PTR)),
            ["db-2.db.default.svc.cluster.local."]
        );
        // Its PTR goes with the Service.
        v.services.remove(&key("default", "db"));
        i.update(&v);
        assert!(q(&i, "21.1.244.10.in-addr.arpa.", RecordType::PTR).is_none());
    }

    #[test]
    fn external_names_are_cnames_followed_inside_the_cluster_only() {
        let mut v = view();
        let ext = |name: &str, target: &str| -> Arc<ServiceRecord> {
            obj(&format!(
                r#"{{"metadata":{{"name":"{name}","namespace":"default"}},"spec":{{"type":"ExternalName","externalName":"{target}"}}}}"#
            ))
        };
        v.services.insert(
            key("default", "cloud-db"),
            ext("cloud-db", "DB.Example.com"),
        );
        v.services.insert(
            key("default", "alias"),
            ext("alias", "hello.default.svc.cluster.local"),
        );
        v.services.insert(
            key("default", "gone"),
            ext("gone", "nope.default.svc.cluster.local."),
        );
        v.services.insert(
            key("default", "loop1"),
            ext("loop1", "loop2.default.svc.cluster.local"),
        );
        v.services.insert(
            key("default", "loop2"),
            ext("loop2", "loop1.default.svc.cluster.local"),
        );
        let i = ClusterIndex::new("cluster.local", "10.96.0.0/12".parse().unwrap(), 5).unwrap();
        i.update(&v);
        let l = q(&i, "cloud-db.default.svc.cluster.local.", RecordType::A).expect("ours");
        assert_eq!(l.answers.len(), 1);
        assert_eq!(l.answers[0].data.to_string(), "db.example.com.");
        assert_eq!(
            l.chase.map(|n| n.to_string()).as_deref(),
            Some("db.example.com.")
        );
        let l = q(&i, "cloud-db.default.svc.cluster.local.", RecordType::CNAME).expect("ours");
        assert!(l.chase.is_none() && l.answers.len() == 1);
        assert_eq!(
            answers(q(&i, "alias.default.svc.cluster.local.", RecordType::A)),
            ["hello.default.svc.cluster.local.", "10.96.0.10"]
        );
        let l = q(&i, "gone.default.svc.cluster.local.", RecordType::A).expect("ours");
        assert!(
            l.nxdomain && l.answers.len() == 1 && l.authority.is_some(),
            "{l:?}"
        );
        let l = q(&i, "loop1.default.svc.cluster.local.", RecordType::A).expect("ours");
        assert_eq!(l.answers.len(), MAX_CHAIN, "a loop ends");
        assert!(l.chase.is_none());
        // No cluster IP, so no PTR and nothing below the name.
        assert!(is_nx(q(
            &i,
            "x.cloud-db.default.svc.cluster.local.",
            RecordType::A
        )));
    }

    #[test]
    fn names_are_matched_case_insensitively_through_lower_name() {
        let i = index();
        assert_eq!(
            answers(q(&i, "HeLLo.DEFAULT.svc.Cluster.Local.", RecordType::A)),
            ["10.96.0.10"]
        );
    }
}
