//! What `apiary status` and `GET /v1/stats` read from Postgres: jobs by status in the last
//! hour, and how long the oldest due job has been waiting.

use std::collections::BTreeMap;

use super::{Context, Store, StoreError};

impl Store {
    /// Jobs created in the last hour, counted by status.
    pub async fn counts_last_hour(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT status, count(*) FROM apiary_jobs WHERE created_at > now() - interval '1 hour' GROUP BY status",
        )
        .fetch_all(self.pool())
        .await
        .context("counting jobs by status")?;
        Ok(rows.into_iter().collect())
    }

    /// Seconds the oldest due, unstarted job has waited (among jobs of the last day), if any.
    pub async fn oldest_waiting_seconds(&self) -> Result<Option<f64>, StoreError> {
        sqlx::query_scalar(
            "SELECT extract(epoch FROM now() - coalesce(run_at, created_at))::float8 FROM apiary_jobs
              WHERE created_at > now() - interval '1 day' AND status IN ('queued', 'retrying')
                AND coalesce(next_attempt_at, run_at, created_at) <= now()
              ORDER BY created_at LIMIT 1",
        )
        .fetch_optional(self.pool())
        .await
        .context("finding the oldest waiting job")
    }
}
