//! Redis backend: job hashes, per-stage per-rank FIFO lists, lease sorted sets, a heartbeat sorted
//! set, per-stage load counters and pub/sub events. Every state change runs as one Lua script, so a
//! crash between two commands cannot lose or duplicate a job. With AOF on, jobs survive a Redis
//! restart. Keys (prefix `x2v` by default; not cluster-slot aware):
//!
//! - `{p}:job:{id}` hash: the record; `{p}:index:{resource}` zset (score 0, ordered by id) for lists
//! - `{p}:q:{stage}:{rank|any}` list; `{p}:leases:{stage}` zset of lease deadlines
//! - `{p}:hb` zset of worker heartbeat deadlines, `{p}:workers` hash of worker info,
//!   `{p}:load:{stage}` hash rank -> outstanding jobs
//! - `{p}:idem:{key}` string with TTL; `{p}:ev:{id}` pub/sub channel

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script, Value};
use x2v_core::JobId;

use crate::error::QueueError;
use crate::events::until_terminal;
use crate::memory::Retention;
use crate::queue::*;
use crate::record::{JobError, JobEvent, JobRecord, OutputRef};
use crate::redis_record::{hash_fields, is_deleted, pairs, record_from_fields};
use crate::spec::Stage;

macro_rules! script {
    ($name:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("lua/common.lua"),
                include_str!(concat!("lua/", $name))
            ))
        })
    };
}

/// Source of the job-creation script (for `redis-benchmark` comparisons).
pub const CREATE_LUA: &str =
    concat!(include_str!("lua/common.lua"), include_str!("lua/create.lua"));

static CREATE: LazyLock<Script> = LazyLock::new(|| Script::new(CREATE_LUA));
static CLAIM: LazyLock<Script> = script!("claim.lua");
static LEASE: LazyLock<Script> = script!("lease.lua");
static DELETE: LazyLock<Script> = script!("delete.lua");
static MAINTAIN: LazyLock<Script> = script!("maintain.lua");

/// The Redis [`Queue`].
#[derive(Clone)]
pub struct RedisQueue {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: Arc<str>,
    retention: Arc<Retention>,
}

impl RedisQueue {
    /// Connects to `url` (`redis://host:port/db`); keys live under `prefix`.
    pub async fn connect(
        url: &str,
        prefix: &str,
        retention: Retention,
    ) -> Result<Self, QueueError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)));
        let conn = ConnectionManager::new_with_config(client.clone(), config).await?;
        Ok(RedisQueue { client, conn, prefix: prefix.into(), retention: Arc::new(retention) })
    }

    fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.prefix)
    }

    fn invocation<'a>(&self, script: &'a Script) -> redis::ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        inv.arg(&*self.prefix).arg(now_ms());
        inv
    }

    async fn lease_op(
        &self,
        lease: &LeaseRef,
        op: &str,
        args: &[String],
    ) -> Result<String, QueueError> {
        let mut inv = self.invocation(&LEASE);
        inv.arg(op).arg(lease.id.to_string()).arg(lease.stage.as_str()).arg(&lease.token);
        for a in args {
            inv.arg(a);
        }
        let reply: String = inv.invoke_async(&mut self.conn.clone()).await?;
        Ok(reply)
    }

    /// Maps a lease-op reply for operations that must hold the lease.
    fn held(reply: String, lease: &LeaseRef) -> Result<(), QueueError> {
        match reply.as_str() {
            "ok" => Ok(()),
            "cancel" | "cancelled" => Err(QueueError::Cancelled(lease.id.to_string())),
            _ => Err(QueueError::LeaseLost(lease.id.to_string())),
        }
    }

    fn control(reply: String, lease: &LeaseRef) -> Result<Control, QueueError> {
        match reply.as_str() {
            "ok" => Ok(Control::Continue),
            "cancel" | "cancelled" => Ok(Control::Cancel),
            _ => Err(QueueError::LeaseLost(lease.id.to_string())),
        }
    }
}

/// A `{p}:load:{stage}` hash as rank -> outstanding jobs (a count below zero reads as none).
fn rank_loads(raw: HashMap<String, i64>) -> HashMap<u32, u64> {
    raw.into_iter().filter_map(|(r, n)| Some((r.parse().ok()?, n.max(0) as u64))).collect()
}

fn ms(d: Duration) -> u64 {
    d.as_millis().max(1) as u64
}

