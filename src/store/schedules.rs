//! Schedules as an operator manages them (`/v1/schedules`, `apiary schedule`, the schedules
//! file): setting, reading, pausing and deleting a deployment's schedules, and the jobs of a
//! schedule's recent slots. Firing them is [`super::fire_schedules`].
//!
//! Setting a schedule keeps its cursor when its expression and time zone are unchanged (so
//! `apiary migrate` re-applying the same file changes nothing), and resets it to now when
//! either changed: the new expression's slots count from then, none is missed.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::{Context, Store, StoreError};
use crate::schedule::{Compiled, ScheduleSpec};

/// A schedule as Postgres records it.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct ScheduleRow {
    /// Its name.
    pub name: String,
    /// Its cron expression.
    pub cron: String,
    /// The IANA time zone the expression is read in.
    pub timezone: String,
    /// The kind of its jobs.
    pub kind: String,
    /// The payload of its jobs.
    #[sqlx(json)]
    pub payload: Value,
    /// The queue of its jobs, if it names one.
    pub queue: Option<String>,
    /// The attempt budget of its jobs, if it gives one.
    pub max_attempts: Option<i32>,
    /// The priority of its jobs, if it gives one.
    pub priority: Option<i16>,
    /// Its missed-slot policy: `skip`, `one` or `all`.
    pub missed: String,
    /// Whether it is paused: no slot is enqueued until it is resumed.
    pub paused: bool,
    /// `api` (set through the API, the CLI or the library) or `file` (the schedules file).
    pub source: String,
    /// Every slot at or before this instant has been dealt with.
    pub cursor: DateTime<Utc>,
    /// Its next slot; `None` if it never fires again.
    pub next_at: Option<DateTime<Utc>>,
    /// When it was first set.
    pub created_at: DateTime<Utc>,
    /// When it was last set, paused or resumed.
    pub updated_at: DateTime<Utc>,
}

/// One job of a schedule's slot, as `GET /v1/schedules/{name}` lists it.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct ScheduleJob {
    /// The job's id.
    pub id: Uuid,
    /// Its dedup key, `schedule:<name>:<slot>`.
    pub dedup_key: String,
    /// Its status.
    pub status: String,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
    /// When it finished, if it has.
    pub finished_at: Option<DateTime<Utc>>,
}

/// Where a schedule came from.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The API, the CLI or the library.
    Api,
    /// The schedules file, applied by `apiary migrate`.
    File,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Api => "api",
            Source::File => "file",
        }
    }
}

const COLUMNS: &str = "name, cron, timezone, kind, payload, queue, max_attempts, priority, missed, \
                       paused, source, cursor, next_at, created_at, updated_at";

impl Store {
    /// Sets the schedule `name` of the deployment `prefix` to `spec` (already validated, as
    /// `compiled`). Returns it, and whether it is new.
    pub async fn set_schedule(
        &self,
        prefix: &str,
        name: &str,
        spec: &ScheduleSpec,
        compiled: &Compiled,
        source: Source,
    ) -> Result<(ScheduleRow, bool), StoreError> {
        let mut tx = self
            .pool()
            .begin()
            .await
            .context("starting a schedule write")?;
        let set = upsert(&mut tx, prefix, name, spec, compiled, source).await?;
        tx.commit().await.context("committing a schedule")?;
        Ok(set)
    }

