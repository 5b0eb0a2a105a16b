//! Links libtorch so that CUDA really is usable on a GPU host.
//!
//! torch-sys links `torch_cuda`, but no symbol of it is referenced, so the default `--as-needed`
//! drops it from the binary and libtorch silently reports no CUDA devices. Re-adding it with the
//! `-as-needed` link modifier keeps it as a dependency of every binary that links this crate.
//! The library directory is also recorded as a run path (tests and local builds start without
//! `LD_LIBRARY_PATH`; a RUNPATH still lets `LD_LIBRARY_PATH` point a binary at another copy).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB")
            .expect("torch-sys exports the libtorch library directory on Linux"),
    );
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-lib=dylib:-as-needed=torch_cuda");
    }
    println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags,-rpath,{}", lib.display());
    println!("cargo:libtorch_lib={}", lib.display());

    // The version string of the libtorch this build links against (pip wheels carry torch/version.py,
    // the C++ zip distribution a build-version file).
    let version = std::fs::read_to_string(lib.join("../version.py"))
        .ok()
        .and_then(|text| parse_version_py(&text))
        .or_else(|| {
            std::fs::read_to_string(lib.join("../build-version")).ok().map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=X2V_LIBTORCH_BUILD_VERSION={version}");
    println!("cargo:rustc-env=X2V_LIBTORCH_BUILD_LIB={}", lib.display());
}

fn parse_version_py(text: &str) -> Option<String> {
    text.lines().find_map(|line| line.strip_prefix("__version__")).map(|rest| {
        rest.trim_start_matches([' ', '=', ':', 's', 't', 'r'])
            .trim()
            .trim_matches(['\'', '"'])
            .to_owned()
    })
}
