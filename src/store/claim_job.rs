//! ④ Claiming jobs for a batch of deliveries: the one place that decides whether a delivery
//! runs. A claim is a guarded statement: only a job that is queued, retrying, or running under
//! an expired lease becomes `running` under this worker's id, so a second delivery of the same
//! job, at any moment and on any worker, claims nothing.

use chrono::{DateTime, Utc};

use uuid::Uuid;

use super::{Context, DONE_CHANNEL, Store, StoreError};
use crate::job::JobId;
use crate::wire::WireJob;

/// How early a job may start before its due time: the delay queues' finest tier. A job that
/// arrives within this margin of its due time runs rather than waiting another round.
pub const DUE_TOLERANCE_MS: i64 = 100;

/// What a claim found for one delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// This worker now holds the job; run attempt `attempt` of `max_attempts`.
    Claimed {
        /// The attempt number, counting this one.
        attempt: i32,
        /// The attempt budget.
        max_attempts: i32,
    },
    /// The job has ended (succeeded, dead, cancelled, ...): ack without running.
    Finished,
    /// A raw message repeated another job's `(kind, dedup_key)`: recorded as a duplicate of it.
    Duplicate(JobId),
    /// Another worker holds a live claim until this instant.
    Busy(DateTime<Utc>),
    /// Not due before this instant: wait in a delay queue.
    NotDue(DateTime<Utc>),
    /// A worker died during the last allowed attempt: the job is now dead.
    Exhausted,
    /// The job was cancelled before it ran: it is now `cancelled`.
    Cancelled,
    /// The claim lost a race that has already resolved: claim again now.
    Again,
}

impl Store {
    /// Claims the jobs of a batch of deliveries for `worker`, for `lease`. Returns one
    /// [`Claim`] per job, in order. Jobs published raw, never recorded, are recorded here
    /// with the attempt budget of the same position in `budgets`.
    pub async fn claim_jobs(
        &self,
        jobs: &[&WireJob],
        worker: Uuid,
        lease: std::time::Duration,
        budgets: &[i32],
    ) -> Result<Vec<Claim>, StoreError> {
        let ids: Vec<Uuid> = jobs.iter().map(|j| j.id).collect();
        let kinds: Vec<&str> = jobs.iter().map(|j| j.kind.as_str()).collect();
        let payloads: Vec<&str> = jobs.iter().map(|j| j.payload.get()).collect();
        let keys: Vec<Option<&str>> = jobs.iter().map(|j| j.dedup_key.as_deref()).collect();
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);

