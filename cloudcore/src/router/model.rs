//! Router records with the field names of KubeEdge's router model (SPEC §2), their validation,
//! and the parsed form the data path uses.
//!
//! A [`RuleEndpoint`] names a kind of place (`rest`: the cloud side, `service`: the mesh); a
//! [`Rule`] connects a source endpoint to a target endpoint by name, as in KubeEdge, and says
//! where exactly in `source_resource` / `target_resource`. Every validation error names the
//! field it is about.

use std::collections::VecDeque;

use axum::http::Uri;
use edgehub::model::FieldError;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// How many recent errors a rule keeps.
pub const MAX_ERRORS: usize = 10;
/// Largest `properties` object (serialised) of an endpoint.
const MAX_PROPERTIES_BYTES: usize = 16 << 10;
/// Longest path or URL a rule may name.
const MAX_PATH_LEN: usize = 2048;
/// Highest `properties.qps` / `properties.burst`.
const MAX_RATE: f64 = 1_000_000.0;

/// Annotation on the Service and Endpoints a `service` → `rest` rule creates: the rule's id.
pub const ANNOTATION_RULE: &str = "edgemesh.io/router-rule";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointType {
    /// A REST API in the cloud: requests come from, or go to, an HTTP URL.
    Rest,
    /// A Service of the mesh.
    Service,
}

impl EndpointType {
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointType::Rest => "rest",
            EndpointType::Service => "service",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RuleEndpoint {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: EndpointType,
    pub name: String,
    pub project_id: String,
    pub is_shared: bool,
    pub properties: Map<String, Value>,
    pub created_at: String,
    pub updated_at: String,
}

/// One failure a rule recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleErrorEntry {
    /// RFC 3339, UTC.
    pub time: String,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub id: String,
    pub name: String,
    pub project_id: String,
    pub domain_id: String,
    /// The source RuleEndpoint's name.
    pub source: String,
    pub source_resource: Map<String, Value>,
    /// The target RuleEndpoint's name.
    pub target: String,
    pub target_resource: Map<String, Value>,
    pub in_use: bool,
    /// KubeEdge soft-deletes; here a deleted rule is gone, so this is always false.
    pub is_deleted: bool,
    pub created_at: String,
    pub updated_at: String,
    #[serde(default)]
    pub success_messages: u64,
    #[serde(default)]
    pub fail_messages: u64,
    #[serde(default)]
    pub errors: VecDeque<RuleErrorEntry>,
}

/// A rule's QPS limit, from its source endpoint's properties.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateSpec {
    pub qps: f64,
    pub burst: u32,
}

/// A `target_resource.url` of a `service` → `rest` rule, checked and split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetUrl {
    /// What goes into the `Host` header: the URL's authority as written.
    pub authority: String,
    /// Host name or IP literal (without brackets), for connecting.
    pub host: String,
    pub port: u16,
    /// The URL's path; request paths are appended to it.
    pub path: String,
}

/// What a rule does, parsed from its resources.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Requests to the router ingress under `path` go to Service `namespace/name` port `port`,
    /// at `target_path` + the rest of the request path.
    RestToService {
        path: String,
        namespace: String,
        name: String,
        port: u16,
        target_path: String,
    },
    /// Requests edge apps send to the virtual Service `namespace/name:port` go to `url`.
    ServiceToRest {
        namespace: String,
        name: String,
        port: u16,
        url: TargetUrl,
    },
}

fn err(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError::new(field, message)
}

/// Fields the server sets; a body that carries them is refused rather than half-honoured.
fn refuse_server_fields(body: &Map<String, Value>, fields: &[&str]) -> Result<(), FieldError> {
    match fields.iter().find(|f| body.contains_key(**f)) {
        Some(f) => Err(err(*f, "is set by cloudcore; leave it out")),
        None => Ok(()),
    }
}

