//! `GET /v1/queues` (each queue of the deployment: paused or not, its depths, what runs and
//! waits, how fast it finishes) and `POST /v1/queues/{name}/pause` and `/resume`, which
//! answer with the queue's entry once the change is recorded. Every worker acts on a pause
//! within about a second; it outlives worker restarts.

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use super::extract::PathParams;
use super::{ApiError, AppState};
use crate::client::{QueueError, QueueInfo};

/// `GET /v1/queues`' answer.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Serialize)]
pub struct QueueList {
    /// Every queue the deployment knows, `default` first.
    pub queues: Vec<QueueInfo>,
}

/// Lists the deployment's queues.
#[utoipa::path(
    get, path = "/v1/queues", tag = "queues", operation_id = "list_queues",
    description = "The deployment's queues with their depths and rates. Needs `read`.",
    responses((status = 200, description = "The queues.", body = crate::api::queues::QueueList)),
    security(("bearer" = ["read"]))
)]
pub async fn list(State(state): State<AppState>) -> Result<Json<QueueList>, ApiError> {
    Ok(Json(QueueList {
        queues: state.client.queues().await?,
    }))
}

/// Pauses a queue: nothing more of it starts; running jobs finish.
#[utoipa::path(
    post, path = "/v1/queues/{name}/pause", tag = "queues", operation_id = "pause_queue",
    description = "Pauses a queue: workers start none of its jobs until it is resumed. Needs `admin`.",
    params(("name" = String, Path, description = "The queue's name.")),
    responses((status = 200, description = "The queue, paused.", body = crate::client::QueueInfo), (status = 422, description = "Not a valid queue name.", body = crate::api::openapi::ErrorBody)),
    security(("bearer" = ["admin"]))
)]
pub async fn pause(
    State(state): State<AppState>,
    PathParams(name): PathParams<String>,
) -> Result<Json<QueueInfo>, ApiError> {
    Ok(Json(state.client.pause(&name).await?))
}

/// Resumes a queue.
#[utoipa::path(
    post, path = "/v1/queues/{name}/resume", tag = "queues", operation_id = "resume_queue",
    description = "Resumes a paused queue. Needs `admin`.",
    params(("name" = String, Path, description = "The queue's name.")),
    responses((status = 200, description = "The queue, running.", body = crate::client::QueueInfo), (status = 422, description = "Not a valid queue name.", body = crate::api::openapi::ErrorBody)),
    security(("bearer" = ["admin"]))
)]
pub async fn resume(
    State(state): State<AppState>,
    PathParams(name): PathParams<String>,
) -> Result<Json<QueueInfo>, ApiError> {
    Ok(Json(state.client.resume(&name).await?))
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::Invalid(invalid) => ApiError::Unprocessable(invalid.to_string()),
            QueueError::Store(s) => s.into(),
            QueueError::Broker(b) => crate::client::StatsError::Broker(b).into(),
        }
    }
}
