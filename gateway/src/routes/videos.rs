//! `/v1/videos`: create (multipart or JSON), retrieve, list, delete (cancels work), content (with
//! `Range`), remix, edits (video-to-video), extensions, and the x2v `events` SSE stream.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::Extension;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Serialize;
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use x2v_core::{ErrorKind, JobId};
use x2v_queue::{JobRecord, JobStatus, ListQuery, Order, Ranks, Resource, Size, Stage};

use crate::error::ApiError;
use crate::openapi::ErrorResponses;
use crate::params::{CreateVideoRequest, EditVideoRequest, ExtendVideoRequest, VideoSource};
use crate::request::{Choice, Form, choice, choice_enum};
use crate::state::{AppState, Caller};
use crate::validate;

pub const POLL_AFTER: &str = "openai-poll-after-ms";

/// Parses a `video_...` path id; anything else is simply not found.
pub fn video_id(s: &str) -> Result<JobId, ApiError> {
    JobId::parse_prefixed(s, "video").map_err(|_| ApiError::not_found("video", s))
}

/// Where a video is, as the OpenAI API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VideoStatus {
    Queued,
    InProgress,
    Completed,
    Failed,
}

impl From<JobStatus> for VideoStatus {
    fn from(s: JobStatus) -> Self {
        match s {
            JobStatus::Queued => VideoStatus::Queued,
            JobStatus::InProgress => VideoStatus::InProgress,
            JobStatus::Completed => VideoStatus::Completed,
            // Cancelled jobs are deleted; should one be seen, it did not complete.
            JobStatus::Failed | JobStatus::Cancelled => VideoStatus::Failed,
        }
    }
}

fn status_text(s: JobStatus) -> &'static str {
    match VideoStatus::from(s) {
        VideoStatus::Queued => "queued",
        VideoStatus::InProgress => "in_progress",
        VideoStatus::Completed => "completed",
        VideoStatus::Failed => "failed",
    }
}

/// The OpenAI `video` object, plus x2v's stage detail under `x2v`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Video<'a> {
    /// `video_` and 32 hex digits.
    pub id: String,
    /// Always `video`.
    pub object: &'static str,
    pub model: &'a str,
    pub status: VideoStatus,
    /// Percent done.
    pub progress: u8,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds the video completed or failed at.
    pub completed_at: Option<u64>,
    /// Unix seconds after which a completed video's content is gone.
    pub expires_at: Option<u64>,
    pub prompt: &'a str,
    /// `WIDTHxHEIGHT`.
    #[schema(value_type = String)]
    pub size: Size,
    /// Clip length in whole seconds, as text.
    #[serde(serialize_with = "as_text")]
    #[schema(value_type = String)]
    pub seconds: u32,
    pub remixed_from_video_id: Option<&'a str>,
    /// Why the video failed.
    pub error: Option<VideoError<'a>>,
    pub x2v: VideoDetail,
}

/// Why a video failed.
#[derive(Debug, Serialize, ToSchema)]
pub struct VideoError<'a> {
    /// A stable code (`invalid_image`, `internal_error`, ...).
    pub code: &'static str,
    pub message: &'a str,
}

/// x2v's detail of a video job: its stage, step and the engines it runs on.
#[derive(Debug, Serialize, ToSchema)]
pub struct VideoDetail {
    /// `t2v`, `i2v` or `v2v` (an edit).
    pub task: x2v_queue::Task,
    /// An edit's strength (how far its input video was noised); null for other videos.
    pub strength: Option<f64>,
    /// An extension: the frames of its input video it starts with (`num_frames` new ones follow,
    /// less the first); null for other videos.
    pub extend_frames: Option<u32>,
    /// The stage the job waits for or runs in; null once finished.
    pub stage: Option<Stage>,
    /// Denoising step of the running stage.
    pub step: u32,
    pub total_steps: u32,
    pub num_frames: u32,
    pub fps: u32,
    pub seed: u64,
    pub num_inference_steps: u32,
    /// Engine ranks assigned per stage (null: any live worker of the stage).
    pub ranks: Ranks,
    /// Stage claims so far, redeliveries included.
    pub attempts: u32,
}