fn parse_body<T: serde::de::DeserializeOwned>(body: Map<String, Value>) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(Value::Object(body)).map_err(|e| {
        let mut err = FieldError::from_path_error(e);
        // serde reports a missing field at its parent's path; name the field itself.
        if let Some(name) = err
            .message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
        {
            err.field = if err.field.is_empty() {
                name.to_string()
            } else {
                format!("{}.{name}", err.field)
            };
            err.message = "is required".into();
        }
        err
    })
}

/// Names and ids: 1-253 of `[A-Za-z0-9._-]`, starting with a letter or digit (safe in paths,
/// logs and metric labels).
fn check_name(field: &str, value: &str) -> Result<(), FieldError> {
    if value.is_empty() {
        return Err(err(field, "is required"));
    }
    if value.len() > 253 {
        return Err(err(field, "at most 253 characters"));
    }
    let ok = value.as_bytes()[0].is_ascii_alphanumeric()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        return Err(err(
            field,
            format!("invalid {value:?}: letters, digits, '-', '_' and '.', starting with a letter or digit"),
        ));
    }
    Ok(())
}

/// DNS-1123 label (namespaces), or DNS-1035 (Service names: starting with a letter).
fn check_dns_label(field: &str, value: &str, service: bool) -> Result<(), FieldError> {
    let b = value.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && (!service || b[0].is_ascii_lowercase());
    if !ok {
        return Err(err(
            field,
            format!(
                "invalid {value:?}: lower-case letters, digits and '-'{}, at most 63 characters",
                if service {
                    ", starting with a letter"
                } else {
                    ""
                }
            ),
        ));
    }
    Ok(())
}

/// A positive number given as a JSON number or a numeric string (KubeEdge's properties are
/// strings).
fn positive_number(field: &str, value: &Value) -> Result<f64, FieldError> {
    let n = match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n.is_finite() && n > 0.0 && n <= MAX_RATE => Ok(n),
        _ => Err(err(
            field,
            format!("{value} is not a number above 0 and at most {MAX_RATE}"),
        )),
    }
}

