//! The mesh at one version, as the data path reads it.
//!
//! A node's metamanager and cloudcore's mirror of its store keep one [`MeshView`] each and
//! publish it through a `watch` channel: route tables, cluster DNS, stream checks and limits
//! read it, never the store. Services and Endpoints are held as compact records
//! ([`records`]), not as the objects the store keeps: a node holds the whole mesh for as long
//! as it runs. Nodes and Communities (few, read whole) are kept as objects. The full objects
//! are read from the store when asked for (`/debug/*`).

mod records;

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

pub use self::records::{
    AddressRecord, EndpointPortRecord, EndpointsRecord, Interner, PortProtocol, PortRecord,
    ServiceRecord, SharedName, SmallList, SubsetRecord,
};
use crate::model::{Community, Kind, Node, Object, ObjectKey};

/// `namespace/name`: the key of a Service or Endpoints in the view, in one allocation. Both
/// maps are ordered by it alike, so they can be walked together. Shared, not copied: a
/// Service and its Endpoints hold one name, and the indexes built from the view (DNS, route
/// tables) keep clones of it rather than names of their own.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectName(Arc<str>);

impl ObjectName {
    pub fn new(namespace: &str, name: &str) -> ObjectName {
        ObjectName(Arc::from(joined(namespace, name)))
    }

    pub fn namespace(&self) -> &str {
        self.0.split_once('/').map_or("", |(ns, _)| ns)
    }

