//! The REST API (SPEC §2): Services, Endpoints, Nodes and node tokens, Communities, `apply`,
//! health and metrics. Errors are `{"error": "...", "field": "..."}` with a 4xx status, and nothing is
//! stored unless the whole request is valid.

mod router;

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
use crate::manifest::{self, ManifestError, Origin, Served, Skipped};
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
    /// Messages quote what the client sent (a name, a value, a path): bounded here, so no error
    /// path can echo a multi-megabyte value back.
    fn into_response(self) -> Response {
        let error = edgehub::untrusted::message(&self.error);
        let field = self
            .field
            .as_deref()
            .map(|f| edgehub::untrusted::clip(f, edgehub::untrusted::MAX_FIELD));
        let body = ErrorBody {
            error: &error,
            field: field.as_deref(),
        };
        (self.status, Json(body)).into_response()
    }
}

/// Every error answer in the API's shape, `{"error": ...}`, bounded: axum answers rejected
/// paths, queries and methods itself, in plain text that may quote the request.
async fn errors_as_json(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = match axum::body::to_bytes(body, 64 << 10).await {
        Ok(b) if !b.is_empty() => String::from_utf8_lossy(&b).trim().to_string(),
        _ => status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_lowercase(),
    };
    parts.headers.remove(header::CONTENT_TYPE);
    parts.headers.remove(header::CONTENT_LENGTH);
    let mut out = ApiError::new(status, text).into_response();
    for (name, value) in parts.headers.iter() {
        out.headers_mut().entry(name).or_insert(value.clone());
    }
    out
}

impl From<ApplyError> for ApiError {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::Invalid { err, .. } => {
                ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, err)
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
            e @ StoreError::TooLarge(_) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
            }
            e @ (StoreError::Stale { .. } | StoreError::Revoked(_)) => {
                ApiError::new(StatusCode::CONFLICT, format!("{e}; try again"))
            }
            e @ StoreError::Unavailable(_) => {
                tracing::warn!(error = %e, "store unavailable");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
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
        .merge(router::routes())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such API path") })
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .merge(api)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn(errors_as_json))
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
    // SQLite: a read through the database; etcd: the watch that feeds this replica is up.
    let probe = tokio::task::spawn_blocking(move || store.health()).await;
    let store_check = match probe {
        Ok(Ok(detail)) => json!({ "ok": true, "detail": detail }),
        Ok(Err(e)) => json!({ "ok": false, "detail": e }),
        Err(e) => json!({ "ok": false, "detail": format!("read task failed: {e}") }),
    };
    let up = state.ready.load(Ordering::Acquire);
    let listeners = if up {
        json!({ "ok": true, "detail": "hub, API and router listening" })
    } else {
        json!({ "ok": false, "detail": "not all listeners are up (starting or stopping)" })
    };
    let mut checks = json!({ "store": store_check, "listeners": listeners });
    // Several replicas: this one's lease in etcd (without it, it holds no nodes).
    if let Some(cluster) = state.nodes.cluster_health() {
        checks["cluster"] = match cluster {
            Ok(detail) => json!({ "ok": true, "detail": detail }),
            Err(detail) => json!({ "ok": false, "detail": detail }),
        };
    }
    let failed: Vec<&str> = ["store", "listeners", "cluster"]
        .into_iter()
        .filter(|c| checks.get(*c).is_some_and(|v| v["ok"] != true))
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
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            edgehub::accept::limit_hit("api", "body_size");
        }
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

impl From<ManifestError> for ApiError {
    fn from(e: ManifestError) -> Self {
        match e {
            ManifestError::Field {
                origin,
                label,
                field,
                message,
            } => ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                error: format!("{origin} ({label}): {message}"),
                field: Some(field),
            },
            e @ ManifestError::Document { .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
            }
            e => ApiError::new(StatusCode::BAD_REQUEST, e.to_string()),
        }
    }
}

/// An apply request, read: the objects to store with where each was in the body, and the
/// documents of kinds `/api/v1/apply` does not take.
pub(crate) struct ApplyRequest {
    pub objects: Vec<(Origin, Object)>,
    pub skipped: Vec<(Origin, Skipped)>,
}

