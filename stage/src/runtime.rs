//! The stage worker loop: register the rank, claim jobs (up to `capacity` at once), fetch each
//! job's inputs (the previous stage's payload, the client's uploads), run the stage on the device
//! thread with per-step progress and cancellation, finish off the device thread, hand the result
//! on (payload for the next stage, or stored files) and complete the job — or fail it with a clear
//! code. On drain (SIGTERM or the admin `Drain`) it stops claiming, lets in-flight jobs finish for
//! `drain_timeout`, gives the rest back to the queue at their next step boundary, deregisters and
//! returns.
//!
//! The device thread never waits on async work: inputs are fetched before it is asked, its
//! progress goes through a watch channel (newest step wins) to a task that reports to the queue,
//! and the previews it hands over (images being denoised) go through a channel to a task that
//! encodes, stores and records each in the job before the stage completes.
//! Cancellation reaches the device thread as a token it checks before every step, tripped by that
//! task, by the lease extension or by the job's own cancellation event, whichever comes first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;
use x2v_core::JobErrorCode;
use x2v_queue::storage::Storage;
use x2v_queue::worker::{ClaimedJob, StageWorker, WorkerTimings};
use x2v_queue::{
    Control, JobRecord, JobStatus, LeaseRef, OutputRef, Queue, QueueError, Stage, WorkerInfo,
};
use x2v_transfer::{Opts, Payload};

use crate::device::{DeviceError, DeviceThread};
use crate::exchange::{Exchange, ExchangeError, Inputs};
use crate::job::{JobInputs, Upload};
use crate::runner::{
    Artifact, Finished, PREVIEW_VARIANT, PreviewImage, RunCtx, StageError, StageRunner,
};
use crate::state::{InFlight, ServiceState};

/// Content type recorded for a payload locator.
pub const PAYLOAD_CONTENT_TYPE: &str = "application/vnd.x2v.tensors";

/// The output variant under which `stage` records where its payload waits.
pub fn payload_variant(stage: Stage) -> Option<&'static str> {
    match stage {
        Stage::Encoder => Some("phase1"),
        Stage::Dit => Some("phase2"),
        Stage::Decoder => None,
    }
}

/// Where `job`'s input for `stage` waits: the newest locator the previous stage recorded.
pub fn input_locator(job: &JobRecord, stage: Stage) -> Option<&str> {
    let previous = Stage::ALL.iter().rev().find(|s| s.next() == Some(stage))?;
    let variant = payload_variant(*previous)?;
    job.outputs.iter().rev().find(|o| o.variant == variant).map(|o| o.key.as_str())
}

/// Limits of one stage worker.
#[derive(Debug, Clone)]
pub struct Limits {
    pub timings: WorkerTimings,
    /// Jobs held at once.
    pub capacity: u32,
    /// One fetch of the previous stage's payload.
    pub transfer_timeout: Duration,
    /// A whole job in this stage.
    pub job_timeout: Duration,
    /// How long in-flight jobs may run after a drain starts.
    pub drain_timeout: Duration,
}

/// What the runtime needs besides the runner.
#[derive(Clone)]
pub struct StageDeps {
    pub queue: Arc<dyn Queue>,
    pub exchange: Arc<dyn Exchange>,
    pub storage: Storage,
    pub state: Arc<ServiceState>,
    pub limits: Limits,
}

/// Why the stage service stopped.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("loading the model: {0}")]
    Load(StageError),
    #[error("job queue: {0}")]
    Queue(#[from] QueueError),
}

impl From<DeviceError> for StageError {
    fn from(e: DeviceError) -> Self {
        StageError::internal(e)
    }
}

/// A stage with its model loaded on its device thread, ready to serve.
pub struct LoadedStage<R: StageRunner> {
    runner: Arc<R>,
    device: Arc<DeviceThread<R::Model>>,
}

