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

/// The workspace root (this crate sits directly in it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("x2v-testkit sits in the workspace root")
        .to_owned()
}
