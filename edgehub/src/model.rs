//! Kubernetes-shaped metadata objects: Services, Endpoints, Nodes and Communities.
//!
//! These types are the one definition of the objects that cloudcore stores and that every edge
//! node receives. They deny unknown fields so that a manifest field edgemesh does not model is
//! rejected with its path instead of being silently dropped; the Kubernetes fields that real
//! manifests carry but edgemesh does not act on (`selector`, `type`, `uid`, ...) are modelled as
//! pass-through so existing manifests keep working and nothing a user wrote is lost.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A string field whose value is nearly always one of a few constants (`v1`, `Service`, `TCP`,
/// `None`, ...): those are kept as static strings, so that every copy of an object a node holds
/// does not carry its own heap copy of each. Reads as a `&str`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Word(std::borrow::Cow<'static, str>);

impl Word {
    const KNOWN: [&'static str; 11] = [
        "v1",
        "Service",
        "Endpoints",
        "Node",
        "TCP",
        "UDP",
        "SCTP",
        "None",
        "ClientIP",
        "http",
        "https",
    ];

    pub const fn from_static(s: &'static str) -> Word {
        Word(std::borrow::Cow::Borrowed(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for Word {
    fn from(s: String) -> Word {
        match Word::KNOWN.iter().find(|k| **k == s) {
            Some(k) => Word::from_static(k),
            None => Word(std::borrow::Cow::Owned(s)),
        }
    }
}

impl From<&str> for Word {
    fn from(s: &str) -> Word {
        match Word::KNOWN.iter().find(|k| **k == s) {
            Some(k) => Word::from_static(k),
            None => Word(std::borrow::Cow::Owned(s.to_string())),
        }
    }
}

impl std::ops::Deref for Word {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Word {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for Word {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl fmt::Debug for Word {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Word {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Word {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Word {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Word, D::Error> {
        String::deserialize(deserializer).map(Word::from)
    }
}

mod community;
mod validate;

pub use community::{
    may_connect, validate_community, Community, CommunitySpec, LabelSelector, COMMUNITY_API_VERSION,
};
pub(crate) use validate::is_dns1123_subdomain;
pub use validate::{
    error_path, is_qualified_name, validate_endpoints, validate_labels, validate_node,
    validate_service, FieldError, LbPolicy, ServiceAnnotations, CLOUD_NODE, TRAFFIC_DISTRIBUTIONS,
};

/// Annotation that selects the load-balancing policy of a Service.
pub const ANNOTATION_LB_POLICY: &str = "edgemesh.io/lb-policy";
/// Annotation that selects the hash key of the `consistent-hash` policy.
pub const ANNOTATION_HASH_KEY: &str = "edgemesh.io/hash-key";
/// Annotation with the server-side requests-per-second limit of a Service.
pub const ANNOTATION_QPS: &str = "edgemesh.io/qps";
/// Annotation with the burst allowance that goes with `edgemesh.io/qps`.
pub const ANNOTATION_BURST: &str = "edgemesh.io/burst";
/// Annotation that forces the protocol of a Service and skips sniffing.
pub const ANNOTATION_PROTOCOL: &str = "edgemesh.io/protocol";
/// Annotation naming the node label that divides the fleet into units: StatefulSet-per-unit
/// names in DNS, and the unit `trafficDistribution` prefers.
pub const ANNOTATION_UNIT_KEY: &str = "edgemesh.io/unit-key";
/// Kubernetes' legacy spelling of `spec.publishNotReadyAddresses: true`.
pub const ANNOTATION_TOLERATE_UNREADY: &str =
    "service.alpha.kubernetes.io/tolerate-unready-endpoints";
/// `spec.type` of a Service that is only a DNS alias (`spec.externalName`).
pub const TYPE_EXTERNAL_NAME: &str = "ExternalName";

/// Which kind of object a key or record refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Service,
    Endpoints,
    Node,
    Community,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Service, Kind::Endpoints, Kind::Node, Kind::Community];

    /// The Kubernetes `kind` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::Endpoints => "Endpoints",
            Kind::Node => "Node",
            Kind::Community => "Community",
        }
    }

    /// The type segment of an edge resource string (`<namespace>/<type>/<name>`), as in KubeEdge.
    pub fn resource_type(self) -> &'static str {
        match self {
            Kind::Service => "service",
            Kind::Endpoints => "endpoints",
            Kind::Node => "node",
            Kind::Community => "community",
        }
    }

    pub fn from_resource_type(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.resource_type() == s)
    }

    pub fn from_kind_str(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node | Kind::Community)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The namespace segment used in resource strings of cluster-scoped objects (Nodes,
/// Communities). It is not a
/// valid namespace name, so it can never collide with a real namespace.
pub const CLUSTER_SCOPE: &str = "_";

/// Identity of one object: kind, namespace (empty for cluster-scoped kinds) and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(kind: Kind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        let namespace = if kind.namespaced() {
            namespace.into()
        } else {
            String::new()
        };
        ObjectKey {
            kind,
            namespace,
            name: name.into(),
        }
    }

    /// The edge resource string: `<namespace>/<type>/<name>` (`_` as namespace for cluster-scoped
    /// kinds).
    pub fn resource(&self) -> String {
        let ns = if self.kind.namespaced() {
            self.namespace.as_str()
        } else {
            CLUSTER_SCOPE
        };
        format!("{ns}/{}/{}", self.kind.resource_type(), self.name)
    }

    /// Parses a resource string made by [`ObjectKey::resource`].
    pub fn parse_resource(resource: &str) -> Option<ObjectKey> {
        let mut parts = resource.splitn(3, '/');
        let ns = parts.next()?;
        let kind = Kind::from_resource_type(parts.next()?)?;
        let name = parts.next()?;
        if name.is_empty() || name.contains('/') {
            return None;
        }
        if kind.namespaced() == (ns == CLUSTER_SCOPE) || ns.is_empty() {
            return None;
        }
        Some(ObjectKey::new(kind, ns, name))
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.resource())
    }
}

/// Kubernetes `metadata`. Fields edgemesh does not use are kept as they came, in [`MetaKept`].
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "MetaWire")]
pub struct ObjectMeta {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub resource_version: String,
    /// `None` when the manifest had none of them (every object the mesh writes itself).
    pub kept: Option<Box<MetaKept>>,
}