    pub fn name(&self) -> &str {
        self.0.split_once('/').map_or(&self.0, |(_, name)| name)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `list` sorted by name, with only the last of the entries a name has.
fn sorted_last_wins<T>(mut list: Vec<(ObjectName, T)>) -> Vec<(ObjectName, T)> {
    // Stable: the entries of one name keep their order.
    list.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out: Vec<(ObjectName, T)> = Vec::with_capacity(list.len());
    for entry in list {
        match out.last_mut() {
            Some(last) if last.0 == entry.0 => *last = entry,
            _ => out.push(entry),
        }
    }
    out
}

/// The name of `key`: the one `other` (the map of the Service's Endpoints, or the Endpoints'
/// Service) holds when it has the object, else a new one.
fn shared_name<T>(other: &BTreeMap<ObjectName, T>, key: &ObjectKey) -> ObjectName {
    let joined = joined(&key.namespace, &key.name);
    match other.get_key_value(joined.as_str()) {
        Some((name, _)) => name.clone(),
        None => ObjectName(Arc::from(joined)),
    }
}

/// `namespace/name` (namespaces cannot hold a `/`).
fn joined(namespace: &str, name: &str) -> String {
    let mut key = String::with_capacity(namespace.len() + 1 + name.len());
    key.push_str(namespace);
    key.push('/');
    key.push_str(name);
    key
}

impl Borrow<str> for ObjectName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// The mesh at one version: immutable once published.
#[derive(Clone, Debug, Default)]
pub struct MeshView {
    pub version: u64,
    pub store_id: Option<String>,
    pub services: BTreeMap<ObjectName, Arc<ServiceRecord>>,
    pub endpoints: BTreeMap<ObjectName, Arc<EndpointsRecord>>,
    pub nodes: BTreeMap<String, Arc<Node>>,
    pub communities: BTreeMap<String, Arc<Community>>,
    /// Node and port names, shared by the records.
    names: Interner,
}

impl MeshView {
    /// An empty view at `version` of the store `store_id`.
    pub fn at(version: u64, store_id: Option<String>) -> MeshView {
        MeshView {
            version,
            store_id,
            ..MeshView::default()
        }
    }

    /// The view of `objects` at `version`, built at once. The ordered maps are made from
    /// sorted lists, which fills their nodes: inserted one key at a time in order (a snapshot,
    /// a store read at start), every node is split in half and stays half empty, about 0.5 MB
    /// more for 10,000 Services and Endpoints. A key given twice keeps its last object.
    pub fn from_objects(
        version: u64,
        store_id: Option<String>,
        objects: impl IntoIterator<Item = (ObjectKey, Object)>,
    ) -> MeshView {
        let mut view = MeshView::at(version, store_id);
        let mut services = Vec::new();
        let mut endpoints = Vec::new();
        for (key, object) in objects {
            match (key.kind, object) {
                (Kind::Service, Object::Service(s)) => {
                    let record = ServiceRecord::new(&s, &mut view.names);
                    services.push((ObjectName::new(&key.namespace, &key.name), Arc::new(record)));
                }
                (Kind::Endpoints, Object::Endpoints(e)) => {
                    let record = EndpointsRecord::new(&e, &mut view.names);
                    endpoints.push((ObjectName::new(&key.namespace, &key.name), Arc::new(record)));
                }
                (_, object) => view.set(&key, Some(object)),
            }
        }
        let services = sorted_last_wins(services);
        let mut endpoints = sorted_last_wins(endpoints);
        // Both sorted: walk them together so that a Service and its Endpoints share a name.
        let mut named = services.iter().map(|(name, _)| name).peekable();
        for (name, _) in &mut endpoints {
            while named.next_if(|s| **s < *name).is_some() {}
            if let Some(shared) = named.peek().filter(|s| ***s == *name) {
                *name = (*shared).clone();
            }
        }
        view.services = services.into_iter().collect();
        view.endpoints = endpoints.into_iter().collect();
        view
    }

    /// Puts `object` at `key`, or removes what is there when `None`.
    pub fn set(&mut self, key: &ObjectKey, object: Option<Object>) {
        match (key.kind, object) {
            (Kind::Service, Some(Object::Service(s))) => {
                let record = ServiceRecord::new(&s, &mut self.names);
                let name = shared_name(&self.endpoints, key);
                self.services.insert(name, Arc::new(record));
            }
            (Kind::Endpoints, Some(Object::Endpoints(e))) => {
                let record = EndpointsRecord::new(&e, &mut self.names);
                let name = shared_name(&self.services, key);
                self.endpoints.insert(name, Arc::new(record));
            }
            (Kind::Node, Some(Object::Node(n))) => {
                self.nodes.insert(key.name.clone(), Arc::new(n));
            }
            (Kind::Community, Some(Object::Community(c))) => {
                self.communities.insert(key.name.clone(), Arc::new(c));
            }
            (Kind::Service, _) => {
                self.services
                    .remove(joined(&key.namespace, &key.name).as_str());
            }
            (Kind::Endpoints, _) => {
                self.endpoints
                    .remove(joined(&key.namespace, &key.name).as_str());
            }
            (Kind::Node, _) => {
                self.nodes.remove(&key.name);
            }
            (Kind::Community, _) => {
                self.communities.remove(&key.name);
            }
        }
    }

    /// Puts `object` at its own key (tests and tools that build a view by hand).
    pub fn put(&mut self, object: Object) {
        let key = object.key();
        self.set(&key, Some(object));
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&Arc<ServiceRecord>> {
        self.services.get(joined(namespace, name).as_str())
    }

    pub fn endpoints_of(&self, namespace: &str, name: &str) -> Option<&Arc<EndpointsRecord>> {
        self.endpoints.get(joined(namespace, name).as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(ns: &str, name: &str, ip: &str) -> [(ObjectKey, Object); 2] {
        let svc = format!(
            r#"{{"kind":"Service","metadata":{{"name":"{name}","namespace":"{ns}"}},"spec":{{"clusterIP":"{ip}","ports":[{{"port":80}}]}}}}"#
        );
        let eps = format!(
            r#"{{"kind":"Endpoints","metadata":{{"name":"{name}","namespace":"{ns}"}},"subsets":[{{"addresses":[{{"ip":"10.1.0.1"}}],"ports":[{{"port":80}}]}}]}}"#
        );
        let svc = Object::from_json(Kind::Service, &svc).expect("service");
        let eps = Object::from_json(Kind::Endpoints, &eps).expect("endpoints");
        [(svc.key(), svc), (eps.key(), eps)]
    }

    #[test]
    fn a_view_built_at_once_is_the_view_built_one_object_at_a_time() {
        let mut objects: Vec<(ObjectKey, Object)> = (0..500)
            .rev()
            .flat_map(|i| pair("default", &format!("svc-{i}"), "10.96.0.1"))
            .collect();
        objects.extend(pair("default", "svc-7", "10.96.0.7"));
        let node = Object::Node(Node::new("a", Default::default()));
        objects.push((node.key(), node));
        let mut one_by_one = MeshView::at(3, None);
        for (key, object) in objects.clone() {
            one_by_one.set(&key, Some(object));
        }
        let at_once = MeshView::from_objects(3, None, objects);
        assert_eq!(at_once.services, one_by_one.services);
        assert_eq!(at_once.endpoints, one_by_one.endpoints);
        assert_eq!(at_once.nodes.keys().collect::<Vec<_>>(), ["a"]);
        let last = at_once.service("default", "svc-7").expect("svc-7");
        assert_eq!(
            last.cluster_ips[0].to_string(),
            "10.96.0.7",
            "the last one given"
        );
        for (s, e) in at_once.services.keys().zip(at_once.endpoints.keys()) {
            assert!(Arc::ptr_eq(&s.0, &e.0), "{s} is held twice");
        }
    }

    #[test]
    fn names_split_and_order_alike_in_both_maps() {
        let n = ObjectName::new("kube-system", "dns");
        assert_eq!((n.namespace(), n.name()), ("kube-system", "dns"));
        assert_eq!(n.to_string(), "kube-system/dns");
        let mut view = MeshView::default();
        for (ns, name) in [("b", "x"), ("a-b", "y"), ("a", "z")] {
            let svc = format!(
                r#"{{"kind":"Service","metadata":{{"name":"{name}","namespace":"{ns}"}},"spec":{{"clusterIP":"10.96.0.1","ports":[{{"port":80}}]}}}}"#
            );
            let eps = format!(
                r#"{{"kind":"Endpoints","metadata":{{"name":"{name}","namespace":"{ns}"}}}}"#
            );
            view.put(Object::from_json(Kind::Service, &svc).expect("service"));
            view.put(Object::from_json(Kind::Endpoints, &eps).expect("endpoints"));
        }
        let services: Vec<&ObjectName> = view.services.keys().collect();
        let endpoints: Vec<&ObjectName> = view.endpoints.keys().collect();
        assert_eq!(services, endpoints);
        for (s, e) in services.iter().zip(&endpoints) {
            assert!(Arc::ptr_eq(&s.0, &e.0), "{s} is held twice");
        }
        assert!(view.service("a-b", "y").is_some());
        view.set(
            &ObjectKey {
                kind: Kind::Service,
                namespace: "a-b".into(),
                name: "y".into(),
            },
            None,
        );
        assert!(view.service("a-b", "y").is_none());
        assert_eq!(view.services.len(), 2);
    }
}
