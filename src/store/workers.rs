//! The worker registry: who is running, with what, and how fast. Each worker upserts its row
//! on every heartbeat and deletes it on a clean exit; rows whose heartbeat stopped expire.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Context, Store, StoreError};

/// One worker's row.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct WorkerRow {
    /// The worker's id (the `worker_id` on the jobs it claims).
    pub id: Uuid,
    /// Its work queue.
    pub queue: String,
    /// Its host name.
    pub host: String,
    /// Its process id.
    pub pid: i32,
    /// Its Apiary version.
    pub version: String,
    /// Jobs it runs at once.
    pub concurrency: i32,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat.
    pub heartbeat_at: DateTime<Utc>,
    /// Deliveries it holds now.
    pub in_flight: i32,
    /// Attempts it finished.
    pub processed: i64,
    /// Attempts that failed.
    pub failed: i64,
    /// Jobs finished per second, recently.
    pub rate: f64,
    /// Whether it is draining.
    pub draining: bool,
    /// The kinds it has handlers for, sorted; `None` for a worker too old to say.
    #[serde(default)]
    pub kinds: Option<Vec<String>>,
    /// The queues it consumes, each with how many of its jobs it runs at once:
    /// `{"default": 64, "emails": 16}`; `None` for a worker too old to say.
    #[serde(default)]
    #[sqlx(json(nullable))]
    pub queues: Option<std::collections::BTreeMap<String, i64>>,
}

impl Store {
    /// Inserts or refreshes a worker's row. Rows of workers that stopped beating are removed
    /// by a rescuer, once it has put their jobs back ([`Store::lapsed_workers`]).
    pub async fn beat_worker(&self, w: &WorkerRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO apiary_workers (id, queue, host, pid, version, concurrency, started_at, heartbeat_at,
                                         in_flight, processed, failed, rate, draining, kinds, queues)
             VALUES ($1, $2, $3, $4, $5, $6, $7, now(), $8, $9, $10, $11, $12, $13, $14)
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), in_flight = $8, processed = $9, failed = $10,
                                            rate = $11, draining = $12, queues = $14",
        )
        .bind(w.id)
        .bind(&w.queue)
        .bind(&w.host)
        .bind(w.pid)
        .bind(&w.version)
        .bind(w.concurrency)
        .bind(w.started_at)
        .bind(w.in_flight)
        .bind(w.processed)
        .bind(w.failed)
        .bind(w.rate)
        .bind(w.draining)
        .bind(&w.kinds)
        .bind(w.queues.as_ref().map(sqlx::types::Json))
        .execute(self.pool())
        .await
        .context("recording a worker heartbeat")?;
        Ok(())
    }

    /// Removes a worker's row (on a clean exit).
    pub async fn remove_worker(&self, id: Uuid) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM apiary_workers WHERE id = $1")
            .bind(id)
            .execute(self.pool())
            .await
            .context("removing a worker")?;
        Ok(())
    }

    /// Workers whose last heartbeat is older than `silent`: killed, or cut off. Their jobs'
    /// leases have expired too, so a rescuer looks for them, then [`Store::forget_workers`].
    pub async fn lapsed_workers(
        &self,
        silent: std::time::Duration,
    ) -> Result<Vec<Uuid>, StoreError> {
        let silent_ms = i64::try_from(silent.as_millis()).unwrap_or(i64::MAX);
        sqlx::query_scalar(
            "SELECT id FROM apiary_workers WHERE heartbeat_at < now() - $1 * interval '1 millisecond'",
        )
        .bind(silent_ms)
        .fetch_all(self.pool())
        .await
        .context("listing silent workers")
    }

    /// Removes the rows of workers whose jobs were rescued. A worker that was only cut off
    /// and comes back simply inserts its row again with its next heartbeat.
    pub async fn forget_workers(
        &self,
        ids: &[Uuid],
        silent: std::time::Duration,
    ) -> Result<(), StoreError> {
        let silent_ms = i64::try_from(silent.as_millis()).unwrap_or(i64::MAX);
        sqlx::query(
            "DELETE FROM apiary_workers WHERE id = ANY($1) AND heartbeat_at < now() - $2 * interval '1 millisecond'",
        )
        .bind(ids)
        .bind(silent_ms)
        .execute(self.pool())
        .await
        .context("removing silent workers")?;
        Ok(())
    }

    /// Workers whose heartbeat is fresher than `expire`, oldest first.
    pub async fn live_workers(
        &self,
        expire: std::time::Duration,
    ) -> Result<Vec<WorkerRow>, StoreError> {
        let expire_ms = i64::try_from(expire.as_millis()).unwrap_or(i64::MAX);
        sqlx::query_as(
            "SELECT * FROM apiary_workers WHERE heartbeat_at >= now() - $1 * interval '1 millisecond'
              ORDER BY started_at",
        )
        .bind(expire_ms)
        .fetch_all(self.pool())
        .await
        .context("listing workers")
    }
}
