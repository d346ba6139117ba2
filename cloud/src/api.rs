//! The HTTP/JSON API the CLI (and the console) call: `/api/v1/...`, plus `/metrics` and
//! `/openapi.json`. Every call but health, metrics and the OpenAPI document needs
//! `authorization: Bearer <API token>`, and each checks the token's role.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{CloudError, Result};
use crate::fleet::{Caller, DeployRequest, Fleet};
use crate::model::Role;
use crate::results::ResultStore;
use crate::selector::{Labels, validate_labels};

pub struct ApiState {
    pub fleet: Arc<Fleet>,
    pub results: Arc<ResultStore>,
}

type Shared = State<Arc<ApiState>>;

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/api/v1/health", get(health))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/api/v1/gateways", get(list_gateways).post(add_gateway))
        .route(
            "/api/v1/gateways/{name}",
            axum::routing::delete(revoke_gateway),
        )
        .route("/api/v1/gateways/{name}/labels", put(label_gateway))
        .route("/api/v1/gateways/{name}/enrollment", post(new_enrollment))
        .route("/api/v1/tokens", post(add_token))
        .route("/api/v1/deployments", get(list_deployments).post(deploy))
        .route("/api/v1/deployments/{name}/rollback", post(rollback))
        .route("/api/v1/versions", get(list_versions))
        .route("/api/v1/status", get(status))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/query", post(query))
        .route("/api/v1/streams", get(streams))
        .with_state(state)
}

fn caller(state: &ApiState, headers: &HeaderMap) -> Result<Caller> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            CloudError::Unauthenticated(
                "no API token: send `authorization: Bearer <token>` (WEIR_TOKEN for the CLI)"
                    .into(),
            )
        })?;
    state.fleet.authenticate(token.trim())
}

async fn health(State(state): Shared) -> Json<Value> {
    Json(json!({ "status": "ok", "gateways_online": state.fleet.online() }))
}

async fn metrics(State(state): Shared) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::render(&state.fleet),
    )
}

async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
}

