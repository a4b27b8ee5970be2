//! ② Recording new jobs: the row and its outbox entry in one statement, so a job is either
//! recorded and due to be published, or not recorded at all. An existing `(kind, dedup_key)`
//! creates nothing and resolves to the job that owns the key; an existing id resolves to that
//! job only if it is the same job (same kind, dedup key and payload), and is a conflict
//! otherwise: an enqueue is never answered with a different job than the one asked for.

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use uuid::Uuid;

use super::{Context, Store, StoreError};
use crate::job::JobId;

/// A job ready to record: every default already applied.
///
/// See the crate's [guarantees](crate#guarantees).
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
    /// Its queue.
    pub queue: String,
    /// The deployment (`APIARY_QUEUE`) recording it.
    pub prefix: String,
    /// 0 to 9.
    pub priority: u8,
    /// Its concurrency key.
    pub concurrency_key: Option<String>,
    /// The jobs it waits for: recorded ones, or rows earlier in the same batch.
    pub depends_on: Vec<JobId>,
    /// The batch it belongs to.
    pub batch_id: Option<Uuid>,
    /// Where its final record is POSTed (already checked against the webhook policy).
    pub callback_url: Option<String>,
    /// The producer's trace context, carried in the message's headers (not recorded).
    pub trace: Option<crate::trace::TraceContext>,
}

/// What recording one job did.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// A new job, recorded at this instant; it must now be published.
    New(DateTime<Utc>),
    /// The dedup key, or the id with the same content, already belonged to this job; nothing
    /// was written.
    Existing(JobId),
    /// The id belongs to a job with other content; nothing was written. Says how it differs.
    Conflict(String),
}

/// What [`Store::insert_jobs`] did with a batch.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    /// The batch was written: one answer per row, in order.
    Written(Vec<Inserted>),
    /// All or nothing was asked for and row `index` conflicts: nothing was written.
    RolledBack {
        /// The conflicting row.
        index: usize,
        /// How it conflicts.
        reason: String,
    },
    /// Row `index` names a parent in `depends_on` that cannot be one (unknown, or later in
    /// the batch): nothing was written.
    BadParent {
        /// The row.
        index: usize,
        /// What is wrong with its `depends_on`.
        reason: String,
    },
}

#[derive(sqlx::FromRow)]
struct Resolution {
    created_at: Option<DateTime<Utc>>,
    by_id: Option<Uuid>,
    same: Option<bool>,
    by_id_kind: Option<String>,
    by_key: Option<Uuid>,
}

impl Store {
    /// Records `rows` (queued, each with an outbox entry) in one statement, and says for each
    /// what happened. With `all_or_nothing`, a conflict rolls the whole batch back.
    pub async fn insert_jobs(
        &self,
        rows: &[JobRow],
        all_or_nothing: bool,
    ) -> Result<InsertOutcome, StoreError> {
        self.insert_jobs_in_batch(rows, all_or_nothing, None, false)
            .await
    }