/// The QPS limit in an endpoint's properties, if any.
pub fn rate_spec(properties: &Map<String, Value>) -> Result<Option<RateSpec>, FieldError> {
    let qps = properties
        .get("qps")
        .map(|v| positive_number("properties.qps", v))
        .transpose()?;
    let burst = properties
        .get("burst")
        .map(|v| {
            let n = positive_number("properties.burst", v)?;
            if n.fract() != 0.0 {
                return Err(err(
                    "properties.burst",
                    format!("{v} is not a whole number"),
                ));
            }
            Ok(n as u32)
        })
        .transpose()?;
    match (qps, burst) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(err("properties.burst", "needs properties.qps")),
        // Without a burst, a second's worth of requests may come at once (at least one).
        (Some(qps), burst) => Ok(Some(RateSpec {
            qps,
            burst: burst.unwrap_or_else(|| qps.ceil().max(1.0) as u32),
        })),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewEndpoint {
    #[serde(rename = "type")]
    kind: Value,
    name: String,
    #[serde(default)]
    project_id: Option<String>,
    #[serde(default)]
    is_shared: bool,
    #[serde(default)]
    properties: Map<String, Value>,
}

/// Validates a POSTed endpoint and makes the record (the caller checks the name is free).
pub fn new_endpoint(
    body: Map<String, Value>,
    id: String,
    now: &str,
) -> Result<RuleEndpoint, FieldError> {
    refuse_server_fields(&body, &["id", "created_at", "updated_at"])?;
    if !body.contains_key("type") {
        return Err(err("type", "is required: rest or service"));
    }
    let input: NewEndpoint = parse_body(body)?;
    let kind = match input.kind.as_str() {
        Some("rest") => EndpointType::Rest,
        Some("service") => EndpointType::Service,
        _ => {
            return Err(err(
                "type",
                format!("unsupported type {}: expected rest or service", input.kind),
            ))
        }
    };
    check_name("name", &input.name)?;
    let project_id = input.project_id.unwrap_or_else(|| "default".into());
    check_name("project_id", &project_id)?;
    let size = Value::Object(input.properties.clone()).to_string().len();
    if size > MAX_PROPERTIES_BYTES {
        return Err(err(
            "properties",
            format!("{size} bytes; at most {MAX_PROPERTIES_BYTES}"),
        ));
    }
    rate_spec(&input.properties)?;
    Ok(RuleEndpoint {
        id,
        kind,
        name: input.name,
        project_id,
        is_shared: input.is_shared,
        properties: input.properties,
        created_at: now.to_string(),
        updated_at: now.to_string(),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewRule {
    name: String,
    #[serde(default)]
    project_id: Option<String>,
    #[serde(default)]
    domain_id: Option<String>,
    source: String,
    source_resource: Map<String, Value>,
    target: String,
    target_resource: Map<String, Value>,
}

/// A POSTed rule, checked on its own; [`resolve_rule`] checks it against the endpoints.
pub struct RuleDraft {
    input: NewRule,
}

/// First pass over a POSTed rule: shape and names.
pub fn rule_draft(body: Map<String, Value>) -> Result<RuleDraft, FieldError> {
    refuse_server_fields(
        &body,
        &[
            "id",
            "in_use",
            "is_deleted",
            "created_at",
            "updated_at",
            "success_messages",
            "fail_messages",
            "errors",
        ],
    )?;
    for field in ["source", "target", "source_resource", "target_resource"] {
        if !body.contains_key(field) {
            return Err(err(field, "is required"));
        }
    }
    let input: NewRule = parse_body(body)?;
    check_name("name", &input.name)?;
    for (field, v) in [
        ("project_id", &input.project_id),
        ("domain_id", &input.domain_id),
    ] {
        if let Some(v) = v {
            check_name(field, v)?;
        }
    }
    check_name("source", &input.source)?;
    check_name("target", &input.target)?;
    Ok(RuleDraft { input })
}

impl RuleDraft {
    pub fn name(&self) -> &str {
        &self.input.name
    }
    pub fn source(&self) -> &str {
        &self.input.source
    }
    pub fn target(&self) -> &str {
        &self.input.target
    }

    /// Checks the resources against the endpoint types and makes the record and its route.
    pub fn finish(
        self,
        source: &RuleEndpoint,
        target: &RuleEndpoint,
        id: String,
        now: &str,
    ) -> Result<(Rule, Route), FieldError> {
        let input = self.input;
        let mut rule = Rule {
            id,
            name: input.name,
            project_id: input.project_id.unwrap_or_else(|| "default".into()),
            domain_id: input.domain_id.unwrap_or_else(|| "default".into()),
            source: input.source,
            source_resource: input.source_resource,
            target: input.target,
            target_resource: input.target_resource,
            in_use: true,
            is_deleted: false,
            created_at: now.to_string(),
            updated_at: now.to_string(),
            success_messages: 0,
            fail_messages: 0,
            errors: VecDeque::new(),
        };
        let route = route_of(source.kind, target.kind, &rule)?;
        normalise(&mut rule, &route);
        Ok((rule, route))
    }
}

/// Writes the canonical form of what was parsed back into the resources (so the stored rule
/// says exactly what the router does: a trimmed path, a numeric port).
fn normalise(rule: &mut Rule, route: &Route) {
    match route {
        Route::RestToService { path, port, .. } => {
            rule.source_resource
                .insert("path".into(), Value::String(path.clone()));
            rule.target_resource.insert("port".into(), (*port).into());
        }
        Route::ServiceToRest { port, .. } => {
            rule.source_resource.insert("port".into(), (*port).into());
        }
    }
}

/// Parses a rule's resources for the kinds of its endpoints (also used on stored rules).
pub fn route_of(
    source: EndpointType,
    target: EndpointType,
    rule: &Rule,
) -> Result<Route, FieldError> {
    match (source, target) {
        (EndpointType::Rest, EndpointType::Service) => {
            let src = Resource::new("source_resource", &rule.source_resource, &["path"])?;
            let dst = Resource::new(
                "target_resource",
                &rule.target_resource,
                &["namespace", "name", "port", "path"],
            )?;
            let path = src.path("path", true)?.unwrap_or_default();
            let namespace = dst.string("namespace")?;
            check_dns_label("target_resource.namespace", &namespace, false)?;
            let name = dst.string("name")?;
            check_dns_label("target_resource.name", &name, true)?;
            Ok(Route::RestToService {
                path: trim_trailing_slash(&path),
                namespace,
                name,
                port: dst.port("port")?,
                target_path: dst.path("path", false)?.unwrap_or_default(),
            })
        }
        (EndpointType::Service, EndpointType::Rest) => {
            let src = Resource::new(
                "source_resource",
                &rule.source_resource,
                &["namespace", "name", "port"],
            )?;
            let dst = Resource::new("target_resource", &rule.target_resource, &["url"])?;
            let namespace = src.string("namespace")?;
            check_dns_label("source_resource.namespace", &namespace, false)?;
            let name = src.string("name")?;
            check_dns_label("source_resource.name", &name, true)?;
            Ok(Route::ServiceToRest {
                namespace,
                name,
                port: src.port("port")?,
                url: parse_url("target_resource.url", &dst.string("url")?)?,
            })
        }
        (EndpointType::Rest, EndpointType::Rest) => Err(err(
            "target",
            format!(
                "{:?} is a rest endpoint; a rule from a rest endpoint must target a service endpoint",
                rule.target
            ),
        )),
        (EndpointType::Service, EndpointType::Service) => Err(err(
            "target",
            format!(
                "{:?} is a service endpoint; a rule from a service endpoint must target a rest endpoint",
                rule.target
            ),
        )),
    }
}

/// One of a rule's resource objects, with the keys it may have.
struct Resource<'a> {
    field: &'static str,
    map: &'a Map<String, Value>,
}

impl<'a> Resource<'a> {
    fn new(
        field: &'static str,
        map: &'a Map<String, Value>,
        allowed: &[&str],
    ) -> Result<Self, FieldError> {
        if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(err(
                format!("{field}.{k}"),
                format!("unknown field; expected {}", allowed.join(", ")),
            ));
        }
        Ok(Resource { field, map })
    }

    fn at(&self, key: &str) -> String {
        format!("{}.{key}", self.field)
    }

    fn string(&self, key: &str) -> Result<String, FieldError> {
        match self.map.get(key) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(Value::String(_)) | None => Err(err(self.at(key), "is required")),
            Some(other) => Err(err(self.at(key), format!("{other} is not a string"))),
        }
    }

    fn port(&self, key: &str) -> Result<u16, FieldError> {
        let v = self
            .map
            .get(key)
            .ok_or_else(|| err(self.at(key), "is required"))?;
        let n = match v {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse::<u64>().ok(),
            _ => None,
        };
        match n.and_then(|n| u16::try_from(n).ok()) {
            Some(p) if p > 0 => Ok(p),
            _ => Err(err(
                self.at(key),
                format!("{v} is not a port number 1-65535"),
            )),
        }
    }

    fn path(&self, key: &str, required: bool) -> Result<Option<String>, FieldError> {
        let field = self.at(key);
        match self.map.get(key) {
            None if required => Err(err(field, "is required")),
            None => Ok(None),
            Some(Value::String(p)) => {
                check_path(&field, p)?;
                Ok(Some(p.clone()))
            }
            Some(other) => Err(err(field, format!("{other} is not a string"))),
        }
    }
}

/// An absolute URL path without query, fragment, dot segments or characters that would need
/// encoding.
fn check_path(field: &str, p: &str) -> Result<(), FieldError> {
    if !p.starts_with('/') {
        return Err(err(field, format!("{p:?} must start with '/'")));
    }
    if p.len() > MAX_PATH_LEN {
        return Err(err(field, format!("at most {MAX_PATH_LEN} characters")));
    }
    if let Some(c) = p
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, '?' | '#'))
    {
        return Err(err(
            field,
            format!("{p:?} contains {c:?}: a path without query, fragment, spaces or non-ASCII characters"),
        ));
    }
    if has_dot_segment(p) {
        return Err(err(field, format!("{p:?} contains a '.' or '..' segment")));
    }
    Ok(())
}