async fn list_gateways(State(state): Shared, headers: HeaderMap) -> Result<Json<Value>> {
    caller(&state, &headers)?.require(Role::Viewer, "listing gateways")?;
    Ok(Json(json!(state.fleet.status())))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddGateway {
    name: String,
    #[serde(default)]
    labels: Labels,
}

async fn add_gateway(
    State(state): Shared,
    headers: HeaderMap,
    Json(body): Json<AddGateway>,
) -> Result<impl IntoResponse> {
    let caller = caller(&state, &headers)?;
    validate_labels(&body.labels)?;
    let (gateway, token) = state.fleet.add_gateway(&caller, &body.name, body.labels)?;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({ "name": gateway.name, "id": gateway.id, "labels": gateway.labels, "enrollment_token": token }),
        ),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Relabel {
    #[serde(default)]
    set: Labels,
    #[serde(default)]
    remove: Vec<String>,
}

async fn label_gateway(
    State(state): Shared,
    headers: HeaderMap,
    Path(name): Path<String>,
    Json(body): Json<Relabel>,
) -> Result<Json<Value>> {
    let caller = caller(&state, &headers)?;
    validate_labels(&body.set)?;
    let gateway = state
        .fleet
        .relabel(&caller, &name, body.set, &body.remove)?;
    Ok(Json(
        json!({ "name": gateway.name, "labels": gateway.labels }),
    ))
}

async fn new_enrollment(
    State(state): Shared,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>> {
    let caller = caller(&state, &headers)?;
    let token = state.fleet.new_enrollment(&caller, &name)?;
    Ok(Json(json!({ "name": name, "enrollment_token": token })))
}

async fn revoke_gateway(
    State(state): Shared,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<StatusCode> {
    let caller = caller(&state, &headers)?;
    state.fleet.revoke(&caller, &name)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddToken {
    name: String,
    role: String,
}

async fn add_token(
    State(state): Shared,
    headers: HeaderMap,
    Json(body): Json<AddToken>,
) -> Result<impl IntoResponse> {
    let caller = caller(&state, &headers)?;
    let role: Role = body.role.parse()?;
    let token = state.fleet.add_token(&caller, &body.name, role)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "name": body.name, "role": role, "token": token })),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Deploy {
    sql: String,
    #[serde(default = "default_file")]
    file: String,
    #[serde(default)]
    selector: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    priority: i32,
    /// Staged rollout: this many gateways first (0: all at once).
    #[serde(default)]
    canary: u32,
    /// Seconds every canary must run the new versions healthily before the rest follow.
    #[serde(default = "default_bake_s")]
    bake_s: u64,
    /// More errors than this on a canary's pipeline fails the rollout.
    #[serde(default = "default_max_errors")]
    max_errors: u64,
    /// Deploy even where new versions cannot take over the running versions' state.
    #[serde(default)]
    fresh: bool,
}

fn default_bake_s() -> u64 {
    60
}

fn default_max_errors() -> u64 {
    10
}

fn default_file() -> String {
    "pipeline.sql".into()
}

async fn deploy(
    State(state): Shared,
    headers: HeaderMap,
    Json(body): Json<Deploy>,
) -> Result<impl IntoResponse> {
    let caller = caller(&state, &headers)?;
    let outcome = state.fleet.deploy(
        &caller,
        DeployRequest {
            name: body.name,
            sql: body.sql,
            file: body.file,
            selector: body.selector,
            priority: body.priority,
            canary: body.canary,
            bake: std::time::Duration::from_secs(body.bake_s),
            max_errors: body.max_errors,
            fresh: body.fresh,
        },
    )?;
    Ok((StatusCode::CREATED, Json(json!(outcome))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rollback {
    /// Roll back even where the earlier versions cannot take over the running state.
    #[serde(default)]
    fresh: bool,
}

async fn rollback(
    State(state): Shared,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(query): Query<Rollback>,
) -> Result<Json<Value>> {
    let caller = caller(&state, &headers)?;
    Ok(Json(json!(state.fleet.rollback(
        &caller,
        &name,
        query.fresh
    )?)))
}

async fn list_deployments(State(state): Shared, headers: HeaderMap) -> Result<Json<Value>> {
    caller(&state, &headers)?.require(Role::Viewer, "listing deployments")?;
    Ok(Json(json!(state.fleet.deployments())))
}

#[derive(Deserialize)]
struct VersionsQuery {
    pipeline: Option<String>,
}

async fn list_versions(
    State(state): Shared,
    headers: HeaderMap,
    Query(query): Query<VersionsQuery>,
) -> Result<Json<Value>> {
    // The SQL of a version may hold connector passwords: deployers and admins only.
    caller(&state, &headers)?.require(Role::Deployer, "reading pipeline SQL")?;
    Ok(Json(json!(state.fleet.versions(query.pipeline.as_deref()))))
}

async fn status(State(state): Shared, headers: HeaderMap) -> Result<Json<Value>> {
    caller(&state, &headers)?.require(Role::Viewer, "reading status")?;
    let mut gateways = state.fleet.status();
    for gateway in &mut gateways {
        for stored in state.results.gateway_streams(&gateway.id) {
            match gateway
                .streams
                .iter_mut()
                .find(|s| s.stream == stored.stream)
            {
                Some(stream) => {
                    stream.last_stored_seq = stored.last_stored_seq;
                    stream.duplicates = stored.duplicates;
                }
                None => gateway.streams.push(crate::fleet::StreamView {
                    stream: stored.stream,
                    last_stored_seq: stored.last_stored_seq,
                    duplicates: stored.duplicates,
                    ..Default::default()
                }),
            }
        }
    }
    Ok(Json(json!({
        "gateways": gateways,
        "deployments": state.fleet.deployments(),
    })))
}

async fn audit(State(state): Shared, headers: HeaderMap) -> Result<Json<Value>> {
    let caller = caller(&state, &headers)?;
    Ok(Json(json!(state.fleet.audit_log(&caller)?)))
}

#[derive(Deserialize)]
struct QueryRequest {
    sql: String,
}

/// Runs read-only SQL over the stored results; the answer is an Arrow IPC stream, which the
/// CLI prints as a table, JSON or CSV.
async fn query(
    State(state): Shared,
    headers: HeaderMap,
    Json(body): Json<QueryRequest>,
) -> Result<impl IntoResponse> {
    caller(&state, &headers)?.require(Role::Viewer, "querying results")?;
    let batches = state.results.query(&body.sql).await?;
    let schema = match batches.first() {
        Some(batch) => batch.schema(),
        None => Arc::new(arrow::datatypes::Schema::empty()),
    };
    let mut bytes = Vec::new();
    let encoded = (|| {
        let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut bytes, &schema)?;
        for batch in &batches {
            writer.write(batch)?;
        }
        writer.finish()
    })();
    encoded.map_err(|e| CloudError::Storage(format!("encoding the answer: {e}")))?;
    Ok((
        [(header::CONTENT_TYPE, "application/vnd.apache.arrow.stream")],
        bytes,
    ))
}

async fn streams(State(state): Shared, headers: HeaderMap) -> Result<Json<Value>> {
    caller(&state, &headers)?.require(Role::Viewer, "listing result streams")?;
    Ok(Json(json!(state.results.tables().await?)))
}
