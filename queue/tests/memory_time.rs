//! Lease and heartbeat timing of the in-memory backend and the worker API, under paused tokio time.

use std::sync::Arc;
use std::time::Duration;

use x2v_queue::worker::{StageWorker, WorkerTimings};
use x2v_queue::*;
use x2v_testkit::jobs;

fn job() -> NewJob {
    jobs::new_job(jobs::t2i("p"))
}

fn info(rank: u32) -> WorkerInfo {
    WorkerInfo {
        stage: Stage::Encoder,
        rank,
        models: vec!["m".into()],
        tasks: vec![Task::T2i],
        capacity: 1,
        unfit_loras: Default::default(),
    }
}

#[tokio::test(start_paused = true)]
async fn lease_expires_exactly_after_its_length() {
    let q = MemoryQueue::default();
    q.create(job()).await.unwrap();
    q.claim(&info(0), Duration::from_secs(30)).await.unwrap().unwrap();
    tokio::time::advance(Duration::from_secs(29)).await;
    assert!(q.claim(&info(1), Duration::from_secs(30)).await.unwrap().is_none());
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(q.claim(&info(1), Duration::from_secs(30)).await.unwrap().is_some());
}

#[tokio::test(start_paused = true)]
async fn claimed_job_keeps_its_lease_and_sees_cancellation() {
    let q: Arc<dyn Queue> = Arc::new(MemoryQueue::default());
    let id = q.create(job()).await.unwrap().record.id;
    let timings = WorkerTimings { lease: Duration::from_secs(30), ..WorkerTimings::default() };
    let w = StageWorker::new(q.clone(), info(0), timings);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let claimed = w.next(&shutdown).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert!(
        q.claim(&info(1), Duration::from_secs(30)).await.unwrap().is_none(),
        "keep-alive held the lease"
    );
    q.delete(id).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), claimed.cancelled().cancelled())
        .await
        .expect("cancel observed");
}

#[tokio::test(start_paused = true)]
async fn worker_registration_lapses_without_heartbeats() {
    let q: Arc<dyn Queue> = Arc::new(MemoryQueue::default());
    let timings =
        WorkerTimings { heartbeat_ttl: Duration::from_secs(15), ..WorkerTimings::default() };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let handle =
        StageWorker::new(q.clone(), info(3), timings).register(shutdown.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(q.workers().await.unwrap().len(), 1, "heartbeats keep it live");
    shutdown.cancel();
    handle.await.unwrap();
    assert!(q.workers().await.unwrap().is_empty());
}
