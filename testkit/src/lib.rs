//! x2v-testkit: what x2v's test suites share, so that each helper exists once.
//!
//! - [`redis::RedisServer`]: a real `redis-server` on a free port, killed on drop.
//! - [`otlp::TraceReceiver`]: an OTLP/gRPC trace collector that keeps every exported span.
//! - [`config`]: gateway and stage config files for tests that run the services.
//! - [`jobs`]: job specs and new jobs for the queue, the gateway and the stages.
//! - [`fixtures`]: reference fixtures made by the Python generators in `tools/fixtures/`.
//!
//! It does not link libtorch, so every crate can take it as a dev-dependency; the tensor
//! comparisons on top of [`fixtures`] live in `x2v_models::testing`.

pub mod config;
pub mod fixtures;
pub mod jobs;
pub mod otlp;
pub mod redis;

use std::path::{Path, PathBuf};

/// The workspace root of the checkout under test. Every x2v crate sits directly in it, so it is
/// the parent of the package directory cargo names when it runs a test (`CARGO_MANIFEST_DIR` at
/// run time); this crate's own compile-time directory is the fallback. (Artifacts built from
/// another checkout that shares the target directory may be reused, so the compile-time path
/// can name a checkout that is gone.)
pub fn repo_root() -> PathBuf {
    let package = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    Path::new(&package).parent().expect("x2v crates sit in the workspace root").to_owned()
}
