//! The stage runtime end to end on the in-memory queue and the in-process exchange, with stand-in
//! runners (no models): three stages hand a job on and store its file; cancellation stops the DiT
//! within one step; a drain gives an unfinished job back to the queue for another worker; a stage
//! error fails the job with its code; a slow queue never holds up the device thread.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use tokio::sync::watch;
use x2v_core::{ErrorKind, JobErrorCode, JobId};
use x2v_queue::queue::Maintenance;
use x2v_queue::storage::Storage;
use x2v_queue::worker::WorkerTimings;
use x2v_queue::*;
use x2v_stage::exchange::InProcess;
use x2v_stage::job::JobInputs;
use x2v_stage::runner::{
    Artifact, Finished, PREVIEW_VARIANT, PreviewImage, RunCtx, StageError, StageRunner, preview_of,
};
use x2v_stage::runtime::{Limits, LoadedStage, StageDeps};
use x2v_stage::state::ServiceState;
use x2v_testkit::jobs;
use x2v_transfer::{Dtype, TensorPart};

struct Fake {
    stage: Stage,
    step_ms: u64,
    steps: u32,
    /// Steps the last run completed.
    done: Arc<AtomicU32>,
}

impl StageRunner for Fake {
    type Model = ();
    type Output = Vec<u8>;

    fn stage(&self) -> Stage {
        self.stage
    }

    fn load(&self) -> Result<((), Vec<x2v_stage::state::LoadedModel>), StageError> {
        Ok(((), vec![]))
    }

    fn run(
        &self,
        _: &mut (),
        job: &JobRecord,
        inputs: JobInputs,
        ctx: &mut RunCtx<'_>,
    ) -> Result<Vec<u8>, StageError> {
        if job.spec.prompt.contains("[bad]") && self.stage == Stage::Dit {
            return Err(StageError::new(
                JobErrorCode::InvalidRequest,
                "the stand-in DiT refuses [bad] prompts",
            ));
        }
        let mut data = match inputs.payload {
            None => job.spec.prompt.clone().into_bytes(),
            Some(i) => i.tensors()[0].1.to_vec(),
        };
        self.done.store(0, Ordering::SeqCst);
        for step in 1..=self.steps {
            if (ctx.cancelled)() {
                return Err(StageError::cancelled());
            }
            std::thread::sleep(Duration::from_millis(self.step_ms));
            self.done.store(step, Ordering::SeqCst);
            (ctx.progress)(step, self.steps);
            if job.spec.prompt.contains("[preview]") && self.stage == Stage::Dit && step <= 2 {
                let rgb = vec![step as u8; 2 * 3 * 3];
                (ctx.preview)(PreviewImage { image: 1, index: step - 1, rgb, height: 2, width: 3 });
            }
        }
        data.push(b'0' + self.stage as u8);
        Ok(data)
    }

    fn encode_preview(&self, _: &JobRecord, p: PreviewImage) -> Result<Artifact, StageError> {
        assert_eq!(p.rgb.len(), p.height * p.width * 3);
        let mut bytes = format!("preview {} of image {}:", p.index, p.image).into_bytes();
        bytes.extend(&p.rgb);
        Ok(Artifact {
            variant: String::new(),
            index: 0,
            extension: "bin".into(),
            content_type: "application/octet-stream".into(),
            bytes: Bytes::from(bytes),
            decoded_by: None,
        })
    }

    fn finish(&self, _: &JobRecord, out: Vec<u8>) -> Result<Finished, StageError> {
        if self.stage == Stage::Decoder {
            return Ok(Finished::Artifacts(vec![Artifact {
                variant: "video".into(),
                index: 0,
                extension: "mp4".into(),
                content_type: "video/mp4".into(),
                bytes: Bytes::from(out),
                decoded_by: Some("torch".into()),
            }]));
        }
        let shape = vec![out.len() as u64];
        Finished::payload(vec![TensorPart {
            name: "x".into(),
            dtype: Dtype::U8,
            shape,
            bytes: Bytes::from(out),
        }])
    }
}

struct World {
    queue: Arc<dyn Queue>,
    storage: Storage,
    exchange: Arc<InProcess>,
    _dir: tempfile::TempDir,
}

