//! ④ Claiming jobs for a batch of deliveries: the one place that decides whether a delivery
//! runs. A claim is a guarded statement: only a job that is queued, retrying, or running under
//! an expired lease becomes `running` under this worker's id, so a second delivery of the same
//! job, at any moment and on any worker, claims nothing.
//!
//! A delivery claims a job only if it *is* that job: same kind, dedup key and payload as the
//! record. A message that reuses a recorded id for other content is recorded on its own as a
//! conflict (dead, with its reason), never run as, or acked as, the recorded job.
//!
//! Every delivery that claims nothing gets a definite answer ([`Claim`]): finished, busy
//! elsewhere, not due, out of attempts, cancelled, gone (pruned), a duplicate, a conflict. Only
//! a race that has already resolved answers [`Claim::Again`].

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Context, DONE_CHANNEL, Store, StoreError};
use crate::job::{JobId, JobStatus};
use crate::wire::WireJob;

/// How early a job may start before its due time: the delay queues' finest tier. A job that
/// arrives within this margin of its due time runs rather than waiting another round.
pub const DUE_TOLERANCE_MS: i64 = 100;

/// The one definition of "this message is that job", as SQL over the job row `row` and the
/// message `msg` (each with columns `kind`, `dedup_key`, `payload`): the same kind, dedup key
/// and payload text, and the row is not a poison record. Every statement that matches a
/// message or a request to a recorded job uses it.
pub(crate) fn same_job(row: &str, msg: &str) -> String {
    format!(
        "({row}.kind = {msg}.kind AND {row}.dedup_key IS NOT DISTINCT FROM {msg}.dedup_key \
         AND {row}.payload::text = {msg}.payload AND {row}.raw_body IS NULL)"
    )
}

/// One delivery to claim.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy)]
pub struct ClaimInput<'a> {
    /// The job the message carries.
    pub job: &'a WireJob,
    /// The attempt budget to record if the job was published raw and is new.
    pub budget: i32,
    /// Whether the message says Apiary published it for a recorded job
    /// ([`crate::wire::RECORDED_HEADER`]): then a missing row means the job was pruned, and it
    /// is never recorded again.
    pub recorded: bool,
    /// The deployment (`APIARY_QUEUE`) of the worker that received it: recorded with a raw
    /// job, so its later messages route to this deployment's queues.
    pub prefix: &'a str,
}

/// The routing columns of a batch of inputs, for the statements that record raw messages.
pub(crate) struct Routing<'a> {
    pub(crate) queues: Vec<&'a str>,
    pub(crate) prefixes: Vec<&'a str>,
    pub(crate) priorities: Vec<i16>,
    pub(crate) concurrency_keys: Vec<Option<&'a str>>,
}

