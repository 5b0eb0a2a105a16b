//! One contract, two backends: every test here runs against the in-memory queue and against a real
//! `redis-server` started on a free port.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use x2v_core::{ErrorKind, JobErrorCode, JobId};
use x2v_queue::queue::Maintenance;
use x2v_queue::*;
use x2v_testkit::jobs;
use x2v_testkit::redis::RedisServer;

fn new_job(prompt: &str) -> NewJob {
    jobs::new_job(JobSpec { num_inference_steps: 4, seed: u64::MAX - 7, ..jobs::t2v(prompt) })
}

fn worker(stage: Stage, rank: u32) -> WorkerInfo {
    WorkerInfo {
        stage,
        rank,
        models: vec!["wan2.1-t2v-1.3b".into()],
        tasks: vec![Task::T2v],
        capacity: 1,
        unfit_loras: Default::default(),
    }
}

const LEASE: Duration = Duration::from_secs(30);

/// Claims for `w`, retrying maintenance passes until something arrives or 30 s pass.
async fn claim_eventually(q: &dyn Queue, w: &WorkerInfo, lease: Duration) -> Lease {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        q.maintain().await.unwrap();
        if let Some(l) = q.claim(w, lease).await.unwrap() {
            return l;
        }
        assert!(std::time::Instant::now() < deadline, "nothing to claim for {w:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn create_then_get_round_trips(q: Arc<dyn Queue>) {
    let mut job = new_job("a cat");
    job.trace.insert(
        "traceparent".into(),
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
    );
    let created = q.create(job.clone()).await.unwrap();
    assert!(created.created);
    let got = q.get(job.id).await.unwrap();
    assert_eq!(got, created.record);
    assert_eq!(got.spec, job.spec, "the spec (u64 seed included) survives storage unchanged");
    assert_eq!((got.status, got.stage, got.progress), (JobStatus::Queued, Some(Stage::Encoder), 0));
    assert_eq!(got.trace, job.trace);
    assert!(matches!(q.get(JobId::new()).await, Err(QueueError::NotFound(_))));
}

async fn job_flows_through_every_stage(q: Arc<dyn Queue>) {
    let job = new_job("flow");
    q.create(job.clone()).await.unwrap();
    let mut events = q.subscribe(job.id).await.unwrap();
    for stage in Stage::ALL {
        let lease =
            q.claim(&worker(stage, 0), LEASE).await.unwrap().expect("job waiting for this stage");
        assert_eq!((lease.job.id, lease.stage), (job.id, stage));
        assert_eq!(q.get(job.id).await.unwrap().status, JobStatus::InProgress);
        for step in 1..=4 {
            assert_eq!(q.progress(&lease.handle(), step, 4).await.unwrap(), Control::Continue);
            if stage == Stage::Dit && step == 2 {
                let preview = OutputRef {
                    variant: "partial_image".into(),
                    index: 0,
                    key: format!("{}/partial_image-0.png", job.id),
                    content_type: "image/png".into(),
                    size: 5,
                    decoded_by: None,
                };
                assert_eq!(q.partial(&lease.handle(), preview).await.unwrap(), Control::Continue);
                let rec = q.get(job.id).await.unwrap();
                assert_eq!(rec.output("partial_image", 0).map(|o| o.size), Some(5));
            }
        }
        let outputs = if stage == Stage::Decoder {
            vec![OutputRef {
                variant: "video".into(),
                index: 0,
                key: format!("{}/video.mp4", job.id),
                content_type: "video/mp4".into(),
                size: 3,
                decoded_by: None,
            }]
        } else {
            vec![]
        };
        q.complete(&lease.handle(), outputs).await.unwrap();
        assert!(q.claim(&worker(stage, 0), LEASE).await.unwrap().is_none(), "a stage runs once");
        if stage != Stage::Decoder {
            // Waiting for the next stage: no steps of the stage just finished are shown as its.
            let waiting = q.get(job.id).await.unwrap();
            assert_eq!((waiting.step, waiting.total_steps), (0, 0), "after {stage}");
        }
    }
    let done = q.get(job.id).await.unwrap();
    assert_eq!((done.status, done.progress, done.stage), (JobStatus::Completed, 100, None));
    let variants: Vec<&str> = done.outputs.iter().map(|o| o.variant.as_str()).collect();
    assert_eq!(variants, ["partial_image", "video"], "files recorded while running are kept");
    assert!(done.finished_at_ms.is_some());
    let mut seen = vec![];
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(30), events.next()).await.unwrap()
    {
        seen.push(ev);
    }
    assert_eq!(seen.first().unwrap().status, JobStatus::Queued);
    assert_eq!(seen.last().unwrap().status, JobStatus::Completed);
    let progress: Vec<u8> = seen.iter().map(|e| e.progress).collect();
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "progress never goes back: {progress:?}");
    let dit_steps =
        seen.iter().filter(|e| e.kind == "progress" && e.stage == Some(Stage::Dit)).count();
    assert_eq!(dit_steps, 4, "{seen:?}");
    let partial = seen.iter().position(|e| e.kind == "partial").expect("a partial event");
    assert_eq!(seen[partial].stage, Some(Stage::Dit));
    assert_eq!(seen[partial - 1].step, 2, "announced in order with the steps: {seen:?}");
}