    /// The deployment's schedules, by name.
    pub async fn list_schedules(&self, prefix: &str) -> Result<Vec<ScheduleRow>, StoreError> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM apiary_schedules WHERE prefix = $1 ORDER BY name"
        )))
        .bind(prefix)
        .fetch_all(self.pool())
        .await
        .context("listing schedules")
    }

    /// One schedule.
    pub async fn get_schedule(
        &self,
        prefix: &str,
        name: &str,
    ) -> Result<Option<ScheduleRow>, StoreError> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM apiary_schedules WHERE prefix = $1 AND name = $2"
        )))
        .bind(prefix)
        .bind(name)
        .fetch_optional(self.pool())
        .await
        .context("reading a schedule")
    }

    /// Deletes a schedule: no slot of it is enqueued any more; its jobs stay. False if there
    /// was none.
    pub async fn delete_schedule(&self, prefix: &str, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM apiary_schedules WHERE prefix = $1 AND name = $2")
            .bind(prefix)
            .bind(name)
            .execute(self.pool())
            .await
            .context("deleting a schedule")?;
        Ok(done.rows_affected() > 0)
    }

    /// Pauses (`true`) or resumes (`false`) a schedule; `None` if there is none. The cursor
    /// stays where it was, so a resumed schedule meets the slots of its pause as missed ones.
    pub async fn set_schedule_paused(
        &self,
        prefix: &str,
        name: &str,
        paused: bool,
    ) -> Result<Option<ScheduleRow>, StoreError> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE apiary_schedules SET paused = $3, updated_at = now()
              WHERE prefix = $1 AND name = $2
             RETURNING {COLUMNS}"
        )))
        .bind(prefix)
        .bind(name)
        .bind(paused)
        .fetch_optional(self.pool())
        .await
        .context("pausing or resuming a schedule")
    }

    /// The jobs of `kind` holding any of `keys` (dedup keys of a schedule's slots), newest
    /// slot first. Exact keys, so the lookup is on the dedup index whatever the database's
    /// collation (a prefix range on text depends on it).
    pub async fn schedule_jobs(
        &self,
        kind: &str,
        keys: &[String],
    ) -> Result<Vec<ScheduleJob>, StoreError> {
        sqlx::query_as(
            "SELECT id, dedup_key, status, created_at, finished_at FROM apiary_jobs
              WHERE kind = $1 AND dedup_key = ANY($2) AND duplicate_of IS NULL
              ORDER BY dedup_key DESC",
        )
        .bind(kind)
        .bind(keys)
        .fetch_all(self.pool())
        .await
        .context("reading a schedule's jobs")
    }

    /// Applies the schedules file: sets each of `specs` (source `file`) and deletes the
    /// deployment's file schedules it no longer lists, in one transaction. Schedules set
    /// through the API are left alone. Returns the names deleted.
    pub async fn apply_schedules_file(
        &self,
        prefix: &str,
        specs: &[(String, ScheduleSpec, Compiled)],
    ) -> Result<Vec<String>, StoreError> {
        let mut tx = self
            .pool()
            .begin()
            .await
            .context("starting the schedules file")?;
        for (name, spec, compiled) in specs {
            upsert(&mut tx, prefix, name, spec, compiled, Source::File).await?;
        }
        let names: Vec<&str> = specs.iter().map(|(n, _, _)| n.as_str()).collect();
        let mut removed: Vec<String> = sqlx::query_scalar(
            "DELETE FROM apiary_schedules
              WHERE prefix = $1 AND source = 'file' AND name <> ALL($2)
             RETURNING name",
        )
        .bind(prefix)
        .bind(&names)
        .fetch_all(&mut *tx)
        .await
        .context("removing schedules gone from the file")?;
        tx.commit().await.context("committing the schedules file")?;
        removed.sort();
        Ok(removed)
    }
}

/// Sets one schedule within `tx`. The row is locked first, so two concurrent sets of one
/// schedule agree on whether its expression changed.
async fn upsert(
    tx: &mut sqlx::PgConnection,
    prefix: &str,
    name: &str,
    spec: &ScheduleSpec,
    compiled: &Compiled,
    source: Source,
) -> Result<(ScheduleRow, bool), StoreError> {
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *tx)
        .await
        .context("reading the time")?;
    /// The expression, zone, cursor and next slot a schedule had.
    type Old = (String, String, DateTime<Utc>, Option<DateTime<Utc>>);
    let old: Option<Old> = sqlx::query_as(
        "SELECT cron, timezone, cursor, next_at FROM apiary_schedules
          WHERE prefix = $1 AND name = $2 FOR UPDATE",
    )
    .bind(prefix)
    .bind(name)
    .fetch_optional(&mut *tx)
    .await
    .context("reading a schedule to set")?;
    let (cursor, next_at) = match old {
        Some((cron, tz, cursor, next_at)) if cron == spec.cron && tz == spec.timezone => {
            (cursor, next_at)
        }
        _ => (now, compiled.next_after(now)),
    };
    let row: ScheduleRowCreated = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO apiary_schedules (prefix, name, cron, timezone, kind, payload, queue,
                                       max_attempts, priority, missed, cursor, next_at, source)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
         ON CONFLICT (prefix, name) DO UPDATE SET
             cron = EXCLUDED.cron, timezone = EXCLUDED.timezone, kind = EXCLUDED.kind,
             payload = EXCLUDED.payload, queue = EXCLUDED.queue,
             max_attempts = EXCLUDED.max_attempts, priority = EXCLUDED.priority,
             missed = EXCLUDED.missed, cursor = EXCLUDED.cursor, next_at = EXCLUDED.next_at,
             source = EXCLUDED.source, updated_at = now()
         RETURNING {COLUMNS}, (xmax = 0) AS created"
    )))
    .bind(prefix)
    .bind(name)
    .bind(&spec.cron)
    .bind(&spec.timezone)
    .bind(&spec.kind)
    .bind(sqlx::types::Json(&spec.payload))
    .bind(&spec.queue)
    .bind(spec.max_attempts.and_then(|n| i32::try_from(n).ok()))
    .bind(spec.priority.and_then(|n| i16::try_from(n).ok()))
    .bind(spec.missed.as_str())
    .bind(cursor)
    .bind(next_at)
    .bind(source.as_str())
    .fetch_one(&mut *tx)
    .await
    .context("writing a schedule")?;
    Ok((row.row, row.created))
}

#[derive(sqlx::FromRow)]
struct ScheduleRowCreated {
    #[sqlx(flatten)]
    row: ScheduleRow,
    created: bool,
}
