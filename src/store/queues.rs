//! Queue state an operator sets: pausing and resuming a queue. The state lives in Postgres so
//! that every worker sees it and it outlives any of them; workers read it every half second.

use super::{Context, Store, StoreError};

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
}
