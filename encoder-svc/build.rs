//! Records libtorch's directory as the run path of this crate's test binaries, so that they start
//! without `LD_LIBRARY_PATH` on the machine they were built on.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_X2V_TORCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_X2V_TORCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags,-rpath,{lib}");
    }
}
