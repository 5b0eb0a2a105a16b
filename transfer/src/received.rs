//! What a consumer gets: a verified payload living in the receive pool. Dropping it returns the space.

use std::time::Duration;

use x2v_core::JobId;

use crate::config::TransportKind;
use crate::manifest::TensorMeta;
use crate::pool::Lease;

/// A payload whose every tensor passed its checks. Tensors are looked up by name.
#[derive(Debug)]
pub struct Received {
    pub(crate) job: JobId,
    pub(crate) tensors: Vec<TensorMeta>,
    pub(crate) lease: Lease,
    pub(crate) transport: TransportKind,
}

impl Received {
    pub fn job(&self) -> JobId {
        self.job
    }

    /// The manifest, in the sender's order.
    pub fn tensors(&self) -> &[TensorMeta] {
        &self.tensors
    }

    /// The bytes of the tensor called `name`.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        self.tensors.iter().position(|t| t.name == name).map(|i| self.lease.part(i))
    }

    /// Description and bytes of the tensor called `name`.
    pub fn get(&self, name: &str) -> Option<(&TensorMeta, &[u8])> {
        self.tensors
            .iter()
            .position(|t| t.name == name)
            .map(|i| (&self.tensors[i], self.lease.part(i)))
    }

    /// Sum of all tensors' byte lengths.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.byte_len).sum()
    }

    /// The transport that carried it.
    pub fn transport(&self) -> TransportKind {
        self.transport
    }
}

/// What a completed push reports.
#[derive(Debug, Clone, Copy)]
pub struct Receipt {
    pub bytes: u64,
    pub transport: TransportKind,
    /// From the call to the peer's verified ack.
    pub elapsed: Duration,
}
