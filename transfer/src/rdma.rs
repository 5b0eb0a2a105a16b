//! RDMA verbs transport (feature `rdma`).

use crate::error::TransferError;

/// Why RDMA cannot carry a transfer to `peer` in this build.
pub fn unavailable(peer: &str) -> TransferError {
    TransferError::TransportUnavailable {
        transport: "rdma",
        reason: format!("x2v-transfer was built without the `rdma` feature (peer {peer})"),
    }
}
