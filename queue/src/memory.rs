//! In-process backend for the embedded single-process mode: the same contract as Redis, held in one
//! mutex (every operation is short and never awaits while holding it). Leases and heartbeats use
//! `tokio::time`, so tests can drive them with `tokio::time::pause`.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::broadcast;
use tokio::time::Instant;
use x2v_core::JobId;

use crate::error::QueueError;
use crate::queue::*;
use crate::record::{JobError, JobEvent, JobRecord, JobStatus, OutputRef, stage_progress};
use crate::spec::{Resource, Stage};

/// Tunables shared by both backends.
#[derive(Debug, Clone)]
pub struct Retention {
    /// How long finished (completed/failed) jobs stay readable.
    pub finished_ttl: Duration,
    /// How long a deleted job's tombstone stays, so workers still holding it learn it was cancelled.
    pub tombstone_ttl: Duration,
    /// How long an idempotency key maps to its job.
    pub idempotency_ttl: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            finished_ttl: Duration::from_secs(24 * 3600),
            tombstone_ttl: Duration::from_secs(600),
            idempotency_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

struct Entry {
    rec: JobRecord,
    deleted: bool,
    expires: Option<Instant>,
    lease: Option<(String, Instant)>,
    fingerprint: Option<String>,
}

#[derive(Default)]
struct State {
    jobs: HashMap<JobId, Entry>,
    index: HashMap<Resource, BTreeSet<JobId>>,
    queues: HashMap<(Stage, Option<u32>), VecDeque<JobId>>,
    idem: HashMap<String, (JobId, Instant)>,
    workers: HashMap<String, (WorkerInfo, Instant)>,
    load: HashMap<(Stage, u32), u64>,
    events: HashMap<JobId, broadcast::Sender<JobEvent>>,
}

/// The in-memory [`Queue`].
#[derive(Clone, Default)]
pub struct MemoryQueue {
    state: Arc<Mutex<State>>,
    retention: Arc<Retention>,
}

impl MemoryQueue {
    pub fn new(retention: Retention) -> Self {
        MemoryQueue { state: Arc::default(), retention: Arc::new(retention) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    fn publish(&mut self, kind: &str, id: JobId) {
        let Some(e) = self.jobs.get(&id) else { return };
        let event = JobEvent::of(kind, &e.rec);
        if let Some(tx) = self.events.get(&id) {
            let _ = tx.send(event.clone());
            if event.status.is_terminal() {
                self.events.remove(&id);
            }
        }
    }

    fn live(&self, stage: Stage, rank: u32, now: Instant) -> bool {
        self.workers.get(&format!("{stage}-{rank}")).is_some_and(|(_, exp)| *exp > now)
    }

    fn unload(&mut self, stage: Stage, rank: Option<u32>) {
        if let Some(r) = rank
            && let Some(n) = self.load.get_mut(&(stage, r))
        {
            *n = n.saturating_sub(1);
        }
    }

    /// Puts a job on `stage`'s queue for its assigned rank, or the shared queue if that rank is dead.
    fn enqueue(&mut self, id: JobId, stage: Stage, front: bool, now: Instant) {
        let rank = self.jobs[&id].rec.ranks.get(stage);
        let rank = match rank {
            Some(r) if self.live(stage, r, now) => Some(r),
            Some(r) => {
                self.unload(stage, Some(r));
                self.jobs.get_mut(&id).expect("job exists").rec.ranks.set(stage, None);
                None
            }
            None => None,
        };
        let q = self.queues.entry((stage, rank)).or_default();
        if front { q.push_front(id) } else { q.push_back(id) }
    }

    /// Ends a job: terminal status, loads released, queues and lease cleared.
    fn finish(&mut self, id: JobId, status: JobStatus, ttl: Duration, now: Instant) {
        let e = self.jobs.get_mut(&id).expect("job exists");
        let (stage, ranks) = (e.rec.stage, e.rec.ranks);
        e.rec.status = status;
        e.rec.stage = None;
        e.lease = None;
        e.rec.finished_at_ms = Some(now_ms());
        e.expires = Some(now + ttl);
        if let Some(stage) = stage {
            for s in Stage::ALL.into_iter().filter(|s| *s >= stage) {
                self.unload(s, ranks.get(s));
            }
            for q in self.queues.iter_mut().filter(|((s, _), _)| *s == stage).map(|(_, q)| q) {
                q.retain(|j| *j != id);
            }
        }
        self.publish("status", id);
    }

    fn leased(&mut self, lease: &LeaseRef) -> Result<&mut Entry, QueueError> {
        let lost = || QueueError::LeaseLost(lease.id.to_string());
        let e = self.jobs.get_mut(&lease.id).ok_or_else(lost)?;
        match &e.lease {
            Some((token, _)) if *token == lease.token && e.rec.stage == Some(lease.stage) => Ok(e),
            _ if e.rec.cancel_requested => Err(QueueError::Cancelled(lease.id.to_string())),
            _ => Err(lost()),
        }
    }

    /// The entry of a held lease that reports (progress, a partial output), or `None` when its
    /// job is cancelled and the worker should stop.
    fn reporting(&mut self, lease: &LeaseRef) -> Result<Option<&mut Entry>, QueueError> {
        match self.leased(lease) {
            Ok(e) if e.rec.cancel_requested => Ok(None),
            Ok(e) => Ok(Some(e)),
            Err(QueueError::Cancelled(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn purge(&mut self, now: Instant) {
        let expired: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, e)| e.expires.is_some_and(|t| t <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(e) = self.jobs.remove(&id) {
                self.index.entry(e.rec.resource).or_default().remove(&id);
            }
        }
        self.idem.retain(|_, (_, exp)| *exp > now);
    }

    fn expire_leases(&mut self, now: Instant) -> usize {
        let expired: Vec<(JobId, Stage)> = self
            .jobs
            .iter()
            .filter(|(_, e)| e.lease.as_ref().is_some_and(|(_, d)| *d <= now))
            .filter_map(|(id, e)| Some((*id, e.rec.stage?)))
            .collect();
        for (id, stage) in &expired {
            let e = self.jobs.get_mut(id).expect("job exists");
            e.lease = None;
            // Step counts belong to a claim: a job waiting in a queue shows none.
            (e.rec.step, e.rec.total_steps) = (0, 0);
            let rank = e.rec.ranks.get(*stage);
            e.rec.ranks.set(*stage, None);
            self.unload(*stage, rank);
            self.enqueue(*id, *stage, true, now);
        }
        expired.len()
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn create(&self, job: NewJob) -> Result<Created, QueueError> {
        let now = Instant::now();
        let mut st = self.lock();
        st.purge(now);
        if let Some(idem) = &job.idempotency
            && let Some((id, _)) = st.idem.get(&idem.key).copied()
            && let Some(e) = st.jobs.get(&id).filter(|e| !e.deleted)
        {
            if e.fingerprint.as_deref() != Some(idem.fingerprint.as_str()) {
                return Err(QueueError::IdempotencyMismatch(idem.key.clone()));
            }
            return Ok(Created { record: e.rec.clone(), created: false });
        }
        let rec = job.queued_record();
        for s in Stage::ALL {
            if let Some(r) = rec.ranks.get(s) {
                *st.load.entry((s, r)).or_default() += 1;
            }
        }
        st.index.entry(rec.resource).or_default().insert(rec.id);
        let fingerprint = job.idempotency.as_ref().map(|i| i.fingerprint.clone());
        if let Some(idem) = job.idempotency {
            st.idem.insert(idem.key, (rec.id, now + self.retention.idempotency_ttl));
        }
        st.jobs.insert(
            rec.id,
            Entry { rec: rec.clone(), deleted: false, expires: None, lease: None, fingerprint },
        );
        st.enqueue(rec.id, Stage::Encoder, false, now);
        Ok(Created { record: rec, created: true })
    }

    async fn get(&self, id: JobId) -> Result<JobRecord, QueueError> {
        let mut st = self.lock();
        st.purge(Instant::now());
        st.jobs
            .get(&id)
            .filter(|e| !e.deleted)
            .map(|e| e.rec.clone())
            .ok_or_else(|| QueueError::NotFound(id.to_string()))
    }

    async fn list(&self, q: ListQuery) -> Result<Page, QueueError> {
        let mut st = self.lock();
        st.purge(Instant::now());
        let Some(index) = st.index.get(&q.resource) else {
            return Ok(Page { jobs: vec![], has_more: false });
        };
        let ids: Vec<JobId> = match (q.order, q.after) {
            (Order::Asc, None) => index.iter().copied().take(q.limit + 1).collect(),
            (Order::Asc, Some(a)) => index
                .range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                .copied()
                .take(q.limit + 1)
                .collect(),
            (Order::Desc, None) => index.iter().rev().copied().take(q.limit + 1).collect(),
            (Order::Desc, Some(a)) => index.range(..a).rev().copied().take(q.limit + 1).collect(),
        };
        let has_more = ids.len() > q.limit;
        let jobs = ids
            .into_iter()
            .take(q.limit)
            .filter_map(|id| st.jobs.get(&id).map(|e| e.rec.clone()))
            .collect();
        Ok(Page { jobs, has_more })
    }

    async fn delete(&self, id: JobId) -> Result<JobRecord, QueueError> {
        let now = Instant::now();
        let mut st = self.lock();
        let e = st
            .jobs
            .get_mut(&id)
            .filter(|e| !e.deleted)
            .ok_or_else(|| QueueError::NotFound(id.to_string()))?;
        e.deleted = true;
        e.rec.cancel_requested = true;
        let (resource, status) = (e.rec.resource, e.rec.status);
        st.index.entry(resource).or_default().remove(&id);
        if !status.is_terminal() {
            st.finish(id, JobStatus::Cancelled, self.retention.tombstone_ttl, now);
        }
        let e = st.jobs.get_mut(&id).expect("job exists");
        e.expires = Some(now + self.retention.tombstone_ttl);
        Ok(e.rec.clone())
    }

    async fn subscribe(&self, id: JobId) -> Result<BoxStream<'static, JobEvent>, QueueError> {
        let mut st = self.lock();
        let e = st
            .jobs
            .get(&id)
            .filter(|e| !e.deleted)
            .ok_or_else(|| QueueError::NotFound(id.to_string()))?;
        let first = JobEvent::of("status", &e.rec);
        if first.status.is_terminal() {
            return Ok(futures::stream::iter([first]).boxed());
        }
        let rx = st.events.entry(id).or_insert_with(|| broadcast::channel(256).0).subscribe();
        let rest =
            tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(|r| async move { r.ok() });
        Ok(crate::events::until_terminal(futures::stream::iter([first]).chain(rest)))
    }

    async fn heartbeat(&self, worker: &WorkerInfo, ttl: Duration) -> Result<(), QueueError> {
        self.lock().workers.insert(worker.id(), (worker.clone(), Instant::now() + ttl));
        Ok(())
    }

    async fn deregister(&self, worker: &WorkerInfo) -> Result<(), QueueError> {
        // Expire it now (as the Redis backend does); the next maintenance pass moves the jobs still
        // queued for its rank to the shared queue.
        if let Some((_, expiry)) = self.lock().workers.get_mut(&worker.id()) {
            *expiry = Instant::now();
        }
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>, QueueError> {
        let now = Instant::now();
        let st = self.lock();
        let mut v: Vec<WorkerInfo> =
            st.workers.values().filter(|(_, e)| *e > now).map(|(w, _)| w.clone()).collect();
        v.sort_by_key(|w| (w.stage, w.rank));
        Ok(v)
    }

    async fn load(&self, stage: Stage) -> Result<HashMap<u32, u64>, QueueError> {
        Ok(self
            .lock()
            .load
            .iter()
            .filter(|((s, _), _)| *s == stage)
            .map(|((_, r), n)| (*r, *n))
            .collect())
    }

    async fn depth(&self, stage: Stage) -> Result<u64, QueueError> {
        Ok(self
            .lock()
            .queues
            .iter()
            .filter(|((s, _), _)| *s == stage)
            .map(|(_, q)| q.len() as u64)
            .sum())
    }

    async fn claim(
        &self,
        worker: &WorkerInfo,
        lease: Duration,
    ) -> Result<Option<Lease>, QueueError> {
        let now = Instant::now();
        let mut st = self.lock();
        st.expire_leases(now);
        // The oldest job of a model and task this worker serves, from its rank's queue, then the
        // shared one (as the Redis backend): other jobs stay queued, stale entries are dropped.
        for key in [(worker.stage, Some(worker.rank)), (worker.stage, None)] {
            let Some(queue) = st.queues.get(&key) else { continue };
            let mut stale = Vec::new();
            let mut found = None;
            for (i, id) in queue.iter().enumerate() {
                match st.jobs.get(id) {
                    Some(e)
                        if !e.rec.cancel_requested
                            && !e.rec.status.is_terminal()
                            && e.rec.stage == Some(worker.stage) =>
                    {
                        if worker.serves(&e.rec.spec) {
                            found = Some(i);
                            break;
                        }
                    }
                    _ => stale.push(i),
                }
            }
            let queue = st.queues.get_mut(&key).expect("looked up above");
            let id = found.and_then(|i| queue.remove(i));
            for i in stale.into_iter().rev() {
                queue.remove(i);
            }
            let Some(id) = id else { continue };
            let Some(e) = st.jobs.get_mut(&id) else { continue };
            let token = JobId::new().to_string();
            e.lease = Some((token.clone(), now + lease));
            e.rec.status = JobStatus::InProgress;
            e.rec.attempts += 1;
            e.rec.step = 0;
            e.rec.total_steps = 0;
            e.rec.progress = e.rec.progress.max(worker.stage.progress_span().0);
            let newly_assigned = e.rec.ranks.get(worker.stage).is_none();
            e.rec.ranks.set(worker.stage, Some(worker.rank));
            let rec = e.rec.clone();
            if newly_assigned {
                *st.load.entry((worker.stage, worker.rank)).or_default() += 1;
            }
            st.publish("status", id);
            return Ok(Some(Lease { job: rec, stage: worker.stage, token }));
        }
        Ok(None)
    }

    async fn extend(&self, lease: &LeaseRef, ttl: Duration) -> Result<Control, QueueError> {
        let mut st = self.lock();
        match st.leased(lease) {
            Ok(e) if e.rec.cancel_requested => Ok(Control::Cancel),
            Ok(e) => {
                e.lease = Some((lease.token.clone(), Instant::now() + ttl));
                Ok(Control::Continue)
            }
            Err(QueueError::Cancelled(_)) => Ok(Control::Cancel),
            Err(e) => Err(e),
        }
    }

    async fn progress(
        &self,
        lease: &LeaseRef,
        step: u32,
        total: u32,
    ) -> Result<Control, QueueError> {
        let mut st = self.lock();
        let Some(e) = st.reporting(lease)? else { return Ok(Control::Cancel) };
        e.rec.step = step;
        e.rec.total_steps = total;
        e.rec.progress = e.rec.progress.max(stage_progress(lease.stage, step, total));
        st.publish("progress", lease.id);
        Ok(Control::Continue)
    }

    async fn partial(&self, lease: &LeaseRef, output: OutputRef) -> Result<Control, QueueError> {
        let mut st = self.lock();
        let Some(e) = st.reporting(lease)? else { return Ok(Control::Cancel) };
        e.rec.outputs.push(output);
        st.publish("partial", lease.id);
        Ok(Control::Continue)
    }

    async fn complete(&self, lease: &LeaseRef, outputs: Vec<OutputRef>) -> Result<(), QueueError> {
        let now = Instant::now();
        let mut st = self.lock();
        let e = st.leased(lease)?;
        if e.rec.cancel_requested {
            return Err(QueueError::Cancelled(lease.id.to_string()));
        }
        e.lease = None;
        e.rec.outputs.extend(outputs);
        let rank = e.rec.ranks.get(lease.stage);
        match lease.stage.next() {
            Some(next) => {
                e.rec.stage = Some(next);
                (e.rec.step, e.rec.total_steps) = (0, 0);
                e.rec.progress = e.rec.progress.max(lease.stage.progress_span().1);
                st.unload(lease.stage, rank);
                st.enqueue(lease.id, next, false, now);
                st.publish("status", lease.id);
            }
            None => {
                e.rec.progress = 100;
                st.finish(lease.id, JobStatus::Completed, self.retention.finished_ttl, now);
            }
        }
        Ok(())
    }

    async fn fail(&self, lease: &LeaseRef, error: &JobError) -> Result<(), QueueError> {
        let now = Instant::now();
        let mut st = self.lock();
        let e = st.leased(lease)?;
        e.rec.error = Some(error.clone());
        st.finish(lease.id, JobStatus::Failed, self.retention.finished_ttl, now);
        Ok(())
    }

    async fn release(&self, lease: &LeaseRef) -> Result<(), QueueError> {
        let now = Instant::now();
        let mut st = self.lock();
        let e = st.leased(lease)?;
        e.lease = None;
        (e.rec.step, e.rec.total_steps) = (0, 0);
        st.enqueue(lease.id, lease.stage, true, now);
        Ok(())
    }

    async fn maintain(&self) -> Result<Maintenance, QueueError> {
        let now = Instant::now();
        let mut st = self.lock();
        st.purge(now);
        let expired_leases = st.expire_leases(now);
        let dead: Vec<WorkerInfo> =
            st.workers.values().filter(|(_, e)| *e <= now).map(|(w, _)| w.clone()).collect();
        let mut reassigned = 0;
        for w in &dead {
            st.workers.remove(&w.id());
            st.load.remove(&(w.stage, w.rank));
            let moved: Vec<JobId> =
                st.queues.remove(&(w.stage, Some(w.rank))).unwrap_or_default().into();
            reassigned += moved.len();
            for id in moved {
                if let Some(e) = st.jobs.get_mut(&id) {
                    e.rec.ranks.set(w.stage, None);
                }
                st.queues.entry((w.stage, None)).or_default().push_back(id);
            }
        }
        Ok(Maintenance { expired_leases, reassigned, dead_workers: dead.len() })
    }

    async fn ping(&self) -> Result<(), QueueError> {
        Ok(())
    }
}
