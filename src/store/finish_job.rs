//! ⑥ Finishing attempts: a batch of outcomes written in one statement, fenced by the claim.
//! Only the worker that holds the claim on that attempt can finish it, so a worker whose lease
//! expired (and whose job another worker took over) writes nothing. Finished ids are announced
//! on [`DONE_CHANNEL`](super::DONE_CHANNEL) in the same transaction, for long polls.

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use sqlx::PgExecutor;
use uuid::Uuid;

use super::{Context, DONE_CHANNEL, Store, StoreError};
use crate::job::{JobId, JobStatus};

/// How one attempt ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The handler returned this result.
    Succeeded(Box<RawValue>),
    /// The attempt failed; the next one is due at this instant.
    Retry {
        /// Why it failed.
        error: String,
        /// When to try again.
        at: DateTime<Utc>,
    },
    /// The job failed for good (a permanent error, or no attempts left).
    Dead(String),
    /// The job was cancelled while it ran.
    Cancelled,
    /// The worker stopped before the attempt finished: the job goes back to `queued` without
    /// being charged the attempt.
    Released,
}

impl Outcome {
    /// The status the job ends this attempt in.
    pub fn status(&self) -> JobStatus {
        match self {
            Outcome::Succeeded(_) => JobStatus::Succeeded,
            Outcome::Retry { .. } => JobStatus::Retrying,
            Outcome::Dead(_) => JobStatus::Dead,
            Outcome::Cancelled => JobStatus::Cancelled,
            Outcome::Released => JobStatus::Queued,
        }
    }
}

/// One attempt to finish: which job, which attempt, how it ended.
#[derive(Debug, Clone)]
pub struct Finish {
    /// The job.
    pub id: JobId,
    /// The attempt the claim was for.
    pub attempt: i32,
    /// How it ended.
    pub outcome: Outcome,
}

impl Store {
    /// Writes a batch of outcomes for `worker` in one statement. Returns the ids whose claim
    /// still held (the others were taken over after a lease expired and wrote nothing).
    pub async fn finish_jobs(
        &self,
        worker: Uuid,
        batch: &[Finish],
    ) -> Result<Vec<JobId>, StoreError> {
        finish_jobs(self.pool(), worker, batch).await
    }
}

/// [`Store::finish_jobs`] on any executor: a handler's own transaction passes its connection,
/// so the job's completion commits together with the handler's writes.
pub async fn finish_jobs<'c>(
    db: impl PgExecutor<'c>,
    worker: Uuid,
    batch: &[Finish],
) -> Result<Vec<JobId>, StoreError> {
    let mut ids = Vec::with_capacity(batch.len());
    let mut attempts = Vec::with_capacity(batch.len());
    let mut statuses = Vec::with_capacity(batch.len());
    let mut results: Vec<Option<&str>> = Vec::with_capacity(batch.len());
    let mut errors: Vec<Option<&str>> = Vec::with_capacity(batch.len());
    let mut next: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(batch.len());
    for f in batch {
        ids.push(f.id);
        attempts.push(f.attempt);
        statuses.push(f.outcome.status().as_str());
        let (result, error, at) = match &f.outcome {
            Outcome::Succeeded(r) => (Some(r.get()), None, None),
            Outcome::Retry { error, at } => (None, Some(error.as_str()), Some(*at)),
            Outcome::Dead(error) => (None, Some(error.as_str()), None),
            Outcome::Cancelled | Outcome::Released => (None, None, None),
        };
        results.push(result);
        errors.push(error);
        next.push(at);
    }
    // The WHERE is the fence: this worker, this attempt, still running. A released job gives
    // its attempt back, so a drain costs the job nothing. One NOTIFY per batch keeps long
    // polls cheap at any rate (ids are 37 bytes; the batch limit keeps the payload under 8 kB).
    let done: Vec<(Uuid,)> = sqlx::query_as(
        "WITH input AS (
             SELECT * FROM unnest($1::uuid[], $2::int4[], $3::text[], $4::text[], $5::text[], $6::timestamptz[])
                 AS t(id, attempt, status, result, error, next_at)
         ), done AS (
             UPDATE apiary_jobs j
                SET status = i.status,
                    result = i.result::json,
                    error = CASE WHEN i.status = 'queued' THEN j.error ELSE i.error END,
                    errors = CASE WHEN i.error IS NULL THEN j.errors
                                  ELSE j.errors || jsonb_build_array(jsonb_build_object(
                                      'attempt', j.attempts, 'error', i.error, 'at', now(),
                                      'retry_at', i.next_at)) END,
                    attempts = CASE WHEN i.status = 'queued' THEN j.attempts - 1 ELSE j.attempts END,
                    next_attempt_at = i.next_at,
                    finished_at = CASE WHEN i.status IN ('succeeded', 'dead', 'cancelled') THEN now() END,
                    lease_until = NULL,
                    worker_id = NULL,
                    detached = false
               FROM input i
              WHERE j.id = i.id AND j.attempts = i.attempt AND j.status = 'running' AND j.worker_id = $7
             RETURNING j.id, j.status
         ), notified AS (
             SELECT pg_notify($8, string_agg(id::text, ',')) FROM done
              WHERE status IN ('succeeded', 'dead', 'cancelled')
             HAVING count(*) > 0
         )
         SELECT id FROM done LEFT JOIN notified ON true",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(&statuses)
    .bind(&results)
    .bind(&errors)
    .bind(&next)
    .bind(worker)
    .bind(DONE_CHANNEL)
    .fetch_all(db)
    .await
    .context("finishing jobs")?;
    Ok(done.into_iter().map(|(id,)| id).collect())
}

impl Store {
    /// Renews the leases of the jobs this worker is running. Returns those of them that
    /// someone asked to cancel, so their handlers can be told. Rows locked by a finishing
    /// batch are skipped (they are finishing anyway): the heartbeat never waits on, or
    /// deadlocks with, the completer.
    pub async fn renew_leases(
        &self,
        worker: Uuid,
        ids: &[JobId],
        lease: std::time::Duration,
    ) -> Result<Vec<JobId>, StoreError> {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        sqlx::query_scalar(
            "WITH renewed AS (
                 UPDATE apiary_jobs SET lease_until = now() + $3 * interval '1 millisecond'
                  WHERE id IN (SELECT id FROM apiary_jobs
                                WHERE id = ANY($1) AND worker_id = $2 AND status = 'running'
                                FOR UPDATE SKIP LOCKED)
                 RETURNING id, cancel_requested
             )
             SELECT id FROM renewed WHERE cancel_requested",
        )
        .bind(ids)
        .bind(worker)
        .bind(lease_ms)
        .fetch_all(self.pool())
        .await
        .context("renewing leases")
    }
}
