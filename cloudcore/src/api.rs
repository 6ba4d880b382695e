//! The REST API (SPEC §2): Services, Endpoints, Nodes and node tokens, Communities, `apply`,
//! health and metrics. Errors are `{"error": "...", "field": "..."}` with a 4xx status, and nothing is
//! stored unless the whole request is valid.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use edgehub::model::{FieldError, Kind, Object, ObjectKey};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::auth::{constant_time_eq, NodeTokens};
use crate::nodes::NodeRegistry;
use crate::objects::{ApplyError, Objects};
use crate::store::{Record, StoreError};

#[derive(Clone)]
pub struct ApiState {
    pub objects: Arc<Objects>,
    pub tokens: Arc<NodeTokens>,
    pub nodes: Arc<NodeRegistry>,
    pub api_token: Arc<str>,
    pub metrics: Option<PrometheusHandle>,
    pub ready: Arc<AtomicBool>,
    pub router: Arc<crate::router::Router>,
}

/// An API error: status, message and (for bad input) the field it is about.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: String,
    field: Option<String>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        ApiError {
            status,
            error: error.into(),
            field: None,
        }
    }

    pub fn field(status: StatusCode, err: FieldError) -> Self {
        ApiError {
            status,
            error: err.message,
            field: Some(err.field).filter(|f| !f.is_empty()),
        }
    }

    fn not_found(key: &ObjectKey) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("{} {} not found", key.kind, display_name(key)),
        )
    }
}

fn display_name(key: &ObjectKey) -> String {
    if key.namespace.is_empty() {
        key.name.clone()
    } else {
        format!("{}/{}", key.namespace, key.name)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{} (field {field})", self.error),
            None => f.write_str(&self.error),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: &self.error,
            field: self.field.as_deref(),
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<ApplyError> for ApiError {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::Invalid { index, object, err } => {
                let mut api = ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, err);
                if let Some(i) = index {
                    api.error = format!("document {i} ({object}): {}", api.error);
                }
                api
            }
            ApplyError::Conflict { field, message } => ApiError {
                status: StatusCode::CONFLICT,
                error: message,
                field: Some(field),
            },
            e @ ApplyError::TooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
            }
            ApplyError::Store(e) => e.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(key) => ApiError::not_found(&key),
            StoreError::Conflict { .. } => ApiError {
                status: StatusCode::CONFLICT,
                error: e.to_string(),
                field: Some("metadata.resourceVersion".into()),
            },
            other => {
                tracing::error!(error = %other, "store failure");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "store failure; see cloudcore's log",
                )
            }
        }
    }
}

/// Runs store work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal task failed: {e}"),
        )
    })?
}

fn raw_json(json: &str, status: StatusCode) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        json.to_string(),
    )
        .into_response()
}

pub fn router(state: ApiState, max_body: usize) -> Router {
    let api = Router::new()
        .route("/api/v1/services", get(list_services))
        .route("/api/v1/endpoints", get(list_endpoints))
        .route("/api/v1/namespaces/{ns}/services", get(list_services_ns))
        .route("/api/v1/namespaces/{ns}/endpoints", get(list_endpoints_ns))
        .route(
            "/api/v1/namespaces/{ns}/services/{name}",
            put(put_service).get(get_service).delete(delete_service),
        )
        .route(
            "/api/v1/namespaces/{ns}/endpoints/{name}",
            put(put_endpoints)
                .get(get_endpoints)
                .delete(delete_endpoints),
        )
        .route("/api/v1/communities", get(list_communities))
        .route(
            "/api/v1/communities/{name}",
            put(put_community)
                .get(get_community)
                .delete(delete_community),
        )
        .route("/api/v1/nodes", get(list_nodes))
        .route("/api/v1/nodes/{name}", get(get_node).delete(delete_node))
        .route(
            "/api/v1/nodes/{name}/token",
            post(create_token).delete(revoke_token),
        )
        .route("/api/v1/apply", post(apply))
        .merge(crate::router::api::routes())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such API path") })
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .merge(api)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn(observe))
        .with_state(state)
}

