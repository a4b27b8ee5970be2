//! The invariants that make "kill anything, lose nothing, run nothing twice" true, stated in
//! one place, and a checker that tests and operators (`apiary status --check`) run against a
//! live database.
//!
//! 1. **Every unfinished job is carried.** A `queued` or `retrying` job has a message in the
//!    broker (work queue, a delay tier, or held unacked by a worker) or an outbox row that a
//!    relay will publish; a `running` job has a live lease, or a rescuer will find its lapsed
//!    one within [`RESCUE_WINDOW`] and put it back. Nothing else is needed for a job to reach
//!    a worker.
//! 2. **A finished job stays finished.** Its status never changes again, except by an
//!    operator's replay of a dead or failed job (a trigger refuses anything else).
//! 3. **Every dead job's letter is on its way or delivered**: an outbox row with its reason,
//!    or a letter in the dead-letter queue.
//! 4. **A record is consistent with its status**: attempts within the budget, a running job
//!    holds a claim, a finished one holds none, a retry knows when it is due.
//! 5. **One job per `(kind, dedup_key)` and per id** (unique indexes), and a delivery claims
//!    only the job it carries (the claim compares content), so no effect committed through
//!    `ctx.tx()` happens twice.
//!
//! 6. **A waiting job waits for something.** It has no outbox row (nothing publishes it),
//!    at least one of its parents has not succeeded, and its count of parents left matches
//!    them; a job cancelled by a parent names that parent, which ended without success.
//! 7. **A batch's callback is enqueued once its children are final**: a batch whose children
//!    are all final is done, and a completed batch has its callback job (or had: pruned).
//!
//! What can be checked from Postgres alone is checked always; the broker side of 1 and 3 is
//! checked by counts, which are exact only when nothing is in flight ([`Quiet::Quiescent`]).

use std::time::Duration;

use super::{Context, Store, StoreError};
use crate::job::JobId;

/// One broken invariant.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Violation {
    /// Which invariant (its number and short name, as in the module docs).
    pub invariant: &'static str,
    /// The job, when one job breaks it.
    pub job: Option<JobId>,
    /// What is wrong.
    pub detail: String,
}

/// What the caller knows about the broker.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quiet {
    /// Work may be in flight: only Postgres-side checks, and the dead-letter count.
    Live {
        /// Letters in the dead-letter queue, if read.
        dead_letters: Option<u64>,
    },
    /// Nothing is in flight: no worker holds a delivery, and these are every message of the
    /// deployment (work queue plus delay tiers, and the dead-letter queue).
    Quiescent {
        /// Messages in the work queue and the delay tiers.
        messages: u64,
        /// Letters in the dead-letter queue.
        dead_letters: u64,
    },
}

/// How long past its lease a running job may stay before its lapse counts as unrescued:
/// the slowest rescue pass, plus margin.
pub const RESCUE_WINDOW: Duration = Duration::from_secs(90);

#[derive(sqlx::FromRow)]
struct Bad {
    invariant: String,
    id: Option<uuid::Uuid>,
    detail: String,
}

