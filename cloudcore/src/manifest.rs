//! Reading manifests for `cloudcore apply`: files, directories or stdin; YAML (`---`
//! separated) or JSON (an object or a list); `kind: List` (and the typed lists `get` prints)
//! unwrapped. Every document is parsed
//! and checked here, before anything is sent, and an error names the file, the document and
//! the field.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use std::net::Ipv4Addr;

use edgehub::model::{
    validate_community, validate_endpoints, validate_node, validate_service, FieldError, Kind,
    Object,
};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::router::model::{self, RuleEndpoint};

/// Where a document is: file (or `-`; empty for the body of a REST request), its number in the
/// file (from 1, empty YAML documents not counted, each element of a top-level JSON array one
/// document) and, inside a `List`, the item's number (from 1). `cloudcore apply` and
/// `POST /api/v1/apply` number the same text the same way: both read it with
/// [`for_each_document`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: String,
    pub document: usize,
    pub item: Option<usize>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.file.is_empty() {
            write!(f, "{}: ", self.file)?;
        }
        write!(f, "document {}", self.document)?;
        if let Some(i) = self.item {
            write!(f, " item {i}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: cannot read it: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{origin}: invalid {format}: {message}")]
    Syntax {
        origin: Origin,
        format: &'static str,
        message: String,
    },
    /// A field of a readable document is wrong.
    #[error("{origin} ({label}): field {field}: {message}")]
    Field {
        origin: Origin,
        label: String,
        field: String,
        message: String,
    },
    #[error("{origin} ({label}): {message}")]
    Document {
        origin: Origin,
        label: String,
        message: String,
    },
    #[error("no manifests in {0} (looked for *.yaml, *.yml and *.json files)")]
    Empty(String),
}

impl ManifestError {
    pub fn field(origin: &Origin, label: &str, err: FieldError) -> ManifestError {
        if err.field.is_empty() {
            ManifestError::Document {
                origin: origin.clone(),
                label: label.to_string(),
                message: err.message,
            }
        } else {
            ManifestError::Field {
                origin: origin.clone(),
                label: label.to_string(),
                field: err.field,
                message: err.message,
            }
        }
    }
}

/// One document, checked.
#[derive(Clone, Debug)]
pub enum Doc {
    /// A Service, Endpoints or Node, as it will be sent (namespace defaulted).
    Object { kind: Kind, value: Value },
    /// A router rule endpoint: the body to POST and the record it makes.
    RuleEndpoint {
        body: Map<String, Value>,
        record: RuleEndpoint,
    },
    /// A router rule: the body to POST (checked against its endpoints when applying).
    Rule {
        name: String,
        body: Map<String, Value>,
    },
    /// A kind cloudcore does not serve (a Deployment, a ServiceAccount, ...): listed, not sent.
    Skipped(Skipped),
}

/// A document that was not applied, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    /// kubectl's name for it: `deployment.apps/details-v1`.
    pub resource: String,
    pub reason: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} skipped: {}", self.resource, self.reason)
    }
}

/// What cloudcore does with a document of some `apiVersion` and `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// Stored and synced to the nodes (`POST /api/v1/apply`).
    Object(Kind),
    /// Router records (`/api/v1/router/...`; `cloudcore apply` sends them there).
    RuleEndpoint,
    Rule,
    No,
}

pub const NOT_SERVED: &str = "not served by cloudcore";

/// Core kinds are `v1` (or have no `apiVersion`, as the API's own answers may); router
/// records have no `apiVersion` or an `edgemesh.io` one. The group matters: a Knative
/// `serving.knative.dev/v1` Service is not a Service.
pub fn served(api_version: Option<&str>, kind: &str) -> Served {
    let core = matches!(api_version, None | Some("v1"));
    let edgemesh = api_version.is_none_or(|v| v.starts_with("edgemesh.io/"));
    match kind {
        "Service" if core => Served::Object(Kind::Service),
        "Endpoints" if core => Served::Object(Kind::Endpoints),
        "Node" if core => Served::Object(Kind::Node),
        "Community" if edgemesh => Served::Object(Kind::Community),
        "RuleEndpoint" if edgemesh => Served::RuleEndpoint,
        "Rule" if edgemesh => Served::Rule,
        _ => Served::No,
    }
}