/// The `metadata` fields real manifests carry and edgemesh passes through without reading:
/// behind one pointer, so that an object without them (nearly all) does not pay ~160 bytes
/// for empty fields in every copy a node keeps in memory.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetaKept {
    pub uid: Option<String>,
    pub creation_timestamp: Option<String>,
    pub generation: Option<i64>,
    pub generate_name: Option<String>,
    pub finalizers: Option<Vec<String>>,
    pub owner_references: Option<Vec<Value>>,
    pub managed_fields: Option<Vec<Value>>,
}

impl MetaKept {
    fn is_empty(&self) -> bool {
        *self == MetaKept::default()
    }
}

/// `metadata` as written: every field by name, unknown ones refused with their path.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MetaWire {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    resource_version: String,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    creation_timestamp: Option<String>,
    #[serde(default)]
    generation: Option<i64>,
    #[serde(default)]
    generate_name: Option<String>,
    #[serde(default)]
    finalizers: Option<Vec<String>>,
    #[serde(default)]
    owner_references: Option<Vec<Value>>,
    #[serde(default)]
    managed_fields: Option<Vec<Value>>,
}

impl From<MetaWire> for ObjectMeta {
    fn from(w: MetaWire) -> ObjectMeta {
        let kept = MetaKept {
            uid: w.uid,
            creation_timestamp: w.creation_timestamp,
            generation: w.generation,
            generate_name: w.generate_name,
            finalizers: w.finalizers,
            owner_references: w.owner_references,
            managed_fields: w.managed_fields,
        };
        ObjectMeta {
            name: w.name,
            namespace: w.namespace,
            labels: w.labels,
            annotations: w.annotations,
            resource_version: w.resource_version,
            kept: (!kept.is_empty()).then(|| Box::new(kept)),
        }
    }
}

