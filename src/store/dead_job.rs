//! Dead jobs: poison messages recorded as they arrive, and the records operators list and
//! replay.

use sqlx::types::Json;

use super::get_job::JOB_COLUMNS;
use super::{Context, Store, StoreError};
use crate::job::{Job, JobId};

impl Store {
    /// Records a message that is not a job: status `dead`, its reason, and its raw body (cut
    /// to `max_bytes`), with its dead letter queued in the outbox. Returns the id it is
    /// recorded under, whose letter the caller sends: normally `id`; if `id` already belongs
    /// to another job, an id derived from the message ([`crate::wire::conflict_id`]), so the
    /// job that owns `id` is left alone and this message is still recorded and dead-lettered.
    /// A redelivery of the same poison message finds its own record and adds nothing.
    pub async fn record_poison(
        &self,
        id: JobId,
        kind: Option<&str>,
        route: (&str, &str),
        body: &[u8],
        reason: &str,
        max_bytes: usize,
    ) -> Result<JobId, StoreError> {
        let raw = String::from_utf8_lossy(&body[..body.len().min(max_bytes)]).into_owned();
        let raw = super::storable_text(&raw).into_owned();
        let reason = super::clip_error(reason);
        if self
            .record_dead_message(id, kind, route, &raw, &reason)
            .await?
        {
            return Ok(id);
        }
        let same: Option<bool> = sqlx::query_scalar(
            "SELECT raw_body IS NOT DISTINCT FROM $2 FROM apiary_jobs WHERE id = $1",
        )
        .bind(id)
        .bind(&raw)
        .fetch_optional(self.pool())
        .await
        .context("reading a poison message's record")?;
        if same != Some(false) {
            // This very message again (or its record was pruned this instant): nothing to add.
            return Ok(id);
        }
        let other = crate::wire::conflict_id(id, body);
        let reason = super::clip_error(&format!(
            "{reason} (its id {id} belongs to another job, which this message did not touch)"
        ));
        self.record_dead_message(other, kind, route, &raw, &reason)
            .await?;
        Ok(other)
    }

    /// Looks at messages that are not due yet before they hop to the next delay tier: records
    /// raw-published ones (so they are visible while they wait, with the budget given), and
    /// says for each whether it should hop on at all. A cancelled or finished job's message
    /// stops here instead of hopping until it is due, and a pruned job's message is never
    /// recorded again.
    pub async fn check_waiting(
        &self,
        inputs: &[crate::store::claim_job::ClaimInput<'_>],
    ) -> Result<Vec<Waiting>, StoreError> {
        let ids: Vec<uuid::Uuid> = inputs.iter().map(|i| i.job.id).collect();
        let kinds: Vec<&str> = inputs.iter().map(|i| i.job.kind.as_str()).collect();
        let payloads: Vec<&str> = inputs.iter().map(|i| i.job.payload.get()).collect();
        let keys: Vec<Option<&str>> = inputs.iter().map(|i| i.job.dedup_key.as_deref()).collect();
        let budgets: Vec<i32> = inputs.iter().map(|i| i.budget).collect();
        let recorded: Vec<bool> = inputs.iter().map(|i| i.recorded).collect();
        let run_ats: Vec<Option<chrono::DateTime<chrono::Utc>>> =
            inputs.iter().map(|i| i.job.run_at).collect();
        let routing = crate::store::claim_job::Routing::of(inputs);
        #[allow(clippy::type_complexity)]
        let rows: Vec<(i64, Option<String>, Option<bool>, bool)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "WITH input AS (
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::bool[],
                                      $7::timestamptz[], $8::text[], $9::text[], $10::int2[], $11::text[])
                     WITH ORDINALITY AS t(id, kind, payload, dedup_key, max_attempts, recorded, run_at,
                                          queue, prefix, priority, concurrency_key, ord)
             ), ins AS (
                 INSERT INTO apiary_jobs (id, kind, payload, dedup_key, max_attempts, run_at, queue, prefix,
                                          priority, concurrency_key)
                 SELECT id, kind, payload::json, dedup_key, max_attempts, run_at, queue, prefix, priority,
                        concurrency_key FROM input i
                  WHERE NOT i.recorded AND NOT EXISTS (SELECT 1 FROM apiary_jobs j WHERE j.id = i.id)
                 ON CONFLICT DO NOTHING
                 RETURNING id
             )
             SELECT i.ord, j.status, {same},
                    EXISTS (SELECT 1 FROM ins WHERE ins.id = i.id)
               FROM input i LEFT JOIN apiary_jobs j ON j.id = i.id
              ORDER BY i.ord",
            same = crate::store::claim_job::same_job("j", "i")
        )))
        .bind(&ids)
        .bind(&kinds)
        .bind(&payloads)
        .bind(&keys)
        .bind(&budgets)
        .bind(&recorded)
        .bind(&run_ats)
        .bind(&routing.queues)
        .bind(&routing.prefixes)
        .bind(&routing.priorities)
        .bind(&routing.concurrency_keys)
        .fetch_all(self.pool())
        .await
        .context("checking waiting jobs")?;
        let mut out = Vec::with_capacity(inputs.len());
        for (input, (_, status, same, inserted)) in inputs.iter().zip(rows) {
            let w = match (status, inserted) {
                (_, true) => Waiting::Hop,
                (None, false) if input.recorded => Waiting::Gone,
                // The insert hit the dedup index: another job owns the key.
                (None, false) if input.job.dedup_key.is_some() => {
                    match self.record_duplicate(input.job).await? {
                        Some(of) => Waiting::Duplicate(of),
                        None => Waiting::Hop,
                    }
                }
                (None, false) => Waiting::Hop,
                (Some(_), false) if same != Some(true) => Waiting::Conflict,
                (Some(s), false) => match s.parse::<crate::job::JobStatus>() {
                    Ok(st) if st.is_final() => Waiting::Finished,
                    _ => Waiting::Hop,
                },
            };
            out.push(w);
        }
        Ok(out)
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

