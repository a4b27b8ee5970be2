//! The transactional outbox: the window between a commit and the broker's confirm, for new
//! jobs and for dead letters (a trigger queues one whenever a job becomes dead).
//! [`Store::insert_jobs`] writes an outbox row with every new job; the enqueuer deletes it once
//! the publish is confirmed. A row that outlives the grace period belongs to an enqueuer that
//! died in between: the relay (any worker) republishes it. A republished job that was in fact
//! published is harmless: the claim runs each job once.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::{Context, Store, StoreError};
use crate::job::JobId;
use crate::wire::WireJob;

impl Store {
    /// Deletes the outbox rows that enqueues wrote for jobs whose publish the broker confirmed.
    /// Only those rows: an enqueue's row carries its job's `created_at` (one transaction wrote
    /// both), while a row rewritten since for the job's next message (a retry, a rescue, a long
    /// job handed back, a dead letter) carries a later time and stays for the relay. Without
    /// that, a confirmation arriving late could delete the only thing carrying a retry.
    pub async fn delete_outbox(&self, ids: &[JobId]) -> Result<(), StoreError> {
        sqlx::query(
            "DELETE FROM apiary_outbox o USING apiary_jobs j
              WHERE o.job_id = ANY($1) AND j.id = o.job_id AND o.dead_reason IS NULL
                AND o.created_at = j.created_at",
        )
        .bind(ids)
        .execute(self.pool())
        .await
        .context("deleting outbox rows")?;
        Ok(())
    }

    /// Adds outbox rows for jobs that must be (re)published, for the relay to pick up.
    pub async fn add_to_outbox(&self, ids: &[JobId]) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO apiary_outbox (job_id, created_at) SELECT unnest($1::uuid[]), '-infinity' ON CONFLICT DO NOTHING")
            .bind(ids)
            .execute(self.pool())
            .await
            .context("adding outbox rows")?;
        Ok(())
    }

    /// Republishes stale outbox rows through `publish` and deletes them, at most `limit` per
    /// call: jobs whose enqueuer died before the confirm, and dead letters whose publisher did.
    /// Rows are locked with SKIP LOCKED so concurrent relays never publish a row twice at once.
    /// Returns how many were relayed.
    ///
    /// With `only`, just those jobs' rows, at once: the way a dead letter is first sent, so the
    /// sender and the relay lock the same row and never both publish it.
    pub async fn relay_outbox<F, Fut, E>(
        &self,
        grace: Duration,
        limit: i64,
        only: Option<&[JobId]>,
        publish: F,
    ) -> Result<usize, RelayError<E>>
    where
        F: FnOnce(Vec<OutboxItem>) -> Fut,
        Fut: Future<Output = Result<(), E>>,
    {
        let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        let mut tx = self
            .pool()
            .begin()
            .await
            .context("starting the relay")
            .map_err(RelayError::Store)?;
        let rows: Vec<OutboxRow> = sqlx::query_as(
            "SELECT j.id, j.kind, j.payload, j.dedup_key, j.max_attempts,
                    coalesce(j.next_attempt_at, j.run_at) AS run_at, j.raw_body, o.dead_reason,
                    j.queue, j.prefix, j.priority, j.concurrency_key, j.callback_url
               FROM apiary_outbox o JOIN apiary_jobs j ON j.id = o.job_id
              WHERE o.created_at < now() - $1 * interval '1 millisecond'
                AND ($3::uuid[] IS NULL OR o.job_id = ANY($3))
              ORDER BY o.created_at
              LIMIT $2
              FOR UPDATE OF o SKIP LOCKED",
        )
        .bind(grace_ms)
        .bind(limit)
        .bind(only)
        .fetch_all(&mut *tx)
        .await
        .context("reading stale outbox rows")
        .map_err(RelayError::Store)?;
        if rows.is_empty() {
            return Ok(0);
        }
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        let items = rows.into_iter().map(OutboxRow::into_item).collect();
        if let Err(e) = publish(items).await {
            // Send these to the back of the line, so rows that can be sent are not stuck behind
            // rows that cannot (the next pass tries them again after the others).
            drop(tx);
            let _ =
                sqlx::query("UPDATE apiary_outbox SET created_at = now() WHERE job_id = ANY($1)")
                    .bind(&ids)
                    .execute(self.pool())
                    .await;
            return Err(RelayError::Publish(e));
        }
        sqlx::query("DELETE FROM apiary_outbox WHERE job_id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .context("deleting relayed outbox rows")
            .map_err(RelayError::Store)?;
        tx.commit()
            .await
            .context("committing the relay")
            .map_err(RelayError::Store)?;
        Ok(ids.len())
    }
}