fn as_text<S: serde::Serializer>(v: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl<'a> Video<'a> {
    pub fn of(rec: &'a JobRecord, finished_ttl_s: u64) -> Self {
        let spec = &rec.spec;
        let finished = rec.finished_at_ms.map(|ms| ms / 1000);
        Video {
            id: rec.public_id(),
            object: "video",
            model: &spec.model,
            status: rec.status.into(),
            progress: rec.progress,
            created_at: rec.created_at_ms / 1000,
            completed_at: finished,
            expires_at: finished
                .filter(|_| rec.status == JobStatus::Completed)
                .map(|f| f + finished_ttl_s),
            prompt: &spec.prompt,
            size: spec.size,
            seconds: spec.seconds,
            remixed_from_video_id: spec.remixed_from.as_deref(),
            error: rec
                .error
                .as_ref()
                .map(|e| VideoError { code: e.code.as_str(), message: &e.message }),
            x2v: VideoDetail {
                task: spec.task,
                strength: spec.strength,
                extend_frames: spec.extend_frames,
                stage: rec.stage,
                step: rec.step,
                total_steps: rec.total_steps,
                num_frames: spec.num_frames,
                fps: spec.fps,
                seed: spec.seed,
                num_inference_steps: spec.num_inference_steps,
                ranks: rec.ranks,
                attempts: rec.attempts,
            },
        }
    }
}

/// A page of videos.
#[derive(Debug, Serialize, ToSchema)]
pub struct VideoList<'a> {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<Video<'a>>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    /// Whether a later page exists (ask with `after` = `last_id`).
    pub has_more: bool,
}

/// The answer to a delete.
#[derive(Debug, Serialize, ToSchema)]
pub struct VideoDeleted {
    pub id: String,
    /// Always `video.deleted`.
    pub object: &'static str,
    pub deleted: bool,
}

/// The video answer, with `openai-poll-after-ms` while the job is not finished.
fn with_poll(state: &AppState, rec: &JobRecord) -> Response {
    let mut resp = axum::Json(Video::of(rec, state.config.queue.finished_ttl_s)).into_response();
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

/// `POST /v1/videos/characters`: an endpoint of the OpenAI video API that x2v does not serve; 404
/// `unsupported_endpoint`, saying so.
pub async fn not_served() -> ApiError {
    ApiError::new(
        ErrorKind::NotFound,
        "Reusable characters (`POST /v1/videos/characters`) are not supported: no model x2v \
         serves takes a character reference.",
    )
    .code("unsupported_endpoint")
}

/// Edit a video (video-to-video).
///
/// The input video (an uploaded H.264 MP4, or a completed video by id) is encoded, noised to
/// `strength` and denoised toward the prompt; the job is queued at once, like a create.
#[utoipa::path(
    post,
    path = "/v1/videos/edits",
    operation_id = "editVideo",
    params(("Idempotency-Key" = Option<String>, Header, description = "1 to 256 visible ASCII characters")),
    request_body(content(
        (EditVideoRequest = "multipart/form-data"),
        (EditVideoRequest = "application/json"),
    )),
    responses((status = 200, description = "The queued edit", body = Video), ErrorResponses),
)]
pub async fn edit(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let form = Form::read(&headers, req).await?;
    let req = EditVideoRequest::read(&form)?;
    let source = source_video(&state, &req.video).await?;
    let v = validate::video_edit(req, source, &state.config.models)?;
    let created = state.admit(v, key.as_deref(), &caller).await?;
    Ok(with_poll(&state, &created.record))
}

/// Extend a video.
///
/// Continues the input video (an uploaded H.264 MP4, or a completed video by id) with
/// image-to-video from its last frame; the result is the whole video, and its `seconds` the
/// total. The job is queued at once, like a create.
#[utoipa::path(
    post,
    path = "/v1/videos/extensions",
    operation_id = "extendVideo",
    params(("Idempotency-Key" = Option<String>, Header, description = "1 to 256 visible ASCII characters")),
    request_body(content(
        (ExtendVideoRequest = "multipart/form-data"),
        (ExtendVideoRequest = "application/json"),
    )),
    responses((status = 200, description = "The queued extension", body = Video), ErrorResponses),
)]
pub async fn extend(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let form = Form::read(&headers, req).await?;
    let req = ExtendVideoRequest::read(&form)?;
    let source = source_video(&state, &req.video).await?;
    let v = validate::video_extension(req, source, &state.config.models)?;
    let created = state.admit(v, key.as_deref(), &caller).await?;
    Ok(with_poll(&state, &created.record))
}

/// The input video of an edit or extension, with its header read (off the async threads).
async fn source_video(
    state: &AppState,
    video: &VideoSource,
) -> Result<validate::SourceVideo, ApiError> {
    let upload = match video {
        VideoSource::Upload(up) => up.clone(),
        VideoSource::Id(id) => completed_video(state, id).await?,
    };
    let bytes = upload.bytes.clone();
    let info = tokio::task::spawn_blocking(move || x2v_media::probe_mp4(&bytes))
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, format!("probing the video: {e}")))?
        .map_err(|e| ApiError::invalid("video", format!("`video` is not usable: {e}.")))?;
    Ok(validate::SourceVideo { upload, info })
}

