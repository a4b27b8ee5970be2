//! `POST /v1/dead/replay`: replays every dead or failed job of a kind, or all of them, in one
//! statement (the per-job `POST /v1/jobs/{id}/retry` replays one). What the dashboard's
//! "replay all" does, and what an operator runs after fixing the handler that killed them.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::extract::JsonBody;
use super::{ApiError, AppState};
use crate::job::{JobId, validate_kind};
use crate::store::dead_job::ReplaySelector;

/// `POST /v1/dead/replay`'s body: exactly one of `kind` and `all`.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayBody {
    /// Replay the dead and failed jobs of this kind.
    pub kind: Option<String>,
    /// `true`: replay every dead and failed job of every kind.
    #[serde(default)]
    pub all: bool,
}

/// `POST /v1/dead/replay`'s answer.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Serialize)]
pub struct Replayed {
    /// How many jobs are queued again.
    pub replayed: usize,
    /// Their ids.
    #[cfg_attr(feature = "api", schema(value_type = Vec<String>))]
    pub ids: Vec<JobId>,
}

/// Replays dead and failed jobs by kind, or all of them.
#[utoipa::path(
    post, path = "/v1/dead/replay", tag = "jobs", operation_id = "replay_dead",
    description = "Replays every dead or failed job of `kind`, or every one with `all: true`, each with a fresh attempt budget. Poison messages (no valid job) are not replayed. Needs `admin`.",
    request_body = crate::api::dead::ReplayBody,
    responses(
        (status = 202, description = "Queued again (possibly none).", body = crate::api::dead::Replayed),
        (status = 400, description = "Neither or both of `kind` and `all`, or a malformed body.", body = crate::api::openapi::ErrorBody),
        (status = 422, description = "A body of the wrong shape.", body = crate::api::openapi::ErrorBody),
    ),
    security(("bearer" = ["admin"]))
)]
pub async fn replay(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<ReplayBody>,
) -> Result<(StatusCode, Json<Replayed>), ApiError> {
    let selector = match (body.kind, body.all) {
        (Some(kind), false) => {
            if kind.contains('\0') {
                return Err(ApiError::BadRequest(
                    "kind: must not contain a NUL character".into(),
                ));
            }
            validate_kind(&kind).map_err(|e| ApiError::BadRequest(e.to_string()))?;
            ReplaySelector::Kind(kind)
        }
        (None, true) => ReplaySelector::All,
        (Some(_), true) => {
            return Err(ApiError::BadRequest(
                "give either kind or all: true, not both".into(),
            ));
        }
        (None, false) => {
            return Err(ApiError::BadRequest(
                "give kind (replay that kind's dead jobs) or all: true (every dead job)".into(),
            ));
        }
    };
    let ids = state.client.replay(&selector).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Replayed {
            replayed: ids.len(),
            ids,
        }),
    ))
}