/// Reads an apply body: a JSON object, array or `List`, or YAML documents. Documents are
/// numbered as `cloudcore apply` numbers them in a file (the same reader).
pub(crate) fn read_apply(bytes: &[u8], yaml: bool) -> Result<ApplyRequest, ApiError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "the body is not UTF-8"))?;
    if text.trim().is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "empty request body"));
    }
    let format = if yaml {
        manifest::Format::Yaml
    } else {
        manifest::Format::Json
    };
    let mut request = ApplyRequest {
        objects: Vec::new(),
        skipped: Vec::new(),
    };
    manifest::for_each_document("", text, Some(format), |origin, mut v| {
        let (api_version, kind, name) = manifest::identity(&v);
        let label = describe(&v);
        let Some(kind) = kind else {
            return Err(ApiError::from(ManifestError::field(
                &origin,
                &label,
                FieldError::new("kind", "is required (a string)"),
            )));
        };
        let skip = |reason: &str| Skipped {
            resource: manifest::resource_name(api_version, kind, name),
            reason: reason.to_string(),
        };
        match manifest::served(api_version, kind) {
            Served::Object(k) => {
                if k.namespaced() {
                    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
                        meta.entry("namespace")
                            .or_insert_with(|| Value::String("default".into()));
                    }
                }
                let label = describe(&v);
                let object = Object::from_value(v)
                    .map_err(|e| ApiError::from(ManifestError::field(&origin, &label, e)))?;
                request.objects.push((origin, object));
            }
            Served::RuleEndpoint | Served::Rule => {
                let reason = "not served by /api/v1/apply: POST router records to \
                     /api/v1/router/endpoints and /api/v1/router/rules (cloudcore apply does)";
                let skipped = skip(reason);
                request.skipped.push((origin, skipped));
            }
            Served::No => {
                let skipped = skip(manifest::NOT_SERVED);
                request.skipped.push((origin, skipped));
            }
        }
        Ok(())
    })?;
    if request.objects.is_empty() && request.skipped.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "no objects in the request",
        ));
    }
    Ok(request)
}

/// `Kind namespace/name` of a document, as far as it can be read, bounded.
fn describe(v: &Value) -> String {
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or("?");
    let meta = v.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
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

/// An error of `Objects::apply`, naming the document by where it was in the request.
fn apply_error(e: ApplyError, origins: &[Origin]) -> ApiError {
    // A one-object apply is named too: `Objects` only numbers documents of longer ones.
    let at = |index: Option<usize>| {
        index
            .or((origins.len() == 1).then_some(0))
            .and_then(|i| origins.get(i))
    };
    match e {
        ApplyError::Invalid { index, object, err } => {
            let mut api = ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, err);
            if let Some(origin) = at(index) {
                api.error = format!("{origin} ({object}): {}", api.error);
            }
            api
        }
        ApplyError::TooLarge {
            index,
            object,
            size,
        } => {
            let e = ApplyError::TooLarge {
                index: None,
                object: object.clone(),
                size,
            };
            match at(index) {
                Some(origin) => ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("{origin} ({object}): {e}"),
                ),
                None => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
            }
        }
        other => other.into(),
    }
}

#[derive(Deserialize, Default)]
struct ApplyQuery {
    /// Refuse the whole request when a document is of a kind apply does not take.
    #[serde(default)]
    strict: bool,
}

#[derive(Serialize)]
struct SkippedBody<'a> {
    document: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    item: Option<usize>,
    resource: &'a str,
    reason: &'a str,
}

