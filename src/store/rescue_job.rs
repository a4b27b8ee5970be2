//! Long jobs and their rescue. A job running past the detach threshold is marked `detached`
//! and its message acked; if its worker then dies, nothing in the broker brings it back, so
//! the rescuer finds detached jobs whose lease expired and puts them back in the queue.

use std::time::Duration;

use sqlx::types::Json;
use uuid::Uuid;

use super::{Context, DONE_CHANNEL, Store, StoreError};
use crate::job::JobId;
use crate::wire::WireJob;

/// What the rescuer found.
#[derive(Debug, Default)]
pub struct Rescued {
    /// Jobs put back in `queued`, to publish again.
    pub requeued: Vec<WireJob>,
    /// Jobs whose lost attempt was their last: now dead, with the reason.
    pub dead: Vec<(WireJob, String)>,
}

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

    /// Takes detached jobs whose lease expired: back to `queued` (the lost attempt counts), or
    /// `dead` if it was the last. Concurrent rescuers skip each other's rows.
    pub async fn rescue_expired(&self, limit: i64) -> Result<Rescued, StoreError> {
        #[allow(clippy::type_complexity)]
        let rows: Vec<(Uuid, String, Json<Box<serde_json::value::RawValue>>, Option<String>, i32, String)> =
            sqlx::query_as(
                "WITH expired AS (
                     SELECT id FROM apiary_jobs
                      WHERE detached AND status = 'running' AND lease_until < now()
                      ORDER BY lease_until LIMIT $1
                      FOR UPDATE SKIP LOCKED
                 ), moved AS (
                     UPDATE apiary_jobs j
                        SET status = CASE WHEN j.attempts >= j.max_attempts THEN 'dead' ELSE 'queued' END,
                            error = 'attempt ' || j.attempts || ' was lost: its worker stopped (lease expired)',
                            errors = j.errors || jsonb_build_array(jsonb_build_object(
                                'attempt', j.attempts, 'error', 'worker stopped; lease expired', 'at', now())),
                            finished_at = CASE WHEN j.attempts >= j.max_attempts THEN now() END,
                            lease_until = NULL, worker_id = NULL, detached = false
                       FROM expired e
                      WHERE j.id = e.id
                     RETURNING j.id, j.kind, j.payload, j.dedup_key, j.max_attempts, j.status
                 ), notified AS (
                     SELECT pg_notify($2, string_agg(id::text, ',')) FROM moved WHERE status = 'dead'
                     HAVING count(*) > 0
                 )
                 SELECT m.* FROM moved m LEFT JOIN notified ON true",
            )
            .bind(limit)
            .bind(DONE_CHANNEL)
            .fetch_all(self.pool())
            .await
            .context("rescuing expired detached jobs")?;
        let mut out = Rescued::default();
        for (id, kind, payload, dedup_key, max_attempts, status) in rows {
            let job = WireJob {
                id,
                kind,
                payload: payload.0,
                dedup_key,
                max_attempts: Some(max_attempts),
                run_at: None,
            };
            if status == "dead" {
                out.dead.push((
                    job,
                    "no attempts left: its worker stopped during the last one".into(),
                ));
            } else {
                out.requeued.push(job);
            }
        }
        Ok(out)
    }
}

/// How often workers look for expired detached jobs.
pub const RESCUE_INTERVAL: Duration = Duration::from_secs(2);
