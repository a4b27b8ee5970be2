//! Retention: finished jobs older than their kind's retention are deleted by whichever worker
//! holds the pruning advisory lock, so pruning never runs twice at once and needs no cron. A
//! job's dedup key goes with it.
//!
//! Pruning must keep up with the rate jobs finish at, or the table grows until every other
//! statement slows down. So [`Store::prune_step`] deletes in large batches (one statement,
//! one short transaction each) and goes on while batches come back full, for at most a time
//! budget, then tells its caller whether there is more; [`Store::keep_pruned`] is the loop a
//! worker runs in a task of its own: again at once while there is more, a pause once caught up.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::{Context, Store, StoreError};

/// The advisory lock key that elects the pruner ("apiary" in ASCII).
const PRUNE_LOCK: i64 = 0x61_70_69_61_72_79;

/// Rows one statement deletes, at most: big enough that a statement's fixed costs (a
/// transaction, the lock, the plan, a commit's fsync) are small against its rows; small
/// enough that its row locks and WAL stay modest and it takes well under a second.
pub const PRUNE_BATCH: i64 = 5_000;

/// How long one [`Store::prune_step`] goes on before returning, so that its caller can check
/// for shutdown: statements already started finish, so a call may run one batch longer.
pub const PRUNE_BUDGET: Duration = Duration::from_secs(2);

/// What one [`Store::prune_step`] did.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Jobs deleted.
    pub deleted: u64,
    /// The time budget ran out while batches still came back full: call again at once
    /// rather than after a pause.
    pub more: bool,
}

/// One retention rule being applied: the default (every kind without its own), or one kind.
struct Pass<'a> {
    kind: Option<&'a str>,
    keep_ms: i64,
    /// Every job of this pass created before this instant has been deleted or skipped in this
    /// call: the next statement starts its index scan here instead of at the oldest row, so a
    /// run of rows that must stay (unfinished, or kept longer by their kind) is read once per
    /// call, not once per batch.
    from: DateTime<Utc>,
    done: bool,
}

impl<'a> Pass<'a> {
    fn all(retention: Duration, overrides: &'a [(String, Duration)]) -> Vec<Pass<'a>> {
        std::iter::once((None, retention))
            .chain(overrides.iter().map(|(k, d)| (Some(k.as_str()), *d)))
            .map(|(kind, keep)| Pass {
                kind,
                keep_ms: i64::try_from(keep.as_millis()).unwrap_or(i64::MAX),
                from: DateTime::UNIX_EPOCH,
                done: false,
            })
            .collect()
    }
}

/// The jobs a pass keeps although they are past retention, because they will still be read: a
/// parent while a child waits on it, and a batch's child until the batch's callback has
/// finished. An SQL condition on `apiary_jobs`.
const STILL_READ: &str = "NOT (has_dependents AND EXISTS (
        SELECT 1 FROM apiary_job_deps d JOIN apiary_jobs c ON c.id = d.child
         WHERE d.parent = apiary_jobs.id AND c.status = 'waiting'))
    AND (batch_id IS NULL OR NOT EXISTS (
        SELECT 1 FROM apiary_batches b LEFT JOIN apiary_jobs cb ON cb.id = b.callback_id
         WHERE b.id = apiary_jobs.batch_id
           AND (b.finished_at IS NULL
                OR (b.status = 'completed' AND cb.id IS NOT NULL AND cb.finished_at IS NULL))))";

impl Store {
    /// Deletes finished jobs past their retention (`retention`, or for the kinds in
    /// `overrides` their own), `batch` rows per statement, oldest first, until none are left
    /// or `budget` has passed. The kinds take turns, one batch each, so a large backlog of one
    /// does not hold back the others.
    ///
    /// Returns `None` if another process holds the pruning lock and this call deleted
    /// nothing; otherwise how many it deleted and whether there is more.
    pub async fn prune_step(
        &self,
        retention: Duration,
        overrides: &[(String, Duration)],
        batch: i64,
        budget: Duration,
    ) -> Result<Option<Pruned>, StoreError> {
        let started = std::time::Instant::now();
        let special: Vec<&str> = overrides.iter().map(|(k, _)| k.as_str()).collect();
        let mut passes = Pass::all(retention, overrides);
        let mut deleted = 0;
        while passes.iter().any(|p| !p.done) {
            for pass in passes.iter_mut().filter(|p| !p.done) {
                if started.elapsed() >= budget {
                    return Ok(Some(Pruned {
                        deleted,
                        more: true,
                    }));
                }
                let Some(n) = self.delete_batch(pass, &special, batch).await? else {
                    // Another pruner took over between two of our transactions: it goes on.
                    return Ok((deleted > 0).then_some(Pruned {
                        deleted,
                        more: false,
                    }));
                };
                deleted += n;
                pass.done = n < u64::try_from(batch).unwrap_or(0);
            }
        }
        Ok(Some(Pruned {
            deleted,
            more: false,
        }))
    }

    /// Deletes finished jobs older than `retention` (kinds in `overrides` use their own), at
    /// most `batch` per transaction, until none are left or `max_batches` ran for each rule.
    /// Returns `None` if another process holds the pruning lock, else how many jobs were
    /// deleted.
    ///
    /// The bounded form, kept for callers that prune from a shared loop; a pruner task of its
    /// own should use [`Store::keep_pruned`] (or [`Store::prune_step`]), which keeps up with
    /// any rate.
    pub async fn prune(
        &self,
        retention: Duration,
        overrides: &[(String, Duration)],
        batch: i64,
        max_batches: usize,
    ) -> Result<Option<u64>, StoreError> {
        let special: Vec<&str> = overrides.iter().map(|(k, _)| k.as_str()).collect();
        let mut total = 0;
        for mut pass in Pass::all(retention, overrides) {
            for _ in 0..max_batches {
                let Some(n) = self.delete_batch(&mut pass, &special, batch).await? else {
                    return Ok(None);
                };
                total += n;
                if n < u64::try_from(batch).unwrap_or(0) {
                    break;
                }
            }
        }
        Ok(Some(total))
    }