async fn apply(
    State(state): State<ApiState>,
    Query(query): Query<ApplyQuery>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body_bytes(body)?;
    let yaml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("yaml"));
    // The documents are read on the blocking pool: a large body is a lot of parsing.
    let request = blocking(move || read_apply(&bytes, yaml)).await?;
    if query.strict && !request.skipped.is_empty() {
        let list: Vec<String> = request
            .skipped
            .iter()
            .map(|(o, s)| format!("{o} ({})", s.resource))
            .collect();
        return Err(ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            error: format!(
                "strict: nothing applied, because apply does not take {}",
                list.join(", ")
            ),
            field: Some("kind".into()),
        });
    }
    let (origins, objects): (Vec<Origin>, Vec<Object>) = request.objects.into_iter().unzip();
    let store = state.objects.clone();
    let results = if objects.is_empty() {
        Vec::new()
    } else {
        blocking(move || {
            store
                .apply(objects, false)
                .map_err(|e| apply_error(e, &origins))
        })
        .await?
    };
    let skipped: Vec<SkippedBody> = request
        .skipped
        .iter()
        .map(|(o, s)| SkippedBody {
            document: o.document,
            item: o.item,
            resource: &s.resource,
            reason: &s.reason,
        })
        .collect();
    Ok(Json(json!({ "results": results, "skipped": skipped })).into_response())
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
            crate::router::DataPath::for_tests(store.clone(), Arc::new(crate::router::NoLinks)),
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
        call_as(app, method, uri, body, token, "application/json").await
    }

    async fn call_as(
        app: &Router,
        method: &str,
        uri: &str,
        body: &str,
        token: Option<&str>,
        content_type: &str,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", content_type);
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
                .is_some_and(|e| e.starts_with("document 2 (Endpoints default/b)")),
            "{v}"
        );
        assert_eq!(store.version(), 2);
    }

    async fn call_yaml(app: &Router, uri: &str, body: &str) -> (StatusCode, Value) {
        call_as(app, "POST", uri, body, Some(TOKEN), "application/yaml").await
    }

    const MIXED: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: details}\nspec: {ports: [{port: 9080, name: http}]}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: bookinfo-details}\n---\n# a comment-only document is not counted\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: details-v1}\nspec: {replicas: 1}\n---\napiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {name: knative}\n";

    #[tokio::test]
    async fn apply_takes_what_it_serves_and_lists_the_rest_by_document() {
        let (_d, app, store) = app();
        let (s, v) = call_yaml(&app, "/api/v1/apply?strict=true", MIXED).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        let e = v["error"].as_str().unwrap_or("");
        for want in [
            "document 2 (serviceaccount/bookinfo-details)",
            "document 3 (deployment.apps/details-v1)",
            "document 4 (service.serving.knative.dev/knative)",
        ] {
            assert!(e.contains(want), "{want}: {v}");
        }
        assert_eq!(store.version(), 0, "strict stores nothing");

        let (s, v) = call_yaml(&app, "/api/v1/apply", MIXED).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["results"].as_array().map(Vec::len), Some(1), "{v}");
        assert_eq!(v["results"][0]["name"], "details");
        let skipped: Vec<(u64, &str, &str)> = v["skipped"]
            .as_array()
            .expect("skipped")
            .iter()
            .map(|s| {
                (
                    s["document"].as_u64().unwrap_or(0),
                    s["resource"].as_str().unwrap_or(""),
                    s["reason"].as_str().unwrap_or(""),
                )
            })
            .collect();
        assert_eq!(
            skipped,
            [
                (
                    2,
                    "serviceaccount/bookinfo-details",
                    "not served by cloudcore"
                ),
                (3, "deployment.apps/details-v1", "not served by cloudcore"),
                (
                    4,
                    "service.serving.knative.dev/knative",
                    "not served by cloudcore"
                ),
            ]
        );
        assert_eq!(store.version(), 1);
    }

    #[tokio::test]
    async fn every_error_quotes_the_request_bounded() {
        let (_d, app, store) = app();
        let huge = "a".repeat(900 << 10);
        let body =
            format!(r#"{{"metadata":{{"name":"{huge}"}},"spec":{{"ports":[{{"port":80}}]}}}}"#);
        let uri = "/api/v1/namespaces/default/services/x";
        let (s, v) = call(&app, "PUT", uri, &body, Some(TOKEN)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{}", v.to_string().len());
        assert_eq!(v["field"], "metadata.name");
        // Invalid field values, in a list apply.
        let body = format!(
            r#"[{{"kind":"Service","metadata":{{"name":"{huge}"}},"spec":{{"ports":[{{"port":80}}]}}}}]"#
        );
        let (s, v) = call(&app, "POST", "/api/v1/apply", &body, Some(TOKEN)).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
        let e = v["error"].as_str().unwrap_or("");
        assert!(e.len() < 2048 && e.contains("bytes]"), "{} bytes", e.len());
        // A huge label key lands in the field path.
        let body = format!(
            r#"{{"metadata":{{"labels":{{"{huge}":"x"}}}},"spec":{{"ports":[{{"port":80}}]}}}}"#
        );
        let (s, v) = call(&app, "PUT", uri, &body, Some(TOKEN)).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(v.to_string().len() < 4096, "{} bytes", v.to_string().len());
        // Broken JSON, a rejected query, a long unknown path.
        let (s, v) = call(&app, "PUT", uri, &format!("{{\"{huge}"), Some(TOKEN)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(v.to_string().len() < 4096);
        let (s, v) = call(
            &app,
            "POST",
            "/api/v1/apply?strict=maybe",
            "[]",
            Some(TOKEN),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(v["error"].as_str().is_some(), "a JSON error: {v}");
        let long_path = format!("/api/v1/{}", "p".repeat(60 << 10));
        let (s, v) = call(&app, "GET", &long_path, "", Some(TOKEN)).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert!(v.to_string().len() < 4096);
        let (s, v) = call(&app, "PATCH", uri, "", Some(TOKEN)).await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
        assert!(v["error"].as_str().is_some(), "a JSON error: {v}");
        assert_eq!(store.version(), 0);
    }

    #[test]
    fn yaml_documents() {
        let r = read_apply(b"kind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n---\n---\nkind: Node\nmetadata: {name: n}\n", true)
            .expect("yaml");
        assert_eq!(r.objects.len(), 2);
        assert_eq!(r.objects[0].1.key().namespace, "default");
        assert_eq!(r.objects[1].1.key().kind, Kind::Node);
        // Numbered as in a file: the empty document does not count.
        assert_eq!(r.objects[1].0.to_string(), "document 2");
    }
}
