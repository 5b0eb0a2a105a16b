//! The one trait both backends implement: job store, per-stage leased queues, worker registry and
//! events. The gateway uses the job-side half, stage workers (through [`crate::worker`]) the rest.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use x2v_core::JobId;

use crate::error::QueueError;
use crate::record::{JobError, JobEvent, JobRecord, OutputRef};
use crate::spec::{JobSpec, Ranks, Resource, Stage, Task};

/// A job to admit.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: JobId,
    pub spec: JobSpec,
    pub ranks: Ranks,
    pub trace: HashMap<String, String>,
    pub idempotency: Option<Idempotency>,
}

impl NewJob {
    /// The record of this job as just admitted: queued for the encoder stage, nothing run yet.
    /// Both backends store exactly this (the Redis `create.lua` writes the same fields).
    pub fn queued_record(&self) -> JobRecord {
        self.clone().into_queued_record()
    }

    /// [`NewJob::queued_record`], taking the spec and trace instead of copying them.
    pub fn into_queued_record(self) -> JobRecord {
        JobRecord {
            id: self.id,
            resource: self.spec.task.resource(),
            spec: self.spec,
            status: crate::record::JobStatus::Queued,
            stage: Some(Stage::Encoder),
            progress: 0,
            step: 0,
            total_steps: 0,
            created_at_ms: self.id.timestamp_ms(),
            finished_at_ms: None,
            error: None,
            outputs: Vec::new(),
            ranks: self.ranks,
            trace: self.trace,
            attempts: 0,
            cancel_requested: false,
        }
    }
}

/// A client's idempotency key (already scoped to its API key) and a digest of the request body, so
/// the same key with a different request is refused instead of silently answered with the old job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    pub key: String,
    pub fingerprint: String,
}

/// The result of [`Queue::create`].
#[derive(Debug, Clone)]
pub struct Created {
    pub record: JobRecord,
    /// False when an earlier request with the same idempotency key created the job.
    pub created: bool,
}

/// Sort order of a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    Asc,
    #[default]
    Desc,
}

/// One page of jobs of a resource, by creation time.
#[derive(Debug, Clone)]
pub struct ListQuery {
    pub resource: Resource,
    pub after: Option<JobId>,
    pub limit: usize,
    pub order: Order,
}

#[derive(Debug, Clone)]
pub struct Page {
    pub jobs: Vec<JobRecord>,
    pub has_more: bool,
}

/// A registered stage worker: one engine rank of one stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub stage: Stage,
    pub rank: u32,
    /// Served model names.
    pub models: Vec<String>,
    /// Tasks it runs: it claims only jobs of these (and of its models). One model may be served
    /// by workers of different tasks (a text-to-image and an edit pipeline under one name).
    pub tasks: Vec<Task>,
    /// Jobs it runs at once.
    pub capacity: u32,
    /// A DiT worker's LoRA adapters that do not fit its model (name → why): requests naming one
    /// are refused at admission.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub unfit_loras: std::collections::BTreeMap<String, String>,
}

impl WorkerInfo {
    /// Registry key: one entry per (stage, rank).
    pub fn id(&self) -> String {
        format!("{}-{}", self.stage, self.rank)
    }

    /// Whether it runs jobs of `spec`: one of its models and one of its tasks.
    pub fn serves(&self, spec: &JobSpec) -> bool {
        self.models.contains(&spec.model) && self.tasks.contains(&spec.task)
    }
}

/// A claimed job: the record plus the fencing token every later call must present.
#[derive(Debug, Clone)]
pub struct Lease {
    pub job: JobRecord,
    pub stage: Stage,
    pub token: String,
}

impl Lease {
    pub fn handle(&self) -> LeaseRef {
        LeaseRef { id: self.job.id, stage: self.stage, token: self.token.clone() }
    }
}

/// What identifies a lease in calls after the claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRef {
    pub id: JobId,
    pub stage: Stage,
    pub token: String,
}

/// What a worker should do after a heartbeat or progress report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// The job was cancelled: stop at this step boundary and [`Queue::release`] nothing; just drop it.
    Cancel,
}