/// Whether a path has a `.` or `..` segment, also percent-encoded (`%2e`): such a path can
/// mean a different place to the server behind the router than to the router.
pub fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|seg| {
        let decoded = seg.to_ascii_lowercase().replace("%2e", ".");
        decoded == "." || decoded == ".."
    })
}

fn trim_trailing_slash(p: &str) -> String {
    let t = p.trim_end_matches('/');
    if t.is_empty() {
        "/".into()
    } else {
        t.into()
    }
}

/// `http://host[:port][/path]`. `https://` is refused: the router has no TLS client for its
/// targets (a cloud REST service reached over the cloud's own network).
pub fn parse_url(field: &str, raw: &str) -> Result<TargetUrl, FieldError> {
    if raw.len() > MAX_PATH_LEN {
        return Err(err(field, format!("at most {MAX_PATH_LEN} characters")));
    }
    let uri: Uri = raw
        .parse()
        .map_err(|e| err(field, format!("invalid URL {raw:?}: {e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(err(
                field,
                "https:// targets are not supported (the router has no TLS client for them); use http://",
            ))
        }
        _ => {
            return Err(err(
                field,
                format!("{raw:?} is not an http:// URL"),
            ))
        }
    }
    let authority = uri
        .authority()
        .ok_or_else(|| err(field, format!("{raw:?} has no host")))?;
    if authority.as_str().contains('@') {
        return Err(err(field, "credentials in the URL are not supported"));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        return Err(err(field, format!("{raw:?} has no host")));
    }
    if uri.query().is_some() || raw.contains('#') {
        return Err(err(
            field,
            "must not have a query or fragment (the caller's query is passed on)",
        ));
    }
    let path = uri.path();
    if path != "/" || raw.ends_with('/') {
        check_path(field, path)?;
    }
    Ok(TargetUrl {
        authority: authority.as_str().to_string(),
        host: host.to_string(),
        port: authority.port_u16().unwrap_or(80),
        path: if path == "/" {
            String::new()
        } else {
            path.to_string()
        },
    })
}

