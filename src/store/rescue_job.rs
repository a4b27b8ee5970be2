//! Long jobs and their rescue. A job running past the detach threshold is marked `detached`
//! and its message acked; if its worker then dies, nothing in the broker brings it back, so
//! the rescuer finds detached jobs whose lease expired and puts them back in the queue.

use std::time::Duration;

use uuid::Uuid;

use super::{Context, DONE_CHANNEL, Store, StoreError};
use crate::job::JobId;

impl Store {
    /// Marks this worker's running attempt of `id` detached. Returns false if the claim is
    /// no longer this worker's (then the message must not be acked).
    pub async fn detach_job(
        &self,
        id: JobId,
        worker: Uuid,
        attempt: i32,
    ) -> Result<bool, StoreError> {
        let res = sqlx::query(
            "UPDATE apiary_jobs SET detached = true
              WHERE id = $1 AND worker_id = $2 AND attempts = $3 AND status = 'running'",
        )
        .bind(id)
        .bind(worker)
        .bind(attempt)
        .execute(self.pool())
        .await
        .context("detaching a long job")?;
        Ok(res.rows_affected() == 1)
    }

    /// Takes detached jobs whose lease expired: back to `queued` (the lost attempt counts),
    /// or `dead` if it was the last. Each gets an outbox row in the same statement (the job to
    /// publish again, or its dead letter), so the caller sends them with
    /// [`Store::relay_outbox`] and a crash in between loses nothing. Concurrent rescuers skip
    /// each other's rows. Returns the ids.
    pub async fn rescue_expired(&self, limit: i64) -> Result<Vec<JobId>, StoreError> {
        sqlx::query_scalar(
            "WITH expired AS (
                 SELECT id FROM apiary_jobs
                  WHERE detached AND status = 'running' AND lease_until < now()
                  ORDER BY lease_until LIMIT $1
                  FOR UPDATE SKIP LOCKED
             ), moved AS (
                 UPDATE apiary_jobs j
                    SET status = CASE WHEN j.attempts >= j.max_attempts THEN 'dead' ELSE 'queued' END,
                        error = 'attempt ' || j.attempts || ' of ' || j.max_attempts
                                || ' was lost: its worker stopped (lease expired)',
                        errors = j.errors || jsonb_build_array(jsonb_build_object(
                            'attempt', j.attempts, 'error', 'worker stopped; lease expired', 'at', now())),
                        finished_at = CASE WHEN j.attempts >= j.max_attempts THEN now() END,
                        lease_until = NULL, worker_id = NULL, detached = false
                   FROM expired e
                  WHERE j.id = e.id
                 RETURNING j.id, j.status
             ), outbox AS (
                 INSERT INTO apiary_outbox (job_id) SELECT id FROM moved WHERE status = 'queued'
                 ON CONFLICT (job_id) DO UPDATE SET dead_reason = NULL, created_at = now()
             ), notified AS (
                 SELECT pg_notify($2, string_agg(id::text, ',')) FROM moved WHERE status = 'dead'
                 HAVING count(*) > 0
             )
             SELECT m.id FROM moved m LEFT JOIN notified ON true",
        )
        .bind(limit)
        .bind(DONE_CHANNEL)
        .fetch_all(self.pool())
        .await
        .context("rescuing expired detached jobs")
    }
}

/// How often workers look for expired detached jobs.
pub const RESCUE_INTERVAL: Duration = Duration::from_secs(2);
