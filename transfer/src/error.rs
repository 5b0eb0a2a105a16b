//! The crate's error type. Every variant names what a caller or an operator needs to act on: the peer,
//! the tensor, the limit that was hit.

use std::io;
use std::time::Duration;

use x2v_core::ErrorKind;

/// Everything that can go wrong moving a payload.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The peer did not prove knowledge of the deployment secret (or we failed to prove ours).
    #[error("authentication with {peer} failed: {reason}")]
    Unauthenticated { peer: String, reason: String },
    /// A frame broke the wire protocol: bad magic, unknown tag, truncated body, impossible length.
    #[error("protocol error with {peer}: {reason}")]
    Protocol { peer: String, reason: String },
    /// A manifest or request is not acceptable (names, dtypes, shapes, sizes).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A region, offset or length falls outside what the receiver allocated.
    #[error("out of bounds: {0}")]
    OutOfBounds(String),
    /// The payload can never fit, whatever the load.
    #[error("payload of {requested} bytes exceeds the limit of {limit} bytes ({what})")]
    TooLarge { requested: u64, limit: u64, what: &'static str },
    /// The receiver's pool has no room right now; retry later.
    #[error(
        "receive pool exhausted: {needed} bytes needed, {free} of {capacity} free after waiting {waited:?}"
    )]
    Overloaded { needed: u64, free: u64, capacity: u64, waited: Duration },
    /// The operation's deadline passed.
    #[error("deadline exceeded during {during}")]
    DeadlineExceeded { during: &'static str },
    /// The caller cancelled the transfer.
    #[error("transfer cancelled during {during}")]
    Cancelled { during: &'static str },
    /// A tensor's bytes do not match its digest or a chunk's checksum; nothing was handed out.
    #[error("integrity check failed for tensor `{tensor}`: {detail}")]
    Integrity { tensor: String, detail: String },
    /// No payload under this job id.
    #[error("no payload for job {job}")]
    NotFound { job: String },
    /// A payload for this job id is already held or in flight.
    #[error("a payload for job {job} already exists")]
    Conflict { job: String },
    /// Connecting to the peer failed or timed out.
    #[error("cannot connect to {peer}: {source}")]
    Connect { peer: String, source: io::Error },
    /// The connection broke (reset, EOF, socket error) while talking to the peer.
    #[error("i/o error with {peer} during {during}: {source}")]
    Io { peer: String, during: &'static str, source: io::Error },
    /// The peer reported a failure; `kind` is its classification.
    #[error("peer {peer} rejected the request ({kind}): {message}")]
    Remote { peer: String, kind: ErrorKind, message: String },
    /// A transport cannot be used with this peer (not on the same host, not compiled in, no device).
    #[error("transport {transport} unavailable: {reason}")]
    TransportUnavailable { transport: &'static str, reason: String },
    /// Setting up local resources (memory regions, sockets) failed.
    #[error("local resource error ({what}): {source}")]
    Local { what: &'static str, source: io::Error },
}

impl TransferError {
    /// The kind callers branch on.
    pub fn kind(&self) -> ErrorKind {
        match self {
            TransferError::Unauthenticated { .. } => ErrorKind::Unauthenticated,
            TransferError::Protocol { .. }
            | TransferError::Invalid(_)
            | TransferError::OutOfBounds(_)
            | TransferError::TooLarge { .. } => ErrorKind::InvalidRequest,
            TransferError::Overloaded { .. } => ErrorKind::Overloaded,
            TransferError::DeadlineExceeded { .. } => ErrorKind::DeadlineExceeded,
            TransferError::Cancelled { .. } => ErrorKind::Cancelled,
            // Corruption in flight is transient: a retry over a healthy path is expected to succeed.
            TransferError::Integrity { .. } => ErrorKind::Unavailable,
            TransferError::NotFound { .. } => ErrorKind::NotFound,
            TransferError::Conflict { .. } => ErrorKind::Conflict,
            TransferError::Connect { .. }
            | TransferError::Io { .. }
            | TransferError::TransportUnavailable { .. } => ErrorKind::Unavailable,
            TransferError::Remote { kind, .. } => *kind,
            TransferError::Local { .. } => ErrorKind::Internal,
        }
    }

    pub(crate) fn protocol(peer: &str, reason: impl Into<String>) -> Self {
        TransferError::Protocol { peer: peer.to_owned(), reason: reason.into() }
    }
}

/// Shorthand used across the crate.
pub type Result<T, E = TransferError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_actionable() {
        let e =
            TransferError::Overloaded { needed: 1, free: 0, capacity: 1, waited: Duration::ZERO };
        assert_eq!(e.kind(), ErrorKind::Overloaded);
        assert!(e.to_string().contains("pool exhausted"));
        let e =
            TransferError::Integrity { tensor: "latents".into(), detail: "sha256 mismatch".into() };
        assert!(e.to_string().contains("`latents`"));
        let e = TransferError::Remote {
            peer: "p".into(),
            kind: ErrorKind::NotFound,
            message: "m".into(),
        };
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }
}
