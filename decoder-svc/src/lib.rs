//! x2v-decoder: the decoder stage service of the disaggregated pipeline.
//!
//! Not implemented yet: this crate is filled by the stage-services issue. Nothing here is usable today.
#![forbid(unsafe_code)]