impl Serialize for ObjectMeta {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // The fields in the order `MetaWire` reads them, empty ones left out as before.
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Out<'a> {
            name: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            namespace: &'a str,
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            labels: &'a BTreeMap<String, String>,
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            annotations: &'a BTreeMap<String, String>,
            #[serde(skip_serializing_if = "str::is_empty")]
            resource_version: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            uid: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            creation_timestamp: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            generation: Option<i64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            generate_name: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            finalizers: Option<&'a [String]>,
            #[serde(skip_serializing_if = "Option::is_none")]
            owner_references: Option<&'a [Value]>,
            #[serde(skip_serializing_if = "Option::is_none")]
            managed_fields: Option<&'a [Value]>,
        }
        let k = self.kept.as_deref();
        Out {
            name: &self.name,
            namespace: &self.namespace,
            labels: &self.labels,
            annotations: &self.annotations,
            resource_version: &self.resource_version,
            uid: k.and_then(|k| k.uid.as_deref()),
            creation_timestamp: k.and_then(|k| k.creation_timestamp.as_deref()),
            generation: k.and_then(|k| k.generation),
            generate_name: k.and_then(|k| k.generate_name.as_deref()),
            finalizers: k.and_then(|k| k.finalizers.as_deref()),
            owner_references: k.and_then(|k| k.owner_references.as_deref()),
            managed_fields: k.and_then(|k| k.managed_fields.as_deref()),
        }
        .serialize(serializer)
    }
}

/// `targetPort`: a number or the name of a container port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Signed and wide on purpose: an out-of-range number must reach validation, which names the
    /// field, rather than fail deep inside the JSON parser.
    pub port: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<IntOrString>,
    #[serde(default = "default_protocol")]
    pub protocol: Word,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<i64>,
}

fn default_protocol() -> Word {
    Word::from_static("TCP")
}

impl ServicePort {
    /// The port to dial on an endpoint: the numeric `targetPort`, or `port` when there is none.
    /// A named `targetPort` is resolved against the Endpoints' port names by the data path.
    pub fn target_port_number(&self) -> Option<u16> {
        match &self.target_port {
            None => u16::try_from(self.port).ok(),
            Some(IntOrString::Int(p)) => u16::try_from(*p).ok(),
            Some(IntOrString::String(_)) => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(from = "SpecWire")]
pub struct ServiceSpec {
    /// `None` (the string) makes the Service headless; empty asks cloudcore to allocate one.
    pub cluster_ip: String,
    pub cluster_ips: Option<Vec<String>>,
    pub ports: Vec<ServicePort>,
    pub session_affinity: Word,
    pub topology_keys: Vec<String>,
    /// `None` when the manifest had none of them.
    pub kept: Option<Box<SpecKept>>,
}

impl Default for ServiceSpec {
    fn default() -> ServiceSpec {
        ServiceSpec {
            cluster_ip: String::new(),
            cluster_ips: None,
            ports: Vec::new(),
            session_affinity: default_affinity(),
            topology_keys: Vec::new(),
            kept: None,
        }
    }
}

impl ServiceSpec {
    /// The fields few Services set (all `None` when the Service has none).
    pub fn kept(&self) -> &SpecKept {
        static NONE: SpecKept = SpecKept {
            session_affinity_config: None,
            selector: None,
            service_type: None,
            ip_families: None,
            ip_family_policy: None,
            internal_traffic_policy: None,
            publish_not_ready_addresses: None,
            external_name: None,
            traffic_distribution: None,
        };
        self.kept.as_deref().unwrap_or(&NONE)
    }
}

/// The `spec` fields few Services set: behind one pointer (see [`MetaKept`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpecKept {
    pub session_affinity_config: Option<Value>,
    pub selector: Option<BTreeMap<String, String>>,
    pub service_type: Option<String>,
    pub ip_families: Option<Vec<String>>,
    pub ip_family_policy: Option<String>,
    pub internal_traffic_policy: Option<String>,
    pub publish_not_ready_addresses: Option<bool>,
    /// The DNS name an `ExternalName` Service aliases (a CNAME in cluster DNS).
    pub external_name: Option<String>,
    /// Kubernetes' `PreferClose` (and `PreferSameZone`, `PreferSameNode`): topology preference
    /// without `topologyKeys`; see [`crate::topology::keys_of`].
    pub traffic_distribution: Option<String>,
}

/// `spec` as written: every field by name, unknown ones refused with their path.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SpecWire {
    #[serde(default, rename = "clusterIP")]
    cluster_ip: String,
    #[serde(default, rename = "clusterIPs")]
    cluster_ips: Option<Vec<String>>,
    #[serde(default)]
    ports: Vec<ServicePort>,
    #[serde(default = "default_affinity")]
    session_affinity: Word,
    #[serde(default)]
    session_affinity_config: Option<Value>,
    #[serde(default)]
    topology_keys: Vec<String>,
    #[serde(default)]
    selector: Option<BTreeMap<String, String>>,
    #[serde(default, rename = "type")]
    service_type: Option<String>,
    #[serde(default)]
    ip_families: Option<Vec<String>>,
    #[serde(default)]
    ip_family_policy: Option<String>,
    #[serde(default)]
    internal_traffic_policy: Option<String>,
    #[serde(default)]
    publish_not_ready_addresses: Option<bool>,
    #[serde(default)]
    external_name: Option<String>,
    #[serde(default)]
    traffic_distribution: Option<String>,
}

