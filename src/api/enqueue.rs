//! ① `POST /v1/jobs`: the wire format's body, answered `202` with the new job or `200` with
//! the existing one when its id or `(kind, dedup_key)` was already taken. A token without
//! `read` gets the job redacted ([`super::view`]): the existing job may be another
//! producer's.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use super::auth::Granted;
use super::extract::JsonBody;
use super::view::JobView;
use super::{ApiError, AppState};
use crate::job::NewJob;

/// Enqueues the job in the body.
pub async fn enqueue(
    State(state): State<AppState>,
    granted: Granted,
    JsonBody(job): JsonBody<NewJob>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let enqueued = state.client.enqueue(job).await?;
    let status = if enqueued.created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(JobView::of(enqueued.job, granted))))
}
