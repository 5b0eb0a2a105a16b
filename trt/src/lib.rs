//! x2v-trt: the VAE decoder on exported engines through ONNX Runtime — its TensorRT execution
//! provider where TensorRT exists, its CUDA provider, or its CPU provider (which runs the very same
//! graph, so CI exercises the whole engine path) — with libtorch as the fallback.
//!
//! - [`catalog`]: which graphs a deployment has (static per-resolution graphs, multi-profile
//!   graphs) and which one serves a shape.
//! - [`manager`]: engines loaded on first use, an LRU under a memory budget, one load per cold
//!   engine however many requests wait for it, failures remembered.
//! - [`engine`]: a graph as an ONNX Runtime session on one provider.
//! - [`VaeEngines`]: the decoder stage's entry point; a decode either runs on an engine or says
//!   why it falls back ([`Fallback`]), and the stage decodes with libtorch.
//!
//! This crate does not link libtorch: the fallback decode is the stage's.
#![forbid(unsafe_code)]

pub mod catalog;
pub mod engine;
pub mod fallback;
pub mod manager;
pub mod runtime;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use catalog::{Catalog, CatalogError, Size};
pub use fallback::{Backend, Fallback};
pub use manager::{EngineManager, Miss};

use engine::OrtLoader;
use runtime::{OnnxRuntime, Provider};

/// Which decoder a stage uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// The best that works here: TensorRT, else ONNX Runtime on CUDA (on a GPU stage) or on the
    /// CPU (on a CPU stage), else libtorch. libtorch when no catalog is configured.
    #[default]
    Auto,
    /// TensorRT engines only (a GPU stage); libtorch when TensorRT is unusable.
    Tensorrt,
    /// ONNX Runtime on the stage's device (CUDA provider or CPU provider), never TensorRT.
    Onnx,
    /// libtorch only.
    Torch,
}

impl BackendChoice {
    /// A backend that runs engines, as tools that load them spell it: `auto`, `tensorrt` or
    /// `onnx` (not `torch`).
    pub fn parse_engine(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "tensorrt" => Ok(BackendChoice::Tensorrt),
            "onnx" => Ok(BackendChoice::Onnx),
            _ => Err(format!("`{s}`: expected auto, tensorrt or onnx")),
        }
    }
}

/// The `[vae]` section of a decoder stage's config.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// `auto`, `tensorrt`, `onnx` or `torch`.
    pub backend: BackendChoice,
    /// The engine catalog (`engines.toml`, as `tools/export_vae_onnx.py` writes it). Empty: none.
    pub engines: String,
    /// Memory the loaded engines may be charged, MiB (see the catalog's `memory_mib`). 0: no limit.
    pub memory_budget_mib: u64,
    /// TensorRT engine and timing caches. Empty: `trt-cache/` beside the catalog.
    pub cache_dir: String,
    /// The ONNX Runtime library file. Empty: found ([`runtime::candidates`]).
    pub onnxruntime: String,
}

/// Where the decoder runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Cpu,
    /// CUDA device ordinal.
    Cuda(usize),
}

/// A configuration that cannot work, named by its field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("vae.backend = \"{0}\" needs an engine catalog in vae.engines")]
    NoCatalog(&'static str),
}

/// The decoder stage's engines, or the reason every decode runs on libtorch.
pub enum VaeEngines {
    Torch(Miss),
    Engines(Box<EngineManager<OrtLoader>>),
}

