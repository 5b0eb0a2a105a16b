//! The configuration of one stage service (`x2v encoder|dit|decoder --config FILE`): one serde
//! struct loaded by `x2v_core::config::load` (defaults, then a TOML/JSON file from `configs/`, then
//! `X2V_<SECTION>__<FIELD>` variables).

use serde::{Deserialize, Serialize};
use x2v_core::telemetry::TelemetryConfig;
use x2v_queue::Task;
use x2v_queue::storage::StorageConfig;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StageConfig {
    /// Engine rank of this worker within its stage (unique per stage).
    pub rank: u32,
    /// Served model name, as clients send it in `model` (must match the gateway's `[[models]]`).
    pub model: String,
    /// Local model directory (Wan2.1, diffusers or original layout). Empty: none configured.
    pub model_dir: String,
    /// Tasks this worker runs (`t2v`, `i2v`, `t2i`).
    pub tasks: Vec<Task>,
    /// `auto` (CUDA when present), `cpu`, or `cuda:N`.
    pub device: String,
    /// `auto` (bf16 on CUDA, fp32 on CPU), `f32` or `bf16`.
    pub dtype: String,
    /// Jobs this worker holds at once (they share the one device thread; more than 1 overlaps
    /// transfers and media encoding with compute).
    pub capacity: u32,
    /// Sampler for the DiT stage: `unipc` (the Wan default) or `euler` (step-distilled models).
    pub scheduler: String,
    pub queue: QueueSection,
    pub transfer: TransferSection,
    pub storage: StorageConfig,
    pub worker: WorkerSection,
    pub grpc: ListenSection,
    pub http: ListenSection,
    pub telemetry: TelemetryConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueSection {
    /// `redis` (multi-process) or `memory` (only inside `x2v up`).
    pub backend: String,
    pub redis_url: String,
    /// Key prefix in Redis (the gateway's `queue.prefix`).
    pub prefix: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransferSection {
    /// Address the transfer engine listens on.
    pub listen: String,
    /// Address other stages reach this engine at (empty: the bound address).
    pub advertise: String,
    /// The deployment secret shared by every stage (or `secret_file`).
    pub secret: String,
    /// File holding the secret (wins over `secret` when set).
    pub secret_file: String,
    /// Largest payload accepted (or payloads held at once), in MiB: the receive pool's size. The pool
    /// costs memory only for payloads being received or held, plus released pages kept warm for a
    /// second after the last transfer, not for this size.
    pub pool_mib: usize,
    /// `auto` (shm on the same host, else TCP), `shm` or `tcp`.
    pub transport: String,
    /// Seconds a published payload stays available to the next stage (redeliveries pull again).
    pub retain_s: u64,
    /// Seconds one fetch of a payload may take (connect, bytes, verification).
    pub timeout_s: u64,
    /// Per-chunk CRC32 on TCP on top of SHA-256.
    pub chunk_crc: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSection {
    /// Lease length in milliseconds; a worker that stops extending loses the job after this.
    pub lease_ms: u64,
    /// A worker counts as live this long after a heartbeat, in milliseconds.
    pub heartbeat_ttl_ms: u64,
    /// Longest pause between claims while idle, in milliseconds.
    pub max_poll_ms: u64,
    /// Longest a job may run in this stage, in seconds; then it fails with `deadline_exceeded`.
    pub job_timeout_s: u64,
    /// On SIGTERM, how long in-flight jobs may run before they are released, in seconds.
    pub drain_timeout_s: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenSection {
    /// Listen address (port 0 picks a free port); empty disables the endpoint.
    pub listen: String,
}

impl Default for StageConfig {
    fn default() -> Self {
        StageConfig {
            rank: 0,
            model: "wan2.1-t2v-1.3b".into(),
            model_dir: String::new(),
            tasks: vec![Task::T2v],
            device: "auto".into(),
            dtype: "auto".into(),
            capacity: 1,
            scheduler: "unipc".into(),
            queue: QueueSection::default(),
            transfer: TransferSection::default(),
            storage: StorageConfig::default(),
            worker: WorkerSection::default(),
            grpc: ListenSection { listen: "127.0.0.1:0".into() },
            http: ListenSection { listen: "127.0.0.1:0".into() },
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl Default for QueueSection {
    fn default() -> Self {
        QueueSection {
            backend: "redis".into(),
            redis_url: "redis://127.0.0.1:6379/".into(),
            prefix: "x2v".into(),
        }
    }
}

impl Default for TransferSection {
    fn default() -> Self {
        TransferSection {
            listen: "127.0.0.1:0".into(),
            advertise: String::new(),
            secret: String::new(),
            secret_file: String::new(),
            pool_mib: 256,
            transport: "auto".into(),
            retain_s: 600,
            timeout_s: 60,
            chunk_crc: false,
        }
    }
}

impl Default for WorkerSection {
    fn default() -> Self {
        WorkerSection {
            lease_ms: 30_000,
            heartbeat_ttl_ms: 15_000,
            max_poll_ms: 500,
            job_timeout_s: 3600,
            drain_timeout_s: 60,
        }
    }
}
