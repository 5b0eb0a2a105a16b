//! x2v-transfer: moves named tensors (Phase1 embeddings, Phase2 latents) between stage processes and
//! hosts over shared memory, TCP and (behind the `rdma` feature) RDMA verbs.
//!
//! One [`Engine`] per process owns a receive [`pool::Pool`] (memory only for the payloads it holds),
//! listens on TCP (and on an abstract Unix socket for same-host peers), and moves [`Payload`]s
//! addressed by job id:
//! - **push**: the sender writes into the receiver's pool; [`Engine::recv`] hands it to the consumer;
//! - **pull**: the receiver asks for a job the sender [`Engine::publish`]ed and reads it into its pool.
//!
//! Every connection is mutually authenticated with the deployment secret; every operation has a
//! deadline and can be cancelled; a transfer succeeds only once the receiver has verified each tensor's
//! chunked SHA-256 ([`digest`]: a SHA-256 per 1 MiB leaf, hashed on every core on both sides while the
//! bytes move, and a root over the leaves) and acknowledged it. See `README.md` for the wire protocol
//! and measurements.
#![deny(unsafe_code)]

pub mod auth;
mod channel;
pub mod config;
pub mod conn;
mod data;
pub mod digest;
mod engine;
pub mod error;
pub mod manifest;
pub mod pool;
pub mod rdma;
mod received;
pub mod region;
mod serve;
pub mod wire;

pub use auth::Secret;
pub use config::{EngineConfig, Opts, TransportChoice, TransportKind};
pub use engine::Engine;
pub use error::{Result, TransferError};
pub use manifest::{Dtype, OutTensor, Payload, TensorMeta, TensorPart};
pub use received::{Receipt, Received};
