//! Job dependencies: what recording a job with `depends_on` decides (`plan`), what a
//! handler reads of its parents ([`Store::parent_results`]), and which jobs a finish released
//! ([`Store::released_by`]). Releasing itself is the schema's: a trigger on the parent's final
//! status, in the same transaction (migration 0014), so no path that ends a job can forget it.

use std::collections::{HashMap, HashSet};

use serde_json::Value;
use uuid::Uuid;

use super::insert_job::JobRow;
use super::{Context, Store, StoreError};
use crate::job::{JobId, JobStatus};

/// How each row of an insert is recorded given its parents: its status, its count of parents
/// still to succeed, whether a later row depends on it, and its edges. Empty (every row plain)
/// when no row names a parent.
#[derive(Debug, Default)]
pub struct Plan {
    rows: Vec<RowPlan>,
    /// Edge children, parallel to `edge_parents`.
    pub edge_children: Vec<Uuid>,
    /// Edge parents.
    pub edge_parents: Vec<Uuid>,
    /// `(row, parent)` for parents that are rows of the same insert.
    inner: Vec<(usize, JobId)>,
}

#[derive(Debug, Default, Clone)]
struct RowPlan {
    status: Option<&'static str>,
    error: Option<String>,
    deps_left: Option<i32>,
    has_dependents: Option<bool>,
}

impl Plan {
    /// Each row's status (`None`: queued).
    pub fn statuses(&self, n: usize) -> Vec<Option<&'static str>> {
        self.column(n, |r| r.status)
    }
    /// Each row's error (a cancellation's reason).
    pub fn errors(&self, n: usize) -> Vec<Option<String>> {
        self.column(n, |r| r.error.clone())
    }
    /// Each row's count of parents still to succeed.
    pub fn deps_left(&self, n: usize) -> Vec<Option<i32>> {
        self.column(n, |r| r.deps_left)
    }
    /// Whether a later row of the insert depends on each row.
    pub fn has_dependents(&self, n: usize) -> Vec<Option<bool>> {
        self.column(n, |r| r.has_dependents)
    }
    /// `(row, parent)` for parents that are rows of the same insert.
    pub fn inner_parents(&self) -> impl Iterator<Item = (usize, JobId)> + '_ {
        self.inner.iter().copied()
    }

    fn column<T>(&self, n: usize, f: impl Fn(&RowPlan) -> Option<T>) -> Vec<Option<T>> {
        if self.rows.is_empty() {
            return (0..n).map(|_| None).collect();
        }
        self.rows.iter().map(f).collect()
    }
}

/// Decides how `rows` are recorded, locking their recorded parents (in id order, so two
/// inserts cannot deadlock on them) and marking them `has_dependents` so their final status
/// fires the release trigger. `Err((row, reason))` for a parent that is unknown (never
/// recorded, or pruned) or comes later in the same insert: nothing may be written then.
///
/// A parent that is a `duplicate` stands for its original, which is what the child waits for.
pub(crate) async fn plan(
    tx: &mut sqlx::PgConnection,
    rows: &[JobRow],
) -> Result<Result<Plan, (usize, String)>, StoreError> {
    if rows.iter().all(|r| r.depends_on.is_empty()) {
        return Ok(Ok(Plan::default()));
    }
    let position: HashMap<JobId, usize> = rows.iter().enumerate().map(|(i, r)| (r.id, i)).collect();
    let mut outside: Vec<Uuid> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        for p in &r.depends_on {
            match position.get(p) {
                Some(&j) if j < i => {}
                Some(_) => {
                    return Ok(Err((
                        i,
                        format!(
                            "names {p}, which comes at or after this job in the same request; a parent must come first"
                        ),
                    )));
                }
                None => outside.push(*p),
            }
        }
    }
    outside.sort_unstable();
    outside.dedup();

    // Lock what the children name; a duplicate's original is locked in a second pass.
    let mut found: HashMap<Uuid, (String, Option<Uuid>)> = HashMap::new();
    let mut want = outside.clone();
    for _ in 0..2 {
        if want.is_empty() {
            break;
        }
        let got: Vec<(Uuid, String, Option<Uuid>)> = sqlx::query_as(
            "SELECT id, status, duplicate_of FROM apiary_jobs WHERE id = ANY($1)
              ORDER BY id FOR NO KEY UPDATE",
        )
        .bind(&want)
        .fetch_all(&mut *tx)
        .await
        .context("locking a job's parents")?;
        want = got
            .iter()
            .filter_map(|(_, _, d)| *d)
            .filter(|d| !found.contains_key(d))
            .collect();
        for (id, status, dup) in got {
            found.insert(id, (status, dup));
        }
    }
    let resolve = |p: Uuid| -> Option<(Uuid, JobStatus)> {
        let (status, dup) = found.get(&p)?;
        match dup {
            Some(orig) => {
                let (s, _) = found.get(orig)?;
                Some((*orig, s.parse().ok()?))
            }
            None => Some((p, status.parse().ok()?)),
        }
    };
    let mut marked: Vec<Uuid> = Vec::new();
    let mut plan = Plan {
        rows: vec![RowPlan::default(); rows.len()],
        ..Plan::default()
    };
    for (i, r) in rows.iter().enumerate() {
        if r.depends_on.is_empty() {
            continue;
        }
        let mut seen = HashSet::new();
        let mut left = 0;
        let mut cancel: Option<String> = None;
        for &p in &r.depends_on {
            if let Some(&j) = position.get(&p) {
                if !seen.insert(p) {
                    continue;
                }
                plan.inner.push((i, p));
                plan.rows[j].has_dependents = Some(true);
                plan.edge_children.push(r.id);
                plan.edge_parents.push(p);
                if plan.rows[j].status == Some("cancelled") {
                    cancel.get_or_insert(format!("cancelled: parent job {p} ended cancelled"));
                } else {
                    left += 1;
                }
                continue;
            }
            let Some((parent, status)) = resolve(p) else {
                return Ok(Err((
                    i,
                    format!(
                        "names {p}, which is not a recorded job (never recorded, or already pruned)"
                    ),
                )));
            };
            if !seen.insert(parent) {
                continue;
            }
            plan.edge_children.push(r.id);
            plan.edge_parents.push(parent);
            // Marked even when final: the flag also keeps the pruner off a parent whose
            // child still waits (on another parent) and will read it.
            marked.push(parent);
            match status {
                JobStatus::Succeeded => {}
                s if s.is_final() => {
                    cancel.get_or_insert(format!("cancelled: parent job {parent} ended {s}"));
                }
                _ => left += 1,
            }
        }
        let row = &mut plan.rows[i];
        row.deps_left = Some(left);
        if let Some(reason) = cancel {
            row.status = Some("cancelled");
            row.error = Some(reason);
        } else if left > 0 {
            row.status = Some("waiting");
        }
    }
    if !marked.is_empty() {
        marked.sort_unstable();
        marked.dedup();
        sqlx::query(
            "UPDATE apiary_jobs SET has_dependents = true WHERE id = ANY($1) AND NOT has_dependents",
        )
        .bind(&marked)
        .execute(&mut *tx)
        .await
        .context("marking parents")?;
    }
    Ok(Ok(plan))
}

