//! How many broker shards each queue has ever had (`apiary_broker_shards`, migration 0017):
//! written before shards are declared, read to find shards left over from a larger
//! `shards=` count without probing the broker for ones that never existed. See
//! [`crate::broker::topology`] for the shards themselves.

use super::{Context, Store, StoreError};

impl Store {
    /// Records that the queue whose shard-0 work queue is `work` has `shards` shards, keeping
    /// the larger of this and what was recorded. A count of one records nothing. Called before
    /// the shards are declared.
    pub async fn record_shards(&self, work: &str, shards: u16) -> Result<(), StoreError> {
        if shards <= 1 {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO apiary_broker_shards (work, shards) VALUES ($1, $2)
             ON CONFLICT (work) DO UPDATE SET shards = EXCLUDED.shards, changed_at = now()
              WHERE apiary_broker_shards.shards < EXCLUDED.shards",
        )
        .bind(work)
        .bind(i16::try_from(shards).unwrap_or(i16::MAX))
        .execute(self.pool())
        .await
        .context("recording a queue's shard count")?;
        Ok(())
    }

    /// The most shards recorded for `work`'s queue: 1 when none were.
    pub async fn recorded_shards(&self, work: &str) -> Result<u16, StoreError> {
        let n: Option<i16> =
            sqlx::query_scalar("SELECT shards FROM apiary_broker_shards WHERE work = $1")
                .bind(work)
                .fetch_optional(self.pool())
                .await
                .context("reading a queue's shard count")?;
        Ok(n.and_then(|n| u16::try_from(n).ok()).unwrap_or(1).max(1))
    }

    /// Lowers `work`'s recorded count from `from` to `to` once shards `to` and above were
    /// found deleted, unless someone recorded another count meanwhile. `to` of one removes
    /// the row.
    pub async fn lower_shards(&self, work: &str, from: u16, to: u16) -> Result<(), StoreError> {
        let from = i16::try_from(from).unwrap_or(i16::MAX);
        if to <= 1 {
            sqlx::query("DELETE FROM apiary_broker_shards WHERE work = $1 AND shards = $2")
                .bind(work)
                .bind(from)
                .execute(self.pool())
                .await
                .context("forgetting a queue's deleted shards")?;
        } else {
            sqlx::query(
                "UPDATE apiary_broker_shards SET shards = $3, changed_at = now()
                  WHERE work = $1 AND shards = $2",
            )
            .bind(work)
            .bind(from)
            .bind(i16::try_from(to).unwrap_or(i16::MAX))
            .execute(self.pool())
            .await
            .context("forgetting a queue's deleted shards")?;
        }
        Ok(())
    }
}
