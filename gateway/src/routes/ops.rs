//! Operational endpoints: `/healthz`, `/readyz`, `/metrics`, `/v1/models`.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;
use x2v_core::ErrorKind;
use x2v_queue::{Stage, Task};

use crate::config::ModelConfig;
use crate::error::ApiError;
use crate::openapi::ErrorResponses;
use crate::state::AppState;

/// The answer of a probe.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` (alive) or `ready`.
    pub status: &'static str,
}

/// Whether the gateway is alive.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    security(()),
    responses((status = 200, description = "Alive", body = Health)),
)]
pub async fn healthz() -> Response {
    axum::Json(Health { status: "ok" }).into_response()
}

/// Ready when the job store and output storage answer.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    security(()),
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "The job store or output storage does not answer", body = crate::error::ErrorEnvelope),
    ),
)]
pub async fn readyz(State(state): State<AppState>) -> Result<Response, ApiError> {
    let unavailable = |what: &str, e: x2v_queue::QueueError| {
        ApiError::new(ErrorKind::Unavailable, format!("{what} is unreachable: {e}"))
    };
    state.queue.ping().await.map_err(|e| unavailable("The job queue", e))?;
    state.storage.check().await.map_err(|e| unavailable("Output storage", e))?;
    Ok(axum::Json(Health { status: "ready" }).into_response())
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    for stage in Stage::ALL {
        if let Ok(depth) = state.queue.depth(stage).await {
            state.metrics.queue_depth.with_label_values(&[stage.as_str()]).set(depth as i64);
        }
    }
    (
        [(header::CONTENT_TYPE, x2v_core::metrics::Metrics::content_type())],
        state.metrics.registry.encode(),
    )
        .into_response()
}

/// The models served by live workers.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList<'a> {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<Model<'a>>,
}

/// A model some live worker serves.
#[derive(Debug, Serialize, ToSchema)]
pub struct Model<'a> {
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub x2v: ModelDetail<'a>,
}

/// What serves a model, and its limits.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelDetail<'a> {
    /// Tasks its live workers run.
    pub tasks: Vec<Task>,
    /// Live worker ranks per stage.
    pub ranks: BTreeMap<&'static str, Vec<u32>>,
    /// Its LoRA adapters, usable in a request's `lora`.
    pub loras: Vec<String>,
    /// The gateway's limits for it (null: not configured here).
    #[schema(value_type = Option<ModelConfig>)]
    pub limits: Option<&'a ModelConfig>,
}

/// Models served by live workers, with the tasks and ranks behind each.
#[utoipa::path(
    get,
    path = "/v1/models",
    operation_id = "listModels",
    responses((status = 200, description = "Served models", body = ModelList), ErrorResponses),
)]
pub async fn models(State(state): State<AppState>) -> Result<Response, ApiError> {
    let mut by_model: BTreeMap<String, Vec<x2v_queue::WorkerInfo>> = BTreeMap::new();
    for w in state.queue.workers().await? {
        for m in &w.models {
            by_model.entry(m.clone()).or_default().push(w.clone());
        }
    }
    let data = by_model
        .into_iter()
        .map(|(name, workers)| {
            let mut tasks: Vec<Task> =
                workers.iter().flat_map(|w| w.tasks.iter().copied()).collect();
            tasks.sort_by_key(|t| t.as_str());
            tasks.dedup();
            let ranks = Stage::ALL
                .iter()
                .map(|s| {
                    (s.as_str(), workers.iter().filter(|w| w.stage == *s).map(|w| w.rank).collect())
                })
                .collect();
            let limits = state.config.models.iter().find(|m| m.name == name);
            Model {
                id: name,
                object: "model",
                created: 0,
                owned_by: "x2v",
                x2v: ModelDetail {
                    tasks,
                    ranks,
                    // Adapters a DiT worker found unfit for the model are left out.
                    loras: limits
                        .map(ModelConfig::loras)
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|l| !workers.iter().any(|w| w.unfit_loras.contains_key(l)))
                        .collect(),
                    limits,
                },
            }
        })
        .collect();
    Ok(axum::Json(ModelList { object: "list", data }).into_response())
}