/// What to do with a message that is not due yet.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// Send it on to the next delay tier.
    Hop,
    /// Its job has finished (cancelled while it waited, say): ack it, it will never run.
    Finished,
    /// Its job was recorded once and pruned since: ack it unrun.
    Gone,
    /// A raw message repeating another job's key: recorded as a duplicate of this job.
    Duplicate(JobId),
    /// Its id belongs to a job with other content: claim it now, which records the conflict.
    Conflict,
}

/// Which dead jobs to replay.
///
/// See the crate's [guarantees](crate#guarantees).
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
        #[derive(sqlx::FromRow)]
        struct Replayed {
            id: uuid::Uuid,
            kind: String,
            payload: Json<Box<serde_json::value::RawValue>>,
            dedup_key: Option<String>,
            max_attempts: i32,
            queue: String,
            prefix: Option<String>,
            priority: i16,
            concurrency_key: Option<String>,
            callback_url: Option<String>,
        }
        let rows: Vec<Replayed> = sqlx::query_as(
            "WITH replayed AS (
                 UPDATE apiary_jobs
                    SET status = 'queued', attempts = 0, result = NULL, finished_at = NULL, started_at = NULL,
                        next_attempt_at = NULL, run_at = NULL, cancel_requested = false
                  WHERE status IN ('dead', 'failed') AND raw_body IS NULL
                    AND ($3 OR id = $1 OR kind = $2)
                 RETURNING id, kind, payload, dedup_key, max_attempts, queue, prefix, priority,
                           concurrency_key, callback_url
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
            .map(|r| crate::wire::WireJob {
                id: r.id,
                kind: r.kind,
                payload: r.payload.0,
                dedup_key: r.dedup_key,
                max_attempts: Some(r.max_attempts),
                run_at: None,
                queue: Some(r.queue),
                priority: u8::try_from(r.priority).ok(),
                concurrency_key: r.concurrency_key,
                prefix: r.prefix,
                callback_url: r.callback_url,
            })
            .collect())
    }
}

/// The advisory lock a dead-letter sweep holds, so two sweepers never sweep at once (a
/// second one would find every letter held by the first and remove nothing anyway).
pub const DEAD_SWEEP_LOCK: i64 = 0x6170_6961_7279_0d5e; // "apiary" + sweep

/// A sweep in progress: holds [`DEAD_SWEEP_LOCK`] in its transaction until
/// [`DeadSweep::finish`] commits or the value is dropped (which rolls back and releases it).
///
/// See the crate's [guarantees](crate#guarantees).
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
    ///
    /// Only jobs of `queue` (or pruned ones): a pass over one queue's dead letters says
    /// nothing of another's.
    pub async fn not_dead(&mut self, ids: &[JobId], queue: &str) -> Result<Vec<JobId>, StoreError> {
        sqlx::query_scalar(
            "SELECT q.id FROM unnest($1::uuid[]) AS q(id)
               LEFT JOIN apiary_jobs j ON j.id = q.id
              WHERE j.status IS DISTINCT FROM 'dead' AND (j.queue IS NULL OR j.queue = $2)",
        )
        .bind(ids)
        .bind(queue)
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