/// What one maintenance pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Maintenance {
    /// Leases that expired and whose jobs went back to a queue.
    pub expired_leases: usize,
    /// Jobs moved off the queues of ranks whose worker stopped heart-beating.
    pub reassigned: usize,
    /// Workers dropped from the registry.
    pub dead_workers: usize,
}

/// Which [`Queue`] implementation a service uses (`queue.backend` in its config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueBackend {
    /// [`crate::RedisQueue`]: shared by every process of a deployment.
    Redis,
    /// [`crate::MemoryQueue`]: one process only (`x2v up`, tests).
    Memory,
}

/// The durable job queue. Every method is atomic with respect to the others.
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Stores a job and enqueues it for its first stage, or returns the job an earlier request with the
    /// same idempotency key created.
    async fn create(&self, job: NewJob) -> Result<Created, QueueError>;
    async fn get(&self, id: JobId) -> Result<JobRecord, QueueError>;
    async fn list(&self, query: ListQuery) -> Result<Page, QueueError>;
    /// Cancels queued or running work and removes the job from view; returns the last record so the
    /// caller can delete stored outputs. Workers holding a lease see [`Control::Cancel`].
    async fn delete(&self, id: JobId) -> Result<JobRecord, QueueError>;
    /// Events of one job from now on. Ends when the job reaches a terminal status.
    async fn subscribe(&self, id: JobId) -> Result<BoxStream<'static, JobEvent>, QueueError>;

    /// Registers a worker or refreshes its heartbeat; it counts as live for `ttl`.
    async fn heartbeat(&self, worker: &WorkerInfo, ttl: Duration) -> Result<(), QueueError>;
    async fn deregister(&self, worker: &WorkerInfo) -> Result<(), QueueError>;
    /// Live workers.
    async fn workers(&self) -> Result<Vec<WorkerInfo>, QueueError>;
    /// Outstanding jobs assigned to each rank of `stage`.
    async fn load(&self, stage: Stage) -> Result<HashMap<u32, u64>, QueueError>;
    /// [`Queue::load`] of each of `stages`, read together (one round trip where the backend
    /// allows), so admission costs the same whatever the number of stages with live workers.
    async fn loads(
        &self,
        stages: &[Stage],
    ) -> Result<HashMap<Stage, HashMap<u32, u64>>, QueueError> {
        let mut loads = HashMap::with_capacity(stages.len());
        for stage in stages {
            loads.insert(*stage, self.load(*stage).await?);
        }
        Ok(loads)
    }
    /// Jobs waiting (not leased) for `stage`.
    async fn depth(&self, stage: Stage) -> Result<u64, QueueError>;

    /// Takes the next job for `worker`'s stage: its own rank's queue first, then unassigned work.
    async fn claim(
        &self,
        worker: &WorkerInfo,
        lease: Duration,
    ) -> Result<Option<Lease>, QueueError>;
    /// Extends a lease (the worker's heartbeat for one job).
    async fn extend(&self, lease: &LeaseRef, ttl: Duration) -> Result<Control, QueueError>;
    /// Reports `step` of `total` within the lease's stage; also extends nothing.
    async fn progress(
        &self,
        lease: &LeaseRef,
        step: u32,
        total: u32,
    ) -> Result<Control, QueueError>;
    /// Records a file the stage made while it runs (an image being denoised) in the job's
    /// outputs, and announces it with a `partial` event; the stage keeps its lease.
    async fn partial(&self, lease: &LeaseRef, output: OutputRef) -> Result<Control, QueueError>;
    /// Finishes the stage: the job moves to the next stage's queue, or, after the last, to `completed`
    /// with `outputs`.
    async fn complete(&self, lease: &LeaseRef, outputs: Vec<OutputRef>) -> Result<(), QueueError>;
    /// Fails the job for good with `error` (kind, code and message).
    async fn fail(&self, lease: &LeaseRef, error: &JobError) -> Result<(), QueueError>;
    /// Gives the job back to the queue at once (worker shutting down).
    async fn release(&self, lease: &LeaseRef) -> Result<(), QueueError>;

    /// Expires leases, reassigns dead ranks' jobs, drops dead workers. Run periodically by the gateway
    /// (and by claims); safe to run from many processes at once.
    async fn maintain(&self) -> Result<Maintenance, QueueError>;
    /// Whether the backing store answers.
    async fn ping(&self) -> Result<(), QueueError>;
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