/// kubectl's name of a resource: the kind in lower case, `.group` unless it is core, the name:
/// `deployment.apps/details-v1`, `serviceaccount/bookinfo-details`.
pub fn resource_name(api_version: Option<&str>, kind: &str, name: &str) -> String {
    let group = api_version
        .and_then(|v| v.rsplit_once('/'))
        .map(|(group, _)| format!(".{group}"))
        .unwrap_or_default();
    format!(
        "{}{group}/{}",
        kind.to_ascii_lowercase(),
        edgehub::untrusted::clip(name, edgehub::untrusted::MAX_WORD)
    )
}

/// `apiVersion`, `kind` and `metadata.name` of a document, as far as they are strings.
pub fn identity(v: &Value) -> (Option<&str>, Option<&str>, &str) {
    let name = v
        .get("metadata")
        .and_then(|m| m.get("name"))
        .or_else(|| v.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("?");
    (
        v.get("apiVersion").and_then(Value::as_str),
        v.get("kind").and_then(Value::as_str),
        name,
    )
}

#[derive(Clone, Debug)]
pub struct Manifest {
    pub origin: Origin,
    /// `Kind name` or `Kind namespace/name`, for messages.
    pub label: String,
    pub doc: Doc,
}

/// Files named by `-f` (a file, `-` for stdin, or a directory: its `*.yaml`, `*.yml` and
/// `*.json` files in name order; other files and, unless `recursive`, subdirectories are
/// skipped, so a directory may hold other things too).
pub fn load(paths: &[String], recursive: bool) -> Result<Vec<Manifest>, ManifestError> {
    let mut out = Vec::new();
    for p in paths {
        if p == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|source| ManifestError::Read {
                    path: "-".into(),
                    source,
                })?;
            out.extend(parse_text("-", &text, None)?);
            continue;
        }
        let path = Path::new(p);
        if path.is_dir() {
            let mut files = Vec::new();
            collect_dir(path, recursive, &mut files)?;
            if files.is_empty() {
                return Err(ManifestError::Empty(p.clone()));
            }
            for f in files {
                out.extend(parse_file(&f)?);
            }
        } else {
            out.extend(parse_file(path)?);
        }
    }
    Ok(out)
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> ManifestError + '_ {
    move |source| ManifestError::Read {
        path: path.display().to_string(),
        source,
    }
}

fn collect_dir(dir: &Path, recursive: bool, out: &mut Vec<PathBuf>) -> Result<(), ManifestError> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err(dir))? {
        entries.push(entry.map_err(read_err(dir))?.path());
    }
    entries.sort();
    for p in entries {
        if p.is_dir() {
            if recursive {
                collect_dir(&p, recursive, out)?;
            }
        } else if format_of(&p).is_some() {
            out.push(p);
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

fn format_of(path: &Path) -> Option<Format> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("yaml" | "yml") => Some(Format::Yaml),
        Some("json") => Some(Format::Json),
        _ => None,
    }
}

fn parse_file(path: &Path) -> Result<Vec<Manifest>, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(read_err(path))?;
    parse_text(&path.display().to_string(), &text, format_of(path))
}

/// Parses one file's text; without a known format, text starting with `{` or `[` is JSON.
pub fn parse_text(
    file: &str,
    text: &str,
    format: Option<Format>,
) -> Result<Vec<Manifest>, ManifestError> {
    let mut out = Vec::new();
    for_each_document(file, text, format, |origin, v| {
        out.push(check(origin, v)?);
        Ok::<_, ManifestError>(())
    })?;
    Ok(out)
}