/// What an outbox row asks to publish.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone)]
pub enum OutboxItem {
    /// A job, to the work queue (or its delay tier).
    Job(WireJob),
    /// A dead letter, to the dead-letter queue of the job's queue.
    DeadLetter {
        /// The dead job.
        id: JobId,
        /// The job's queue.
        queue: String,
        /// The job's deployment; `None` for rows from before queues were recorded.
        prefix: Option<String>,
        /// The letter's body: the job message, or a poison message's raw body.
        body: Vec<u8>,
        /// Why it is dead.
        reason: String,
    },
}

#[derive(sqlx::FromRow)]
struct OutboxRow {
    id: Uuid,
    kind: String,
    payload: Json<Box<serde_json::value::RawValue>>,
    dedup_key: Option<String>,
    max_attempts: i32,
    run_at: Option<DateTime<Utc>>,
    raw_body: Option<String>,
    dead_reason: Option<String>,
    queue: String,
    prefix: Option<String>,
    priority: i16,
    concurrency_key: Option<String>,
    callback_url: Option<String>,
}

impl OutboxRow {
    fn into_item(self) -> OutboxItem {
        let job = WireJob {
            id: self.id,
            kind: self.kind,
            payload: self.payload.0,
            dedup_key: self.dedup_key,
            max_attempts: Some(self.max_attempts),
            run_at: self.run_at,
            queue: Some(self.queue),
            priority: u8::try_from(self.priority).ok(),
            concurrency_key: self.concurrency_key,
            prefix: self.prefix,
            callback_url: self.callback_url,
        };
        match self.dead_reason {
            None => OutboxItem::Job(job),
            Some(reason) => OutboxItem::DeadLetter {
                id: job.id,
                queue: job.queue_name().to_string(),
                prefix: job.prefix.clone(),
                body: self
                    .raw_body
                    .map(String::into_bytes)
                    .unwrap_or_else(|| job.to_body()),
                reason,
            },
        }
    }
}

/// Why a relay pass failed.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, thiserror::Error)]
pub enum RelayError<E> {
    /// Postgres failed.
    #[error(transparent)]
    Store(StoreError),
    /// The broker refused or lost the publish.
    #[error("republishing outbox rows: {0}")]
    Publish(E),
}

impl Store {
    /// Gives an outbox row (so the relay publishes it again) to every job of `queues` in the
    /// deployment `prefix` that is due since longer than `grace`, waiting for a worker
    /// (`queued` or `retrying`), and carried by nothing the database knows of. The caller
    /// has seen those queues empty in the broker (nothing ready, nothing in a delay tier), so
    /// such a job's message was lost: RabbitMQ 3.x can drop a message that a quorum delay tier
    /// is dead-lettering while the tier's leader dies. A job whose message was not lost after
    /// all gets a second one, which its claim settles as a duplicate.
    ///
    /// One worker of a deployment does it at a time (an advisory lock), and it looks at jobs
    /// created in the last 7 days, at most 10,000 per pass. Returns how many it gave a row.
    ///
    /// The scan of the queue's creation index also stops `grace` before now: under load the
    /// newest rows are the many, and a job created within `grace` is within its grace however
    /// it is due (a retry or a schedule only moves it later; one given a `run_at` already past
    /// is looked at once it is `grace` old). (Without that bound, at
    /// 5,000 jobs/s with a 30 s retention the statement read every live row of the queue and
    /// took 1.2 s.)
    pub async fn requeue_lost(
        &self,
        prefix: &str,
        queues: &[String],
        grace: Duration,
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool().begin().await.context("finding lost messages")?;
        let locked: bool = sqlx::query_scalar(
            "SELECT pg_try_advisory_xact_lock(hashtext('apiary lost messages ' || $1))",
        )
        .bind(prefix)
        .fetch_one(&mut *tx)
        .await
        .context("finding lost messages")?;
        if !locked {
            return Ok(0);
        }
        let done = sqlx::query(
            "INSERT INTO apiary_outbox (job_id, created_at)
             SELECT j.id, '-infinity' FROM apiary_jobs j
              WHERE j.created_at > now() - interval '7 days'
                AND j.created_at < now() - $3::interval
                AND j.prefix = $1 AND j.queue = ANY($2)
                AND j.status IN ('queued', 'retrying')
                AND coalesce(j.next_attempt_at, j.run_at, j.created_at) < now() - $3::interval
                AND NOT EXISTS (SELECT 1 FROM apiary_outbox o WHERE o.job_id = j.id)
              LIMIT 10000
             ON CONFLICT DO NOTHING",
        )
        .bind(prefix)
        .bind(queues)
        .bind(grace)
        .execute(&mut *tx)
        .await
        .context("finding lost messages")?;
        tx.commit().await.context("finding lost messages")?;
        Ok(done.rows_affected())
    }
}
