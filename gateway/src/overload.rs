//! Overload protection in front of the API routes: a bound on the requests handled at once, with
//! the excess answered at once (429 `server_overloaded` with `retry-after`, which the OpenAI
//! clients back off on) instead of queueing in the server, and a deadline on every short request
//! (504 `request_timeout`).
//!
//! Two pools, since their requests live very differently: short requests (create, status, list,
//! cancel, downloads, models; a download's body streams after its permit is returned) and
//! synchronous image requests, which hold their connection until the image is made (up to
//! `http.image_timeout_s`) and so must not starve the short ones. Health, readiness and metrics are
//! outside both: probes must answer under overload.

use std::sync::Arc;
use std::time::Duration;

use axum::BoxError;
use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use x2v_core::ErrorKind;

use crate::error::ApiError;

/// `limit` requests of `routes` at once (0: no bound), each within `timeout` if given.
pub fn protect<S: Clone + Send + Sync + 'static>(
    routes: Router<S>,
    limit: usize,
    timeout: Option<Duration>,
) -> Router<S> {
    let routes = match timeout {
        Some(d) => routes.layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(move |e: BoxError| async move { rejected(e, d) }))
                .timeout(d),
        ),
        None => routes,
    };
    if limit == 0 {
        return routes;
    }
    // One semaphore for every route of the pool: `Router::layer` wraps each route on its own.
    let permits = Arc::new(Semaphore::new(limit));
    routes.layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(
                move |e: BoxError| async move { rejected(e, Duration::ZERO) },
            ))
            .load_shed()
            .layer(GlobalConcurrencyLimitLayer::with_semaphore(permits)),
    )
}

fn rejected(e: BoxError, timeout: Duration) -> Response {
    if e.is::<tower::load_shed::error::Overloaded>() {
        let mut err = ApiError::new(
            ErrorKind::Overloaded,
            "The server is handling as many requests as it is configured to; retry shortly.",
        )
        .code("server_overloaded");
        err.retry_after = Some(1);
        return err.into_response();
    }
    if e.is::<tower::timeout::error::Elapsed>() {
        return ApiError::new(
            ErrorKind::DeadlineExceeded,
            format!("The request took longer than {} s.", timeout.as_secs_f64()),
        )
        .code("request_timeout")
        .into_response();
    }
    ApiError::new(ErrorKind::Internal, format!("request failed: {e}")).into_response()
}