/// Counts requests by route and status, with latency.
async fn observe(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!("cloudcore_api_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("cloudcore_api_request_duration_seconds", "method" => method, "route" => route)
        .record(start.elapsed().as_secs_f64());
    resp
}

async fn require_token(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(t) if constant_time_eq(t.as_bytes(), state.api_token.as_bytes()) => {
            next.run(req).await
        }
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "invalid API token").into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer <token>",
        )
        .into_response(),
    }
}

/// Ready when the store answers a read and the hub, API and router listeners are bound (the
/// flag `app` sets once they are, and clears on shutdown). The body names each check; a failed
/// one makes it 503. `/healthz` only says the process answers.
async fn readyz(State(state): State<ApiState>) -> Response {
    let store = state.objects.store().clone();
    // A read of a key that cannot exist: cheap, and it goes through the database.
    let probe = tokio::task::spawn_blocking(move || {
        store
            .get(&ObjectKey::new(Kind::Node, "", "readyz.probe"))
            .map(|_| store.version())
    })
    .await;
    let store_check = match probe {
        Ok(Ok(version)) => json!({ "ok": true, "detail": format!("open at version {version}") }),
        Ok(Err(e)) => json!({ "ok": false, "detail": format!("read failed: {e}") }),
        Err(e) => json!({ "ok": false, "detail": format!("read task failed: {e}") }),
    };
    let up = state.ready.load(Ordering::Acquire);
    let listeners = if up {
        json!({ "ok": true, "detail": "hub, API and router listening" })
    } else {
        json!({ "ok": false, "detail": "not all listeners are up (starting or stopping)" })
    };
    let checks = json!({ "store": store_check, "listeners": listeners });
    let failed: Vec<&str> = ["store", "listeners"]
        .into_iter()
        .filter(|c| checks[c]["ok"] != true)
        .collect();
    let ready = failed.is_empty();
    let body = json!({ "ready": ready, "failed": failed, "checks": checks });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics_text(State(state): State<ApiState>) -> Response {
    metrics::gauge!("cloudcore_store_version").set(state.objects.store().version() as f64);
    // Also set as nodes come and go; here so that it reads 0 before the first node.
    metrics::gauge!("cloudcore_hub_online_nodes").set(state.nodes.online_count() as f64);
    match &state.metrics {
        Some(h) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            )],
            h.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response(),
    }
}

pub(crate) fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        ApiError::new(
            e.status(),
            format!("cannot read the request body: {}", e.body_text()),
        )
    })
}

pub(crate) fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "empty request body"));
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")))
}

/// Reads a PUT body as an object of `kind` named by the path.
fn object_from_body(
    kind: Kind,
    ns: &str,
    name: &str,
    mut value: Value,
) -> Result<Object, ApiError> {
    let obj = value
        .as_object_mut()
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "the body must be a JSON object"))?;
    match obj.get("kind") {
        None => {
            obj.insert("kind".into(), Value::String(kind.as_str().into()));
        }
        Some(Value::String(k)) if k == kind.as_str() => {}
        Some(other) => {
            return Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                FieldError::new(
                    "kind",
                    format!("expected kind {} at this path, got {other}", kind.as_str()),
                ),
            ))
        }
    }
    let meta = obj
        .entry("metadata")
        .or_insert_with(|| Value::Object(Default::default()));
    let meta = meta.as_object_mut().ok_or_else(|| {
        ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            FieldError::new("metadata", "must be an object"),
        )
    })?;
    for (field, want) in [("name", name), ("namespace", ns)] {
        match meta.get(field) {
            None => {
                meta.insert(field.into(), Value::String(want.into()));
            }
            Some(Value::String(s)) if s == want => {}
            Some(other) => {
                return Err(ApiError::field(
                    StatusCode::BAD_REQUEST,
                    FieldError::new(
                        format!("metadata.{field}"),
                        format!("{other} does not match {want:?} in the path"),
                    ),
                ))
            }
        }
    }
    Object::from_value(value).map_err(|e| ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, e))
}

