//! The parity helpers of `x2v_models::testing` (fixture generation from `x2v-testkit`, tensor
//! comparisons), under the `common::` name these tests use.
#![allow(unused_imports)]

pub use x2v_models::testing::*;
