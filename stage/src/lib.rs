//! x2v-stage: the runtime every stage service (encoder, DiT, decoder) shares. It needs no
//! libtorch: the model work is a [`runner::StageRunner`] the service crate supplies.
//!
//! - [`config`]: the one config struct of a stage service.
//! - [`state`]: identity, readiness, in-flight jobs and metrics, shared with the admin endpoints.
//! - [`exchange`]: hands payloads to the next stage (in-process, or x2v-transfer by job id).
//! - [`device`]: the dedicated thread a stage's model runs on.
//! - [`family`]: which model family a stage serves, from its model directory.
//! - [`job`]: what a runner reads from a job (geometry, received payload, uploads).
//! - [`runner`] / [`runtime`]: the claim → receive → run → finish → send → complete loop.
//! - [`service`]: starting a stage service from its config (or inside `x2v up`).
//! - [`admin`]: gRPC `grpc.health.v1` and `x2v.admin.v1.Admin`, HTTP `/metrics`, `/healthz`, `/readyz`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod device;
pub mod exchange;
pub mod family;
pub mod job;
pub mod runner;
pub mod runtime;
pub mod service;
pub mod state;

pub use config::StageConfig;
pub use state::ServiceState;
