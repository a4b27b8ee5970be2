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
#[utoipa::path(
    post, path = "/v1/jobs", tag = "jobs", operation_id = "enqueue",
    description = "Enqueues a job. Needs the `enqueue` scope; without `read` the answer is the redacted record.",
    request_body = crate::job::NewJob,
    responses(
        (status = 202, description = "Recorded and published (or left to the outbox).", body = crate::api::view::JobView),
        (status = 200, description = "The (kind, dedup_key) was taken: the existing job.", body = crate::api::view::JobView),
        (status = 400, description = "Malformed JSON.", body = crate::api::openapi::ErrorBody), (status = 409, description = "The job's `id` already belongs to another job.", body = crate::api::openapi::ErrorBody), (status = 413, description = "The body is over the size limit.", body = crate::api::openapi::ErrorBody), (status = 422, description = "A field has a wrong value; the message names it.", body = crate::api::openapi::ErrorBody),
    ),
    security(("bearer" = ["enqueue"]))
)]
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