async fn idempotency_key_never_creates_a_second_job(q: Arc<dyn Queue>) {
    let idem = Idempotency { key: "k1".into(), fingerprint: "fp".into() };
    let mut a = new_job("once");
    a.idempotency = Some(idem.clone());
    let first = q.create(a.clone()).await.unwrap();
    let mut b = new_job("once");
    b.idempotency = Some(idem.clone());
    let again = q.create(b).await.unwrap();
    assert!(!again.created);
    assert_eq!(again.record.id, first.record.id);
    let mut c = new_job("different body");
    c.idempotency = Some(Idempotency { key: "k1".into(), fingerprint: "other".into() });
    assert!(matches!(q.create(c).await, Err(QueueError::IdempotencyMismatch(_))));
    assert_eq!(q.depth(Stage::Encoder).await.unwrap(), 1);
    q.delete(first.record.id).await.unwrap();
    let mut d = new_job("once");
    d.idempotency = Some(idem);
    assert!(q.create(d).await.unwrap().created, "a deleted job frees its key");
}

async fn list_pages_in_both_orders(q: Arc<dyn Queue>) {
    let mut ids = vec![];
    for i in 0..5 {
        ids.push(q.create(new_job(&format!("p{i}"))).await.unwrap().record.id);
    }
    let page = |after, order| ListQuery { resource: Resource::Video, after, limit: 2, order };
    let p1 = q.list(page(None, Order::Asc)).await.unwrap();
    assert_eq!(p1.jobs.iter().map(|j| j.id).collect::<Vec<_>>(), ids[0..2]);
    assert!(p1.has_more);
    let p3 = q.list(page(Some(ids[3]), Order::Asc)).await.unwrap();
    assert_eq!(p3.jobs.iter().map(|j| j.id).collect::<Vec<_>>(), ids[4..5]);
    assert!(!p3.has_more);
    let d1 = q.list(page(None, Order::Desc)).await.unwrap();
    assert_eq!(d1.jobs.iter().map(|j| j.id).collect::<Vec<_>>(), vec![ids[4], ids[3]]);
    let d2 = q.list(page(Some(ids[3]), Order::Desc)).await.unwrap();
    assert_eq!(d2.jobs.iter().map(|j| j.id).collect::<Vec<_>>(), vec![ids[2], ids[1]]);
    assert!(d2.has_more);
    q.delete(ids[2]).await.unwrap();
    let all = q
        .list(ListQuery { resource: Resource::Video, after: None, limit: 10, order: Order::Asc })
        .await
        .unwrap();
    assert_eq!(all.jobs.len(), 4);
    let images = q
        .list(ListQuery { resource: Resource::Image, after: None, limit: 10, order: Order::Asc })
        .await
        .unwrap();
    assert!(images.jobs.is_empty());
}

async fn delete_cancels_queued_work(q: Arc<dyn Queue>) {
    let job = new_job("never run");
    q.create(job.clone()).await.unwrap();
    let last = q.delete(job.id).await.unwrap();
    assert_eq!(last.status, JobStatus::Cancelled);
    assert!(matches!(q.get(job.id).await, Err(QueueError::NotFound(_))));
    assert!(matches!(q.delete(job.id).await, Err(QueueError::NotFound(_))));
    assert!(q.claim(&worker(Stage::Encoder, 0), LEASE).await.unwrap().is_none());
    assert_eq!(q.depth(Stage::Encoder).await.unwrap(), 0);
}

