//! Starting a stage service: connect the queue, start the transfer engine, open storage, serve the
//! admin endpoints, load the model, register and serve until shutdown. `x2v encoder|dit|decoder`
//! call [`run`] with their own config; `x2v up` passes [`Shared`] parts so that all stages of one
//! process share the embedded queue, the in-process exchange and the storage.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;
use x2v_queue::storage::Storage;
use x2v_queue::worker::WorkerTimings;
use x2v_queue::{Queue, QueueBackend, RedisQueue, Retention, Stage, WorkerInfo};
use x2v_transfer::{Engine, EngineConfig, Secret, TransportChoice, TransportKind};

use crate::admin::{self, AdminEndpoints};
use crate::config::{self, StageConfig};
use crate::exchange::{Exchange, Network};
use crate::runner::StageRunner;
use crate::runtime::{Limits, LoadedStage, RuntimeError, StageDeps};
use crate::state::ServiceState;

/// What the stages of one process share in the embedded mode.
#[derive(Clone)]
pub struct Shared {
    pub queue: Arc<dyn Queue>,
    pub exchange: Arc<dyn Exchange>,
    pub storage: Storage,
}

/// Where a started service can be reached; `on_ready` receives it once the model is loaded and the
/// rank registered, i.e. when jobs assigned to this worker will be claimed.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub admin: AdminEndpoints,
    /// `x2v-transfer://host:port`, or empty in the embedded mode.
    pub transfer: String,
}

/// The deployment secret from `transfer.secret_file` or `transfer.secret`.
pub fn transfer_secret(config: &StageConfig) -> anyhow::Result<Secret> {
    let t = &config.transfer;
    let bytes = if !t.secret_file.is_empty() {
        std::fs::read(&t.secret_file)
            .with_context(|| format!("transfer.secret_file {}: cannot read it", t.secret_file))?
            .trim_ascii()
            .to_vec()
    } else if !t.secret.is_empty() {
        t.secret.expose().as_bytes().to_vec()
    } else {
        bail!(
            "transfer.secret (or transfer.secret_file) must be set: every stage of a deployment \
             shares one secret (X2V_TRANSFER__SECRET)"
        );
    };
    Secret::new(bytes).map_err(|e| anyhow::anyhow!("transfer secret: {e}"))
}

/// Starts this process's transfer engine from the `[transfer]` section.
pub fn start_engine(config: &StageConfig) -> anyhow::Result<Network> {
    let t = &config.transfer;
    let listen: SocketAddr = t
        .listen
        .parse()
        .with_context(|| format!("transfer.listen `{}` is not host:port", t.listen))?;
    let transport = match t.transport {
        config::TransportChoice::Auto => TransportChoice::Auto,
        config::TransportChoice::Shm => TransportChoice::Force(TransportKind::Shm),
        config::TransportChoice::Tcp => TransportChoice::Force(TransportKind::Tcp),
        config::TransportChoice::Rdma => TransportChoice::Force(TransportKind::Rdma),
    };
    let mut cfg = EngineConfig::new(transfer_secret(config)?);
    cfg.listen = listen;
    cfg.pool_bytes = t.pool_mib.max(1) << 20;
    cfg.transport = transport;
    cfg.chunk_crc = t.chunk_crc;
    let engine = Engine::start(cfg).context("starting the transfer engine")?;
    let advertise =
        if t.advertise.is_empty() { engine.local_addr() } else { resolve_advertise(&t.advertise)? };
    if advertise.ip().is_unspecified() {
        bail!(
            "transfer.listen {} binds every interface: set transfer.advertise to the address other \
             stages reach this one at",
            t.listen
        );
    }
    Ok(Network::new(engine, advertise, Duration::from_secs(t.retain_s)))
}

/// `transfer.advertise` as the address peers dial: an `ip:port` as it is, a `host:port` (a compose
/// service name, say) resolved once, here at start, preferring IPv4. A container keeps its address
/// while it runs, and a restarted one resolves its new address when it starts again.
fn resolve_advertise(advertise: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(addr) = advertise.parse() {
        return Ok(addr);
    }
    let bad = || format!("transfer.advertise `{advertise}` is not host:port");
    let (_, port) = advertise.rsplit_once(':').with_context(bad)?;
    port.parse::<u16>().ok().with_context(bad)?;
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(advertise)
        .with_context(|| format!("transfer.advertise `{advertise}`: cannot resolve the host"))?
        .collect();
    addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()).copied().with_context(|| {
        format!("transfer.advertise `{advertise}`: the host resolves to no address")
    })
}

/// The limits of the `[worker]` and `[transfer]` sections.
pub fn limits(config: &StageConfig) -> Limits {
    let w = &config.worker;
    Limits {
        timings: WorkerTimings {
            lease: Duration::from_millis(w.lease_ms),
            heartbeat_ttl: Duration::from_millis(w.heartbeat_ttl_ms),
            max_poll: Duration::from_millis(w.max_poll_ms),
        },
        capacity: config.capacity.max(1),
        transfer_timeout: Duration::from_secs(config.transfer.timeout_s),
        job_timeout: Duration::from_secs(w.job_timeout_s),
        drain_timeout: Duration::from_secs(w.drain_timeout_s),
    }
}