impl From<SpecWire> for ServiceSpec {
    fn from(w: SpecWire) -> ServiceSpec {
        let kept = SpecKept {
            session_affinity_config: w.session_affinity_config,
            selector: w.selector,
            service_type: w.service_type,
            ip_families: w.ip_families,
            ip_family_policy: w.ip_family_policy,
            internal_traffic_policy: w.internal_traffic_policy,
            publish_not_ready_addresses: w.publish_not_ready_addresses,
            external_name: w.external_name,
            traffic_distribution: w.traffic_distribution,
        };
        ServiceSpec {
            cluster_ip: w.cluster_ip,
            cluster_ips: w.cluster_ips,
            ports: w.ports,
            session_affinity: w.session_affinity,
            topology_keys: w.topology_keys,
            kept: (kept != SpecKept::default()).then(|| Box::new(kept)),
        }
    }
}

impl Serialize for ServiceSpec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // The fields in the order `SpecWire` reads them, empty ones left out as before.
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Out<'a> {
            #[serde(rename = "clusterIP", skip_serializing_if = "str::is_empty")]
            cluster_ip: &'a str,
            #[serde(rename = "clusterIPs", skip_serializing_if = "Option::is_none")]
            cluster_ips: Option<&'a [String]>,
            ports: &'a [ServicePort],
            session_affinity: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            session_affinity_config: Option<&'a Value>,
            #[serde(skip_serializing_if = "<[String]>::is_empty")]
            topology_keys: &'a [String],
            #[serde(skip_serializing_if = "Option::is_none")]
            selector: Option<&'a BTreeMap<String, String>>,
            #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
            service_type: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            ip_families: Option<&'a [String]>,
            #[serde(skip_serializing_if = "Option::is_none")]
            ip_family_policy: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            internal_traffic_policy: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            publish_not_ready_addresses: Option<bool>,
            #[serde(skip_serializing_if = "Option::is_none")]
            external_name: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            traffic_distribution: Option<&'a str>,
        }
        let k = self.kept();
        Out {
            cluster_ip: &self.cluster_ip,
            cluster_ips: self.cluster_ips.as_deref(),
            ports: &self.ports,
            session_affinity: &self.session_affinity,
            session_affinity_config: k.session_affinity_config.as_ref(),
            topology_keys: &self.topology_keys,
            selector: k.selector.as_ref(),
            service_type: k.service_type.as_deref(),
            ip_families: k.ip_families.as_deref(),
            ip_family_policy: k.ip_family_policy.as_deref(),
            internal_traffic_policy: k.internal_traffic_policy.as_deref(),
            publish_not_ready_addresses: k.publish_not_ready_addresses,
            external_name: k.external_name.as_deref(),
            traffic_distribution: k.traffic_distribution.as_deref(),
        }
        .serialize(serializer)
    }
}

fn default_affinity() -> Word {
    Word::from_static("None")
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    #[serde(default = "default_api_version")]
    pub api_version: Word,
    #[serde(default = "service_kind")]
    pub kind: Word,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceSpec,
    /// Kubernetes' `status` is owned by controllers; accepted so manifests from a cluster apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Value>,
}

fn default_api_version() -> Word {
    Word::from_static("v1")
}
fn service_kind() -> Word {
    Word::from_static("Service")
}
fn endpoints_kind() -> Word {
    Word::from_static("Endpoints")
}
fn node_kind() -> Word {
    Word::from_static("Node")
}

impl Service {
    pub fn is_headless(&self) -> bool {
        self.spec.cluster_ip == "None"
    }

    /// The cluster IP, when the Service has one.
    pub fn cluster_ip(&self) -> Option<IpAddr> {
        self.spec.cluster_ip.parse().ok()
    }

