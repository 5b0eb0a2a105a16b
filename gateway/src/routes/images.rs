//! `/v1/images/generations` and `/v1/images/edits`: admit a job, wait for it, answer `b64_json` or
//! `url` items, or stream SSE: `*.partial_image` for every preview the DiT stage recorded while
//! denoising (`partial_images` per image, genuine looks at the image being made), then
//! `*.completed` per image; an `error` event on failure. Image jobs run
//! through the same queue as videos; `GET /v1/images/{id}/content` serves `url` answers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::Extension;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;
use x2v_core::{ErrorKind, JobErrorCode, JobId};
use x2v_queue::{JobRecord, JobStatus, PREVIEW_VARIANT, Size, preview_of};

use crate::error::ApiError;
use crate::openapi::ErrorResponses;
use crate::params::{CreateImageRequest, EditImageRequest, ResponseFormat};
use crate::request::Form;
use crate::state::{AppState, Caller};
use crate::validate::{self, ImageOptions, Validated};

/// The answer to an image request that does not stream.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImagesResponse<'a> {
    /// Unix seconds.
    pub created: u64,
    pub data: Vec<Image>,
    pub output_format: &'a str,
    /// `WIDTHxHEIGHT`.
    #[schema(value_type = String)]
    pub size: Size,
    pub x2v: ImagesDetail,
}

/// One made image: its bytes or where to fetch them, as `response_format` asked.
#[derive(Debug, Serialize, ToSchema)]
pub struct Image {
    /// The image, base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64_json: Option<String>,
    /// Where to fetch the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// x2v's detail of an image job.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImagesDetail {
    /// The job's id (`image_...`), for its files under `/v1/images/{image_id}/content`.
    pub id: String,
    pub seed: u64,
}

/// Generate images.
///
/// The request waits for the images (up to the gateway's `image_timeout_s`), or with `stream`
/// answers server-sent events: previews while denoising, then each image.
#[utoipa::path(
    post,
    path = "/v1/images/generations",
    operation_id = "createImage",
    params(("Idempotency-Key" = Option<String>, Header)),
    request_body(content(
        (CreateImageRequest = "application/json"),
        (CreateImageRequest = "multipart/form-data"),
    )),
    responses(
        (status = 200, description = "The images, or with `stream` their events", content(
            (ImagesResponse = "application/json"),
            ("text/event-stream"),
        )),
        ErrorResponses,
    ),
)]
pub async fn generations(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    let form = Form::read(&headers, req).await?;
    let (v, options) =
        validate::image_generation(CreateImageRequest::read(&form)?, &state.config.models)?;
    answer(state, caller, headers, v, options, "image_generation").await
}

/// Edit images.
///
/// Like a generation, from one or more input images and optionally a mask.
#[utoipa::path(
    post,
    path = "/v1/images/edits",
    operation_id = "createImageEdit",
    params(("Idempotency-Key" = Option<String>, Header)),
    request_body(content((EditImageRequest = "multipart/form-data"))),
    responses(
        (status = 200, description = "The images, or with `stream` their events", content(
            (ImagesResponse = "application/json"),
            ("text/event-stream"),
        )),
        ErrorResponses,
    ),
)]
pub async fn edits(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    let form = Form::read(&headers, req).await?;
    let (v, options) = validate::image_edit(EditImageRequest::read(&form)?, &state.config.models)?;
    answer(state, caller, headers, v, options, "image_edit").await
}

/// Admits the job, then waits for its images or streams them.
async fn answer(
    state: AppState,
    caller: Caller,
    headers: HeaderMap,
    v: Validated,
    options: ImageOptions,
    prefix: &'static str,
) -> Result<Response, ApiError> {
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok());
    let rec = state.admit(v, key, &caller).await?.record;
    let base = public_base(&state, &headers);
    if options.stream {
        return Ok(stream(state, rec.id, options, base, prefix).into_response());
    }
    let done = wait(&state, rec.id).await?;
    if let Some(e) = failure(&done) {
        return Err(e);
    }
    let mut data = Vec::with_capacity(done.spec.n as usize);
    for i in 0..done.spec.n {
        data.push(item(&state, &done, i, &options, &base).await?);
    }
    Ok(axum::Json(ImagesResponse {
        created: done.created_at_ms / 1000,
        data,
        output_format: &done.spec.output_format,
        size: done.spec.size,
        x2v: ImagesDetail { id: done.public_id(), seed: done.spec.seed },
    })
    .into_response())
}