async fn put_object(
    state: ApiState,
    kind: Kind,
    ns: String,
    name: String,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body_bytes(body)?;
    let object = object_from_body(kind, &ns, &name, parse_json(&bytes)?)?;
    let key = object.key();
    let objects = state.objects.clone();
    let (outcome, record) = blocking(move || {
        let outcome = objects.apply(vec![object], true)?;
        let record = objects
            .get(&key)?
            .ok_or_else(|| ApiError::not_found(&key))?;
        Ok((outcome, record))
    })
    .await?;
    let status = if outcome[0].action == "created" {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(raw_json(&record.json, status))
}

async fn get_object(state: ApiState, key: ObjectKey) -> Result<Response, ApiError> {
    let objects = state.objects.clone();
    let record =
        blocking(move || objects.get(&key)?.ok_or_else(|| ApiError::not_found(&key))).await?;
    Ok(raw_json(&record.json, StatusCode::OK))
}

async fn delete_object(state: ApiState, key: ObjectKey) -> Result<Response, ApiError> {
    let objects = state.objects.clone();
    let change = blocking(move || Ok(objects.delete(&key)?)).await?;
    Ok(raw_json(&change.json, StatusCode::OK))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListMeta {
    resource_version: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct List {
    api_version: &'static str,
    kind: String,
    metadata: ListMeta,
    items: Vec<Box<RawValue>>,
}

fn list_response(kind: Kind, version: u64, records: Vec<Record>) -> Result<Response, ApiError> {
    let items = records
        .into_iter()
        .map(|r| RawValue::from_string(r.json.to_string()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("corrupt stored object: {e}"),
            )
        })?;
    Ok(Json(List {
        api_version: "v1",
        kind: format!("{}List", kind.as_str()),
        metadata: ListMeta {
            resource_version: version.to_string(),
        },
        items,
    })
    .into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    namespace: Option<String>,
}

async fn list_kind(state: ApiState, kind: Kind, ns: Option<String>) -> Result<Response, ApiError> {
    let objects = state.objects.clone();
    let (version, records) = blocking(move || {
        let version = objects.store().version();
        Ok((version, objects.store().list(kind, ns.as_deref())?))
    })
    .await?;
    list_response(kind, version, records)
}

async fn list_services(
    State(s): State<ApiState>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    list_kind(s, Kind::Service, q.namespace).await
}
async fn list_endpoints(
    State(s): State<ApiState>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    list_kind(s, Kind::Endpoints, q.namespace).await
}
async fn list_services_ns(
    State(s): State<ApiState>,
    Path(ns): Path<String>,
) -> Result<Response, ApiError> {
    list_kind(s, Kind::Service, Some(ns)).await
}
async fn list_endpoints_ns(
    State(s): State<ApiState>,
    Path(ns): Path<String>,
) -> Result<Response, ApiError> {
    list_kind(s, Kind::Endpoints, Some(ns)).await
}
async fn put_service(
    State(s): State<ApiState>,
    Path((ns, name)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    put_object(s, Kind::Service, ns, name, body).await
}
async fn put_endpoints(
    State(s): State<ApiState>,
    Path((ns, name)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    put_object(s, Kind::Endpoints, ns, name, body).await
}
async fn get_service(
    State(s): State<ApiState>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    get_object(s, ObjectKey::new(Kind::Service, ns, name)).await
}
async fn get_endpoints(
    State(s): State<ApiState>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    get_object(s, ObjectKey::new(Kind::Endpoints, ns, name)).await
}
async fn delete_service(
    State(s): State<ApiState>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    delete_object(s, ObjectKey::new(Kind::Service, ns, name)).await
}
async fn delete_endpoints(
    State(s): State<ApiState>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    delete_object(s, ObjectKey::new(Kind::Endpoints, ns, name)).await
}

async fn list_communities(State(s): State<ApiState>) -> Result<Response, ApiError> {
    list_kind(s, Kind::Community, None).await
}
async fn put_community(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    put_object(s, Kind::Community, String::new(), name, body).await
}
async fn get_community(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    get_object(s, ObjectKey::new(Kind::Community, "", name)).await
}
async fn delete_community(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    delete_object(s, ObjectKey::new(Kind::Community, "", name)).await
}

/// A Node object with its runtime status merged into its stored status (the certificate).
fn node_with_status(state: &ApiState, record: &Record) -> Result<Value, ApiError> {
    let mut v: Value = serde_json::from_str(&record.json).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("corrupt stored node: {e}"),
        )
    })?;
    let mut status =
        serde_json::to_value(state.nodes.status(&record.key.name)).unwrap_or(Value::Null);
    if let Value::Object(s) = &mut status {
        s.insert(
            "hasToken".into(),
            Value::Bool(state.tokens.has_token(&record.key.name)),
        );
    }
    if let Value::Object(o) = &mut v {
        if let (Some(Value::Object(stored)), Value::Object(s)) = (o.remove("status"), &mut status) {
            s.extend(stored);
        }
        o.insert("status".into(), status);
    }
    Ok(v)
}

async fn list_nodes(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let objects = state.objects.clone();
    let (version, records) = blocking(move || {
        let version = objects.store().version();
        Ok((version, objects.store().list(Kind::Node, None)?))
    })
    .await?;
    let items = records
        .iter()
        .map(|r| node_with_status(&state, r))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(serde_json::json!({
        "apiVersion": "v1",
        "kind": "NodeList",
        "metadata": {"resourceVersion": version.to_string()},
        "items": items,
    }))
    .into_response())
}

async fn get_node(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let objects = state.objects.clone();
    let key = ObjectKey::new(Kind::Node, "", name);
    let record =
        blocking(move || objects.get(&key)?.ok_or_else(|| ApiError::not_found(&key))).await?;
    Ok(Json(node_with_status(&state, &record)?).into_response())
}

/// Deletes the node: its object goes, its token is revoked and its connection closed.
async fn delete_node(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let (objects, tokens) = (state.objects.clone(), state.tokens.clone());
    let key = ObjectKey::new(Kind::Node, "", name.clone());
    // Revoke and disconnect first, then delete: a node reconnecting in between must find
    // its token gone rather than re-create its Node object.
    let nodes = state.nodes.clone();
    let change = blocking(move || {
        let _admission = objects.admission();
        if objects.get(&key)?.is_none() {
            return Err(ApiError::not_found(&key));
        }
        tokens.revoke(&key.name)?;
        nodes.remove(&key.name);
        Ok(objects.delete(&key)?)
    })
    .await?;
    tracing::info!(node = %name, "node deleted and disconnected");
    Ok(raw_json(&change.json, StatusCode::OK))
}

#[derive(Serialize)]
struct TokenBody {
    node: String,
    token: String,
}

/// Creates or rotates a node's token. The old token stops working at once; an open
/// connection stays up until it drops (revoke to close it).
async fn create_token(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let (objects, tokens) = (state.objects.clone(), state.tokens.clone());
    let node = name.clone();
    let token = blocking(move || {
        objects.ensure_node(&node, None)?;
        let token = tokens.create(&node)?;
        // A new token is a new join: the certificate issued under the old one is revoked.
        objects.set_node_certificate(&node, None)?;
        Ok(token)
    })
    .await?;
    tracing::info!(node = %name, "node token issued");
    Ok((StatusCode::CREATED, Json(TokenBody { node: name, token })).into_response())
}

async fn revoke_token(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let (objects, tokens) = (state.objects.clone(), state.tokens.clone());
    let node = name.clone();
    let existed = blocking(move || {
        let existed = tokens.revoke(&node)?;
        objects.set_node_certificate(&node, None)?;
        Ok(existed)
    })
    .await?;
    if !existed {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("node {name} has no token"),
        ));
    }
    state.nodes.kick(&name);
    tracing::info!(node = %name, "node token revoked");
    Ok(Json(serde_json::json!({"node": name, "revoked": true})).into_response())
}

