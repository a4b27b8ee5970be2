//! ⑦ Reading jobs: `GET /v1/jobs/{id}` (with `?wait=SECONDS` to long-poll until it finishes)
//! and `GET /v1/jobs` (newest first, filtered, with a cursor, in pages bounded by rows, bytes
//! and rows examined); and changing them: cancel and retry. Every answer that carries a job
//! goes through [`JobView`], so a token without `read` never sees what a job carries.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::auth::Granted;
use super::extract::{PathParams, QueryParams};
use super::view::JobView;
use super::{ApiError, AppState};
use crate::job::{Job, JobId, JobStatus, validate_dedup_key, validate_kind, validate_queue};
use crate::store::list_jobs::JobFilter;

/// The longest long poll.
pub const MAX_WAIT_SECONDS: f64 = 300.0;
/// The largest page.
pub const MAX_LIMIT: i64 = 1000;

/// `?wait=SECONDS`.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GetParams {
    /// Wait up to this long for the job to finish.
    pub wait: Option<String>,
}

/// Returns one job; with `wait`, answers as soon as it finishes or the wait is over.
#[utoipa::path(
    get, path = "/v1/jobs/{id}", tag = "jobs", operation_id = "get_job",
    description = "One job. With `wait`, a long poll: answers when the job is final or the wait is over. Needs `read`.",
    params(("id" = String, Path, description = "The job's id (a UUID)."), crate::api::jobs::GetParams),
    responses(
        (status = 200, description = "The job.", body = crate::api::view::JobView),
        (status = 400, description = "A malformed id or wait.", body = crate::api::openapi::ErrorBody), (status = 404, description = "No such job.", body = crate::api::openapi::ErrorBody),
    ),
    security(("bearer" = ["read"]))
)]
pub async fn get(
    State(state): State<AppState>,
    granted: Granted,
    PathParams(id): PathParams<String>,
    QueryParams(params): QueryParams<GetParams>,
) -> Result<Json<JobView>, ApiError> {
    let id = parse_id(&id)?;
    let wait = match params.wait.as_deref() {
        None => None,
        Some(w) => Some(parse_wait(w)?),
    };
    let store = state.client.store();
    let Some(wait) = wait else {
        return answer(store.get_job(id).await?, id, granted);
    };
    let Some(reg) = state.waiters.register(id) else {
        return Err(ApiError::Unavailable(
            "too many waiting requests; retry without wait or later".into(),
        ));
    };
    let notified = reg.notify.notified();
    let everyone = state.waiters.all().notified();
    tokio::pin!(notified, everyone);
    // Enabled before the read: a finish between the read and the wait still wakes us.
    notified.as_mut().enable();
    everyone.as_mut().enable();
    let mut job = found(store.get_job(id).await?, id)?;
    if job.status().is_final() {
        return Ok(Json(JobView::of(job, granted)));
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        tokio::select! {
            () = &mut notified => {}
            () = &mut everyone => {}
            () = tokio::time::sleep_until(deadline) => return Ok(Json(JobView::of(job, granted))),
            () = state.shutdown.drain.cancelled() => return answer(store.get_job(id).await?, id, granted),
        }
        job = found(store.get_job(id).await?, id)?;
        if job.status().is_final() {
            return Ok(Json(JobView::of(job, granted)));
        }
        // Woken for everyone (a listener reconnect): wait again for the rest of the time.
        notified.set(reg.notify.notified());
        everyone.set(state.waiters.all().notified());
        notified.as_mut().enable();
        everyone.as_mut().enable();
    }
}

fn found(job: Option<Job>, id: JobId) -> Result<Job, ApiError> {
    job.ok_or_else(|| ApiError::NotFound(format!("no job with id {id}")))
}

fn answer(job: Option<Job>, id: JobId, granted: Granted) -> Result<Json<JobView>, ApiError> {
    found(job, id).map(|j| Json(JobView::of(j, granted)))
}

/// Parses a job id from a path.
pub(crate) fn parse_id(s: &str) -> Result<JobId, ApiError> {
    s.parse()
        .map_err(|_| ApiError::BadRequest(format!("malformed job id {s:?}: expected a UUID")))
}

