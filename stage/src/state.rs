//! What a running stage service knows about itself: identity, readiness, drain state, in-flight
//! jobs and its metrics. Shared by the worker loop and the gRPC admin / HTTP endpoints.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use prometheus::{HistogramVec, IntCounterVec, IntGaugeVec};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use x2v_core::metrics::Metrics;
use x2v_queue::{Stage, Task};

/// One job this service is working on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    /// Public job id (`video_...`).
    pub job: String,
    /// `receiving`, `running`, `finishing`, `sending`.
    pub phase: &'static str,
    pub step: u32,
    pub total_steps: u32,
}

/// A loaded model as reported by the admin service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedModel {
    pub name: String,
    /// What was loaded (e.g. `transformer`, `text_encoder`, `vae.decoder`).
    pub components: Vec<String>,
    pub device: String,
    pub dtype: String,
    /// Bytes of parameters held.
    pub parameter_bytes: u64,
    /// LoRA adapters of the stage's directory that do not fit the model (name → why); the worker
    /// registers them so that the gateway refuses jobs naming them.
    pub unfit_loras: std::collections::BTreeMap<String, String>,
}

impl LoadedModel {
    /// `components` of model `name`, loaded on `device` in `dtype` (as their `Debug` forms print).
    pub fn new(
        name: &str,
        components: &[&str],
        device: &impl std::fmt::Debug,
        dtype: &impl std::fmt::Debug,
        parameter_bytes: u64,
    ) -> Self {
        LoadedModel {
            name: name.to_owned(),
            components: components.iter().map(|c| c.to_string()).collect(),
            device: format!("{device:?}"),
            dtype: format!("{dtype:?}"),
            parameter_bytes,
            unfit_loras: Default::default(),
        }
    }
}

/// Buckets of `x2v_transfer_seconds`: a Wan 480p payload moves in milliseconds on one host.
const TRANSFER_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
    60.0,
];

/// The metric families every stage service exports.
#[derive(Clone)]
pub struct StageMetrics {
    pub registry: Metrics,
    /// `x2v_stage_jobs_total{outcome}`: completed, failed, cancelled, released.
    pub jobs: IntCounterVec,
    /// `x2v_stage_seconds{phase}`: receive, run, finish, send, total.
    pub latency: HistogramVec,
    /// `x2v_stage_step_seconds{}`: one denoising step (DiT) or one unit of work.
    pub step: HistogramVec,
    /// `x2v_transfer_bytes_total{direction}`: in, out.
    pub transfer_bytes: IntCounterVec,
    /// `x2v_transfer_seconds{transport}`: fetching the previous stage's payload, from the request
    /// to its last tensor verified (the sender's hashing included), retries included.
    pub transfer_seconds: HistogramVec,
    /// `x2v_stage_in_flight{}`.
    pub in_flight: IntGaugeVec,
    /// `x2v_queue_depth{stage}`: jobs waiting for this stage (refreshed on scrape).
    pub queue_depth: IntGaugeVec,
}

impl StageMetrics {
    pub fn new(stage: Stage, rank: u32) -> Self {
        let rank = rank.to_string();
        let registry = Metrics::new(stage.as_str(), &[("rank", rank.as_str())]);
        StageMetrics {
            jobs: registry.counter(
                "stage_jobs_total",
                "Jobs this stage finished, by outcome.",
                &["outcome"],
            ),
            latency: registry.histogram(
                "stage_seconds",
                "Time per job in each phase of this stage.",
                &["phase"],
                None,
            ),
            step: registry.histogram(
                "stage_step_seconds",
                "Time of one denoising step.",
                &[],
                None,
            ),
            transfer_bytes: registry.counter(
                "transfer_bytes_total",
                "Payload bytes moved by this stage.",
                &["direction"],
            ),
            transfer_seconds: registry.histogram(
                "transfer_seconds",
                "Time to fetch and verify the previous stage's payload.",
                &["transport"],
                Some(TRANSFER_BUCKETS.to_vec()),
            ),
            in_flight: registry.gauge("stage_in_flight", "Jobs held by this worker.", &[]),
            queue_depth: registry.gauge(
                "queue_depth",
                "Jobs waiting for a stage (refreshed on scrape).",
                &["stage"],
            ),
            registry,
        }
    }
}

