//! Where the stage's VAE decodes run, and what is counted about them: engines from the
//! configured catalog ([`x2v_trt::VaeEngines`]) with libtorch as the fallback.
//!
//! Metrics (in the stage's registry, so `/metrics` serves them):
//! - `x2v_vae_decodes_total{backend, reason}`: decoded images (frames of a video count once per
//!   video) by the backend that decoded them; `reason` is why libtorch decoded (`none` when an
//!   engine did).
//! - `x2v_vae_decode_seconds{backend}`: time per decode.
//! - `x2v_vae_engines_resident_bytes`: memory charged for loaded engines.
//! - `x2v_vae_engine_loads_total{outcome}`, `x2v_vae_engine_evictions_total`.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{HistogramVec, IntCounterVec, IntGaugeVec};
use sha2::{Digest, Sha256};
use tch::Device;
use x2v_core::metrics::Metrics;
use x2v_trt::manager::ManagerStats;
use x2v_trt::{Backend, EngineConfig, Fallback, Target, VaeEngines};

/// The decoder stage's VAE metric families.
#[derive(Clone)]
pub struct VaeMetrics {
    decodes: IntCounterVec,
    seconds: HistogramVec,
    resident: IntGaugeVec,
    loads: IntCounterVec,
    evictions: IntCounterVec,
}

impl VaeMetrics {
    pub fn register(metrics: &Metrics) -> Self {
        VaeMetrics {
            decodes: metrics.counter(
                "vae_decodes_total",
                "VAE decodes by the backend that ran them and, for libtorch, the reason.",
                &["backend", "reason"],
            ),
            seconds: metrics.histogram(
                "vae_decode_seconds",
                "Time of one VAE decode, by backend.",
                &["backend"],
                None,
            ),
            resident: metrics.gauge(
                "vae_engines_resident_bytes",
                "Memory charged for the loaded VAE engines.",
                &[],
            ),
            loads: metrics.counter(
                "vae_engine_loads_total",
                "VAE engine loads, by outcome (loaded, failed).",
                &["outcome"],
            ),
            evictions: metrics.counter(
                "vae_engine_evictions_total",
                "VAE engines unloaded to stay within the memory budget.",
                &[],
            ),
        }
    }
}

/// The decodes of one stage and their counting.
pub struct VaeDecodes {
    pub engines: VaeEngines,
    metrics: OnceLock<VaeMetrics>,
    /// Manager counters already exported.
    exported: std::sync::Mutex<ManagerStats>,
}

impl VaeDecodes {
    pub fn new(engines: VaeEngines) -> Self {
        VaeDecodes { engines, metrics: OnceLock::new(), exported: Default::default() }
    }

    /// libtorch only, for `reason`.
    pub fn torch(message: &str) -> Self {
        Self::new(VaeEngines::Torch(x2v_trt::Miss::new(Fallback::NotConfigured, message)))
    }

    pub fn register_metrics(&self, metrics: &Metrics) {
        let _ = self.metrics.set(VaeMetrics::register(metrics));
    }

    /// Counts one decode by `backend` (`reason`: why libtorch ran it).
    pub fn record(&self, backend: Backend, reason: Option<Fallback>, took: Duration) {
        let Some(m) = self.metrics.get() else { return };
        let reason = reason.map_or("none", Fallback::as_str);
        m.decodes.with_label_values(&[backend.as_str(), reason]).inc();
        m.seconds.with_label_values(&[backend.as_str()]).observe(took.as_secs_f64());
        if let VaeEngines::Engines(manager) = &self.engines {
            m.resident.with_label_values::<&str>(&[]).set(manager.resident_bytes() as i64);
            let now = manager.stats();
            let mut seen = self.exported.lock().unwrap_or_else(|e| e.into_inner());
            m.loads.with_label_values(&["loaded"]).inc_by(now.loads - seen.loads);
            m.loads.with_label_values(&["failed"]).inc_by(now.failed_loads - seen.failed_loads);
            m.evictions.with_label_values::<&str>(&[]).inc_by(now.evictions - seen.evictions);
            *seen = now;
        }
    }
}

/// The engine target of a libtorch device.
pub fn target(device: Device) -> Target {
    match device {
        Device::Cuda(i) => Target::Cuda(i),
        _ => Target::Cpu,
    }
}

/// The stage's engines per its `[vae]` section, for a model whose VAE folder is `vae_dir` (a
/// stale engine, exported from other weights, is refused by their digest).
pub fn engines(
    config: &EngineConfig,
    device: Device,
    vae_dir: Option<&Path>,
) -> Result<VaeEngines, String> {
    let digest = if config.engines.is_empty() || config.backend == x2v_trt::BackendChoice::Torch {
        None
    } else {
        vae_dir.map(weights_sha256).transpose()?.flatten()
    };
    VaeEngines::new(config, target(device), digest).map_err(|e| e.to_string())
}

/// SHA-256 of a VAE folder's safetensors files (one, or the shards of a sharded save) concatenated
/// in file-name order: the digest `tools/export_vae_onnx.py` stamps into the graphs it exports.
/// `None` when the folder holds no safetensors file.
pub fn weights_sha256(vae_dir: &Path) -> Result<Option<String>, String> {
    let read = |e: std::io::Error, p: &Path| format!("reading {}: {e}", p.display());
    let mut files: Vec<_> = std::fs::read_dir(vae_dir)
        .map_err(|e| read(e, vae_dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    if files.is_empty() {
        return Ok(None);
    }
    // By file name as bytes, as Python sorts the names.
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    let mut hasher = Sha256::new();
    for path in &files {
        let mut file = std::fs::File::open(path).map_err(|e| read(e, path))?;
        std::io::copy(&mut file, &mut hasher).map_err(|e| read(e, path))?;
    }
    Ok(Some(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()))
}
