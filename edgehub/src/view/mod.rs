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
    ServiceRecord, SmallList, SubsetRecord,
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
