//! The operations endpoints of a stage service.
//!
//! - gRPC: `grpc.health.v1.Health` (overall `""` and `x2v.stage.<stage>`, SERVING exactly while
//!   [`ServiceState::is_ready`]) and `x2v.admin.v1.Admin` (status, loaded models, drain).
//! - HTTP: `/metrics` (Prometheus text), `/healthz` (the process serves), `/readyz` (ready and the
//!   queue answers).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{Stream, StreamExt as _};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};
use x2v_core::metrics::Metrics;
use x2v_proto::admin::v1 as pb;
use x2v_proto::admin::v1::admin_server::{Admin, AdminServer};
use x2v_queue::{Queue, Stage};

use crate::state::{InFlight, LoadedModel, ServiceState, StatusSnapshot};

/// How often readiness is re-read for health `Watch` streams. The worker flips a plain flag and knows
/// nothing of gRPC; `Check` and drains are reflected at once regardless.
const HEALTH_POLL: Duration = Duration::from_millis(250);

/// How long `/readyz` and `/metrics` wait for the queue before reporting it unavailable.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(2);

/// The addresses the admin endpoints are bound to (`None`: disabled by an empty listen string).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminEndpoints {
    pub grpc: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
}

/// The gRPC health service name of a stage (`x2v.stage.dit`).
pub fn health_service_name(stage: Stage) -> String {
    format!("x2v.stage.{}", stage.as_str())
}

/// Binds the gRPC and HTTP listeners (an empty listen string disables one) and serves them until
/// `shutdown` fires; the returned task ends once both have stopped. `queue`, when given, feeds the
/// `x2v_queue_depth` gauge on every scrape and must answer `ping` for `/readyz` to pass.
pub async fn serve(
    state: Arc<ServiceState>,
    queue: Option<Arc<dyn Queue>>,
    grpc_listen: &str,
    http_listen: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<(AdminEndpoints, JoinHandle<()>)> {
    let grpc = bind(grpc_listen, "gRPC").await?;
    let http = bind(http_listen, "HTTP").await?;
    let endpoints = AdminEndpoints {
        grpc: grpc.as_ref().map(TcpListener::local_addr).transpose()?,
        http: http.as_ref().map(TcpListener::local_addr).transpose()?,
    };

    let mut servers = Vec::new();
    if let Some(listener) = grpc {
        servers.push(tokio::spawn(serve_grpc(state.clone(), listener, shutdown.clone())));
    }
    if let Some(listener) = http {
        let app = router(state, queue);
        let shutdown = shutdown.clone();
        servers.push(tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
                .context("admin HTTP server")
        }));
    }
    let task = tokio::spawn(async move {
        for server in servers {
            match server.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %format_args!("{e:#}"), "admin endpoint failed")
                }
                Err(e) => tracing::error!(error = %e, "admin endpoint task panicked"),
            }
        }
    });
    tracing::info!(grpc = ?endpoints.grpc, http = ?endpoints.http, "admin endpoints listening");
    Ok((endpoints, task))
}

async fn bind(listen: &str, what: &str) -> anyhow::Result<Option<TcpListener>> {
    if listen.is_empty() {
        return Ok(None);
    }
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the admin {what} listener on {listen}"))?;
    Ok(Some(listener))
}

async fn serve_grpc(
    state: Arc<ServiceState>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let health = Arc::new(HealthSync::new(state.clone()).await);
    let watcher = tokio::spawn(watch_readiness(health.clone(), shutdown.clone()));
    let result = tonic::transport::Server::builder()
        .add_service(HealthServer::new(StageHealth { health, shutdown: shutdown.clone() }))
        .add_service(AdminServer::new(AdminService { state }))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown.cancelled_owned(),
        )
        .await
        .context("admin gRPC server");
    watcher.abort();
    result
}

/// Mirrors [`ServiceState::is_ready`] into the health reporter, touching it only on a change so
/// `Watch` streams see each transition once.
struct HealthSync {
    state: Arc<ServiceState>,
    reporter: HealthReporter,
    service: HealthService,
    names: [String; 2],
    serving: tokio::sync::Mutex<bool>,
}

impl HealthSync {
    async fn new(state: Arc<ServiceState>) -> Self {
        let reporter = HealthReporter::new();
        let names = [String::new(), health_service_name(state.stage)];
        // The reporter starts the overall service SERVING; nothing is until the worker says so.
        for name in &names {
            reporter.set_service_status(name, ServingStatus::NotServing).await;
        }
        let service = HealthService::from_health_reporter(reporter.clone());
        HealthSync { state, reporter, service, names, serving: tokio::sync::Mutex::new(false) }
    }

    async fn sync(&self) {
        self.set(self.state.is_ready()).await;
    }

    async fn set(&self, ready: bool) {
        let mut serving = self.serving.lock().await;
        if *serving == ready {
            return;
        }
        let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
        for name in &self.names {
            self.reporter.set_service_status(name, status).await;
        }
        *serving = ready;
        tracing::info!(status = ?status, "health changed");
    }
}

