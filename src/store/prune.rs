//! Retention: finished jobs older than their kind's retention are deleted in small batches,
//! by whichever worker holds the pruning advisory lock, so pruning never runs twice at once
//! and needs no cron. A job's dedup key goes with it.

use std::time::Duration;

use super::{Context, Store, StoreError};

/// The advisory lock key that elects the pruner ("apiary" in ASCII).
const PRUNE_LOCK: i64 = 0x61_70_69_61_72_79;

impl Store {
    /// Deletes finished jobs older than `retention` (kinds in `overrides` use their own), at
    /// most `batch` per transaction, until none are left or `max_batches` ran. Returns `None`
    /// if another process holds the pruning lock, else how many jobs were deleted.
    pub async fn prune(
        &self,
        retention: Duration,
        overrides: &[(String, Duration)],
        batch: i64,
        max_batches: usize,
    ) -> Result<Option<u64>, StoreError> {
        let mut total = 0;
        let special: Vec<&str> = overrides.iter().map(|(k, _)| k.as_str()).collect();
        let passes: Vec<(Option<&str>, Duration)> = std::iter::once((None, retention))
            .chain(overrides.iter().map(|(k, d)| (Some(k.as_str()), *d)))
            .collect();
        for (kind, keep) in passes {
            let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
            for _ in 0..max_batches {
                let mut tx = self.pool().begin().await.context("starting a prune")?;
                let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
                    .bind(PRUNE_LOCK)
                    .fetch_one(&mut *tx)
                    .await
                    .context("taking the prune lock")?;
                if !locked {
                    return Ok(None);
                }
                // Oldest first through the created_at index: a job finished before the cutoff
                // was necessarily created before it.
                let deleted = sqlx::query(
                    "DELETE FROM apiary_jobs WHERE id IN (
                         SELECT id FROM apiary_jobs
                          WHERE created_at < now() - $1 * interval '1 millisecond'
                            AND finished_at < now() - $1 * interval '1 millisecond'
                            AND ($2::text IS NULL AND NOT kind = ANY($3) OR kind = $2)
                          ORDER BY created_at
                          LIMIT $4
                          FOR UPDATE SKIP LOCKED)",
                )
                .bind(keep_ms)
                .bind(kind)
                .bind(&special)
                .bind(batch)
                .execute(&mut *tx)
                .await
                .context("pruning finished jobs")?
                .rows_affected();
                tx.commit().await.context("committing a prune")?;
                total += deleted;
                if deleted < u64::try_from(batch).unwrap_or(0) {
                    break;
                }
            }
        }
        Ok(Some(total))
    }
}
