//! `/v1/videos`: create (multipart or JSON), retrieve, list, delete (cancels work), content (with
//! `Range`), remix, and the x2v `events` SSE stream.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::Extension;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};
use x2v_core::JobId;
use x2v_queue::{JobRecord, JobStatus, ListQuery, Order, Resource};

use crate::error::ApiError;
use crate::request::Form;
use crate::state::{AppState, Caller};
use crate::validate;

pub const POLL_AFTER: &str = "openai-poll-after-ms";

/// Parses a `video_...` path id; anything else is simply not found.
pub fn video_id(s: &str) -> Result<JobId, ApiError> {
    JobId::parse_prefixed(s, "video").map_err(|_| ApiError::not_found("video", s))
}

fn status_text(s: JobStatus) -> &'static str {
    match s {
        // Cancelled jobs are deleted; should one be seen, it did not complete.
        JobStatus::Cancelled => "failed",
        other => other.as_str(),
    }
}

/// The OpenAI `video` object, plus x2v's stage detail under `x2v`.
pub fn video_json(rec: &JobRecord, finished_ttl_s: u64) -> Value {
    let spec = &rec.spec;
    let finished = rec.finished_at_ms.map(|ms| ms / 1000);
    json!({
        "id": rec.public_id(),
        "object": "video",
        "model": spec.model,
        "status": status_text(rec.status),
        "progress": rec.progress,
        "created_at": rec.created_at_ms / 1000,
        "completed_at": finished,
        "expires_at": finished.filter(|_| rec.status == JobStatus::Completed).map(|f| f + finished_ttl_s),
        "prompt": spec.prompt,
        "size": spec.size.to_string(),
        "seconds": spec.seconds.to_string(),
        "remixed_from_video_id": spec.remixed_from,
        "error": rec.error.as_ref().map(|e| json!({"code": e.code, "message": e.message})),
        "x2v": {
            "stage": rec.stage,
            "step": rec.step,
            "total_steps": rec.total_steps,
            "num_frames": spec.num_frames,
            "fps": spec.fps,
            "seed": spec.seed,
            "num_inference_steps": spec.num_inference_steps,
            "ranks": rec.ranks,
            "attempts": rec.attempts,
        },
    })
}

fn with_poll(state: &AppState, rec: &JobRecord, body: Value) -> Response {
    let mut resp = axum::Json(body).into_response();
    if !rec.status.is_terminal() {
        resp.headers_mut().insert(POLL_AFTER, HeaderValue::from(state.config.http.poll_after_ms));
    }
    resp
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Ok(s) if !s.is_empty() && s.len() <= 256 => Ok(Some(s.to_owned())),
            _ => Err(ApiError::invalid(
                "Idempotency-Key",
                "`Idempotency-Key` must be 1 to 256 visible ASCII characters.",
            )),
        },
    }
}

pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let form = Form::read(&headers, req).await?;
    let v = validate::video(&form, &state.config.models)?;
    let created = state.admit(v, key.as_deref(), &caller).await?;
    let rec = created.record;
    Ok(with_poll(&state, &rec, video_json(&rec, state.config.queue.finished_ttl_s)))
}

pub async fn retrieve(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = video_id(&id)?;
    let rec = state.queue.get(job).await.map_err(|e| not_found_as(e, &id))?;
    Ok(with_poll(&state, &rec, video_json(&rec, state.config.queue.finished_ttl_s)))
}

fn not_found_as(e: x2v_queue::QueueError, id: &str) -> ApiError {
    match e {
        x2v_queue::QueueError::NotFound(_) => ApiError::not_found("video", id),
        other => other.into(),
    }
}

pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let limit = match q.get("limit").map(String::as_str) {
        None | Some("") => 20,
        Some(l) => l.parse::<usize>().ok().filter(|l| *l <= 100).ok_or_else(|| {
            ApiError::invalid(
                "limit",
                format!("`limit` must be an integer from 0 to 100; got \"{l}\"."),
            )
        })?,
    };
    let order = match q.get("order").map(String::as_str) {
        None | Some("") | Some("desc") => Order::Desc,
        Some("asc") => Order::Asc,
        Some(o) => {
            return Err(ApiError::invalid(
                "order",
                format!("`order` must be asc or desc; got \"{o}\"."),
            ));
        }
    };
    let after = match q.get("after").filter(|a| !a.is_empty()) {
        None => None,
        Some(a) => Some(JobId::parse_prefixed(a, "video").map_err(|_| {
            ApiError::invalid(
                "after",
                format!("`after` must be a video id from an earlier page; got \"{a}\"."),
            )
        })?),
    };
    let page =
        state.queue.list(ListQuery { resource: Resource::Video, after, limit, order }).await?;
    let data: Vec<Value> =
        page.jobs.iter().map(|r| video_json(r, state.config.queue.finished_ttl_s)).collect();
    Ok(axum::Json(json!({
        "object": "list",
        "first_id": page.jobs.first().map(JobRecord::public_id),
        "last_id": page.jobs.last().map(JobRecord::public_id),
        "has_more": page.has_more,
        "data": data,
    }))
    .into_response())
}

pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = video_id(&id)?;
    state.queue.delete(job).await.map_err(|e| not_found_as(e, &id))?;
    state.storage.delete_prefix(&job.to_string()).await?;
    Ok(axum::Json(json!({"id": id, "object": "video.deleted", "deleted": true})).into_response())
}

pub async fn content(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let job = video_id(&id)?;
    let variant = q.get("variant").map_or("video", String::as_str);
    if !["video", "thumbnail", "spritesheet"].contains(&variant) {
        return Err(ApiError::invalid(
            "variant",
            format!("`variant` must be video, thumbnail or spritesheet; got \"{variant}\"."),
        ));
    }
    let rec = state.queue.get(job).await.map_err(|e| not_found_as(e, &id))?;
    if rec.status != JobStatus::Completed {
        return Err(ApiError::invalid(
            "video_id",
            format!(
                "Video '{id}' is {}; content is available once it has completed.",
                status_text(rec.status)
            ),
        )
        .code("video_not_ready"));
    }
    let out = rec.output(variant, 0).ok_or_else(|| {
        ApiError::not_found("content", &format!("{id}?variant={variant}"))
            .code("variant_not_available")
    })?;
    super::serve_object(&state, &out.key, &out.content_type, &headers).await
}

pub async fn remix(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    let source = state.queue.get(video_id(&id)?).await.map_err(|e| not_found_as(e, &id))?;
    let key = idempotency_key(&headers)?;
    let mut form = Form::read(&headers, req).await?;
    // Start from the source's settings; the request overrides what it names.
    let s = &source.spec;
    for (k, v) in [
        ("model", json!(s.model)),
        ("size", json!(s.size.to_string())),
        ("num_frames", json!(s.num_frames)),
        ("fps", json!(s.fps)),
        ("num_inference_steps", json!(s.num_inference_steps)),
        ("guidance_scale", json!(s.guidance_scale)),
        ("shift", json!(s.shift)),
        ("seed", json!(s.seed)),
        ("negative_prompt", json!(s.negative_prompt)),
    ] {
        form.fields.entry(k).or_insert(v);
    }
    for input in &s.inputs {
        let bytes = state.storage.get(&input.key).await?;
        form.uploads.push(crate::request::Upload {
            field: input.role.clone(),
            media_type: crate::request::sniff(&bytes),
            bytes,
        });
    }
    let mut v = validate::video(&form, &state.config.models)?;
    v.spec.remixed_from = Some(id);
    let rec = state.admit(v, key.as_deref(), &caller).await?.record;
    Ok(with_poll(&state, &rec, video_json(&rec, state.config.queue.finished_ttl_s)))
}

/// `GET /v1/videos/{id}/events`: the job's status and per-step progress as SSE, ending when it does.
pub async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = video_id(&id)?;
    let stream = state.queue.subscribe(job).await.map_err(|e| not_found_as(e, &id))?;
    let public = id.clone();
    let events = stream.map(move |ev| {
        let data = json!({
            "type": format!("video.{}", ev.kind),
            "id": public,
            "status": status_text(ev.status),
            "stage": ev.stage,
            "progress": ev.progress,
            "step": ev.step,
            "total_steps": ev.total_steps,
        });
        Ok::<_, Infallible>(
            Event::default().event(format!("video.{}", ev.kind)).data(data.to_string()),
        )
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// Parses a single `bytes=` range against `len`.
pub fn parse_range(value: &str, len: u64) -> Result<std::ops::Range<u64>, ApiError> {
    let unsatisfiable = || {
        ApiError::invalid(
            "Range",
            format!(
                "Range `{value}` is not satisfiable for {len} bytes (one `bytes=` range allowed)."
            ),
        )
        .status(StatusCode::RANGE_NOT_SATISFIABLE)
    };
    let spec =
        value.strip_prefix("bytes=").filter(|s| !s.contains(',')).ok_or_else(unsatisfiable)?;
    let (a, b) = spec.split_once('-').ok_or_else(unsatisfiable)?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().map_err(|_| unsatisfiable())?;
            (len.saturating_sub(n), len)
        }
        (s, "") => (s.parse().map_err(|_| unsatisfiable())?, len),
        (s, e) => (
            s.parse().map_err(|_| unsatisfiable())?,
            e.parse::<u64>().map_err(|_| unsatisfiable())?.saturating_add(1).min(len),
        ),
    };
    if start >= end || start >= len {
        return Err(unsatisfiable());
    }
    Ok(start..end)
}

pub fn content_headers(resp: &mut Response, media_type: &str) {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(media_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100).unwrap(), 0..10);
        assert_eq!(parse_range("bytes=90-", 100).unwrap(), 90..100);
        assert_eq!(parse_range("bytes=-5", 100).unwrap(), 95..100);
        assert_eq!(parse_range("bytes=50-500", 100).unwrap(), 50..100);
        for bad in ["bytes=100-", "bytes=5-2", "items=0-1", "bytes=0-1,3-4", "bytes=x-"] {
            assert_eq!(parse_range(bad, 100).unwrap_err().http_status(), 416, "{bad}");
        }
    }
}