impl VaeEngines {
    /// Reads the catalog and picks the provider. Nothing loads yet (engines load on first use);
    /// a runtime or provider that is missing makes every decode fall back with that reason.
    pub fn new(
        config: &EngineConfig,
        target: Target,
        weights_sha256: Option<String>,
    ) -> Result<Self, ConfigError> {
        let choice = config.backend;
        if choice == BackendChoice::Torch {
            return Ok(VaeEngines::Torch(Miss::new(
                Fallback::NotConfigured,
                "vae.backend = \"torch\"",
            )));
        }
        if config.engines.is_empty() {
            return match choice {
                BackendChoice::Auto => Ok(VaeEngines::Torch(Miss::new(
                    Fallback::NotConfigured,
                    "no vae.engines catalog",
                ))),
                BackendChoice::Tensorrt => Err(ConfigError::NoCatalog("tensorrt")),
                _ => Err(ConfigError::NoCatalog("onnx")),
            };
        }
        let catalog_path = PathBuf::from(&config.engines);
        let catalog = Catalog::from_file(&catalog_path)?;
        let explicit = (!config.onnxruntime.is_empty()).then(|| Path::new(&config.onnxruntime));
        let runtime = match OnnxRuntime::get(explicit) {
            Ok(r) => r,
            Err(e) => return Ok(VaeEngines::Torch(Miss::new(Fallback::RuntimeMissing, e))),
        };
        let provider = match pick_provider(runtime, choice, target) {
            Ok(p) => p,
            Err(e) => return Ok(VaeEngines::Torch(Miss::new(Fallback::ProviderUnavailable, e))),
        };
        let cache_dir = if config.cache_dir.is_empty() {
            catalog_path.parent().unwrap_or(Path::new(".")).join("trt-cache")
        } else {
            PathBuf::from(&config.cache_dir)
        };
        let device = match target {
            Target::Cpu => 0,
            Target::Cuda(i) => i,
        };
        let loader =
            OrtLoader::new(runtime, provider, device, catalog.precision, cache_dir, weights_sha256);
        let budget = match config.memory_budget_mib {
            0 => u64::MAX,
            mib => mib << 20,
        };
        tracing::info!(
            catalog = %catalog_path.display(),
            engines = catalog.engines.len(),
            provider = provider.ep_name(),
            budget_mib = config.memory_budget_mib,
            "VAE engines configured (each loads on its first request)"
        );
        Ok(VaeEngines::Engines(Box::new(EngineManager::new(catalog, loader, budget))))
    }

    /// The backend engines run on, or `None` when every decode is libtorch's.
    pub fn backend(&self) -> Option<Backend> {
        match self {
            VaeEngines::Torch(_) => None,
            VaeEngines::Engines(m) => Some(m.loader().backend()),
        }
    }

    /// Decodes normalised latents `[1, 16, 1, H/8, W/8]` of an image of `size` on an engine:
    /// `[1, 3, H, W]` in about `[-1, 1]`, or the reason to decode with libtorch instead.
    pub fn decode(&self, size: Size, latents: &[f32]) -> Result<(Vec<f32>, Backend), Miss> {
        let manager = match self {
            VaeEngines::Torch(miss) => return Err(miss.clone()),
            VaeEngines::Engines(m) => m,
        };
        let lease = manager.acquire(size)?;
        let result = lease.engine().run(size, latents);
        match result {
            Ok(image) => Ok((image, manager.loader().backend())),
            Err(e) => Err(manager.run_failed(lease, e)),
        }
    }
}

/// The provider `choice` uses on `target`, or why there is none.
fn pick_provider(
    runtime: &OnnxRuntime,
    choice: BackendChoice,
    target: Target,
) -> Result<Provider, String> {
    let device = match target {
        Target::Cpu => {
            return match choice {
                BackendChoice::Tensorrt => {
                    Err("TensorRT needs a CUDA device; the stage runs on the CPU".into())
                }
                _ => Ok(Provider::Cpu),
            };
        }
        Target::Cuda(i) => i,
    };
    match choice {
        BackendChoice::Tensorrt => {
            runtime.probe(Provider::TensorRt, device).map(|()| Provider::TensorRt)
        }
        BackendChoice::Onnx => runtime.probe(Provider::Cuda, device).map(|()| Provider::Cuda),
        _ => match runtime.probe(Provider::TensorRt, device) {
            Ok(()) => Ok(Provider::TensorRt),
            Err(trt) => runtime
                .probe(Provider::Cuda, device)
                .map(|()| Provider::Cuda)
                .map_err(|cuda| format!("{trt}; {cuda}")),
        },
    }
}
