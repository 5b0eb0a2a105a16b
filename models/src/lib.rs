//! x2v-models: model code on libtorch (`tch`), weight loading and the stage pipelines.
//!
//! - [`error`]: the crate's one error type, naming the component and the file or key at fault.
//! - [`weights`]: memory-mapped checkpoints copied straight into parameters made by [`nn::Builder`].
//! - [`config`]: component configs from `config.json` or a preset.
//! - [`nn`]: the shared layers; [`schedulers`]: the flow-matching samplers.
//! - [`wan`]: the Wan2.1 components and stage pipelines; [`qwen_image`]: Qwen-Image; each has a
//!   `demo` module writing a tiny random-initialised model (shared parts in `demo`).
//! - [`bench`]: flag parsing and statistics of the `x2v-bench-*` binaries.
//! - [`device`]: libtorch runtime facts (CUDA really linked, devices visible) for `x2v doctor`.

pub mod bench;
pub mod config;
pub mod cuda_driver;
mod demo;
pub mod device;
pub mod error;
pub mod lora;
pub mod nn;
pub mod qwen_image;
pub mod schedulers;
#[cfg(feature = "testing")]
pub mod testing;
pub mod wan;
pub mod weights;

pub use error::{Component, Error};