impl World {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let queue: Arc<dyn Queue> = Arc::new(MemoryQueue::new(Retention::default()));
        // What the gateway does in production: expire leases, reassign dead ranks' jobs.
        let q = queue.clone();
        tokio::spawn(async move {
            loop {
                let _ = q.maintain().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        World {
            queue,
            storage: Storage::local(dir.path()).unwrap(),
            exchange: Arc::new(InProcess::new(Duration::from_secs(60))),
            _dir: dir,
        }
    }

    /// Starts one rank of `stage`; returns its state (drain it to stop) and its task.
    async fn start(
        &self,
        stage: Stage,
        rank: u32,
        steps: u32,
        step_ms: u64,
        drain: Duration,
    ) -> (Arc<ServiceState>, Arc<AtomicU32>, tokio::task::JoinHandle<()>) {
        self.start_on(self.queue.clone(), stage, rank, steps, step_ms, drain).await
    }

    /// [`World::start`] with the stage talking to `queue` (a wrapper of the world's queue).
    async fn start_on(
        &self,
        queue: Arc<dyn Queue>,
        stage: Stage,
        rank: u32,
        steps: u32,
        step_ms: u64,
        drain: Duration,
    ) -> (Arc<ServiceState>, Arc<AtomicU32>, tokio::task::JoinHandle<()>) {
        let state = Arc::new(ServiceState::new(stage, rank, "m".into(), vec![Task::T2v]));
        let done = Arc::new(AtomicU32::new(0));
        let fake = Fake { stage, step_ms, steps, done: done.clone() };
        let loaded = LoadedStage::load(fake, &state).await.unwrap();
        let deps = StageDeps {
            queue,
            exchange: self.exchange.clone(),
            storage: self.storage.clone(),
            state: state.clone(),
            limits: Limits {
                timings: WorkerTimings {
                    lease: Duration::from_millis(600),
                    heartbeat_ttl: Duration::from_secs(5),
                    max_poll: Duration::from_millis(20),
                },
                capacity: 1,
                transfer_timeout: Duration::from_secs(5),
                job_timeout: Duration::from_secs(60),
                drain_timeout: drain,
            },
        };
        let info = WorkerInfo {
            stage,
            rank,
            models: vec!["m".into()],
            tasks: vec![Task::T2v],
            capacity: 1,
            unfit_loras: Default::default(),
        };
        let task = tokio::spawn(async move { loaded.serve(deps, info).await.unwrap() });
        (state, done, task)
    }

    async fn submit(&self, prompt: &str) -> JobId {
        let spec = JobSpec {
            model: "m".into(),
            size: "64x64".parse().unwrap(),
            num_frames: 5,
            seconds: 1,
            num_inference_steps: 4,
            shift: 3.0,
            ..jobs::t2v(prompt)
        };
        let job = jobs::new_job(spec);
        self.queue.create(job).await.unwrap().record.id
    }

    async fn wait(&self, id: JobId, pred: impl Fn(&JobRecord) -> bool) -> JobRecord {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let rec = self.queue.get(id).await.unwrap();
            if pred(&rec) {
                return rec;
            }
            assert!(Instant::now() < deadline, "timed out; last record {rec:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_stages_hand_a_job_on_and_store_its_file() {
    let w = World::new();
    let d = Duration::from_secs(5);
    let (enc, _, t1) = w.start(Stage::Encoder, 0, 1, 1, d).await;
    let (dit, _, t2) = w.start(Stage::Dit, 0, 4, 5, d).await;
    let (dec, _, t3) = w.start(Stage::Decoder, 0, 1, 1, d).await;
    let id = w.submit("hello").await;
    let rec = w.wait(id, |r| r.status.is_terminal()).await;
    assert_eq!(rec.status, JobStatus::Completed, "{rec:?}");
    assert_eq!(rec.progress, 100);
    let video = rec.output("video", 0).expect("the decoder stored the video");
    // Encoder appended '0', DiT '1', decoder '2'.
    assert_eq!(&w.storage.get(&video.key).await.unwrap()[..], b"hello012");
    assert!(rec.outputs.iter().any(|o| o.variant == "phase1"));
    assert_eq!(dit.snapshot().completed, 1);
    for s in [&enc, &dit, &dec] {
        s.drain.cancel();
    }
    for t in [t1, t2, t3] {
        t.await.unwrap();
    }
    assert!(w.queue.workers().await.unwrap().is_empty(), "drained workers deregister");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previews_are_stored_and_recorded_before_the_stage_completes() {
    let w = World::new();
    let d = Duration::from_secs(5);
    let (_enc, _, _t1) = w.start(Stage::Encoder, 0, 1, 1, d).await;
    let (_dit, _, _t2) = w.start(Stage::Dit, 0, 4, 1, d).await;
    let (_dec, _, _t3) = w.start(Stage::Decoder, 0, 1, 1, d).await;
    let id = w.submit("[preview]").await;
    let rec = w.wait(id, |r| r.status.is_terminal()).await;
    assert_eq!(rec.status, JobStatus::Completed, "{rec:?}");
    let variants: Vec<&str> = rec.outputs.iter().map(|o| o.variant.as_str()).collect();
    assert_eq!(variants, ["phase1", PREVIEW_VARIANT, PREVIEW_VARIANT, "phase2", "video"]);
    // The decoder's artifact says what decoded it; the record keeps that.
    let decoded_by: Vec<Option<&str>> =
        rec.outputs.iter().map(|o| o.decoded_by.as_deref()).collect();
    assert_eq!(decoded_by, [None, None, None, None, Some("torch")]);
    for index in 0..2u32 {
        let out = rec.output(PREVIEW_VARIANT, 3 + index).expect("image 1's previews");
        assert_eq!(preview_of(out.index), (1, index));
        let bytes = w.storage.get(&out.key).await.unwrap();
        let want = format!("preview {index} of image 1:");
        assert!(bytes.starts_with(want.as_bytes()), "{:?}", String::from_utf8_lossy(&bytes));
        assert_eq!(bytes.len(), want.len() + 18);
        assert!(bytes[want.len()..].iter().all(|&b| b == index as u8 + 1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_stops_the_dit_within_one_step() {
    let w = World::new();
    let d = Duration::from_secs(5);
    let (_enc, _, _t1) = w.start(Stage::Encoder, 0, 1, 1, d).await;
    let (dit, done, _t2) = w.start(Stage::Dit, 0, 50, 100, d).await;
    let id = w.submit("long").await;
    w.wait(id, |r| r.stage == Some(Stage::Dit) && r.step >= 3).await;
    let at_delete = done.load(Ordering::SeqCst);
    w.queue.delete(id).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while dit.snapshot().in_flight.len() == 1 {
        assert!(Instant::now() < deadline, "the DiT never let go of the cancelled job");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stopped = done.load(Ordering::SeqCst);
    assert!(stopped <= at_delete + 1, "deleted at step {at_delete}, stopped after step {stopped}");
    assert_eq!(dit.metrics.jobs.with_label_values(&["cancelled"]).get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_worker_gives_its_job_back_to_another_rank() {
    let w = World::new();
    let (_enc, _, _t1) = w.start(Stage::Encoder, 0, 1, 1, Duration::from_secs(5)).await;
    let (_dec, _, _t3) = w.start(Stage::Decoder, 0, 1, 1, Duration::from_secs(5)).await;
    let (dit0, _, t2) = w.start(Stage::Dit, 0, 20, 50, Duration::from_millis(100)).await;
    let id = w.submit("handover").await;
    w.wait(id, |r| r.stage == Some(Stage::Dit) && r.step >= 2).await;
    dit0.drain.cancel();
    t2.await.unwrap();
    assert_eq!(dit0.metrics.jobs.with_label_values(&["released"]).get(), 1);
    let (dit1, _, _t4) = w.start(Stage::Dit, 1, 4, 5, Duration::from_secs(5)).await;
    let rec = w.wait(id, |r| r.status.is_terminal()).await;
    assert_eq!(rec.status, JobStatus::Completed, "{rec:?}");
    assert_eq!(dit1.snapshot().completed, 1);
    assert_eq!(
        &w.storage.get(&rec.output("video", 0).unwrap().key).await.unwrap()[..],
        b"handover012"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_error_fails_the_job_with_its_code() {
    let w = World::new();
    let d = Duration::from_secs(5);
    let (_enc, _, _t1) = w.start(Stage::Encoder, 0, 1, 1, d).await;
    let (_dit, _, _t2) = w.start(Stage::Dit, 0, 2, 1, d).await;
    let id = w.submit("[bad]").await;
    let rec = w.wait(id, |r| r.status.is_terminal()).await;
    assert_eq!(rec.status, JobStatus::Failed);
    let err = rec.error.unwrap();
    assert_eq!((err.kind, err.code), (ErrorKind::InvalidRequest, JobErrorCode::InvalidRequest));
    assert!(err.message.contains("refuses"), "{}", err.message);
}

/// The world's queue, with every progress report held until the gate opens.
struct GatedProgress {
    inner: Arc<dyn Queue>,
    open: watch::Receiver<bool>,
    /// Progress reports that reached this queue.
    reports: AtomicU32,
    /// The step of the newest report.
    last_step: AtomicU32,
}

#[async_trait]
impl Queue for GatedProgress {
    async fn create(&self, job: NewJob) -> Result<Created, QueueError> {
        self.inner.create(job).await
    }
    async fn get(&self, id: JobId) -> Result<JobRecord, QueueError> {
        self.inner.get(id).await
    }
    async fn list(&self, query: ListQuery) -> Result<Page, QueueError> {
        self.inner.list(query).await
    }
    async fn delete(&self, id: JobId) -> Result<JobRecord, QueueError> {
        self.inner.delete(id).await
    }
    async fn subscribe(&self, id: JobId) -> Result<BoxStream<'static, JobEvent>, QueueError> {
        self.inner.subscribe(id).await
    }
    async fn heartbeat(&self, worker: &WorkerInfo, ttl: Duration) -> Result<(), QueueError> {
        self.inner.heartbeat(worker, ttl).await
    }
    async fn deregister(&self, worker: &WorkerInfo) -> Result<(), QueueError> {
        self.inner.deregister(worker).await
    }
    async fn workers(&self) -> Result<Vec<WorkerInfo>, QueueError> {
        self.inner.workers().await
    }
    async fn load(&self, stage: Stage) -> Result<HashMap<u32, u64>, QueueError> {
        self.inner.load(stage).await
    }
    async fn depth(&self, stage: Stage) -> Result<u64, QueueError> {
        self.inner.depth(stage).await
    }
    async fn claim(
        &self,
        worker: &WorkerInfo,
        lease: Duration,
    ) -> Result<Option<Lease>, QueueError> {
        self.inner.claim(worker, lease).await
    }
    async fn extend(&self, lease: &LeaseRef, ttl: Duration) -> Result<Control, QueueError> {
        self.inner.extend(lease, ttl).await
    }
    async fn partial(&self, lease: &LeaseRef, output: OutputRef) -> Result<Control, QueueError> {
        self.inner.partial(lease, output).await
    }
    async fn progress(
        &self,
        lease: &LeaseRef,
        step: u32,
        total: u32,
    ) -> Result<Control, QueueError> {
        self.reports.fetch_add(1, Ordering::SeqCst);
        let _ = self.open.clone().wait_for(|open| *open).await;
        self.last_step.store(step, Ordering::SeqCst);
        self.inner.progress(lease, step, total).await
    }
    async fn complete(&self, lease: &LeaseRef, outputs: Vec<OutputRef>) -> Result<(), QueueError> {
        self.inner.complete(lease, outputs).await
    }
    async fn fail(&self, lease: &LeaseRef, error: &JobError) -> Result<(), QueueError> {
        self.inner.fail(lease, error).await
    }
    async fn release(&self, lease: &LeaseRef) -> Result<(), QueueError> {
        self.inner.release(lease).await
    }
    async fn maintain(&self) -> Result<Maintenance, QueueError> {
        self.inner.maintain().await
    }
    async fn ping(&self) -> Result<(), QueueError> {
        self.inner.ping().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_queue_never_holds_up_the_device_thread() {
    let w = World::new();
    let d = Duration::from_secs(5);
    let (gate, open) = watch::channel(false);
    let gated = Arc::new(GatedProgress {
        inner: w.queue.clone(),
        open,
        reports: AtomicU32::new(0),
        last_step: AtomicU32::new(0),
    });
    let (_enc, _, _t1) = w.start(Stage::Encoder, 0, 1, 1, d).await;
    let (dit, done, _t2) = w.start_on(gated.clone(), Stage::Dit, 0, 6, 1, d).await;
    let (_dec, _, _t3) = w.start(Stage::Decoder, 0, 1, 1, d).await;
    let id = w.submit("gated").await;

    // Every step runs while the first report waits at the gate: a device thread that waited for
    // the queue would stay at step 1 until the deadline.
    let deadline = Instant::now() + Duration::from_secs(30);
    let ran = || {
        done.load(Ordering::SeqCst) == 6
            && dit.snapshot().in_flight.first().map(|j| j.step) == Some(6)
            && gated.reports.load(Ordering::SeqCst) >= 1
    };
    while !ran() {
        assert!(Instant::now() < deadline, "the device thread waited for the gated queue");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Steps 2..6 finished behind the waiting report without queueing reports of their own.
    assert_eq!(gated.reports.load(Ordering::SeqCst), 1);
    assert_eq!(w.queue.get(id).await.unwrap().step, 0, "no report got through the closed gate");

    gate.send_replace(true);
    let rec = w.wait(id, |r| r.status.is_terminal()).await;
    assert_eq!(rec.status, JobStatus::Completed, "{rec:?}");
    // The newest step is reported before the stage completes; skipped steps are never sent.
    assert_eq!(gated.last_step.load(Ordering::SeqCst), 6);
    assert!(gated.reports.load(Ordering::SeqCst) <= 2);
}
