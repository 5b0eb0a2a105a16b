//! Which backend decoded an image, and why it was libtorch when an engine was wanted.

use std::fmt;

/// What ran a decode. Spelled as in metrics labels and job records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// ONNX Runtime's TensorRT execution provider.
    TensorRt,
    /// ONNX Runtime's CUDA execution provider.
    OnnxCuda,
    /// ONNX Runtime's CPU execution provider.
    OnnxCpu,
    /// The libtorch decoder.
    Torch,
}

impl Backend {
    pub const ALL: [Backend; 4] =
        [Backend::TensorRt, Backend::OnnxCuda, Backend::OnnxCpu, Backend::Torch];

    pub fn as_str(self) -> &'static str {
        match self {
            Backend::TensorRt => "tensorrt",
            Backend::OnnxCuda => "onnx_cuda",
            Backend::OnnxCpu => "onnx_cpu",
            Backend::Torch => "torch",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a decode ran on libtorch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fallback {
    /// `backend = "torch"`, or `auto` with no engine catalog: libtorch by choice.
    NotConfigured,
    /// The ONNX Runtime library was not found or is too old.
    RuntimeMissing,
    /// The execution provider the backend needs is not usable here (no TensorRT libraries, no
    /// CUDA build of ONNX Runtime, no GPU).
    ProviderUnavailable,
    /// No engine of the catalog serves the image's size.
    NoEngineForShape,
    /// The engine's graph file does not exist.
    EngineMissing,
    /// The engine failed to load or build (corrupt or truncated file, wrong interface).
    EngineLoadFailed,
    /// The engine was exported from other weights than the model's.
    EngineStale,
    /// Loading the engine would exceed the memory budget, and the engines holding it are in use.
    MemoryBudget,
    /// The engine loaded but its run failed.
    RunFailed,
}

impl Fallback {
    pub const ALL: [Fallback; 9] = [
        Fallback::NotConfigured,
        Fallback::RuntimeMissing,
        Fallback::ProviderUnavailable,
        Fallback::NoEngineForShape,
        Fallback::EngineMissing,
        Fallback::EngineLoadFailed,
        Fallback::EngineStale,
        Fallback::MemoryBudget,
        Fallback::RunFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::NotConfigured => "not_configured",
            Fallback::RuntimeMissing => "runtime_missing",
            Fallback::ProviderUnavailable => "provider_unavailable",
            Fallback::NoEngineForShape => "no_engine_for_shape",
            Fallback::EngineMissing => "engine_missing",
            Fallback::EngineLoadFailed => "engine_load_failed",
            Fallback::EngineStale => "engine_stale",
            Fallback::MemoryBudget => "memory_budget",
            Fallback::RunFailed => "run_failed",
        }
    }
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