fn public_base(state: &AppState, headers: &HeaderMap) -> String {
    if !state.config.public_url.is_empty() {
        return state.config.public_url.trim_end_matches('/').to_owned();
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
    format!("http://{host}")
}

/// Waits until the job is terminal, up to the configured timeout.
async fn wait(state: &AppState, id: JobId) -> Result<JobRecord, ApiError> {
    let timeout = Duration::from_secs(state.config.http.image_timeout_s);
    let mut events = state.queue.subscribe(id).await?;
    let finished = tokio::time::timeout(timeout, async {
        while let Some(ev) = events.next().await {
            if ev.status.is_terminal() {
                return true;
            }
        }
        false
    })
    .await;
    match finished {
        Ok(_) => Ok(state.queue.get(id).await?),
        Err(_) => Err(ApiError::new(
            ErrorKind::DeadlineExceeded,
            format!(
                "Image job image_{id} did not finish within {} s; it keeps running.",
                timeout.as_secs()
            ),
        )),
    }
}

/// The error a finished but unsuccessful job answers with: its recorded kind decides the status
/// and `type` (a job refused for its input is a 400, like a request refused at the edge).
fn failure(rec: &JobRecord) -> Option<ApiError> {
    match rec.status {
        JobStatus::Completed => None,
        _ => {
            let (kind, code, message) = rec.error.as_ref().map_or(
                (ErrorKind::Internal, JobErrorCode::Cancelled, "The job was cancelled."),
                |e| (e.kind, e.code, e.message.as_str()),
            );
            Some(
                ApiError::new(kind, format!("Image generation failed: {message}"))
                    .code(code.as_str()),
            )
        }
    }
}

async fn item(
    state: &AppState,
    rec: &JobRecord,
    index: u32,
    options: &ImageOptions,
    base: &str,
) -> Result<Image, ApiError> {
    let out = rec.output("image", index).ok_or_else(|| {
        ApiError::new(
            ErrorKind::Internal,
            format!("Job {} completed without image {index}.", rec.public_id()),
        )
    })?;
    if options.response_format == ResponseFormat::Url {
        let url = format!("{base}/v1/images/{}/content?index={index}", rec.public_id());
        return Ok(Image { b64_json: None, url: Some(url) });
    }
    let bytes = state.storage.get(&out.key).await?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    Ok(Image { b64_json: Some(b64), url: None })
}

fn stream(
    state: AppState,
    id: JobId,
    options: ImageOptions,
    base: String,
    prefix: &'static str,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let events = async_stream(state, id, options, base, prefix);
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

fn async_stream(
    state: AppState,
    id: JobId,
    options: ImageOptions,
    base: String,
    prefix: &'static str,
) -> impl futures::Stream<Item = Result<Event, Infallible>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(16);
    tokio::spawn(async move {
        let result = async {
            let mut partials = Partials::new(&state, &tx, prefix);
            let mut events = state.queue.subscribe(id).await?;
            while let Some(ev) = events.next().await {
                if ev.status.is_terminal() {
                    break;
                }
                if ev.kind == "partial" {
                    partials.send_new(&state.queue.get(id).await?).await?;
                    continue;
                }
                // Progress as SSE comments: clients skip them, proxies see a live stream.
                let _ =
                    tx.send(Event::default().comment(format!("progress {}", ev.progress))).await;
            }
            let done = state.queue.get(id).await?;
            if let Some(e) = failure(&done) {
                return Err(e);
            }
            // Previews recorded before this stream subscribed still come first.
            partials.send_new(&done).await?;
            let b64 = ImageOptions { response_format: ResponseFormat::B64Json, ..options.clone() };
            for i in 0..done.spec.n {
                let image = item(&state, &done, i, &b64, &base).await?;
                let mut data = serde_json::to_value(image).expect("an image serializes");
                let kind = format!("{prefix}.completed");
                let mut fields = event_fields(&kind, &done);
                fields["image_index"] = json!(i);
                fields["usage"] = json!({"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                    "input_tokens_details": {"text_tokens": 0, "image_tokens": 0}});
                merge(&mut data, fields);
                let _ = tx.send(Event::default().event(kind).data(data.to_string())).await;
            }
            Ok::<(), ApiError>(())
        }
        .await;
        if let Err(e) = result {
            let mut body = e.body();
            body["type"] = json!("error");
            let _ = tx.send(Event::default().event("error").data(body.to_string())).await;
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok)
}

/// The fields every image event carries.
fn event_fields(kind: &str, rec: &JobRecord) -> Value {
    json!({
        "type": kind, "created_at": rec.created_at_ms / 1000, "size": rec.spec.size.to_string(),
        "quality": "auto", "background": "auto", "output_format": rec.spec.output_format,
    })
}

fn merge(data: &mut Value, fields: Value) {
    if let (Value::Object(d), Value::Object(f)) = (data, fields) {
        d.extend(f);
    }
}

/// The `*.partial_image` events of one stream: each preview the DiT recorded, once, in the order
/// recorded (a job that moved to another DiT rank records its previews again; each is sent once).
struct Partials<'a> {
    state: &'a AppState,
    tx: &'a tokio::sync::mpsc::Sender<Event>,
    kind: String,
    sent: std::collections::HashSet<u32>,
}

impl<'a> Partials<'a> {
    fn new(state: &'a AppState, tx: &'a tokio::sync::mpsc::Sender<Event>, prefix: &str) -> Self {
        let kind = format!("{prefix}.partial_image");
        Partials { state, tx, kind, sent: Default::default() }
    }

    async fn send_new(&mut self, rec: &JobRecord) -> Result<(), ApiError> {
        for out in rec.outputs.iter().filter(|o| o.variant == PREVIEW_VARIANT) {
            if !self.sent.insert(out.index) {
                continue;
            }
            let bytes = self.state.storage.get(&out.key).await?;
            let (image, index) = preview_of(out.index);
            let mut data =
                json!({"b64_json": base64::engine::general_purpose::STANDARD.encode(&bytes)});
            let mut fields = event_fields(&self.kind, rec);
            fields["partial_image_index"] = json!(index);
            fields["image_index"] = json!(image);
            merge(&mut data, fields);
            let _ = self
                .tx
                .send(Event::default().event(self.kind.clone()).data(data.to_string()))
                .await;
        }
        Ok(())
    }
}

/// Download a finished image (the target of `url` answers; one `Range` honoured).
#[utoipa::path(
    get,
    path = "/v1/images/{image_id}/content",
    operation_id = "downloadImageContent",
    params(
        ("image_id" = String, Path),
        ("index" = Option<u32>, Query, description = "Which image of the job (absent: 0)"),
    ),
    responses(
        (status = 200, description = "The image", content_type = "application/octet-stream"),
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
    let job = JobId::parse_prefixed(&id, "image").map_err(|_| ApiError::not_found("image", &id))?;
    let index: u32 = match q.get("index") {
        None => 0,
        Some(i) => i.parse().map_err(|_| {
            ApiError::invalid(
                "index",
                format!("`index` must be a non-negative integer; got \"{i}\"."),
            )
        })?,
    };
    let rec = state.queue.get(job).await.map_err(|_| ApiError::not_found("image", &id))?;
    let out = rec
        .output("image", index)
        .filter(|_| rec.status == JobStatus::Completed)
        .ok_or_else(|| ApiError::not_found("image", &format!("{id}?index={index}")))?;
    super::serve_object(&state, &out.key, &out.content_type, &headers).await
}
