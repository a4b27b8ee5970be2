//! ⑥ Finishing attempts: a batch of outcomes written in one statement, fenced by the claim.
//! Only the worker that holds the claim on that attempt can finish it, so a worker whose lease
//! expired (and whose job another worker took over) writes nothing. Finished ids are announced
//! on [`DONE_CHANNEL`] in the same transaction, for long polls.
//!
//! Two rules hold here, in the statement itself:
//! - **A cancellation wins.** A job whose cancellation was requested while it ran ends
//!   `cancelled` whatever its handler returned; a success that would commit the handler's
//!   own writes is refused instead, so those writes roll back.
//! - **Every outcome that needs a message has one.** A retry, and a long job handed back after
//!   its message was acked, get an outbox row in the same statement (a dead job gets its
//!   letter's row from the trigger), so the message that carries the job on is published even
//!   if this worker dies the moment after the commit.

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use sqlx::PgExecutor;
use uuid::Uuid;

use super::{Context, DONE_CHANNEL, Store, StoreError};
use crate::job::{JobId, JobStatus};

/// How one attempt ended.
///
/// See the crate's [guarantees](crate#guarantees).
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
    /// The status the job ends this attempt in (unless a cancellation wins).
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
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone)]
pub struct Finish {
    /// The job.
    pub id: JobId,
    /// The attempt the claim was for.
    pub attempt: i32,
    /// How it ended.
    pub outcome: Outcome,
    /// The job's message was acked early (a long job): handing it back must publish it again.
    pub detached: bool,
}

/// What finishing one attempt wrote.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// The job.
    pub id: JobId,
    /// The attempt that was finished.
    pub attempt: i32,
    /// The status it now has: the outcome's, or `cancelled` if a cancellation won.
    pub status: JobStatus,
    /// The webhook delivery this finish recorded (the job has a `callback_url` and is now
    /// final): a job whose outbox row the finisher should publish with the others.
    pub webhook: Option<JobId>,
}

impl Store {
    /// Writes a batch of outcomes for `worker` in one statement. Returns the attempts whose
    /// claim still held, with the status each ended in; the others (taken over after a lease
    /// expired, or already released) wrote nothing.
    pub async fn finish_jobs(
        &self,
        worker: Uuid,
        batch: &[Finish],
    ) -> Result<Vec<Finished>, StoreError> {
        finish_jobs(self.pool(), worker, batch, false).await
    }

    /// [`Store::finish_jobs`], also returning the finished jobs that have dependents or
    /// belong to a batch: their final status may have released children or enqueued a
    /// callback ([`Store::released_by`] says which), to publish at once.
    pub async fn finish_jobs_following(
        &self,
        worker: Uuid,
        batch: &[Finish],
    ) -> Result<(Vec<Finished>, Vec<JobId>), StoreError> {
        finish_rows(self.pool(), worker, batch, false).await
    }

    /// [`Store::finish_jobs_following`] for `batch`, then the claim statement for each of
    /// `claims`, all in one transaction: a worker's hot path pays one commit (one WAL flush)
    /// for the attempts that finished and the deliveries that arrived meanwhile. The
    /// statements and their fences are those of the separate calls; committing them together
    /// changes no outcome, and a failure of any rolls back all. Returns the finish's answer
    /// and, per claim, the rows it took, for [`Store::resolve_claims`].
    pub(crate) async fn finish_and_claim(
        &self,
        worker: Uuid,
        batch: &[Finish],
        claims: &[Vec<super::claim_job::ClaimInput<'_>>],
        lease: std::time::Duration,
    ) -> Result<FinishedAndClaimed, StoreError> {
        if batch.is_empty() && claims.len() == 1 {
            // A lone claim commits on its own, as one statement: no BEGIN, no COMMIT.
            let rows =
                super::claim_job::claim_statement(self.pool(), &claims[0], worker, lease).await?;
            return Ok(((Vec::new(), Vec::new()), vec![rows]));
        }
        let mut tx = self
            .pool()
            .begin()
            .await
            .context("beginning a finish-and-claim")?;
        let finished = if batch.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            finish_rows(&mut *tx, worker, batch, false).await?
        };
        let mut claimed = Vec::with_capacity(claims.len());
        for inputs in claims {
            claimed.push(super::claim_job::claim_statement(&mut *tx, inputs, worker, lease).await?);
        }
        tx.commit().await.context("committing a finish-and-claim")?;
        Ok((finished, claimed))
    }
}