        // The UPDATE takes existing jobs that may run now; its WHERE is the guard. Under READ
        // COMMITTED a concurrent claim of the same row waits for the other transaction and then
        // re-checks the WHERE against the new version, which is `running`: it claims nothing.
        // The INSERT records jobs never seen before (published raw); ON CONFLICT DO NOTHING
        // makes a racing insert, or a dedup key that is already taken, claim nothing.
        let claimed: Vec<(Uuid, i32, i32)> = sqlx::query_as(
            "WITH input AS (
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int4[])
                     AS t(id, kind, payload, dedup_key, max_attempts)
             ), upd AS (
                 UPDATE apiary_jobs j
                    SET status = 'running', attempts = j.attempts + 1, started_at = now(),
                        lease_until = now() + $7 * interval '1 millisecond', worker_id = $6,
                        next_attempt_at = NULL
                   FROM input i
                  WHERE j.id = i.id
                    AND NOT j.cancel_requested
                    AND j.attempts < j.max_attempts
                    AND (j.status IN ('queued', 'retrying')
                         OR (j.status = 'running' AND j.lease_until < now()))
                    AND coalesce(j.next_attempt_at, j.run_at, '-infinity') <= now() + $8 * interval '1 millisecond'
                 RETURNING j.id, j.attempts, j.max_attempts
             ), ins AS (
                 INSERT INTO apiary_jobs (id, kind, payload, dedup_key, max_attempts, status, attempts,
                                          started_at, lease_until, worker_id)
                 SELECT i.id, i.kind, i.payload::json, i.dedup_key, i.max_attempts, 'running', 1,
                        now(), now() + $7 * interval '1 millisecond', $6
                   FROM input i
                  WHERE NOT EXISTS (SELECT 1 FROM apiary_jobs j WHERE j.id = i.id)
                 ON CONFLICT DO NOTHING
                 RETURNING id, attempts, max_attempts
             )
             SELECT id, attempts, max_attempts FROM upd
             UNION ALL
             SELECT id, attempts, max_attempts FROM ins",
        )
        .bind(&ids)
        .bind(&kinds)
        .bind(&payloads)
        .bind(&keys)
        .bind(budgets)
        .bind(worker)
        .bind(lease_ms)
        .bind(DUE_TOLERANCE_MS)
        .fetch_all(self.pool())
        .await
        .context("claiming jobs")?;

        let mut out = Vec::with_capacity(jobs.len());
        let mut taken = std::collections::HashSet::with_capacity(claimed.len());
        let by_id: std::collections::HashMap<Uuid, (i32, i32)> =
            claimed.into_iter().map(|(id, a, m)| (id, (a, m))).collect();
        for job in jobs {
            // A batch may hold two deliveries of one job; only the first runs.
            match by_id.get(&job.id) {
                Some(&(attempt, max_attempts)) if taken.insert(job.id) => {
                    out.push(Claim::Claimed {
                        attempt,
                        max_attempts,
                    })
                }
                _ => out.push(self.explain_unclaimed(job, worker).await?),
            }
        }
        Ok(out)
    }

    /// Works out why a delivery claimed nothing, and settles what can be settled here. Rare:
    /// redeliveries, duplicates and races.
    async fn explain_unclaimed(&self, job: &WireJob, worker: Uuid) -> Result<Claim, StoreError> {
        #[derive(sqlx::FromRow)]
        struct Row {
            status: String,
            attempts: i32,
            max_attempts: i32,
            lease_until: Option<DateTime<Utc>>,
            worker_id: Option<Uuid>,
            due: Option<DateTime<Utc>>,
            cancel_requested: bool,
            now: DateTime<Utc>,
        }
        let row: Option<Row> = sqlx::query_as(
            "SELECT status, attempts, max_attempts, lease_until, worker_id,
                    coalesce(next_attempt_at, run_at) AS due, cancel_requested, now() AS now
               FROM apiary_jobs WHERE id = $1",
        )
        .bind(job.id)
        .fetch_optional(self.pool())
        .await
        .context("reading an unclaimed job")?;

        let Some(row) = row else {
            // No row with this id: the INSERT hit the dedup index. Record this message as a
            // duplicate of the job that owns the key.
            let original: Option<Uuid> = sqlx::query_scalar(
                "INSERT INTO apiary_jobs (id, kind, payload, dedup_key, max_attempts, status, duplicate_of, finished_at)
                 SELECT $1, $2, $3::json, $4, $5, 'duplicate', o.id, now()
                   FROM apiary_jobs o
                  WHERE o.kind = $2 AND o.dedup_key = $4 AND o.duplicate_of IS NULL
                 ON CONFLICT DO NOTHING
                 RETURNING duplicate_of",
            )
            .bind(job.id)
            .bind(&job.kind)
            .bind(job.payload.get())
            .bind(&job.dedup_key)
            .bind(job.max_attempts.unwrap_or(1))
            .fetch_optional(self.pool())
            .await
            .context("recording a duplicate")?;
            return Ok(match original {
                Some(of) => Claim::Duplicate(of),
                // Lost a race with a concurrent delivery of this same message, or the original
                // was just pruned: look again rather than guess.
                None => Claim::Again,
            });
        };

        let status: crate::job::JobStatus =
            row.status.parse().unwrap_or(crate::job::JobStatus::Running);
        use crate::job::JobStatus as S;
        if status.is_final() {
            return Ok(Claim::Finished);
        }
        if row.cancel_requested && matches!(status, S::Queued | S::Retrying) {
            self.finish_unstarted(job.id, "cancelled", None).await?;
            return Ok(Claim::Cancelled);
        }
        match status {
            S::Running => {
                let lease = row.lease_until.unwrap_or(row.now);
                if lease >= row.now || row.worker_id == Some(worker) {
                    return Ok(Claim::Busy(lease));
                }
                if row.attempts >= row.max_attempts {
                    let reason = format!(
                        "attempt {} of {} was lost: its worker stopped without finishing it (lease expired)",
                        row.attempts, row.max_attempts
                    );
                    self.finish_abandoned(job.id, &reason).await?;
                    return Ok(Claim::Exhausted);
                }
                // Expired between the two statements: try again now.
                Ok(Claim::Again)
            }
            S::Queued | S::Retrying => match row.due {
                Some(due) if due > row.now + chrono::Duration::milliseconds(DUE_TOLERANCE_MS) => {
                    Ok(Claim::NotDue(due))
                }
                _ if row.attempts >= row.max_attempts => {
                    self.finish_unstarted(job.id, "dead", Some("no attempts left"))
                        .await?;
                    Ok(Claim::Exhausted)
                }
                _ => Ok(Claim::Again),
            },
            _ => Ok(Claim::Finished),
        }
    }

    /// Ends a job that is not running (cancelled or out of attempts) and announces it.
    pub(crate) async fn finish_unstarted(
        &self,
        id: JobId,
        status: &'static str,
        error: Option<&str>,
    ) -> Result<bool, StoreError> {
        let done: Option<Uuid> = sqlx::query_scalar(
            "WITH done AS (
                 UPDATE apiary_jobs SET status = $2, error = coalesce($3, error), finished_at = now(),
                        next_attempt_at = NULL
                  WHERE id = $1 AND status IN ('queued', 'retrying')
                 RETURNING id
             )
             SELECT id, pg_notify($4, $1::text)::text FROM done",
        )
        .bind(id)
        .bind(status)
        .bind(error)
        .bind(DONE_CHANNEL)
        .fetch_optional(self.pool())
        .await
        .context("ending an unstarted job")?;
        Ok(done.is_some())
    }

    /// Ends a job whose last attempt was lost with its worker.
    async fn finish_abandoned(&self, id: JobId, reason: &str) -> Result<(), StoreError> {
        sqlx::query(
            "WITH done AS (
                 UPDATE apiary_jobs
                    SET status = 'dead', error = $2, finished_at = now(), lease_until = NULL, worker_id = NULL,
                        errors = errors || jsonb_build_array(jsonb_build_object('attempt', attempts, 'error', $2::text, 'at', now()))
                  WHERE id = $1 AND status = 'running' AND lease_until < now()
                 RETURNING id
             )
             SELECT pg_notify($3, $1::text) FROM done",
        )
        .bind(id)
        .bind(reason)
        .bind(DONE_CHANNEL)
        .execute(self.pool())
        .await
        .context("ending an abandoned job")?;
        Ok(())
    }
}
