//! Validation of metadata objects. Every error names the field (JSON path) it is about, so the
//! REST API and `cloudcore apply` can answer `{"error", "field"}` and a user can fix the manifest.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use super::{
    EndpointAddress, Endpoints, IntOrString, Node, ObjectMeta, Service, ANNOTATION_BURST,
    ANNOTATION_HASH_KEY, ANNOTATION_LB_POLICY, ANNOTATION_PROTOCOL, ANNOTATION_QPS,
    ANNOTATION_TOLERATE_UNREADY, ANNOTATION_UNIT_KEY, TYPE_EXTERNAL_NAME,
};

/// A validation or parse error about one field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// JSON path of the offending field, e.g. `spec.ports[0].port`.
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Turns a serde error with its path into a field error. serde reports an unknown field at
    /// the path of its parent object, so the field's own name is appended to point at it.
    pub fn from_path_error<E: fmt::Display>(err: serde_path_to_error::Error<E>) -> Self {
        let message = err.inner().to_string();
        let mut field = error_path(err.path().to_string(), &message);
        if field == "." {
            field.clear();
        }
        // serde_json appends " at line N column M"; the path already says where.
        let message = match message.find(" at line ") {
            Some(i) => message[..i].to_string(),
            None => message,
        };
        FieldError { field, message }
    }
}

/// The path of a serde error, pointing at the offending key itself: for an unknown field,
/// some deserializers report the parent's path and others already include the key.
pub fn error_path(path: String, message: &str) -> String {
    let Some(name) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
    else {
        return path;
    };
    if path == name || path.ends_with(&format!(".{name}")) {
        path
    } else if path == "." || path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

/// Load-balancing policies a Service can ask for with `edgemesh.io/lb-policy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    Random,
    LeastRequest,
    ConsistentHash,
}

impl LbPolicy {
    pub fn parse(s: &str) -> Option<LbPolicy> {
        Some(match s {
            "round-robin" => LbPolicy::RoundRobin,
            "random" => LbPolicy::Random,
            "least-request" => LbPolicy::LeastRequest,
            "consistent-hash" => LbPolicy::ConsistentHash,
            _ => return None,
        })
    }
}

/// The edgemesh annotations of a Service, parsed.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ServiceAnnotations {
    pub lb_policy: LbPolicy,
    /// `source-ip` or `header:NAME` (the header name, lower-cased).
    pub hash_key: Option<String>,
    pub qps: Option<u32>,
    pub burst: Option<u32>,
    /// `http`, `h2` or `tcp`.
    pub protocol: Option<String>,
    /// `edgemesh.io/unit-key`: the node label whose values are the units.
    pub unit_key: Option<String>,
}

impl ServiceAnnotations {
    /// Parses the annotations of a Service; errors name the annotation.
    pub fn parse(meta: &ObjectMeta) -> Result<Self, FieldError> {
        Self::parse_from(|key| meta.annotations.get(key).map(String::as_str))
    }

    /// [`ServiceAnnotations::parse`] from whatever holds the annotations (`get` gives the
    /// value of one).
    pub fn parse_from<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<Self, FieldError> {
        let field = |key: &str| format!("metadata.annotations[{key:?}]");
        let mut out = ServiceAnnotations::default();
        if let Some(v) = get(ANNOTATION_LB_POLICY) {
            out.lb_policy = LbPolicy::parse(v).ok_or_else(|| {
                FieldError::new(
                    field(ANNOTATION_LB_POLICY),
                    format!("unknown policy {v:?}: expected round-robin, random, least-request or consistent-hash"),
                )
            })?;
        }
        if let Some(v) = get(ANNOTATION_HASH_KEY) {
            if v == "source-ip" {
                out.hash_key = Some(v.to_string());
            } else if let Some(h) = v.strip_prefix("header:").filter(|h| is_token(h)) {
                out.hash_key = Some(format!("header:{}", h.to_ascii_lowercase()));
            } else {
                return Err(FieldError::new(
                    field(ANNOTATION_HASH_KEY),
                    format!("invalid hash key {v:?}: expected source-ip or header:NAME"),
                ));
            }
        }
        let positive = |key: &str| -> Result<Option<u32>, FieldError> {
            match get(key) {
                None => Ok(None),
                Some(v) => match v.trim().parse::<u32>() {
                    Ok(n) if n > 0 => Ok(Some(n)),
                    _ => Err(FieldError::new(
                        field(key),
                        format!("{v:?} is not a positive whole number"),
                    )),
                },
            }
        };
        out.qps = positive(ANNOTATION_QPS)?;
        out.burst = positive(ANNOTATION_BURST)?;
        if out.burst.is_some() && out.qps.is_none() {
            return Err(FieldError::new(
                field(ANNOTATION_BURST),
                format!("{ANNOTATION_BURST} needs {ANNOTATION_QPS}"),
            ));
        }
        if let Some(v) = get(ANNOTATION_PROTOCOL) {
            if !matches!(v, "http" | "h2" | "tcp") {
                return Err(FieldError::new(
                    field(ANNOTATION_PROTOCOL),
                    format!("unknown protocol {v:?}: expected http, h2 or tcp"),
                ));
            }
            out.protocol = Some(v.to_string());
        }
        if let Some(v) = get(ANNOTATION_UNIT_KEY) {
            if !is_qualified_name(v) {
                return Err(FieldError::new(
                    field(ANNOTATION_UNIT_KEY),
                    format!("invalid unit key {v:?}: a node label key such as location"),
                ));
            }
            out.unit_key = Some(v.to_string());
        }
        if let Some(v) = get(ANNOTATION_TOLERATE_UNREADY) {
            if parse_bool(v).is_none() {
                return Err(FieldError::new(
                    field(ANNOTATION_TOLERATE_UNREADY),
                    format!("{v:?} is not a boolean: expected true or false"),
                ));
            }
        }
        Ok(out)
    }
}