impl<'a> Routing<'a> {
    pub(crate) fn of(inputs: &[ClaimInput<'a>]) -> Routing<'a> {
        Routing {
            queues: inputs.iter().map(|i| i.job.queue_name()).collect(),
            prefixes: inputs.iter().map(|i| i.prefix).collect(),
            priorities: inputs
                .iter()
                .map(|i| i16::from(i.job.priority.unwrap_or(0)))
                .collect(),
            concurrency_keys: inputs
                .iter()
                .map(|i| i.job.concurrency_key.as_deref())
                .collect(),
        }
    }
}

/// What a claim found for one delivery.
///
/// See the crate's [guarantees](crate#guarantees).
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
    /// A live claim holds the job.
    Busy {
        /// Until when the holder's lease runs.
        until: DateTime<Utc>,
        /// The holder.
        worker: Uuid,
        /// The holder's attempt.
        attempt: i32,
        /// The job's attempt budget.
        max_attempts: i32,
    },
    /// Not due yet, by Postgres's clock: wait this many milliseconds in a delay queue.
    NotDue {
        /// Milliseconds until the job is due.
        remaining_ms: i64,
    },
    /// No attempts left (the last one was lost with its worker, or none remain): the job is
    /// now dead, and its dead letter is queued in the outbox.
    Exhausted,
    /// The job was cancelled before it could run again: it is now `cancelled`.
    Cancelled,
    /// The message was published for a recorded job whose row is gone: the job finished and
    /// was pruned. Ack it unrun; recording it again would run a finished job a second time.
    Gone,
    /// The message's id belongs to a job with other content. The message was recorded on its
    /// own under this id, dead with the reason, and its dead letter queued in the outbox.
    Conflict(JobId),
    /// The claim lost a race that has already resolved: claim again now.
    Again,
}

/// The claims of a batch, in input order, and Postgres's clock when they were made.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone)]
pub struct Claims {
    /// One per input.
    pub claims: Vec<Claim>,
    /// `now()` in Postgres, for workers to judge due times by the store's clock, not theirs.
    pub db_now: Option<DateTime<Utc>>,
}

/// One job the claim statement took: its id, the attempt it starts, its budget, and
/// Postgres's `now()`.
pub(crate) type Claimed = (Uuid, i32, i32, DateTime<Utc>);

/// Postgres's view of one delivery that claimed nothing.
#[derive(sqlx::FromRow)]
struct Unclaimed {
    ord: i64,
    status: Option<String>,
    attempts: Option<i32>,
    max_attempts: Option<i32>,
    lease_until: Option<DateTime<Utc>>,
    worker_id: Option<Uuid>,
    due: Option<DateTime<Utc>>,
    cancel_requested: Option<bool>,
    same: Option<bool>,
    poison: Option<bool>,
    recorded_kind: Option<String>,
    now: DateTime<Utc>,
}

impl Store {
    /// Claims the jobs of a batch of deliveries for `worker`, for `lease`. Returns one
    /// [`Claim`] per input, in order. Jobs published raw, never recorded, are recorded here
    /// with their input's budget.
    pub async fn claim_jobs(
        &self,
        inputs: &[ClaimInput<'_>],
        worker: Uuid,
        lease: std::time::Duration,
    ) -> Result<Claims, StoreError> {
        let claimed = claim_statement(self.pool(), inputs, worker, lease).await?;
        self.resolve_claims(inputs, claimed).await
    }

    /// Turns what the claim statement took into one [`Claim`] per input, explaining the
    /// inputs it did not take.
    pub(crate) async fn resolve_claims(
        &self,
        inputs: &[ClaimInput<'_>],
        claimed: Vec<Claimed>,
    ) -> Result<Claims, StoreError> {
        let mut db_now = claimed.first().map(|c| c.3);
        let by_id: std::collections::HashMap<Uuid, (i32, i32)> = claimed
            .into_iter()
            .map(|(id, a, m, _)| (id, (a, m)))
            .collect();
        let mut out: Vec<Option<Claim>> = Vec::with_capacity(inputs.len());
        let mut taken = std::collections::HashSet::with_capacity(by_id.len());
        let mut unclaimed = Vec::new();
        for (pos, input) in inputs.iter().enumerate() {
            // A batch may hold two deliveries of one job; only the first runs.
            match by_id.get(&input.job.id) {
                Some(&(attempt, max_attempts)) if taken.insert(input.job.id) => {
                    out.push(Some(Claim::Claimed {
                        attempt,
                        max_attempts,
                    }))
                }
                _ => {
                    out.push(None);
                    unclaimed.push(pos);
                }
            }
        }
        if !unclaimed.is_empty() {
            let rest: Vec<ClaimInput<'_>> = unclaimed.iter().map(|&p| inputs[p]).collect();
            let (explained, now) = self.explain_unclaimed(&rest).await?;
            db_now = db_now.or(Some(now));
            for (pos, claim) in unclaimed.into_iter().zip(explained) {
                out[pos] = Some(claim);
            }
        }
        Ok(Claims {
            claims: out.into_iter().map(|c| c.unwrap_or(Claim::Again)).collect(),
            db_now,
        })
    }

    /// Works out why deliveries claimed nothing, and settles what can be settled here. Rare:
    /// redeliveries, duplicates, conflicts and races.
    async fn explain_unclaimed(
        &self,
        inputs: &[ClaimInput<'_>],
    ) -> Result<(Vec<Claim>, DateTime<Utc>), StoreError> {
        let ids: Vec<Uuid> = inputs.iter().map(|i| i.job.id).collect();
        let kinds: Vec<&str> = inputs.iter().map(|i| i.job.kind.as_str()).collect();
        let payloads: Vec<&str> = inputs.iter().map(|i| i.job.payload.get()).collect();
        let keys: Vec<Option<&str>> = inputs.iter().map(|i| i.job.dedup_key.as_deref()).collect();
        let rows: Vec<Unclaimed> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT i.ord, j.status, j.attempts, j.max_attempts, j.lease_until, j.worker_id,
                    coalesce(j.next_attempt_at, j.run_at) AS due, j.cancel_requested,
                    {same} AS same,
                    j.raw_body IS NOT NULL AS poison, j.kind AS recorded_kind, now() AS now
               FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[])
                        WITH ORDINALITY AS i(id, kind, payload, dedup_key, ord)
               LEFT JOIN apiary_jobs j ON j.id = i.id
              ORDER BY i.ord",
            same = same_job("j", "i")
        )))
        .bind(&ids)
        .bind(&kinds)
        .bind(&payloads)
        .bind(&keys)
        .fetch_all(self.pool())
        .await
        .context("reading unclaimed jobs")?;
        let now = rows.first().map(|r| r.now).unwrap_or_else(Utc::now);
        let mut out = Vec::with_capacity(inputs.len());
        for (input, row) in inputs.iter().zip(rows) {
            debug_assert_eq!(usize::try_from(row.ord).ok(), Some(out.len() + 1));
            out.push(self.settle_unclaimed(input, row).await?);
        }
        Ok((out, now))
    }