/// The MP4 of completed video `id`, as an upload of a new job (a copy: deleting the source does
/// not take it from the job).
async fn completed_video(state: &AppState, id: &str) -> Result<crate::request::Upload, ApiError> {
    let bad = |m: String| ApiError::invalid("video", m);
    let job = JobId::parse_prefixed(id, "video")
        .map_err(|_| bad(format!("`video.id` must be a video id (video_...); got \"{id}\".")))?;
    let rec = state.queue.get(job).await.map_err(|e| match e {
        x2v_queue::QueueError::NotFound(_) => bad(format!("Video '{id}' does not exist.")),
        other => other.into(),
    })?;
    if rec.status != JobStatus::Completed {
        return Err(bad(format!(
            "Video '{id}' is {}; only a completed video can be edited or extended.",
            status_text(rec.status)
        )));
    }
    let out =
        rec.output("video", 0).ok_or_else(|| bad(format!("Video '{id}' has no MP4 to edit.")))?;
    let bytes = state.storage.get(&out.key).await?;
    Ok(crate::request::Upload {
        field: "video".into(),
        media_type: crate::request::sniff(&bytes),
        bytes,
    })
}

/// Create a video job.
///
/// The job is queued at once; poll it (`openai-poll-after-ms` says when) or follow its events.
/// An `Idempotency-Key` header makes a retry answer the job the first request made.
#[utoipa::path(
    post,
    path = "/v1/videos",
    operation_id = "createVideo",
    params(("Idempotency-Key" = Option<String>, Header, description = "1 to 256 visible ASCII characters")),
    request_body(content(
        (CreateVideoRequest = "application/json"),
        (CreateVideoRequest = "multipart/form-data"),
    )),
    responses((status = 200, description = "The queued video", body = Video), ErrorResponses),
)]
pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let form = Form::read(&headers, req).await?;
    let v = validate::video(CreateVideoRequest::read(&form)?, &state.config.models)?;
    let created = state.admit(v, key.as_deref(), &caller).await?;
    Ok(with_poll(&state, &created.record))
}

/// Retrieve a video.
#[utoipa::path(
    get,
    path = "/v1/videos/{video_id}",
    operation_id = "retrieveVideo",
    params(("video_id" = String, Path)),
    responses((status = 200, description = "The video", body = Video), ErrorResponses),
)]
pub async fn retrieve(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = video_id(&id)?;
    let rec = state.queue.get(job).await.map_err(|e| not_found_as(e, &id))?;
    Ok(with_poll(&state, &rec))
}

fn not_found_as(e: x2v_queue::QueueError, id: &str) -> ApiError {
    match e {
        x2v_queue::QueueError::NotFound(_) => ApiError::not_found("video", id),
        other => other.into(),
    }
}

/// The query of a video list.
#[derive(Debug, Default, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListVideos {
    /// A video id from an earlier page: the page after it.
    #[param(value_type = Option<String>)]
    pub after: Option<JobId>,
    /// Videos per page (absent: 20).
    #[param(minimum = 0, maximum = 100)]
    pub limit: Option<usize>,
    /// By creation time (absent: `desc`, newest first).
    #[param(inline)]
    pub order: Option<ListOrder>,
}

impl ListVideos {
    /// Reads the query; empty values count as absent.
    fn read(q: &HashMap<String, String>) -> Result<Self, ApiError> {
        let given = |key: &str| q.get(key).map(String::as_str).filter(|v| !v.is_empty());
        let limit = given("limit")
            .map(|l| {
                l.parse::<usize>().ok().filter(|l| *l <= MAX_PAGE).ok_or_else(|| {
                    ApiError::invalid(
                        "limit",
                        format!("`limit` must be an integer from 0 to {MAX_PAGE}; got \"{l}\"."),
                    )
                })
            })
            .transpose()?;
        let after = given("after")
            .map(|a| {
                JobId::parse_prefixed(a, "video").map_err(|_| {
                    ApiError::invalid(
                        "after",
                        format!("`after` must be a video id from an earlier page; got \"{a}\"."),
                    )
                })
            })
            .transpose()?;
        let order = given("order").map(|o| choice("order", o)).transpose()?;
        Ok(ListVideos { after, limit, order })
    }
}

/// Most videos per page.
const MAX_PAGE: usize = 100;

choice_enum!(
    /// Sort order of a list, by creation time.
    ListOrder { Asc = "asc", Desc = "desc" }
);

