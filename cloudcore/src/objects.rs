//! The write path for metadata objects: validation, cluster IP allocation and uniqueness, and
//! atomic application of one or many objects to the store. REST handlers, `apply` and the hub
//! (node labels) all write through here, so every rule holds whichever way an object arrives.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use edgehub::model::{
    validate_community, validate_endpoints, validate_node, validate_service, FieldError, Kind,
    Node, NodeCertificate, Object, ObjectKey,
};
use ipnet::IpNet;

use crate::store::{Change, ChangeOp, Record, Since, Store, StoreError, Write};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A document failed validation. `index` is its position in a multi-object request.
    #[error("{}{err}", index.map(|i| format!("document {i} ({object}): ")).unwrap_or_default())]
    Invalid {
        index: Option<usize>,
        /// `Kind namespace/name`, to find the document in a long manifest.
        object: String,
        err: FieldError,
    },
    #[error("{field}: {message}")]
    Conflict { field: String, message: String },
    #[error("{}{object} is {size} bytes; objects are at most {MAX_OBJECT_BYTES} bytes", index.map(|i| format!("document {i}: ")).unwrap_or_default())]
    TooLarge {
        index: Option<usize>,
        object: String,
        size: usize,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Largest object (canonical JSON) the store accepts. Every node receives every object in one
/// message, so this also bounds what one change costs each node and the hub.
pub const MAX_OBJECT_BYTES: usize = 1 << 20;

/// What happened to one object.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    pub kind: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    pub name: String,
    /// `created`, `configured` or `unchanged`.
    pub action: &'static str,
    pub resource_version: String,
}

/// Cluster IPs in use, so allocation and uniqueness checks need no scan of the store.
#[derive(Default)]
struct IpIndex {
    by_ip: HashMap<IpAddr, (String, String)>,
    /// The store version the index reflects. A write that allocated from it is made
    /// conditional on the store still being there ([`Store::write_at`]), so two writers (two
    /// replicas on one etcd) can never hand out the same address.
    version: u64,
}

/// How often a write is tried again when the store moved under it (writes through other
/// replicas). Each try first catches up, so only a write storm on one Service range exhausts
/// it, and then the caller gets a 409 to retry.
const MAX_ATTEMPTS: usize = 64;

pub struct Objects {
    store: Arc<dyn Store>,
    service_cidr: IpNet,
    /// Serialises service writes with the IP index they check and update.
    ips: Mutex<IpIndex>,
    /// Held by node deletion and by a connecting node's admission, so the two cannot
    /// interleave (a node deleted mid-connect must not re-create its object).
    admission: Mutex<()>,
}

impl Objects {
    pub fn new(store: Arc<dyn Store>, service_cidr: IpNet) -> Result<Self, StoreError> {
        let objects = Objects {
            store,
            service_cidr,
            ips: Mutex::new(IpIndex::default()),
            admission: Mutex::new(()),
        };
        objects.catch_up(&mut objects.lock_ips())?;
        Ok(objects)
    }