    /// [`Store::insert_jobs`], recording `batch` first in the same transaction when given.
    /// With a batch, or `all_new`, every row must be a new job (one that resolves to an
    /// existing job would never count towards the batch, nor wait for its place in a chain),
    /// or nothing is written.
    pub async fn insert_jobs_in_batch(
        &self,
        rows: &[JobRow],
        all_or_nothing: bool,
        batch: Option<&super::batches::BatchRow>,
        all_new: bool,
    ) -> Result<InsertOutcome, StoreError> {
        let mut tx = self.pool().begin().await.context("starting an insert")?;
        if let Some(b) = batch {
            super::batches::insert_batch(&mut tx, b).await?;
        }
        // Parents are locked before the insert, so a parent finishing meanwhile either sees
        // this transaction's edges (its trigger releases or cancels the child) or has
        // finished already, and the child is recorded accordingly.
        let plan = match super::dependencies::plan(&mut tx, rows).await? {
            Ok(plan) => plan,
            Err((index, reason)) => {
                tx.rollback().await.context("rolling back an insert")?;
                return Ok(InsertOutcome::BadParent { index, reason });
            }
        };
        let resolved = insert_rows(&mut tx, rows, &plan).await?;
        let mut out = Vec::with_capacity(rows.len());
        for (i, (row, r)) in rows.iter().zip(resolved).enumerate() {
            let answer = match r {
                Resolution {
                    created_at: Some(at),
                    ..
                } => Inserted::New(at),
                Resolution {
                    by_id: Some(id),
                    same: Some(true),
                    ..
                } => Inserted::Existing(id),
                Resolution {
                    by_id: Some(id),
                    by_id_kind,
                    ..
                } => Inserted::Conflict(format!(
                    "id {id} already belongs to another job (kind {:?}, with another dedup key or payload)",
                    by_id_kind.unwrap_or_default()
                )),
                Resolution {
                    by_key: Some(id), ..
                } => Inserted::Existing(id),
                // Collided with a row this snapshot did not see: one written concurrently, or by
                // an earlier row of this same batch. Look again, inside this transaction.
                _ => resolve_late(&mut tx, row).await?,
            };
            if all_or_nothing && let Inserted::Conflict(reason) = &answer {
                tx.rollback().await.context("rolling back an insert")?;
                return Ok(InsertOutcome::RolledBack {
                    index: i,
                    reason: reason.clone(),
                });
            }
            out.push(answer);
        }
        if (all_new || batch.is_some())
            && let Some(index) = out.iter().position(|a| !matches!(a, Inserted::New(_)))
        {
            tx.rollback().await.context("rolling back an insert")?;
            return Ok(InsertOutcome::RolledBack {
                index,
                reason: "its id or (kind, dedup_key) already belongs to a job; the jobs of a batch or a chain must be new".into(),
            });
        }
        // A parent in the same batch must be the row just written, not a job it resolved to.
        if let Some((index, parent)) = plan.inner_parents().find(|(_, p)| {
            rows.iter()
                .zip(&out)
                .any(|(r, a)| r.id == *p && !matches!(a, Inserted::New(_)))
        }) {
            tx.rollback().await.context("rolling back an insert")?;
            return Ok(InsertOutcome::RolledBack {
                index,
                reason: format!(
                    "its parent {parent}, earlier in the same request, already existed; name the existing job's id instead"
                ),
            });
        }
        tx.commit().await.context("committing an insert")?;
        Ok(InsertOutcome::Written(out))
    }
}

/// Records `rows` inside the caller's transaction `tx` and says, for each, whether it is new:
/// a row whose id or `(kind, dedup_key)` exists writes nothing. For recording paths that
/// own their transaction (a schedule's firing, with its cursor in the same commit).
pub(crate) async fn insert_rows_in(
    tx: &mut sqlx::PgConnection,
    rows: &[JobRow],
) -> Result<Vec<bool>, StoreError> {
    Ok(insert_rows(tx, rows, &super::dependencies::Plan::default())
        .await?
        .into_iter()
        .map(|r| r.created_at.is_some())
        .collect())
}