impl<R: StageRunner> LoadedStage<R> {
    /// Loads `runner`'s model on a new device thread named after the stage.
    pub async fn load(runner: R, state: &ServiceState) -> Result<Self, RuntimeError> {
        let runner = Arc::new(runner);
        let r = runner.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let name = format!("x2v-{}-device", runner.stage());
        let device = DeviceThread::spawn(&name, move || {
            let (model, loaded) = r.load()?;
            let _ = tx.send(loaded);
            Ok::<_, StageError>(model)
        })
        .await
        .map_err(RuntimeError::Load)?;
        state.set_loaded(rx.recv().unwrap_or_default());
        Ok(LoadedStage { runner, device: Arc::new(device) })
    }

    /// Registers the rank and serves jobs until `deps.state.drain` fires and in-flight work is
    /// finished or given back.
    pub async fn serve(self, deps: StageDeps, mut info: WorkerInfo) -> Result<(), RuntimeError> {
        let state = deps.state.clone();
        info.unfit_loras = state.unfit_loras();
        let worker = StageWorker::new(deps.queue.clone(), info, deps.limits.timings.clone());
        let registration = CancellationToken::new();
        let heartbeat = worker.register(registration.clone()).await?;
        state.set_ready(true);
        tracing::info!(stage = %self.runner.stage(), rank = state.rank, "stage serving");

        let permits = Arc::new(Semaphore::new(deps.limits.capacity.max(1) as usize));
        // Trips at the end of the drain period: running jobs stop at a step boundary and are
        // released to the queue for another worker.
        let abort = CancellationToken::new();
        let mut jobs = JoinSet::new();
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                () = state.drain.cancelled() => break,
            };
            let claimed = match worker.next(&state.drain).await {
                Ok(Some(job)) => job,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "claiming a job failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        () = state.drain.cancelled() => break,
                    }
                }
            };
            let (runner, device, deps, abort) =
                (self.runner.clone(), self.device.clone(), deps.clone(), abort.child_token());
            jobs.spawn(async move {
                handle(runner, device, &deps, claimed, abort).await;
                drop(permit);
            });
            while jobs.try_join_next().is_some() {}
        }

        state.set_ready(false);
        drain(jobs, deps.limits.drain_timeout, &abort).await;
        registration.cancel();
        let _ = heartbeat.await;
        tracing::info!("stage stopped");
        Ok(())
    }
}

/// Lets in-flight jobs finish for `timeout`, then trips `abort` so that the rest stop at their
/// next step boundary and are released, and waits for them.
async fn drain(mut jobs: JoinSet<()>, timeout: Duration, abort: &CancellationToken) {
    while jobs.try_join_next().is_some() {}
    let in_flight = jobs.len();
    if in_flight == 0 {
        return;
    }
    tracing::info!(in_flight, ?timeout, "draining");
    let finished =
        tokio::time::timeout(timeout, async { while jobs.join_next().await.is_some() {} }).await;
    if finished.is_err() {
        tracing::warn!(left = jobs.len(), "drain period over; releasing in-flight jobs");
        abort.cancel();
        while jobs.join_next().await.is_some() {}
    }
}

/// How one job ended in this stage.
enum Outcome {
    Done(Vec<OutputRef>),
    Failed(StageError),
    Cancelled,
    Aborted,
}

async fn handle<R: StageRunner>(
    runner: Arc<R>,
    device: Arc<DeviceThread<R::Model>>,
    deps: &StageDeps,
    job: ClaimedJob,
    abort: CancellationToken,
) {
    let record = job.job().clone();
    let stage = runner.stage();
    let public = record.public_id();
    let span = tracing::info_span!("stage", stage = %stage, job = %public, rank = deps.state.rank, attempt = record.attempts);
    x2v_core::propagation::set_parent(&span, x2v_core::propagation::extract_map(&record.trace));
    async move {
        let started = Instant::now();
        let state = &deps.state;
        state.track(InFlight { job: public.clone(), phase: "receiving", step: 0, total_steps: 0 });
        let stop = abort.child_token();
        let work = JobRun {
            runner: &runner,
            device: &device,
            deps,
            record: &record,
            lease: job.lease(),
            cancel: job.cancelled().clone(),
            stop: stop.clone(),
            abort: &abort,
        };
        let outcome = match tokio::time::timeout(deps.limits.job_timeout, work.process()).await {
            Ok(o) => o,
            Err(_) => {
                stop.cancel();
                Outcome::Failed(StageError::new(
                    JobErrorCode::DeadlineExceeded,
                    format!("the {stage} stage took longer than {:?}", deps.limits.job_timeout),
                ))
            }
        };
        let label = settle(deps, job, &record, stage, outcome).await;
        state
            .metrics
            .latency
            .with_label_values(&["total"])
            .observe(started.elapsed().as_secs_f64());
        state.untrack(&public, label);
        tracing::info!(outcome = label, seconds = started.elapsed().as_secs_f64(), "stage done");
    }
    .instrument(span)
    .await
}

