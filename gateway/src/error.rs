//! The gateway's error type, rendered once as the OpenAI error envelope
//! `{"error": {"message", "type", "param", "code"}}` with the status its kind maps to.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;
use x2v_core::ErrorKind;
use x2v_queue::QueueError;

/// An error answered to an API client.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<String>,
    /// Overrides the kind's status (416 for an unsatisfiable range, 413 for a large body).
    pub status: Option<StatusCode>,
    /// Seconds for `retry-after` (rate limits).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
            param: None,
            code: None,
            status: None,
            retry_after: None,
        }
    }

    /// A 400 about one request field.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::InvalidRequest, message).param(param).code("invalid_value")
    }

    pub fn not_found(what: &str, id: &str) -> Self {
        ApiError::new(ErrorKind::NotFound, format!("No {what} found with id '{id}'."))
            .code("not_found")
    }

    pub fn param(mut self, p: &str) -> Self {
        self.param = Some(p.to_owned());
        self
    }

    pub fn code(mut self, c: &str) -> Self {
        self.code = Some(c.to_owned());
        self
    }

    pub fn status(mut self, s: StatusCode) -> Self {
        self.status = Some(s);
        self
    }

    pub fn http_status(&self) -> StatusCode {
        self.status.unwrap_or_else(|| self.kind.http_status())
    }

    /// The envelope.
    pub fn envelope(&self) -> ErrorEnvelope<'_> {
        ErrorEnvelope {
            error: ErrorObject {
                message: &self.message,
                kind: self.kind.openai_type(),
                param: self.param.as_deref(),
                code: self.code.as_deref().unwrap_or(self.kind.as_str()),
            },
        }
    }

    /// The envelope as JSON (SSE `error` events add their `type` to it).
    pub fn body(&self) -> serde_json::Value {
        serde_json::to_value(self.envelope()).expect("the envelope serializes")
    }
}

/// The OpenAI error envelope every 4xx and 5xx answer carries.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorEnvelope<'a> {
    pub error: ErrorObject<'a>,
}

/// What went wrong, in the OpenAI shape.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorObject<'a> {
    /// Says what is allowed and what was given.
    pub message: &'a str,
    /// The OpenAI error type (`invalid_request_error`, `authentication_error`, ...).
    #[serde(rename = "type")]
    pub kind: &'a str,
    /// The request field at fault, if one is.
    pub param: Option<&'a str>,
    /// A stable machine-readable code (`invalid_value`, `rate_limit_exceeded`, ...).
    pub code: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.http_status();
        if status.is_server_error() {
            tracing::error!(kind = %self.kind, message = %self.message, "request failed");
        }
        let mut resp = (status, axum::Json(self.envelope())).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        let kind = e.kind();
        match &e {
            QueueError::IdempotencyMismatch(_) => ApiError::new(kind, "This Idempotency-Key was already used for a different request; use a new key for a new request.")
                .param("Idempotency-Key")
                .code("idempotency_key_reused"),
            QueueError::Invalid(_) => ApiError::new(kind, e.to_string()).code("invalid_value"),
            // Details of internal failures go to the log, not to the client.
            _ if matches!(kind, ErrorKind::Internal | ErrorKind::Unavailable) => {
                tracing::error!(error = %e, "queue or storage failure");
                ApiError::new(kind, format!("The job store is failing: {}", kind.as_str()))
            }
            _ => ApiError::new(kind, e.to_string()),
        }
    }
}
