//! Records where libtorch lives and which version it is.
//!
//! The library directory becomes a run path of this crate's test binaries and is exported to
//! dependents (`DEP_X2V_TORCH_LIBTORCH_LIB`) so binaries start without `LD_LIBRARY_PATH` on the
//! build machine; it is a RUNPATH, so `LD_LIBRARY_PATH` can still point a binary at another copy.
//! (`libtorch_cuda` is loaded at run time by `device::load_cuda`: the linker's `--as-needed` drops
//! it from the binary because no symbol of it is referenced.)

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB")
            .expect("torch-sys exports the libtorch library directory on Linux"),
    );
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