    /// `type: ExternalName`: a DNS alias with no cluster IP and no endpoints.
    pub fn is_external_name(&self) -> bool {
        self.spec.kept().service_type.as_deref() == Some(TYPE_EXTERNAL_NAME)
    }

    /// Whether not-ready addresses are published too: `spec.publishNotReadyAddresses`, or the
    /// legacy annotation `service.alpha.kubernetes.io/tolerate-unready-endpoints`.
    pub fn publishes_not_ready(&self) -> bool {
        self.spec.kept().publish_not_ready_addresses == Some(true)
            || self
                .metadata
                .annotations
                .get(ANNOTATION_TOLERATE_UNREADY)
                .and_then(|v| validate::parse_bool(v))
                .unwrap_or(false)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointAddress {
    pub ip: String,
    /// The edge node hosting the pod; none (or `cloud`) means reachable from cloudcore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<Value>,
}

impl EndpointAddress {
    /// Who hosts this address: `Some(node)`, or `None` for cloudcore.
    pub fn host(&self) -> Option<&str> {
        self.node_name
            .as_deref()
            .filter(|n| !n.is_empty() && *n != CLOUD_NODE)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointPort {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub port: i64,
    #[serde(default = "default_protocol")]
    pub protocol: Word,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSubset {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<EndpointAddress>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ready_addresses: Vec<EndpointAddress>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<EndpointPort>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoints {
    #[serde(default = "default_api_version")]
    pub api_version: Word,
    #[serde(default = "endpoints_kind")]
    pub kind: Word,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub subsets: Vec<EndpointSubset>,
}

/// An edge node as the mesh sees it: its name and its labels (used for topology preference),
/// and in `status.certificate` the node certificate cloudcore issued it (synced to every node,
/// so peers check a certificate against it). Runtime state (online, last seen) is not part of
/// the stored object; the API adds it to `status` when listing nodes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Node {
    #[serde(default = "default_api_version")]
    pub api_version: Word,
    #[serde(default = "node_kind")]
    pub kind: Word,
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Value>,
}

impl Node {
    pub fn new(name: &str, labels: BTreeMap<String, String>) -> Node {
        Node {
            api_version: default_api_version(),
            kind: node_kind(),
            metadata: ObjectMeta {
                name: name.to_string(),
                labels,
                ..ObjectMeta::default()
            },
            status: None,
        }
    }

    /// The certificate cloudcore issued this node and has not revoked, if any.
    pub fn certificate(&self) -> Option<NodeCertificate> {
        let v = self.status.as_ref()?.get(STATUS_CERTIFICATE)?;
        serde_json::from_value(v.clone()).ok()
    }

    /// Records (or with `None` revokes) the node's certificate; other status fields are kept.
    pub fn set_certificate(&mut self, cert: Option<&NodeCertificate>) {
        let mut status = match self.status.take() {
            Some(Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        match cert {
            Some(c) => {
                let v = serde_json::to_value(c)
                    .unwrap_or_else(|e| unreachable!("certificate status serialisation: {e}"));
                status.insert(STATUS_CERTIFICATE.into(), v);
            }
            None => {
                status.remove(STATUS_CERTIFICATE);
            }
        }
        self.status = (!status.is_empty()).then_some(Value::Object(status));
    }
}

/// The key of [`NodeCertificate`] in a Node's `status`.
pub const STATUS_CERTIFICATE: &str = "certificate";

/// What every node knows of another node's certificate: enough to accept exactly that
/// certificate from it, offline too.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeCertificate {
    /// SHA-256 of the certificate (DER), lower-case hex.
    pub fingerprint: String,
    /// When it expires, in milliseconds since the Unix epoch.
    pub not_after_ms: i64,
}

/// Any stored object.
// Objects are few and short-lived (parsed per write or per sync batch); boxing the larger
// variants would buy nothing measurable and cost a layer of indirection everywhere.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Service),
    Endpoints(Endpoints),
    Node(Node),
    Community(Community),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::Endpoints(_) => Kind::Endpoints,
            Object::Node(_) => Kind::Node,
            Object::Community(_) => Kind::Community,
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Service(s) => &s.metadata,
            Object::Endpoints(e) => &e.metadata,
            Object::Node(n) => &n.metadata,
            Object::Community(c) => &c.metadata,
        }
    }

    pub fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Object::Service(s) => &mut s.metadata,
            Object::Endpoints(e) => &mut e.metadata,
            Object::Node(n) => &mut n.metadata,
            Object::Community(c) => &mut c.metadata,
        }
    }

    pub fn key(&self) -> ObjectKey {
        let meta = self.meta();
        ObjectKey::new(self.kind(), meta.namespace.clone(), meta.name.clone())
    }

    /// Canonical JSON: what the cloud stores and sends, byte for byte.
    pub fn to_json(&self) -> String {
        // Serialising these plain structs cannot fail (string keys, no custom serialisers).
        let result = match self {
            Object::Service(s) => serde_json::to_string(s),
            Object::Endpoints(e) => serde_json::to_string(e),
            Object::Node(n) => serde_json::to_string(n),
            Object::Community(c) => serde_json::to_string(c),
        };
        result.unwrap_or_else(|e| unreachable!("object serialisation failed: {e}"))
    }

    /// Parses an object of a known kind from JSON, naming the failing field on error.
    pub fn from_json(kind: Kind, json: &str) -> Result<Object, FieldError> {
        let de = &mut serde_json::Deserializer::from_str(json);
        let result = match kind {
            Kind::Service => serde_path_to_error::deserialize(de).map(Object::Service),
            Kind::Endpoints => serde_path_to_error::deserialize(de).map(Object::Endpoints),
            Kind::Node => serde_path_to_error::deserialize(de).map(Object::Node),
            Kind::Community => serde_path_to_error::deserialize(de).map(Object::Community),
        };
        result.map_err(FieldError::from_path_error)
    }

    /// Parses any supported object, dispatching on its `kind` field.
    pub fn from_value(value: Value) -> Result<Object, FieldError> {
        let kind_str = value
            .get("kind")
            .and_then(Value::as_str)
            .ok_or_else(|| FieldError::new("kind", "kind is required"))?;
        let kind = Kind::from_kind_str(kind_str).ok_or_else(|| {
            FieldError::new(
                "kind",
                format!(
                    "unsupported kind {kind_str:?}: expected Service, Endpoints, Node or Community"
                ),
            )
        })?;
        let result = match kind {
            Kind::Service => serde_path_to_error::deserialize(value).map(Object::Service),
            Kind::Endpoints => serde_path_to_error::deserialize(value).map(Object::Endpoints),
            Kind::Node => serde_path_to_error::deserialize(value).map(Object::Node),
            Kind::Community => serde_path_to_error::deserialize(value).map(Object::Community),
        };
        result.map_err(FieldError::from_path_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_strings_round_trip() {
        let svc = ObjectKey::new(Kind::Service, "default", "hello");
        assert_eq!(svc.resource(), "default/service/hello");
        assert_eq!(
            ObjectKey::parse_resource("default/service/hello"),
            Some(svc)
        );
        let node = ObjectKey::new(Kind::Node, "ignored", "edge-1");
        assert_eq!(node.resource(), "_/node/edge-1");
        assert_eq!(ObjectKey::parse_resource("_/node/edge-1"), Some(node));
        let community = ObjectKey::new(Kind::Community, "", "factory");
        assert_eq!(community.resource(), "_/community/factory");
        assert_eq!(
            ObjectKey::parse_resource("_/community/factory"),
            Some(community)
        );
        for bad in [
            "",
            "default",
            "default/service",
            "default/service/",
            "default/pod/x",
            "_/service/x",
            "default/node/x",
            "default/community/x",
            "default/service/a/b",
        ] {
            assert_eq!(ObjectKey::parse_resource(bad), None, "{bad}");
        }
    }

    #[test]
    fn kubernetes_manifest_parses_and_round_trips() {
        let json = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"hello","namespace":"default","uid":"x"},
            "spec":{"selector":{"app":"hello"},"type":"ClusterIP","clusterIP":"10.96.0.10",
            "ports":[{"name":"http","port":80,"targetPort":8080,"protocol":"TCP"}]}}"#;
        let obj = Object::from_json(Kind::Service, json).expect("parses");
        let Object::Service(svc) = &obj else {
            panic!("not a service")
        };
        assert_eq!(svc.spec.ports[0].target_port_number(), Some(8080));
        assert_eq!(svc.spec.session_affinity, "None");
        let again = Object::from_json(Kind::Service, &obj.to_json()).expect("round trip");
        assert_eq!(again, obj);
    }

    #[test]
    fn fields_passed_through_come_back_as_written() {
        // Every kept field, in the order the object is always written in.
        let json = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"hello","namespace":"default","labels":{"app":"hello"},"resourceVersion":"7","uid":"u-1","creationTimestamp":"2026-01-01T00:00:00Z","generation":3,"generateName":"hello-","finalizers":["f"],"ownerReferences":[{"kind":"X"}],"managedFields":[{"manager":"kubectl"}]},"spec":{"clusterIP":"10.96.0.10","clusterIPs":["10.96.0.10"],"ports":[{"name":"http","port":80,"protocol":"TCP"}],"sessionAffinity":"ClientIP","sessionAffinityConfig":{"clientIP":{"timeoutSeconds":60}},"topologyKeys":["zone"],"selector":{"app":"hello"},"type":"ClusterIP","ipFamilies":["IPv4"],"ipFamilyPolicy":"SingleStack","internalTrafficPolicy":"Cluster","publishNotReadyAddresses":true,"trafficDistribution":"PreferClose"}}"#;
        let obj = Object::from_json(Kind::Service, json).expect("parses");
        assert_eq!(obj.to_json(), json);
        let Object::Service(svc) = &obj else {
            panic!("not a service")
        };
        assert_eq!(svc.spec.kept().service_type.as_deref(), Some("ClusterIP"));
        assert!(svc.publishes_not_ready());
        assert_eq!(
            svc.metadata.kept.as_ref().and_then(|k| k.generation),
            Some(3)
        );