async fn delete_stops_running_work(q: Arc<dyn Queue>) {
    let job = new_job("running");
    q.create(job.clone()).await.unwrap();
    let lease = q.claim(&worker(Stage::Encoder, 0), LEASE).await.unwrap().unwrap();
    q.delete(job.id).await.unwrap();
    assert_eq!(q.extend(&lease.handle(), LEASE).await.unwrap(), Control::Cancel);
    assert_eq!(q.progress(&lease.handle(), 1, 2).await.unwrap(), Control::Cancel);
    assert!(matches!(q.complete(&lease.handle(), vec![]).await, Err(QueueError::Cancelled(_))));
    assert!(
        q.claim(&worker(Stage::Dit, 0), LEASE).await.unwrap().is_none(),
        "a cancelled job goes no further"
    );
}

async fn expired_lease_goes_back_to_the_queue(q: Arc<dyn Queue>) {
    let job = new_job("crashy");
    q.create(job.clone()).await.unwrap();
    let lost =
        q.claim(&worker(Stage::Encoder, 0), Duration::from_millis(200)).await.unwrap().unwrap();
    let again = claim_eventually(&*q, &worker(Stage::Encoder, 1), LEASE).await;
    assert_eq!(again.job.id, job.id);
    assert_eq!(again.job.attempts, 2);
    assert!(matches!(q.complete(&lost.handle(), vec![]).await, Err(QueueError::LeaseLost(_))));
    assert!(matches!(q.extend(&lost.handle(), LEASE).await, Err(QueueError::LeaseLost(_))));
    q.complete(&again.handle(), vec![]).await.unwrap();
    assert_eq!(q.get(job.id).await.unwrap().stage, Some(Stage::Dit));
}