impl Store {
    /// Checks the invariants. Returns every violation found (at most a few hundred rows of
    /// detail per invariant; counts say the rest).
    pub async fn check_invariants(&self, quiet: Quiet) -> Result<Vec<Violation>, StoreError> {
        let window_ms = i64::try_from(RESCUE_WINDOW.as_millis()).unwrap_or(i64::MAX);
        // With nothing in flight and no message anywhere, every unfinished job must be carried
        // by an outbox row (or a live lease): checked row by row.
        let quiescent = matches!(quiet, Quiet::Quiescent { messages: 0, .. });
        let rows: Vec<Bad> = sqlx::query_as(
            "(SELECT '1 carried' AS invariant, id,
                     'running, lease lapsed at ' || lease_until || ' and not rescued' AS detail
                FROM apiary_jobs
               WHERE status = 'running' AND lease_until < now() - $1 * interval '1 millisecond'
               LIMIT 200)
             UNION ALL
             (SELECT '1 carried', j.id, j.status || ' with no message and no outbox row'
                FROM apiary_jobs j
               WHERE $2 AND j.status IN ('queued', 'retrying')
                 AND NOT EXISTS (SELECT 1 FROM apiary_outbox o WHERE o.job_id = j.id)
               LIMIT 200)
             UNION ALL
             (SELECT '1 carried', j.id, 'running with no live lease and nothing in flight'
                FROM apiary_jobs j
               WHERE $2 AND j.status = 'running' AND j.lease_until < now()
               LIMIT 200)
             UNION ALL
             (SELECT '4 consistent', id, 'attempts ' || attempts || ' over the budget of ' || max_attempts
                FROM apiary_jobs WHERE attempts > max_attempts LIMIT 200)
             UNION ALL
             (SELECT '4 consistent', id, 'running without a started attempt'
                FROM apiary_jobs WHERE status = 'running' AND attempts < 1 LIMIT 200)
             UNION ALL
             (SELECT '4 consistent', id, status || ' but still holds a claim'
                FROM apiary_jobs WHERE finished_at IS NOT NULL AND (lease_until IS NOT NULL OR worker_id IS NOT NULL)
               LIMIT 200)
             UNION ALL
             (SELECT '4 consistent', id, status || ' but marked detached'
                FROM apiary_jobs WHERE detached AND status <> 'running' LIMIT 200)
             UNION ALL
             (SELECT '4 consistent', id, 'retrying with no due time'
                FROM apiary_jobs WHERE status = 'retrying' AND next_attempt_at IS NULL LIMIT 200)
             UNION ALL
             (SELECT '6 dependencies', j.id, 'waiting with an outbox row'
                FROM apiary_jobs j
               WHERE j.status = 'waiting' AND EXISTS (SELECT 1 FROM apiary_outbox o WHERE o.job_id = j.id)
               LIMIT 200)
             UNION ALL
             (SELECT '6 dependencies', j.id,
                     'waiting for ' || j.deps_left || ' parents, but ' || coalesce(p.open, 0) || ' have not succeeded'
                FROM apiary_jobs j
                LEFT JOIN LATERAL (SELECT count(*) AS open FROM apiary_job_deps d JOIN apiary_jobs pj ON pj.id = d.parent
                                    WHERE d.child = j.id AND pj.status <> 'succeeded') p ON true
               WHERE j.status = 'waiting' AND j.deps_left IS DISTINCT FROM p.open
               LIMIT 200)
             UNION ALL
             (SELECT '6 dependencies', j.id, 'cancelled by a parent that did not end so: ' || j.error
                FROM apiary_jobs j
               WHERE j.status = 'cancelled' AND j.deps_left IS NOT NULL AND j.error LIKE 'cancelled: parent job %'
                 AND NOT EXISTS (SELECT 1 FROM apiary_job_deps d JOIN apiary_jobs pj ON pj.id = d.parent
                                  WHERE d.child = j.id AND pj.finished_at IS NOT NULL AND pj.status <> 'succeeded'
                                    AND j.error LIKE '%' || pj.id || '%')
               LIMIT 200)
             UNION ALL
             (SELECT '7 batches', NULL, 'batch ' || b.id || ' is still running, but every child is final'
                FROM apiary_batches b
               WHERE b.finished_at IS NULL
                 AND NOT EXISTS (SELECT 1 FROM apiary_jobs c WHERE c.batch_id = b.id AND c.finished_at IS NULL)
                 AND EXISTS (SELECT 1 FROM apiary_jobs c WHERE c.batch_id = b.id)
               LIMIT 200)
             UNION ALL
             (SELECT '7 batches', b.callback_id, 'batch ' || b.id || ' completed without its callback job'
                FROM apiary_batches b
               WHERE b.status = 'completed'
                 AND NOT EXISTS (SELECT 1 FROM apiary_jobs c WHERE c.id = b.callback_id)
                 AND EXISTS (SELECT 1 FROM apiary_jobs c WHERE c.batch_id = b.id)
               LIMIT 200)
             UNION ALL
             (SELECT '2 final stays final', NULL, 'the trigger apiary_jobs_final_stays_final is missing'
               WHERE NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'apiary_jobs_final_stays_final'))",
        )
        .bind(window_ms)
        .bind(quiescent)
        .fetch_all(self.pool())
        .await
        .context("checking invariants")?;
        let mut out: Vec<Violation> = rows
            .into_iter()
            .map(|r| Violation {
                invariant: match r.invariant.as_str() {
                    "1 carried" => "1 carried",
                    "2 final stays final" => "2 final stays final",
                    "6 dependencies" => "6 dependencies",
                    "7 batches" => "7 batches",
                    _ => "4 consistent",
                },
                job: r.id,
                detail: r.detail,
            })
            .collect();

        // The broker side, by counts.
        let (unsent_letters, uncarried): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM apiary_jobs j WHERE j.status = 'dead'
                       AND NOT EXISTS (SELECT 1 FROM apiary_outbox o WHERE o.job_id = j.id AND o.dead_reason IS NOT NULL)),
                    (SELECT count(*) FROM apiary_jobs j WHERE j.status IN ('queued', 'retrying')
                       AND NOT EXISTS (SELECT 1 FROM apiary_outbox o WHERE o.job_id = j.id))",
        )
        .fetch_one(self.pool())
        .await
        .context("counting letters and messages")?;
        let dead_letters = match quiet {
            Quiet::Live { dead_letters } => dead_letters,
            Quiet::Quiescent { dead_letters, .. } => Some(dead_letters),
        };
        if let Some(letters) = dead_letters
            && u64::try_from(unsent_letters).unwrap_or(0) > letters
        {
            out.push(Violation {
                invariant: "3 dead lettered",
                job: None,
                detail: format!(
                    "{unsent_letters} dead jobs have no outbox row, but the dead-letter queue holds only {letters} letters"
                ),
            });
        }
        if let Quiet::Quiescent { messages, .. } = quiet
            && u64::try_from(uncarried).unwrap_or(0) > messages
        {
            out.push(Violation {
                invariant: "1 carried",
                job: None,
                detail: format!(
                    "{uncarried} unfinished jobs have no outbox row, but the broker holds only {messages} messages for them"
                ),
            });
        }
        Ok(out)
    }
}
