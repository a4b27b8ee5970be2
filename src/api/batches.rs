//! ① Groups of jobs: `POST /v1/chains` (each job depends on the one before) and
//! `POST /v1/batches` (jobs plus a callback enqueued once the last is final), and
//! `GET /v1/batches/{id}` (counts by status and progress). Both posts record every job in one
//! transaction, all or nothing, and their jobs must be new.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::auth::Granted;
use super::extract::{JsonBody, PathParams};
use super::view::JobView;
use super::{ApiError, AppState};
use crate::client::{BatchEnqueued, OnComplete};
use crate::job::NewJob;
use crate::store::batches::Batch;

/// The most bytes a chain's or a batch's body may have: room for 10,000 small jobs.
pub const MAX_GROUP_BODY_BYTES: usize = 32 * 1024 * 1024;

/// `POST /v1/chains`'s body.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainBody {
    /// The steps, in order.
    pub jobs: Vec<NewJob>,
}

/// `POST /v1/chains`'s answer.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Serialize)]
pub struct ChainAnswer {
    /// The jobs, in order: the first `queued` (or `waiting` on its own parents), the others
    /// `waiting`.
    pub jobs: Vec<JobView>,
}

/// Records a chain.
#[utoipa::path(
    post, path = "/v1/chains", tag = "jobs", operation_id = "enqueue_chain",
    description = "Enqueues jobs that run one after the other. Needs `enqueue`.",
    request_body = crate::api::batches::ChainBody,
    responses(
        (status = 202, description = "The chain's jobs, in order.", body = crate::api::batches::ChainAnswer),
        (status = 400, description = "Malformed JSON.", body = crate::api::openapi::ErrorBody), (status = 409, description = "A job of the chain already exists.", body = crate::api::openapi::ErrorBody), (status = 413, description = "The body is over the size limit.", body = crate::api::openapi::ErrorBody), (status = 422, description = "A field has a wrong value; the message names it.", body = crate::api::openapi::ErrorBody),
    ),
    security(("bearer" = ["enqueue"]))
)]
pub async fn chain(
    State(state): State<AppState>,
    granted: Granted,
    JsonBody(body): JsonBody<ChainBody>,
) -> Result<(StatusCode, Json<ChainAnswer>), ApiError> {
    let jobs = state.client.enqueue_chain(body.jobs).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(ChainAnswer {
            jobs: jobs
                .into_iter()
                .map(|e| JobView::of(e.job, granted))
                .collect(),
        }),
    ))
}

/// `POST /v1/batches`'s body.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchBody {
    /// The children.
    pub jobs: Vec<NewJob>,
    /// The callback.
    pub on_complete: OnComplete,
    /// Enqueue the callback only if every child succeeded.
    #[serde(default)]
    pub on_success: bool,
    /// POST the batch's record here when its last child is final (a completion webhook).
    #[serde(default)]
    pub callback_url: Option<String>,
}

/// Records a batch: `202 {"id", "callback_id", "jobs": [ids]}`.
#[utoipa::path(
    post, path = "/v1/batches", tag = "batches", operation_id = "enqueue_batch",
    description = "Enqueues a batch of jobs with a callback job run once all have ended. Needs `enqueue`.",
    request_body = crate::api::batches::BatchBody,
    responses(
        (status = 202, description = "The batch's ids.", body = crate::client::BatchEnqueued),
        (status = 400, description = "Malformed JSON.", body = crate::api::openapi::ErrorBody), (status = 409, description = "A job of the batch already exists.", body = crate::api::openapi::ErrorBody), (status = 413, description = "The body is over the size limit.", body = crate::api::openapi::ErrorBody), (status = 422, description = "A field has a wrong value; the message names it.", body = crate::api::openapi::ErrorBody),
    ),
    security(("bearer" = ["enqueue"]))
)]
pub async fn create(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<BatchBody>,
) -> Result<(StatusCode, Json<BatchEnqueued>), ApiError> {
    let batch = state
        .client
        .enqueue_batch(
            body.jobs,
            body.on_complete,
            crate::client::BatchOptions {
                on_success: body.on_success,
                callback_url: body.callback_url,
            },
        )
        .await?;
    Ok((StatusCode::ACCEPTED, Json(batch)))
}

/// Shows a batch.
#[utoipa::path(
    get, path = "/v1/batches/{id}", tag = "batches", operation_id = "get_batch",
    description = "A batch's progress. Needs `read`.",
    params(("id" = String, Path, description = "The batch's id (a UUID).")),
    responses(
        (status = 200, description = "The batch.", body = crate::store::batches::Batch),
        (status = 400, description = "A malformed id.", body = crate::api::openapi::ErrorBody), (status = 404, description = "No such batch.", body = crate::api::openapi::ErrorBody),
    ),
    security(("bearer" = ["read"]))
)]
pub async fn get(
    State(state): State<AppState>,
    PathParams(id): PathParams<String>,
) -> Result<Json<Batch>, ApiError> {
    let id: uuid::Uuid = id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("malformed batch id {id:?}: expected a UUID")))?;
    match state.client.batch(id).await? {
        Some(b) => Ok(Json(b)),
        None => Err(ApiError::NotFound(format!("no batch {id}"))),
    }
}
