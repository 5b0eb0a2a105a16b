//! x2v-proto: the gRPC services of x2v's stage services, generated from `proto/` at build time.
//!
//! - [`admin::v1`]: `x2v.admin.v1.Admin` (status, loaded models, drain), served by every stage
//!   service next to `grpc.health.v1.Health`.
#![forbid(unsafe_code)]

pub mod admin {
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("x2v.admin.v1");
    }
}
