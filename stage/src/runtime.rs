//! The stage worker loop: register the rank, claim jobs (up to `capacity` at once), fetch each
//! job's inputs from the previous stage, run the stage on the device thread with per-step progress
//! and cancellation, finish off the device thread, hand the result on (payload for the next stage,
//! or stored files) and complete the job — or fail it with a clear code. On drain (SIGTERM or the
//! admin `Drain`) it stops claiming, lets in-flight jobs finish for `drain_timeout`, gives the rest
//! back to the queue at their next step boundary, deregisters and returns.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use x2v_core::JobErrorCode;
use x2v_queue::storage::Storage;
use x2v_queue::worker::{ClaimedJob, StageWorker, WorkerTimings};
use x2v_queue::{Control, JobRecord, OutputRef, Queue, QueueError, Stage, WorkerInfo};
use x2v_transfer::Opts;

use crate::device::{DeviceError, DeviceThread};
use crate::exchange::{Exchange, ExchangeError, Inputs};
use crate::runner::{Finished, RunCtx, StageError, StageRunner};
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
    pub async fn serve(self, deps: StageDeps, info: WorkerInfo) -> Result<(), RuntimeError> {
        let state = deps.state.clone();
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
        while jobs.try_join_next().is_some() {}
        let in_flight = jobs.len();
        if in_flight > 0 {
            tracing::info!(in_flight, timeout = ?deps.limits.drain_timeout, "draining");
            let finished = tokio::time::timeout(deps.limits.drain_timeout, async {
                while jobs.join_next().await.is_some() {}
            })
            .await;
            if finished.is_err() {
                tracing::warn!(left = jobs.len(), "drain period over; releasing in-flight jobs");
                abort.cancel();
                while jobs.join_next().await.is_some() {}
            }
        }
        registration.cancel();
        let _ = heartbeat.await;
        tracing::info!("stage stopped");
        Ok(())
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
        let work = process(&runner, &device, deps, &job, &record, &stop, &abort);
        let outcome = match tokio::time::timeout(deps.limits.job_timeout, work).await {
            Ok(o) => o,
            Err(_) => {
                stop.cancel();
                Outcome::Failed(StageError::new(
                    JobErrorCode::DeadlineExceeded,
                    format!("the {stage} stage took longer than {:?}", deps.limits.job_timeout),
                ))
            }
        };
        let locator = input_locator(&record, stage).map(str::to_owned);
        let label = match outcome {
            Outcome::Done(outputs) => match job.complete(outputs).await {
                Ok(()) => {
                    if let Some(loc) = locator {
                        deps.exchange.consumed(record.id, &loc);
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
        };
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

async fn process<R: StageRunner>(
    runner: &Arc<R>,
    device: &DeviceThread<R::Model>,
    deps: &StageDeps,
    job: &ClaimedJob,
    record: &JobRecord,
    stop: &CancellationToken,
    abort: &CancellationToken,
) -> Outcome {
    let stage = runner.stage();
    let state = &deps.state;
    let public = record.public_id();
    let cancel = job.cancelled().clone();
    let stopped = || {
        if abort.is_cancelled() {
            Some(Outcome::Aborted)
        } else if cancel.is_cancelled() {
            Some(Outcome::Cancelled)
        } else {
            None
        }
    };

    // 1. Inputs from the previous stage.
    let t = Instant::now();
    let inputs = match stage {
        Stage::Encoder => None,
        _ => {
            let Some(locator) = input_locator(record, stage) else {
                return Outcome::Failed(StageError::new(
                    JobErrorCode::PayloadUnavailable,
                    format!("the job has no {stage} input recorded by the previous stage"),
                ));
            };
            match fetch(deps, record, locator, &cancel, stop)
                .instrument(tracing::info_span!("receive", locator))
                .await
            {
                Ok(inputs) => {
                    state
                        .metrics
                        .transfer_bytes
                        .with_label_values(&["in"])
                        .inc_by(inputs.total_bytes());
                    tracing::info!(
                        bytes = inputs.total_bytes(),
                        transport = inputs.transport(),
                        "inputs received"
                    );
                    Some(inputs)
                }
                Err(_) if stopped().is_some() => return stopped().expect("checked"),
                Err(e) => return Outcome::Failed(StageError::new(e.code(), e.to_string())),
            }
        }
    };
    state.metrics.latency.with_label_values(&["receive"]).observe(t.elapsed().as_secs_f64());

    // 2. The model, on the device thread.
    state.track(InFlight { job: public.clone(), phase: "running", step: 0, total_steps: 0 });
    let t = Instant::now();
    let out = {
        let (runner, rec, deps2) = (runner.clone(), record.clone(), deps.clone());
        let (queue, lease, cancel2, stop2) =
            (deps.queue.clone(), job.lease(), cancel.clone(), stop.clone());
        let rt = tokio::runtime::Handle::current();
        let run = device.run(move |model| {
            let mut last = Instant::now();
            let mut progress = |step: u32, total: u32| {
                deps2
                    .state
                    .metrics
                    .step
                    .with_label_values::<&str>(&[])
                    .observe(last.elapsed().as_secs_f64());
                last = Instant::now();
                deps2.state.track(InFlight {
                    job: rec.public_id(),
                    phase: "running",
                    step,
                    total_steps: total,
                });
                match rt.block_on(queue.progress(&lease, step, total)) {
                    Ok(Control::Cancel) | Err(QueueError::Cancelled(_)) => cancel2.cancel(),
                    Ok(Control::Continue) => {}
                    Err(e) => tracing::warn!(error = %e, "progress report failed"),
                }
            };
            let cancelled = || cancel2.is_cancelled() || stop2.is_cancelled();
            let mut ctx = RunCtx { progress: &mut progress, cancelled: &cancelled };
            runner.run(model, &rec, inputs, &mut ctx)
        });
        match run.instrument(tracing::info_span!("run")).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) if e.is_cancelled() => return stopped().unwrap_or(Outcome::Cancelled),
            Ok(Err(e)) => return Outcome::Failed(e),
            Err(e) => return Outcome::Failed(e.into()),
        }
    };
    state.metrics.latency.with_label_values(&["run"]).observe(t.elapsed().as_secs_f64());
    if let Some(o) = stopped() {
        return o;
    }

    // 3. Serialise or encode, off the device thread.
    state.track(InFlight { job: public.clone(), phase: "finishing", step: 0, total_steps: 0 });
    let t = Instant::now();
    let finished = {
        let (runner, rec) = (runner.clone(), record.clone());
        let task = tokio::task::spawn_blocking(move || runner.finish(&rec, out));
        match task.instrument(tracing::info_span!("finish")).await {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => return Outcome::Failed(e),
            Err(e) => return Outcome::Failed(StageError::internal(e)),
        }
    };
    state.metrics.latency.with_label_values(&["finish"]).observe(t.elapsed().as_secs_f64());

    // 4. Hand on: publish the payload, or store the files.
    state.track(InFlight { job: public.clone(), phase: "sending", step: 0, total_steps: 0 });
    let t = Instant::now();
    let outputs = match finished {
        Finished::Payload(payload) => {
            let bytes = payload.total_bytes();
            let variant = payload_variant(stage).expect("only the last stage stores files");
            match deps.exchange.publish(record.id, variant, payload).await {
                Ok(locator) => {
                    state.metrics.transfer_bytes.with_label_values(&["out"]).inc_by(bytes);
                    vec![OutputRef {
                        variant: variant.into(),
                        index: 0,
                        key: locator,
                        content_type: PAYLOAD_CONTENT_TYPE.into(),
                        size: bytes,
                    }]
                }
                Err(e) => return Outcome::Failed(StageError::new(e.code(), e.to_string())),
            }
        }
        Finished::Artifacts(files) => {
            let mut outputs = Vec::with_capacity(files.len());
            for f in files {
                let key = format!("{}/{}-{}.{}", record.id, f.variant, f.index, f.extension);
                match deps
                    .storage
                    .put(&key, f.bytes)
                    .instrument(tracing::info_span!("store", key))
                    .await
                {
                    Ok(size) => outputs.push(OutputRef {
                        variant: f.variant,
                        index: f.index,
                        key,
                        content_type: f.content_type,
                        size,
                    }),
                    Err(e) => {
                        return Outcome::Failed(StageError::new(
                            JobErrorCode::StorageFailed,
                            format!("storing {key}: {e}"),
                        ));
                    }
                }
            }
            outputs
        }
    };
    state.metrics.latency.with_label_values(&["send"]).observe(t.elapsed().as_secs_f64());
    Outcome::Done(outputs)
}

/// Fetches the previous stage's payload, retrying a corrupted or broken copy twice.
async fn fetch(
    deps: &StageDeps,
    record: &JobRecord,
    locator: &str,
    cancel: &CancellationToken,
    stop: &CancellationToken,
) -> Result<Inputs, ExchangeError> {
    let either = CancellationToken::new();
    let (c, s, e) = (cancel.clone(), stop.clone(), either.clone());
    let watcher = tokio::spawn(async move {
        tokio::select! { () = c.cancelled() => {}, () = s.cancelled() => {} }
        e.cancel();
    });
    let mut attempt = 0;
    let result = loop {
        attempt += 1;
        let opts = Opts::timeout(deps.limits.transfer_timeout).with_cancel(either.clone());
        match deps.exchange.fetch(record.id, locator, opts).await {
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