async fn extended_lease_is_kept(q: Arc<dyn Queue>) {
    let job = new_job("slow but alive");
    q.create(job.clone()).await.unwrap();
    let lease =
        q.claim(&worker(Stage::Encoder, 0), Duration::from_millis(300)).await.unwrap().unwrap();
    assert_eq!(
        q.extend(&lease.handle(), Duration::from_secs(60)).await.unwrap(),
        Control::Continue
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    q.maintain().await.unwrap();
    assert!(q.claim(&worker(Stage::Encoder, 1), LEASE).await.unwrap().is_none());
    q.complete(&lease.handle(), vec![]).await.unwrap();
}

async fn failure_is_terminal_with_code_and_message(q: Arc<dyn Queue>) {
    let job = new_job("doomed");
    q.create(job.clone()).await.unwrap();
    let lease = q.claim(&worker(Stage::Encoder, 0), LEASE).await.unwrap().unwrap();
    // A kind other than the code's own, so that a backend deriving it from the code would fail.
    let error = JobError {
        kind: ErrorKind::Overloaded,
        code: JobErrorCode::InternalError,
        message: "CUDA out of memory at step 3".into(),
    };
    q.fail(&lease.handle(), &error).await.unwrap();
    let rec = q.get(job.id).await.unwrap();
    assert_eq!(rec.status, JobStatus::Failed);
    assert_eq!(rec.error, Some(error));
    assert!(matches!(q.complete(&lease.handle(), vec![]).await, Err(QueueError::LeaseLost(_))));
}

async fn release_puts_the_job_first_in_line(q: Arc<dyn Queue>) {
    let a = new_job("a");
    let b = new_job("b");
    q.create(a.clone()).await.unwrap();
    q.create(b.clone()).await.unwrap();
    let la = q.claim(&worker(Stage::Encoder, 0), LEASE).await.unwrap().unwrap();
    assert_eq!(la.job.id, a.id);
    q.release(&la.handle()).await.unwrap();
    assert_eq!(q.claim(&worker(Stage::Encoder, 0), LEASE).await.unwrap().unwrap().job.id, a.id);
}

async fn ranks_are_assigned_by_load_and_dead_ranks_reassigned(q: Arc<dyn Queue>) {
    let live = Duration::from_secs(60);
    for w in [worker(Stage::Encoder, 0), worker(Stage::Dit, 0), worker(Stage::Decoder, 0)] {
        q.heartbeat(&w, live).await.unwrap();
    }
    // Long enough to outlast the assignments below on a loaded machine, short enough to wait out.
    q.heartbeat(&worker(Stage::Dit, 1), Duration::from_secs(2)).await.unwrap();
    assert_eq!(q.workers().await.unwrap().len(), 4);
    let mut dit_ranks = vec![];
    for i in 0..4 {
        let mut job = new_job(&format!("r{i}"));
        job.ranks =
            assign::assign(&*q, &job.spec.model, job.spec.task, Ranks::default()).await.unwrap();
        dit_ranks.push(job.ranks.dit.unwrap());
        q.create(job).await.unwrap();
    }
    assert_eq!(dit_ranks, vec![0, 1, 0, 1], "least outstanding work, ties to the lowest rank");
    let load = q.load(Stage::Dit).await.unwrap();
    assert_eq!((load[&0], load[&1]), (2, 2));
    let loads = q.loads(&[Stage::Encoder, Stage::Dit]).await.unwrap();
    assert_eq!(loads.len(), 2, "one entry per stage asked for");
    assert_eq!(loads[&Stage::Dit], load);
    assert_eq!(loads[&Stage::Encoder], q.load(Stage::Encoder).await.unwrap());
    let pinned = Ranks { dit: Some(1), ..Ranks::default() };
    assert_eq!(
        assign::assign(&*q, "wan2.1-t2v-1.3b", Task::T2v, pinned).await.unwrap().dit,
        Some(1)
    );
    // Move all four to the DiT stage.
    for _ in 0..4 {
        let l = q.claim(&worker(Stage::Encoder, 0), LEASE).await.unwrap().unwrap();
        q.complete(&l.handle(), vec![]).await.unwrap();
    }
    // Rank 0 only sees its own two jobs while rank 1 is alive...
    let mut rank0 = vec![];
    while let Some(l) = q.claim(&worker(Stage::Dit, 0), LEASE).await.unwrap() {
        rank0.push(l);
    }
    assert_eq!(rank0.len(), 2);
    // ...and rank 1's two once its heartbeat lapses.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut report = Maintenance::default();
    while report.dead_workers == 0 {
        assert!(std::time::Instant::now() < deadline, "rank 1 never counted as dead");
        tokio::time::sleep(Duration::from_millis(50)).await;
        report = q.maintain().await.unwrap();
    }
    assert_eq!(report.reassigned, 2);
    assert_eq!(q.workers().await.unwrap().len(), 3);
    let l =
        q.claim(&worker(Stage::Dit, 0), LEASE).await.unwrap().expect("dead rank's job reassigned");
    assert_eq!(l.job.ranks.dit, Some(0));
    let bad = Ranks { dit: Some(1), ..Ranks::default() };
    assert!(matches!(
        assign::assign(&*q, "wan2.1-t2v-1.3b", Task::T2v, bad).await,
        Err(QueueError::Invalid(_))
    ));
}

async fn a_deregistered_rank_hands_its_queued_jobs_on(q: Arc<dyn Queue>) {
    let (enc, dit0, dit1) =
        (worker(Stage::Encoder, 0), worker(Stage::Dit, 0), worker(Stage::Dit, 1));
    for w in [&enc, &dit0, &dit1] {
        q.heartbeat(w, Duration::from_secs(60)).await.unwrap();
    }
    let mut job = new_job("handover");
    job.ranks = Ranks { dit: Some(0), ..Ranks::default() };
    q.create(job).await.unwrap();
    let l = q.claim(&enc, LEASE).await.unwrap().unwrap();
    q.complete(&l.handle(), vec![]).await.unwrap();
    // Rank 0 takes it, gives it back while draining, and leaves.
    let l = q.claim(&dit0, LEASE).await.unwrap().unwrap();
    q.release(&l.handle()).await.unwrap();
    q.deregister(&dit0).await.unwrap();
    assert_eq!(q.workers().await.unwrap().len(), 2, "a deregistered rank is not live");
    let report = q.maintain().await.unwrap();
    assert_eq!((report.dead_workers, report.reassigned), (1, 1));
    let l = q.claim(&dit1, LEASE).await.unwrap().expect("rank 1 gets the job rank 0 left");
    assert_eq!(l.job.ranks.dit, Some(1));
}

async fn unassigned_jobs_go_to_any_worker_of_the_stage(q: Arc<dyn Queue>) {
    let job = new_job("anyone");
    q.create(job.clone()).await.unwrap();
    let l = q.claim(&worker(Stage::Encoder, 5), LEASE).await.unwrap().unwrap();
    assert_eq!(l.job.ranks.encoder, Some(5), "the claiming rank is recorded");
    assert_eq!(q.load(Stage::Encoder).await.unwrap().get(&5), Some(&1));
    q.complete(&l.handle(), vec![]).await.unwrap();
    assert_eq!(q.load(Stage::Encoder).await.unwrap().get(&5), Some(&0));
}

async fn workers_claim_only_jobs_of_their_models(q: Arc<dyn Queue>) {
    // Two models share the stage's shared queue; the older jobs, more than one page of the Redis
    // scan, belong to the other model.
    let mut others = Vec::new();
    for i in 0..300 {
        let mut other = new_job(&format!("other model {i}"));
        other.spec.model = "wan2.1-i2v-14b-480p".into();
        q.create(other.clone()).await.unwrap();
        others.push(other);
    }
    let mine = new_job("this model");
    q.create(mine.clone()).await.unwrap();
    let t2v = worker(Stage::Encoder, 0);
    let l = q.claim(&t2v, LEASE).await.unwrap().expect("the job of its model");
    assert_eq!(l.job.id, mine.id);
    assert!(q.claim(&t2v, LEASE).await.unwrap().is_none(), "never another model's job");
    let i2v =
        WorkerInfo { models: vec!["wan2.1-i2v-14b-480p".into()], ..worker(Stage::Encoder, 0) };
    let l = q.claim(&i2v, LEASE).await.unwrap().expect("the other model's jobs are still queued");
    assert_eq!(l.job.id, others[0].id, "in order");
}

async fn workers_claim_only_jobs_of_their_tasks(q: Arc<dyn Queue>) {
    // One model served by a text-to-image and an edit worker; the older job on the shared queue
    // is the text-to-image one.
    let t2i = jobs::new_job(jobs::t2i("draw"));
    let edit = jobs::new_job(JobSpec { task: Task::Edit, ..jobs::t2i("edit") });
    q.create(t2i.clone()).await.unwrap();
    q.create(edit.clone()).await.unwrap();
    let serving = |rank, task| WorkerInfo {
        models: vec![t2i.spec.model.clone()],
        tasks: vec![task],
        ..worker(Stage::Encoder, rank)
    };
    let editor = serving(1, Task::Edit);
    let l = q.claim(&editor, LEASE).await.unwrap().expect("the edit job");
    assert_eq!(l.job.id, edit.id);
    assert!(q.claim(&editor, LEASE).await.unwrap().is_none(), "never a job of another task");
    let l = q.claim(&serving(0, Task::T2i), LEASE).await.unwrap().expect("the t2i job is queued");
    assert_eq!(l.job.id, t2i.id);
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(std::sync::Arc::new(x2v_queue::MemoryQueue::default())).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $name() {
                    let server = x2v_testkit::redis::RedisServer::start();
                    let q = x2v_queue::RedisQueue::connect(&server.url(), "x2v", Default::default()).await.unwrap();
                    super::$name(std::sync::Arc::new(q)).await;
                }
            )*
        }
    };
}