/// Records `outcome` in the queue (complete, fail or release the job); returns the metric label.
async fn settle(
    deps: &StageDeps,
    job: ClaimedJob,
    record: &JobRecord,
    stage: Stage,
    outcome: Outcome,
) -> &'static str {
    match outcome {
        Outcome::Done(outputs) => match job.complete(outputs).await {
            Ok(()) => {
                if let Some(loc) = input_locator(record, stage) {
                    deps.exchange.consumed(record.id, loc);
                }
                "completed"
            }
            Err(QueueError::Cancelled(_)) => "cancelled",
            Err(e) => {
                tracing::warn!(error = %e, "completing the stage failed");
                "lost"
            }
        },
        Outcome::Failed(e) => {
            tracing::warn!(kind = %e.kind, code = %e.code, message = %e.message, "stage failed");
            match job.fail(&e.to_job_error()).await {
                Ok(()) => "failed",
                Err(QueueError::Cancelled(_)) => "cancelled",
                Err(err) => {
                    tracing::warn!(error = %err, "recording the failure failed");
                    "lost"
                }
            }
        }
        Outcome::Cancelled => {
            tracing::info!("job cancelled; stopped at a step boundary");
            "cancelled"
        }
        Outcome::Aborted => match job.release().await {
            Ok(()) => "released",
            Err(e) => {
                tracing::warn!(error = %e, "releasing the job failed; its lease will expire");
                "lost"
            }
        },
    }
}

/// One claimed job going through this stage's phases: receive, run, finish, send.
struct JobRun<'a, R: StageRunner> {
    runner: &'a Arc<R>,
    device: &'a DeviceThread<R::Model>,
    deps: &'a StageDeps,
    record: &'a JobRecord,
    lease: LeaseRef,
    /// Fires when the job is cancelled.
    cancel: CancellationToken,
    /// Fires at the job's deadline or at the end of a drain period.
    stop: CancellationToken,
    /// Fires at the end of a drain period: the job goes back to the queue.
    abort: &'a CancellationToken,
}

