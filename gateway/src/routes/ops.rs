//! Operational endpoints: `/healthz`, `/readyz`, `/metrics`, `/v1/models`.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use x2v_core::ErrorKind;
use x2v_queue::Stage;

use crate::error::ApiError;
use crate::state::AppState;

pub async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

/// Ready when the job store and output storage answer.
pub async fn readyz(State(state): State<AppState>) -> Result<Response, ApiError> {
    let unavailable = |what: &str, e: x2v_queue::QueueError| {
        ApiError::new(ErrorKind::Unavailable, format!("{what} is unreachable: {e}"))
    };
    state.queue.ping().await.map_err(|e| unavailable("The job queue", e))?;
    state.storage.check().await.map_err(|e| unavailable("Output storage", e))?;
    Ok(axum::Json(json!({"status": "ready"})).into_response())
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

/// Models served by live workers, with the tasks and ranks behind each.
pub async fn models(State(state): State<AppState>) -> Result<Response, ApiError> {
    let mut by_model: BTreeMap<String, Vec<x2v_queue::WorkerInfo>> = BTreeMap::new();
    for w in state.queue.workers().await? {
        for m in &w.models {
            by_model.entry(m.clone()).or_default().push(w.clone());
        }
    }
    let data: Vec<_> = by_model
        .into_iter()
        .map(|(name, workers)| {
            let mut tasks: Vec<&str> =
                workers.iter().flat_map(|w| w.tasks.iter().map(|t| t.as_str())).collect();
            tasks.sort();
            tasks.dedup();
            let ranks: BTreeMap<&str, Vec<u32>> = Stage::ALL
                .iter()
                .map(|s| {
                    (s.as_str(), workers.iter().filter(|w| w.stage == *s).map(|w| w.rank).collect())
                })
                .collect();
            let limits = state.config.models.iter().find(|m| m.name == name);
            json!({"id": name, "object": "model", "created": 0, "owned_by": "x2v",
                   "x2v": {"tasks": tasks, "ranks": ranks, "limits": limits}})
        })
        .collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}