fn parse_wait(s: &str) -> Result<Duration, ApiError> {
    let secs: f64 = s.parse().map_err(|_| {
        ApiError::BadRequest(format!("wait: expected a number of seconds, got {s:?}"))
    })?;
    if !(0.0..=MAX_WAIT_SECONDS).contains(&secs) || !secs.is_finite() {
        return Err(ApiError::BadRequest(format!(
            "wait: must be between 0 and {MAX_WAIT_SECONDS} seconds, got {s}"
        )));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `GET /v1/jobs` filters.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only this status.
    pub status: Option<String>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Only this dedup key.
    pub dedup_key: Option<String>,
    /// Only this queue.
    pub queue: Option<String>,
    /// Only jobs created at or after this instant (RFC 3339, e.g. `2026-12-03T08:00:00Z`).
    pub created_after: Option<String>,
    /// Only jobs created before this instant (RFC 3339).
    pub created_before: Option<String>,
    /// Page size, default 50.
    pub limit: Option<String>,
    /// The cursor: the `next` of the previous page.
    pub before: Option<String>,
}

/// A page of jobs.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Serialize)]
pub struct JobPage {
    /// The jobs, newest first. Fewer than `limit` (even none) does not mean the last page:
    /// a page also ends at its byte bound and, with a `status` filter, at its scan budget.
    pub jobs: Vec<JobView>,
    /// Pass as `before` for the next page; `null` once nothing older can match.
    #[cfg_attr(feature = "api", schema(value_type = Option<String>, format = Uuid))]
    pub next: Option<JobId>,
}

/// A filter value Postgres could not even compare: text cannot hold NUL. Checked here, not
/// left to the validators of what may be enqueued, because a filter only has to be storable.
fn no_nul(field: &str, value: &str) -> Result<(), ApiError> {
    if value.contains('\0') {
        return Err(ApiError::BadRequest(format!(
            "{field}: must not contain a NUL character"
        )));
    }
    Ok(())
}

/// `GET /v1/jobs/{id}/children`' answer.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Serialize)]
pub struct Children {
    /// The jobs that named this one in `depends_on`, oldest first (at most 1,000).
    pub children: Vec<crate::store::dependencies::Child>,
}

/// The jobs that depend on one job.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/children", tag = "jobs", operation_id = "job_children",
    description = "The jobs that named this one in `depends_on`, with their status, oldest first. Needs `read`.",
    params(("id" = String, Path, description = "The job's id (a UUID).")),
    responses(
        (status = 200, description = "Its dependents (possibly none).", body = crate::api::jobs::Children),
        (status = 400, description = "A malformed id.", body = crate::api::openapi::ErrorBody), (status = 404, description = "No such job.", body = crate::api::openapi::ErrorBody),
    ),
    security(("bearer" = ["read"]))
)]
pub async fn children(
    State(state): State<AppState>,
    PathParams(id): PathParams<String>,
) -> Result<Json<Children>, ApiError> {
    let id = parse_id(&id)?;
    let store = state.client.store();
    found(store.get_job(id).await?, id)?;
    Ok(Json(Children {
        children: store.children(id).await?,
    }))
}

/// A time filter's value: RFC 3339 with an offset.
fn instant(
    field: &str,
    value: Option<&str>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, ApiError> {
    value
        .map(|v| {
            chrono::DateTime::parse_from_rfc3339(v)
                .map(|t| t.with_timezone(&chrono::Utc))
                .map_err(|e| {
                    ApiError::BadRequest(format!(
                        "{field}: {v:?} is not an RFC 3339 instant such as 2026-12-03T08:00:00Z ({e})"
                    ))
                })
        })
        .transpose()
}

/// Lists jobs newest first.
#[utoipa::path(
    get, path = "/v1/jobs", tag = "jobs", operation_id = "list_jobs",
    description = "Lists jobs newest first, with keyset pagination (`before`). Needs `read`.",
    params(crate::api::jobs::ListParams),
    responses(
        (status = 200, description = "A page of jobs.", body = crate::api::jobs::JobPage),
        (status = 400, description = "A malformed filter or cursor.", body = crate::api::openapi::ErrorBody), (status = 422, description = "A filter with a wrong value.", body = crate::api::openapi::ErrorBody),
    ),
    security(("bearer" = ["read"]))
)]
pub async fn list(
    State(state): State<AppState>,
    granted: Granted,
    QueryParams(p): QueryParams<ListParams>,
) -> Result<Json<JobPage>, ApiError> {
    let status = match p.status.as_deref() {
        None => None,
        Some(s) => Some(
            s.parse::<JobStatus>()
                .map_err(|e| ApiError::BadRequest(format!("status: {e}")))?,
        ),
    };
    // A kind or key no job can have is the caller's mistake, not an empty page.
    if let Some(kind) = &p.kind {
        no_nul("kind", kind)?;
        validate_kind(kind).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    }
    if let Some(key) = &p.dedup_key {
        no_nul("dedup_key", key)?;
        validate_dedup_key(key).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    }
    if let Some(queue) = &p.queue {
        no_nul("queue", queue)?;
        validate_queue(queue).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    }
    let limit = super::extract::int_param("limit", p.limit.as_deref(), 50, 1..=MAX_LIMIT)?;
    let before = match p.before.as_deref() {
        None => None,
        Some(b) => Some(b.parse().map_err(|_| {
            ApiError::BadRequest(format!("before: malformed cursor {b:?}: expected a job id"))
        })?),
    };
    let created_after = instant("created_after", p.created_after.as_deref())?;
    let created_before = instant("created_before", p.created_before.as_deref())?;
    let filter = JobFilter {
        status,
        kind: p.kind,
        dedup_key: p.dedup_key,
        queue: p.queue,
        created_after,
        created_before,
        before,
        limit,
        max_bytes: state.options.max_page_bytes,
        scan_budget: state.options.scan_budget,
    };
    let page = state.client.store().list_jobs(&filter).await?;
    Ok(Json(JobPage {
        jobs: page
            .jobs
            .into_iter()
            .map(|j| JobView::of(j, granted))
            .collect(),
        next: page.next,
    }))
}

