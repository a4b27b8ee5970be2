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
#[derive(Debug, Serialize)]
pub struct QueueList {
    /// Every queue the deployment knows, `default` first.
    pub queues: Vec<QueueInfo>,
}

/// Lists the deployment's queues.
pub async fn list(State(state): State<AppState>) -> Result<Json<QueueList>, ApiError> {
    Ok(Json(QueueList {
        queues: state.client.queues().await?,
    }))
}

/// Pauses a queue: nothing more of it starts; running jobs finish.
pub async fn pause(
    State(state): State<AppState>,
    PathParams(name): PathParams<String>,
) -> Result<Json<QueueInfo>, ApiError> {
    Ok(Json(state.client.pause(&name).await?))
}

/// Resumes a queue.
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