/// One parent as a handler sees it ([`crate::handler::JobContext::parent_results`]).
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ParentResult {
    /// The parent's id.
    pub id: JobId,
    /// Its kind; `None` if it was pruned.
    pub kind: Option<String>,
    /// Its status; `None` if it was pruned.
    pub status: Option<JobStatus>,
    /// Its result.
    pub result: Option<Value>,
}

impl ParentResult {
    /// The result decoded as `T`; `None` if there is none.
    pub fn result_as<T: serde::de::DeserializeOwned>(
        &self,
    ) -> Result<Option<T>, serde_json::Error> {
        self.result.as_ref().map(T::deserialize).transpose()
    }
}

impl Store {
    /// The parents of `child`, in id order, with their status and result as they stand.
    pub async fn parent_results(&self, child: JobId) -> Result<Vec<ParentResult>, StoreError> {
        /// One parent as read: `None`s where it was pruned.
        type Row = (
            Uuid,
            Option<String>,
            Option<String>,
            Option<sqlx::types::Json<Value>>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT d.parent, j.kind, j.status, j.result
                   FROM apiary_job_deps d LEFT JOIN apiary_jobs j ON j.id = d.parent
                  WHERE d.child = $1 ORDER BY d.parent",
        )
        .bind(child)
        .fetch_all(self.pool())
        .await
        .context("reading a job's parents")?;
        Ok(rows
            .into_iter()
            .map(|(id, kind, status, result)| ParentResult {
                id,
                kind,
                status: status.and_then(|s| s.parse().ok()),
                result: result.map(|r| r.0),
            })
            .collect())
    }

    /// The jobs whose outbox rows the final statuses of `finished` wrote through the
    /// triggers: children they released, callbacks of batches they completed and those
    /// batches' webhook deliveries. Read after the commit, so the committer can publish those
    /// at once instead of leaving them to the relay's grace.
    pub async fn released_by(&self, finished: &[JobId]) -> Result<Vec<JobId>, StoreError> {
        sqlx::query_scalar(
            "SELECT o.job_id FROM apiary_outbox o
              WHERE o.dead_reason IS NULL AND o.job_id IN (
                    SELECT d.child FROM apiary_job_deps d WHERE d.parent = ANY($1)
                    UNION ALL
                    SELECT b.callback_id FROM apiary_jobs j JOIN apiary_batches b ON b.id = j.batch_id
                     WHERE j.id = ANY($1) AND b.status = 'completed'
                    UNION ALL
                    -- The batch's own webhook delivery (migration 0015), named by its derived id.
                    SELECT apiary_webhook_id('batch', b.id, b.finished_at)
                      FROM apiary_jobs j JOIN apiary_batches b ON b.id = j.batch_id
                     WHERE j.id = ANY($1) AND b.callback_url IS NOT NULL AND b.finished_at IS NOT NULL)",
        )
        .bind(finished)
        .fetch_all(self.pool())
        .await
        .context("reading released jobs")
    }
}

/// A job that waits for (or waited for) another: what the parent's page lists.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct Child {
    /// The child's id.
    #[cfg_attr(feature = "api", schema(value_type = String, format = Uuid))]
    pub id: JobId,
    /// Its kind.
    pub kind: String,
    /// Its status now.
    pub status: String,
}

/// The most children [`Store::children`] returns.
pub const MAX_CHILDREN: i64 = 1_000;

impl Store {
    /// The jobs that named `parent` in `depends_on`, oldest first, at most [`MAX_CHILDREN`].
    pub async fn children(&self, parent: JobId) -> Result<Vec<Child>, StoreError> {
        sqlx::query_as(
            "SELECT j.id, j.kind, j.status FROM apiary_job_deps d
               JOIN apiary_jobs j ON j.id = d.child
              WHERE d.parent = $1
              ORDER BY j.created_at, j.id LIMIT $2",
        )
        .bind(parent)
        .bind(MAX_CHILDREN)
        .fetch_all(self.pool())
        .await
        .context("reading a job's dependents")
    }
}
