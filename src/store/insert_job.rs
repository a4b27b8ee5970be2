//! ② Recording new jobs: the row and its outbox entry in one statement, so a job is either
//! recorded and due to be published, or not recorded at all. An existing `(kind, dedup_key)`
//! or id creates nothing and resolves to the existing job.

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use uuid::Uuid;

use super::{Context, Store, StoreError};
use crate::job::JobId;

/// A job ready to record: every default already applied.
#[derive(Debug, Clone)]
pub struct JobRow {
    /// Its id.
    pub id: JobId,
    /// Its kind.
    pub kind: String,
    /// Its payload.
    pub payload: Box<RawValue>,
    /// Its dedup key.
    pub dedup_key: Option<String>,
    /// Its attempt budget.
    pub max_attempts: i32,
    /// When it is due, if scheduled.
    pub run_at: Option<DateTime<Utc>>,
}

/// What recording one job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// A new job, recorded at this instant; it must now be published.
    New(DateTime<Utc>),
    /// The id or dedup key already belonged to this job; nothing was written.
    Existing(JobId),
}

impl Store {
    /// Records `rows` (queued, each with an outbox entry) in one statement. The result is in
    /// the same order as `rows`.
    pub async fn insert_jobs(&self, rows: &[JobRow]) -> Result<Vec<Inserted>, StoreError> {
        let mut ids = Vec::with_capacity(rows.len());
        let mut kinds = Vec::with_capacity(rows.len());
        let mut payloads = Vec::with_capacity(rows.len());
        let mut keys = Vec::with_capacity(rows.len());
        let mut budgets = Vec::with_capacity(rows.len());
        let mut run_ats = Vec::with_capacity(rows.len());
        for r in rows {
            ids.push(r.id);
            kinds.push(r.kind.as_str());
            payloads.push(r.payload.get());
            keys.push(r.dedup_key.as_deref());
            budgets.push(r.max_attempts);
            run_ats.push(r.run_at);
        }
        // ON CONFLICT DO NOTHING covers both the primary key and the dedup index: a repeated
        // id or key writes nothing and is resolved to the existing job below.
        let inserted: Vec<(Uuid, DateTime<Utc>)> = sqlx::query_as(
            "WITH input AS (
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::timestamptz[])
                     WITH ORDINALITY AS t(id, kind, payload, dedup_key, max_attempts, run_at, ord)
             ), ins AS (
                 INSERT INTO apiary_jobs (id, kind, payload, dedup_key, max_attempts, run_at)
                 SELECT id, kind, payload::json, dedup_key, max_attempts, run_at FROM input ORDER BY ord
                 ON CONFLICT DO NOTHING
                 RETURNING id, created_at
             ), outbox AS (
                 INSERT INTO apiary_outbox (job_id) SELECT id FROM ins
             )
             SELECT id, created_at FROM ins",
        )
        .bind(&ids)
        .bind(&kinds)
        .bind(&payloads)
        .bind(&keys)
        .bind(&budgets)
        .bind(&run_ats)
        .fetch_all(self.pool())
        .await
        .context("inserting jobs")?;

        let created: std::collections::HashMap<Uuid, DateTime<Utc>> =
            inserted.into_iter().collect();
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            match created.get(&r.id) {
                Some(at) => out.push(Inserted::New(*at)),
                None => out.push(Inserted::Existing(self.resolve_conflict(r).await?)),
            }
        }
        Ok(out)
    }

    /// The job a row collided with: same id, else same `(kind, dedup_key)`.
    async fn resolve_conflict(&self, row: &JobRow) -> Result<JobId, StoreError> {
        let existing: Option<Uuid> = sqlx::query_scalar(
            "SELECT id FROM apiary_jobs WHERE id = $1
             UNION ALL
             SELECT id FROM apiary_jobs WHERE kind = $2 AND dedup_key = $3 AND duplicate_of IS NULL
             LIMIT 1",
        )
        .bind(row.id)
        .bind(&row.kind)
        .bind(&row.dedup_key)
        .fetch_optional(self.pool())
        .await
        .context("resolving a dedup conflict")?;
        // The conflicting row cannot vanish between the two statements unless it was pruned in
        // that instant; then the honest answer is to try the insert again, which the caller does
        // by retrying the enqueue.
        existing.ok_or(StoreError::Query {
            context: "resolving a dedup conflict",
            source: sqlx::Error::RowNotFound,
        })
    }
}
