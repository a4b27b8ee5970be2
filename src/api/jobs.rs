//! ⑦ Reading jobs: `GET /v1/jobs/{id}` (with `?wait=SECONDS` to long-poll until it finishes)
//! and `GET /v1/jobs` (newest first, filtered, with a cursor).

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use serde::{Deserialize, Serialize};

use super::{ApiError, AppState};
use crate::job::{Job, JobId, JobStatus};
use crate::store::list_jobs::JobFilter;

/// The longest long poll.
pub const MAX_WAIT_SECONDS: f64 = 300.0;
/// The largest page.
pub const MAX_LIMIT: i64 = 1000;

/// `?wait=SECONDS`.
#[derive(Debug, Deserialize)]
pub struct GetParams {
    /// Wait up to this long for the job to finish.
    pub wait: Option<String>,
}

/// Returns one job; with `wait`, answers as soon as it finishes or the wait is over.
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(params): Query<GetParams>,
) -> Result<Json<Job>, ApiError> {
    let id = parse_id(&id)?;
    let wait = match params.wait.as_deref() {
        None => None,
        Some(w) => Some(parse_wait(w)?),
    };
    let store = state.client.store();
    let Some(wait) = wait else {
        return found(store.get_job(id).await?, id);
    };
    let reg = state.waiters.register(id);
    let notified = reg.notify.notified();
    let everyone = state.waiters.all().notified();
    tokio::pin!(notified, everyone);
    // Enabled before the read: a finish between the read and the wait still wakes us.
    notified.as_mut().enable();
    everyone.as_mut().enable();
    let job = found(store.get_job(id).await?, id)?;
    if job.status().is_final() {
        return Ok(job);
    }
    let deadline = tokio::time::Instant::now() + wait;
    let mut job = job;
    loop {
        tokio::select! {
            () = &mut notified => {}
            () = &mut everyone => {}
            () = tokio::time::sleep_until(deadline) => return Ok(job),
            () = state.shutdown.drain.cancelled() => return found(store.get_job(id).await?, id),
        }
        job = found(store.get_job(id).await?, id)?;
        if job.status().is_final() {
            return Ok(job);
        }
        // Woken for everyone (a listener reconnect): wait again for the rest of the time.
        notified.set(reg.notify.notified());
        everyone.set(state.waiters.all().notified());
        notified.as_mut().enable();
        everyone.as_mut().enable();
    }
}

fn found(job: Option<Job>, id: JobId) -> Result<Json<Job>, ApiError> {
    job.map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no job with id {id}")))
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
#[derive(Debug, Deserialize)]
pub struct ListParams {
    /// Only this status.
    pub status: Option<String>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Only this dedup key.
    pub dedup_key: Option<String>,
    /// Page size, default 50.
    pub limit: Option<String>,
    /// The cursor: the `next` of the previous page.
    pub before: Option<String>,
}

/// A page of jobs.
#[derive(Debug, Serialize, Deserialize)]
pub struct JobPage {
    /// The jobs, newest first.
    pub jobs: Vec<Job>,
    /// Pass as `before` for the next page; absent on the last page.
    pub next: Option<JobId>,
}

/// Lists jobs newest first.
pub async fn list(
    State(state): State<AppState>,
    Query(p): Query<ListParams>,
) -> Result<Json<JobPage>, ApiError> {
    let status = match p.status.as_deref() {
        None => None,
        Some(s) => Some(
            s.parse::<JobStatus>()
                .map_err(|e| ApiError::BadRequest(format!("status: {e}")))?,
        ),
    };
    let limit = match p.limit.as_deref() {
        None => 50,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "limit: must be an integer from 1 to {MAX_LIMIT}, got {l:?}"
                ))
            })?,
    };
    let before = match p.before.as_deref() {
        None => None,
        Some(b) => Some(
            b.parse()
                .map_err(|_| ApiError::BadRequest(format!("before: malformed cursor {b:?}")))?,
        ),
    };
    let filter = JobFilter {
        status,
        kind: p.kind,
        dedup_key: p.dedup_key,
        before,
        limit,
    };
    let jobs = state.client.store().list_jobs(&filter).await?;
    let next = if jobs.len() as i64 == limit {
        jobs.last().map(|j| j.id)
    } else {
        None
    };
    Ok(Json(JobPage { jobs, next }))
}

/// `POST /v1/jobs/{id}/cancel`: a job that has not started never runs; a running one is
/// told and ends `cancelled` when its handler returns; a finished one is a 409.
pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<(axum::http::StatusCode, Json<Job>), ApiError> {
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
        CancelOutcome::Cancelled => axum::http::StatusCode::OK,
        CancelOutcome::Requested => axum::http::StatusCode::ACCEPTED,
    };
    let Json(job) = found(store.get_job(id).await?, id)?;
    Ok((code, Json(job)))
}

/// `POST /v1/jobs/{id}/retry`: replays a `dead` or `failed` job with a fresh attempt budget;
/// 409 for any other status.
pub async fn retry(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<(axum::http::StatusCode, Json<Job>), ApiError> {
    use crate::store::dead_job::ReplaySelector;
    let id = parse_id(&id)?;
    let store = state.client.store();
    let Json(before) = found(store.get_job(id).await?, id)?;
    if !matches!(before.status(), JobStatus::Dead | JobStatus::Failed) {
        return Err(ApiError::Conflict(format!(
            "job {id} is {}; only dead or failed jobs can be retried",
            before.status()
        )));
    }
    let replayed = state.client.replay(&ReplaySelector::Id(id)).await?;
    if replayed.is_empty() {
        let Json(now) = found(store.get_job(id).await?, id)?;
        let why = if now.raw_body.is_some() {
            "it is a poison message, not a job"
        } else {
            "its status changed"
        };
        return Err(ApiError::Conflict(format!(
            "job {id} cannot be retried: {why}"
        )));
    }
    let Json(job) = found(store.get_job(id).await?, id)?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(job)))
}
