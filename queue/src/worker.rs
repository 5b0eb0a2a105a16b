//! The worker-side API the stage services use: register and heart-beat a rank, claim jobs with a
//! lease that a background task keeps extending, report per-step progress, observe cancellation,
//! and complete or fail the stage.
//!
//! ```ignore
//! let worker = StageWorker::new(queue, info, WorkerTimings::default());
//! let _registration = worker.register(shutdown.clone()).await?;
//! while let Some(job) = worker.next(&shutdown).await? {
//!     for step in 0..steps {
//!         if job.progress(step + 1, steps).await? == Control::Cancel { break; }
//!     }
//!     job.complete(outputs).await?;
//! }
//! ```

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::QueueError;
use crate::queue::{Control, Lease, LeaseRef, Queue, WorkerInfo};
use crate::record::{JobError, JobRecord, OutputRef};

/// Lease and heartbeat periods.
#[derive(Debug, Clone)]
pub struct WorkerTimings {
    /// How long a claim holds a job without an extension.
    pub lease: Duration,
    /// How long a worker counts as live after a heartbeat.
    pub heartbeat_ttl: Duration,
    /// Longest pause between polls while the queue is empty.
    pub max_poll: Duration,
}

impl Default for WorkerTimings {
    fn default() -> Self {
        WorkerTimings {
            lease: Duration::from_secs(30),
            heartbeat_ttl: Duration::from_secs(15),
            max_poll: Duration::from_millis(500),
        }
    }
}

/// One engine rank of one stage.
#[derive(Clone)]
pub struct StageWorker {
    queue: Arc<dyn Queue>,
    info: WorkerInfo,
    timings: WorkerTimings,
}

impl StageWorker {
    pub fn new(queue: Arc<dyn Queue>, info: WorkerInfo, timings: WorkerTimings) -> Self {
        StageWorker { queue, info, timings }
    }

    pub fn info(&self) -> &WorkerInfo {
        &self.info
    }

    /// Registers the rank and keeps heart-beating until `shutdown`, then deregisters.
    pub async fn register(
        &self,
        shutdown: CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>, QueueError> {
        self.queue.heartbeat(&self.info, self.timings.heartbeat_ttl).await?;
        let this = self.clone();
        Ok(tokio::spawn(async move {
            let period = this.timings.heartbeat_ttl / 3;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(period) => {
                        if let Err(e) = this.queue.heartbeat(&this.info, this.timings.heartbeat_ttl).await {
                            tracing::warn!(error = %e, "worker heartbeat failed");
                        }
                    }
                }
            }
            let _ = this.queue.deregister(&this.info).await;
        }))
    }

    /// Claims a job now, if one is waiting.
    pub async fn claim(&self) -> Result<Option<ClaimedJob>, QueueError> {
        let Some(lease) = self.queue.claim(&self.info, self.timings.lease).await? else {
            return Ok(None);
        };
        Ok(Some(ClaimedJob::start(self.queue.clone(), lease, self.timings.lease)))
    }

    /// Waits for the next job (polling with backoff), or `None` once `shutdown` fires.
    pub async fn next(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<ClaimedJob>, QueueError> {
        let mut pause = Duration::from_millis(10);
        loop {
            if shutdown.is_cancelled() {
                return Ok(None);
            }
            if let Some(job) = self.claim().await? {
                return Ok(Some(job));
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(self.timings.max_poll);
        }
    }
}

/// A job this worker holds. A background task extends the lease every third of its length and
/// fires [`ClaimedJob::cancelled`] when the job is cancelled.
pub struct ClaimedJob {
    queue: Arc<dyn Queue>,
    lease: Lease,
    cancel: CancellationToken,
    keepalive: CancellationToken,
}

impl ClaimedJob {
    fn start(queue: Arc<dyn Queue>, lease: Lease, ttl: Duration) -> Self {
        let cancel = CancellationToken::new();
        let keepalive = CancellationToken::new();
        let (q, handle, c, k) = (queue.clone(), lease.handle(), cancel.clone(), keepalive.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = k.cancelled() => break,
                    _ = tokio::time::sleep(ttl / 3) => match q.extend(&handle, ttl).await {
                        Ok(Control::Continue) => {}
                        Ok(Control::Cancel) | Err(QueueError::Cancelled(_)) => { c.cancel(); break }
                        Err(QueueError::LeaseLost(_)) => break,
                        Err(e) => tracing::warn!(error = %e, job = %handle.id, "lease extension failed"),
                    },
                }
            }
        });
        ClaimedJob { queue, lease, cancel, keepalive }
    }

    pub fn job(&self) -> &JobRecord {
        &self.lease.job
    }

    pub fn lease(&self) -> LeaseRef {
        self.lease.handle()
    }

    /// Fires when the job is cancelled (seen by a heartbeat or a progress report).
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Reports step `step` of `total`; `Control::Cancel` means stop at this boundary.
    pub async fn progress(&self, step: u32, total: u32) -> Result<Control, QueueError> {
        let c = self.queue.progress(&self.lease.handle(), step, total).await?;
        if c == Control::Cancel {
            self.cancel.cancel();
        }
        Ok(c)
    }

    /// Hands the stage's result on: to the next stage, or completes the job with `outputs`.
    pub async fn complete(self, outputs: Vec<OutputRef>) -> Result<(), QueueError> {
        self.queue.complete(&self.lease.handle(), outputs).await
    }

    /// Fails the job with a typed code (and its kind) and a message for the client.
    pub async fn fail(self, error: &JobError) -> Result<(), QueueError> {
        self.queue.fail(&self.lease.handle(), error).await
    }

    /// Gives the job back to its queue (shutting down mid-job).
    pub async fn release(self) -> Result<(), QueueError> {
        self.queue.release(&self.lease.handle()).await
    }
}

impl Drop for ClaimedJob {
    fn drop(&mut self) {
        self.keepalive.cancel();
    }
}
