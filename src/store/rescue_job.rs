//! Long jobs, and the rescue of every job whose lease lapsed. A job running past the detach
//! threshold is marked `detached` and its message acked. Any running job whose lease expires
//! (its worker was killed, or stalled past the lease) is put back by a rescuer on a live
//! worker, however it came in: queued again with an outbox row to publish it (the lost attempt
//! counts), dead if that was its last attempt, cancelled if a cancellation was requested. The
//! broker's own redelivery is only the fast path; the rescue is what guarantees recovery.

use std::time::Duration;

use uuid::Uuid;

use super::{Context, DONE_CHANNEL, Store, StoreError};
use crate::job::JobId;

/// Which running jobs a rescue pass looks at. Running jobs are not indexed (an index on
/// status or lease would make every claim and finish a non-HOT update), so the cheap passes
/// are narrow and the full one runs rarely, on one worker at a time.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy)]
pub enum RescueScope<'a> {
    /// Detached (long) jobs: their message is gone, so only the rescue brings them back.
    /// Found through the small `detached` index; cheap, run every couple of seconds.
    Detached,
    /// Jobs claimed by these workers, whose heartbeats stopped: a scan, run when a worker is
    /// found gone.
    Workers(&'a [Uuid]),
    /// Every running job: the safety net, a scan, run about once a minute by one worker.
    All,
}

/// The advisory lock key that elects the worker doing a full rescue pass.
const RESCUE_LOCK: i64 = 0x61_70_69_61_72_79_72;

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

    /// Takes running jobs in `scope` whose lease expired: back to `queued` (the lost attempt
    /// counts), `dead` if it was the last, `cancelled` if a cancellation was requested. Each
    /// queued one gets an outbox row in the same statement (a dead one its letter's row, from
    /// the trigger), so the caller sends them with [`Store::relay_outbox`] and a crash in
    /// between loses nothing. Concurrent rescuers skip each other's rows. Returns the ids.
    /// With [`RescueScope::All`], returns `None` if another worker holds the full-pass lock.
    pub async fn rescue_expired(
        &self,
        scope: RescueScope<'_>,
        limit: i64,
    ) -> Result<Option<Vec<JobId>>, StoreError> {
        let (detached_only, workers, all) = match scope {
            RescueScope::Detached => (true, None, false),
            RescueScope::Workers(w) => (false, Some(w), false),
            RescueScope::All => (false, None, true),
        };
        let mut tx = self.pool().begin().await.context("starting a rescue")?;
        if all {
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
                .bind(RESCUE_LOCK)
                .fetch_one(&mut *tx)
                .await
                .context("taking the rescue lock")?;
            if !locked {
                return Ok(None);
            }
        }
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "WITH expired AS (
                 SELECT id FROM apiary_jobs
                  WHERE status = 'running' AND lease_until < now()
                    AND (NOT $1 OR detached)
                    AND ($2::uuid[] IS NULL OR worker_id = ANY($2))
                  ORDER BY lease_until LIMIT $3
                  FOR UPDATE SKIP LOCKED
             ), moved AS (
                 UPDATE apiary_jobs j
                    SET status = CASE WHEN j.cancel_requested THEN 'cancelled'
                                      WHEN j.attempts >= j.max_attempts THEN 'dead' ELSE 'queued' END,
                        error = 'attempt ' || j.attempts || ' of ' || j.max_attempts
                                || ' was lost: its worker stopped without finishing it (lease expired)',
                        errors = j.errors || jsonb_build_array(jsonb_build_object(
                            'attempt', j.attempts, 'error', 'worker stopped; lease expired', 'at', now())),
                        finished_at = CASE WHEN j.cancel_requested OR j.attempts >= j.max_attempts
                                           THEN now() END,
                        lease_until = NULL, worker_id = NULL, detached = false
                   FROM expired e
                  WHERE j.id = e.id
                 RETURNING j.id, j.status
             ), outbox AS (
                 INSERT INTO apiary_outbox (job_id) SELECT id FROM moved WHERE status = 'queued'
                 ON CONFLICT (job_id) DO UPDATE SET dead_reason = NULL, created_at = now()
             ), notified AS (
                 SELECT pg_notify($4, string_agg(id::text, ',')) FROM moved WHERE status <> 'queued'
                 HAVING count(*) > 0
             )
             SELECT m.id FROM moved m LEFT JOIN notified ON true",
        )
        .bind(detached_only)
        .bind(workers)
        .bind(limit)
        .bind(DONE_CHANNEL)
        .fetch_all(&mut *tx)
        .await
        .context("rescuing jobs whose lease expired")?;
        tx.commit().await.context("committing a rescue")?;
        Ok(Some(ids))
    }
}

/// How often workers look for detached jobs and gone workers whose leases expired.
pub const RESCUE_INTERVAL: Duration = Duration::from_secs(2);

/// How often one worker scans every running job for an expired lease, the safety net behind
/// the cheaper passes.
pub const FULL_RESCUE_INTERVAL: Duration = Duration::from_secs(60);
