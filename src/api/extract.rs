//! The extractors the routes use in place of axum's `Json`, `Query` and `Path`: the same
//! parsing, but a request they refuse gets an [`ApiError`], so `{"error": "..."}` like every
//! other error, instead of axum's plain-text rejection.

use axum::extract::{FromRequest, FromRequestParts};

use super::ApiError;

/// A JSON body (`Content-Type: application/json`, within the body limit).
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct JsonBody<T>(pub T);

/// The query string, deserialized.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct QueryParams<T>(pub T);

/// The path parameters, deserialized.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct PathParams<T>(pub T);

/// A whole-number query parameter within `range`, `default` when absent; 400 naming `field`
/// otherwise.
pub fn int_param(
    field: &str,
    raw: Option<&str>,
    default: i64,
    range: std::ops::RangeInclusive<i64>,
) -> Result<i64, ApiError> {
    let Some(raw) = raw else {
        return Ok(default);
    };
    raw.parse::<i64>()
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "{field}: must be an integer from {} to {}, got {raw:?}",
                range.start(),
                range.end()
            ))
        })
}
