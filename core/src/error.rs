//! The closed set of error kinds shared by every x2v crate.
//!
//! Each library crate has its own `thiserror` enum with structured variants and a `kind()` that maps
//! into [`ErrorKind`]. Protocol edges render a kind exactly once: an HTTP status plus the OpenAI error
//! `type` for the gateway, a gRPC code for the stage services.

use serde::{Deserialize, Serialize};

/// What went wrong, at the granularity a caller can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is malformed or asks for something the served model does not allow.
    InvalidRequest,
    /// Missing or wrong credentials.
    Unauthenticated,
    /// The named job, model or object does not exist (or no longer exists).
    NotFound,
    /// The request conflicts with current state (e.g. downloading a job that has not completed).
    Conflict,
    /// Too much work in flight or a rate limit hit; retrying later may succeed.
    Overloaded,
    /// The work was cancelled on request.
    Cancelled,
    /// A deadline passed before the work finished.
    DeadlineExceeded,
    /// A dependency (Redis, a peer stage, a device) is unreachable right now.
    Unavailable,
    /// A bug or an unexpected failure inside x2v.
    Internal,
}

impl ErrorKind {
    /// Every kind, for exhaustive tests and metric label pre-registration.
    pub const ALL: [ErrorKind; 9] = [
        ErrorKind::InvalidRequest,
        ErrorKind::Unauthenticated,
        ErrorKind::NotFound,
        ErrorKind::Conflict,
        ErrorKind::Overloaded,
        ErrorKind::Cancelled,
        ErrorKind::DeadlineExceeded,
        ErrorKind::Unavailable,
        ErrorKind::Internal,
    ];

    /// Stable machine-readable label (used in job records, metrics and `error.code`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        }
    }

    /// HTTP status code for this kind.
    pub fn http_status(self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            ErrorKind::InvalidRequest => S::BAD_REQUEST,
            ErrorKind::Unauthenticated => S::UNAUTHORIZED,
            ErrorKind::NotFound => S::NOT_FOUND,
            ErrorKind::Conflict => S::CONFLICT,
            ErrorKind::Overloaded => S::TOO_MANY_REQUESTS,
            // 499 is nginx's "client closed request"; OpenAI clients treat any other 4xx as final.
            ErrorKind::Cancelled => S::from_u16(499).expect("499 is a valid status"),
            ErrorKind::DeadlineExceeded => S::GATEWAY_TIMEOUT,
            ErrorKind::Unavailable => S::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => S::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI error envelope's `type` field for this kind.
    pub fn openai_type(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest
            | ErrorKind::NotFound
            | ErrorKind::Conflict
            | ErrorKind::Cancelled => "invalid_request_error",
            ErrorKind::Unauthenticated => "authentication_error",
            ErrorKind::Overloaded => "rate_limit_error",
            ErrorKind::DeadlineExceeded | ErrorKind::Unavailable | ErrorKind::Internal => {
                "server_error"
            }
        }
    }

    /// The gRPC status code for this kind.
    pub fn grpc_code(self) -> tonic::Code {
        use tonic::Code as C;
        match self {
            ErrorKind::InvalidRequest => C::InvalidArgument,
            ErrorKind::Unauthenticated => C::Unauthenticated,
            ErrorKind::NotFound => C::NotFound,
            ErrorKind::Conflict => C::FailedPrecondition,
            ErrorKind::Overloaded => C::ResourceExhausted,
            ErrorKind::Cancelled => C::Cancelled,
            ErrorKind::DeadlineExceeded => C::DeadlineExceeded,
            ErrorKind::Unavailable => C::Unavailable,
            ErrorKind::Internal => C::Internal,
        }
    }

    /// The kind a gRPC status code maps back to (the inverse of [`ErrorKind::grpc_code`]).
    pub fn from_grpc_code(code: tonic::Code) -> Self {
        use tonic::Code as C;
        match code {
            C::InvalidArgument | C::OutOfRange => ErrorKind::InvalidRequest,
            C::Unauthenticated | C::PermissionDenied => ErrorKind::Unauthenticated,
            C::NotFound => ErrorKind::NotFound,
            C::FailedPrecondition | C::AlreadyExists | C::Aborted => ErrorKind::Conflict,
            C::ResourceExhausted => ErrorKind::Overloaded,
            C::Cancelled => ErrorKind::Cancelled,
            C::DeadlineExceeded => ErrorKind::DeadlineExceeded,
            C::Unavailable => ErrorKind::Unavailable,
            C::Ok | C::Unknown | C::Unimplemented | C::Internal | C::DataLoss => {
                ErrorKind::Internal
            }
        }
    }

    /// Whether a client may retry the same request later and expect a different outcome.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorKind::Overloaded | ErrorKind::Unavailable | ErrorKind::DeadlineExceeded)
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a job failed, as recorded in its `error.code`. The names are a wire format: job records,
/// the video status body and the OpenAI error envelope carry them verbatim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobErrorCode {
    /// The request cannot be served as sent (e.g. an image-to-video job without an image).
    InvalidRequest,
    /// An uploaded image could not be decoded.
    InvalidImage,
    /// An input video could not be decoded.
    InvalidVideo,
    /// An uploaded input could not be read back from storage.
    InputUnavailable,
    /// The stage could not load its model.
    ModelLoadFailed,
    /// The previous stage's payload does not fit what this stage expects.
    InvalidPayload,
    /// The previous stage's payload is gone (expired, or its engine is unreachable).
    PayloadUnavailable,
    /// A payload arrived corrupted (digest mismatch).
    TransferIntegrity,
    /// Fetching a payload took longer than `transfer.timeout_s`.
    TransferTimeout,
    /// Fetching a payload failed for another reason.
    TransferFailed,
    /// Encoding frames into video or image files failed.
    MediaEncodingFailed,
    /// Writing outputs to storage failed.
    StorageFailed,
    /// The stage ran past `worker.job_timeout_s`.
    DeadlineExceeded,
    /// The job was cancelled.
    Cancelled,
    /// A bug or unexpected failure inside x2v.
    InternalError,
}

