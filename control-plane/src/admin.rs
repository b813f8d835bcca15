//! The REST admin API (axum). Every answer is JSON, errors included (`{"error": {"code", "message"}}`,
//! or the OpenAI error shape for `/v1/explain`); mutating calls need `Authorization: Bearer <token>`.
//! The routes are listed in [`ROUTES`] and described in `openapi.json` beside this crate's sources.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use kvmesh_core::{Role, RoutingConfig, WorkerId, WorkerState};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::plane::Plane;
use crate::{eds, explain};

/// The OpenAPI 3 document of this API.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

/// Every route as (method, path), as the OpenAPI document must list them.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/workers"),
    ("POST", "/v1/workers/{id}/drain"),
    ("POST", "/v1/workers/{id}/cordon"),
    ("POST", "/v1/workers/{id}/uncordon"),
    ("POST", "/v1/workers/{id}/role"),
    ("GET", "/v1/models"),
    ("GET", "/v1/policy"),
    ("PUT", "/v1/policy"),
    ("GET", "/v1/index/stats"),
    ("POST", "/v1/explain"),
    ("POST", eds::EDS_PATH),
];

/// What handlers share.
#[derive(Clone)]
struct AdminState {
    plane: Arc<Plane>,
    token: Option<Arc<str>>,
}

/// The admin router over a plane; `token` guards the mutating calls (none configured: all refused).
pub fn router(plane: Arc<Plane>, token: Option<String>) -> Router {
    let state = AdminState { plane, token: token.map(Arc::from) };
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/v1/workers", get(workers))
        .route("/v1/workers/{id}/drain", post(drain))
        .route("/v1/workers/{id}/cordon", post(cordon))
        .route("/v1/workers/{id}/uncordon", post(uncordon))
        .route("/v1/workers/{id}/role", post(set_role))
        .route("/v1/models", get(models))
        .route("/v1/policy", get(get_policy).put(put_policy))
        .route("/v1/index/stats", get(index_stats))
        .route("/v1/explain", post(explain_request))
        .route(eds::EDS_PATH, post(discovery_endpoints))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
        })
        // One past the largest body explain accepts, so its own 413 (with the limit) answers.
        .layer(DefaultBodyLimit::max(crate::config::defaults::MAX_EXPLAIN_BODY_BYTES + 1))
        .layer(middleware::from_fn(json_errors))
        .with_state(state)
}

/// A JSON error answer.
fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": {"code": code, "message": message.into()}}))).into_response()
}

/// Turns error answers axum builds itself (body too large, bad path) into JSON.
async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if status.as_u16() < 400 || is_json {
        return response;
    }
    let text = axum::body::to_bytes(response.into_body(), 64 * 1024).await.unwrap_or_default();
    let message = match String::from_utf8_lossy(&text).trim() {
        "" => status.canonical_reason().unwrap_or("error").to_owned(),
        t => t.to_owned(),
    };
    error(status, "http_error", message)
}

