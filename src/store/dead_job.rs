//! Dead jobs: poison messages recorded as they arrive, and the records operators list and
//! replay.

use sqlx::types::Json;

use super::get_job::JOB_COLUMNS;
use super::{Context, DONE_CHANNEL, Store, StoreError};
use crate::job::{Job, JobId};

impl Store {
    /// Records a message that is not a job: status `dead`, its reason, and its raw body (cut
    /// to `max_bytes`). A message whose id is already a job records nothing: that job's own
    /// record stands. Returns whether its dead letter still has to be sent (false when a
    /// redelivery finds it already confirmed).
    pub async fn record_poison(
        &self,
        id: JobId,
        kind: Option<&str>,
        body: &[u8],
        reason: &str,
        max_bytes: usize,
    ) -> Result<bool, StoreError> {
        let mut raw = String::from_utf8_lossy(&body[..body.len().min(max_bytes)]).into_owned();
        // Postgres text cannot hold NUL.
        raw.retain(|c| c != '\0');
        sqlx::query_scalar(
            "WITH ins AS (
                 INSERT INTO apiary_jobs (id, kind, payload, max_attempts, status, attempts, error, errors,
                                          raw_body, finished_at)
                 VALUES ($1, $2, 'null', 1, 'dead', 0, $3,
                         jsonb_build_array(jsonb_build_object('attempt', 0, 'error', $3::text, 'at', now())),
                         $4, now())
                 ON CONFLICT DO NOTHING
                 RETURNING id
             ), notified AS (
                 SELECT pg_notify($5, id::text) FROM ins
             )
             SELECT EXISTS (SELECT 1 FROM ins)
                 OR EXISTS (SELECT 1 FROM apiary_outbox WHERE job_id = $1 AND dead_reason IS NOT NULL)
               FROM (SELECT count(*) FROM notified) n",
        )
        .bind(id)
        .bind(kind.unwrap_or(""))
        .bind(reason)
        .bind(raw)
        .bind(DONE_CHANNEL)
        .fetch_one(self.pool())
        .await
        .context("recording a poison message")
    }

    /// Records a scheduled job that was published raw, so it is visible while it waits.
    pub async fn record_scheduled(
        &self,
        job: &crate::wire::WireJob,
        default_max_attempts: i32,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO apiary_jobs (id, kind, payload, dedup_key, max_attempts, run_at)
             VALUES ($1, $2, $3::json, $4, $5, $6)
             ON CONFLICT DO NOTHING",
        )
        .bind(job.id)
        .bind(&job.kind)
        .bind(job.payload.get())
        .bind(&job.dedup_key)
        .bind(job.max_attempts.unwrap_or(default_max_attempts))
        .bind(job.run_at)
        .execute(self.pool())
        .await
        .context("recording a scheduled job")?;
        Ok(())
    }

    /// Dead jobs, newest first, optionally of one kind.
    pub async fn list_dead(&self, kind: Option<&str>, limit: i64) -> Result<Vec<Job>, StoreError> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM apiary_jobs WHERE status = 'dead' AND ($1::text IS NULL OR kind = $1)
              ORDER BY created_at DESC, id DESC LIMIT $2"
        )))
        .bind(kind)
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .context("listing dead jobs")
    }
}

/// Which dead jobs to replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplaySelector {
    /// One job.
    Id(JobId),
    /// Every dead job of a kind.
    Kind(String),
    /// Every dead job.
    All,
}

impl Store {
    /// Puts dead (or failed) jobs back in `queued` with a fresh attempt budget, keeping their id
    /// and error history, each with an outbox row so a crash before the publish loses nothing.
    /// Poison records (no valid job to run) are not replayed. Returns the jobs to publish.
    pub async fn replay_dead(
        &self,
        selector: &ReplaySelector,
    ) -> Result<Vec<crate::wire::WireJob>, StoreError> {
        let (id, kind, all) = match selector {
            ReplaySelector::Id(id) => (Some(*id), None, false),
            ReplaySelector::Kind(k) => (None, Some(k.as_str()), false),
            ReplaySelector::All => (None, None, true),
        };
        #[allow(clippy::type_complexity)]
        let rows: Vec<(uuid::Uuid, String, Json<Box<serde_json::value::RawValue>>, Option<String>, i32)> = sqlx::query_as(
            "WITH replayed AS (
                 UPDATE apiary_jobs
                    SET status = 'queued', attempts = 0, result = NULL, finished_at = NULL, started_at = NULL,
                        next_attempt_at = NULL, run_at = NULL, cancel_requested = false
                  WHERE status IN ('dead', 'failed') AND raw_body IS NULL
                    AND ($3 OR id = $1 OR kind = $2)
                 RETURNING id, kind, payload, dedup_key, max_attempts
             ), outbox AS (
                 INSERT INTO apiary_outbox (job_id) SELECT id FROM replayed
                 ON CONFLICT (job_id) DO UPDATE SET dead_reason = NULL, created_at = now()
             )
             SELECT * FROM replayed",
        )
        .bind(id)
        .bind(kind)
        .bind(all)
        .fetch_all(self.pool())
        .await
        .context("replaying dead jobs")?;
        Ok(rows
            .into_iter()
            .map(
                |(id, kind, payload, dedup_key, max_attempts)| crate::wire::WireJob {
                    id,
                    kind,
                    payload: payload.0,
                    dedup_key,
                    max_attempts: Some(max_attempts),
                    run_at: None,
                },
            )
            .collect())
    }
}

