//! What libtorch can do in this process: its version, CPU threading, and the CUDA devices it sees.

use std::path::PathBuf;
use std::sync::OnceLock;

/// The libtorch version this binary was built against (e.g. `2.11.0+cu130`).
pub const BUILD_VERSION: &str = env!("X2V_LIBTORCH_BUILD_VERSION");

/// The libtorch library directory used at build time (also the binary's run path).
pub const BUILD_LIB_DIR: &str = env!("X2V_LIBTORCH_BUILD_LIB");

/// A snapshot of libtorch's runtime capabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct LibtorchInfo {
    /// Version linked at build time.
    pub build_version: &'static str,
    /// Version of the library actually loaded, read next to it (None if it carries no version file).
    pub runtime_version: Option<String>,
    /// Path of the loaded `libtorch_cpu.so`.
    pub library: Option<PathBuf>,
    /// Whether `libtorch_cuda.so` is loaded into this process.
    pub torch_cuda_loaded: bool,
    pub cpu_threads: i32,
    pub interop_threads: i32,
    pub has_mkl: bool,
    pub has_openmp: bool,
    pub has_mkldnn: bool,
    /// Whether CUDA kernels are usable (library loaded and at least one device).
    pub cuda_available: bool,
    pub cuda_device_count: i64,
    pub cudnn_available: bool,
    /// cuDNN version as an integer (e.g. 91900), when CUDA is available.
    pub cudnn_version: Option<i64>,
    /// CUDA runtime version libtorch was built with (e.g. 13000), when its CUDA backend is registered.
    pub cudart_version: Option<i64>,
    /// Why `libtorch_cuda.so` could not be loaded, when it exists but failed to load.
    pub cuda_load_error: Option<String>,
}

/// Loads `libtorch_cuda.so` from the directory of the mapped `libtorch_cpu.so`, once per process.
///
/// libtorch registers its CUDA backend from `libtorch_cuda`'s static initialisers. Binaries link
/// only `libtorch_cpu` symbols, so the linker's default `--as-needed` drops `libtorch_cuda` and CUDA
/// silently looks absent. Loading it here (with `RTLD_GLOBAL`, kept for the process lifetime)
/// registers the backend before any device is chosen. `Ok(None)`: a CPU-only libtorch.
/// Every entry point that picks a device calls this first; [`LibtorchInfo::query`] does.
pub fn load_cuda() -> Result<Option<PathBuf>, String> {
    static LOADED: OnceLock<Result<Option<PathBuf>, String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let cpu = loaded_library("libtorch_cpu.so")
                .ok_or("libtorch_cpu.so is not mapped into this process")?;
            let cuda = cpu.with_file_name("libtorch_cuda.so");
            if !cuda.exists() {
                return Ok(None);
            }
            let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL;
            // SAFETY: libtorch_cuda.so belongs to the libtorch already loaded in this process (same
            // directory); its initialisers only register the CUDA backend. It is never unloaded.
            let lib = unsafe { libloading::os::unix::Library::open(Some(&cuda), flags) }
                .map_err(|e| format!("cannot load {}: {e}", cuda.display()))?;
            std::mem::forget(lib);
            Ok(Some(cuda))
        })
        .clone()
}

/// [`load_cuda`] for a process that may run on CUDA: always when `cuda` is `Some(true)` (a CUDA
/// device was asked for), never for `Some(false)` (the CPU was), and for `None` (`auto`) only when
/// an NVIDIA driver answers. A CPU process skips it because the CUDA libraries it pulls in
/// (cuBLASLt and friends) cost about 170 MiB of RSS for nothing.
pub fn load_cuda_for(cuda: Option<bool>) -> Result<Option<PathBuf>, String> {
    let wanted =
        cuda.unwrap_or_else(|| crate::cuda_driver::query().is_ok_and(|d| !d.devices.is_empty()));
    if wanted { load_cuda() } else { Ok(None) }
}

impl LibtorchInfo {
    /// Queries libtorch (loading its CUDA library first, see [`load_cuda`]). Safe from any thread.
    pub fn query() -> Self {
        let cuda_load_error = load_cuda().err();
        let library = loaded_library("libtorch_cpu.so");
        let runtime_version = library.as_ref().and_then(|lib| version_next_to(lib));
        let cuda_available = tch::Cuda::is_available();
        LibtorchInfo {
            build_version: BUILD_VERSION,
            runtime_version,
            library,
            torch_cuda_loaded: loaded_library("libtorch_cuda.so").is_some(),
            cpu_threads: tch::get_num_threads(),
            interop_threads: tch::get_num_interop_threads(),
            has_mkl: tch::utils::has_mkl(),
            has_openmp: tch::utils::has_openmp(),
            has_mkldnn: tch::utils::has_mkldnn(),
            cuda_available,
            cuda_device_count: tch::Cuda::device_count(),
            cudnn_available: cuda_available && tch::Cuda::cudnn_is_available(),
            cudnn_version: (cuda_available && tch::Cuda::cudnn_is_available())
                .then(tch::utils::version_cudnn),
            cudart_version: tch::utils::has_cudart().then(tch::utils::version_cudart),
            cuda_load_error,
        }
    }

