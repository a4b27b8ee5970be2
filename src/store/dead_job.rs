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