#[async_trait]
impl Queue for RedisQueue {
    async fn create(&self, job: NewJob) -> Result<Created, QueueError> {
        let spec =
            serde_json::to_string(&job.spec).map_err(|e| QueueError::Invalid(e.to_string()))?;
        let trace = serde_json::to_string(&job.trace).expect("string map serializes");
        let rank = |s: Stage| job.ranks.get(s).map(|r| r.to_string()).unwrap_or_default();
        let (idem, fp) = job
            .idempotency
            .as_ref()
            .map(|i| (i.key.as_str(), i.fingerprint.as_str()))
            .unwrap_or(("", ""));
        let mut inv = self.invocation(&CREATE);
        inv.arg(job.id.to_string()).arg(job.spec.task.resource().as_str()).arg(spec).arg(trace);
        inv.arg(rank(Stage::Encoder)).arg(rank(Stage::Dit)).arg(rank(Stage::Decoder));
        inv.arg(idem).arg(fp).arg(ms(self.retention.idempotency_ttl));
        let reply: Vec<Value> = inv.invoke_async(&mut self.conn.clone()).await?;
        let tag: String =
            reply.first().map(redis::from_redis_value_ref).transpose()?.unwrap_or_default();
        match tag.as_str() {
            "created" => Ok(Created { record: job.into_queued_record(), created: true }),
            "existing" => {
                Ok(Created { record: record_from_fields(&pairs(&reply[1..])?)?, created: false })
            }
            _ => Err(QueueError::IdempotencyMismatch(
                job.idempotency.map(|i| i.key).unwrap_or_default(),
            )),
        }
    }

    async fn get(&self, id: JobId) -> Result<JobRecord, QueueError> {
        let reply: Value = self.conn.clone().hgetall(self.key(&format!("job:{id}"))).await?;
        let fields = hash_fields(&reply)?;
        if fields.is_empty() || is_deleted(&fields) {
            return Err(QueueError::NotFound(id.to_string()));
        }
        record_from_fields(&fields)
    }