async fn watch_readiness(health: Arc<HealthSync>, shutdown: CancellationToken) {
    let drain = health.state.drain.clone();
    loop {
        health.sync().await;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = drain.cancelled(), if !drain.is_cancelled() => {}
            _ = tokio::time::sleep(HEALTH_POLL) => {}
        }
    }
    health.set(false).await;
}

/// `grpc.health.v1.Health` over the reporter, reading readiness afresh on every `Check`. `Watch`
/// streams end at shutdown: the server drains open streams before it stops, and these never end on
/// their own.
struct StageHealth {
    health: Arc<HealthSync>,
    shutdown: CancellationToken,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl Health for StageHealth {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        if !self.shutdown.is_cancelled() {
            self.health.sync().await;
        }
        self.health.service.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        let stream = self.health.service.watch(request).await?.into_inner();
        let stream = stream.take_until(self.shutdown.clone().cancelled_owned());
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

/// `x2v.admin.v1.Admin`.
struct AdminService {
    state: Arc<ServiceState>,
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(
        &self,
        _: tonic::Request<pb::StatusRequest>,
    ) -> Result<tonic::Response<pb::StatusResponse>, tonic::Status> {
        Ok(tonic::Response::new(status_response(self.state.snapshot())))
    }

    async fn loaded_models(
        &self,
        _: tonic::Request<pb::LoadedModelsRequest>,
    ) -> Result<tonic::Response<pb::LoadedModelsResponse>, tonic::Status> {
        let models = self.state.snapshot().loaded.into_iter().map(loaded_model).collect();
        Ok(tonic::Response::new(pb::LoadedModelsResponse { models }))
    }

    async fn drain(
        &self,
        _: tonic::Request<pb::DrainRequest>,
    ) -> Result<tonic::Response<pb::DrainResponse>, tonic::Status> {
        let started = !self.state.drain.is_cancelled();
        self.state.drain.cancel();
        let in_flight = self.state.snapshot().in_flight.len() as u32;
        if started {
            tracing::info!(in_flight, "drain requested over the admin API");
        }
        Ok(tonic::Response::new(pb::DrainResponse { in_flight, started }))
    }
}

fn status_response(s: StatusSnapshot) -> pb::StatusResponse {
    pb::StatusResponse {
        stage: s.stage.as_str().into(),
        rank: s.rank,
        model: s.model,
        tasks: s.tasks.iter().map(|t| t.as_str().into()).collect(),
        ready: s.ready,
        draining: s.draining,
        uptime_seconds: s.uptime_s,
        completed: s.completed,
        failed: s.failed,
        in_flight: s.in_flight.into_iter().map(in_flight_job).collect(),
        transfer_endpoint: s.transfer_endpoint,
    }
}

fn in_flight_job(j: InFlight) -> pb::InFlightJob {
    pb::InFlightJob { job: j.job, phase: j.phase.into(), step: j.step, total_steps: j.total_steps }
}

fn loaded_model(m: LoadedModel) -> pb::LoadedModel {
    pb::LoadedModel {
        name: m.name,
        components: m.components,
        device: m.device,
        dtype: m.dtype,
        parameter_bytes: m.parameter_bytes,
    }
}

#[derive(Clone)]
struct HttpState {
    state: Arc<ServiceState>,
    queue: Option<Arc<dyn Queue>>,
}

/// The HTTP side: `/metrics`, `/healthz`, `/readyz`.
pub fn router(state: Arc<ServiceState>, queue: Option<Arc<dyn Queue>>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(HttpState { state, queue })
}

async fn metrics(State(http): State<HttpState>) -> Response {
    if let Some(queue) = &http.queue {
        let depths = Stage::ALL.map(|stage| {
            let queue = queue.clone();
            async move { (stage, tokio::time::timeout(QUEUE_TIMEOUT, queue.depth(stage)).await) }
        });
        let gauge = &http.state.metrics.queue_depth;
        for (stage, depth) in futures::future::join_all(depths).await {
            let label = [stage.as_str()];
            match depth {
                Ok(Ok(depth)) => {
                    gauge.with_label_values(&label).set(i64::try_from(depth).unwrap_or(i64::MAX))
                }
                // A stale depth would read as a current one; a missing sample reads as unknown.
                Ok(Err(_)) | Err(_) => {
                    let _ = gauge.remove_label_values(&label);
                }
            }
        }
    }
    let body = http.state.metrics.registry.encode();
    ([(header::CONTENT_TYPE, Metrics::content_type())], body).into_response()
}

async fn readyz(State(http): State<HttpState>) -> (StatusCode, String) {
    let unavailable = |reason: String| (StatusCode::SERVICE_UNAVAILABLE, reason + "\n");
    if http.state.drain.is_cancelled() {
        return unavailable("draining".into());
    }
    if !http.state.is_ready() {
        return unavailable("not ready: models loading or worker not registered".into());
    }
    if let Some(queue) = &http.queue {
        match tokio::time::timeout(QUEUE_TIMEOUT, queue.ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return unavailable(format!("queue unavailable: {e}")),
            Err(_) => {
                return unavailable(format!("queue unavailable: no answer in {QUEUE_TIMEOUT:?}"));
            }
        }
    }
    (StatusCode::OK, "ready\n".into())
}