/// A boolean as Kubernetes reads annotation values (Go's `strconv.ParseBool`).
pub(crate) fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// RFC 7230 token characters, for header names.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// DNS-1123 label: lower-case alphanumerics and '-', starting and ending alphanumeric, ≤ 63.
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// DNS-1035 label (Service names): a DNS-1123 label that starts with a letter.
fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.as_bytes()[0].is_ascii_lowercase()
}

/// DNS-1123 subdomain (Node names): dot-separated labels, ≤ 253.
pub(crate) fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// The values of `spec.trafficDistribution` edgemesh serves (Kubernetes 1.33 names).
pub const TRAFFIC_DISTRIBUTIONS: [&str; 3] = ["PreferClose", "PreferSameZone", "PreferSameNode"];

/// At most this many labels on one object (Kubernetes sets no number; edge nodes carry every
/// label of every object, so this one is bounded).
pub const MAX_LABELS: usize = 64;
/// Total size of an object's annotations, as in Kubernetes.
pub const MAX_ANNOTATION_BYTES: usize = 256 << 10;
/// At most this many topology keys on a Service.
pub const MAX_TOPOLOGY_KEYS: usize = 16;
/// The node name that means "reachable from cloudcore"; no edge node may take it.
pub const CLOUD_NODE: &str = "cloud";

/// A label value: empty, or ≤ 63 of [A-Za-z0-9-_.] starting and ending alphanumeric.
fn is_label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 63
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric())
}

/// A label key: an optional DNS-subdomain prefix and '/', then a non-empty label value.
pub fn is_qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    prefix.is_none_or(is_dns1123_subdomain) && !name.is_empty() && is_label_value(name)
}

/// Checks labels as Kubernetes does; errors name `field[key]`.
pub fn validate_labels(
    field: &str,
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<(), FieldError> {
    if labels.len() > MAX_LABELS {
        return Err(FieldError::new(
            field,
            format!("{} labels; at most {MAX_LABELS}", labels.len()),
        ));
    }
    for (key, value) in labels {
        let at = format!("{field}[{key:?}]");
        if !is_qualified_name(key) {
            return Err(FieldError::new(
                at,
                "invalid label key: [prefix/]name, name at most 63 characters of [A-Za-z0-9-_.]",
            ));
        }
        if !is_label_value(value) {
            return Err(FieldError::new(
                at,
                format!("invalid label value {value:?}: at most 63 characters of [A-Za-z0-9-_.]"),
            ));
        }
    }
    Ok(())
}

/// IANA service name, for named ports: ≤ 15 chars, lower-case alphanumerics and '-', a letter.
fn is_port_name(s: &str) -> bool {
    is_dns1123_label(s) && s.len() <= 15 && s.bytes().any(|c| c.is_ascii_lowercase())
}

pub(super) fn check_meta(
    meta: &ObjectMeta,
    namespaced: bool,
    service: bool,
) -> Result<(), FieldError> {
    if meta.name.is_empty() {
        return Err(FieldError::new("metadata.name", "name is required"));
    }
    let name_ok = if service {
        is_dns1035_label(&meta.name)
    } else {
        is_dns1123_subdomain(&meta.name)
    };
    if !name_ok {
        return Err(FieldError::new(
            "metadata.name",
            format!(
                "invalid name {:?}: lower-case letters, digits and '-'{}",
                meta.name,
                if service {
                    ", starting with a letter, at most 63 characters"
                } else {
                    ", at most 253 characters"
                }
            ),
        ));
    }
    if namespaced {
        if meta.namespace.is_empty() {
            return Err(FieldError::new(
                "metadata.namespace",
                "namespace is required",
            ));
        }
        if !is_dns1123_label(&meta.namespace) {
            return Err(FieldError::new(
                "metadata.namespace",
                format!("invalid namespace {:?}", meta.namespace),
            ));
        }
    } else if !meta.namespace.is_empty() {
        return Err(FieldError::new(
            "metadata.namespace",
            "this kind is cluster-scoped and has no namespace",
        ));
    }
    validate_labels("metadata.labels", &meta.labels)?;
    let annotations: usize = meta
        .annotations
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum();
    if annotations > MAX_ANNOTATION_BYTES {
        return Err(FieldError::new(
            "metadata.annotations",
            format!("annotations total {annotations} bytes; at most {MAX_ANNOTATION_BYTES}"),
        ));
    }
    Ok(())
}

fn check_api_version(api_version: &str) -> Result<(), FieldError> {
    if api_version != "v1" {
        return Err(FieldError::new(
            "apiVersion",
            format!("unsupported apiVersion {api_version:?}: expected v1"),
        ));
    }
    Ok(())
}

pub(super) fn check_kind(kind: &str, expected: &str) -> Result<(), FieldError> {
    if kind != expected {
        return Err(FieldError::new(
            "kind",
            format!("expected kind {expected}, got {kind:?}"),
        ));
    }
    Ok(())
}

fn check_port(field: String, port: i64) -> Result<u16, FieldError> {
    match u16::try_from(port) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(FieldError::new(
            field,
            format!("port {port} out of range 1-65535"),
        )),
    }
}