impl JobErrorCode {
    /// Every code, for exhaustive tests.
    pub const ALL: [JobErrorCode; 15] = [
        JobErrorCode::InvalidRequest,
        JobErrorCode::InvalidImage,
        JobErrorCode::InvalidVideo,
        JobErrorCode::InputUnavailable,
        JobErrorCode::ModelLoadFailed,
        JobErrorCode::InvalidPayload,
        JobErrorCode::PayloadUnavailable,
        JobErrorCode::TransferIntegrity,
        JobErrorCode::TransferTimeout,
        JobErrorCode::TransferFailed,
        JobErrorCode::MediaEncodingFailed,
        JobErrorCode::StorageFailed,
        JobErrorCode::DeadlineExceeded,
        JobErrorCode::Cancelled,
        JobErrorCode::InternalError,
    ];

    /// The stored and rendered name (the serde name).
    pub fn as_str(self) -> &'static str {
        match self {
            JobErrorCode::InvalidRequest => "invalid_request",
            JobErrorCode::InvalidImage => "invalid_image",
            JobErrorCode::InvalidVideo => "invalid_video",
            JobErrorCode::InputUnavailable => "input_unavailable",
            JobErrorCode::ModelLoadFailed => "model_load_failed",
            JobErrorCode::InvalidPayload => "invalid_payload",
            JobErrorCode::PayloadUnavailable => "payload_unavailable",
            JobErrorCode::TransferIntegrity => "transfer_integrity",
            JobErrorCode::TransferTimeout => "transfer_timeout",
            JobErrorCode::TransferFailed => "transfer_failed",
            JobErrorCode::MediaEncodingFailed => "media_encoding_failed",
            JobErrorCode::StorageFailed => "storage_failed",
            JobErrorCode::DeadlineExceeded => "deadline_exceeded",
            JobErrorCode::Cancelled => "cancelled",
            JobErrorCode::InternalError => "internal_error",
        }
    }

    /// The code with this name, if any.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Whose fault the failure is, which decides the HTTP status and OpenAI error `type`. Only the
    /// client's input is `InvalidRequest`; a broken hand-over between stages is x2v's own failure.
    pub fn kind(self) -> ErrorKind {
        match self {
            JobErrorCode::InvalidRequest
            | JobErrorCode::InvalidImage
            | JobErrorCode::InvalidVideo => ErrorKind::InvalidRequest,
            JobErrorCode::InputUnavailable
            | JobErrorCode::PayloadUnavailable
            | JobErrorCode::TransferFailed
            | JobErrorCode::StorageFailed => ErrorKind::Unavailable,
            JobErrorCode::TransferTimeout | JobErrorCode::DeadlineExceeded => {
                ErrorKind::DeadlineExceeded
            }
            JobErrorCode::Cancelled => ErrorKind::Cancelled,
            JobErrorCode::ModelLoadFailed
            | JobErrorCode::InvalidPayload
            | JobErrorCode::TransferIntegrity
            | JobErrorCode::MediaEncodingFailed
            | JobErrorCode::InternalError => ErrorKind::Internal,
        }
    }
}

