//! The stage runtime end to end on the in-memory queue and the in-process exchange, with stand-in
//! runners (no models): three stages hand a job on and store its file; cancellation stops the DiT
//! within one step; a drain gives an unfinished job back to the queue for another worker; a stage
//! error fails the job with its code.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use x2v_core::{ErrorKind, JobErrorCode, JobId};
use x2v_queue::storage::Storage;
use x2v_queue::worker::WorkerTimings;
use x2v_queue::*;
use x2v_stage::exchange::{InProcess, Inputs};
use x2v_stage::runner::{Artifact, Finished, RunCtx, StageError, StageRunner};
use x2v_stage::runtime::{Limits, LoadedStage, StageDeps};
use x2v_stage::state::ServiceState;
use x2v_testkit::jobs;
use x2v_transfer::{Dtype, Payload};

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
        inputs: Option<Inputs>,
        ctx: &mut RunCtx<'_>,
    ) -> Result<Vec<u8>, StageError> {
        if job.spec.prompt.contains("[bad]") && self.stage == Stage::Dit {
            return Err(StageError::new(
                JobErrorCode::InvalidRequest,
                "the stand-in DiT refuses [bad] prompts",
            ));
        }
        let mut data = match inputs {
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
        }
        data.push(b'0' + self.stage as u8);
        Ok(data)
    }

    fn finish(&self, _: &JobRecord, out: Vec<u8>) -> Result<Finished, StageError> {
        if self.stage == Stage::Decoder {
            return Ok(Finished::Artifacts(vec![Artifact {
                variant: "video".into(),
                index: 0,
                extension: "mp4".into(),
                content_type: "video/mp4".into(),
                bytes: Bytes::from(out),
            }]));
        }
        let n = out.len() as u64;
        let p = Payload::new(vec![("x".into(), Dtype::U8, vec![n], Bytes::from(out))])
            .map_err(StageError::internal)?;
        Ok(Finished::Payload(p))
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
        let state = Arc::new(ServiceState::new(stage, rank, "m".into(), vec![Task::T2v]));
        let done = Arc::new(AtomicU32::new(0));
        let fake = Fake { stage, step_ms, steps, done: done.clone() };
        let loaded = LoadedStage::load(fake, &state).await.unwrap();
        let deps = StageDeps {
            queue: self.queue.clone(),
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
