//! Queue state an operator sets (pausing and resuming a queue) and what an operator reads
//! about each queue (`apiary queue list`, `GET /v1/queues`). The paused state lives in
//! Postgres so that every worker sees it and it outlives any of them; workers read it every
//! half second.
//!
//! The per-queue figures come from bounded scans of `apiary_jobs_queue_created (queue,
//! created_at DESC, id DESC)`, never from a scan of the table: the newest
//! [`QUEUE_SCAN_ROWS`] jobs of each queue give its running jobs, its finishes of the last
//! minute and its waiting jobs, and the oldest [`QUEUE_SCAN_ROWS`] of its last day give the
//! waiting jobs of a backlog older than that. There is no index on `status` (it would cost
//! every claim and finish its HOT update), so a figure is exact whenever a queue's
//! unfinished jobs lie within those windows, which is every queue but one with a backlog of
//! tens of thousands.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Context, Store, StoreError};

/// The most jobs of one queue each of [`Store::list_queues`]'s two scans reads.
pub const QUEUE_SCAN_ROWS: i64 = 10_000;

/// What Postgres knows about one queue of a deployment.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct QueueRow {
    /// The queue's name.
    pub name: String,
    /// Whether an operator paused it: its workers start none of its jobs.
    pub paused: bool,
    /// Its jobs `running` now.
    pub in_flight: i64,
    /// How long its oldest due job (`queued` or `retrying`, and due by its
    /// `coalesce(next_attempt_at, run_at, created_at)`) has waited since it became due;
    /// `None` when none waits.
    pub oldest_waiting_seconds: Option<f64>,
    /// Its jobs that succeeded in the last minute, per second.
    pub succeeded_per_second: f64,
    /// Its jobs that failed for good (`failed` or `dead`) in the last minute, per second.
    pub failed_per_second: f64,
}

impl Store {
    /// Pauses (`true`) or resumes (`false`) `queue` of the deployment `prefix`. Idempotent.
    pub async fn set_paused(
        &self,
        prefix: &str,
        queue: &str,
        paused: bool,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO apiary_queues (prefix, name, paused) VALUES ($1, $2, $3)
             ON CONFLICT (prefix, name) DO UPDATE SET paused = EXCLUDED.paused, changed_at = now()
              WHERE apiary_queues.paused IS DISTINCT FROM EXCLUDED.paused",
        )
        .bind(prefix)
        .bind(queue)
        .bind(paused)
        .execute(self.pool())
        .await
        .context("pausing or resuming a queue")?;
        Ok(())
    }

    /// Which of `queues` (of `prefix`) are paused.
    pub async fn paused_queues(
        &self,
        prefix: &str,
        queues: &[String],
    ) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(
            "SELECT name FROM apiary_queues WHERE prefix = $1 AND name = ANY($2) AND paused",
        )
        .bind(prefix)
        .bind(queues)
        .fetch_all(self.pool())
        .await
        .context("reading paused queues")
    }

    /// Every queue the deployment `prefix` knows, sorted with `default` first: `default`,
    /// `configured`, the queues an operator paused or resumed, and the queues of workers
    /// whose heartbeat is fresher than `live`.
    pub async fn known_queues(
        &self,
        prefix: &str,
        configured: &[String],
        live: Duration,
    ) -> Result<Vec<String>, StoreError> {
        let live_ms = i64::try_from(live.as_millis()).unwrap_or(i64::MAX);
        let mut names: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM apiary_queues WHERE prefix = $1
             UNION
             SELECT jsonb_object_keys(queues) FROM apiary_workers
              WHERE queue = $1 AND jsonb_typeof(queues) = 'object'
                AND heartbeat_at >= now() - $2 * interval '1 millisecond'",
        )
        .bind(prefix)
        .bind(live_ms)
        .fetch_all(self.pool())
        .await
        .context("listing known queues")?;
        names.extend(configured.iter().cloned());
        // A worker's row is written by a worker, whose queue names were checked; but an odd
        // row must not become a name every later step trips over.
        names.retain(|n| crate::job::validate_queue(n).is_ok());
        names.sort();
        names.dedup();
        names.retain(|n| n != crate::job::DEFAULT_QUEUE);
        names.insert(0, crate::job::DEFAULT_QUEUE.to_string());
        Ok(names)
    }

    /// The figures of every queue [`Store::known_queues`] lists, in its order.
    pub async fn list_queues(
        &self,
        prefix: &str,
        configured: &[String],
        live: Duration,
    ) -> Result<Vec<QueueRow>, StoreError> {
        let names = self.known_queues(prefix, configured, live).await?;
        self.queue_rows(prefix, &names).await
    }

    /// The figures of `names` (of `prefix`), in the order given; a name no job has yet gets
    /// a row of zeros. Each queue costs two index scans of at most [`QUEUE_SCAN_ROWS`] rows.
    ///
    /// Jobs recorded before named queues (`prefix` NULL) belong to whichever deployment
    /// reads them, as everywhere else. The prefix is checked after the `LIMIT`, so the rows
    /// of other deployments sharing the database count against the bound rather than
    /// lengthen the scan.
    pub async fn queue_rows(
        &self,
        prefix: &str,
        names: &[String],
    ) -> Result<Vec<QueueRow>, StoreError> {
        sqlx::query_as(
            "SELECT n.name,
                    coalesce(q.paused, false) AS paused,
                    recent.in_flight,
                    greatest(recent.oldest, early.oldest) AS oldest_waiting_seconds,
                    recent.succeeded / 60.0::float8 AS succeeded_per_second,
                    recent.failed / 60.0::float8 AS failed_per_second
               FROM unnest($2::text[]) WITH ORDINALITY AS n(name, ord)
               LEFT JOIN apiary_queues q ON q.prefix = $1 AND q.name = n.name
              CROSS JOIN LATERAL (
                  SELECT count(*) FILTER (WHERE status = 'running') AS in_flight,
                         max(extract(epoch FROM now() - due)::float8)
                             FILTER (WHERE status IN ('queued', 'retrying') AND due <= now()) AS oldest,
                         (count(*) FILTER (WHERE status = 'succeeded'
                                             AND finished_at > now() - interval '1 minute'))::float8 AS succeeded,
                         (count(*) FILTER (WHERE status IN ('failed', 'dead')
                                             AND finished_at > now() - interval '1 minute'))::float8 AS failed
                    FROM (SELECT status, finished_at, prefix,
                                 coalesce(next_attempt_at, run_at, created_at) AS due
                            FROM apiary_jobs
                           WHERE queue = n.name
                           ORDER BY created_at DESC, id DESC LIMIT $3) j
                   WHERE prefix = $1 OR prefix IS NULL
              ) recent
              CROSS JOIN LATERAL (
                  SELECT max(extract(epoch FROM now() - due)::float8) AS oldest
                    FROM (SELECT status, prefix, coalesce(next_attempt_at, run_at, created_at) AS due
                            FROM apiary_jobs
                           WHERE queue = n.name AND created_at > now() - interval '1 day'
                           ORDER BY created_at, id LIMIT $3) j
                   WHERE (prefix = $1 OR prefix IS NULL)
                     AND status IN ('queued', 'retrying') AND due <= now()
              ) early
              ORDER BY n.ord",
        )
        .bind(prefix)
        .bind(names)
        .bind(QUEUE_SCAN_ROWS)
        .fetch_all(self.pool())
        .await
        .context("reading queue figures")
    }
}