/// Seconds since the Unix epoch as RFC 3339 in UTC (`2024-05-01T12:00:00Z`).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Now, as RFC 3339.
pub fn now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    rfc3339(secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn endpoint(kind: &str, name: &str) -> RuleEndpoint {
        new_endpoint(
            obj(json!({"type": kind, "name": name})),
            format!("id-{name}"),
            "t",
        )
        .expect("valid endpoint")
    }

    #[test]
    fn endpoint_errors_name_the_field() {
        let e = new_endpoint(
            obj(json!({"type": "rest", "name": "r", "properties": {"qps": 5, "burst": 10, "x": "y"}})),
            "id".into(),
            "t",
        )
        .expect("valid");
        assert_eq!(e.kind, EndpointType::Rest);
        assert_eq!(e.project_id, "default");
        assert_eq!(
            rate_spec(&e.properties).expect("rate"),
            Some(RateSpec {
                qps: 5.0,
                burst: 10
            })
        );
        for (body, field) in [
            (json!({"name": "r"}), "type"),
            (json!({"type": "eventbus", "name": "r"}), "type"),
            (json!({"type": 1, "name": "r"}), "type"),
            (json!({"type": "rest"}), "name"),
            (json!({"type": "rest", "name": ""}), "name"),
            (json!({"type": "rest", "name": "a b"}), "name"),
            (json!({"type": "rest", "name": "r", "bogus": 1}), "bogus"),
            (json!({"type": "rest", "name": "r", "id": "x"}), "id"),
            (
                json!({"type": "rest", "name": "r", "created_at": "x"}),
                "created_at",
            ),
            (
                json!({"type": "rest", "name": "r", "is_shared": "yes"}),
                "is_shared",
            ),
            (
                json!({"type": "rest", "name": "r", "project_id": "a/b"}),
                "project_id",
            ),
            (
                json!({"type": "rest", "name": "r", "properties": []}),
                "properties",
            ),
            (
                json!({"type": "rest", "name": "r", "properties": {"qps": 0}}),
                "properties.qps",
            ),
            (
                json!({"type": "rest", "name": "r", "properties": {"qps": "x"}}),
                "properties.qps",
            ),
            (
                json!({"type": "rest", "name": "r", "properties": {"burst": 3}}),
                "properties.burst",
            ),
            (
                json!({"type": "rest", "name": "r", "properties": {"qps": 1, "burst": 1.5}}),
                "properties.burst",
            ),
            (
                json!({"type": "rest", "name": "r", "properties": {"big": "x".repeat(20_000)}}),
                "properties",
            ),
        ] {
            let e = new_endpoint(obj(body.clone()), "id".into(), "t").expect_err("invalid");
            assert_eq!(e.field, field, "{body}: {e}");
            assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn qps_defaults_and_strings() {
        let spec = |p: Value| rate_spec(&obj(p)).expect("valid");
        assert_eq!(spec(json!({})), None);
        assert_eq!(
            spec(json!({"qps": "2.5"})),
            Some(RateSpec { qps: 2.5, burst: 3 })
        );
        assert_eq!(
            spec(json!({"qps": 0.5})),
            Some(RateSpec { qps: 0.5, burst: 1 })
        );
    }

    /// `base` with the field at `pointer` set (added when missing).
    fn with_field(base: &Value, pointer: &str, v: Value) -> Value {
        let mut b = base.clone();
        let (parent, key) = pointer.rsplit_once('/').expect("pointer");
        b.pointer_mut(parent)
            .and_then(Value::as_object_mut)
            .expect("parent")
            .insert(key.to_string(), v);
        b
    }

    fn rule(
        body: Value,
        source: &RuleEndpoint,
        target: &RuleEndpoint,
    ) -> Result<(Rule, Route), FieldError> {
        rule_draft(obj(body))?.finish(source, target, "rid".into(), "t")
    }

    #[test]
    fn rest_to_service_rules() {
        let (rest, svc) = (endpoint("rest", "r"), endpoint("service", "s"));
        let (stored, route) = rule(
            json!({"name": "n", "source": "r", "source_resource": {"path": "/abc/"},
                   "target": "s", "target_resource": {"namespace": "default", "name": "hello", "port": "80", "path": "/v1"}}),
            &rest,
            &svc,
        )
        .expect("valid");
        assert_eq!(
            route,
            Route::RestToService {
                path: "/abc".into(),
                namespace: "default".into(),
                name: "hello".into(),
                port: 80,
                target_path: "/v1".into()
            }
        );
        assert_eq!(stored.source_resource["path"], "/abc");
        assert_eq!(stored.target_resource["port"], 80);
        assert_eq!(
            route_of(EndpointType::Rest, EndpointType::Service, &stored).expect("again"),
            route
        );

        let base = json!({"name": "n", "source": "r", "source_resource": {"path": "/abc"},
                          "target": "s", "target_resource": {"namespace": "default", "name": "hello", "port": 80}});
        let with = |pointer: &str, v: Value| with_field(&base, pointer, v);
        for (body, field) in [
            (
                with("/source_resource/path", json!("abc")),
                "source_resource.path",
            ),
            (
                with("/source_resource/path", json!("/a?b")),
                "source_resource.path",
            ),
            (
                with("/source_resource/path", json!("/a/../b")),
                "source_resource.path",
            ),
            (
                with("/source_resource/path", json!("/a/%2E%2e")),
                "source_resource.path",
            ),
            (
                with("/source_resource/path", json!(7)),
                "source_resource.path",
            ),
            (with("/source_resource", json!({})), "source_resource.path"),
            (
                with("/source_resource", json!({"path": "/a", "topic": "t"})),
                "source_resource.topic",
            ),
            (with("/source_resource", json!("/abc")), "source_resource"),
            (
                with("/target_resource/port", json!(0)),
                "target_resource.port",
            ),
            (
                with("/target_resource/port", json!(70000)),
                "target_resource.port",
            ),
            (
                with("/target_resource/port", json!("http")),
                "target_resource.port",
            ),
            (
                with("/target_resource/name", json!("Hello")),
                "target_resource.name",
            ),
            (
                with("/target_resource/name", json!("1hello")),
                "target_resource.name",
            ),
            (
                with("/target_resource/namespace", json!("")),
                "target_resource.namespace",
            ),
            (
                with("/target_resource/url", json!("http://x")),
                "target_resource.url",
            ),
            (with("/name", json!("")), "name"),
            (with("/domain_id", json!("a b")), "domain_id"),
            (with("/id", json!("x")), "id"),
            (with("/success_messages", json!(3)), "success_messages"),
            (with("/extra", json!(3)), "extra"),
        ] {
            let e = rule(body.clone(), &rest, &svc).expect_err("invalid");
            assert_eq!(e.field, field, "{body}: {e}");
        }
        let mut missing = base.clone();
        missing.as_object_mut().expect("object").remove("target");
        assert_eq!(
            rule_draft(obj(missing)).err().expect("invalid").field,
            "target"
        );
        // A rest source needs a service target, and the other way round.
        assert_eq!(
            rule(base.clone(), &rest, &rest)
                .expect_err("rest->rest")
                .field,
            "target"
        );
        assert_eq!(
            rule(base, &svc, &svc).expect_err("svc->svc").field,
            "target"
        );
    }

    #[test]
    fn service_to_rest_rules() {
        let (rest, svc) = (endpoint("rest", "r"), endpoint("service", "s"));
        let (_, route) = rule(
            json!({"name": "n", "source": "s", "source_resource": {"namespace": "default", "name": "cloud-api", "port": 8080},
                   "target": "r", "target_resource": {"url": "http://api.example:9000/base"}}),
            &svc,
            &rest,
        )
        .expect("valid");
        assert_eq!(
            route,
            Route::ServiceToRest {
                namespace: "default".into(),
                name: "cloud-api".into(),
                port: 8080,
                url: TargetUrl {
                    authority: "api.example:9000".into(),
                    host: "api.example".into(),
                    port: 9000,
                    path: "/base".into()
                }
            }
        );
        let base = json!({"name": "n", "source": "s", "source_resource": {"namespace": "default", "name": "cloud-api", "port": 8080},
                          "target": "r", "target_resource": {"url": "http://127.0.0.1:9000"}});
        let with = |pointer: &str, v: Value| with_field(&base, pointer, v);
        for (body, field) in [
            (
                with("/target_resource/url", json!("https://x")),
                "target_resource.url",
            ),
            (
                with("/target_resource/url", json!("ftp://x")),
                "target_resource.url",
            ),
            (
                with("/target_resource/url", json!("x/y")),
                "target_resource.url",
            ),
            (
                with("/target_resource/url", json!("http://u:p@x/")),
                "target_resource.url",
            ),
            (
                with("/target_resource/url", json!("http://x/?q=1")),
                "target_resource.url",
            ),
            (
                with("/target_resource/url", json!("http://x/a/../b")),
                "target_resource.url",
            ),
            (
                with("/target_resource/url", json!("")),
                "target_resource.url",
            ),
            (
                with("/target_resource", json!({"resource": "http://x"})),
                "target_resource.resource",
            ),
            (
                with("/source_resource/port", json!(-1)),
                "source_resource.port",
            ),
            (
                with("/source_resource/name", json!("a_b")),
                "source_resource.name",
            ),
            (
                with("/source_resource/namespace", json!(null)),
                "source_resource.namespace",
            ),
        ] {
            let e = rule(body.clone(), &svc, &rest).expect_err("invalid");
            assert_eq!(e.field, field, "{body}: {e}");
        }
        let url = parse_url("u", "http://[::1]:8080/").expect("ipv6");
        assert_eq!(
            (url.host.as_str(), url.port, url.path.as_str()),
            ("::1", 8080, "")
        );
        assert_eq!(parse_url("u", "http://h").expect("no port").port, 80);
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_714_564_800 + 3661), "2024-05-01T13:01:01Z");
    }
}