impl<R: StageRunner> JobRun<'_, R> {
    async fn process(&self) -> Outcome {
        match self.phases().await {
            Ok(outputs) => Outcome::Done(outputs),
            Err(outcome) => outcome,
        }
    }

    /// The phases in order; `Err` is how the job ended early.
    async fn phases(&self) -> Result<Vec<OutputRef>, Outcome> {
        let t = Instant::now();
        let inputs = self.receive().await?;
        self.observe("receive", t);

        self.enter("running");
        let t = Instant::now();
        let out = self.run(inputs).await?;
        self.observe("run", t);
        if let Some(o) = self.stopped() {
            return Err(o);
        }

        self.enter("finishing");
        let t = Instant::now();
        let finished = self.finish(out).await?;
        self.observe("finish", t);

        self.enter("sending");
        let t = Instant::now();
        let outputs = match finished {
            Finished::Payload(payload) => vec![self.publish(payload).await?],
            Finished::Artifacts(files) => self.store(files).await?,
        };
        self.observe("send", t);
        Ok(outputs)
    }

    /// Why the job must stop now, if it must.
    fn stopped(&self) -> Option<Outcome> {
        if self.abort.is_cancelled() {
            Some(Outcome::Aborted)
        } else if self.cancel.is_cancelled() {
            Some(Outcome::Cancelled)
        } else {
            None
        }
    }

    fn enter(&self, phase: &'static str) {
        let job = self.record.public_id();
        self.deps.state.track(InFlight { job, phase, step: 0, total_steps: 0 });
    }

    fn observe(&self, phase: &str, since: Instant) {
        let latency = &self.deps.state.metrics.latency;
        latency.with_label_values(&[phase]).observe(since.elapsed().as_secs_f64());
    }

    /// Everything `run` reads that is not on the device: the previous stage's payload and the
    /// uploads the runner asked for.
    async fn receive(&self) -> Result<JobInputs, Outcome> {
        let payload = match self.runner.stage() {
            Stage::Encoder => None,
            _ => Some(self.receive_payload().await?),
        };
        let uploads = self.receive_uploads().await?;
        self.prepare(JobInputs { payload, uploads, prepared: None }).await
    }

    /// The runner's `prepare` on a blocking thread (CPU work kept off the device thread).
    async fn prepare(&self, mut inputs: JobInputs) -> Result<JobInputs, Outcome> {
        let (runner, record) = (self.runner.clone(), self.record.clone());
        let task = tokio::task::spawn_blocking(move || {
            runner.prepare(&record, &mut inputs).map(|()| inputs)
        });
        match task.instrument(tracing::info_span!("prepare")).await {
            Ok(Ok(inputs)) => Ok(inputs),
            Ok(Err(e)) => Err(Outcome::Failed(e)),
            Err(e) => Err(Outcome::Failed(StageError::internal(e))),
        }
    }

    async fn receive_payload(&self) -> Result<Inputs, Outcome> {
        let stage = self.runner.stage();
        let Some(locator) = input_locator(self.record, stage) else {
            return Err(Outcome::Failed(StageError::new(
                JobErrorCode::PayloadUnavailable,
                format!("the job has no {stage} input recorded by the previous stage"),
            )));
        };
        let t = Instant::now();
        let fetched = self.fetch(locator).instrument(tracing::info_span!("receive", locator)).await;
        match fetched {
            Ok(inputs) => {
                let (bytes, transport, seconds) =
                    (inputs.total_bytes(), inputs.transport(), t.elapsed().as_secs_f64());
                let metrics = &self.deps.state.metrics;
                metrics.transfer_bytes.with_label_values(&["in"]).inc_by(bytes);
                metrics.transfer_seconds.with_label_values(&[transport]).observe(seconds);
                tracing::info!(bytes, transport, seconds, "inputs received");
                Ok(inputs)
            }
            Err(_) if self.stopped().is_some() => Err(self.stopped().expect("checked")),
            Err(e) => Err(Outcome::Failed(StageError::new(e.code(), e.to_string()))),
        }
    }

    /// Fetches the previous stage's payload, retrying a corrupted or broken copy twice.
    async fn fetch(&self, locator: &str) -> Result<Inputs, ExchangeError> {
        let either = CancellationToken::new();
        let (c, s, e) = (self.cancel.clone(), self.stop.clone(), either.clone());
        let watcher = tokio::spawn(async move {
            tokio::select! { () = c.cancelled() => {}, () = s.cancelled() => {} }
            e.cancel();
        });
        let deps = self.deps;
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            let opts = Opts::timeout(deps.limits.transfer_timeout).with_cancel(either.clone());
            match deps.exchange.fetch(self.record.id, locator, opts).await {
                Ok(inputs) => break Ok(inputs),
                Err(e) if attempt < 3 && e.is_retryable() && !either.is_cancelled() => {
                    tracing::warn!(error = %e, attempt, "fetching the payload failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
                Err(e) => break Err(e),
            }
        };
        watcher.abort();
        result
    }

    /// The job's uploads of the roles the runner reads, from storage.
    async fn receive_uploads(&self) -> Result<Vec<Upload>, Outcome> {
        let roles = self.runner.upload_roles();
        let mut uploads = Vec::new();
        for input in self.record.spec.inputs.iter().filter(|i| roles.contains(&i.role.as_str())) {
            let read = self.deps.storage.get(&input.key);
            match read.instrument(tracing::info_span!("upload", key = input.key)).await {
                Ok(bytes) => uploads.push(Upload {
                    role: input.role.clone(),
                    key: input.key.clone(),
                    content_type: input.content_type.clone(),
                    bytes,
                }),
                Err(_) if self.stopped().is_some() => return Err(self.stopped().expect("checked")),
                Err(e) => {
                    return Err(Outcome::Failed(StageError::new(
                        JobErrorCode::InputUnavailable,
                        format!("reading input {}: {e}", input.key),
                    )));
                }
            }
        }
        Ok(uploads)
    }

    /// The model, on the device thread, with progress reported and cancellation watched from
    /// async tasks of this job.
    async fn run(&self, inputs: JobInputs) -> Result<R::Output, Outcome> {
        let (steps, newest) = watch::channel(None);
        let queue = self.deps.queue.clone();
        let reporter = tokio::spawn(
            report_progress(queue.clone(), self.lease.clone(), newest, self.cancel.clone())
                .in_current_span(),
        );
        let _watcher = AbortOnDropHandle::new(tokio::spawn(
            watch_cancellation(queue, self.lease.id, self.cancel.clone()).in_current_span(),
        ));
        let (previews, to_store) = tokio::sync::mpsc::unbounded_channel();
        let storer = tokio::spawn(
            store_previews(
                self.runner.clone(),
                self.record.clone(),
                self.deps.clone(),
                self.lease.clone(),
                to_store,
            )
            .in_current_span(),
        );
        let (runner, record, state) =
            (self.runner.clone(), self.record.clone(), self.deps.state.clone());
        let (cancel, stop) = (self.cancel.clone(), self.stop.clone());
        let work = self.device.run(move |model| {
            let mut last = Instant::now();
            let mut progress = |step: u32, total: u32| {
                let step_seconds = state.metrics.step.with_label_values::<&str>(&[]);
                step_seconds.observe(last.elapsed().as_secs_f64());
                last = Instant::now();
                let job = record.public_id();
                state.track(InFlight { job, phase: "running", step, total_steps: total });
                steps.send_replace(Some((step, total)));
            };
            let cancelled = || cancel.is_cancelled() || stop.is_cancelled();
            let mut preview = |p: PreviewImage| {
                let _ = previews.send(p);
            };
            let mut ctx =
                RunCtx { progress: &mut progress, cancelled: &cancelled, preview: &mut preview };
            runner.run(model, &record, inputs, &mut ctx)
        });
        let result = work.instrument(tracing::info_span!("run")).await;
        // The closure took the senders with it: the reporter sends the step still pending, if
        // any, and the previews still waiting are stored, so that both are recorded before the
        // job is completed.
        let _ = reporter.await;
        let _ = storer.await;
        match result {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) if e.is_cancelled() => Err(self.stopped().unwrap_or(Outcome::Cancelled)),
            Ok(Err(e)) => Err(Outcome::Failed(e)),
            Err(e) => Err(Outcome::Failed(e.into())),
        }
    }

    /// Serialises or encodes `out` on a blocking thread, off the device thread.
    async fn finish(&self, out: R::Output) -> Result<Finished, Outcome> {
        let (runner, record) = (self.runner.clone(), self.record.clone());
        let task = tokio::task::spawn_blocking(move || runner.finish(&record, out));
        match task.instrument(tracing::info_span!("finish")).await {
            Ok(Ok(f)) => Ok(f),
            Ok(Err(e)) => Err(Outcome::Failed(e)),
            Err(e) => Err(Outcome::Failed(StageError::internal(e))),
        }
    }

    /// Makes the payload available to the next stage; returns the output recording where.
    async fn publish(&self, payload: Payload) -> Result<OutputRef, Outcome> {
        let bytes = payload.total_bytes();
        let variant =
            payload_variant(self.runner.stage()).expect("only the last stage stores files");
        match self.deps.exchange.publish(self.record.id, variant, payload).await {
            Ok(locator) => {
                self.deps.state.metrics.transfer_bytes.with_label_values(&["out"]).inc_by(bytes);
                Ok(OutputRef {
                    variant: variant.into(),
                    index: 0,
                    key: locator,
                    content_type: PAYLOAD_CONTENT_TYPE.into(),
                    size: bytes,
                    decoded_by: None,
                })
            }
            Err(e) => Err(Outcome::Failed(StageError::new(e.code(), e.to_string()))),
        }
    }

    /// Stores the files the client downloads.
    async fn store(&self, files: Vec<Artifact>) -> Result<Vec<OutputRef>, Outcome> {
        let mut outputs = Vec::with_capacity(files.len());
        for f in files {
            let key = format!("{}/{}-{}.{}", self.record.id, f.variant, f.index, f.extension);
            let put = self.deps.storage.put(&key, f.bytes);
            match put.instrument(tracing::info_span!("store", key)).await {
                Ok(size) => outputs.push(OutputRef {
                    variant: f.variant,
                    index: f.index,
                    key,
                    content_type: f.content_type,
                    size,
                    decoded_by: f.decoded_by,
                }),
                Err(e) => {
                    return Err(Outcome::Failed(StageError::new(
                        JobErrorCode::StorageFailed,
                        format!("storing {key}: {e}"),
                    )));
                }
            }
        }
        Ok(outputs)
    }
}

