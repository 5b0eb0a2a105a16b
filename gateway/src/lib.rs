//! x2v-gateway: the OpenAI-compatible HTTP API (`/v1/videos`, `/v1/images/...`) over the durable
//! job queue of `x2v-queue` (Redis, or in-memory for the embedded mode), with engine-rank
//! assignment, output storage, API keys, rate limits and Prometheus metrics.
//!
//! [`run`] is the whole service: connect the queue and storage from [`GatewayConfig`], serve on the
//! given listener until `shutdown` fires. Tests build an [`AppState`] themselves and call [`router`].
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod limit;
pub mod middleware;
pub mod openapi;
pub mod overload;
pub mod params;
pub mod request;
pub mod routes;
pub mod state;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, header};
use axum::middleware::from_fn_with_state;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use x2v_queue::storage::Storage;
use x2v_queue::{MemoryQueue, Queue, QueueBackend, QueueError, RedisQueue, Retention};

pub use config::GatewayConfig;
pub use state::AppState;

use routes::{images, ops, videos};

/// Why the gateway could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("job queue: {0}")]
    Queue(#[from] QueueError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("serving HTTP: {0}")]
    Io(#[from] std::io::Error),
}

impl GatewayError {
    pub fn kind(&self) -> x2v_core::ErrorKind {
        match self {
            GatewayError::Queue(e) => e.kind(),
            GatewayError::Config(_) => x2v_core::ErrorKind::InvalidRequest,
            GatewayError::Io(_) => x2v_core::ErrorKind::Unavailable,
        }
    }
}

/// The queue backend the configuration names.
pub async fn connect_queue(config: &GatewayConfig) -> Result<Arc<dyn Queue>, GatewayError> {
    let q = &config.queue;
    let retention = Retention {
        finished_ttl: Duration::from_secs(q.finished_ttl_s),
        idempotency_ttl: Duration::from_secs(q.idempotency_ttl_s),
        ..Retention::default()
    };
    match q.backend {
        QueueBackend::Redis => {
            Ok(Arc::new(RedisQueue::connect(q.redis_url.expose(), &q.prefix, retention).await?))
        }
        QueueBackend::Memory => Ok(Arc::new(MemoryQueue::new(retention))),
    }
}

/// Connects the queue and storage and serves until `shutdown`.
pub async fn run(
    config: GatewayConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    if config.models.is_empty() {
        return Err(GatewayError::Config(
            "at least one model must be configured under [[models]]".into(),
        ));
    }
    let queue = connect_queue(&config).await?;
    let storage = Storage::from_config(&config.storage)?;
    serve(AppState::new(config, queue, storage), listener, shutdown).await
}

/// Serves `state` on `listener`, running queue maintenance alongside, until `shutdown`.
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let maintenance = tokio::spawn(maintain(
        state.queue.clone(),
        state.config.queue.maintain_interval_ms,
        shutdown.clone(),
    ));
    tracing::info!(addr = ?listener.local_addr().ok(), "gateway listening");
    let result = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await;
    shutdown.cancel();
    let _ = maintenance.await;
    Ok(result?)
}

/// Expires leases and reassigns dead ranks' work periodically.
async fn maintain(queue: Arc<dyn Queue>, every_ms: u64, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(every_ms.max(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => match queue.maintain().await {
                Ok(m) if m != Default::default() => tracing::info!(?m, "queue maintenance"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "queue maintenance failed"),
            },
        }
    }
}

/// The API's routes in their pools, and the document they make.
pub struct Api {
    /// Short requests: create, status, list, cancel, downloads, models.
    pub short: Router<AppState>,
    /// Image requests, which wait for their image.
    pub waits: Router<AppState>,
    /// Probes, open to all.
    pub probes: Router<AppState>,
    pub document: utoipa::openapi::OpenApi,
}

/// Every documented route, each registered with its operation.
pub fn api() -> Api {
    let (short, short_doc) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(videos::create, videos::list))
        .routes(routes!(videos::retrieve, videos::delete))
        .routes(routes!(videos::content))
        .routes(routes!(videos::remix))
        .routes(routes!(videos::edit))
        .routes(routes!(videos::extend))
        .routes(routes!(videos::events))
        .routes(routes!(images::content))
        .routes(routes!(ops::models))
        .split_for_parts();
    // The OpenAI video endpoint x2v does not serve: a clear answer instead of a method mismatch on
    // `/v1/videos/{video_id}`. Not in the OpenAPI document, which lists what is served.
    let short = short.route("/v1/videos/characters", axum::routing::post(videos::not_served));
    let (waits, waits_doc) = OpenApiRouter::new()
        .routes(routes!(images::generations))
        .routes(routes!(images::edits))
        .split_for_parts();
    let (probes, probes_doc) = OpenApiRouter::new()
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .split_for_parts();
    let mut document = short_doc;
    document.merge(waits_doc);
    document.merge(probes_doc);
    openapi::flatten_objects(&mut document);
    Api { short, waits, probes, document }
}

/// Every route with its layers.
pub fn router(state: AppState) -> Router {
    let http = &state.config.http;
    let timeout =
        (http.request_timeout_ms > 0).then(|| Duration::from_millis(http.request_timeout_ms));
    let Api { short, waits, probes, document } = api();
    // Image requests wait for their image (`http.image_timeout_s` bounds that wait, not `timeout`).
    let api = overload::protect(short, http.max_concurrent_requests, timeout)
        .merge(overload::protect(waits, http.max_image_requests, None))
        .route_layer(from_fn_with_state(state.clone(), middleware::authenticate));
    let document = Bytes::from(serde_json::to_vec(&document).expect("the document serializes"));
    let open = probes.route("/metrics", get(ops::metrics)).route(
        "/openapi.json",
        get(move || {
            let json = HeaderValue::from_static("application/json");
            std::future::ready(([(header::CONTENT_TYPE, json)], document.clone()))
        }),
    );
    let mut app = api
        .merge(open)
        .layer(DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(state.config.http.max_body_bytes));
    if let Some(cors) = cors(&state.config.http.cors_origins) {
        app = app.layer(cors);
    }
    app.layer(from_fn_with_state(state.clone(), middleware::request_context)).with_state(state)
}

fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let layer = CorsLayer::new().allow_methods(Any).allow_headers(Any).expose_headers(Any);
    if origins.iter().any(|o| o == "*") {
        return Some(layer.allow_origin(Any));
    }
    let list = origins.iter().filter_map(|o| o.parse().ok()).collect::<Vec<_>>();
    Some(layer.allow_origin(AllowOrigin::list(list)))
}
