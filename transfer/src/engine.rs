//! The per-process engine: a receive pool, a listener, an inbox of verified payloads, an outbox for
//! pulls, and a cache of authenticated connections to peers.
//!
//! The public API is async; each operation runs on a blocking thread with a cancel flag that the
//! caller's token, the deadline, or dropping the future trips.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use x2v_core::JobId;

use crate::channel::{self, Channel, Local};
use crate::config::EngineConfig;
use crate::conn::{CancelFlag, Ctx};
use crate::data;
use crate::error::{Result, TransferError};
use crate::manifest::{Payload, TensorMeta, validate_manifest};
use crate::pool::Pool;
use crate::received::{Receipt, Received};
use crate::wire::{Frame, read_frame, write_frame};

pub(crate) struct Inner {
    pub cfg: EngineConfig,
    pub pool: Pool,
    pub host_id: [u8; 16],
    pub shm_name: Option<String>,
    pub shutdown: CancelFlag,
    addr: SocketAddr,
    inbox: Mutex<HashMap<JobId, Received>>,
    inflight: Mutex<HashSet<JobId>>,
    arrived: tokio::sync::Notify,
    outbox: Mutex<HashMap<JobId, Outgoing>>,
    idle: Mutex<HashMap<SocketAddr, Vec<Channel>>>,
}

/// A published payload: removed by its first verified pull, or kept for every pull until a time.
#[derive(Clone)]
pub(crate) struct Outgoing {
    payload: Payload,
    /// `None`: the first verified pull consumes it. `Some(t)`: every pull may read it until `t`.
    retain_until: Option<Instant>,
}

impl Outgoing {
    fn expired(&self, now: Instant) -> bool {
        self.retain_until.is_some_and(|t| now >= t)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn job_from_wire(b: [u8; 16]) -> Result<JobId> {
    uuid::Uuid::from_bytes(b)
        .simple()
        .to_string()
        .parse()
        .map_err(|e| TransferError::Invalid(format!("bad job id on the wire: {e}")))
}

impl Inner {
    fn local(&self) -> Local<'_> {
        Local {
            secret: &self.cfg.secret,
            host_id: self.host_id,
            choice: self.cfg.transport,
            connect_timeout: self.cfg.connect_timeout,
            socket_buffer: self.cfg.socket_buffer,
            pool_region: self.pool.region(),
        }
    }

    fn checkout(&self, peer: SocketAddr, ctx: &Ctx) -> Result<Channel> {
        while let Some(ch) = lock(&self.idle).get_mut(&peer).and_then(Vec::pop) {
            if ch.is_alive() {
                return Ok(ch);
            }
        }
        channel::open(peer, &self.local(), ctx)
    }

    fn checkin(&self, peer: SocketAddr, ch: Channel) {
        lock(&self.idle).entry(peer).or_default().push(ch);
    }

    /// Validates a manifest, claims the job and reserves room, then takes the bytes and verifies them.
    /// `leaf_bytes`: the digests' leaf size, `None` when the payload carries no digests.
    pub fn receive(
        &self,
        ch: &mut Channel,
        job: JobId,
        leaf_bytes: Option<u32>,
        mut tensors: Vec<TensorMeta>,
        crc: bool,
        ctx: &Ctx,
    ) -> Result<Received> {
        validate_manifest(&tensors, self.pool.capacity() as u64)?;
        if leaf_bytes.is_none() {
            if let Some(t) = tensors.iter().find(|t| t.sha256.is_some()) {
                return Err(TransferError::Invalid(format!(
                    "tensor `{}` has a SHA-256 root but the manifest gives no leaf size",
                    t.name
                )));
            }
            if self.cfg.require_sha256 {
                return Err(TransferError::Invalid(format!(
                    "tensor `{}` has no SHA-256 and this receiver requires one",
                    tensors[0].name
                )));
            }
        }
        let sizes: Vec<u64> = tensors.iter().map(|t| t.byte_len).collect();
        let mut lease = self.pool.reserve(&sizes, ctx, self.cfg.pool_wait)?;
        let threads = self.cfg.hash_threads;
        let roots = data::recv(ch, &mut lease, &tensors, leaf_bytes, crc, threads, ctx)?;
        for (t, root) in tensors.iter_mut().zip(roots) {
            t.sha256 = root;
        }
        Ok(Received { job, tensors, lease, transport: ch.kind })
    }

    pub fn claim(&self, job: JobId) -> Result<Claim<'_>> {
        let busy = lock(&self.inbox).contains_key(&job);
        if busy || !lock(&self.inflight).insert(job) {
            return Err(TransferError::Conflict { job: job.to_string() });
        }
        Ok(Claim { inner: self, job })
    }

