//! The transactional outbox: the window between a job's commit and the broker's confirm.
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
    /// Deletes the outbox rows of jobs whose publish the broker confirmed.
    pub async fn delete_outbox(&self, ids: &[JobId]) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM apiary_outbox WHERE job_id = ANY($1)")
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
    /// call. Rows are locked with SKIP LOCKED so concurrent relays never publish a row twice
    /// at once. Returns how many were relayed.
    pub async fn relay_outbox<F, Fut, E>(
        &self,
        grace: Duration,
        limit: i64,
        publish: F,
    ) -> Result<usize, RelayError<E>>
    where
        F: FnOnce(Vec<WireJob>) -> Fut,
        Fut: Future<Output = Result<(), E>>,
    {
        let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        let mut tx = self
            .pool()
            .begin()
            .await
            .context("starting the relay")
            .map_err(RelayError::Store)?;
        #[allow(clippy::type_complexity)]
        let rows: Vec<(
            Uuid,
            String,
            Json<Box<serde_json::value::RawValue>>,
            Option<String>,
            i32,
            Option<DateTime<Utc>>,
        )> = sqlx::query_as(
            "SELECT j.id, j.kind, j.payload, j.dedup_key, j.max_attempts, j.run_at
                   FROM apiary_outbox o JOIN apiary_jobs j ON j.id = o.job_id
                  WHERE o.created_at < now() - $1 * interval '1 millisecond'
                  ORDER BY o.created_at
                  LIMIT $2
                  FOR UPDATE OF o SKIP LOCKED",
        )
        .bind(grace_ms)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await
        .context("reading stale outbox rows")
        .map_err(RelayError::Store)?;
        if rows.is_empty() {
            return Ok(0);
        }
        let ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
        let jobs = rows
            .into_iter()
            .map(
                |(id, kind, payload, dedup_key, max_attempts, run_at)| WireJob {
                    id,
                    kind,
                    payload: payload.0,
                    dedup_key,
                    max_attempts: Some(max_attempts),
                    run_at,
                },
            )
            .collect();
        publish(jobs).await.map_err(RelayError::Publish)?;
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

/// Why a relay pass failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError<E> {
    /// Postgres failed.
    #[error(transparent)]
    Store(StoreError),
    /// The broker refused or lost the publish.
    #[error("republishing outbox rows: {0}")]
    Publish(E),
}