    async fn settle_unclaimed(
        &self,
        input: &ClaimInput<'_>,
        row: Unclaimed,
    ) -> Result<Claim, StoreError> {
        let job = input.job;
        let Some(status) = row.status.as_deref() else {
            if input.recorded {
                return Ok(Claim::Gone);
            }
            // No row with this id: the INSERT hit the dedup index (or raced a prune). Record
            // this message as a duplicate of the job that owns the key.
            if job.dedup_key.is_none() {
                return Ok(Claim::Again);
            }
            return Ok(match self.record_duplicate(job).await? {
                Some(of) => Claim::Duplicate(of),
                // Lost a race with a concurrent delivery of this same message, or the original
                // was just pruned: look again rather than guess.
                None => Claim::Again,
            });
        };
        if row.same != Some(true) {
            let what = if row.poison == Some(true) {
                format!("a poison record ({} was not a job)", job.id)
            } else {
                format!(
                    "a job of kind {:?} with another dedup key or payload",
                    row.recorded_kind.unwrap_or_default()
                )
            };
            let reason = format!(
                "conflict: this message's id {} already belongs to {what}; the message was not run. \
                 Publish it with a new id (or with none, and Apiary derives one)",
                job.id
            );
            let id = self.record_conflict(job, input.prefix, &reason).await?;
            return Ok(Claim::Conflict(id));
        }
        let status: JobStatus = status.parse().unwrap_or(JobStatus::Running);
        // A waiting job runs only once released, and its release publishes a message of its
        // own (through the outbox): this one (a raw producer's, say) is acked unrun.
        if status.is_final() || status == JobStatus::Waiting {
            return Ok(Claim::Finished);
        }
        let attempts = row.attempts.unwrap_or(0);
        let max_attempts = row.max_attempts.unwrap_or(1);
        let cancel_requested = row.cancel_requested.unwrap_or(false);
        match status {
            JobStatus::Running => {
                let until = row.lease_until.unwrap_or(row.now);
                if until >= row.now {
                    return Ok(Claim::Busy {
                        until,
                        worker: row.worker_id.unwrap_or_default(),
                        attempt: attempts,
                        max_attempts,
                    });
                }
                // The lease lapsed: its worker died or stalled. Whatever it does next is fenced
                // out by the attempt number. Settle the states no claim can take over.
                if cancel_requested {
                    return self
                        .finish_lapsed(job.id, attempts, "cancelled", None)
                        .await;
                }
                if attempts >= max_attempts {
                    let reason = format!(
                        "attempt {attempts} of {max_attempts} was lost: its worker stopped without finishing it (lease expired)"
                    );
                    return self
                        .finish_lapsed(job.id, attempts, "dead", Some(&reason))
                        .await;
                }
                // Expired between the two statements: try again now.
                Ok(Claim::Again)
            }
            _ => {
                if cancel_requested {
                    return Ok(if self.finish_unstarted(job.id, "cancelled", None).await? {
                        Claim::Cancelled
                    } else {
                        Claim::Again
                    });
                }
                if let Some(due) = row.due {
                    let remaining = (due - row.now).num_milliseconds();
                    if remaining > DUE_TOLERANCE_MS {
                        return Ok(Claim::NotDue {
                            remaining_ms: remaining,
                        });
                    }
                }
                if attempts >= max_attempts {
                    return Ok(
                        if self
                            .finish_unstarted(job.id, "dead", Some("no attempts left"))
                            .await?
                        {
                            Claim::Exhausted
                        } else {
                            Claim::Again
                        },
                    );
                }
                Ok(Claim::Again)
            }
        }
    }

