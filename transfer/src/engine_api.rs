//! The public face of the engine: start, push, pull, publish, recv, shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use x2v_core::JobId;

use super::{Inner, lock};
use crate::channel;
use crate::config::{EngineConfig, Opts};
use crate::conn::{CancelFlag, Ctx};
use crate::error::{Result, TransferError};
use crate::manifest::Payload;
use crate::pool::Pool;
use crate::received::{Receipt, Received};
use crate::serve;

/// One per process. Cheap to clone; the listener stops when the last clone is dropped.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
    _guard: Arc<ShutdownOnDrop>,
}

struct ShutdownOnDrop(Arc<Inner>);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        shutdown(&self.0);
    }
}

fn shutdown(inner: &Inner) {
    if inner.shutdown.is_cancelled() {
        return;
    }
    inner.shutdown.cancel();
    // Wake the blocking accept loops so they see the flag.
    let _ = std::net::TcpStream::connect_timeout(&inner.addr, std::time::Duration::from_secs(1));
    if let Some(name) = &inner.shm_name {
        use std::os::linux::net::SocketAddrExt;
        if let Ok(a) = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()) {
            let _ = std::os::unix::net::UnixStream::connect_addr(&a);
        }
    }
    lock(&inner.idle).clear();
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("addr", &self.inner.addr)
            .field("shm", &self.inner.shm_name)
            .finish()
    }
}

impl Engine {
    /// Creates the pool (no memory until payloads arrive), binds the listeners and starts serving.
    pub fn start(cfg: EngineConfig) -> Result<Engine> {
        let local = |what| move |source| TransferError::Local { what, source };
        let id = uuid::Uuid::now_v7().simple().to_string();
        let pool = Pool::new(&format!("x2v-pool-{id}"), cfg.pool_bytes, cfg.pool_keep_warm)
            .map_err(local("allocating the receive pool"))?;
        let listener = TcpListener::bind(cfg.listen).map_err(local("binding the TCP listener"))?;
        let addr = listener.local_addr().map_err(local("reading the listener address"))?;
        let (shm_name, unix) = if cfg.serve_shm {
            let name = format!("x2v-transfer/{id}");
            (
                Some(name.clone()),
                Some(channel::bind_shm(&name).map_err(local("binding the shm socket"))?),
            )
        } else {
            (None, None)
        };
        let inner = Arc::new(Inner {
            cfg,
            pool,
            host_id: channel::host_id(),
            shm_name,
            shutdown: CancelFlag::default(),
            addr,
            inbox: Mutex::new(HashMap::new()),
            inflight: Mutex::new(Default::default()),
            arrived: tokio::sync::Notify::new(),
            outbox: Mutex::new(HashMap::new()),
            idle: Mutex::new(HashMap::new()),
        });
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(local("spawning the accept thread"))
        };
        let i = inner.clone();
        spawn("x2v-xfer-accept", Box::new(move || serve::tcp_accept_loop(i, listener)))?;
        if let Some(unix) = unix {
            let i = inner.clone();
            spawn("x2v-xfer-accept-shm", Box::new(move || serve::unix_accept_loop(i, unix)))?;
        }
        tracing::info!(%addr, shm = inner.shm_name.is_some(), pool_bytes = inner.pool.capacity(), "transfer engine started");
        Ok(Engine { _guard: Arc::new(ShutdownOnDrop(inner.clone())), inner })
    }

    /// Where peers reach this engine.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The receive pool (capacity and free space, for metrics and tests).
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// Stops accepting and serving; in-flight operations fail with `Cancelled`.
    pub fn shutdown(&self) {
        shutdown(&self.inner);
    }

    /// Writes `payload` into `peer`'s pool under `job`; returns once the peer verified it.
    pub async fn push(
        &self,
        peer: SocketAddr,
        job: JobId,
        payload: &Payload,
        opts: Opts,
    ) -> Result<Receipt> {
        let payload = payload.clone();
        self.blocking(peer, opts, move |inner, ctx| inner.push(peer, job, &payload, ctx)).await
    }

    /// Reads `job` from `peer`'s outbox into our pool, verifies it, then acknowledges it.
    pub async fn pull(&self, peer: SocketAddr, job: JobId, opts: Opts) -> Result<Received> {
        self.blocking(peer, opts, move |inner, ctx| inner.pull(peer, job, ctx)).await
    }

    /// Makes `payload` available to pullers; the first verified pull removes it.
    pub fn publish(&self, job: JobId, payload: Payload) -> Result<()> {
        self.inner.publish(job, payload, None)
    }

    /// Makes `payload` available to every puller for `ttl` (a redelivered job pulls it again);
    /// [`Engine::unpublish`] withdraws it earlier. Publishing a job twice is a `Conflict`.
    pub fn publish_retained(
        &self,
        job: JobId,
        payload: Payload,
        ttl: std::time::Duration,
    ) -> Result<()> {
        self.inner.publish(job, payload, Some(Instant::now() + ttl))
    }

    /// Withdraws a published payload; `false` if there was none.
    pub fn unpublish(&self, job: JobId) -> bool {
        lock(&self.inner.outbox).remove(&job).is_some()
    }

    /// A pushed payload for `job`, if one has arrived and been verified.
    pub fn try_recv(&self, job: JobId) -> Option<Received> {
        lock(&self.inner.inbox).remove(&job)
    }

    /// Waits for a pushed payload for `job`.
    pub async fn recv(&self, job: JobId, opts: Opts) -> Result<Received> {
        let deadline = tokio::time::Instant::now() + opts.timeout;
        let cancel = opts.cancel.unwrap_or_default();
        loop {
            let arrived = self.inner.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(r) = self.try_recv(job) {
                return Ok(r);
            }
            tokio::select! {
                () = &mut arrived => {}
                () = tokio::time::sleep_until(deadline) => {
                    return Err(TransferError::DeadlineExceeded { during: "waiting for a pushed payload" });
                }
                () = cancel.cancelled() => return Err(TransferError::Cancelled { during: "waiting for a pushed payload" }),
            }
        }
    }

    fn blocking<T, F>(
        &self,
        peer: SocketAddr,
        opts: Opts,
        op: F,
    ) -> impl Future<Output = Result<T>> + use<T, F>
    where
        T: Send + 'static,
        F: FnOnce(&Inner, &Ctx) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        let flag = CancelFlag::default();
        let ctx = Ctx::new(peer.to_string(), Instant::now() + opts.timeout, flag.clone());
        let token = opts.cancel.unwrap_or_default();
        async move {
            // Dropping this future (or the token firing) trips the flag; the thread notices within a tick.
            let _cancel_on_drop = CancelOnDrop(flag.clone());
            let task = tokio::task::spawn_blocking(move || op(&inner, &ctx));
            tokio::pin!(task);
            let joined = tokio::select! {
                r = &mut task => r,
                () = token.cancelled() => {
                    flag.cancel();
                    task.await
                }
            };
            joined.map_err(|e| TransferError::Local {
                what: "transfer thread",
                source: std::io::Error::other(e),
            })?
        }
    }
}

struct CancelOnDrop(CancelFlag);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}