    fn lock_ips(&self) -> std::sync::MutexGuard<'_, IpIndex> {
        self.ips.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings the IP index to the store's version: from the changes since, or from a
    /// consistent snapshot when they are no longer kept.
    fn catch_up(&self, ips: &mut IpIndex) -> Result<(), StoreError> {
        let since = if ips.version == 0 {
            Since::Gone
        } else {
            self.store.changes_since(ips.version, None)
        };
        match since {
            Since::Current => {}
            Since::Changes(changes) => {
                for c in changes.iter().filter(|c| c.key.kind == Kind::Service) {
                    let me = (c.key.namespace.clone(), c.key.name.clone());
                    ips.by_ip.retain(|_, holder| *holder != me);
                    if c.op != ChangeOp::Delete {
                        if let Some(ip) = cluster_ip_of(&c.json) {
                            ips.by_ip.insert(ip, me);
                        }
                    }
                }
                ips.version = changes.last().map_or(ips.version, |c| c.version);
            }
            Since::Gone => {
                let snap = self.store.snapshot()?;
                ips.by_ip.clear();
                for rec in snap.records.iter().filter(|r| r.key.kind == Kind::Service) {
                    if let Some(ip) = cluster_ip_of(&rec.json) {
                        ips.by_ip
                            .insert(ip, (rec.key.namespace.clone(), rec.key.name.clone()));
                    }
                }
                ips.version = snap.version;
            }
        }
        Ok(())
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn service_cidr(&self) -> IpNet {
        self.service_cidr
    }

    /// The lock that orders node admission against node deletion.
    pub fn admission(&self) -> std::sync::MutexGuard<'_, ()> {
        self.admission.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Validates and applies the objects atomically: all or nothing. `expect_version` per
    /// object comes from its `metadata.resourceVersion` when the caller wants that checked.
    /// A Node's `status.certificate` is cloudcore's to write ([`Objects::set_node_certificate`]):
    /// an applied Node keeps the stored one, whatever it says.
    pub fn apply(
        &self,
        mut objects: Vec<Object>,
        check_versions: bool,
    ) -> Result<Vec<Outcome>, ApplyError> {
        for object in &mut objects {
            if let Object::Node(node) = object {
                let stored = self.stored_node(&node.metadata.name)?;
                node.set_certificate(stored.and_then(|n| n.certificate()).as_ref());
            }
        }
        self.write_objects(objects, check_versions)
    }

    fn write_objects(
        &self,
        objects: Vec<Object>,
        check_versions: bool,
    ) -> Result<Vec<Outcome>, ApplyError> {
        self.apply_guarded(objects, check_versions, None)
    }

    /// [`Objects::apply`], tried again while the store moves under it; with `token_of`, the
    /// batch fails with [`StoreError::Revoked`] unless that node still has a token.
    fn apply_guarded(
        &self,
        objects: Vec<Object>,
        check_versions: bool,
        token_of: Option<&str>,
    ) -> Result<Vec<Outcome>, ApplyError> {
        let mut last = None;
        for _ in 0..MAX_ATTEMPTS {
            match self.try_apply(objects.clone(), check_versions, token_of) {
                Err(ApplyError::Store(e @ StoreError::Stale { .. })) => last = Some(e),
                other => return other,
            }
        }
        let why = last.map(|e| e.to_string()).unwrap_or_default();
        Err(ApplyError::Conflict {
            field: String::new(),
            message: format!("the store kept changing while this was written ({why}); try again"),
        })
    }

    fn try_apply(
        &self,
        objects: Vec<Object>,
        check_versions: bool,
        token_of: Option<&str>,
    ) -> Result<Vec<Outcome>, ApplyError> {
        let multi = objects.len() > 1;
        let at = |i: usize| if multi { Some(i) } else { None };
        let mut ips = self.lock_ips();
        self.catch_up(&mut ips)?;
        let has_services = objects.iter().any(|o| matches!(o, Object::Service(_)));
        // IPs taken by earlier documents of this same request.
        let mut claimed: HashMap<IpAddr, (String, String)> = HashMap::new();
        let mut writes = Vec::with_capacity(objects.len());
        let mut keys = Vec::with_capacity(objects.len());
        for (i, mut object) in objects.into_iter().enumerate() {
            let label = object_label(&object.key());
            let invalid = |err: FieldError| ApplyError::Invalid {
                index: at(i),
                object: label.clone(),
                err,
            };
            match &mut object {
                Object::Service(svc) => {
                    validate_service(svc, &self.service_cidr).map_err(invalid)?;
                    let key = (svc.metadata.namespace.clone(), svc.metadata.name.clone());
                    // An ExternalName Service stored before has no IP to keep.
                    let existing = self.existing_service_ip(&key)?.filter(|ip| !ip.is_empty());
                    self.settle_cluster_ip(svc, existing, &ips.by_ip, &claimed)
                        .map_err(|e| match e {
                            IpProblem::Invalid(err) => invalid(err),
                            IpProblem::Conflict(message) => ApplyError::Conflict {
                                field: "spec.clusterIP".into(),
                                message,
                            },
                        })?;
                    if let Some(ip) = svc.cluster_ip() {
                        claimed.insert(ip, key);
                    }
                }
                Object::Endpoints(ep) => {
                    validate_endpoints(ep, &self.service_cidr).map_err(invalid)?
                }
                Object::Node(node) => validate_node(node).map_err(invalid)?,
                Object::Community(c) => validate_community(c).map_err(invalid)?,
            }
            let expect_version = if check_versions {
                match object.meta().resource_version.as_str() {
                    "" => None,
                    v => Some(v.parse::<u64>().map_err(|_| {
                        invalid(FieldError::new(
                            "metadata.resourceVersion",
                            format!("invalid resourceVersion {v:?}"),
                        ))
                    })?),
                }
            } else {
                None
            };
            let size = object.to_json().len();
            if size > MAX_OBJECT_BYTES {
                return Err(ApplyError::TooLarge {
                    index: at(i),
                    object: label,
                    size,
                });
            }
            keys.push((object.key(), object.meta().resource_version.clone()));
            writes.push(Write::Put {
                object,
                expect_version,
            });
        }
        if let Some(node) = token_of {
            writes.push(Write::RequireToken {
                node: node.to_string(),
            });
        }
        // Only an allocation depends on what else is stored; everything else the store checks
        // itself at commit.
        let base = has_services.then_some(ips.version);
        let changes = self.store.write_at(base, writes)?;
        drop(ips);
        // By key: a search per document would make a 10,000-object apply quadratic.
        let by_key: HashMap<&ObjectKey, &Arc<Change>> =
            changes.iter().map(|c| (&c.key, c)).collect();
        Ok(keys
            .into_iter()
            .map(|(key, old_version)| {
                let change = by_key.get(&key).copied();
                Outcome {
                    kind: key.kind.as_str().to_string(),
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    action: match change.map(|c| c.op) {
                        Some(ChangeOp::Insert) => "created",
                        Some(_) => "configured",
                        None => "unchanged",
                    },
                    resource_version: change.map(|c| c.version.to_string()).unwrap_or(old_version),
                }
            })
            .collect())
    }

    /// Deletes one object.
    pub fn delete(&self, key: &ObjectKey) -> Result<Arc<Change>, ApplyError> {
        let changes = self.store.write(vec![Write::Delete { key: key.clone() }])?;
        changes
            .into_iter()
            .next()
            .ok_or_else(|| ApplyError::Store(StoreError::NotFound(key.clone())))
    }

    pub fn get(&self, key: &ObjectKey) -> Result<Option<Record>, StoreError> {
        self.store.get(key)
    }

    /// Makes sure the Node object exists and, when `labels` is given, carries those labels
    /// (a node reports its configured labels on every connect).
    pub fn ensure_node(
        &self,
        name: &str,
        labels: Option<&BTreeMap<String, String>>,
    ) -> Result<(), ApplyError> {
        self.put_node(name, labels, None)
    }

    /// A connecting node's admission: its Node object with the labels it reports, written only
    /// while the node still has a token (whichever replica revokes it). False when revoked.
    pub fn admit_node(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<bool, ApplyError> {
        match self.put_node(name, Some(labels), Some(name)) {
            Ok(()) => Ok(true),
            Err(ApplyError::Store(StoreError::Revoked(_))) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn put_node(
        &self,
        name: &str,
        labels: Option<&BTreeMap<String, String>>,
        token_of: Option<&str>,
    ) -> Result<(), ApplyError> {
        let current = self.stored_node(name)?;
        let node = match (current, labels) {
            (Some(_), None) => return Ok(()),
            (Some(n), Some(l)) if &n.metadata.labels == l => return Ok(()),
            (Some(mut n), Some(l)) => {
                n.metadata.labels = l.clone();
                n
            }
            (None, l) => Node::new(name, l.cloned().unwrap_or_default()),
        };
        self.apply_guarded(vec![Object::Node(node)], false, token_of)
            .map(|_| ())
    }

    fn stored_node(&self, name: &str) -> Result<Option<Node>, StoreError> {
        let key = ObjectKey::new(Kind::Node, "", name);
        Ok(match self.store.get(&key)? {
            Some(rec) => match Object::from_json(Kind::Node, &rec.json) {
                Ok(Object::Node(n)) => Some(n),
                _ => None,
            },
            None => None,
        })
    }

    /// Publishes the node's certificate in its Node object (synced to every node), or with
    /// `None` revokes it everywhere. False when the node does not exist.
    pub fn set_node_certificate(
        &self,
        name: &str,
        cert: Option<&NodeCertificate>,
    ) -> Result<bool, ApplyError> {
        let Some(mut node) = self.stored_node(name)? else {
            return Ok(false);
        };
        if node.certificate().as_ref() != cert {
            node.set_certificate(cert);
            self.write_objects(vec![Object::Node(node)], false)?;
        }
        Ok(true)
    }

    fn existing_service_ip(&self, key: &(String, String)) -> Result<Option<String>, StoreError> {
        let rec = self
            .store
            .get(&ObjectKey::new(Kind::Service, key.0.clone(), key.1.clone()))?;
        Ok(
            rec.and_then(|r| match Object::from_json(Kind::Service, &r.json) {
                Ok(Object::Service(s)) => Some(s.spec.cluster_ip),
                _ => None,
            }),
        )
    }

    /// Keeps the cluster IP immutable, allocates one when none is given, and refuses an IP
    /// that another Service holds.
    fn settle_cluster_ip(
        &self,
        svc: &mut edgehub::model::Service,
        existing: Option<String>,
        taken: &HashMap<IpAddr, (String, String)>,
        claimed: &HashMap<IpAddr, (String, String)>,
    ) -> Result<(), IpProblem> {
        if svc.is_external_name() {
            // A DNS alias: no cluster IP, and the one it had as another type is released.
            return Ok(());
        }
        let me = (svc.metadata.namespace.clone(), svc.metadata.name.clone());
        if let Some(old) = existing {
            if svc.spec.cluster_ip.is_empty() {
                svc.spec.cluster_ip = old;
            } else if svc.spec.cluster_ip != old {
                return Err(IpProblem::Invalid(FieldError::new(
                    "spec.clusterIP",
                    format!("clusterIP is immutable: it is {old}; delete and recreate the Service to change it"),
                )));
            }
            return Ok(());
        }
        let holder = |ip: &IpAddr| {
            taken
                .get(ip)
                .or_else(|| claimed.get(ip))
                .filter(|h| **h != me)
        };
        if let Some(ip) = svc.cluster_ip() {
            if let Some((ns, name)) = holder(&ip) {
                return Err(IpProblem::Conflict(format!(
                    "clusterIP {ip} is already allocated to {ns}/{name}"
                )));
            }
            return Ok(());
        }
        if !svc.spec.cluster_ip.is_empty() {
            return Ok(()); // headless
        }
        let ip = allocate(&self.service_cidr, &me, |ip| holder(ip).is_some()).ok_or_else(|| {
            IpProblem::Conflict(format!("no free cluster IP left in {}", self.service_cidr))
        })?;
        svc.spec.cluster_ip = ip.to_string();
        if let Some(ips) = &mut svc.spec.cluster_ips {
            if ips.is_empty() {
                ips.push(ip.to_string());
            }
        }
        Ok(())
    }
}

fn cluster_ip_of(json: &str) -> Option<IpAddr> {
    match Object::from_json(Kind::Service, json) {
        Ok(Object::Service(svc)) => svc.cluster_ip(),
        _ => None,
    }
}

fn object_label(key: &ObjectKey) -> String {
    if key.namespace.is_empty() {
        format!("{} {}", key.kind, key.name)
    } else {
        format!("{} {}/{}", key.kind, key.namespace, key.name)
    }
}

enum IpProblem {
    Invalid(FieldError),
    Conflict(String),
}

/// Picks a free address in `cidr` for the Service: a stable first choice from its name (so
/// re-creating a Service tends to get its old IP back), then the next free one.
fn allocate(
    cidr: &IpNet,
    who: &(String, String),
    taken: impl Fn(&IpAddr) -> bool,
) -> Option<IpAddr> {
    let (base, host_bits) = match cidr {
        IpNet::V4(n) => (u32::from(n.network()) as u128, 32 - n.prefix_len() as u32),
        IpNet::V6(n) => (u128::from(n.network()), 128 - n.prefix_len() as u32),
    };
    // Usable offsets: 1 ..= size-2 (no network or broadcast address).
    let size: u128 = if host_bits >= 128 {
        u128::MAX
    } else {
        1u128 << host_bits
    };
    let usable = size.checked_sub(2).filter(|u| *u > 0)?;
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{}/{}", who.0, who.1).as_bytes(),
    );
    let mut seed = [0u8; 16];
    seed.copy_from_slice(&digest.as_ref()[..16]);
    let start = u128::from_be_bytes(seed) % usable;
    // Bounded probe: a nearly full range fails rather than scanning for ever.
    for i in 0..usable.min(1 << 20) {
        let offset = 1 + (start + i) % usable;
        let ip = match cidr {
            IpNet::V4(_) => IpAddr::from(std::net::Ipv4Addr::from((base + offset) as u32)),
            IpNet::V6(_) => IpAddr::from(std::net::Ipv6Addr::from(base + offset)),
        };
        if !taken(&ip) {
            return Some(ip);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;

    fn objects() -> (tempfile::TempDir, Objects) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("c.db"), 100, 1 << 20).expect("open"));
        let objects = Objects::new(store, "10.96.0.0/24".parse().expect("cidr")).expect("objects");
        (dir, objects)
    }

    fn svc(name: &str, ip: &str) -> Object {
        let json = format!(
            r#"{{"kind":"Service","metadata":{{"name":"{name}","namespace":"default"}},"spec":{{"clusterIP":"{ip}","ports":[{{"port":80}}]}}}}"#
        );
        Object::from_json(Kind::Service, &json).expect("valid")
    }

    #[test]
    fn cluster_ips_are_allocated_unique_and_immutable() {
        let (_dir, o) = objects();
        let out = o.apply(vec![svc("a", "")], false).expect("allocate");
        assert_eq!(out[0].action, "created");
        let rec = o
            .get(&ObjectKey::new(Kind::Service, "default", "a"))
            .expect("get")
            .expect("a");
        let Ok(Object::Service(a)) = Object::from_json(Kind::Service, &rec.json) else {
            panic!()
        };
        let ip = a.spec.cluster_ip.clone();
        assert!(ip.starts_with("10.96.0."), "{ip}");
        // Re-applying without an IP keeps it and changes nothing.
        assert_eq!(
            o.apply(vec![svc("a", "")], false).expect("again")[0].action,
            "unchanged"
        );
        // Another Service cannot take it.
        assert!(matches!(
            o.apply(vec![svc("b", &ip)], false),
            Err(ApplyError::Conflict { .. })
        ));
        // It cannot be changed.
        let err = o.apply(vec![svc("a", "10.96.0.200")], false).unwrap_err();
        assert!(
            matches!(err, ApplyError::Invalid { ref err, .. } if err.field == "spec.clusterIP"),
            "{err}"
        );
        // Two documents of one request cannot claim the same IP.
        let err = o
            .apply(
                vec![svc("c", "10.96.0.100"), svc("d", "10.96.0.100")],
                false,
            )
            .unwrap_err();
        assert!(matches!(err, ApplyError::Conflict { .. }));
        assert!(o
            .get(&ObjectKey::new(Kind::Service, "default", "c"))
            .expect("get")
            .is_none());
        // Deleting frees it.
        o.delete(&ObjectKey::new(Kind::Service, "default", "a"))
            .expect("delete");
        o.apply(vec![svc("b", &ip)], false).expect("free now");
    }

    #[test]
    fn external_name_services_get_no_cluster_ip_and_release_theirs() {
        let (_dir, o) = objects();
        let ext = Object::from_json(
            Kind::Service,
            r#"{"kind":"Service","metadata":{"name":"a","namespace":"default"},"spec":{"type":"ExternalName","externalName":"db.example.com"}}"#,
        )
        .expect("valid");
        let ip_of = |o: &Objects| {
            let rec = o
                .get(&ObjectKey::new(Kind::Service, "default", "a"))
                .expect("get")
                .expect("a");
            match Object::from_json(Kind::Service, &rec.json) {
                Ok(Object::Service(s)) => s.spec.cluster_ip,
                _ => panic!("not a service"),
            }
        };
        o.apply(vec![svc("a", "")], false).expect("cluster IP");
        let ip = ip_of(&o);
        assert!(!ip.is_empty());
        // Becoming an alias drops the IP (another Service may take it); back again gets one.
        o.apply(vec![ext.clone()], false).expect("alias");
        assert_eq!(ip_of(&o), "");
        o.apply(vec![svc("b", &ip)], false).expect("released");
        o.apply(vec![svc("a", "")], false)
            .expect("a cluster IP again");
        assert!(!ip_of(&o).is_empty() && ip_of(&o) != ip);
    }

    #[test]
    fn invalid_documents_are_numbered_and_nothing_is_stored() {
        let (_dir, o) = objects();
        let err = o
            .apply(vec![svc("a", ""), svc("b", "192.168.1.1")], false)
            .unwrap_err();
        assert!(
            matches!(err, ApplyError::Invalid { index: Some(1), ref err, .. } if err.field == "spec.clusterIP")
        );
        assert_eq!(o.store().version(), 0);
    }

    #[test]
    fn resource_version_preconditions() {
        let (_dir, o) = objects();
        let v = o.apply(vec![svc("a", "10.96.0.5")], true).expect("create")[0]
            .resource_version
            .clone();
        let mut stale = svc("a", "10.96.0.5");
        if let Object::Service(s) = &mut stale {
            s.metadata.resource_version = "999".into();
            s.metadata.labels.insert("x".into(), "y".into());
        }
        assert!(matches!(
            o.apply(vec![stale.clone()], true),
            Err(ApplyError::Store(StoreError::Conflict { .. }))
        ));
        if let Object::Service(s) = &mut stale {
            s.metadata.resource_version = v;
        }
        assert_eq!(
            o.apply(vec![stale], true).expect("current")[0].action,
            "configured"
        );
    }

    #[test]
    fn node_labels_follow_reports() {
        let (_dir, o) = objects();
        o.ensure_node("edge-1", None).expect("create");
        let mut labels = BTreeMap::new();
        labels.insert("zone".to_string(), "a".to_string());
        o.ensure_node("edge-1", Some(&labels)).expect("labels");
        let v = o.store().version();
        o.ensure_node("edge-1", Some(&labels)).expect("same");
        assert_eq!(o.store().version(), v);
    }
}
