//! Request-wide layers: `x-request-id` on every response, the OpenAI envelope for errors produced
//! outside handlers (unknown routes, wrong methods, body limits), bearer auth with per-key rate
//! limits, and request metrics. The trace context of an incoming request parents its span.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;
use x2v_core::ErrorKind;

use crate::error::ApiError;
use crate::state::AppState;

pub const REQUEST_ID: &str = "x-request-id";

/// Outermost layer: request id, span, metrics, and envelope for bare error responses.
pub async fn request_context(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let request_id = format!("req_{}", x2v_core::JobId::new());
    let header = HeaderValue::from_str(&request_id).expect("ascii id");
    let matched = req.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map_or("unmatched", MatchedPath::as_str);
    let span = tracing::info_span!("http", method = %req.method(), route = %route, request_id = %request_id);
    if req.headers().contains_key("traceparent") {
        x2v_core::propagation::set_parent(
            &span,
            x2v_core::propagation::extract_http(req.headers()),
        );
    }
    req.extensions_mut().insert(RequestId(request_id));
    let started = Instant::now();
    let mut resp = next.run(req).instrument(span).await;
    resp = envelope_bare_errors(resp).await;
    resp.headers_mut().insert(REQUEST_ID, header);
    state.metrics.requests.with_label_values(&[route, resp.status().as_str()]).inc();
    state.metrics.latency.with_label_values(&[route]).observe(started.elapsed().as_secs_f64());
    resp
}

/// The id of the request being served.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

async fn envelope_bare_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json =
        resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| {
            ct.starts_with("application/json") || ct.starts_with("text/event-stream")
        });
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let kind = match status {
        StatusCode::NOT_FOUND => ErrorKind::NotFound,
        StatusCode::UNAUTHORIZED => ErrorKind::Unauthenticated,
        StatusCode::TOO_MANY_REQUESTS => ErrorKind::Overloaded,
        s if s.is_server_error() => ErrorKind::Internal,
        _ => ErrorKind::InvalidRequest,
    };
    let message = match (status, text.trim()) {
        (StatusCode::NOT_FOUND, _) => "Unknown route.".to_owned(),
        (StatusCode::METHOD_NOT_ALLOWED, _) => "Method not allowed for this route.".to_owned(),
        (StatusCode::PAYLOAD_TOO_LARGE, _) => {
            "The request body is larger than this gateway accepts.".to_owned()
        }
        (_, "") => status.canonical_reason().unwrap_or("Error").to_owned(),
        (_, t) => t.to_owned(),
    };
    let mut out = ApiError::new(kind, message).status(status).into_response();
    for (name, value) in parts
        .headers
        .iter()
        .filter(|(n, _)| *n != header::CONTENT_TYPE && *n != header::CONTENT_LENGTH)
    {
        out.headers_mut().insert(name.clone(), value.clone());
    }
    out
}

/// Bearer-key check (when keys are configured) and the caller's rate limit.
pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let keys = &state.keys;
    let caller = if keys.is_empty() {
        keys.anonymous().clone()
    } else {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        match given.and_then(|g| keys.find(g)) {
            Some(i) => keys.caller(i).clone(),
            None => {
                let message = if given.is_none() {
                    "You didn't provide an API key. Send it as `Authorization: Bearer <key>`."
                } else {
                    "Incorrect API key provided."
                };
                return ApiError::new(ErrorKind::Unauthenticated, message)
                    .code("invalid_api_key")
                    .into_response();
            }
        }
    };
    if let Err(retry_after) = state.limiter.check(&caller.0) {
        let mut e = ApiError::new(
            ErrorKind::Overloaded,
            format!("Rate limit reached; retry in {retry_after} s."),
        )
        .code("rate_limit_exceeded");
        e.retry_after = Some(retry_after);
        return e.into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}