    /// Whether the loaded library's version matches the one linked at build time (ignoring the
    /// local `+cuXXX` suffix, which only names the CUDA flavour).
    pub fn version_matches(&self) -> Option<bool> {
        let base = |v: &str| v.split('+').next().unwrap_or(v).to_owned();
        self.runtime_version.as_deref().map(|rt| base(rt) == base(self.build_version))
    }
}

/// The path of a shared library mapped into this process, from `/proc/self/maps`.
pub fn loaded_library(file_name: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.rsplit('/').next() == Some(file_name))
        .map(PathBuf::from)
}

fn version_next_to(lib: &std::path::Path) -> Option<String> {
    let dir = lib.parent()?.parent()?;
    if let Ok(text) = std::fs::read_to_string(dir.join("version.py")) {
        return text.lines().find_map(|line| {
            let rest = line.strip_prefix("__version__")?;
            let value = rest.split('=').nth(1)?.trim();
            Some(value.trim_matches(['\'', '"']).to_owned())
        });
    }
    std::fs::read_to_string(dir.join("build-version")).ok().map(|s| s.trim().to_owned())
}

/// The device a config names: `auto` (the first CUDA device when libtorch sees one, else the
/// CPU), `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<tch::Device, String> {
    let cuda = |i: usize| {
        let n = tch::Cuda::device_count() as usize;
        if i < n {
            Ok(tch::Device::Cuda(i))
        } else {
            Err(format!("device `{s}`: libtorch sees {n} CUDA device(s)"))
        }
    };
    match s {
        "auto" => Ok(tch::Device::cuda_if_available()),
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" => cuda(0),
        _ => match s.strip_prefix("cuda:").and_then(|i| i.parse().ok()) {
            Some(i) => cuda(i),
            None => Err(format!("device must be auto, cpu, cuda or cuda:N; got `{s}`")),
        },
    }
}

/// The compute dtype a config names for `device`: `auto` (bf16 on CUDA, fp32 on the CPU), `f32`
/// or `bf16`.
pub fn parse_dtype(s: &str, device: tch::Device) -> Result<tch::Kind, String> {
    match s {
        "auto" if device == tch::Device::Cpu => Ok(tch::Kind::Float),
        "auto" | "bf16" | "bfloat16" => Ok(tch::Kind::BFloat16),
        "f32" | "fp32" | "float32" => Ok(tch::Kind::Float),
        other => Err(format!("dtype must be auto, f32 or bf16; got `{other}`")),
    }
}

/// libtorch's CPU generator is process-global in `tch`; this lock makes seed + draw atomic so
/// that concurrent jobs (of any model family) cannot interleave. Nothing else in x2v's inference
/// paths draws from it.
static CPU_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `draw` on libtorch's CPU generator seeded with `seed` (as
/// `torch.Generator("cpu").manual_seed(seed)`), holding the process-wide generator lock.
pub fn with_cpu_seed<T>(seed: u64, draw: impl FnOnce() -> T) -> T {
    let _lock = CPU_RNG.lock().unwrap_or_else(|e| e.into_inner());
    // torch seeds with the u64 bit pattern; tch takes an i64.
    tch::manual_seed(seed as i64);
    draw()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_the_linked_libtorch() {
        let info = LibtorchInfo::query();
        assert!(info.build_version.starts_with("2.11.0"), "{}", info.build_version);
        let lib = info.library.as_ref().expect("libtorch_cpu.so is mapped");
        assert!(lib.exists());
        assert_eq!(info.version_matches(), Some(true), "{info:?}");
        assert!(info.cpu_threads >= 1);
        // Where the wheel ships libtorch_cuda.so, it must be loaded even on a host without a GPU.
        if std::path::Path::new(BUILD_LIB_DIR).join("libtorch_cuda.so").exists() {
            assert_eq!(info.cuda_load_error, None);
            assert!(info.torch_cuda_loaded, "libtorch_cuda.so is not loaded");
            // The CUDA runtime hooks answer without a device; unregistered hooks report no CUDART.
            assert!(info.cudart_version.is_some(), "libtorch's CUDA backend is not registered");
        }
        assert_eq!(info.cuda_available, info.cuda_device_count > 0);
    }

    #[test]
    fn tensors_compute() {
        let t = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let s: f64 = (&t * &t).sum(tch::Kind::Float).double_value(&[]);
        assert_eq!(s, 14.0);
    }
}
