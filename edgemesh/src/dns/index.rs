//! The cluster zone: a compact in-memory index of the node's Services and Endpoints, kept in
//! step with the metamanager's view, and the answers it gives.
//!
//! The index holds only what DNS needs (addresses, port names, hostnames), keyed by namespace
//! and name, plus a reverse map from cluster IP to service. An update compares the view's
//! objects with the ones each entry was built from (the view shares unchanged objects between
//! versions, so a pointer comparison finds what changed) and rebuilds only those entries.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use edgehub::metamanager::MeshView;
use edgehub::model::{Endpoints, Service};
use hickory_proto::rr::rdata::{A, AAAA, PTR, SOA, SRV};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use ipnet::IpNet;

/// What the cluster zone says about a name.
#[derive(Debug)]
pub enum Lookup {
    /// The records asked for (and the addresses of SRV targets).
    Answer {
        answers: Vec<Record>,
        additionals: Vec<Record>,
    },
    /// The name exists, but has no records of the type asked for; carries the zone's SOA.
    NoData(Record),
    /// The name does not exist; carries the zone's SOA.
    NxDomain(Record),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    fn parse(s: &str) -> Option<Proto> {
        if s.eq_ignore_ascii_case("tcp") {
            Some(Proto::Tcp)
        } else if s.eq_ignore_ascii_case("udp") {
            Some(Proto::Udp)
        } else if s.eq_ignore_ascii_case("sctp") {
            Some(Proto::Sctp)
        } else {
            None
        }
    }

    /// The SRV label, `_tcp`.
    fn label(self) -> &'static [u8] {
        match self {
            Proto::Tcp => b"_tcp",
            Proto::Udp => b"_udp",
            Proto::Sctp => b"_sctp",
        }
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

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[derive(Debug, PartialEq)]
struct Port {
    name: PortName,
    proto: Proto,
    port: u16,
}

impl Port {
    fn parse(name: &str, protocol: &str, port: i64) -> Option<Port> {
        Some(Port {
            name: PortName::new(name).unwrap_or(PortName {
                len: 0,
                bytes: [0; 15],
            }),
            proto: Proto::parse(protocol)?,
            port: u16::try_from(port).ok()?,
        })
    }
}

/// Addresses, inline when there is one (a service's cluster IP, the common case).
#[derive(Debug)]
enum Addrs {
    One(IpAddr),
    Many(Box<[IpAddr]>),
}

impl Addrs {
    fn new(mut list: Vec<IpAddr>) -> Addrs {
        if list.len() == 1 {
            Addrs::One(list[0])
        } else {
            list.shrink_to_fit();
            Addrs::Many(list.into())
        }
    }

