//! RDMA verbs transport (feature `rdma`, over `sideway`, which loads libibverbs at run time).
//!
//! What exists: device discovery; an [`Endpoint`] that opens a device, registers a [`Region`] (the
//! receive pool) once with remote-write access, creates an RC queue pair, walks it INIT → RTR → RTS
//! from the peer's [`ConnInfo`], and performs one-sided RDMA WRITEs with a deadline on the completion.
//! What does not exist yet: the engine does not advertise or negotiate RDMA in its handshake, so a
//! forced `rdma` transport fails with `TransportUnavailable` (see [`unavailable`]). The hardware test is
//! ignored because this machine's kernel has no RDMA subsystem.

use crate::error::TransferError;

/// Why RDMA cannot carry a transfer to `peer` in this build.
pub fn unavailable(peer: &str) -> TransferError {
    let reason = if cfg!(feature = "rdma") {
        format!(
            "RDMA endpoints are built in, but the engine does not negotiate them with peers yet (peer {peer})"
        )
    } else {
        format!("x2v-transfer was built without the `rdma` feature (peer {peer})")
    };
    TransferError::TransportUnavailable { transport: "rdma", reason }
}

#[cfg(feature = "rdma")]
#[path = "rdma_verbs.rs"]
mod verbs;
#[cfg(feature = "rdma")]
pub use verbs::{ConnInfo, Endpoint, devices};

#[cfg(feature = "rdma")]
use crate::region::Region;
