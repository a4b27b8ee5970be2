//! ① `POST /v1/jobs`: the wire format's body, answered `202` with the new job or `200` with
//! the existing one when its id or `(kind, dedup_key)` was already taken.

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;

use super::{ApiError, AppState};
use crate::job::{Job, NewJob};

/// Enqueues the job in the body.
pub async fn enqueue(
    State(state): State<AppState>,
    body: Result<Json<NewJob>, JsonRejection>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    let Json(job) = body.map_err(json_error)?;
    let enqueued = state.client.enqueue(job).await?;
    let status = if enqueued.created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(enqueued.job)))
}

/// Turns axum's JSON rejection into our error shape, keeping its field path.
pub(crate) fn json_error(rejection: JsonRejection) -> ApiError {
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
        other if other.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::TooLarge(format!(
                "payload: the request body is over the size limit ({})",
                other.body_text()
            ))
        }
        other => ApiError::BadRequest(other.body_text()),
    }
}
