//! The local admin API (HTTP + JSON), bound to loopback by default.
//!
//! | method | path                     | what                                            |
//! |--------|--------------------------|-------------------------------------------------|
//! | GET    | `/health`                | liveness; never needs the token                  |
//! | GET    | `/metrics`               | Prometheus (OpenMetrics text)                    |
//! | GET    | `/api/pipelines`         | the gateway and every pipeline's status          |
//! | GET    | `/api/pipelines/{name}`  | one pipeline: status, SQL, plan, dead letters    |
//! | POST   | `/api/pipelines`         | add the pipelines of the SQL in the body         |
//! | PUT    | `/api/pipelines/{name}`  | deploy the SQL in the body as a new version      |
//! | DELETE | `/api/pipelines/{name}`  | stop and remove a pipeline                       |
//!
//! SQL bodies are plain text; `?file=NAME` names the file in compile errors, which come back
//! as `400` with `FILE:LINE:COL: error: ...` and each diagnostic as JSON. When a token is
//! configured every route but `/health` needs `Authorization: Bearer TOKEN`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::deploy::Deployments;
use crate::error::GatewayError;

/// What the handlers share.
pub struct AdminState {
    pub deployments: Arc<Deployments>,
    pub gateway: String,
    pub broker: String,
    pub started: Instant,
    pub token: Option<String>,
    /// The connection to the cloud, when the gateway takes pipelines from one.
    pub cloud: Option<Arc<crate::agent::CloudLink>>,
    /// The queue of results bound for the cloud.
    pub uplink: Arc<crate::uplink::Uplink>,
}

/// The admin API's routes.
pub fn router(state: Arc<AdminState>) -> Router {
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/pipelines", get(list).post(add))
        .route(
            "/api/pipelines/{name}",
            get(detail).put(replace).delete(remove),
        )
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            authorize,
        ));
    Router::new()
        .route("/health", get(health))
        .merge(protected)
        .with_state(state)
}

async fn authorize(State(state): State<Arc<AdminState>>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(token.as_str()) {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({ "error": "missing or wrong bearer token (--token / WEIR_ADMIN_TOKEN)" })),
            )
                .into_response();
        }
    }
    next.run(request).await
}

async fn health(State(state): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    let pipelines = state.deployments.list();
    let failed = pipelines.iter().filter(|p| p.state == "failed").count();
    Json(json!({
        "status": "ok",
        "gateway": state.gateway,
        "pipelines": pipelines.len(),
        "failed": failed,
    }))
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    let text = crate::metrics::render(
        &state.gateway,
        state.started.elapsed().as_secs_f64(),
        &state.deployments.list(),
        &state.deployments.dead_letter_counts(),
        &state.uplink.status(),
    );
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn list(State(state): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    Json(json!({
        "gateway": {
            "name": state.gateway,
            "uptime_s": state.started.elapsed().as_secs_f64(),
            "broker": state.broker,
            "version": env!("CARGO_PKG_VERSION"),
            "cloud": state.cloud.as_ref().map(|c| c.snapshot()),
        },
        "pipelines": state.deployments.list(),
    }))
}

async fn detail(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Result<Response, ErrorResponse> {
    let detail = state
        .deployments
        .get(&name)
        .ok_or(GatewayError::NotFound(name))?;
    Ok(Json(detail).into_response())
}

#[derive(Debug, Deserialize)]
struct SqlFile {
    /// The file name to show in compile errors.
    file: Option<String>,
    /// Replace (or add) even if the new version cannot take over the old one's state (or
    /// its checkpoint).
    #[serde(default)]
    fresh: bool,
}

async fn add(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<SqlFile>,
    sql: String,
) -> Result<Response, ErrorResponse> {
    let file = query.file.unwrap_or_else(|| "request".into());
    let deployed = state.deployments.add(&sql, &file, query.fresh).await?;
    Ok((StatusCode::CREATED, Json(json!({ "deployed": deployed }))).into_response())
}

async fn replace(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
    Query(query): Query<SqlFile>,
    sql: String,
) -> Result<Response, ErrorResponse> {
    let file = query.file.unwrap_or_else(|| "request".into());
    let deployed = state
        .deployments
        .replace(&name, &sql, &file, query.fresh)
        .await?;
    Ok(Json(json!({ "deployed": [deployed] })).into_response())
}

async fn remove(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Result<Response, ErrorResponse> {
    state.deployments.remove(&name).await?;
    Ok(Json(json!({ "removed": name.to_ascii_lowercase() })).into_response())
}

/// A [`GatewayError`] as an HTTP response: the one place errors become statuses.
pub struct ErrorResponse(GatewayError);

impl From<GatewayError> for ErrorResponse {
    fn from(error: GatewayError) -> Self {
        Self(error)
    }
}

impl IntoResponse for ErrorResponse {
    fn into_response(self) -> Response {
        let error = self.0;
        let status = match &error {
            GatewayError::Compile { .. } | GatewayError::Invalid(_) | GatewayError::Config(_) => {
                StatusCode::BAD_REQUEST
            }
            GatewayError::Conflict(_) => StatusCode::CONFLICT,
            GatewayError::NotFound(_) => StatusCode::NOT_FOUND,
            GatewayError::Engine(e) if !e.is_retryable() => StatusCode::UNPROCESSABLE_ENTITY,
            GatewayError::Connector(e) if e.fault() == weir_connectors::error::Fault::User => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            GatewayError::Engine(weir_engine::EngineError::Connector(e))
                if e.fault() == weir_connectors::error::Fault::User =>
            {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            GatewayError::Engine(_) | GatewayError::Connector(_) | GatewayError::Io { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let mut body = json!({ "error": error.to_string() });
        if let GatewayError::Compile { diagnostics, .. } = &error {
            body["diagnostics"] = diagnostics
                .iter()
                .map(weir_planner::Diagnostic::to_json)
                .collect();
        }
        (status, Json(body)).into_response()
    }
}
