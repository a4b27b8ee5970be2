//! ① for periodic jobs: firing one due schedule. In one transaction: lock one due schedule
//! of the deployment (`FOR UPDATE SKIP LOCKED`, so workers firing at once take different
//! schedules and none waits), record the jobs of its due slots through the normal insert
//! (job row and outbox row in one statement), move its cursor past them, commit. The caller
//! then publishes the new jobs; should it die first, the outbox relay does.
//!
//! Exactly once per slot rests on the dedup key `schedule:<name>:<slot>`, not on the lock: a
//! worker that computes a slot already recorded (a cursor set back, a stale transaction)
//! records nothing for it, and the unique index says so in the schema.

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

use super::insert_job::{JobRow, insert_rows_in};
use super::{Context, Store, StoreError};
use crate::job::JobId;

/// A due schedule, locked for firing.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DueSchedule {
    /// Its name.
    pub name: String,
    /// Its cron expression.
    pub cron: String,
    /// Its time zone.
    pub timezone: String,
    /// The kind of its jobs.
    pub kind: String,
    /// The payload of its jobs, as JSON text.
    pub payload: String,
    /// The queue of its jobs, if it names one.
    pub queue: Option<String>,
    /// The attempt budget of its jobs, if it gives one.
    pub max_attempts: Option<i32>,
    /// The priority of its jobs, if it gives one.
    pub priority: Option<i16>,
    /// Its missed-slot policy.
    pub missed: String,
    /// Every slot at or before this is dealt with.
    pub cursor: DateTime<Utc>,
    /// The transaction's time: Postgres's clock, the same for every worker, and the
    /// `created_at` of the jobs this firing records.
    pub now: DateTime<Utc>,
}

impl DueSchedule {
    /// The payload as the insert takes it (jsonb's text output, which is JSON).
    pub fn raw_payload(&self) -> Result<Box<RawValue>, serde_json::Error> {
        RawValue::from_string(self.payload.clone())
    }
}

/// What firing a schedule writes: its jobs, and where its cursor goes.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone)]
pub struct Firing {
    /// The jobs of its due slots, with their dedup keys.
    pub rows: Vec<JobRow>,
    /// The new cursor.
    pub cursor: DateTime<Utc>,
    /// Its next slot after the new cursor.
    pub next_at: Option<DateTime<Utc>>,
}

/// What a firing did.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone)]
pub struct Fired {
    /// The schedule.
    pub name: String,
    /// The slots it computed.
    pub slots: usize,
    /// The jobs it recorded (a slot already recorded is not among them), to publish now.
    pub new: Vec<JobId>,
    /// Postgres refused the schedule's jobs (with its reason): nothing was written, and the
    /// cursor did not move.
    pub refused: Option<String>,
}

impl Store {
    /// Fires one due schedule of the deployment `prefix`, other than those in `skip`: `plan`
    /// says which jobs its due slots make and where its cursor goes. `None` when no schedule
    /// is due (or every due one is locked by another worker).
    pub async fn fire_schedule(
        &self,
        prefix: &str,
        skip: &[String],
        plan: impl FnOnce(&DueSchedule) -> Firing,
    ) -> Result<Option<Fired>, StoreError> {
        let mut tx = self.pool().begin().await.context("starting a firing")?;
        let due: Option<DueSchedule> = sqlx::query_as(
            "SELECT name, cron, timezone, kind, payload::text AS payload, queue, max_attempts,
                    priority, missed, cursor, now() AS now
               FROM apiary_schedules
              WHERE prefix = $1 AND NOT paused AND next_at <= now() AND name <> ALL($2)
              ORDER BY next_at
              LIMIT 1
                FOR UPDATE SKIP LOCKED",
        )
        .bind(prefix)
        .bind(skip)
        .fetch_optional(&mut *tx)
        .await
        .context("finding a due schedule")?;
        let Some(due) = due else {
            tx.rollback().await.context("ending a firing")?;
            return Ok(None);
        };
        let firing = plan(&due);
        let fresh = match insert_rows_in(&mut tx, &firing.rows).await {
            Ok(f) => f,
            Err(e) if e.is_data_error() => {
                tx.rollback().await.context("rolling back a firing")?;
                return Ok(Some(Fired {
                    name: due.name,
                    slots: firing.rows.len(),
                    new: Vec::new(),
                    refused: Some(e.refusal().unwrap_or_else(|| e.to_string())),
                }));
            }
            Err(e) => return Err(e),
        };
        sqlx::query(
            "UPDATE apiary_schedules SET cursor = $3, next_at = $4
              WHERE prefix = $1 AND name = $2",
        )
        .bind(prefix)
        .bind(&due.name)
        .bind(firing.cursor)
        .bind(firing.next_at)
        .execute(&mut *tx)
        .await
        .context("moving a schedule's cursor")?;
        tx.commit().await.context("committing a firing")?;
        let new = firing
            .rows
            .iter()
            .zip(fresh)
            .filter(|(_, fresh)| *fresh)
            .map(|(r, _)| r.id)
            .collect();
        Ok(Some(Fired {
            name: due.name,
            slots: firing.rows.len(),
            new,
            refused: None,
        }))
    }
}