/// Encodes, stores and records in the job every preview the device thread hands over, in order,
/// until it drops the sender. A preview that cannot be stored is logged and skipped: it never
/// fails the job.
async fn store_previews<R: StageRunner>(
    runner: Arc<R>,
    record: JobRecord,
    deps: StageDeps,
    lease: LeaseRef,
    mut previews: tokio::sync::mpsc::UnboundedReceiver<PreviewImage>,
) {
    while let Some(preview) = previews.recv().await {
        let index = preview.output_index();
        let (r, job) = (runner.clone(), record.clone());
        let encoded = tokio::task::spawn_blocking(move || r.encode_preview(&job, preview)).await;
        let file = match encoded {
            Ok(Ok(file)) => file,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, index, "encoding a preview failed");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, index, "encoding a preview panicked");
                continue;
            }
        };
        let key = format!("{}/{PREVIEW_VARIANT}-{index}.{}", record.id, file.extension);
        let size = match deps.storage.put(&key, file.bytes).await {
            Ok(size) => size,
            Err(e) => {
                tracing::warn!(error = %e, key, "storing a preview failed");
                continue;
            }
        };
        let output = OutputRef {
            variant: PREVIEW_VARIANT.into(),
            index,
            key,
            content_type: file.content_type,
            size,
            decoded_by: None,
        };
        match deps.queue.partial(&lease, output).await {
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, index, "recording a preview failed"),
        }
    }
}

