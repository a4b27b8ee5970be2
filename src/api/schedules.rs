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
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Serialize)]
pub struct ScheduleList {
    /// The deployment's schedules, by name.
    pub schedules: Vec<ScheduleRow>,
}

/// Sets a schedule from its body `{cron, timezone, kind, payload, queue, max_attempts,
/// priority, missed}`.
#[utoipa::path(
    put, path = "/v1/schedules/{name}", tag = "schedules", operation_id = "set_schedule",
    description = "Creates or replaces a schedule. Needs `admin`.",
    params(("name" = String, Path, description = "The schedule's name.")),
    request_body = crate::schedule::ScheduleSpec,
    responses(
        (status = 201, description = "Created.", body = crate::client::ScheduleSet),
        (status = 200, description = "Replaced.", body = crate::client::ScheduleSet),
        (status = 400, description = "Malformed JSON.", body = crate::api::openapi::ErrorBody), (status = 422, description = "A field has a wrong value; the message names it.", body = crate::api::openapi::ErrorBody),
    ),
    security(("bearer" = ["admin"]))
)]
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
#[utoipa::path(
    get, path = "/v1/schedules", tag = "schedules", operation_id = "list_schedules",
    description = "The deployment's schedules. Needs `read`.",
    responses((status = 200, description = "The schedules.", body = crate::api::schedules::ScheduleList)),
    security(("bearer" = ["read"]))
)]
pub async fn list(State(state): State<AppState>) -> Result<Json<ScheduleList>, ApiError> {
    Ok(Json(ScheduleList {
        schedules: state.client.schedules().await?,
    }))
}

/// One schedule, its next fire times and its recent jobs.
#[utoipa::path(
    get, path = "/v1/schedules/{name}", tag = "schedules", operation_id = "get_schedule",
    description = "One schedule with its next fire times and recent jobs. Needs `read`.",
    params(("name" = String, Path, description = "The schedule's name.")),
    responses((status = 200, description = "The schedule.", body = crate::client::ScheduleInfo), (status = 404, description = "No such schedule.", body = crate::api::openapi::ErrorBody), (status = 422, description = "Not a valid schedule name.", body = crate::api::openapi::ErrorBody)),
    security(("bearer" = ["read"]))
)]
pub async fn get(
    State(state): State<AppState>,
    PathParams(name): PathParams<String>,
) -> Result<Json<ScheduleInfo>, ApiError> {
    Ok(Json(state.client.schedule(&name).await?))
}

/// Deletes a schedule.
#[utoipa::path(
    delete, path = "/v1/schedules/{name}", tag = "schedules", operation_id = "delete_schedule",
    description = "Deletes a schedule. Needs `admin`.",
    params(("name" = String, Path, description = "The schedule's name.")),
    responses((status = 200, description = "Deleted.", body = crate::api::openapi::Deleted), (status = 404, description = "No such schedule.", body = crate::api::openapi::ErrorBody), (status = 422, description = "Not a valid schedule name.", body = crate::api::openapi::ErrorBody)),
    security(("bearer" = ["admin"]))
)]
pub async fn delete(
    State(state): State<AppState>,
    PathParams(name): PathParams<String>,
) -> Result<Json<Value>, ApiError> {
    state.client.delete_schedule(&name).await?;
    Ok(Json(serde_json::json!({ "deleted": name })))
}

/// Pauses a schedule.
#[utoipa::path(
    post, path = "/v1/schedules/{name}/pause", tag = "schedules", operation_id = "pause_schedule",
    description = "Pauses a schedule; its cursor is kept. Needs `admin`.",
    params(("name" = String, Path, description = "The schedule's name.")),
    responses((status = 200, description = "The schedule, paused.", body = crate::store::schedules::ScheduleRow), (status = 404, description = "No such schedule.", body = crate::api::openapi::ErrorBody), (status = 422, description = "Not a valid schedule name.", body = crate::api::openapi::ErrorBody)),
    security(("bearer" = ["admin"]))
)]
pub async fn pause(
    State(state): State<AppState>,
    PathParams(name): PathParams<String>,
) -> Result<Json<ScheduleRow>, ApiError> {
    Ok(Json(state.client.pause_schedule(&name).await?))
}

/// Resumes a schedule.
#[utoipa::path(
    post, path = "/v1/schedules/{name}/resume", tag = "schedules", operation_id = "resume_schedule",
    description = "Resumes a schedule; missed slots follow its `missed` policy. Needs `admin`.",
    params(("name" = String, Path, description = "The schedule's name.")),
    responses((status = 200, description = "The schedule, running.", body = crate::store::schedules::ScheduleRow), (status = 404, description = "No such schedule.", body = crate::api::openapi::ErrorBody), (status = 422, description = "Not a valid schedule name.", body = crate::api::openapi::ErrorBody)),
    security(("bearer" = ["admin"]))
)]
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