impl std::fmt::Display for JobErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_mapping_round_trips() {
        for kind in ErrorKind::ALL {
            assert_eq!(ErrorKind::from_grpc_code(kind.grpc_code()), kind, "{kind}");
        }
    }

    #[test]
    fn http_statuses_follow_openai_client_expectations() {
        assert_eq!(ErrorKind::InvalidRequest.http_status(), 400);
        assert_eq!(ErrorKind::Unauthenticated.http_status(), 401);
        assert_eq!(ErrorKind::NotFound.http_status(), 404);
        assert_eq!(ErrorKind::Overloaded.http_status(), 429);
        for kind in ErrorKind::ALL {
            let status = kind.http_status();
            // The official clients retry 408, 409, 429 and 5xx. Besides the retryable kinds only Internal
            // (a retry may land on a healthy worker) and Conflict (state may change) are sent there.
            let client_retries =
                [408, 409, 429].contains(&status.as_u16()) || status.is_server_error();
            let expected =
                kind.is_retryable() || matches!(kind, ErrorKind::Internal | ErrorKind::Conflict);
            assert_eq!(client_retries, expected, "{kind}");
        }
    }

    #[test]
    fn labels_are_unique_and_serde_matches() {
        let mut seen = std::collections::HashSet::new();
        for kind in ErrorKind::ALL {
            assert!(seen.insert(kind.as_str()));
            assert_eq!(serde_json::to_value(kind).unwrap(), serde_json::Value::from(kind.as_str()));
        }
    }

    #[test]
    fn job_error_codes_are_unique_and_serde_matches() {
        let mut seen = std::collections::HashSet::new();
        for code in JobErrorCode::ALL {
            assert!(seen.insert(code.as_str()));
            assert_eq!(serde_json::to_value(code).unwrap(), serde_json::Value::from(code.as_str()));
            assert_eq!(JobErrorCode::parse(code.as_str()), Some(code));
        }
        assert_eq!(JobErrorCode::parse("boom"), None);
    }

    #[test]
    fn only_input_failures_are_the_clients_fault() {
        for code in JobErrorCode::ALL {
            let client = matches!(
                code,
                JobErrorCode::InvalidRequest
                    | JobErrorCode::InvalidImage
                    | JobErrorCode::InvalidVideo
            );
            assert_eq!(code.kind() == ErrorKind::InvalidRequest, client, "{code}");
        }
        assert_eq!(JobErrorCode::InternalError.kind().http_status(), 500);
        assert_eq!(JobErrorCode::InvalidImage.kind().http_status(), 400);
    }
}