contract!(
    create_then_get_round_trips,
    job_flows_through_every_stage,
    idempotency_key_never_creates_a_second_job,
    list_pages_in_both_orders,
    delete_cancels_queued_work,
    delete_stops_running_work,
    expired_lease_goes_back_to_the_queue,
    extended_lease_is_kept,
    failure_is_terminal_with_code_and_message,
    release_puts_the_job_first_in_line,
    ranks_are_assigned_by_load_and_dead_ranks_reassigned,
    unassigned_jobs_go_to_any_worker_of_the_stage,
    a_deregistered_rank_hands_its_queued_jobs_on,
    workers_claim_only_jobs_of_their_models,
    workers_claim_only_jobs_of_their_tasks,
);

#[tokio::test]
async fn redis_restart_with_aof_keeps_jobs_and_leases() {
    let mut server = RedisServer::start();
    let q = RedisQueue::connect(&server.url(), "x2v", Default::default()).await.unwrap();
    let queued = new_job("queued");
    let running = new_job("running");
    q.create(running.clone()).await.unwrap();
    q.create(queued.clone()).await.unwrap();
    let lease = q.claim(&worker(Stage::Encoder, 0), LEASE).await.unwrap().unwrap();
    server.kill();
    server.restart();
    // The connection manager reconnects; the first call after the restart may see the dropped link.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while q.ping().await.is_err() {
        assert!(std::time::Instant::now() < deadline, "no reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(q.get(queued.id).await.unwrap().status, JobStatus::Queued);
    assert_eq!(q.get(running.id).await.unwrap().status, JobStatus::InProgress);
    q.complete(&lease.handle(), vec![]).await.unwrap();
    assert_eq!(
        q.claim(&worker(Stage::Encoder, 0), LEASE).await.unwrap().unwrap().job.id,
        queued.id
    );
    assert_eq!(q.claim(&worker(Stage::Dit, 0), LEASE).await.unwrap().unwrap().job.id, running.id);
}
