//! Shared state of the gateway's handlers, and job admission (store inputs, assign ranks, create).

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use x2v_core::metrics::Metrics;
use x2v_core::{ErrorKind, JobId};
use x2v_queue::storage::Storage;
use x2v_queue::{
    Created, Idempotency, InputRef, NewJob, Queue, QueueError, Stage, WorkerInfo, assign,
};

use crate::config::GatewayConfig;
use crate::error::ApiError;
use crate::limit::{ApiKeys, RateLimiter};
use crate::validate::Validated;

/// Metric families the gateway records.
#[derive(Clone)]
pub struct GatewayMetrics {
    pub registry: Metrics,
    pub requests: prometheus::IntCounterVec,
    pub latency: prometheus::HistogramVec,
    pub jobs_created: prometheus::IntCounterVec,
    pub queue_depth: prometheus::IntGaugeVec,
    /// Creates refused because their model's backlog was at its bound.
    pub overloaded: prometheus::IntCounterVec,
}

impl GatewayMetrics {
    pub fn new() -> Self {
        let registry = Metrics::new("gateway", &[]);
        GatewayMetrics {
            requests: registry.counter(
                "http_requests_total",
                "HTTP requests by route and status.",
                &["route", "status"],
            ),
            latency: registry.histogram(
                "http_request_seconds",
                "HTTP request latency by route.",
                &["route"],
                None,
            ),
            jobs_created: registry.counter(
                "jobs_created_total",
                "Jobs admitted, by resource.",
                &["resource"],
            ),
            queue_depth: registry.gauge(
                "queue_depth",
                "Jobs waiting per stage (sampled at scrape).",
                &["stage"],
            ),
            overloaded: registry.counter(
                "jobs_refused_total",
                "Creates answered 429 because the model's backlog was at its max_queued_jobs.",
                &["model"],
            ),
            registry,
        }
    }
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub queue: Arc<dyn Queue>,
    pub storage: Storage,
    pub config: Arc<GatewayConfig>,
    pub metrics: GatewayMetrics,
    pub limiter: Arc<RateLimiter>,
    /// The configured API keys, digested once.
    pub keys: Arc<ApiKeys>,
    /// Live workers as last read, for rank assignment (the registry changes slowly; loads are read
    /// fresh on every admission).
    workers: Arc<std::sync::Mutex<Option<CachedWorkers>>>,
    /// The DiT rank each (model, requested LoRA adapters) last went to: the next job with the same
    /// adapters goes there too while that rank is not busier than the others by more than
    /// [`assign::AFFINITY_SLACK`], so adapters stay in few ranks' memory.
    adapter_ranks: Arc<std::sync::Mutex<HashMap<(String, String), u32>>>,
}

/// Adapter sets remembered for rank affinity at most (the map is cleared beyond it).
const MAX_ADAPTER_SETS: usize = 4096;

/// When the live-worker list was read, and the list.
type CachedWorkers = (std::time::Instant, Arc<[WorkerInfo]>);

const WORKERS_CACHE: std::time::Duration = std::time::Duration::from_millis(1000);
/// `retry-after` of a create refused for its model's backlog: about a few denoising steps.
const BACKLOG_RETRY_AFTER_S: u64 = 5;

/// Refuses a job naming an adapter that a live DiT worker of its model found unfit (unreadable, or
/// made for another model) when it loaded.
fn refuse_unfit_loras(spec: &x2v_queue::JobSpec, workers: &[WorkerInfo]) -> Result<(), ApiError> {
    let dit = workers.iter().filter(|w| w.stage == Stage::Dit && w.models.contains(&spec.model));
    for w in dit {
        if let Some((name, why)) =
            spec.loras.iter().find_map(|l| w.unfit_loras.get_key_value(&l.name))
        {
            return Err(ApiError::invalid(
                "lora",
                format!("LoRA adapter `{name}` does not fit model `{}`: {why}", spec.model),
            )
            .code("lora_unfit"));
        }
    }
    Ok(())
}

/// Who is calling: `key{index}` of the configured keys, or `anonymous` when auth is off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub Arc<str>);

impl AppState {
    pub fn new(config: GatewayConfig, queue: Arc<dyn Queue>, storage: Storage) -> Self {
        let limiter =
            Arc::new(RateLimiter::new(config.auth.rate_limit_per_s, config.auth.rate_limit_burst));
        let keys = Arc::new(ApiKeys::new(&config.auth.api_keys));
        AppState {
            queue,
            storage,
            config: Arc::new(config),
            metrics: GatewayMetrics::new(),
            limiter,
            keys,
            workers: Arc::default(),
            adapter_ranks: Arc::default(),
        }
    }

    async fn live_workers(&self, refresh: bool) -> Result<Arc<[WorkerInfo]>, QueueError> {
        let cached = self.workers.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match cached {
            Some((at, w)) if !refresh && at.elapsed() < WORKERS_CACHE => Ok(w),
            _ => {
                let w: Arc<[WorkerInfo]> = self.queue.workers().await?.into();
                *self.workers.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((std::time::Instant::now(), w.clone()));
                Ok(w)
            }
        }
    }