/// Runs one stage service until `shutdown` fires (then drains) or an admin `Drain` finishes.
pub async fn run<R: StageRunner>(
    config: StageConfig,
    runner: R,
    shared: Option<Shared>,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(&Endpoints),
) -> anyhow::Result<()> {
    let stage = runner.stage();
    if config.tasks.is_empty() {
        bail!("tasks must name at least one task this {stage} worker runs");
    }
    let state =
        Arc::new(ServiceState::new(stage, config.rank, config.model.clone(), config.tasks.clone()));
    let (shared, transfer) = match shared {
        Some(s) => (s, String::new()),
        None => connect(&config).await?,
    };
    state.set_transfer_endpoint(transfer.clone());
    runner.register_metrics(&state.metrics.registry);
    refuse_taken_rank(&config, stage, shared.queue.as_ref()).await?;

    let admin_stop = CancellationToken::new();
    let (admin, admin_task) = admin::serve(
        state.clone(),
        Some(shared.queue.clone()),
        &config.grpc.listen,
        &config.http.listen,
        admin_stop.clone(),
    )
    .await?;
    {
        let (shutdown, drain) = (shutdown.clone(), state.drain.clone());
        tokio::spawn(async move {
            tokio::select! { () = shutdown.cancelled() => drain.cancel(), () = drain.cancelled() => {} }
        });
    }

    tracing::info!(%stage, rank = config.rank, model = %config.model, "loading the model");
    let loaded = LoadedStage::load(runner, &state).await?;
    let served = serve(loaded, &config, shared, &state, || {
        on_ready(&Endpoints { admin, transfer });
    })
    .await;
    admin_stop.cancel();
    let _ = admin_task.await;
    Ok(served?)
}

/// A stand-alone stage's queue (Redis), transfer engine and storage; with the transfer locator
/// other stages reach it at.
async fn connect(config: &StageConfig) -> anyhow::Result<(Shared, String)> {
    let queue: Arc<dyn Queue> = match config.queue.backend {
        QueueBackend::Redis => Arc::new(
            RedisQueue::connect(
                config.queue.redis_url.expose(),
                &config.queue.prefix,
                Retention::default(),
            )
            .await
            .with_context(|| format!("queue.redis_url {}", config.queue.redis_url))?,
        ),
        QueueBackend::Memory => bail!(
            "queue.backend must be `redis` for a stand-alone stage (`memory` only works inside \
             `x2v up`); got `memory`"
        ),
    };
    let network = start_engine(config)?;
    let locator = network.locator();
    let storage = Storage::from_config(&config.storage).context("storage")?;
    Ok((Shared { queue, exchange: Arc::new(network), storage }, locator))
}

/// Ranks name workers per stage across every model on this queue: two models' workers on one
/// rank would share its queue and load count. Refuses before any weights are loaded. (A live
/// worker of the same model on this rank is this worker restarted within its heartbeat TTL.)
async fn refuse_taken_rank(
    config: &StageConfig,
    stage: Stage,
    queue: &dyn Queue,
) -> anyhow::Result<()> {
    let live = queue.workers().await.context("listing live workers")?;
    if let Some(w) = live.iter().find(|w| {
        w.stage == stage && w.rank == config.rank && w.models != std::slice::from_ref(&config.model)
    }) {
        bail!(
            "{stage} rank {} is already live for model(s) {:?}: ranks are unique per stage across \
             all models on one queue (prefix `{}`); give this worker another `rank`",
            config.rank,
            w.models,
            config.queue.prefix
        );
    }
    Ok(())
}

/// Registers the rank and serves jobs until drained; `on_ready` runs once the rank is registered.
async fn serve<R: StageRunner>(
    loaded: LoadedStage<R>,
    config: &StageConfig,
    shared: Shared,
    state: &Arc<ServiceState>,
    on_ready: impl FnOnce(),
) -> Result<(), RuntimeError> {
    let info = WorkerInfo {
        stage: state.stage,
        rank: config.rank,
        models: vec![config.model.clone()],
        tasks: config.tasks.clone(),
        capacity: config.capacity.max(1),
        unfit_loras: Default::default(),
    };
    let deps = StageDeps {
        queue: shared.queue,
        exchange: shared.exchange,
        storage: shared.storage,
        state: state.clone(),
        limits: limits(config),
    };
    // `serve` registers the rank and then marks the state ready; announce the endpoints only then.
    let serve = loaded.serve(deps, info);
    tokio::pin!(serve);
    tokio::select! {
        served = &mut serve => served,
        () = state.registered() => {
            on_ready();
            serve.await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertise_takes_an_address_or_resolves_a_host_name() {
        let ip = |s: &str| resolve_advertise(s).unwrap();
        assert_eq!(ip("10.0.0.5:9112"), "10.0.0.5:9112".parse().unwrap());
        assert_eq!(ip("[::1]:9112"), "[::1]:9112".parse().unwrap());
        // A name, as the compose files advertise their service names.
        let local = ip("localhost:9112");
        assert!(local.ip().is_loopback() && local.port() == 9112, "{local}");
        for bad in ["dit-0", "dit-0:port", "dit-0:70000"] {
            let e = resolve_advertise(bad).unwrap_err().to_string();
            assert!(e.contains("is not host:port"), "{bad}: {e}");
        }
        let e = resolve_advertise("no-such-host.invalid:9112").unwrap_err().to_string();
        assert!(e.contains("cannot resolve"), "{e}");
    }
}
