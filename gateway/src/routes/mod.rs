//! HTTP routes: videos, images and operational endpoints.

pub mod images;
pub mod ops;
pub mod videos;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::state::AppState;

/// Serves a stored object, honouring a single `Range`.
pub async fn serve_object(
    state: &AppState,
    key: &str,
    media_type: &str,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let len = state.storage.size(key).await?;
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let mut resp = match range {
        Some(r) => {
            let range = videos::parse_range(r, len).map_err(|mut e| {
                e.retry_after = None;
                e
            });
            let range = match range {
                Ok(r) => r,
                Err(e) => {
                    let mut resp = e.into_response();
                    resp.headers_mut().insert(
                        header::CONTENT_RANGE,
                        HeaderValue::from_str(&format!("bytes */{len}")).expect("ascii"),
                    );
                    return Ok(resp);
                }
            };
            let bytes = state.storage.get_range(key, range.clone()).await?;
            let mut resp = (StatusCode::PARTIAL_CONTENT, bytes).into_response();
            let cr = format!("bytes {}-{}/{len}", range.start, range.end - 1);
            resp.headers_mut()
                .insert(header::CONTENT_RANGE, HeaderValue::from_str(&cr).expect("ascii"));
            resp
        }
        None => state.storage.get(key).await?.into_response(),
    };
    videos::content_headers(&mut resp, media_type);
    Ok(resp)
}