/// Reports the newest step the device thread published until it drops the sender; a report that
/// is still under way when more steps finish is followed by one for the newest of them only, so
/// a slow queue delays the record, never the device. Trips `cancel` when the queue says Cancel.
async fn report_progress(
    queue: Arc<dyn Queue>,
    lease: LeaseRef,
    mut newest: watch::Receiver<Option<(u32, u32)>>,
    cancel: CancellationToken,
) {
    while newest.changed().await.is_ok() {
        let Some((step, total)) = *newest.borrow_and_update() else { continue };
        match queue.progress(&lease, step, total).await {
            Ok(Control::Cancel) | Err(QueueError::Cancelled(_)) => cancel.cancel(),
            Ok(Control::Continue) => {}
            Err(e) => tracing::warn!(error = %e, "progress report failed"),
        }
    }
}

/// Trips `cancel` as soon as the queue announces that job `id` was cancelled, so that the device
/// thread stops before its next step even while a progress report is still under way.
async fn watch_cancellation(queue: Arc<dyn Queue>, id: x2v_core::JobId, cancel: CancellationToken) {
    let mut events = match queue.subscribe(id).await {
        Ok(events) => events,
        Err(e) => {
            // Progress reports and lease extensions still see the cancellation.
            tracing::debug!(error = %e, "watching the job's events failed");
            return;
        }
    };
    while let Some(event) = events.next().await {
        if event.status == JobStatus::Cancelled {
            cancel.cancel();
            return;
        }
    }
}