/// Reads `text` document by document (one parsed at a time, so a large request never holds
/// them all as JSON trees) and calls `f` with each and where it is. A top-level JSON array
/// holds one document per element; a `List` (or a typed list as `get` prints it) holds its
/// items, each numbered. Without a known format, text starting with `{` or `[` is JSON.
pub fn for_each_document<E: From<ManifestError>>(
    file: &str,
    text: &str,
    format: Option<Format>,
    mut f: impl FnMut(Origin, Value) -> Result<(), E>,
) -> Result<(), E> {
    let format = format.unwrap_or_else(|| {
        let t = text.trim_start();
        if t.starts_with('{') || t.starts_with('[') {
            Format::Json
        } else {
            Format::Yaml
        }
    });
    let origin = |document: usize| Origin {
        file: file.to_string(),
        document,
        item: None,
    };
    let syntax =
        |document: usize, format: &'static str, e: &dyn fmt::Display| ManifestError::Syntax {
            origin: origin(document),
            format,
            message: edgehub::untrusted::message(&e.to_string()).into_owned(),
        };
    let mut emit = |origin: Origin, v: Value| -> Result<(), E> {
        let list_kind = v
            .get("kind")
            .and_then(Value::as_str)
            .and_then(|k| k.strip_suffix("List"))
            .map(String::from);
        let Some(item_kind) = list_kind else {
            return f(origin, v);
        };
        let Some(Value::Array(items)) = v.get("items") else {
            return Err(ManifestError::field(
                &origin,
                "List",
                FieldError::new("items", "a List needs a list of items"),
            )
            .into());
        };
        for (j, item) in items.iter().enumerate() {
            let origin = Origin {
                item: Some(j + 1),
                ..origin.clone()
            };
            f(origin, list_item(&item_kind, item.clone()))?;
        }
        Ok(())
    };
    match format {
        Format::Json => {
            let top: &RawValue = serde_json::from_str(text).map_err(|e| syntax(1, "JSON", &e))?;
            if top.get().trim_start().starts_with('[') {
                let docs: Vec<&RawValue> =
                    serde_json::from_str(top.get()).map_err(|e| syntax(1, "JSON", &e))?;
                for (i, raw) in docs.into_iter().enumerate() {
                    let v: Value =
                        serde_json::from_str(raw.get()).map_err(|e| syntax(i + 1, "JSON", &e))?;
                    emit(origin(i + 1), v)?;
                }
            } else {
                let v: Value =
                    serde_json::from_str(top.get()).map_err(|e| syntax(1, "JSON", &e))?;
                emit(origin(1), v)?;
            }
        }
        Format::Yaml => {
            let mut n = 0;
            for doc in serde_yaml_ng::Deserializer::from_str(text) {
                let v = Value::deserialize(doc).map_err(|e| syntax(n + 1, "YAML", &e))?;
                // Empty documents (a leading `---`, comments only) are not counted.
                if !v.is_null() {
                    n += 1;
                    emit(origin(n), v)?;
                }
            }
        }
    }
    Ok(())
}

/// Fields of router records that cloudcore sets; `get -o yaml` prints them.
const ROUTER_SERVER_FIELDS: [&str; 8] = [
    "id",
    "created_at",
    "updated_at",
    "in_use",
    "is_deleted",
    "success_messages",
    "fail_messages",
    "errors",
];

/// An item of `kind: List` or of a typed list as `get -o json|yaml` prints it (`ServiceList`,
/// `RuleList`, ...): the item's kind defaults to the list's, and router records lose the
/// fields cloudcore sets, so what `get` printed can be applied again.
fn list_item(item_kind: &str, mut item: Value) -> Value {
    if let Value::Object(o) = &mut item {
        if !item_kind.is_empty() && !o.contains_key("kind") {
            o.insert("kind".into(), Value::String(item_kind.to_string()));
            if matches!(item_kind, "Rule" | "RuleEndpoint") {
                for f in ROUTER_SERVER_FIELDS {
                    o.remove(f);
                }
            }
        }
    }
    item
}

