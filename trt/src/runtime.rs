//! The ONNX Runtime library, loaded at run time (nothing is linked or downloaded at build time):
//! the pip `onnxruntime` wheel's library on CPU hosts, `onnxruntime-gpu`'s where its TensorRT and
//! CUDA execution providers are wanted. Loaded once per process.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::ep::{self, ExecutionProvider};
use ort::session::Session;

/// Where the library is looked for, in order, when the config names none: these environment
/// variables (a file path), then the `onnxruntime` package of these Python environments, then the
/// dynamic loader's search path.
pub const PATH_VARIABLES: [&str; 2] = ["X2V_ONNXRUNTIME", "ORT_DYLIB_PATH"];

/// The loaded library.
pub struct OnnxRuntime {
    pub path: PathBuf,
    /// ONNX Runtime's build description (version and commit).
    pub build: String,
    env: Environment,
}

static RUNTIME: OnceLock<Result<OnnxRuntime, String>> = OnceLock::new();
static LOADING: Mutex<()> = Mutex::new(());

impl OnnxRuntime {
    /// The process's ONNX Runtime, loading it on first use from `explicit` (a library file) or
    /// the first candidate of [`candidates`] that loads. A failure is remembered: the process
    /// does not retry (the library's loader state is global).
    pub fn get(explicit: Option<&Path>) -> Result<&'static OnnxRuntime, String> {
        let _serial = LOADING.lock().unwrap_or_else(|e| e.into_inner());
        RUNTIME.get_or_init(|| load(explicit)).as_ref().map_err(Clone::clone)
    }

    /// The library's version as its file is named (`libonnxruntime.so.1.31.1`), or `unknown`.
    pub fn version(&self) -> String {
        let name =
            self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        match name.split_once(".so.") {
            Some((_, v)) if !v.is_empty() => format!("ONNX Runtime {v}"),
            _ => "ONNX Runtime (version unknown)".into(),
        }
    }

    pub fn environment(&self) -> &Environment {
        &self.env
    }

    /// Whether `provider` can be registered here; the error says why not.
    pub fn probe(&self, provider: Provider, device: usize) -> Result<(), String> {
        let available = match provider {
            Provider::Cpu => return Ok(()),
            Provider::TensorRt => ep::TensorRT::is_available(),
            Provider::Cuda => ep::CUDA::is_available(),
        };
        if !available.map_err(|e| e.to_string())? {
            return Err(format!(
                "{} is not in this build of ONNX Runtime ({}); install onnxruntime-gpu",
                provider.ep_name(),
                self.path.display()
            ));
        }
        let dispatch = match provider {
            Provider::TensorRt => ep::TensorRT::default().with_device_id(device as i32).build(),
            _ => ep::CUDA::default().with_device_id(device as i32).build(),
        };
        Session::builder(&self.env)
            .map_err(|e| e.to_string())?
            .with_execution_providers([dispatch.error_on_failure()])
            .map(drop)
            .map_err(|e| format!("{} cannot be registered: {e}", provider.ep_name()))
    }
}

/// ONNX Runtime's execution providers x2v uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    TensorRt,
    Cuda,
    Cpu,
}

impl Provider {
    pub fn ep_name(self) -> &'static str {
        match self {
            Provider::TensorRt => ep::TensorRT::NAME,
            Provider::Cuda => ep::CUDA::NAME,
            Provider::Cpu => "CPUExecutionProvider",
        }
    }
}

fn load(explicit: Option<&Path>) -> Result<OnnxRuntime, String> {
    let tried: Vec<PathBuf> = match explicit {
        Some(p) => vec![p.to_owned()],
        None => candidates(),
    };
    let mut errors = Vec::new();
    for path in &tried {
        // A bare library name goes to the loader's search path; a path must exist.
        if path.components().count() > 1 && !path.exists() {
            errors.push(format!("{}: no such file", path.display()));
            continue;
        }
        match ort::init_from(path) {
            Ok(builder) => {
                let env = builder.with_name("x2v").build().map_err(|e| {
                    format!(
                        "ONNX Runtime at {} loaded but its environment failed: {e}",
                        path.display()
                    )
                })?;
                let build = ort::info().to_owned();
                tracing::info!(library = %path.display(), %build, "ONNX Runtime loaded");
                return Ok(OnnxRuntime { path: path.clone(), build, env });
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(format!(
        "ONNX Runtime not found (install the onnxruntime or onnxruntime-gpu wheel, or set {}): {}",
        PATH_VARIABLES[0],
        errors.join("; ")
    ))
}

/// Library files to try, in order (see [`PATH_VARIABLES`]).
pub fn candidates() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = PATH_VARIABLES
        .iter()
        .filter_map(std::env::var_os)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .collect();
    let mut prefixes = Vec::new();
    if let Some(python) = std::env::var_os("X2V_PYTHON") {
        // <prefix>/bin/python
        prefixes.extend(Path::new(&python).parent().and_then(Path::parent).map(Path::to_owned));
    }
    prefixes.extend(std::env::var_os("VIRTUAL_ENV").map(PathBuf::from));
    if let Some(home) = std::env::var_os("HOME") {
        prefixes.push(Path::new(&home).join(".cache/x2v/venv"));
    }
    for prefix in prefixes {
        out.extend(wheel_library(&prefix));
    }
    out.push(PathBuf::from("libonnxruntime.so"));
    out.dedup();
    out
}

/// `<prefix>/lib/python3.*/site-packages/onnxruntime/capi/libonnxruntime.so*` (the wheel ships the
/// library under its versioned name).
fn wheel_library(prefix: &Path) -> Option<PathBuf> {
    let lib = prefix.join("lib");
    let mut pythons: Vec<PathBuf> = std::fs::read_dir(&lib)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("python3")))
        .collect();
    pythons.sort();
    pythons.into_iter().rev().find_map(|py| {
        let capi = py.join("site-packages/onnxruntime/capi");
        let mut libs: Vec<PathBuf> = std::fs::read_dir(&capi)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so"))
            })
            .collect();
        // The versioned file, not a provider library.
        libs.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        libs.into_iter().next()
    })
}