    fn as_slice(&self) -> &[IpAddr] {
        match self {
            Addrs::One(ip) => std::slice::from_ref(ip),
            Addrs::Many(list) => list,
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
}

/// One Service as DNS sees it.
#[derive(Debug)]
struct Entry {
    /// The objects this entry was built from; compared by pointer on update.
    service: Arc<Service>,
    endpoints_of: Option<Arc<Endpoints>>,
    headless: bool,
    /// What `<svc>.<ns>.svc.<domain>` resolves to: the cluster IPs, or for a headless service
    /// the distinct endpoint addresses.
    addresses: Addrs,
    ports: Box<[Port]>,
    /// Headless: every ready endpoint (and the not-ready ones with `publishNotReadyAddresses`);
    /// otherwise only those with a hostname.
    endpoints: Box<[Endpoint]>,
}

impl Entry {
    fn build(service: &Arc<Service>, endpoints_of: Option<&Arc<Endpoints>>) -> Entry {
        let headless = service.is_headless();
        let mut cluster_ips = Vec::new();
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
        let ports: Vec<Port> = service
            .spec
            .ports
            .iter()
            .filter_map(|p| Port::parse(&p.name, &p.protocol, p.port))
            .collect();
        let publish_not_ready = service.spec.publish_not_ready_addresses == Some(true);
        let mut endpoints = Vec::new();
        for subset in endpoints_of.iter().flat_map(|e| e.subsets.iter()) {
            let subset_ports: Arc<[Port]> = subset
                .ports
                .iter()
                .filter_map(|p| Port::parse(&p.name, &p.protocol, p.port))
                .collect();
            let not_ready = subset
                .not_ready_addresses
                .iter()
                .filter(|_| headless && publish_not_ready);
            for address in subset.addresses.iter().chain(not_ready) {
                let Ok(ip) = address.ip.parse::<IpAddr>() else {
                    continue;
                };
                let host = address
                    .hostname
                    .as_deref()
                    .filter(|h| is_label(h))
                    .map(|h| h.to_ascii_lowercase().into_boxed_str());
                if headless || host.is_some() {
                    endpoints.push(Endpoint {
                        ip,
                        host,
                        ports: subset_ports.clone(),
                    });
                }
            }
        }
        let addresses = if headless {
            let mut seen = HashSet::with_capacity(endpoints.len());
            endpoints
                .iter()
                .map(|e| e.ip)
                .filter(|ip| seen.insert(*ip))
                .collect()
        } else {
            cluster_ips
        };
        endpoints.shrink_to_fit();
        Entry {
            service: service.clone(),
            endpoints_of: endpoints_of.cloned(),
            headless,
            addresses: Addrs::new(addresses),
            ports: ports.into(),
            endpoints: endpoints.into(),
        }
    }

    fn built_from(&self, service: &Arc<Service>, endpoints_of: Option<&Arc<Endpoints>>) -> bool {
        Arc::ptr_eq(&self.service, service)
            && match (&self.endpoints_of, endpoints_of) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }

    /// The addresses `<svc>.<ns>.svc.<domain>` resolves to.
    fn service_addresses(&self) -> &[IpAddr] {
        self.addresses.as_slice()
    }

    /// The cluster IPs (none when headless).
    fn cluster_ips(&self) -> &[IpAddr] {
        if self.headless {
            &[]
        } else {
            self.addresses.as_slice()
        }
    }
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

#[derive(Default)]
struct Zone {
    version: u64,
    /// By `<name>.<namespace>`, which is how a query spells it.
    services: HashMap<Arc<str>, Entry>,
    /// Services per namespace (a namespace name exists while it has one).
    namespaces: HashMap<Box<str>, u32>,
    /// Cluster IP → the service's key.
    reverse: HashMap<IpAddr, Arc<str>>,
}

/// `<name>.<namespace>`.
fn service_key(namespace: &str, name: &str) -> String {
    let mut key = String::with_capacity(name.len() + 1 + namespace.len());
    key.push_str(name);
    key.push('.');
    key.push_str(namespace);
    key
}

/// (namespace, name) of a key.
fn split_key(key: &str) -> (&str, &str) {
    let (name, namespace) = key.split_once('.').unwrap_or((key, ""));
    (namespace, name)
}

impl Zone {
    fn get(&self, key: &str) -> Option<&Entry> {
        self.services.get(key)
    }

    fn remove(&mut self, key: &str) {
        let Some((key, old)) = self.services.remove_entry(key) else {
            return;
        };
        let (namespace, _) = split_key(&key);
        if let Some(count) = self.namespaces.get_mut(namespace) {
            *count -= 1;
            if *count == 0 {
                self.namespaces.remove(namespace);
            }
        }
        for ip in old.cluster_ips() {
            if self.reverse.get(ip).is_some_and(|k| *k == key) {
                self.reverse.remove(ip);
            }
        }
    }

    fn insert(&mut self, namespace: &str, name: &str, entry: Entry) {
        let key: Arc<str> = service_key(namespace, name).into();
        self.remove(&key);
        for ip in entry.cluster_ips() {
            self.reverse.insert(*ip, key.clone());
        }
        match self.namespaces.get_mut(namespace) {
            Some(count) => *count += 1,
            None => {
                self.namespaces.insert(namespace.into(), 1);
            }
        }
        self.services.insert(key, entry);
    }
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
            zone: RwLock::new(Zone::default()),
        })
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

    /// Brings the index to `view`, rebuilding only the entries whose objects changed.
    pub fn update(&self, view: &MeshView) -> Updated {
        let mut stale = Vec::new();
        let mut removals = Vec::new();
        let mut added = 0usize;
        let version_changed;
        {
            let zone = self.read();
            version_changed = zone.version != view.version;
            let mut endpoints = view.endpoints.iter().peekable();
            let mut key = String::new();
            for (k, service) in &view.services {
                // Both maps are ordered by (namespace, name): walk them together.
                while endpoints.next_if(|(e, _)| *e < k).is_some() {}
                let eps = endpoints.peek().filter(|(e, _)| *e == k).map(|(_, e)| *e);
                key.clear();
                key.push_str(&k.1);
                key.push('.');
                key.push_str(&k.0);
                let current = zone.get(&key);
                if current.is_some_and(|c| c.built_from(service, eps)) {
                    continue;
                }
                added += usize::from(current.is_none());
                stale.push((k, service, eps));
            }
            if zone.services.len() + added > view.services.len() {
                for key in zone.services.keys() {
                    let (ns, name) = split_key(key);
                    if view.service(ns, name).is_none() {
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
                zone.remove(&key);
            }
            // Grown once, not by doubling while inserting.
            zone.services.reserve(added);
            zone.reverse.reserve(added);
        }
        // Entries are built outside the lock, a slice at a time, so queries keep being
        // answered during a large snapshot and little is held besides the index itself.
        for chunk in stale.chunks(256) {
            let entries: Vec<Entry> = chunk
                .iter()
                .map(|(_, service, eps)| Entry::build(service, *eps))
                .collect();
            let mut zone = write();
            for ((k, _, _), entry) in chunk.iter().zip(entries) {
                zone.insert(&k.0, &k.1, entry);
            }
        }
        write().version = view.version;
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
            return Some(self.lookup_cluster(&zone, name, qtype));
        }
        self.lookup_reverse(name, qtype)
    }

    fn lookup_cluster(&self, zone: &Zone, name: &LowerName, qtype: RecordType) -> Lookup {
        let owner = Name::from(name);
        let nxdomain = || Lookup::NxDomain(self.soa(self.domain.clone(), zone.version));
        let nodata = || Lookup::NoData(self.soa(self.domain.clone(), zone.version));
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
                    let soa = self.soa(self.domain.clone(), zone.version);
                    return Lookup::Answer {
                        answers: vec![soa],
                        additionals: Vec::new(),
                    };
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
                let mut answers = Vec::new();
                let mut additionals = Vec::new();
                for ip in entry.service_addresses() {
                    if wants(qtype, *ip) {
                        answers.push(self.address_record(&owner, *ip));
                    }
                }
                if qtype == RecordType::SRV {
                    for port in entry.ports.iter().filter(|p| !p.name.is_empty()) {
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
                if answers.is_empty() {
                    return nodata();
                }
                Lookup::Answer {
                    answers,
                    additionals,
                }
            }
            [first, service, ns, _] => {
                let Some((entry, _, _)) = find(zone, ns, service) else {
                    return nxdomain();
                };
                if first.first() == Some(&b'_') {
                    // `_tcp.<svc>...`: exists when a named port uses that protocol.
                    let exists = entry
                        .ports
                        .iter()
                        .any(|p| !p.name.is_empty() && p.proto.label() == *first);
                    return if exists { nodata() } else { nxdomain() };
                }
                let Ok(first) = std::str::from_utf8(first) else {
                    return nxdomain();
                };
                let by_ip = undashed(first);
                let mut found = false;
                let mut answers = Vec::new();
                let mut seen = HashSet::new();
                for e in entry.endpoints.iter() {
                    let hit = match &e.host {
                        Some(h) => &**h == first,
                        None => by_ip == Some(e.ip),
                    };
                    if hit && seen.insert(e.ip) {
                        found = true;
                        if wants(qtype, e.ip) {
                            answers.push(self.address_record(&owner, e.ip));
                        }
                    }
                }
                match (found, answers.is_empty()) {
                    (false, _) => nxdomain(),
                    (true, true) => nodata(),
                    (true, false) => Lookup::Answer {
                        answers,
                        additionals: Vec::new(),
                    },
                }
            }
            [port, proto, service, ns, _] => {
                let Some((entry, ns, service)) = find(zone, ns, service) else {
                    return nxdomain();
                };
                let Some(port_name) = port.strip_prefix(b"_") else {
                    return nxdomain();
                };
                let Some(port) = entry.ports.iter().find(|p| {
                    !p.name.is_empty()
                        && p.name.as_bytes() == port_name
                        && p.proto.label() == *proto
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
                if answers.is_empty() {
                    return nodata();
                }
                Lookup::Answer {
                    answers,
                    additionals,
                }
            }
            _ => nxdomain(),
        }
    }

    /// SRV records of one service port: the service itself for a cluster IP, each endpoint
    /// serving the port for a headless service; the targets' addresses go to `additionals`.
    #[allow(clippy::too_many_arguments)]
    fn srv(
        &self,
        entry: &Entry,
        namespace: &str,
        service: &str,
        owner: &Name,
        port: &Port,
        answers: &mut Vec<Record>,
        additionals: &mut Vec<Record>,
    ) {
        let Some(service_name) = self.service_name(namespace, service) else {
            return;
        };
        if !entry.headless {
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
        let serving: Vec<(&Endpoint, u16)> = entry
            .endpoints
            .iter()
            .filter_map(|e| {
                e.ports
                    .iter()
                    .find(|p| p.name == port.name && p.proto == port.proto)
                    .map(|p| (e, p.port))
            })
            .collect();
        let weight = u16::try_from((100 / serving.len().max(1)).max(1)).unwrap_or(1);
        for (e, p) in serving {
            let label = match &e.host {
                Some(h) => h.to_string(),
                None => dashed(e.ip),
            };
            let Ok(target) =
                Name::from_labels([label.as_bytes()]).and_then(|n| n.append_domain(&service_name))
            else {
                continue;
            };
            additionals.push(self.address_record(&target, e.ip));
            answers.push(self.record(owner, RData::SRV(SRV::new(0, weight, p, target))));
        }
    }

    /// PTR records for cluster IPs; the reverse names of the service CIDR are this zone's.
    fn lookup_reverse(&self, name: &LowerName, qtype: RecordType) -> Option<Lookup> {
        let net = Name::from(name).parse_arpa_name().ok()?;
        if !self.service_cidr.contains(&net) {
            return None;
        }
        let zone = self.read();
        // The SOA of the reverse zone: the whole octets (nibbles) of the service CIDR.
        let zone_labels = match self.service_cidr {
            IpNet::V4(n) => IN_ADDR_ARPA_LABELS + usize::from(n.prefix_len() / 8),
            IpNet::V6(n) => IN_ADDR_ARPA_LABELS + usize::from(n.prefix_len() / 4),
        };
        let owner = Name::from(name);
        let soa = self.soa(owner.trim_to(zone_labels), zone.version);
        if net.prefix_len() != net.max_prefix_len() {
            // A name between the zone and the addresses: it exists only to hold them.
            return Some(Lookup::NoData(soa));
        }
        let Some(key) = zone.reverse.get(&net.addr()) else {
            return Some(Lookup::NxDomain(soa));
        };
        let (ns, svc) = split_key(key);
        if !matches!(qtype, RecordType::PTR | RecordType::ANY) {
            return Some(Lookup::NoData(soa));
        }
        let Some(target) = self.service_name(ns, svc) else {
            return Some(Lookup::NxDomain(soa));
        };
        Some(Lookup::Answer {
            answers: vec![self.record(&owner, RData::PTR(PTR(target)))],
            additionals: Vec::new(),
        })
    }
}

/// The entry of `<service>.<ns>`, with its namespace and name.
fn find<'z>(zone: &'z Zone, ns: &[u8], service: &[u8]) -> Option<(&'z Entry, &'z str, &'z str)> {
    if ns.contains(&b'.') || service.contains(&b'.') {
        return None;
    }
    // Labels are at most 63 bytes: the key fits on the stack.
    let mut buf = [0u8; 128];
    let len = service.len() + 1 + ns.len();
    let key = buf.get_mut(..len)?;
    key[..service.len()].copy_from_slice(service);
    key[service.len()] = b'.';
    key[service.len() + 1..].copy_from_slice(ns);
    let key = std::str::from_utf8(key).ok()?;
    let (key, entry) = zone.services.get_key_value(key)?;
    let (ns, name) = split_key(key);
    Some((entry, ns, name))
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
    use std::str::FromStr;

    fn service(ns: &str, name: &str, ip: &str, ports: &[(&str, &str, i64)]) -> Arc<Service> {
        let ports: Vec<String> = ports
            .iter()
            .map(|(n, p, port)| format!(r#"{{"name":"{n}","protocol":"{p}","port":{port}}}"#))
            .collect();
        let json = format!(
            r#"{{"metadata":{{"name":"{name}","namespace":"{ns}"}},"spec":{{"clusterIP":"{ip}","ports":[{}]}}}}"#,
            ports.join(",")
        );
        Arc::new(serde_json::from_str(&json).expect("service json"))
    }

    fn endpoints(
        ns: &str,
        name: &str,
        addrs: &[(&str, Option<&str>)],
        ports: &[(&str, &str, i64)],
    ) -> Arc<Endpoints> {
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
        Arc::new(serde_json::from_str(&json).expect("endpoints json"))
    }

    fn key(ns: &str, name: &str) -> (String, String) {
        (ns.to_string(), name.to_string())
    }

    fn view() -> MeshView {
        let mut v = MeshView {
            version: 7,
            ..MeshView::default()
        };
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
            Some(Lookup::Answer { answers, .. }) => {
                answers.iter().map(|r| r.data.to_string()).collect()
            }
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    fn is_nx(l: Option<Lookup>) -> bool {
        matches!(l, Some(Lookup::NxDomain(soa)) if soa.record_type() == RecordType::SOA)
    }

    fn is_nodata(l: Option<Lookup>) -> bool {
        matches!(l, Some(Lookup::NoData(soa)) if soa.record_type() == RecordType::SOA)
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
        match q(&i, "nope.default.svc.cluster.local.", a) {
            Some(Lookup::NxDomain(soa)) => {
                assert_eq!(soa.name.to_string(), "cluster.local.");
                assert!(soa.data.to_string().contains(" 7 "), "{}", soa.data);
            }
            other => panic!("{other:?}"),
        }
        match q(&i, "11.0.96.10.in-addr.arpa.", RecordType::PTR) {
            Some(Lookup::NxDomain(soa)) => assert_eq!(soa.name.to_string(), "10.in-addr.arpa."),
            other => panic!("{other:?}"),
        }
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

    #[test]
    fn names_are_matched_case_insensitively_through_lower_name() {
        let i = index();
        assert_eq!(
            answers(q(&i, "HeLLo.DEFAULT.svc.Cluster.Local.", RecordType::A)),
            ["10.96.0.10"]
        );
    }
}
