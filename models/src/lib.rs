//! x2v-models: model code on libtorch (`tch`), weight loading and the stage pipelines.
//!
//! Today this crate holds the libtorch runtime facts ([`device`]) that `x2v doctor` reports and that
//! every model loader relies on (CUDA really linked, devices visible). The Wan2.1 and Qwen-Image
//! components are added by the model issues.

pub mod cuda_driver;
pub mod device;
pub mod nn;
pub mod schedulers;
#[cfg(feature = "testing")]
pub mod testing;
pub mod wan;
pub mod weights;