        // An object without them keeps nothing behind the pointers, and writes none of them.
        let plain = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"a","namespace":"default"},"spec":{"clusterIP":"10.96.0.11","ports":[{"port":80,"protocol":"TCP"}],"sessionAffinity":"None"}}"#;
        let obj = Object::from_json(Kind::Service, plain).expect("parses");
        assert_eq!(obj.to_json(), plain);
        let Object::Service(svc) = &obj else {
            panic!("not a service")
        };
        assert!(svc.metadata.kept.is_none() && svc.spec.kept.is_none());
    }

    #[test]
    fn common_words_are_not_copied_per_object() {
        let json = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},"spec":{"ports":[{"port":80,"protocol":"UDP"},{"port":81,"protocol":"Tcp"}]}}"#;
        let Object::Service(svc) = Object::from_json(Kind::Service, json).expect("parses") else {
            panic!("not a service")
        };
        let shared = |w: &Word| matches!(w.0, std::borrow::Cow::Borrowed(_));
        assert!(shared(&svc.api_version) && shared(&svc.kind));
        assert!(shared(&svc.spec.session_affinity), "the default");
        assert!(shared(&svc.spec.ports[0].protocol));
        // Anything else is kept as written.
        assert!(!shared(&svc.spec.ports[1].protocol));
        assert_eq!(svc.spec.ports[1].protocol, "Tcp");
    }

    #[test]
    fn a_node_certificate_lives_in_status_beside_other_fields() {
        let mut node = Node::new("edge-1", BTreeMap::new());
        assert_eq!(node.certificate(), None);
        let cert = NodeCertificate {
            fingerprint: "ab".repeat(32),
            not_after_ms: 1_800_000_000_000,
        };
        node.set_certificate(Some(&cert));
        assert_eq!(node.certificate(), Some(cert.clone()));
        let json = Object::Node(node.clone()).to_json();
        assert!(
            json.contains(r#""status":{"certificate":{"fingerprint":"#),
            "{json}"
        );
        node.status
            .as_mut()
            .and_then(Value::as_object_mut)
            .expect("status")
            .insert("other".into(), Value::Bool(true));
        node.set_certificate(None);
        assert_eq!(node.certificate(), None);
        assert_eq!(node.status, Some(serde_json::json!({"other": true})));
        node.status = None;
        node.set_certificate(None);
        assert_eq!(node.status, None, "no empty status object is left behind");
    }

    #[test]
    fn unknown_fields_are_named() {
        let json = r#"{"kind":"Service","metadata":{"name":"a"},"spec":{"ports":[{"port":80,"tragetPort":1}]}}"#;
        let err = Object::from_json(Kind::Service, json).unwrap_err();
        assert_eq!(err.field, "spec.ports[0].tragetPort");
    }
}