/// What [`Store::finish_and_claim`] wrote: the finished attempts and the jobs they may have
/// released, then the rows each claim took.
pub(crate) type FinishedAndClaimed = (
    (Vec<Finished>, Vec<JobId>),
    Vec<Vec<super::claim_job::Claimed>>,
);

/// [`Store::finish_jobs`] on any executor. A handler's own transaction passes its connection
/// with `with_handler_writes`, so the job's completion commits together with the handler's
/// writes; then a job whose cancellation was requested is not finished at all (the caller
/// rolls the writes back and records the cancellation on its own).
pub async fn finish_jobs<'c>(
    db: impl PgExecutor<'c>,
    worker: Uuid,
    batch: &[Finish],
    with_handler_writes: bool,
) -> Result<Vec<Finished>, StoreError> {
    Ok(finish_rows(db, worker, batch, with_handler_writes).await?.0)
}

/// [`finish_jobs`], with the ids of the finished jobs whose final status may have released
/// dependents or completed a batch.
pub(crate) async fn finish_rows<'c>(
    db: impl PgExecutor<'c>,
    worker: Uuid,
    batch: &[Finish],
    with_handler_writes: bool,
) -> Result<(Vec<Finished>, Vec<JobId>), StoreError> {
    let mut ids = Vec::with_capacity(batch.len());
    let mut attempts = Vec::with_capacity(batch.len());
    let mut statuses = Vec::with_capacity(batch.len());
    let mut results: Vec<Option<&str>> = Vec::with_capacity(batch.len());
    let mut errors: Vec<Option<String>> = Vec::with_capacity(batch.len());
    let mut next: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(batch.len());
    let mut detached = Vec::with_capacity(batch.len());
    for f in batch {
        ids.push(f.id);
        attempts.push(f.attempt);
        statuses.push(f.outcome.status().as_str());
        let (result, error, at) = match &f.outcome {
            Outcome::Succeeded(r) => (Some(r.get()), None, None),
            Outcome::Retry { error, at } => (None, Some(super::clip_error(error)), Some(*at)),
            Outcome::Dead(error) => (None, Some(super::clip_error(error)), None),
            Outcome::Cancelled | Outcome::Released => (None, None, None),
        };
        results.push(result);
        errors.push(error);
        next.push(at);
        detached.push(f.detached);
    }
    // The WHERE is the fence: this worker, this attempt, still running. A released job gives
    // its attempt back, so a drain costs the job nothing. One NOTIFY per batch keeps long
    // polls cheap at any rate (ids are 37 bytes; the batch limit keeps the payload under 8 kB).
    let done: Vec<(Uuid, String, i32, bool, Option<Uuid>)> = sqlx::query_as(
        "WITH input AS (
             SELECT * FROM unnest($1::uuid[], $2::int4[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::bool[])
                 AS t(id, attempt, status, result, error, next_at, detached)
         ), done AS (
             UPDATE apiary_jobs j
                SET status = CASE WHEN j.cancel_requested THEN 'cancelled' ELSE i.status END,
                    result = CASE WHEN j.cancel_requested THEN NULL ELSE i.result::json END,
                    error = CASE WHEN i.status = 'queued' THEN j.error ELSE i.error END,
                    errors = CASE WHEN i.error IS NULL THEN j.errors
                                  ELSE j.errors || jsonb_build_array(jsonb_build_object(
                                      'attempt', j.attempts, 'error', i.error, 'at', now(),
                                      'retry_at', i.next_at)) END,
                    attempts = CASE WHEN i.status = 'queued' THEN j.attempts - 1 ELSE j.attempts END,
                    next_attempt_at = CASE WHEN j.cancel_requested THEN NULL ELSE i.next_at END,
                    finished_at = CASE WHEN j.cancel_requested OR i.status IN ('succeeded', 'dead', 'cancelled')
                                       THEN now() END,
                    lease_until = NULL,
                    worker_id = NULL,
                    detached = false
               FROM input i
              WHERE j.id = i.id AND j.attempts = i.attempt AND j.status = 'running' AND j.worker_id = $8
                AND NOT ($10 AND j.cancel_requested)
             -- The input row that matched, not any row of the same job: a batch may carry a
             -- stale completion of the job beside the current one, and only one is applied.
             -- The delivery's id is derived (migration 0015), so the trigger's job is named
             -- here without reading it back; a plain job pays a NULL test.
             RETURNING j.id, j.status, i.attempt, i.detached,
                       j.finished_at IS NOT NULL AND (j.has_dependents OR j.batch_id IS NOT NULL) AS follow,
                       CASE WHEN j.callback_url IS NOT NULL AND j.finished_at IS NOT NULL
                            THEN apiary_webhook_id('job', j.id, j.finished_at) END AS webhook
         ), outbox AS (
             INSERT INTO apiary_outbox (job_id)
             SELECT d.id FROM done d
              WHERE d.status = 'retrying' OR (d.status = 'queued' AND d.detached)
             ON CONFLICT (job_id) DO UPDATE SET dead_reason = NULL, created_at = now()
         ), notified AS (
             SELECT pg_notify($9, string_agg(id::text, ',')) FROM done
              WHERE status IN ('succeeded', 'dead', 'cancelled')
             HAVING count(*) > 0
         )
         SELECT id, status, attempt, follow, webhook FROM done LEFT JOIN notified ON true",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(&statuses)
    .bind(&results)
    .bind(&errors)
    .bind(&next)
    .bind(&detached)
    .bind(worker)
    .bind(DONE_CHANNEL)
    .bind(with_handler_writes)
    .fetch_all(db)
    .await
    .context("finishing jobs")?;
    let follow = done.iter().filter(|d| d.3).map(|d| d.0).collect();
    let finished = done
        .into_iter()
        .map(|(id, status, attempt, _, webhook)| Finished {
            id,
            attempt,
            status: status.parse().unwrap_or(JobStatus::Failed),
            webhook,
        })
        .collect();
    Ok((finished, follow))
}

/// What the heartbeat learned about one attempt this worker runs.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The job.
    pub id: JobId,
    /// The attempt.
    pub attempt: i32,
    /// Whether this worker still holds the claim on this attempt (or the job has finished).
    /// False once the lease lapsed and the job was taken over or put back by a rescuer: the
    /// handler should stop, and its outcome will be fenced out.
    pub held: bool,
    /// Whether someone asked to cancel the job.
    pub cancel_requested: bool,
}

