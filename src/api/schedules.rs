//! `/v1/schedules`: the deployment's periodic jobs. `PUT /v1/schedules/{name}` sets one
//! (201 when new, 200 when replaced), `GET /v1/schedules` lists them, `GET
//! /v1/schedules/{name}` shows one with its next five fire times and the jobs of its recent
//! slots, `DELETE` removes one (its jobs stay), `POST .../pause` and `.../resume` stop and
//! restart its firing. Changing needs the `admin` scope, reading `read`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use serde_json::Value;

use super::extract::{JsonBody, PathParams};
use super::{ApiError, AppState};
use crate::client::{ScheduleError, ScheduleInfo, ScheduleSet};
use crate::schedule::ScheduleSpec;
use crate::store::schedules::ScheduleRow;

/// `GET /v1/schedules`' answer.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Serialize)]
pub struct ScheduleList {
    /// The deployment's schedules, by name.
    pub schedules: Vec<ScheduleRow>,
}

/// Sets a schedule from its body `{cron, timezone, kind, payload, queue, max_attempts,
/// priority, missed}`.
pub async fn set(
    State(state): State<AppState>,
    PathParams(name): PathParams<String>,
    JsonBody(body): JsonBody<Value>,
) -> Result<(StatusCode, Json<ScheduleSet>), ApiError> {
    // Decoded here rather than by the extractor, so an error names the schedule's field.
    let spec: ScheduleSpec = serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        ApiError::Unprocessable(format!(
            "invalid schedule: {}: {}",
            if path == "." { "body" } else { &path },
            e.into_inner()
        ))
    })?;
    let set = state.client.set_schedule(&name, &spec).await?;
    let status = if set.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(set)))
}

/// Lists the deployment's schedules.
pub async fn list(State(state): State<AppState>) -> Result<Json<ScheduleList>, ApiError> {
    Ok(Json(ScheduleList {
        schedules: state.client.schedules().await?,
    }))
}

/// One schedule, its next fire times and its recent jobs.
pub async fn get(
    State(state): State<AppState>,
    PathParams(name): PathParams<String>,
) -> Result<Json<ScheduleInfo>, ApiError> {
    Ok(Json(state.client.schedule(&name).await?))
}

/// Deletes a schedule.
pub async fn delete(
    State(state): State<AppState>,
    PathParams(name): PathParams<String>,
) -> Result<Json<Value>, ApiError> {
    state.client.delete_schedule(&name).await?;
    Ok(Json(serde_json::json!({ "deleted": name })))
}

/// Pauses a schedule.
pub async fn pause(
    State(state): State<AppState>,
    PathParams(name): PathParams<String>,
) -> Result<Json<ScheduleRow>, ApiError> {
    Ok(Json(state.client.pause_schedule(&name).await?))
}

/// Resumes a schedule.
pub async fn resume(
    State(state): State<AppState>,
    PathParams(name): PathParams<String>,
) -> Result<Json<ScheduleRow>, ApiError> {
    Ok(Json(state.client.resume_schedule(&name).await?))
}

impl From<ScheduleError> for ApiError {
    fn from(e: ScheduleError) -> Self {
        match e {
            ScheduleError::Invalid(_) => ApiError::Unprocessable(e.to_string()),
            ScheduleError::NotFound(_) => ApiError::NotFound(e.to_string()),
            ScheduleError::Store(s) => s.into(),
        }
    }
}