/// The advisory lock a dead-letter sweep holds, so two sweepers never sweep at once (a
/// second one would find every letter held by the first and remove nothing anyway).
pub const DEAD_SWEEP_LOCK: i64 = 0x6170_6961_7279_0d5e; // "apiary" + sweep

/// A sweep in progress: holds [`DEAD_SWEEP_LOCK`] in its transaction until
/// [`DeadSweep::finish`] commits or the value is dropped (which rolls back and releases it).
pub struct DeadSweep {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    /// The ids queued for sweeping whose job was not `dead` when the sweep began.
    pub queued: Vec<JobId>,
    /// When the sweep began, before it read the dead-letter queue: only ids queued before
    /// this are forgotten, since a later replay may have letters this pass did not see.
    started: chrono::DateTime<chrono::Utc>,
}

impl Store {
    /// Queues the dead letters of `ids` for removal by the next sweep (replayed jobs, whose
    /// letters no longer stand for a dead job). Queueing an id twice is harmless.
    pub async fn queue_dead_sweep(&self, ids: &[JobId]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO apiary_dead_sweep (job_id) SELECT unnest($1::uuid[])
             ON CONFLICT (job_id) DO UPDATE SET queued_at = now()",
        )
        .bind(ids)
        .execute(self.pool())
        .await
        .context("queueing dead letters for sweeping")?;
        Ok(())
    }

    /// Starts a sweep: takes [`DEAD_SWEEP_LOCK`] and reads up to `max` queued ids whose job
    /// is not `dead`, oldest first. `None` when another sweep holds the lock.
    ///
    /// The ids of jobs that died again after their replay stay queued, unread, until a later
    /// replay: they neither take a sweep's places nor lose the stale letters they stand for.
    pub async fn begin_dead_sweep(&self, max: i64) -> Result<Option<DeadSweep>, StoreError> {
        let mut tx = self
            .pool()
            .begin()
            .await
            .context("starting a dead-letter sweep")?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(DEAD_SWEEP_LOCK)
            .fetch_one(&mut *tx)
            .await
            .context("taking the dead-letter sweep lock")?;
        if !locked {
            return Ok(None);
        }
        let started = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&mut *tx)
            .await
            .context("reading the clock")?;
        let queued = sqlx::query_scalar(
            "SELECT s.job_id FROM apiary_dead_sweep s LEFT JOIN apiary_jobs j ON j.id = s.job_id
              WHERE j.status IS DISTINCT FROM 'dead'
              ORDER BY s.queued_at, s.job_id LIMIT $1",
        )
        .bind(max)
        .fetch_all(&mut *tx)
        .await
        .context("reading the ids queued for sweeping")?;
        Ok(Some(DeadSweep {
            tx,
            queued,
            started,
        }))
    }
}

impl DeadSweep {
    /// Of `ids`, those whose job is no longer `dead` (or no longer exists): their letters
    /// stand for nothing and may go. A job that died again after its replay keeps its
    /// letters: one of them is its current one, and they look alike.
    pub async fn not_dead(&mut self, ids: &[JobId]) -> Result<Vec<JobId>, StoreError> {
        sqlx::query_scalar(
            "SELECT q.id FROM unnest($1::uuid[]) AS q(id)
               LEFT JOIN apiary_jobs j ON j.id = q.id
              WHERE j.status IS DISTINCT FROM 'dead'",
        )
        .bind(ids)
        .fetch_all(&mut *self.tx)
        .await
        .context("reading the status of replayed jobs")
    }

    /// Ends the sweep: forgets `swept` (their letters are gone) unless queued again since the
    /// sweep began, and releases the lock.
    pub async fn finish(mut self, swept: &[JobId]) -> Result<(), StoreError> {
        if !swept.is_empty() {
            sqlx::query("DELETE FROM apiary_dead_sweep WHERE job_id = ANY($1) AND queued_at < $2")
                .bind(swept)
                .bind(self.started)
                .execute(&mut *self.tx)
                .await
                .context("forgetting swept ids")?;
        }
        self.tx
            .commit()
            .await
            .context("finishing a dead-letter sweep")
    }
}
