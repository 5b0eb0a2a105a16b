//! What libtorch can do in this process: its version, CPU threading, and the CUDA devices it sees.

use std::path::PathBuf;

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
}

impl LibtorchInfo {
    /// Queries libtorch. Cheap; safe to call from any thread.
    pub fn query() -> Self {
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
            assert!(info.torch_cuda_loaded, "libtorch_cuda.so was dropped at link time");
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