impl Store {
    /// Renews the leases of the attempts this worker is running, fenced by attempt, and says
    /// for each whether the claim still holds and whether a cancellation was requested. Rows
    /// locked by a finishing batch are skipped (they are finishing anyway): the heartbeat
    /// never waits on, or deadlocks with, the completer.
    pub async fn renew_leases(
        &self,
        worker: Uuid,
        mine: &[(JobId, i32)],
        lease: std::time::Duration,
    ) -> Result<Vec<Lease>, StoreError> {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let ids: Vec<Uuid> = mine.iter().map(|m| m.0).collect();
        let attempts: Vec<i32> = mine.iter().map(|m| m.1).collect();
        let rows: Vec<(Uuid, i32, Option<bool>, Option<bool>)> = sqlx::query_as(
            "WITH mine AS (
                 SELECT * FROM unnest($1::uuid[], $2::int4[]) AS t(id, attempt)
             ), renewed AS (
                 UPDATE apiary_jobs SET lease_until = now() + $4 * interval '1 millisecond'
                  WHERE id IN (SELECT j.id FROM apiary_jobs j JOIN mine m ON m.id = j.id AND m.attempt = j.attempts
                                WHERE j.worker_id = $3 AND j.status = 'running'
                                FOR UPDATE OF j SKIP LOCKED)
                 RETURNING id
             )
             SELECT m.id, m.attempt,
                    -- Finished meanwhile counts as held: it is this worker's own completer
                    -- that ended it, or the job is over either way.
                    j.finished_at IS NOT NULL
                        OR (j.status = 'running' AND j.worker_id = $3 AND j.attempts = m.attempt),
                    j.cancel_requested
               FROM mine m LEFT JOIN apiary_jobs j ON j.id = m.id",
        )
        .bind(&ids)
        .bind(&attempts)
        .bind(worker)
        .bind(lease_ms)
        .fetch_all(self.pool())
        .await
        .context("renewing leases")?;
        Ok(rows
            .into_iter()
            .map(|(id, attempt, held, cancel)| Lease {
                id,
                attempt,
                held: held.unwrap_or(false),
                cancel_requested: cancel.unwrap_or(false),
            })
            .collect())
    }
}