/// The insert itself. ON CONFLICT DO NOTHING covers both the primary key and the dedup index;
/// the joins (on the statement's snapshot, which does not see its own inserts) say what each
/// row that was not inserted collided with.
async fn insert_rows(
    tx: &mut sqlx::PgConnection,
    rows: &[JobRow],
    plan: &super::dependencies::Plan,
) -> Result<Vec<Resolution>, StoreError> {
    let batch_ids: Vec<Option<Uuid>> = rows.iter().map(|r| r.batch_id).collect();
    let mut ids = Vec::with_capacity(rows.len());
    let mut kinds = Vec::with_capacity(rows.len());
    let mut payloads = Vec::with_capacity(rows.len());
    let mut keys = Vec::with_capacity(rows.len());
    let mut budgets = Vec::with_capacity(rows.len());
    let mut run_ats = Vec::with_capacity(rows.len());
    let mut queues = Vec::with_capacity(rows.len());
    let mut prefixes = Vec::with_capacity(rows.len());
    let mut priorities = Vec::with_capacity(rows.len());
    let mut ckeys = Vec::with_capacity(rows.len());
    let mut callbacks = Vec::with_capacity(rows.len());
    for r in rows {
        callbacks.push(r.callback_url.as_deref());
        queues.push(r.queue.as_str());
        prefixes.push(r.prefix.as_str());
        priorities.push(i16::from(r.priority));
        ckeys.push(r.concurrency_key.as_deref());
        ids.push(r.id);
        kinds.push(r.kind.as_str());
        payloads.push(r.payload.get());
        keys.push(r.dedup_key.as_deref());
        budgets.push(r.max_attempts);
        run_ats.push(r.run_at);
    }
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH input AS (
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::timestamptz[],
                                  $7::text[], $8::text[], $9::int2[], $10::text[], $11::text[], $12::text[],
                                  $13::int4[], $14::bool[], $15::uuid[], $18::text[])
                 WITH ORDINALITY AS t(id, kind, payload, dedup_key, max_attempts, run_at, queue, prefix,
                                      priority, concurrency_key, status, error, deps_left, has_dependents,
                                      batch_id, callback_url, ord)
         ), ins AS (
             INSERT INTO apiary_jobs (id, kind, payload, dedup_key, max_attempts, run_at, queue, prefix,
                                      priority, concurrency_key, status, error, finished_at, deps_left,
                                      has_dependents, batch_id, callback_url)
             SELECT id, kind, payload::json, dedup_key, max_attempts, run_at, queue, prefix, priority,
                    concurrency_key, coalesce(status, 'queued'), error,
                    CASE WHEN status = 'cancelled' THEN now() END, deps_left,
                    coalesce(has_dependents, false), batch_id, callback_url
               FROM input ORDER BY ord
             ON CONFLICT DO NOTHING
             RETURNING id, created_at, status
         ), outbox AS (
             INSERT INTO apiary_outbox (job_id) SELECT id FROM ins WHERE status = 'queued'
         ), edges AS (
             -- Only the edges of children this statement wrote: an existing child keeps its own.
             INSERT INTO apiary_job_deps (child, parent)
             SELECT e.child, e.parent FROM unnest($16::uuid[], $17::uuid[]) AS e(child, parent)
               JOIN ins ON ins.id = e.child
             ON CONFLICT DO NOTHING
         )
         SELECT ins.created_at, b.id AS by_id, {same} AS same,
                b.kind AS by_id_kind, k.id AS by_key
           FROM input i
           LEFT JOIN ins ON ins.id = i.id
           LEFT JOIN apiary_jobs b ON b.id = i.id
           LEFT JOIN apiary_jobs k ON k.kind = i.kind AND k.dedup_key = i.dedup_key AND k.duplicate_of IS NULL
          ORDER BY i.ord",
        same = crate::store::claim_job::same_job("b", "i")
    )))
    .bind(&ids)
    .bind(&kinds)
    .bind(&payloads)
    .bind(&keys)
    .bind(&budgets)
    .bind(&run_ats)
    .bind(&queues)
    .bind(&prefixes)
    .bind(&priorities)
    .bind(&ckeys)
    .bind(plan.statuses(rows.len()))
    .bind(plan.errors(rows.len()))
    .bind(plan.deps_left(rows.len()))
    .bind(plan.has_dependents(rows.len()))
    .bind(&batch_ids)
    .bind(&plan.edge_children)
    .bind(&plan.edge_parents)
    .bind(&callbacks)
    .fetch_all(&mut *tx)
    .await
    .context("inserting jobs")
}

/// What a row collided with that the insert's snapshot did not show.
async fn resolve_late(tx: &mut sqlx::PgConnection, row: &JobRow) -> Result<Inserted, StoreError> {
    #[derive(sqlx::FromRow)]
    struct Found {
        id: Uuid,
        by_id: bool,
        same: bool,
        kind: String,
    }
    let found: Option<Found> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT j.id, true AS by_id, {same} AS same, j.kind
           FROM apiary_jobs j, (SELECT $2::text AS kind, $3::text AS dedup_key, $4::text AS payload) m
          WHERE j.id = $1
         UNION ALL
         SELECT id, false, true, kind FROM apiary_jobs
          WHERE kind = $2 AND dedup_key = $3 AND duplicate_of IS NULL
         LIMIT 1",
        same = crate::store::claim_job::same_job("j", "m")
    )))
    .bind(row.id)
    .bind(&row.kind)
    .bind(&row.dedup_key)
    .bind(row.payload.get())
    .fetch_optional(&mut *tx)
    .await
    .context("resolving a dedup conflict")?;
    Ok(match found {
        Some(f) if !f.by_id || f.same => Inserted::Existing(f.id),
        Some(f) => Inserted::Conflict(format!(
            "id {} already belongs to another job (kind {:?}, with another dedup key or payload)",
            f.id, f.kind
        )),
        // The conflicting row vanished (pruned that instant). Nothing was written for this
        // row; the caller's retry of the enqueue records it.
        None => {
            return Err(StoreError::Query {
                context: "resolving a dedup conflict (the conflicting job was just pruned; retry)",
                source: sqlx::Error::RowNotFound,
            });
        }
    })
}
