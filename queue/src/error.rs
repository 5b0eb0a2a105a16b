//! Errors of the queue crate, each mapping into the shared [`ErrorKind`].

use x2v_core::ErrorKind;

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("no job with id `{0}`")]
    NotFound(String),
    /// The caller's lease expired and the job went to another worker, or the job finished.
    #[error("lease on job `{0}` is no longer held by this worker")]
    LeaseLost(String),
    #[error("job `{0}` was cancelled")]
    Cancelled(String),
    #[error("Idempotency-Key `{0}` was already used for a different request")]
    IdempotencyMismatch(String),
    #[error("{0}")]
    Invalid(String),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected redis reply: {0}")]
    Reply(#[from] redis::ParsingError),
    #[error("storage: {0}")]
    Storage(String),
    #[error("corrupt job record `{id}`: {message}")]
    Corrupt { id: String, message: String },
}

impl QueueError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            QueueError::NotFound(_) => ErrorKind::NotFound,
            QueueError::LeaseLost(_) => ErrorKind::Conflict,
            QueueError::Cancelled(_) => ErrorKind::Cancelled,
            // The key is taken by another request: a conflict with what the store holds.
            QueueError::IdempotencyMismatch(_) => ErrorKind::Conflict,
            QueueError::Invalid(_) => ErrorKind::InvalidRequest,
            QueueError::Redis(e)
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() =>
            {
                ErrorKind::Unavailable
            }
            QueueError::Redis(_)
            | QueueError::Reply(_)
            | QueueError::Storage(_)
            | QueueError::Corrupt { .. } => ErrorKind::Internal,
        }
    }
}
