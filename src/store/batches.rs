//! Batches: a set of jobs recorded together, counted as each reaches a final status, and a
//! callback job enqueued once, when the last one does. The counting and the callback are the
//! schema's (a trigger on the children's status, migration 0014), in the transaction that
//! finishes the child, on every path that does; this module records batches and reads them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use serde_json::value::RawValue;
use sqlx::types::Json;
use uuid::Uuid;

use super::{Context, Store, StoreError};
use crate::job::{JobId, JobStatus};

/// A batch ready to record, with its callback's every default applied.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone)]
pub struct BatchRow {
    /// The batch's id.
    pub id: Uuid,
    /// How many children it has.
    pub total: i32,
    /// The callback job's id, chosen now so it can exist only once.
    pub callback_id: JobId,
    /// The callback's kind.
    pub callback_kind: String,
    /// The callback's `on_complete.payload`, carried inside its payload.
    pub callback_payload: Box<RawValue>,
    /// The callback's queue.
    pub callback_queue: String,
    /// The callback's attempt budget.
    pub callback_max_attempts: i32,
    /// The deployment recording it.
    pub prefix: String,
    /// Enqueue the callback only if every child succeeded.
    pub on_success: bool,
    /// Where the batch's record is POSTed when its last child is final (already checked
    /// against the webhook policy).
    pub callback_url: Option<String>,
}

pub(crate) async fn insert_batch(
    tx: &mut sqlx::PgConnection,
    b: &BatchRow,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO apiary_batches (id, total, remaining, callback_id, callback_kind, callback_payload,
                                     callback_queue, callback_max_attempts, prefix, on_success, callback_url)
         VALUES ($1, $2, $2, $3, $4, $5::json, $6, $7, $8, $9, $10)",
    )
    .bind(b.id)
    .bind(b.total)
    .bind(b.callback_id)
    .bind(&b.callback_kind)
    .bind(b.callback_payload.get())
    .bind(&b.callback_queue)
    .bind(b.callback_max_attempts)
    .bind(&b.prefix)
    .bind(b.on_success)
    .bind(&b.callback_url)
    .execute(&mut *tx)
    .await
    .context("recording a batch")?;
    Ok(())
}

/// A batch as `GET /v1/batches/{id}` shows it.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Batch {
    /// The batch's id.
    pub id: Uuid,
    /// `running` while children are unfinished; `completed` once the callback was enqueued;
    /// `failed` when `on_success` was asked and a child did not succeed (no callback).
    pub status: String,
    /// How many children it has.
    pub total: i64,
    /// Children by status (every status with at least one child).
    pub counts: BTreeMap<String, i64>,
    /// The fraction of children in a final status, 0 to 1.
    pub progress: f64,
    /// Whether the callback waits for every child to succeed.
    pub on_success: bool,
    /// The callback job's id (it exists once the batch is `completed`).
    #[cfg_attr(feature = "api", schema(value_type = String, format = Uuid))]
    pub callback_id: JobId,
    /// The callback's kind.
    pub callback_kind: String,
    /// The callback job's status; `None` until it is enqueued (or if it never is).
    pub callback_status: Option<JobStatus>,
    /// When the batch was recorded.
    pub created_at: DateTime<Utc>,
    /// When its last child reached a final status.
    pub finished_at: Option<DateTime<Utc>>,
    /// Where its record is POSTed when it finishes, if anywhere.
    #[serde(default)]
    pub callback_url: Option<String>,
}

/// One child of a batch as its callback reads it ([`Store::batch_children`]).
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatchChild {
    /// The child's id.
    pub id: JobId,
    /// Its kind.
    pub kind: String,
    /// Its status.
    pub status: JobStatus,
    /// Its result, if it succeeded.
    pub result: Option<Value>,
    /// Its last error, if any.
    pub error: Option<String>,
}

impl BatchChild {
    /// The result decoded as `T`; `None` if there is none.
    pub fn result_as<T: serde::de::DeserializeOwned>(
        &self,
    ) -> Result<Option<T>, serde_json::Error> {
        self.result.as_ref().map(T::deserialize).transpose()
    }
}

/// The most children one [`Store::batch_children`] page returns.
pub const MAX_CHILDREN_PAGE: i64 = 1000;

impl Store {
    /// The batch with this id, with its children counted by status.
    pub async fn get_batch(&self, id: Uuid) -> Result<Option<Batch>, StoreError> {
        #[allow(clippy::type_complexity)]
        let row: Option<(
            Uuid,
            String,
            i32,
            bool,
            Uuid,
            String,
            Option<String>,
            DateTime<Utc>,
            Option<DateTime<Utc>>,
            Option<String>,
        )> = sqlx::query_as(
            "SELECT b.id, b.status, b.total, b.on_success, b.callback_id, b.callback_kind, c.status,
                    b.created_at, b.finished_at, b.callback_url
               FROM apiary_batches b LEFT JOIN apiary_jobs c ON c.id = b.callback_id
              WHERE b.id = $1",
        )
        .bind(id)
        .fetch_optional(self.pool())
        .await
        .context("reading a batch")?;
        let Some((
            id,
            status,
            total,
            on_success,
            callback_id,
            callback_kind,
            cb,
            created_at,
            finished_at,
            callback_url,
        )) = row
        else {
            return Ok(None);
        };
        let counts: Vec<(String, i64)> = sqlx::query_as(
            "SELECT status, count(*) FROM apiary_jobs WHERE batch_id = $1 GROUP BY status ORDER BY status",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await
        .context("counting a batch's children")?;
        let done: i64 = counts
            .iter()
            .filter(|(s, _)| s.parse::<JobStatus>().is_ok_and(JobStatus::is_final))
            .map(|(_, n)| n)
            .sum();
        let total = i64::from(total);
        Ok(Some(Batch {
            id,
            status,
            total,
            counts: counts.into_iter().collect(),
            progress: if total > 0 {
                done as f64 / total as f64
            } else {
                1.0
            },
            on_success,
            callback_id,
            callback_kind,
            callback_status: cb.and_then(|s| s.parse().ok()),
            created_at,
            finished_at,
            callback_url,
        }))
    }

    /// A page of the batch's children in id order, after `after` (from the start when
    /// `None`), at most `limit` (capped at [`MAX_CHILDREN_PAGE`]).
    pub async fn batch_children(
        &self,
        batch: Uuid,
        after: Option<JobId>,
        limit: i64,
    ) -> Result<Vec<BatchChild>, StoreError> {
        /// One child as read.
        type Row = (Uuid, String, String, Option<Json<Value>>, Option<String>);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, kind, status, result, error FROM apiary_jobs
                  WHERE batch_id = $1 AND ($2::uuid IS NULL OR id > $2)
                  ORDER BY id LIMIT $3",
        )
        .bind(batch)
        .bind(after)
        .bind(limit.clamp(1, MAX_CHILDREN_PAGE))
        .fetch_all(self.pool())
        .await
        .context("reading a batch's children")?;
        Ok(rows
            .into_iter()
            .map(|(id, kind, status, result, error)| BatchChild {
                id,
                kind,
                status: status.parse().unwrap_or(JobStatus::Failed),
                result: result.map(|r| r.0),
                error,
            })
            .collect())
    }
}
