//! How the API says no: a status and `{"error": "..."}`. Database and broker details go to
//! the log, never into a response.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::client::EnqueueError;
use crate::store::StoreError;

/// An API error.
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
    /// A dependency is down.
    #[error("{0}")]
    Unavailable(String),
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
        tracing::warn!(error = %e, "postgres error in a request");
        ApiError::Unavailable("the job store is unavailable; try again".into())
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