/// Splits an apply body into documents: a JSON object, a JSON array, a `List`, or YAML
/// documents separated by `---`.
pub fn documents(bytes: &[u8], yaml: bool) -> Result<Vec<Value>, ApiError> {
    let values: Vec<Value> = if yaml {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "the YAML body is not UTF-8"))?;
        let mut docs = Vec::new();
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let v = Value::deserialize(doc).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("document {i}: invalid YAML: {e}"),
                )
            })?;
            if !v.is_null() {
                docs.push(v);
            }
        }
        docs
    } else {
        match parse_json(bytes)? {
            Value::Array(items) => items,
            v => vec![v],
        }
    };
    let mut out = Vec::new();
    for v in values {
        if v.get("kind").and_then(Value::as_str) == Some("List") {
            match v.get("items") {
                Some(Value::Array(items)) => out.extend(items.iter().cloned()),
                _ => {
                    return Err(ApiError::field(
                        StatusCode::BAD_REQUEST,
                        FieldError::new("items", "a List needs items"),
                    ))
                }
            }
        } else {
            out.push(v);
        }
    }
    if out.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "no objects in the request",
        ));
    }
    Ok(out)
}

/// Parses every document and names the failing one: `document N (Kind ns/name)`.
pub fn parse_documents(docs: Vec<Value>) -> Result<Vec<Object>, ApiError> {
    let multi = docs.len() > 1;
    docs.into_iter()
        .enumerate()
        .map(|(i, mut v)| {
            let label = describe(&v);
            if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
                let namespaced = Kind::from_kind_str(&label.0).is_none_or(Kind::namespaced);
                if namespaced && !meta.contains_key("namespace") {
                    meta.insert("namespace".into(), Value::String("default".into()));
                }
            }
            Object::from_value(v).map_err(|e| {
                let mut err = ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, e);
                if multi {
                    err.error = format!("document {i} ({} {}): {}", label.0, label.1, err.error);
                }
                err
            })
        })
        .collect()
}