    pub fn deliver(&self, job: JobId, r: Received) -> Result<()> {
        lock(&self.inbox).insert(job, r);
        self.arrived.notify_waiters();
        Ok(())
    }

    pub fn outbox_get(&self, job: JobId) -> Result<Payload> {
        let now = Instant::now();
        let mut outbox = lock(&self.outbox);
        outbox.retain(|_, o| !o.expired(now));
        outbox
            .get(&job)
            .map(|o| o.payload.clone())
            .ok_or_else(|| TransferError::NotFound { job: job.to_string() })
    }

    /// A verified pull finished: a single-use payload is gone, a retained one stays.
    pub fn outbox_consumed(&self, job: JobId) {
        let mut outbox = lock(&self.outbox);
        if outbox.get(&job).is_some_and(|o| o.retain_until.is_none()) {
            outbox.remove(&job);
        }
    }

    fn publish(&self, job: JobId, payload: Payload, retain_until: Option<Instant>) -> Result<()> {
        let now = Instant::now();
        let mut outbox = lock(&self.outbox);
        outbox.retain(|_, o| !o.expired(now));
        if outbox.contains_key(&job) {
            return Err(TransferError::Conflict { job: job.to_string() });
        }
        outbox.insert(job, Outgoing { payload, retain_until });
        Ok(())
    }

    fn push(&self, peer: SocketAddr, job: JobId, payload: &Payload, ctx: &Ctx) -> Result<Receipt> {
        let start = Instant::now();
        let mut ch = self.checkout(peer, ctx)?;
        let begin = Frame::PushBegin {
            job: *job.as_uuid().as_bytes(),
            deadline_ms: ctx.remaining().as_millis() as u64,
            chunk_crc: self.cfg.chunk_crc,
            leaf_bytes: payload.leaf_bytes(),
            tensors: payload.manifest(),
        };
        write_frame(ch.stream.as_mut(), &begin, ctx, "announcing the payload")?;
        let cfg = &self.cfg;
        data::send(&mut ch, payload, cfg.chunk_bytes, cfg.chunk_crc, cfg.hash_threads, ctx)?;
        let transport = ch.kind;
        self.checkin(peer, ch);
        Ok(Receipt { bytes: payload.total_bytes(), transport, elapsed: start.elapsed() })
    }

    fn pull(&self, peer: SocketAddr, job: JobId, ctx: &Ctx) -> Result<Received> {
        let mut ch = self.checkout(peer, ctx)?;
        let request = Frame::PullRequest {
            job: *job.as_uuid().as_bytes(),
            deadline_ms: ctx.remaining().as_millis() as u64,
            chunk_crc: self.cfg.chunk_crc,
        };
        write_frame(ch.stream.as_mut(), &request, ctx, "requesting the payload")?;
        let (leaf_bytes, tensors) =
            match read_frame(ch.stream.as_mut(), ctx, "waiting for the manifest")? {
                Frame::Manifest { leaf_bytes, tensors } => (leaf_bytes, tensors),
                Frame::Error { kind, message } => {
                    return Err(TransferError::Remote { peer: ctx.peer.clone(), kind, message });
                }
                other => {
                    return Err(TransferError::protocol(
                        &ctx.peer,
                        format!("expected Manifest, got {}", other.name()),
                    ));
                }
            };
        let crc = self.cfg.chunk_crc;
        let received =
            self.receive(&mut ch, job, leaf_bytes, tensors, crc, ctx).inspect_err(|e| {
                let _ = write_frame(
                    ch.stream.as_mut(),
                    &Frame::Error { kind: e.kind(), message: e.to_string() },
                    ctx,
                    "error",
                );
            })?;
        write_frame(ch.stream.as_mut(), &Frame::Ack, ctx, "acknowledging")?;
        self.checkin(peer, ch);
        Ok(received)
    }
}

/// Marks a job as in flight on this receiver until dropped.
pub(crate) struct Claim<'a> {
    inner: &'a Inner,
    job: JobId,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        lock(&self.inner.inflight).remove(&self.job);
    }
}

#[path = "engine_api.rs"]
mod api;
pub use api::Engine;