    /// Prunes until `stop` fires: [`Store::prune_step`] again at once while it reports more,
    /// then waits `pause` (`APIARY_PRUNE_INTERVAL`) once caught up, or after an error. Every
    /// worker may run it; the advisory lock lets one prune at a time, and the others find the
    /// lock taken and wait. Logs one line per catch-up with what it deleted.
    ///
    /// `stop` is checked between calls, so the loop ends at most one call
    /// ([`PRUNE_BUDGET`]) after it fires.
    pub async fn keep_pruned(
        &self,
        retention: Duration,
        overrides: &[(String, Duration)],
        pause: Duration,
        stop: CancellationToken,
    ) {
        let mut pruned = 0;
        while !stop.is_cancelled() {
            let more = match self
                .prune_step(retention, overrides, PRUNE_BATCH, PRUNE_BUDGET)
                .await
            {
                Ok(Some(p)) => {
                    pruned += p.deleted;
                    p.more
                }
                Ok(None) => false,
                Err(e) => {
                    tracing::debug!(error = %e, "prune pass failed; the next one retries");
                    false
                }
            };
            if more {
                continue;
            }
            if pruned > 0 {
                tracing::info!(pruned, "pruned finished jobs past their retention");
                pruned = 0;
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = stop.cancelled() => {}
            }
        }
    }

    /// One batch of `pass`, in a transaction of its own that first takes the pruning lock.
    /// `None` if the lock is taken.
    async fn delete_batch(
        &self,
        pass: &mut Pass<'_>,
        special: &[&str],
        batch: i64,
    ) -> Result<Option<u64>, StoreError> {
        let mut tx = self.pool().begin().await.context("starting a prune")?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(PRUNE_LOCK)
            .fetch_one(&mut *tx)
            .await
            .context("taking the prune lock")?;
        if !locked {
            return Ok(None);
        }
        // Oldest first through a created_at index: a job finished before the cutoff was
        // necessarily created before it, and created_at never changes, so the index leads to
        // the candidates without an index on finished_at (which would make every finish a
        // non-HOT update). FOR UPDATE SKIP LOCKED re-reads each row's latest version, so a job
        // replayed meanwhile (no longer finished) is left alone, and a row someone holds is
        // skipped rather than waited for.
        let (deleted, last): (i64, Option<DateTime<Utc>>) = match pass.kind {
            None => sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "WITH doomed AS (
                     SELECT id FROM apiary_jobs
                      WHERE created_at < now() - $1 * interval '1 millisecond'
                        AND created_at >= $2
                        AND finished_at < now() - $1 * interval '1 millisecond'
                        AND {STILL_READ}
                        AND kind <> ALL($3)
                      ORDER BY created_at
                      LIMIT $4
                      FOR UPDATE SKIP LOCKED),
                 gone AS (
                     DELETE FROM apiary_jobs WHERE id IN (SELECT id FROM doomed)
                     RETURNING id, created_at),
                 edges AS (
                     DELETE FROM apiary_job_deps WHERE child IN (SELECT id FROM gone))
                 SELECT count(*), max(created_at) FROM gone"
            )))
            .bind(pass.keep_ms)
            .bind(pass.from)
            .bind(special)
            .bind(batch),
            Some(kind) => sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "WITH doomed AS (
                     SELECT id FROM apiary_jobs
                      WHERE kind = $3
                        AND created_at < now() - $1 * interval '1 millisecond'
                        AND created_at >= $2
                        AND finished_at < now() - $1 * interval '1 millisecond'
                        AND {STILL_READ}
                      ORDER BY created_at
                      LIMIT $4
                      FOR UPDATE SKIP LOCKED),
                 gone AS (
                     DELETE FROM apiary_jobs WHERE id IN (SELECT id FROM doomed)
                     RETURNING id, created_at),
                 edges AS (
                     DELETE FROM apiary_job_deps WHERE child IN (SELECT id FROM gone))
                 SELECT count(*), max(created_at) FROM gone"
            )))
            .bind(pass.keep_ms)
            .bind(pass.from)
            .bind(kind)
            .bind(batch),
        }
        .fetch_one(&mut *tx)
        .await
        .context("pruning finished jobs")?;
        if pass.kind.is_none() {
            // A batch row goes once it is done past retention and its children are gone.
            sqlx::query(
                "DELETE FROM apiary_batches b
                  WHERE b.finished_at < now() - $1 * interval '1 millisecond'
                    AND NOT EXISTS (SELECT 1 FROM apiary_jobs c WHERE c.batch_id = b.id)",
            )
            .bind(pass.keep_ms)
            .execute(&mut *tx)
            .await
            .context("pruning finished batches")?;
        }
        tx.commit().await.context("committing a prune")?;
        // Rows created at `last` itself may remain (a batch can end inside a run of equal
        // timestamps), so the next batch starts at it, not after it.
        if let Some(last) = last {
            pass.from = last;
        }
        Ok(Some(u64::try_from(deleted).unwrap_or(0)))
    }
}
