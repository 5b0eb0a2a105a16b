//! Config files for tests that run the `x2v` services as processes: a gateway and stages that
//! meet on one Redis queue and one local output store. Each writer returns the config as a JSON
//! tree, so a test can change a field before [`write`]-ing it; the services read JSON configs as
//! they read TOML.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// The transfer secret the stages of a test share.
pub const TRANSFER_SECRET: &str = "x2v-test-transfer-secret-0123456789";

/// What the gateway and the stages of one test share.
#[derive(Debug, Clone)]
pub struct Deployment {
    pub redis_url: String,
    /// Redis key prefix.
    pub prefix: String,
    /// Local output store directory.
    pub storage: PathBuf,
}

impl Deployment {
    /// The `queue` section: the Redis backend.
    pub fn queue(&self) -> Value {
        json!({ "backend": "redis", "redis_url": self.redis_url, "prefix": self.prefix })
    }

    /// The `storage` section: the local store.
    pub fn storage(&self) -> Value {
        json!({ "kind": "local", "path": self.storage })
    }

    /// A gateway config serving `models` (see [`served_model`]), sampling every trace.
    pub fn gateway(&self, models: &[Value]) -> Value {
        json!({
            "queue": self.queue(),
            "storage": self.storage(),
            "http": { "poll_after_ms": 100 },
            "models": models,
            "telemetry": { "sample_ratio": 1.0 },
        })
    }

    /// A stage config for rank `rank` of `model` on the CPU, every listener on a free port. One
    /// file serves all three stages: each subcommand runs its own stage of the rank.
    pub fn stage(&self, rank: u32, model: &str, model_dir: &Path, tasks: &[&str]) -> Value {
        json!({
            "rank": rank,
            "model": model,
            "model_dir": model_dir,
            "tasks": tasks,
            "device": "cpu",
            "queue": self.queue(),
            // TCP rather than shared memory: test payloads are tiny, and a container's /dev/shm
            // may be too small for the receive pools.
            "transfer": {
                "listen": "127.0.0.1:0",
                "secret": TRANSFER_SECRET,
                "transport": "tcp",
                "pool_mib": 16,
                "timeout_s": 30,
            },
            "storage": self.storage(),
            "worker": { "max_poll_ms": 50, "job_timeout_s": 120, "drain_timeout_s": 10 },
            "grpc": { "listen": "127.0.0.1:0" },
            "http": { "listen": "127.0.0.1:0" },
            "telemetry": { "sample_ratio": 1.0 },
        })
    }
}

/// A gateway `[[models]]` entry with the limits of `x2v up`'s demo model, with few frames and
/// steps so that test jobs are quick.
pub fn served_model(name: &str, tasks: &[&str], sizes: &[&str]) -> Value {
    json!({
        "name": name,
        "tasks": tasks,
        "sizes": sizes,
        "fps": 8,
        "max_frames": 33,
        "default_seconds": 1,
        "default_steps": 2,
        "max_steps": 8,
        "default_guidance_scale": 5.0,
        "default_shift": 3.0,
        "max_n": 1,
    })
}

/// Writes `config` as pretty JSON to `path` and returns the path.
pub fn write(path: impl Into<PathBuf>, config: &Value) -> PathBuf {
    let path = path.into();
    let text = serde_json::to_vec_pretty(config).expect("a JSON config serialises");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}
