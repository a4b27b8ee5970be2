//! How the API says no: a status and `{"error": "..."}`, for every error, axum's own included
//! (its extractor rejections convert here, and the router's fallbacks answer with these).
//! Database and broker details go to the log, never into a response; the one exception is
//! Postgres refusing a value the caller sent, whose message describes the caller's data.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::client::EnqueueError;
use crate::store::StoreError;

/// An API error.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed input: unparsable JSON, a malformed id or query.
    #[error("{0}")]
    BadRequest(String),
    /// Well-formed input with a wrong value, naming the field.
    #[error("{0}")]
    Unprocessable(String),
    /// No such job.
    #[error("{0}")]
    NotFound(String),
    /// The request body is over the size limit.
    #[error("{0}")]
    TooLarge(String),
    /// The job is not in a state that allows this.
    #[error("{0}")]
    Conflict(String),
    /// No or wrong credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// Credentials without the needed scope.
    #[error("{0}")]
    Forbidden(String),
    /// A dependency is down, or the process is at a limit: try again later.
    #[error("{0}")]
    Unavailable(String),
    /// No route has this path.
    #[error("{0}")]
    NoRoute(String),
    /// The path exists, but not with this method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// A bug on our side; the details are in the log.
    #[error("{0}")]
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NoRoute(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut response = (status, Json(json!({ "error": self.to_string() }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            // RFC 6750: a 401 names the scheme the client should use.
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        // Postgres refused a value the request carried (one it cannot store, or out of
        // range): the caller's to fix, and retrying will not help, so not a 503.
        if e.is_data_error() {
            tracing::debug!(error = %e, "postgres refused a value in a request");
            let why = e
                .refusal()
                .unwrap_or_else(|| "a value was refused".to_string());
            return ApiError::Unprocessable(format!("the job store refused the request: {why}"));
        }
        tracing::warn!(error = %e, "postgres error in a request");
        ApiError::Unavailable("the job store is unavailable; try again".into())
    }
}

/// A body axum's `Json` refused: our shape, keeping serde's field path.
impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        match rejection {
            JsonRejection::JsonDataError(e) => {
                ApiError::Unprocessable(format!("invalid job: {}", e.body_text()))
            }
            JsonRejection::JsonSyntaxError(e) => {
                ApiError::BadRequest(format!("malformed JSON: {}", e.body_text()))
            }
            JsonRejection::MissingJsonContentType(_) => {
                ApiError::BadRequest("expected Content-Type: application/json".into())
            }
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::TooLarge(format!(
                    "payload: the request body is over the size limit ({})",
                    other.body_text()
                ))
            }
            other => ApiError::BadRequest(other.body_text()),
        }
    }
}

/// A query string axum's `Query` could not read (a parameter given twice, say).
impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> ApiError {
        ApiError::BadRequest(format!("malformed query string: {}", rejection.body_text()))
    }
}

/// A path parameter axum's `Path` could not read (invalid percent-encoding, say).
impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> ApiError {
        if rejection.status().is_server_error() {
            // A route and its handler disagree about the parameters: ours to fix.
            tracing::error!(error = %rejection.body_text(), "path parameters do not fit the handler");
            return ApiError::Internal("internal error".into());
        }
        ApiError::BadRequest(format!("malformed path: {}", rejection.body_text()))
    }
}

impl From<crate::client::StatsError> for ApiError {
    fn from(e: crate::client::StatsError) -> Self {
        match e {
            crate::client::StatsError::Store(s) => s.into(),
            crate::client::StatsError::Broker(b) => {
                tracing::warn!(error = %b, "rabbitmq error reading stats");
                ApiError::Unavailable("the broker is unavailable; try again".into())
            }
        }
    }
}

fn e_text(e: &EnqueueError) -> String {
    e.to_string()
}

impl From<EnqueueError> for ApiError {
    fn from(e: EnqueueError) -> Self {
        match e {
            EnqueueError::Invalid(invalid) => ApiError::Unprocessable(invalid.to_string()),
            // The API takes JSON payloads, never typed arguments; should one fail to encode
            // anyway, it is this request's input.
            EnqueueError::Encode { .. } => ApiError::Unprocessable(e_text(&e)),
            EnqueueError::Conflict(_) => ApiError::Conflict(e_text(&e)),
            EnqueueError::Refused(_) => ApiError::Unprocessable(e_text(&e)),
            EnqueueError::Store(s) => s.into(),
            EnqueueError::NotPublished { source, ids } => {
                tracing::warn!(error = %source, jobs = ids.len(), "enqueue recorded but not confirmed by rabbitmq");
                ApiError::Unavailable(format!(
                    "the broker is unavailable; the job was recorded and will be published when it returns \
                     (retrying with the same dedup_key is safe): {}",
                    ids.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                ))
            }
        }
    }
}