    async fn list(&self, q: ListQuery) -> Result<Page, QueueError> {
        let index = self.key(&format!("index:{}", q.resource.as_str()));
        let mut conn = self.conn.clone();
        let mut jobs = Vec::with_capacity(q.limit);
        let mut cursor = q.after.map(|a| a.to_string());
        loop {
            let want = q.limit - jobs.len() + 1;
            let ids: Vec<String> = match (q.order, &cursor) {
                (Order::Asc, c) => {
                    let min = c.as_ref().map(|a| format!("({a}")).unwrap_or_else(|| "-".into());
                    conn.zrangebylex_limit(&index, min, "+", 0, want as isize).await?
                }
                (Order::Desc, c) => {
                    let max = c.as_ref().map(|a| format!("({a}")).unwrap_or_else(|| "+".into());
                    conn.zrevrangebylex_limit(&index, max, "-", 0, want as isize).await?
                }
            };
            if ids.is_empty() {
                return Ok(Page { jobs, has_more: false });
            }
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.hgetall(self.key(&format!("job:{id}")));
            }
            let hashes: Vec<Value> = pipe.query_async(&mut conn).await?;
            for (id, hash) in ids.iter().zip(&hashes) {
                if jobs.len() == q.limit {
                    return Ok(Page { jobs, has_more: true });
                }
                let fields = hash_fields(hash)?;
                if fields.is_empty() {
                    // Expired by its TTL: drop it from the index as well.
                    let _: () = conn.zrem(&index, id).await?;
                } else {
                    jobs.push(record_from_fields(&fields)?);
                }
            }
            if ids.len() < want || jobs.len() == q.limit {
                return Ok(Page { jobs, has_more: false });
            }
            cursor = ids.last().cloned();
        }
    }

    async fn delete(&self, id: JobId) -> Result<JobRecord, QueueError> {
        let mut inv = self.invocation(&DELETE);
        inv.arg(id.to_string()).arg(ms(self.retention.tombstone_ttl));
        let reply: Value = inv.invoke_async(&mut self.conn.clone()).await?;
        match reply {
            Value::Nil => Err(QueueError::NotFound(id.to_string())),
            Value::Array(items) => record_from_fields(&pairs(&items)?),
            other => Err(QueueError::Corrupt {
                id: id.to_string(),
                message: format!("delete replied {other:?}"),
            }),
        }
    }

    async fn subscribe(&self, id: JobId) -> Result<BoxStream<'static, JobEvent>, QueueError> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(self.key(&format!("ev:{id}"))).await?;
        let first = JobEvent::of("status", &self.get(id).await?);
        if first.status.is_terminal() {
            return Ok(futures::stream::iter([first]).boxed());
        }
        // The sink owns the connection: it must live as long as the stream.
        let (sink, stream) = pubsub.split();
        let rest = stream.filter_map(move |msg| {
            let _connection = &sink;
            async move {
                let payload: String = msg.get_payload().ok()?;
                serde_json::from_str::<JobEvent>(&payload).ok()
            }
        });
        Ok(until_terminal(futures::stream::iter([first]).chain(rest)))
    }

    async fn heartbeat(&self, worker: &WorkerInfo, ttl: Duration) -> Result<(), QueueError> {
        let info = serde_json::to_string(worker).expect("worker info serializes");
        let _: () = redis::pipe()
            .atomic()
            .hset(self.key("workers"), worker.id(), info)
            .zadd(self.key("hb"), worker.id(), now_ms() + ms(ttl))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn deregister(&self, worker: &WorkerInfo) -> Result<(), QueueError> {
        // Expire it now; the next maintenance pass moves its queued jobs to the shared queue.
        let _: () = self.conn.clone().zadd(self.key("hb"), worker.id(), 0).await?;
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>, QueueError> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> =
            conn.zrangebyscore(self.key("hb"), format!("({}", now_ms()), "+inf").await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let infos: Vec<Option<String>> =
            redis::cmd("HMGET").arg(self.key("workers")).arg(&ids).query_async(&mut conn).await?;
        let mut v: Vec<WorkerInfo> =
            infos.into_iter().flatten().filter_map(|s| serde_json::from_str(&s).ok()).collect();
        v.sort_by_key(|w| (w.stage, w.rank));
        Ok(v)
    }

    async fn load(&self, stage: Stage) -> Result<HashMap<u32, u64>, QueueError> {
        let raw: HashMap<String, i64> =
            self.conn.clone().hgetall(self.key(&format!("load:{stage}"))).await?;
        Ok(rank_loads(raw))
    }

    async fn loads(
        &self,
        stages: &[Stage],
    ) -> Result<HashMap<Stage, HashMap<u32, u64>>, QueueError> {
        let mut pipe = redis::pipe();
        for stage in stages {
            pipe.hgetall(self.key(&format!("load:{stage}")));
        }
        let raw: Vec<HashMap<String, i64>> = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(stages.iter().copied().zip(raw.into_iter().map(rank_loads)).collect())
    }

    async fn depth(&self, stage: Stage) -> Result<u64, QueueError> {
        let mut conn = self.conn.clone();
        let ranks: Vec<String> = conn.hkeys(self.key(&format!("load:{stage}"))).await?;
        let mut pipe = redis::pipe();
        for r in ranks.iter().map(String::as_str).chain(["any"]) {
            pipe.llen(self.key(&format!("q:{stage}:{r}")));
        }
        let lens: Vec<u64> = pipe.query_async(&mut conn).await?;
        Ok(lens.into_iter().sum())
    }

    async fn claim(
        &self,
        worker: &WorkerInfo,
        lease: Duration,
    ) -> Result<Option<Lease>, QueueError> {
        let token = JobId::new().to_string();
        let mut inv = self.invocation(&CLAIM);
        let models = serde_json::to_string(&worker.models).expect("model names serialize");
        let tasks = serde_json::to_string(&worker.tasks).expect("tasks serialize");
        inv.arg(worker.stage.as_str()).arg(worker.rank).arg(ms(lease)).arg(&token);
        inv.arg(models).arg(tasks);
        let reply: Value = inv.invoke_async(&mut self.conn.clone()).await?;
        match reply {
            Value::Nil => Ok(None),
            Value::Array(items) => {
                let job = record_from_fields(&pairs(&items)?)?;
                Ok(Some(Lease { job, stage: worker.stage, token }))
            }
            other => Err(QueueError::Corrupt {
                id: String::new(),
                message: format!("claim replied {other:?}"),
            }),
        }
    }

    async fn extend(&self, lease: &LeaseRef, ttl: Duration) -> Result<Control, QueueError> {
        Self::control(self.lease_op(lease, "extend", &[ms(ttl).to_string()]).await?, lease)
    }

    async fn progress(
        &self,
        lease: &LeaseRef,
        step: u32,
        total: u32,
    ) -> Result<Control, QueueError> {
        Self::control(
            self.lease_op(lease, "progress", &[step.to_string(), total.to_string()]).await?,
            lease,
        )
    }

    async fn partial(&self, lease: &LeaseRef, output: OutputRef) -> Result<Control, QueueError> {
        let output = serde_json::to_string(&output).expect("an output serializes");
        Self::control(self.lease_op(lease, "partial", &[output]).await?, lease)
    }

    async fn complete(&self, lease: &LeaseRef, outputs: Vec<OutputRef>) -> Result<(), QueueError> {
        let outputs = serde_json::to_string(&outputs).expect("outputs serialize");
        let ttl = ms(self.retention.finished_ttl).to_string();
        Self::held(self.lease_op(lease, "complete", &[outputs, ttl]).await?, lease)
    }

    async fn fail(&self, lease: &LeaseRef, error: &JobError) -> Result<(), QueueError> {
        let ttl = ms(self.retention.finished_ttl).to_string();
        let args = [
            error.code.as_str().to_owned(),
            error.message.clone(),
            ttl,
            error.kind.as_str().to_owned(),
        ];
        Self::held(self.lease_op(lease, "fail", &args).await?, lease)
    }

    async fn release(&self, lease: &LeaseRef) -> Result<(), QueueError> {
        Self::held(self.lease_op(lease, "release", &[]).await?, lease)
    }

    async fn maintain(&self) -> Result<Maintenance, QueueError> {
        let (expired_leases, reassigned, dead_workers): (usize, usize, usize) =
            self.invocation(&MAINTAIN).invoke_async(&mut self.conn.clone()).await?;
        Ok(Maintenance { expired_leases, reassigned, dead_workers })
    }

    async fn ping(&self) -> Result<(), QueueError> {
        let _: String = redis::cmd("PING").query_async(&mut self.conn.clone()).await?;
        Ok(())
    }
}