/// `POST /v1/jobs/{id}/cancel`: a job that has not started never runs; a running one is
/// told and ends `cancelled` when its handler returns; a finished one is a 409.
#[utoipa::path(
    post, path = "/v1/jobs/{id}/cancel", tag = "jobs", operation_id = "cancel_job",
    description = "Cancels a job. Needs `admin`.",
    params(("id" = String, Path, description = "The job's id (a UUID).")),
    responses(
        (status = 200, description = "Cancelled.", body = crate::api::view::JobView),
        (status = 202, description = "Running: cancellation requested from its handler.", body = crate::api::view::JobView),
        (status = 400, description = "A malformed id.", body = crate::api::openapi::ErrorBody), (status = 404, description = "No such job.", body = crate::api::openapi::ErrorBody), (status = 409, description = "The job is already final.", body = crate::api::openapi::ErrorBody),
    ),
    security(("bearer" = ["admin"]))
)]
pub async fn cancel(
    State(state): State<AppState>,
    granted: Granted,
    PathParams(id): PathParams<String>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    use crate::store::cancel_job::CancelOutcome;
    let id = parse_id(&id)?;
    let store = state.client.store();
    let code = match store.cancel_job(id).await? {
        CancelOutcome::NotFound => return Err(ApiError::NotFound(format!("no job with id {id}"))),
        CancelOutcome::AlreadyFinal(s) => {
            return Err(ApiError::Conflict(format!(
                "job {id} has already finished ({s}); nothing to cancel"
            )));
        }
        CancelOutcome::Cancelled => StatusCode::OK,
        CancelOutcome::Requested => StatusCode::ACCEPTED,
    };
    let job = found(store.get_job(id).await?, id)?;
    Ok((code, Json(JobView::of(job, granted))))
}

/// `POST /v1/jobs/{id}/retry`: replays a `dead` or `failed` job with a fresh attempt budget;
/// 409 for any other status.
#[utoipa::path(
    post, path = "/v1/jobs/{id}/retry", tag = "jobs", operation_id = "retry_job",
    description = "Replays a dead, failed or cancelled job with a fresh attempt budget. Needs `admin`.",
    params(("id" = String, Path, description = "The job's id (a UUID).")),
    responses(
        (status = 202, description = "Queued again.", body = crate::api::view::JobView),
        (status = 400, description = "A malformed id.", body = crate::api::openapi::ErrorBody), (status = 404, description = "No such job.", body = crate::api::openapi::ErrorBody), (status = 409, description = "The job is not in a state that can be replayed.", body = crate::api::openapi::ErrorBody),
    ),
    security(("bearer" = ["admin"]))
)]
pub async fn retry(
    State(state): State<AppState>,
    granted: Granted,
    PathParams(id): PathParams<String>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    use crate::store::dead_job::ReplaySelector;
    let id = parse_id(&id)?;
    let store = state.client.store();
    let before = found(store.get_job(id).await?, id)?;
    if !matches!(before.status(), JobStatus::Dead | JobStatus::Failed) {
        return Err(ApiError::Conflict(format!(
            "job {id} is {}; only dead or failed jobs can be retried",
            before.status()
        )));
    }
    let replayed = state.client.replay(&ReplaySelector::Id(id)).await?;
    if replayed.is_empty() {
        let now = found(store.get_job(id).await?, id)?;
        let why = if now.raw_body.is_some() {
            "it is a poison message, not a job"
        } else {
            "its status changed"
        };
        return Err(ApiError::Conflict(format!(
            "job {id} cannot be retried: {why}"
        )));
    }
    let job = found(store.get_job(id).await?, id)?;
    Ok((StatusCode::ACCEPTED, Json(JobView::of(job, granted))))
}