fn check_protocol(field: String, protocol: &str) -> Result<(), FieldError> {
    if !matches!(protocol, "TCP" | "UDP" | "SCTP") {
        return Err(FieldError::new(
            field,
            format!("unsupported protocol {protocol:?}: expected TCP, UDP or SCTP"),
        ));
    }
    Ok(())
}

/// Validates a Service. `service_cidr` is where cluster IPs must lie; an empty `clusterIP` is
/// allowed (cloudcore allocates one before storing).
pub fn validate_service(svc: &Service, service_cidr: &IpNet) -> Result<(), FieldError> {
    check_api_version(&svc.api_version)?;
    check_kind(&svc.kind, "Service")?;
    check_meta(&svc.metadata, true, true)?;
    ServiceAnnotations::parse(&svc.metadata)?;
    check_type(svc)?;
    check_ip_families(svc, service_cidr)?;
    check_traffic_distribution(svc)?;
    let ip = &svc.spec.cluster_ip;
    if !ip.is_empty() && ip != "None" {
        let addr: IpAddr = ip.parse().map_err(|_| {
            FieldError::new(
                "spec.clusterIP",
                format!("invalid clusterIP {ip:?}: expected an IP address, \"None\" or empty"),
            )
        })?;
        if !service_cidr.contains(&addr) {
            return Err(FieldError::new(
                "spec.clusterIP",
                format!("clusterIP {addr} is outside the service CIDR {service_cidr}"),
            ));
        }
        if addr == service_cidr.network() || addr == service_cidr.broadcast() {
            return Err(FieldError::new(
                "spec.clusterIP",
                format!("clusterIP {addr} is the network or broadcast address of {service_cidr}"),
            ));
        }
    }
    if let Some(ips) = &svc.spec.cluster_ips {
        if ips.first().is_some_and(|first| first != ip) {
            return Err(FieldError::new(
                "spec.clusterIPs",
                "clusterIPs[0] must equal clusterIP",
            ));
        }
        // One address family: a second cluster IP would be stored but never served.
        if ips.len() > 1 {
            return Err(FieldError::new(
                "spec.clusterIPs[1]",
                format!(
                    "{:?}: this cluster is not configured for dual-stack services (service_cidr {service_cidr}): one cluster IP only",
                    ips[1]
                ),
            ));
        }
    }
    if svc.spec.ports.is_empty() && !svc.is_headless() && !svc.is_external_name() {
        return Err(FieldError::new(
            "spec.ports",
            "a Service with a cluster IP needs at least one port",
        ));
    }
    let mut names = HashSet::new();
    let mut numbers = HashSet::new();
    for (i, p) in svc.spec.ports.iter().enumerate() {
        let at = |f: &str| format!("spec.ports[{i}].{f}");
        let port = check_port(at("port"), p.port)?;
        check_protocol(at("protocol"), &p.protocol)?;
        if !numbers.insert((port, p.protocol.clone())) {
            return Err(FieldError::new(
                at("port"),
                format!("duplicate port {port}/{}", p.protocol),
            ));
        }
        if svc.spec.ports.len() > 1 && p.name.is_empty() {
            return Err(FieldError::new(
                at("name"),
                "a name is required when a Service has more than one port",
            ));
        }
        if !p.name.is_empty() {
            if !is_dns1123_label(&p.name) {
                return Err(FieldError::new(
                    at("name"),
                    format!("invalid port name {:?}", p.name),
                ));
            }
            if !names.insert(p.name.clone()) {
                return Err(FieldError::new(
                    at("name"),
                    format!("duplicate port name {:?}", p.name),
                ));
            }
        }
        match &p.target_port {
            None => {}
            Some(IntOrString::Int(n)) => {
                check_port(at("targetPort"), *n)?;
            }
            Some(IntOrString::String(s)) if !is_port_name(s) => {
                return Err(FieldError::new(
                    at("targetPort"),
                    format!("invalid targetPort {s:?}: a number 1-65535 or a port name"),
                ));
            }
            Some(IntOrString::String(_)) => {}
        }
    }
    if !matches!(svc.spec.session_affinity.as_str(), "None" | "ClientIP") {
        return Err(FieldError::new(
            "spec.sessionAffinity",
            format!(
                "unsupported sessionAffinity {:?}: expected None or ClientIP",
                svc.spec.session_affinity
            ),
        ));
    }
    if svc.spec.topology_keys.len() > MAX_TOPOLOGY_KEYS {
        return Err(FieldError::new(
            "spec.topologyKeys",
            format!("at most {MAX_TOPOLOGY_KEYS} topology keys"),
        ));
    }
    for (i, key) in svc.spec.topology_keys.iter().enumerate() {
        if key != "*" && !is_qualified_name(key) {
            return Err(FieldError::new(
                format!("spec.topologyKeys[{i}]"),
                format!("invalid topology key {key:?}: a label key or \"*\""),
            ));
        }
    }
    Ok(())
}