    /// Records a raw message that repeats another job's `(kind, dedup_key)` as a duplicate of
    /// it. Returns the owner, or `None` if no job owns the key now.
    pub(crate) async fn record_duplicate(
        &self,
        job: &WireJob,
    ) -> Result<Option<JobId>, StoreError> {
        sqlx::query_scalar(
            "WITH dup AS (
                 INSERT INTO apiary_jobs (id, kind, payload, dedup_key, max_attempts, status, duplicate_of, finished_at,
                                          queue, priority, concurrency_key)
                 SELECT $1, $2, $3::json, $4, $5, 'duplicate', o.id, now(), $7, $8, $9
                   FROM apiary_jobs o
                  WHERE o.kind = $2 AND o.dedup_key = $4 AND o.duplicate_of IS NULL
                 ON CONFLICT DO NOTHING
                 RETURNING id, duplicate_of
             )
             SELECT duplicate_of FROM dup, LATERAL (SELECT pg_notify($6, dup.id::text)) n",
        )
        .bind(job.id)
        .bind(&job.kind)
        .bind(job.payload.get())
        .bind(&job.dedup_key)
        .bind(job.max_attempts.unwrap_or(1))
        .bind(DONE_CHANNEL)
        .bind(job.queue_name())
        .bind(i16::from(job.priority.unwrap_or(0)))
        .bind(&job.concurrency_key)
        .fetch_optional(self.pool())
        .await
        .context("recording a duplicate")
    }

    /// Records a message whose id belongs to a different job, under an id of its own derived
    /// from it: dead, with `reason`, its content kept in `raw_body` (so it is not replayable:
    /// it is not the job it claims to be). Returns that id; its dead letter is queued.
    async fn record_conflict(
        &self,
        job: &WireJob,
        prefix: &str,
        reason: &str,
    ) -> Result<JobId, StoreError> {
        let body = job.to_body();
        let id = crate::wire::conflict_id(job.id, &body);
        let raw = String::from_utf8_lossy(&body).into_owned();
        let route = (job.queue_name(), prefix);
        self.record_dead_message(id, Some(&job.kind), route, &raw, reason)
            .await?;
        Ok(id)
    }

    /// Inserts a dead record for a message that is not a runnable job (poison or conflict),
    /// with its raw text and reason. An existing row with this id is left alone. Returns
    /// whether a row was inserted.
    pub(crate) async fn record_dead_message(
        &self,
        id: JobId,
        kind: Option<&str>,
        (queue, prefix): (&str, &str),
        raw: &str,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let inserted: Option<Uuid> = sqlx::query_scalar(
            "WITH ins AS (
                 INSERT INTO apiary_jobs (id, kind, payload, max_attempts, status, attempts, error, errors,
                                          raw_body, finished_at, queue, prefix)
                 VALUES ($1, $2, 'null', 1, 'dead', 0, $3,
                         jsonb_build_array(jsonb_build_object('attempt', 0, 'error', $3::text, 'at', now())),
                         $4, now(), $6, $7)
                 ON CONFLICT DO NOTHING
                 RETURNING id
             )
             SELECT id FROM ins, LATERAL (SELECT pg_notify($5, ins.id::text)) n",
        )
        .bind(id)
        .bind(kind.unwrap_or(""))
        .bind(crate::store::storable_text(reason))
        .bind(crate::store::storable_text(raw))
        .bind(DONE_CHANNEL)
        .bind(queue)
        .bind(prefix)
        .fetch_optional(self.pool())
        .await
        .context("recording a dead message")?;
        Ok(inserted.is_some())
    }

    /// Ends a job that is not running (cancelled or out of attempts) and announces it. Returns
    /// false if it was no longer queued or retrying.
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
             SELECT id FROM done, LATERAL (SELECT pg_notify($4, done.id::text)) n",
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

    /// Ends a job whose lease on `attempt` lapsed and that no claim may take over (cancelled,
    /// or its last attempt): `status` is `cancelled` or `dead`. Fenced by the attempt, so a
    /// worker that took the job over meanwhile is not touched.
    async fn finish_lapsed(
        &self,
        id: JobId,
        attempt: i32,
        status: &'static str,
        reason: Option<&str>,
    ) -> Result<Claim, StoreError> {
        let done: Option<Uuid> = sqlx::query_scalar(
            "WITH done AS (
                 UPDATE apiary_jobs
                    SET status = $3, error = coalesce($4, error), finished_at = now(),
                        lease_until = NULL, worker_id = NULL, detached = false,
                        errors = CASE WHEN $4::text IS NULL THEN errors
                                      ELSE errors || jsonb_build_array(jsonb_build_object(
                                          'attempt', attempts, 'error', $4::text, 'at', now())) END
                  WHERE id = $1 AND attempts = $2 AND status = 'running' AND lease_until < now()
                 RETURNING id
             )
             SELECT id FROM done, LATERAL (SELECT pg_notify($5, done.id::text)) n",
        )
        .bind(id)
        .bind(attempt)
        .bind(status)
        .bind(reason)
        .bind(DONE_CHANNEL)
        .fetch_optional(self.pool())
        .await
        .context("ending a job whose lease lapsed")?;
        Ok(match (done, status) {
            (None, _) => Claim::Again,
            (Some(_), "cancelled") => Claim::Cancelled,
            (Some(_), _) => Claim::Exhausted,
        })
    }
}

