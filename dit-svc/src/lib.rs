//! x2v-dit: the dit stage service of the disaggregated pipeline.
//!
//! Not implemented yet: this crate is filled by the stage-services issue. Nothing here is usable today.
#![forbid(unsafe_code)]