/// `Kind name` of a document, as far as it can be read.
fn label_of(v: &Value) -> String {
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or("?");
    let meta = v.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .or_else(|| v.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("?");
    let label = match meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
    {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    };
    edgehub::untrusted::message(&label).into_owned()
}

/// Parses and checks one document.
fn check(origin: Origin, mut v: Value) -> Result<Manifest, ManifestError> {
    let mut label = label_of(&v);
    let invalid = |label: &str, err: FieldError| ManifestError::field(&origin, label, err);
    let Some(obj) = v.as_object_mut() else {
        return Err(invalid(
            &label,
            FieldError::new("", "a document must be a mapping (a JSON object)"),
        ));
    };
    let kind = match obj.get("kind") {
        Some(Value::String(k)) => k.clone(),
        Some(_) => return Err(invalid(&label, FieldError::new("kind", "must be a string"))),
        None => return Err(invalid(&label, FieldError::new("kind", "is required"))),
    };
    let api_version = obj
        .get("apiVersion")
        .and_then(Value::as_str)
        .map(String::from);
    let doc = match served(api_version.as_deref(), &kind) {
        Served::Object(Kind::Service | Kind::Endpoints) => {
            // As the API does: a namespaced object without a namespace goes to `default`.
            if let Some(Value::Object(meta)) = obj.get_mut("metadata") {
                if !meta.contains_key("namespace") {
                    meta.insert("namespace".into(), Value::String("default".into()));
                }
            }
            label = label_of(&v);
            let object = Object::from_value(v.clone()).map_err(|e| invalid(&label, e))?;
            validate_object(&object).map_err(|e| invalid(&label, e))?;
            Doc::Object {
                kind: object.key().kind,
                value: v,
            }
        }
        Served::Object(Kind::Node | Kind::Community) => {
            let object = Object::from_value(v.clone()).map_err(|e| invalid(&label, e))?;
            validate_object(&object).map_err(|e| invalid(&label, e))?;
            Doc::Object {
                kind: object.key().kind,
                value: v,
            }
        }
        Served::RuleEndpoint => {
            let (body, from_meta) = router_body(obj).map_err(|e| invalid(&label, e))?;
            let record = model::new_endpoint(body.clone(), String::new(), &model::now())
                .map_err(|e| invalid(&label, meta_field(e, from_meta)))?;
            Doc::RuleEndpoint { body, record }
        }
        Served::Rule => {
            let (body, from_meta) = router_body(obj).map_err(|e| invalid(&label, e))?;
            let draft = model::rule_draft(body.clone())
                .map_err(|e| invalid(&label, meta_field(e, from_meta)))?;
            Doc::Rule {
                name: draft.name().to_string(),
                body,
            }
        }
        Served::No => {
            let (_, _, name) = identity(&v);
            Doc::Skipped(Skipped {
                resource: resource_name(api_version.as_deref(), &kind, name),
                reason: NOT_SERVED.into(),
            })
        }
    };
    Ok(Manifest { origin, label, doc })
}

/// The server's checks that do not depend on its `service_cidr` (which the client does not
/// know): the server checks cluster IPs and that endpoint addresses lie outside the CIDR.
fn validate_object(object: &Object) -> Result<(), FieldError> {
    // A CIDR no valid pod address lies in, so the local check never refuses an address for
    // being inside it.
    let no_cidr = ipnet::IpNet::V4(ipnet::Ipv4Net::from(Ipv4Addr::BROADCAST));
    match object {
        Object::Service(svc) => {
            let mut svc = svc.clone();
            if svc.spec.cluster_ip != "None" {
                svc.spec.cluster_ip.clear();
            }
            svc.spec.cluster_ips = None;
            validate_service(&svc, &no_cidr)
        }
        Object::Endpoints(ep) => validate_endpoints(ep, &no_cidr),
        Object::Node(node) => validate_node(node),
        Object::Community(c) => validate_community(c),
    }
}

/// A router document as the router's REST body: its KubeEdge fields at the top level; `kind`
/// and `apiVersion` dropped; `metadata.name` accepted for `name`, as in other manifests.
/// Returns whether the name came from `metadata.name`.
fn router_body(obj: &Map<String, Value>) -> Result<(Map<String, Value>, bool), FieldError> {
    let mut body = obj.clone();
    body.remove("kind");
    body.remove("apiVersion");
    let Some(meta) = body.remove("metadata") else {
        return Ok((body, false));
    };
    let Value::Object(meta) = meta else {
        return Err(FieldError::new("metadata", "must be a mapping"));
    };
    if let Some(key) = meta.keys().find(|k| *k != "name") {
        return Err(FieldError::new(
            format!("metadata.{key}"),
            "router records have only metadata.name; leave it out",
        ));
    }
    let Some(name) = meta.get("name") else {
        return Ok((body, false));
    };
    match body.get("name") {
        Some(n) if n != name => Err(FieldError::new(
            "metadata.name",
            format!("{name} differs from name {n}; give one of them"),
        )),
        Some(_) => Ok((body, false)),
        None => {
            body.insert("name".into(), name.clone());
            Ok((body, true))
        }
    }
}

/// Names the field as the document spells it.
fn meta_field(mut err: FieldError, name_from_meta: bool) -> FieldError {
    if name_from_meta && err.field == "name" {
        err.field = "metadata.name".into();
    }
    err
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_of(text: &str) -> String {
        parse_text("m.yaml", text, None)
            .expect_err("should fail")
            .to_string()
    }

    #[test]
    fn yaml_json_and_lists() {
        let yaml = "# comment\n---\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n---\nkind: List\nitems:\n- kind: Node\n  metadata: {name: n}\n- kind: RuleEndpoint\n  name: r\n  type: rest\n---\nkind: Rule\nmetadata: {name: x}\nsource: r\nsource_resource: {path: /x}\ntarget: m\ntarget_resource: {namespace: default, name: a, port: 80}\n";
        let docs = parse_text("m.yaml", yaml, None).expect("parses");
        let labels: Vec<&str> = docs.iter().map(|d| d.label.as_str()).collect();
        assert_eq!(
            labels,
            ["Service default/a", "Node n", "RuleEndpoint r", "Rule x"]
        );
        assert_eq!(docs[2].origin.to_string(), "m.yaml: document 2 item 2");
        let json = r#"[{"kind":"Node","metadata":{"name":"n"}},{"kind":"RuleEndpoint","name":"s","type":"service"}]"#;
        assert_eq!(parse_text("-", json, None).expect("json").len(), 2);
    }

    #[test]
    fn kinds_cloudcore_does_not_serve_are_set_aside_by_name() {
        let yaml = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: bookinfo-details}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: details-v1, namespace: default}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: details}\nspec: {ports: [{port: 9080}]}\n---\nkind: List\nitems:\n- {apiVersion: networking.istio.io/v1, kind: VirtualService, metadata: {name: vs}}\n";
        let docs = parse_text("bookinfo.yaml", yaml, None).expect("parses");
        let skipped: Vec<String> = docs
            .iter()
            .filter_map(|m| match &m.doc {
                Doc::Skipped(s) => Some(format!("{}: {s}", m.origin)),
                _ => None,
            })
            .collect();
        assert_eq!(
            skipped,
            [
                "bookinfo.yaml: document 1: serviceaccount/bookinfo-details skipped: not served by cloudcore",
                "bookinfo.yaml: document 2: deployment.apps/details-v1 skipped: not served by cloudcore",
                "bookinfo.yaml: document 4 item 1: virtualservice.networking.istio.io/vs skipped: not served by cloudcore",
            ]
        );
        assert!(matches!(
            docs[2].doc,
            Doc::Object {
                kind: Kind::Service,
                ..
            }
        ));
        assert_eq!(
            served(Some("serving.knative.dev/v1"), "Service"),
            Served::No
        );
        assert_eq!(served(None, "Rule"), Served::Rule);
    }

    #[test]
    fn typed_lists_from_get_apply_again() {
        let json = r#"{"apiVersion": "v1", "kind": "RuleList", "items": [{"id": "x1",
            "name": "r", "project_id": "default", "domain_id": "default", "source": "a",
            "source_resource": {"path": "/a"}, "target": "b",
            "target_resource": {"namespace": "default", "name": "s", "port": 80},
            "in_use": true, "is_deleted": false, "created_at": "t", "updated_at": "t",
            "success_messages": 3, "fail_messages": 0, "errors": []}]}"#;
        let docs = parse_text("-", json, None).expect("a RuleList applies");
        assert_eq!(docs[0].label, "Rule r");
        assert_eq!(docs[0].origin.to_string(), "-: document 1 item 1");
    }

    #[test]
    fn errors_name_file_document_and_field() {
        let bad_port = "kind: Node\nmetadata: {name: n}\n---\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{name: a, port: 80}, {name: b, port: 99999}]}\n";
        let e = err_of(bad_port);
        assert!(
            e.starts_with("m.yaml: document 2 (Service default/web): field spec.ports[1].port:"),
            "{e}"
        );
        let e =
            err_of("kind: RuleEndpoint\nmetadata: {name: r}\ntype: rest\nproperties: {qps: -1}\n");
        assert!(
            e.starts_with("m.yaml: document 1 (RuleEndpoint r): field properties.qps:"),
            "{e}"
        );
        let e = err_of("kind: Rule\nmetadata: {name: 'bad name'}\nsource: a\nsource_resource: {}\ntarget: b\ntarget_resource: {}\n");
        assert!(e.contains("field metadata.name"), "{e}");
        let e = err_of("kind: 7\nmetadata: {name: p}\n");
        assert!(e.contains("field kind"), "{e}");
        let e = err_of("kind: Node\nmetadata: {name: n}\n---\nkind: [\n");
        assert!(e.starts_with("m.yaml: document 2: invalid YAML"), "{e}");
    }
}