/// The claim statement itself, on `executor`: the pool, or the transaction of a limited
/// claim (whose starts must commit with it). Returns `(id, attempt, max_attempts, now())` of
/// each job it took.
pub(crate) async fn claim_statement<'c, E: sqlx::PgExecutor<'c>>(
    executor: E,
    inputs: &[ClaimInput<'_>],
    worker: Uuid,
    lease: std::time::Duration,
) -> Result<Vec<Claimed>, StoreError> {
    let ids: Vec<Uuid> = inputs.iter().map(|i| i.job.id).collect();
    let kinds: Vec<&str> = inputs.iter().map(|i| i.job.kind.as_str()).collect();
    let payloads: Vec<&str> = inputs.iter().map(|i| i.job.payload.get()).collect();
    let keys: Vec<Option<&str>> = inputs.iter().map(|i| i.job.dedup_key.as_deref()).collect();
    let budgets: Vec<i32> = inputs.iter().map(|i| i.budget).collect();
    let recorded: Vec<bool> = inputs.iter().map(|i| i.recorded).collect();
    let routing = Routing::of(inputs);
    let callbacks: Vec<Option<&str>> = inputs
        .iter()
        .map(|i| i.job.callback_url.as_deref())
        .collect();
    let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);

    // The UPDATE takes existing jobs that may run now; its WHERE is the guard. Under READ
    // COMMITTED a concurrent claim of the same row waits for the other transaction and then
    // re-checks the WHERE against the new version, which is `running`: it claims nothing.
    // The content test makes a message claim only the job it really is. The INSERT
    // records jobs never seen before (published raw); ON CONFLICT DO NOTHING makes a racing
    // insert, or a dedup key that is already taken, claim nothing. A message Apiary
    // published for a recorded job is never inserted: if its row is gone, it was pruned.
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "WITH input AS (
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::bool[],
                                      $10::text[], $11::text[], $12::int2[], $13::text[], $14::text[])
                     AS t(id, kind, payload, dedup_key, max_attempts, recorded, queue, prefix, priority,
                          concurrency_key, callback_url)
             ), upd AS (
                 UPDATE apiary_jobs j
                    SET status = 'running', attempts = j.attempts + 1, started_at = now(),
                        lease_until = now() + $8 * interval '1 millisecond', worker_id = $7,
                        next_attempt_at = NULL, detached = false,
                        progress = NULL, progress_detail = NULL, progress_at = NULL
                   FROM input i
                  WHERE j.id = i.id AND {same}
                    AND NOT j.cancel_requested
                    AND j.attempts < j.max_attempts
                    AND (j.status IN ('queued', 'retrying')
                         OR (j.status = 'running' AND j.lease_until < now()))
                    AND coalesce(j.next_attempt_at, j.run_at, '-infinity') <= now() + $9 * interval '1 millisecond'
                 RETURNING j.id, j.attempts, j.max_attempts
             ), ins AS (
                 INSERT INTO apiary_jobs (id, kind, payload, dedup_key, max_attempts, status, attempts,
                                          started_at, lease_until, worker_id, queue, prefix, priority,
                                          concurrency_key, callback_url)
                 SELECT i.id, i.kind, i.payload::json, i.dedup_key, i.max_attempts, 'running', 1,
                        now(), now() + $8 * interval '1 millisecond', $7, i.queue, i.prefix, i.priority,
                        i.concurrency_key, i.callback_url
                   FROM input i
                  WHERE NOT i.recorded AND NOT EXISTS (SELECT 1 FROM apiary_jobs j WHERE j.id = i.id)
                 ON CONFLICT DO NOTHING
                 RETURNING id, attempts, max_attempts
             )
             SELECT c.id, c.attempts, c.max_attempts, now()
               FROM (SELECT * FROM upd UNION ALL SELECT * FROM ins) c",
            same = same_job("j", "i")
        )))
        .bind(&ids)
        .bind(&kinds)
        .bind(&payloads)
        .bind(&keys)
        .bind(&budgets)
        .bind(&recorded)
        .bind(worker)
        .bind(lease_ms)
        .bind(DUE_TOLERANCE_MS)
        .bind(&routing.queues)
        .bind(&routing.prefixes)
        .bind(&routing.priorities)
        .bind(&routing.concurrency_keys)
        .bind(&callbacks)
        .fetch_all(executor)
        .await
        .context("claiming jobs")
}