/// List videos.
#[utoipa::path(
    get,
    path = "/v1/videos",
    operation_id = "listVideos",
    params(ListVideos),
    responses((status = 200, description = "A page of videos", body = VideoList), ErrorResponses),
)]
pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let q = ListVideos::read(&q)?;
    let order = match q.order {
        Some(ListOrder::Asc) => Order::Asc,
        Some(ListOrder::Desc) | None => Order::Desc,
    };
    let query = ListQuery {
        resource: Resource::Video,
        after: q.after,
        limit: q.limit.unwrap_or(20),
        order,
    };
    let page = state.queue.list(query).await?;
    let ttl = state.config.queue.finished_ttl_s;
    Ok(axum::Json(VideoList {
        object: "list",
        first_id: page.jobs.first().map(JobRecord::public_id),
        last_id: page.jobs.last().map(JobRecord::public_id),
        has_more: page.has_more,
        data: page.jobs.iter().map(|r| Video::of(r, ttl)).collect(),
    })
    .into_response())
}

/// Delete a video: its queued or running work is cancelled, its files removed.
#[utoipa::path(
    delete,
    path = "/v1/videos/{video_id}",
    operation_id = "deleteVideo",
    params(("video_id" = String, Path)),
    responses((status = 200, description = "Deleted", body = VideoDeleted), ErrorResponses),
)]
pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = video_id(&id)?;
    state.queue.delete(job).await.map_err(|e| not_found_as(e, &id))?;
    state.storage.delete_prefix(&job.to_string()).await?;
    Ok(axum::Json(VideoDeleted { id, object: "video.deleted", deleted: true }).into_response())
}

choice_enum!(
    /// Which file of a completed video to download: the MP4, a still of it, or its frames in one
    /// image.
    Variant { Video = "video", Thumbnail = "thumbnail", Spritesheet = "spritesheet" }
);

/// The query of a content download.
#[derive(Debug, Default, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ContentQuery {
    /// Absent: `video`.
    #[param(inline)]
    pub variant: Option<Variant>,
}

impl ContentQuery {
    fn read(q: &HashMap<String, String>) -> Result<Self, ApiError> {
        Ok(ContentQuery { variant: q.get("variant").map(|v| choice("variant", v)).transpose()? })
    }
}

/// Download video content (one `Range` honoured).
#[utoipa::path(
    get,
    path = "/v1/videos/{video_id}/content",
    operation_id = "downloadVideoContent",
    params(("video_id" = String, Path), ContentQuery),
    responses(
        (status = 200, description = "The file", content_type = "application/octet-stream"),
        (status = 206, description = "The requested range", content_type = "application/octet-stream"),
        (status = 416, description = "The range is not satisfiable", body = crate::error::ErrorEnvelope),
        ErrorResponses,
    ),
)]
pub async fn content(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let job = video_id(&id)?;
    let variant = ContentQuery::read(&q)?.variant.unwrap_or(Variant::Video).as_str();
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

/// Remix a video: a new job with the source's settings, overridden by the fields given.
#[utoipa::path(
    post,
    path = "/v1/videos/{video_id}/remix",
    operation_id = "remixVideo",
    params(
        ("video_id" = String, Path),
        ("Idempotency-Key" = Option<String>, Header, description = "1 to 256 visible ASCII characters"),
    ),
    request_body(content(
        (CreateVideoRequest = "application/json"),
        (CreateVideoRequest = "multipart/form-data"),
    )),
    responses((status = 200, description = "The queued remix", body = Video), ErrorResponses),
)]
pub async fn remix(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    let source = state.queue.get(video_id(&id)?).await.map_err(|e| not_found_as(e, &id))?;
    if source.spec.task == x2v_queue::Task::V2v || source.spec.extend_frames.is_some() {
        return Err(ApiError::invalid(
            "video_id",
            format!(
                "Video '{id}' is an edit or an extension of another video; remix re-runs text- and \
                 image-to-video jobs. Edit or extend its source again instead."
            ),
        ));
    }
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
    if let Some(g) = s.guidance_scale_2 {
        form.fields.entry("guidance_scale_2").or_insert(json!(g));
    }
    if !s.loras.is_empty() {
        form.fields.entry("lora").or_insert(json!(s.loras));
    }
    for input in &s.inputs {
        let bytes = state.storage.get(&input.key).await?;
        form.uploads.push(crate::request::Upload {
            field: input.role.clone(),
            media_type: crate::request::sniff(&bytes),
            bytes,
        });
    }
    let mut v = validate::video(CreateVideoRequest::read(&form)?, &state.config.models)?;
    v.spec.remixed_from = Some(id);
    let rec = state.admit(v, key.as_deref(), &caller).await?.record;
    Ok(with_poll(&state, &rec))
}

/// Status and progress events of a video (SSE), ending when the video does.
///
/// Each event is `video.status` or `video.progress`, its data the status, stage, progress and
/// step.
#[utoipa::path(
    get,
    path = "/v1/videos/{video_id}/events",
    operation_id = "videoEvents",
    params(("video_id" = String, Path)),
    responses((status = 200, description = "Event stream", content_type = "text/event-stream"), ErrorResponses),
)]
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
