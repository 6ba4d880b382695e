//! REST API of the router (SPEC §2): `POST|GET /api/v1/router/endpoints`,
//! `GET|DELETE /api/v1/router/endpoints/{id}`, `POST|GET /api/v1/router/rules`,
//! `GET|DELETE /api/v1/router/rules/{id}`. Mounted inside the bearer-token-protected API.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use serde_json::{json, Map, Value};

use super::{body_bytes, parse_json, ApiError, ApiState};
use crate::router::RouterError;

pub fn routes() -> axum::Router<ApiState> {
    axum::Router::new()
        .route(
            "/api/v1/router/endpoints",
            post(create_endpoint).get(list_endpoints),
        )
        .route(
            "/api/v1/router/endpoints/{id}",
            get(get_endpoint).delete(delete_endpoint),
        )
        .route("/api/v1/router/rules", post(create_rule).get(list_rules))
        .route(
            "/api/v1/router/rules/{id}",
            get(get_rule).delete(delete_rule),
        )
}

impl From<RouterError> for ApiError {
    fn from(e: RouterError) -> Self {
        match e {
            RouterError::Invalid(err) => ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, err),
            RouterError::Conflict(err) => ApiError::field(StatusCode::CONFLICT, err),
            e @ RouterError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            RouterError::Misconfigured(message) => {
                tracing::error!(error = %message, "router misconfigured");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
            }
            RouterError::Store(e) => e.into(),
            RouterError::Apply(e) => e.into(),
        }
    }
}

/// The body as a JSON object (400 otherwise).
fn object_body(body: Result<Bytes, BytesRejection>) -> Result<Map<String, Value>, ApiError> {
    match parse_json(&body_bytes(body)?)? {
        Value::Object(map) => Ok(map),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
        )),
    }
}

/// Runs a router write (it touches the store) on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RouterError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal task failed: {e}"),
        )),
    }
}

async fn create_endpoint(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = object_body(body)?;
    let router = state.router.clone();
    let endpoint = blocking(move || router.create_endpoint(body)).await?;
    Ok((StatusCode::CREATED, Json(endpoint)).into_response())
}

async fn list_endpoints(State(state): State<ApiState>) -> Response {
    Json(json!({ "items": state.router.endpoints() })).into_response()
}

async fn get_endpoint(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let endpoint = state
        .router
        .endpoint(&id)
        .ok_or_else(|| ApiError::from(RouterError::NotFound(format!("rule endpoint {id}"))))?;
    Ok(Json(endpoint).into_response())
}

async fn delete_endpoint(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let router = state.router.clone();
    let endpoint = blocking(move || router.delete_endpoint(&id)).await?;
    Ok(Json(endpoint).into_response())
}

async fn create_rule(
    State(state): State<ApiState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = object_body(body)?;
    let router = state.router.clone();
    let rule = blocking(move || router.create_rule(body)).await?;
    Ok((StatusCode::CREATED, Json(rule)).into_response())
}

async fn list_rules(State(state): State<ApiState>) -> Response {
    Json(json!({ "items": state.router.rules() })).into_response()
}

async fn get_rule(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let rule = state
        .router
        .rule(&id)
        .ok_or_else(|| ApiError::from(RouterError::NotFound(format!("rule {id}"))))?;
    Ok(Json(rule).into_response())
}

async fn delete_rule(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let router = state.router.clone();
    let rule = blocking(move || router.delete_rule(&id)).await?;
    Ok(Json(rule).into_response())
}
