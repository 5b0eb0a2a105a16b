//! Records libtorch's directory as the binary's run path, so `x2v` starts without `LD_LIBRARY_PATH`
//! on the machine it was built on (a RUNPATH, so `LD_LIBRARY_PATH` can still point elsewhere).

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_X2V_TORCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_X2V_TORCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags,-rpath,{lib}");
    }
}