/// Shared state of one stage service.
pub struct ServiceState {
    pub stage: Stage,
    pub rank: u32,
    pub model: String,
    pub tasks: Vec<Task>,
    pub started: Instant,
    /// Fires on SIGTERM or an admin `Drain`: stop claiming, finish or release in-flight work.
    pub drain: CancellationToken,
    pub metrics: StageMetrics,
    /// Models loaded and the rank registered (cleared again when serving ends).
    ready: watch::Sender<bool>,
    completed: AtomicU64,
    failed: AtomicU64,
    loaded: Mutex<Vec<LoadedModel>>,
    in_flight: Mutex<BTreeMap<String, InFlight>>,
    /// Transfer endpoint other stages reach this one at (empty until bound).
    transfer_endpoint: Mutex<String>,
}

/// A point-in-time view for the admin `Status` call.
#[derive(Debug, Clone)]
pub struct StatusSnapshot {
    pub stage: Stage,
    pub rank: u32,
    pub model: String,
    pub tasks: Vec<Task>,
    pub ready: bool,
    pub draining: bool,
    pub uptime_s: f64,
    pub completed: u64,
    pub failed: u64,
    pub in_flight: Vec<InFlight>,
    pub loaded: Vec<LoadedModel>,
    pub transfer_endpoint: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ServiceState {
    pub fn new(stage: Stage, rank: u32, model: String, tasks: Vec<Task>) -> Self {
        ServiceState {
            stage,
            rank,
            model,
            tasks,
            started: Instant::now(),
            drain: CancellationToken::new(),
            metrics: StageMetrics::new(stage, rank),
            ready: watch::Sender::new(false),
            completed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            loaded: Mutex::new(Vec::new()),
            in_flight: Mutex::new(BTreeMap::new()),
            transfer_endpoint: Mutex::new(String::new()),
        }
    }

    /// Models loaded and the worker registered: `/readyz` and gRPC health say SERVING.
    pub fn set_ready(&self, ready: bool) {
        self.ready.send_replace(ready);
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow() && !self.drain.is_cancelled()
    }

    /// Resolves once the models are loaded and the rank registered ([`Self::set_ready`]).
    pub async fn registered(&self) {
        // `self` holds the sender, so the channel cannot close while this waits.
        let _ = self.ready.subscribe().wait_for(|ready| *ready).await;
    }

    pub fn set_loaded(&self, models: Vec<LoadedModel>) {
        *lock(&self.loaded) = models;
    }

    /// The adapters the loaded models found unfit (name → why), for the worker's registration.
    pub fn unfit_loras(&self) -> std::collections::BTreeMap<String, String> {
        lock(&self.loaded).iter().flat_map(|m| m.unfit_loras.clone()).collect()
    }

    pub fn set_transfer_endpoint(&self, endpoint: String) {
        *lock(&self.transfer_endpoint) = endpoint;
    }

    /// Records (or updates) an in-flight job.
    pub fn track(&self, job: InFlight) {
        self.metrics
            .in_flight
            .with_label_values::<&str>(&[])
            .set(lock(&self.in_flight).len() as i64);
        lock(&self.in_flight).insert(job.job.clone(), job);
        self.metrics
            .in_flight
            .with_label_values::<&str>(&[])
            .set(lock(&self.in_flight).len() as i64);
    }

    /// Forgets an in-flight job and counts its outcome.
    pub fn untrack(&self, job: &str, outcome: &str) {
        lock(&self.in_flight).remove(job);
        self.metrics
            .in_flight
            .with_label_values::<&str>(&[])
            .set(lock(&self.in_flight).len() as i64);
        self.metrics.jobs.with_label_values(&[outcome]).inc();
        match outcome {
            "completed" => self.completed.fetch_add(1, Ordering::Relaxed),
            "failed" => self.failed.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }

    pub fn snapshot(&self) -> StatusSnapshot {
        StatusSnapshot {
            stage: self.stage,
            rank: self.rank,
            model: self.model.clone(),
            tasks: self.tasks.clone(),
            ready: self.is_ready(),
            draining: self.drain.is_cancelled(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            completed: self.completed.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            in_flight: lock(&self.in_flight).values().cloned().collect(),
            loaded: lock(&self.loaded).clone(),
            transfer_endpoint: lock(&self.transfer_endpoint).clone(),
        }
    }
}