/// The Service types Kubernetes knows. Only `ExternalName` changes what edgemesh does; the
/// others are kept as written (every Service gets a cluster IP here, none a node port).
const SERVICE_TYPES: [&str; 4] = ["ClusterIP", "NodePort", "LoadBalancer", TYPE_EXTERNAL_NAME];

/// `spec.type`, and `spec.externalName` with it: an `ExternalName` Service is a CNAME to a DNS
/// name, so it has that name and no cluster IP; no other type has an external name.
fn check_type(svc: &Service) -> Result<(), FieldError> {
    if let Some(t) = &svc.spec.kept().service_type {
        if !SERVICE_TYPES.contains(&t.as_str()) {
            return Err(FieldError::new(
                "spec.type",
                format!("unsupported type {t:?}: expected ClusterIP, NodePort, LoadBalancer or ExternalName"),
            ));
        }
    }
    let name = svc.spec.kept().external_name.as_deref();
    if !svc.is_external_name() {
        if name.is_some() {
            return Err(FieldError::new(
                "spec.externalName",
                "only a Service of type ExternalName has an external name",
            ));
        }
        return Ok(());
    }
    let Some(name) = name.filter(|n| !n.is_empty()) else {
        return Err(FieldError::new(
            "spec.externalName",
            "an ExternalName Service needs spec.externalName (the DNS name it aliases)",
        ));
    };
    // Kubernetes accepts the name with a trailing dot, as a fully qualified name.
    let bare = name.strip_suffix('.').unwrap_or(name);
    if !is_dns1123_subdomain(bare) {
        return Err(FieldError::new(
            "spec.externalName",
            format!("invalid external name {name:?}: a lower-case DNS name such as db.example.com"),
        ));
    }
    if bare.parse::<IpAddr>().is_ok() {
        return Err(FieldError::new(
            "spec.externalName",
            format!("{name:?} is an IP address: DNS cannot alias an address (use a Service with Endpoints)"),
        ));
    }
    if !svc.spec.cluster_ip.is_empty()
        || svc.spec.cluster_ips.as_ref().is_some_and(|v| !v.is_empty())
    {
        return Err(FieldError::new(
            "spec.clusterIP",
            "may not be set for ExternalName services: they have no cluster IP",
        ));
    }
    for (field, set) in [
        ("spec.ipFamilies", svc.spec.kept().ip_families.is_some()),
        (
            "spec.ipFamilyPolicy",
            svc.spec.kept().ip_family_policy.is_some(),
        ),
    ] {
        if set {
            return Err(FieldError::new(
                field,
                "may not be set for ExternalName services",
            ));
        }
    }
    Ok(())
}

/// `spec.ipFamilyPolicy` and `spec.ipFamilies` against the one address family of
/// `service_cidr`, with Kubernetes' fields and words: a single-stack cluster refuses
/// `RequireDualStack` and a family it has no range for; `PreferDualStack` is served single-stack.
fn check_ip_families(svc: &Service, service_cidr: &IpNet) -> Result<(), FieldError> {
    let cluster_family = match service_cidr {
        IpNet::V4(_) => "IPv4",
        IpNet::V6(_) => "IPv6",
    };
    if let Some(policy) = &svc.spec.kept().ip_family_policy {
        match policy.as_str() {
            "SingleStack" | "PreferDualStack" => {}
            "RequireDualStack" => {
                return Err(FieldError::new(
                    "spec.ipFamilyPolicy",
                    format!("\"RequireDualStack\": this cluster is not configured for dual-stack services (service_cidr {service_cidr} is {cluster_family} only)"),
                ))
            }
            other => {
                return Err(FieldError::new(
                    "spec.ipFamilyPolicy",
                    format!("unsupported value {other:?}: expected SingleStack, PreferDualStack or RequireDualStack"),
                ))
            }
        }
    }
    let families = svc.spec.kept().ip_families.as_deref().unwrap_or_default();
    for (i, family) in families.iter().enumerate() {
        let at = format!("spec.ipFamilies[{i}]");
        if !matches!(family.as_str(), "IPv4" | "IPv6") {
            return Err(FieldError::new(
                at,
                format!("unsupported value {family:?}: expected IPv4 or IPv6"),
            ));
        }
        if families[..i].contains(family) {
            return Err(FieldError::new(at, format!("duplicate value {family:?}")));
        }
        if family != cluster_family {
            return Err(FieldError::new(
                at,
                format!("{family:?}: not configured on this cluster (service_cidr {service_cidr} is {cluster_family} only)"),
            ));
        }
    }
    Ok(())
}