fn describe(v: &Value) -> (String, String) {
    let kind = v
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string();
    let meta = v.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("?");
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str);
    (
        kind,
        ns.map(|ns| format!("{ns}/{name}"))
            .unwrap_or_else(|| name.to_string()),
    )
}

async fn apply(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body_bytes(body)?;
    let yaml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("yaml"));
    let objects = parse_documents(documents(&bytes, yaml)?)?;
    let store = state.objects.clone();
    let results = blocking(move || Ok(store.apply(objects, false)?)).await?;
    Ok(Json(serde_json::json!({ "results": results })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use crate::store::Store;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    const TOKEN: &str = "test-token-0123456789";

    fn app() -> (tempfile::TempDir, Router, Arc<dyn Store>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("c.db"), 100, 1 << 20).expect("open"));
        let objects = Arc::new(
            Objects::new(store.clone(), "10.96.0.0/12".parse().expect("cidr")).expect("objects"),
        );
        let rules = crate::router::Router::new(
            Default::default(),
            objects.clone(),
            Arc::new(crate::router::NoLinks),
        )
        .expect("router");
        let state = ApiState {
            objects,
            tokens: Arc::new(NodeTokens::load(store.clone()).expect("tokens")),
            nodes: Arc::new(NodeRegistry::default()),
            api_token: TOKEN.into(),
            metrics: None,
            ready: Arc::new(AtomicBool::new(true)),
            router: Arc::new(rules),
        };
        (dir, router(state, 1 << 20), store)
    }

    async fn call(
        app: &Router,
        method: &str,
        uri: &str,
        body: &str,
        token: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = app
            .clone()
            .oneshot(req.body(Body::from(body.to_string())).expect("request"))
            .await
            .expect("response");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    #[tokio::test]
    async fn requires_the_token() {
        let (_d, app, _) = app();
        assert_eq!(
            call(&app, "GET", "/api/v1/services", "", None).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            call(&app, "GET", "/api/v1/services", "", Some("wrong"))
                .await
                .0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            call(&app, "GET", "/api/v1/services", "", Some(TOKEN))
                .await
                .0,
            StatusCode::OK
        );
        assert_eq!(
            call(&app, "GET", "/healthz", "", None).await.0,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn crud_and_field_errors() {
        let (_d, app, store) = app();
        let uri = "/api/v1/namespaces/default/services/hello";
        let (s, v) = call(
            &app,
            "PUT",
            uri,
            r#"{"spec":{"ports":[{"port":80,"targetPort":8080}]}}"#,
            Some(TOKEN),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        assert_eq!(v["metadata"]["resourceVersion"], "1");
        assert!(v["spec"]["clusterIP"]
            .as_str()
            .is_some_and(|ip| ip.starts_with("10.")));
        let (s, v) = call(&app, "GET", uri, "", Some(TOKEN)).await;
        assert_eq!(
            (s, v["metadata"]["name"].as_str()),
            (StatusCode::OK, Some("hello"))
        );

        for (body, status, field) in [
            (
                r#"{"spec":{"ports":[{"port":99999}]}}"#,
                422,
                Some("spec.ports[0].port"),
            ),
            (r#"{"kind":"Endpoints","spec":{}}"#, 400, Some("kind")),
            (
                r#"{"metadata":{"name":"other"},"spec":{"ports":[{"port":80}]}}"#,
                400,
                Some("metadata.name"),
            ),
            (
                r#"{"spec":{"clusterIP":"1.2.3.4","ports":[{"port":80}]}}"#,
                422,
                Some("spec.clusterIP"),
            ),
            (
                r#"{"spec":{"ports":[{"port":80}],"bogus":1}}"#,
                422,
                Some("spec.bogus"),
            ),
            ("{not json", 400, None),
            ("", 400, None),
        ] {
            let (s, v) = call(
                &app,
                "PUT",
                "/api/v1/namespaces/default/services/x",
                body,
                Some(TOKEN),
            )
            .await;
            assert_eq!(s.as_u16(), status, "{body}: {v}");
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
            assert_eq!(v["field"].as_str(), field, "{body}: {v}");
        }
        assert_eq!(store.version(), 1, "nothing invalid was stored");

        let (s, _) = call(&app, "DELETE", uri, "", Some(TOKEN)).await;
        assert_eq!(s, StatusCode::OK);
        let (s, v) = call(&app, "GET", uri, "", Some(TOKEN)).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    }

    #[tokio::test]
    async fn apply_is_all_or_nothing_and_names_the_document() {
        let (_d, app, store) = app();
        let good = r#"[{"kind":"Service","metadata":{"name":"a"},"spec":{"ports":[{"port":80}]}},
                      {"kind":"Endpoints","metadata":{"name":"a"},"subsets":[{"addresses":[{"ip":"10.0.0.1"}],"ports":[{"port":80}]}]}]"#;
        let (s, v) = call(&app, "POST", "/api/v1/apply", good, Some(TOKEN)).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["results"][1]["action"], "created");
        let bad = r#"[{"kind":"Service","metadata":{"name":"b"},"spec":{"ports":[{"port":80}]}},
                     {"kind":"Endpoints","metadata":{"name":"b"},"subsets":[{"addresses":[{"ip":"nope"}]}]}]"#;
        let (s, v) = call(&app, "POST", "/api/v1/apply", bad, Some(TOKEN)).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(v["field"], "subsets[0].addresses[0].ip");
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("document 1 (Endpoints default/b)")),
            "{v}"
        );
        assert_eq!(store.version(), 2);
    }

    #[test]
    fn yaml_documents() {
        let docs = documents(b"kind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n---\n---\nkind: Node\nmetadata: {name: n}\n", true)
            .expect("yaml");
        assert_eq!(docs.len(), 2);
        let objs = parse_documents(docs).expect("objects");
        assert_eq!(objs[0].key().namespace, "default");
        assert_eq!(objs[1].key().kind, Kind::Node);
    }
}
