//! Generates the `x2v.admin.v1` messages, server and client with tonic-prost-build. Needs `protoc`
//! (Debian/Ubuntu `protobuf-compiler`, installed by `scripts/setup.sh`) or `PROTOC` naming one.

use std::env;
use std::path::{Path, PathBuf};

const PROTOS: &[&str] = &["proto/x2v/admin/v1/admin.proto"];

fn main() {
    println!("cargo:rerun-if-env-changed=PROTOC");
    if let Err(msg) = find_protoc() {
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
    if let Err(e) = tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(PROTOS, &["proto"])
    {
        eprintln!("error: compiling {PROTOS:?} with protoc failed: {e}");
        std::process::exit(1);
    }
}

/// The protoc prost-build will run: `$PROTOC` when set, else `protoc` on `PATH`. Checked up front so a
/// missing compiler reads as what it is rather than as an I/O error from deep inside prost-build.
fn find_protoc() -> Result<PathBuf, String> {
    const HINT: &str = "install protobuf-compiler (`apt-get install protobuf-compiler`, done by \
                        scripts/setup.sh) or set PROTOC to a protoc binary";
    if let Some(path) = env::var_os("PROTOC") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("PROTOC={} does not name a file; {HINT}", path.display()))
        };
    }
    env::var_os("PATH")
        .iter()
        .flat_map(env::split_paths)
        .map(|dir| dir.join("protoc"))
        .find(|p| is_executable(p))
        .ok_or_else(|| format!("x2v-proto needs protoc to build, and none is on PATH; {HINT}"))
}

fn is_executable(p: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }
    #[cfg(not(unix))]
    {
        p.is_file()
    }
}