/// `spec.trafficDistribution`: a value Kubernetes defines, and not together with
/// `topologyKeys` (which would say the same thing twice, possibly differently).
fn check_traffic_distribution(svc: &Service) -> Result<(), FieldError> {
    let Some(value) = &svc.spec.kept().traffic_distribution else {
        return Ok(());
    };
    if !TRAFFIC_DISTRIBUTIONS.contains(&value.as_str()) {
        return Err(FieldError::new(
            "spec.trafficDistribution",
            format!(
                "unsupported value {value:?}: expected {}",
                TRAFFIC_DISTRIBUTIONS.join(", ")
            ),
        ));
    }
    if !svc.spec.topology_keys.is_empty() {
        return Err(FieldError::new(
            "spec.trafficDistribution",
            "cannot be combined with spec.topologyKeys: use one of the two",
        ));
    }
    Ok(())
}

/// An endpoint address must be a pod or host the mesh can dial without looping back into
/// itself: not in the service CIDR (the proxy would capture its own connection), not
/// loopback or unspecified (that is the proxying host itself), not multicast or broadcast,
/// not link-local (where the node-local DNS address lives).
fn check_endpoint_ip(field: String, raw: &str, service_cidr: &IpNet) -> Result<(), FieldError> {
    let ip: IpAddr = raw
        .parse::<IpAddr>()
        .map_err(|_| FieldError::new(field.clone(), format!("invalid IP address {raw:?}")))?
        .to_canonical();
    let bad = |why: &str| Err(FieldError::new(field.clone(), format!("{ip} is {why}")));
    if ip.is_unspecified() {
        return bad("unspecified");
    }
    if ip.is_loopback() {
        return bad("a loopback address");
    }
    if ip.is_multicast() {
        return bad("a multicast address");
    }
    match ip {
        IpAddr::V4(v4) if v4.is_broadcast() => return bad("the broadcast address"),
        IpAddr::V4(v4) if v4.is_link_local() => return bad("link-local"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => return bad("link-local"),
        _ => {}
    }
    if service_cidr.contains(&ip) {
        return bad(&format!(
            "inside the service CIDR {service_cidr}: endpoints are pods, not Services"
        ));
    }
    Ok(())
}

fn check_address(
    field: &str,
    addr: &EndpointAddress,
    service_cidr: &IpNet,
) -> Result<(), FieldError> {
    check_endpoint_ip(format!("{field}.ip"), &addr.ip, service_cidr)?;
    if let Some(node) = &addr.node_name {
        if node != CLOUD_NODE && !is_dns1123_subdomain(node) {
            return Err(FieldError::new(
                format!("{field}.nodeName"),
                format!("invalid node name {node:?}"),
            ));
        }
    }
    if let Some(host) = &addr.hostname {
        if !is_dns1123_label(host) {
            return Err(FieldError::new(
                format!("{field}.hostname"),
                format!("invalid hostname {host:?}: must be a DNS label"),
            ));
        }
    }
    Ok(())
}

pub fn validate_endpoints(ep: &Endpoints, service_cidr: &IpNet) -> Result<(), FieldError> {
    check_api_version(&ep.api_version)?;
    check_kind(&ep.kind, "Endpoints")?;
    check_meta(&ep.metadata, true, false)?;
    for (i, subset) in ep.subsets.iter().enumerate() {
        for (j, a) in subset.addresses.iter().enumerate() {
            check_address(&format!("subsets[{i}].addresses[{j}]"), a, service_cidr)?;
        }
        for (j, a) in subset.not_ready_addresses.iter().enumerate() {
            check_address(
                &format!("subsets[{i}].notReadyAddresses[{j}]"),
                a,
                service_cidr,
            )?;
        }
        let mut names = HashSet::new();
        for (j, p) in subset.ports.iter().enumerate() {
            let at = |f: &str| format!("subsets[{i}].ports[{j}].{f}");
            check_port(at("port"), p.port)?;
            check_protocol(at("protocol"), &p.protocol)?;
            if subset.ports.len() > 1 && p.name.is_empty() {
                return Err(FieldError::new(
                    at("name"),
                    "a name is required when a subset has more than one port",
                ));
            }
            if !p.name.is_empty() && !is_dns1123_label(&p.name) {
                return Err(FieldError::new(
                    at("name"),
                    format!("invalid port name {:?}", p.name),
                ));
            }
            if !names.insert(p.name.clone()) {
                return Err(FieldError::new(
                    at("name"),
                    format!("duplicate port name {:?}", p.name),
                ));
            }
        }
    }
    Ok(())
}

pub fn validate_node(node: &Node) -> Result<(), FieldError> {
    check_api_version(&node.api_version)?;
    check_kind(&node.kind, "Node")?;
    check_meta(&node.metadata, false, false)?;
    if node.metadata.name == CLOUD_NODE {
        return Err(FieldError::new(
            "metadata.name",
            format!("{CLOUD_NODE:?} is reserved: endpoints with nodeName {CLOUD_NODE:?} are reached through cloudcore"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Kind, Object};

    fn cidr() -> IpNet {
        "10.96.0.0/12".parse().expect("cidr")
    }

    fn service(json: &str) -> Result<(), FieldError> {
        match Object::from_json(Kind::Service, json)? {
            Object::Service(s) => validate_service(&s, &cidr()),
            _ => unreachable!(),
        }
    }

    fn field_of(json: &str) -> String {
        service(json).expect_err("must be invalid").field
    }

    #[test]
    fn valid_service_passes() {
        service(r#"{"kind":"Service","metadata":{"name":"hello","namespace":"default"},"spec":{"clusterIP":"10.96.0.10","ports":[{"port":80,"targetPort":8080}]}}"#).expect("valid");
        service(r#"{"kind":"Service","metadata":{"name":"db","namespace":"default"},"spec":{"clusterIP":"None"}}"#).expect("headless without ports");
    }

    #[test]
    fn each_bad_field_is_named() {
        let base = |spec: &str| {
            format!(
                r#"{{"kind":"Service","metadata":{{"name":"a","namespace":"default"}},"spec":{spec}}}"#
            )
        };
        assert_eq!(
            field_of(&base(r#"{"clusterIP":"10.1.2.3","ports":[{"port":80}]}"#)),
            "spec.clusterIP"
        );
        assert_eq!(
            field_of(&base(r#"{"clusterIP":"banana","ports":[{"port":80}]}"#)),
            "spec.clusterIP"
        );
        assert_eq!(
            field_of(&base(r#"{"ports":[{"port":70000}]}"#)),
            "spec.ports[0].port"
        );
        assert_eq!(
            field_of(&base(r#"{"ports":[{"port":80,"targetPort":0}]}"#)),
            "spec.ports[0].targetPort"
        );
        assert_eq!(
            field_of(&base(r#"{"ports":[{"port":80},{"port":81}]}"#)),
            "spec.ports[0].name"
        );
        assert_eq!(
            field_of(&base(r#"{"ports":[{"port":80,"protocol":"ICMP"}]}"#)),
            "spec.ports[0].protocol"
        );
        assert_eq!(
            field_of(&base(
                r#"{"ports":[{"port":80}],"sessionAffinity":"Sticky"}"#
            )),
            "spec.sessionAffinity"
        );
        assert_eq!(field_of(&base(r#"{"ports":[]}"#)), "spec.ports");
        assert_eq!(
            field_of(
                r#"{"kind":"Service","metadata":{"namespace":"default"},"spec":{"ports":[{"port":80}]}}"#
            ),
            "metadata.name"
        );
        assert_eq!(
            field_of(
                r#"{"kind":"Service","metadata":{"name":"Bad_Name","namespace":"default"},"spec":{"ports":[{"port":80}]}}"#
            ),
            "metadata.name"
        );
        assert_eq!(
            field_of(
                r#"{"kind":"Service","metadata":{"name":"a","namespace":"default","annotations":{"edgemesh.io/qps":"lots"}},"spec":{"ports":[{"port":80}]}}"#
            ),
            "metadata.annotations[\"edgemesh.io/qps\"]"
        );
        assert_eq!(
            field_of(
                r#"{"apiVersion":"v2","kind":"Service","metadata":{"name":"a","namespace":"default"},"spec":{"ports":[{"port":80}]}}"#
            ),
            "apiVersion"
        );
        assert_eq!(
            field_of(
                r#"{"kind":"Service","metadata":{"name":"a","namespace":"default"},"spec":{"ports":[{"port":"eighty"}]}}"#
            ),
            "spec.ports[0].port"
        );
    }

    #[test]
    fn endpoints_fields_are_named() {
        let check = |json: &str| match Object::from_json(Kind::Endpoints, json) {
            Ok(Object::Endpoints(e)) => validate_endpoints(&e, &cidr()),
            Ok(_) => unreachable!(),
            Err(e) => Err(e),
        };
        check(r#"{"kind":"Endpoints","metadata":{"name":"a","namespace":"default"},"subsets":[{"addresses":[{"ip":"10.0.0.1","nodeName":"edge-1","hostname":"a-0"}],"ports":[{"port":80}]}]}"#).expect("valid");
        let err = check(r#"{"kind":"Endpoints","metadata":{"name":"a","namespace":"default"},"subsets":[{"addresses":[{"ip":"10.0.0.300"}],"ports":[{"port":80}]}]}"#).unwrap_err();
        assert_eq!(err.field, "subsets[0].addresses[0].ip");
        let err = check(r#"{"kind":"Endpoints","metadata":{"name":"a","namespace":"default"},"subsets":[{"addresses":[{"ip":"10.0.0.3"}],"ports":[{"port":0}]}]}"#).unwrap_err();
        assert_eq!(err.field, "subsets[0].ports[0].port");
    }

    #[test]
    fn unknown_fields_are_named_once_whatever_the_input() {
        let json = r#"{"kind":"Service","metadata":{"name":"a","namespace":"default"},"spec":{"ports":[{"port":80,"targetPrt":1}]}}"#;
        let from_text = Object::from_json(Kind::Service, json).unwrap_err();
        let from_value = Object::from_value(serde_json::from_str(json).expect("json")).unwrap_err();
        assert_eq!(from_text.field, "spec.ports[0].targetPrt");
        assert_eq!(from_value.field, "spec.ports[0].targetPrt");
    }

    #[test]
    fn endpoint_addresses_that_would_loop_or_hit_the_host_are_refused() {
        let check = |ip: &str| {
            let json = format!(
                r#"{{"kind":"Endpoints","metadata":{{"name":"a","namespace":"default"}},"subsets":[{{"addresses":[{{"ip":"{ip}"}}],"ports":[{{"port":80}}]}}]}}"#
            );
            match Object::from_json(Kind::Endpoints, &json) {
                Ok(Object::Endpoints(e)) => validate_endpoints(&e, &cidr()),
                Ok(_) => unreachable!(),
                Err(e) => Err(e),
            }
        };
        check("10.244.1.5").expect("a pod");
        check("fd00::5").expect("an IPv6 pod");
        for bad in [
            "0.0.0.0",
            "127.0.0.1",
            "::1",
            "224.0.0.1",
            "255.255.255.255",
            "169.254.96.16",
            "10.96.0.10",
            "::ffff:127.0.0.1",
            "fe80::1",
        ] {
            let err = check(bad).expect_err(bad);
            assert_eq!(err.field, "subsets[0].addresses[0].ip", "{bad}");
        }
    }

    #[test]
    fn labels_follow_kubernetes_rules_and_cloud_is_reserved() {
        let node = |json: &str| match Object::from_json(Kind::Node, json) {
            Ok(Object::Node(n)) => validate_node(&n),
            Ok(_) => unreachable!(),
            Err(e) => Err(e),
        };
        node(r#"{"kind":"Node","metadata":{"name":"edge-1","labels":{"topology.kubernetes.io/zone":"a-1","x":""}}}"#).expect("valid");
        for labels in [
            r#"{"":"a"}"#,
            r#"{"a b":"c"}"#,
            r#"{"a":"-x"}"#,
            r#"{"Bad_Prefix/x":"a"}"#,
        ] {
            let err = node(&format!(
                r#"{{"kind":"Node","metadata":{{"name":"e","labels":{labels}}}}}"#
            ))
            .expect_err(labels);
            assert!(err.field.starts_with("metadata.labels"), "{err}");
        }
        let long = "v".repeat(64);
        assert!(node(&format!(
            r#"{{"kind":"Node","metadata":{{"name":"e","labels":{{"k":"{long}"}}}}}}"#
        ))
        .is_err());
        assert_eq!(
            node(r#"{"kind":"Node","metadata":{"name":"cloud"}}"#)
                .expect_err("reserved")
                .field,
            "metadata.name"
        );
    }

    #[test]
    fn external_name_services_alias_a_dns_name_and_have_no_cluster_ip() {
        let svc = |spec: &str| {
            service(&format!(
                r#"{{"kind":"Service","metadata":{{"name":"db","namespace":"default"}},"spec":{spec}}}"#
            ))
        };
        svc(r#"{"type":"ExternalName","externalName":"db.example.com"}"#).expect("valid");
        svc(r#"{"type":"ExternalName","externalName":"db.example.com.","ports":[{"port":5432}]}"#)
            .expect("a trailing dot and ports");
        for (spec, field) in [
            (r#"{"type":"ExternalName"}"#, "spec.externalName"),
            (
                r#"{"type":"ExternalName","externalName":"Bad_Name"}"#,
                "spec.externalName",
            ),
            (
                r#"{"type":"ExternalName","externalName":"10.1.2.3"}"#,
                "spec.externalName",
            ),
            (
                r#"{"type":"ExternalName","externalName":"a.b","clusterIP":"None"}"#,
                "spec.clusterIP",
            ),
            (
                r#"{"type":"ExternalName","externalName":"a.b","ipFamilyPolicy":"SingleStack"}"#,
                "spec.ipFamilyPolicy",
            ),
            (
                r#"{"externalName":"a.b","ports":[{"port":80}]}"#,
                "spec.externalName",
            ),
            (r#"{"type":"Bogus","ports":[{"port":80}]}"#, "spec.type"),
        ] {
            assert_eq!(svc(spec).expect_err(spec).field, field, "{spec}");
        }
    }

    #[test]
    fn dual_stack_is_refused_on_a_single_stack_cluster_naming_the_field() {
        let svc = |spec: &str| {
            service(&format!(
                r#"{{"kind":"Service","metadata":{{"name":"a","namespace":"default"}},"spec":{spec}}}"#
            ))
        };
        svc(r#"{"ports":[{"port":80}],"ipFamilyPolicy":"SingleStack","ipFamilies":["IPv4"]}"#)
            .expect("single stack");
        svc(r#"{"ports":[{"port":80}],"ipFamilyPolicy":"PreferDualStack"}"#)
            .expect("served single-stack, as Kubernetes does");
        let err = svc(r#"{"ports":[{"port":80}],"ipFamilyPolicy":"RequireDualStack","ipFamilies":["IPv6","IPv4"]}"#)
            .expect_err("dual stack");
        assert_eq!(err.field, "spec.ipFamilyPolicy");
        assert!(
            err.message
                .contains("not configured for dual-stack services"),
            "{err}"
        );
        let err = svc(r#"{"ports":[{"port":80}],"ipFamilies":["IPv6","IPv4"]}"#).expect_err("v6");
        assert_eq!(err.field, "spec.ipFamilies[0]");
        assert!(
            err.message.contains("not configured on this cluster"),
            "{err}"
        );
        let err = svc(r#"{"ports":[{"port":80}],"ipFamilies":["IPv4","IPv6"]}"#).expect_err("two");
        assert_eq!(err.field, "spec.ipFamilies[1]");
        let err = svc(r#"{"ports":[{"port":80}],"ipFamilies":["IPv4","IPv4"]}"#).expect_err("dup");
        assert_eq!(err.field, "spec.ipFamilies[1]");
        let err = svc(r#"{"ports":[{"port":80}],"ipFamilyPolicy":"Both"}"#).expect_err("value");
        assert_eq!(err.field, "spec.ipFamilyPolicy");
        let err = svc(r#"{"clusterIP":"10.96.0.5","clusterIPs":["10.96.0.5","fd00::5"],"ports":[{"port":80}]}"#)
            .expect_err("two IPs");
        assert_eq!(err.field, "spec.clusterIPs[1]");
    }

    #[test]
    fn traffic_distribution_and_unit_key_are_checked() {
        let svc = |spec: &str, annotations: &str| {
            service(&format!(
                r#"{{"kind":"Service","metadata":{{"name":"a","namespace":"default","annotations":{{{annotations}}}}},"spec":{spec}}}"#
            ))
        };
        svc(
            r#"{"clusterIP":"None","trafficDistribution":"PreferClose"}"#,
            r#""edgemesh.io/unit-key":"location""#,
        )
        .expect("valid");
        for (spec, annotations, field) in [
            (
                r#"{"clusterIP":"None","trafficDistribution":"Nearby"}"#,
                "",
                "spec.trafficDistribution",
            ),
            (
                r#"{"clusterIP":"None","trafficDistribution":"PreferClose","topologyKeys":["zone"]}"#,
                "",
                "spec.trafficDistribution",
            ),
            (
                r#"{"clusterIP":"None"}"#,
                r#""edgemesh.io/unit-key":"not a label""#,
                "metadata.annotations[\"edgemesh.io/unit-key\"]",
            ),
            (
                r#"{"clusterIP":"None"}"#,
                r#""service.alpha.kubernetes.io/tolerate-unready-endpoints":"yes""#,
                "metadata.annotations[\"service.alpha.kubernetes.io/tolerate-unready-endpoints\"]",
            ),
        ] {
            assert_eq!(
                svc(spec, annotations).expect_err(spec).field,
                field,
                "{spec} {annotations}"
            );
        }
    }

    #[test]
    fn the_legacy_annotation_publishes_not_ready_addresses() {
        let svc = |json: &str| match Object::from_json(Kind::Service, json).expect("json") {
            Object::Service(s) => s,
            _ => unreachable!(),
        };
        let base = r#"{"kind":"Service","metadata":{"name":"a","namespace":"default"},"spec":{"clusterIP":"None"}}"#;
        assert!(!svc(base).publishes_not_ready());
        assert!(svc(r#"{"kind":"Service","metadata":{"name":"a","namespace":"default"},"spec":{"clusterIP":"None","publishNotReadyAddresses":true}}"#).publishes_not_ready());
        assert!(svc(r#"{"kind":"Service","metadata":{"name":"a","namespace":"default","annotations":{"service.alpha.kubernetes.io/tolerate-unready-endpoints":"true"}},"spec":{"clusterIP":"None"}}"#).publishes_not_ready());
        assert!(!svc(r#"{"kind":"Service","metadata":{"name":"a","namespace":"default","annotations":{"service.alpha.kubernetes.io/tolerate-unready-endpoints":"false"}},"spec":{"clusterIP":"None"}}"#).publishes_not_ready());
    }

    #[test]
    fn annotations_parse() {
        let mut meta = ObjectMeta::default();
        meta.annotations
            .insert(ANNOTATION_LB_POLICY.into(), "consistent-hash".into());
        meta.annotations
            .insert(ANNOTATION_HASH_KEY.into(), "header:X-User".into());
        meta.annotations.insert(ANNOTATION_QPS.into(), "50".into());
        let a = ServiceAnnotations::parse(&meta).expect("valid");
        assert_eq!(a.lb_policy, LbPolicy::ConsistentHash);
        assert_eq!(a.hash_key.as_deref(), Some("header:x-user"));
        assert_eq!(a.qps, Some(50));
    }
}