/// Checks the bearer token of a mutating call: the 401 answer when it is missing or wrong.
fn unauthorized(state: &AdminState, headers: &HeaderMap) -> Option<Response> {
    let Some(expected) = &state.token else {
        return Some(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "no admin token is configured (admin.token or KVMESH_ADMIN_TOKEN); mutating calls are disabled",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
    match given {
        Some(t) if constant_time_eq(t.as_bytes(), expected.as_bytes()) => None,
        Some(_) => Some(error(StatusCode::UNAUTHORIZED, "unauthorized", "wrong bearer token")),
        None => {
            Some(error(StatusCode::UNAUTHORIZED, "unauthorized", "missing `Authorization: Bearer <token>`"))
        }
    }
}

/// Compares without stopping at the first difference, so timing does not reveal the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

async fn readyz(State(s): State<AdminState>) -> Response {
    match s.plane.not_ready_reason() {
        None => Json(json!({"ready": true})).into_response(),
        Some(reason) => error(StatusCode::SERVICE_UNAVAILABLE, "not_ready", reason),
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    {
        let inner = s.plane.lock();
        s.plane.metrics.refresh(&inner.fleet);
    }
    let mut response = s.plane.metrics.encode().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

/// Envoy's REST EDS poll ([`eds`]): the registered workers as each named cluster's endpoints.
/// Read-only and open like the other reads: Envoy's REST subscription sends no credentials.
async fn discovery_endpoints(State(s): State<AdminState>, body: Bytes) -> Response {
    let request = match eds::parse_request(&body) {
        Ok(request) => request,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_discovery_request", e.to_string()),
    };
    let workers = s.plane.lock().fleet.registered_addresses();
    Json(eds::response(&request, &workers)).into_response()
}

async fn workers(State(s): State<AdminState>) -> Response {
    let workers = s.plane.lock().fleet.workers(Instant::now());
    Json(json!({"workers": workers})).into_response()
}

/// One worker's view, or 404.
fn worker_answer(s: &AdminState, id: &WorkerId) -> Response {
    let view = s.plane.lock().fleet.workers(Instant::now()).into_iter().find(|w| w.id == id.0);
    match view {
        Some(view) => Json(json!({"worker": view})).into_response(),
        None => error(StatusCode::NOT_FOUND, "unknown_worker", format!("no worker {:?}", id.0)),
    }
}

async fn set_state(s: AdminState, headers: HeaderMap, id: String, state: WorkerState) -> Response {
    if let Some(denied) = unauthorized(&s, &headers) {
        return denied;
    }
    let id = WorkerId(id);
    if !s.plane.lock().fleet.set_state(&id, state, Instant::now()) {
        return error(StatusCode::NOT_FOUND, "unknown_worker", format!("no worker {:?}", id.0));
    }
    s.plane.notify_changed();
    tracing::info!(worker = %id, ?state, "operator set worker state");
    worker_answer(&s, &id)
}

async fn drain(State(s): State<AdminState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    set_state(s, headers, id, WorkerState::Draining).await
}

async fn cordon(State(s): State<AdminState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    set_state(s, headers, id, WorkerState::Cordoned).await
}

async fn uncordon(State(s): State<AdminState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    set_state(s, headers, id, WorkerState::Ready).await
}

/// Body of `POST /v1/workers/{id}/role`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleBody {
    /// `prefill`, `decode`, `both`, or null to go back to the registered role.
    role: Option<Role>,
}

async fn set_role(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    if let Some(denied) = unauthorized(&s, &headers) {
        return denied;
    }
    let body: RoleBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
    };
    let id = WorkerId(id);
    if !s.plane.lock().fleet.set_role(&id, body.role, Instant::now()) {
        return error(StatusCode::NOT_FOUND, "unknown_worker", format!("no worker {:?}", id.0));
    }
    s.plane.notify_changed();
    tracing::info!(worker = %id, role = ?body.role, "operator set worker role");
    worker_answer(&s, &id)
}

/// A model as `/v1/models` lists it.
#[derive(Serialize)]
struct ModelView {
    name: String,
    configured: bool,
    block_size: Option<u32>,
    tokenizer_id: Option<String>,
    has_tokenizer: bool,
    has_chat_template: bool,
    workers: usize,
    routing: RoutingConfig,
}

async fn models(State(s): State<AdminState>) -> Response {
    let inner = s.plane.lock();
    let registered = inner.fleet.registered_models();
    let mut out: Vec<ModelView> = s
        .plane
        .models
        .iter()
        .map(|(name, m)| ModelView {
            name: name.to_owned(),
            configured: true,
            block_size: m.config.block_size.or_else(|| inner.fleet.registered_block_size(name)),
            tokenizer_id: m.files.as_ref().map(|f| f.tokenizer_id.clone()),
            has_tokenizer: m.files.is_some(),
            has_chat_template: m.files.as_ref().is_some_and(|f| f.default_template.is_some()),
            workers: registered.get(name).copied().unwrap_or(0),
            routing: inner.fleet.policy(name),
        })
        .collect();
    for (name, &n) in registered.iter().filter(|(name, _)| s.plane.models.get(name).is_none()) {
        out.push(ModelView {
            name: name.clone(),
            configured: false,
            block_size: inner.fleet.registered_block_size(name),
            tokenizer_id: None,
            has_tokenizer: false,
            has_chat_template: false,
            workers: n,
            routing: inner.fleet.policy(name),
        });
    }
    Json(json!({"models": out})).into_response()
}

async fn get_policy(State(s): State<AdminState>) -> Response {
    let inner = s.plane.lock();
    Json(json!({"policies": inner.fleet.policies(), "default": RoutingConfig::default()})).into_response()
}

/// Body of `PUT /v1/policy`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyBody {
    /// The model the policy is for.
    model: String,
    /// Core's routing config; missing fields take their defaults.
    routing: RoutingConfig,
}

async fn put_policy(State(s): State<AdminState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(denied) = unauthorized(&s, &headers) {
        return denied;
    }
    let body: PolicyBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
    };
    if body.model.is_empty() {
        return error(StatusCode::BAD_REQUEST, "bad_request", "`model` must not be empty");
    }
    if let Err(e) = body.routing.validate() {
        return error(StatusCode::BAD_REQUEST, "invalid_policy", e.to_string());
    }
    s.plane.lock().fleet.set_policy(&body.model, body.routing, Instant::now());
    s.plane.notify_changed();
    tracing::info!(model = %body.model, policy = body.routing.policy.name(), "operator set routing policy");
    Json(json!({"model": body.model, "routing": body.routing})).into_response()
}

async fn index_stats(State(s): State<AdminState>) -> Response {
    let stats = s.plane.lock().fleet.index_stats();
    Json(stats).into_response()
}

async fn explain_request(State(s): State<AdminState>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    let plane = s.plane.clone();
    // Tokenizing a long prompt takes milliseconds: keep it off the async workers.
    let result = tokio::task::spawn_blocking(move || {
        let endpoint = explain::endpoint_for(query.as_deref(), &body)?;
        explain::explain(&plane, endpoint, &body)
    })
    .await;
    match result {
        Ok(Ok(answer)) => Json(answer).into_response(),
        Ok(Err(e)) => {
            let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
            (status, [(header::CONTENT_TYPE, "application/json")], Body::from(e.body)).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_lists_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI_JSON).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "not an OpenAPI 3 document");
        for (method, path) in ROUTES {
            let op = &doc["paths"][path][method.to_lowercase()];
            assert!(op.is_object(), "openapi.json lacks {method} {path}");
            assert!(op["responses"].is_object(), "{method} {path} has no responses");
        }
        let listed: usize =
            doc["paths"].as_object().unwrap().values().map(|p| p.as_object().unwrap().len()).sum();
        assert_eq!(listed, ROUTES.len(), "openapi.json lists routes the router does not have");
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