    /// Engine ranks for a job: least outstanding work among live workers, pins honoured, a job's
    /// LoRA adapters kept on the DiT rank that ran them last while it is not much busier; refused
    /// when the model's backlog is at its bound.
    async fn assign(&self, spec: &x2v_queue::JobSpec) -> Result<x2v_queue::Ranks, ApiError> {
        let mut workers = self.live_workers(false).await?;
        let pinned_unknown = Stage::ALL.iter().any(|s| {
            spec.pins.get(*s).is_some_and(|r| !workers.iter().any(|w| w.stage == *s && w.rank == r))
        });
        if pinned_unknown {
            workers = self.live_workers(true).await?;
        }
        refuse_unfit_loras(spec, &workers)?;
        let staffed: Vec<Stage> =
            Stage::ALL.into_iter().filter(|s| workers.iter().any(|w| w.stage == *s)).collect();
        let loads =
            if staffed.is_empty() { HashMap::new() } else { self.queue.loads(&staffed).await? };
        self.check_backlog(&spec.model, &workers, &loads)?;
        let affinity = self.adapter_key(spec);
        let prefer = affinity.as_ref().and_then(|k| {
            self.adapter_ranks.lock().unwrap_or_else(|p| p.into_inner()).get(k).copied()
        });
        let ranks =
            assign::choose_with(&workers, &loads, &spec.model, spec.task, spec.pins, prefer)?;
        if let (Some(key), Some(rank)) = (affinity, ranks.dit) {
            let mut map = self.adapter_ranks.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() >= MAX_ADAPTER_SETS && !map.contains_key(&key) {
                map.clear();
            }
            map.insert(key, rank);
        }
        Ok(ranks)
    }

    /// (model, the adapters the request asked for beyond the model's base adapters, with their
    /// scales), or `None` for a job without such adapters (every rank holds the base ones).
    fn adapter_key(&self, spec: &x2v_queue::JobSpec) -> Option<(String, String)> {
        let base = self.config.models.iter().find(|m| m.name == spec.model)?;
        let asked: Vec<String> = spec
            .loras
            .iter()
            .filter(|l| !base.base_loras.iter().any(|b| b.name == l.name))
            .map(|l| format!("{}:{}", l.name, l.scale))
            .collect();
        (!asked.is_empty()).then(|| (spec.model.clone(), asked.join(",")))
    }

    /// Refuses a job of `model` when the outstanding work of its DiT ranks has reached the model's
    /// `max_queued_jobs`.
    fn check_backlog(
        &self,
        model: &str,
        workers: &[WorkerInfo],
        loads: &HashMap<Stage, HashMap<u32, u64>>,
    ) -> Result<(), ApiError> {
        let Some(bound) = self
            .config
            .models
            .iter()
            .find(|m| m.name == model)
            .map(|m| u64::from(m.max_queued_jobs))
            .filter(|b| *b > 0)
        else {
            return Ok(());
        };
        let dit = loads.get(&Stage::Dit);
        let backlog: u64 = workers
            .iter()
            .filter(|w| w.stage == Stage::Dit && w.models.iter().any(|m| m == model))
            .filter_map(|w| dit.and_then(|l| l.get(&w.rank)))
            .sum();
        if backlog < bound {
            return Ok(());
        }
        self.metrics.overloaded.with_label_values(&[model]).inc();
        let mut e = ApiError::new(
            ErrorKind::Overloaded,
            format!(
                "Model '{model}' has {backlog} jobs waiting for or in denoising, its limit; retry later."
            ),
        )
        .code("model_queue_full");
        e.retry_after = Some(BACKLOG_RETRY_AFTER_S);
        Err(e)
    }

    /// Stores a validated request's uploads, assigns ranks and creates the job (or returns the job an
    /// earlier request with the same idempotency key made).
    pub async fn admit(
        &self,
        v: Validated,
        idempotency_key: Option<&str>,
        caller: &Caller,
    ) -> Result<Created, ApiError> {
        let id = JobId::new();
        let mut spec = v.spec;
        let mut stored = vec![];
        for (i, (role, up)) in v.inputs.iter().enumerate() {
            let key = format!("{id}/inputs/{i}-{role}");
            self.storage.put(&key, up.bytes.clone()).await?;
            stored.push(key.clone());
            spec.inputs.push(InputRef {
                role: role.clone(),
                key,
                content_type: up.media_type.unwrap_or("application/octet-stream").into(),
            });
        }
        // A seed drawn at random (not given) differs between retries, so it stays out of the
        // fingerprint; a seed the client chose is part of the request like any other field.
        let idempotency = idempotency_key.map(|k| {
            let mut canonical = spec.clone();
            canonical.inputs.clear();
            if !v.seed_given {
                canonical.seed = 0;
            }
            let mut inputs = Sha256::new();
            for (_, up) in &v.inputs {
                inputs.update(Sha256::digest(&up.bytes));
            }
            let mut h = Sha256::new();
            h.update(serde_json::to_vec(&canonical).expect("spec serializes"));
            h.update(inputs.finalize());
            Idempotency {
                key: format!("{}:{k}", caller.0),
                fingerprint: format!("{:x}", h.finalize()),
            }
        });
        let result: Result<Created, ApiError> = async {
            let ranks = self.assign(&spec).await?;
            let mut trace = HashMap::new();
            x2v_core::propagation::inject_map(
                &x2v_core::propagation::current_context(),
                &mut trace,
            );
            Ok(self.queue.create(NewJob { id, spec, ranks, trace, idempotency }).await?)
        }
        .await;
        match result {
            Ok(c) if c.created => {
                self.metrics.jobs_created.with_label_values(&[c.record.resource.as_str()]).inc();
                Ok(c)
            }
            other => {
                // Not ours after all (an error, or an idempotent replay): drop the uploads just stored.
                if !stored.is_empty() {
                    let _ = self.storage.delete_prefix(&id.to_string()).await;
                }
                Ok(other?)
            }
        }
    }
}
