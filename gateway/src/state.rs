//! Shared state of the gateway's handlers, and job admission (store inputs, assign ranks, create).

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use x2v_core::JobId;
use x2v_core::metrics::Metrics;
use x2v_queue::storage::Storage;
use x2v_queue::{Created, Idempotency, InputRef, NewJob, Queue, assign};

use crate::config::GatewayConfig;
use crate::error::ApiError;
use crate::limit::RateLimiter;
use crate::validate::Validated;

/// Metric families the gateway records.
#[derive(Clone)]
pub struct GatewayMetrics {
    pub registry: Metrics,
    pub requests: prometheus::IntCounterVec,
    pub latency: prometheus::HistogramVec,
    pub jobs_created: prometheus::IntCounterVec,
    pub queue_depth: prometheus::IntGaugeVec,
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
}

/// Who is calling: an index into the configured keys, or anonymous when auth is off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub String);

impl AppState {
    pub fn new(config: GatewayConfig, queue: Arc<dyn Queue>, storage: Storage) -> Self {
        let limiter =
            Arc::new(RateLimiter::new(config.auth.rate_limit_per_s, config.auth.rate_limit_burst));
        AppState {
            queue,
            storage,
            config: Arc::new(config),
            metrics: GatewayMetrics::new(),
            limiter,
        }
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
        let mut hasher = Sha256::new();
        let mut stored = vec![];
        for (i, (role, up)) in v.inputs.iter().enumerate() {
            hasher.update(Sha256::digest(&up.bytes));
            let key = format!("{id}/inputs/{i}-{role}");
            self.storage.put(&key, up.bytes.clone()).await?;
            stored.push(key.clone());
            spec.inputs.push(InputRef {
                role: role.clone(),
                key,
                content_type: up.media_type.unwrap_or("application/octet-stream").into(),
            });
        }
        // The seed is random when not given, so it must not enter the fingerprint of a retry.
        let fingerprint = {
            let mut canonical = spec.clone();
            canonical.inputs.clear();
            canonical.seed = 0;
            let mut h = Sha256::new();
            h.update(serde_json::to_vec(&canonical).expect("spec serializes"));
            h.update(hasher.finalize());
            format!("{:x}", h.finalize())
        };
        let idempotency =
            idempotency_key.map(|k| Idempotency { key: format!("{}:{k}", caller.0), fingerprint });
        let result = async {
            let ranks = assign::assign(&*self.queue, &spec.model, spec.task, spec.pins).await?;
            let mut trace = HashMap::new();
            x2v_core::propagation::inject_map(
                &x2v_core::propagation::current_context(),
                &mut trace,
            );
            self.queue.create(NewJob { id, spec, ranks, trace, idempotency }).await
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
