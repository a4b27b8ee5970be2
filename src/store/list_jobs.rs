//! ⑦ Listing jobs newest first, filtered, with a cursor, in pages bounded three ways: by rows
//! (`limit`), by bytes ([`JobFilter::max_bytes`]) and, for a filter no index serves, by the
//! rows examined ([`JobFilter::scan_budget`]).
//!
//! A page is read in two statements. The first walks an index newest first and returns the
//! ids of the candidates, never more than `limit`, without touching payloads. The second
//! walks those candidates in order adding up their sizes, stops before the one that would
//! pass `max_bytes` (the first always goes in), and returns the rows that fit. So neither a
//! page of large jobs nor a sparse filter reads more than its bounds.
//!
//! Which index serves which filter (every index is on columns that never change after
//! insert, so claims and finishes stay HOT; there is none on `status`):
//!
//! | filter | index |
//! | --- | --- |
//! | none | `apiary_jobs_created (created_at DESC, id DESC)` |
//! | `kind` | `apiary_jobs_kind_created (kind, created_at DESC, id DESC)` |
//! | `dedup_key`, with or without `kind` | `apiary_jobs_dedup_key_created (dedup_key, created_at DESC, id DESC)` (0007) |
//! | `queue`, alone or with `kind` | `apiary_jobs_queue_created (queue, created_at DESC, id DESC)` (0010), or the `kind` index, as the planner finds cheaper |
//! | `status`, alone or with the above | the same index, but `status` is checked on each row examined, and at most `scan_budget` rows are |
//!
//! `created_after` and `created_before` bound `created_at`, the column every one of these
//! indexes ends in, so a time range narrows the same scan.
//!
//! `before` becomes a row comparison `(created_at, id) < (...)` that each of these indexes
//! takes as an index condition, so a later page starts where the previous one stopped
//! rather than counting past it.

use sqlx::{Postgres, QueryBuilder};

use super::get_job::JOB_COLUMNS;
use super::{Context, Store, StoreError};
use crate::job::{Job, JobId, JobStatus};

/// The most bytes of job records a page holds, by default (8 MiB). A page always holds at
/// least one job, however large.
pub const MAX_PAGE_BYTES: i64 = 8 * 1024 * 1024;

/// The most rows a page examines for a filter no index serves (`status`), by default.
pub const DEFAULT_SCAN_BUDGET: i64 = 50_000;

/// A job's size as a page counts it: its variable fields as stored, plus a fixed allowance
/// for the rest of its JSON (keys, ids, timestamps). Cheap: `payload` and `result` are
/// `json`, stored as text, so nothing is parsed; and it is computed only for candidates.
const JOB_BYTES: &str = "(400 + octet_length(j.kind) + octet_length(j.payload::text) \
     + coalesce(octet_length(j.result::text), 0) + coalesce(octet_length(j.dedup_key), 0) \
     + coalesce(octet_length(j.error), 0) + octet_length(j.errors::text) \
     + coalesce(octet_length(j.raw_body), 0))::bigint";

/// Filters and bounds for [`Store::list_jobs`]; every filter is optional.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone)]
pub struct JobFilter {
    /// Only jobs in this status.
    pub status: Option<JobStatus>,
    /// Only jobs of this kind.
    pub kind: Option<String>,
    /// Only jobs with this dedup key (the owner and its duplicates).
    pub dedup_key: Option<String>,
    /// Only jobs of this queue (of any deployment sharing the database).
    pub queue: Option<String>,
    /// Only jobs created at or after this instant.
    pub created_after: Option<chrono::DateTime<chrono::Utc>>,
    /// Only jobs created before this instant.
    pub created_before: Option<chrono::DateTime<chrono::Utc>>,
    /// Only jobs older than this one: the cursor from the previous page.
    pub before: Option<JobId>,
    /// At most this many jobs.
    pub limit: i64,
    /// At most this many bytes of jobs (each counted as stored, plus a fixed allowance for
    /// its other fields), but at least one job.
    pub max_bytes: i64,
    /// With a `status` filter, examine at most this many rows.
    pub scan_budget: i64,
}

impl Default for JobFilter {
    fn default() -> Self {
        JobFilter {
            status: None,
            kind: None,
            dedup_key: None,
            queue: None,
            created_after: None,
            created_before: None,
            before: None,
            limit: 50,
            max_bytes: MAX_PAGE_BYTES,
            scan_budget: DEFAULT_SCAN_BUDGET,
        }
    }
}

/// One page of [`Store::list_jobs`].
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, PartialEq)]
pub struct JobPage {
    /// The jobs, newest first.
    pub jobs: Vec<Job>,
    /// Where the next page starts (its `before`); `None` when nothing older can match. Set
    /// whenever a bound ended the page: `limit` jobs, `max_bytes`, or the scan budget, in
    /// which case it is the last row examined and `jobs` may hold fewer than `limit` jobs,
    /// even none.
    pub next: Option<JobId>,
}

/// The first statement's answer: candidates in order, and whether the scan budget ran out.
struct Candidates {
    ids: Vec<JobId>,
    /// The last row examined, when the scan stopped at its budget.
    boundary: Option<JobId>,
}

impl JobFilter {
    /// With a `status` filter no index serves it, so rows are examined up to the budget;
    /// without one, every row the index yields matches and `limit` rows are enough.
    fn scan_rows(&self) -> i64 {
        if self.status.is_some() {
            self.scan_budget.max(1)
        } else {
            self.limit.max(1)
        }
    }

    /// The first statement: the ids of up to `limit` matching jobs newest first, having
    /// examined at most [`JobFilter::scan_rows`] rows, plus the last row examined if the scan
    /// used its whole budget.
    ///
    /// The inner `LIMIT` bounds the rows read through the index. The window counts matches
    /// as rows stream past (`ROWS ... CURRENT ROW` needs no look-ahead, and the outer `ORDER
    /// BY` is the order the rows already arrive in, so nothing is sorted), and the outer
    /// `LIMIT` stops the scan as soon as `limit` matches are out. Fewer matches than that
    /// means the scan ran to its budget or to the end of the table; the row numbered
    /// `scan_rows` tells which.
    fn candidates_query(&self, prefix: &str) -> QueryBuilder<Postgres> {
        let scan = self.scan_rows();
        let mut q: QueryBuilder<Postgres> =
            QueryBuilder::new(format!("{prefix}SELECT id, matched, n = "));
        q.push_bind(scan).push(
            " AS boundary FROM (
                 SELECT id, created_at, matched,
                        count(*) FILTER (WHERE matched) OVER w AS m,
                        row_number() OVER w AS n
                   FROM (SELECT id, created_at, ",
        );
        match self.status {
            Some(status) => q.push("status = ").push_bind(status.as_str()),
            None => q.push("true"),
        };
        q.push(" AS matched FROM apiary_jobs WHERE true");
        if let Some(kind) = &self.kind {
            q.push(" AND kind = ").push_bind(kind.clone());
        }
        if let Some(key) = &self.dedup_key {
            q.push(" AND dedup_key = ").push_bind(key.clone());
        }
        if let Some(queue) = &self.queue {
            q.push(" AND queue = ").push_bind(queue.clone());
        }
        // Every index ends in `created_at`: a time range bounds the same index scan.
        if let Some(after) = self.created_after {
            q.push(" AND created_at >= ").push_bind(after);
        }
        if let Some(until) = self.created_before {
            q.push(" AND created_at < ").push_bind(until);
        }
        if let Some(before) = self.before {
            // An unknown cursor compares with NULL: an empty page.
            q.push(" AND (created_at, id) < (SELECT created_at, id FROM apiary_jobs WHERE id = ")
                .push_bind(before)
                .push(")");
        }
        q.push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind(scan)
            .push(
                ") examined
                 WINDOW w AS (ORDER BY created_at DESC, id DESC ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
               ) x
              WHERE (matched AND m <= ",
            )
            .push_bind(self.limit)
            .push(") OR n = ")
            .push_bind(scan)
            .push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind(self.limit);
        q
    }
}

impl Store {
    /// Jobs matching `filter`, newest first, within its bounds. An unknown cursor id yields
    /// an empty page.
    pub async fn list_jobs(&self, filter: &JobFilter) -> Result<JobPage, StoreError> {
        let found = self.list_candidates(filter).await?;
        let jobs = if found.ids.is_empty() {
            Vec::new()
        } else {
            self.read_within(&found.ids, filter.max_bytes).await?
        };
        let next = if jobs.len() < found.ids.len() {
            // Cut short by bytes: continue after the last job that fitted.
            jobs.last().map(|j| j.id)
        } else if found.ids.len() as i64 >= filter.limit {
            found.ids.last().copied()
        } else {
            // Fewer matches than asked for: the scan either reached the end of the table
            // (nothing older matches) or spent its budget (continue after the last row it
            // examined, which may not be a match).
            found.boundary
        };
        Ok(JobPage { jobs, next })
    }

    async fn list_candidates(&self, filter: &JobFilter) -> Result<Candidates, StoreError> {
        let mut q = filter.candidates_query("");
        let rows: Vec<(JobId, bool, bool)> = q
            .build_query_as()
            .fetch_all(self.pool())
            .await
            .context("listing jobs")?;
        let mut found = Candidates {
            ids: Vec::with_capacity(rows.len()),
            boundary: None,
        };
        for (id, matched, boundary) in rows {
            if matched {
                found.ids.push(id);
            }
            if boundary {
                found.boundary = Some(id);
            }
        }
        Ok(found)
    }

    /// The jobs `ids` (newest first, as given) up to `max_bytes`: the walk sizes one job at
    /// a time and stops at the first that would not fit, so no job after that one is sized
    /// and none past the bound is sent. The first job always goes in.
    async fn read_within(&self, ids: &[JobId], max_bytes: i64) -> Result<Vec<Job>, StoreError> {
        let sql = format!(
            "WITH RECURSIVE walk(ord, id, total) AS (
                 SELECT 1, ($1::uuid[])[1],
                        coalesce((SELECT {JOB_BYTES} FROM apiary_jobs j WHERE j.id = ($1::uuid[])[1]), 0)
               UNION ALL
                 SELECT w.ord + 1, ($1::uuid[])[w.ord + 1], w.total + nx.bytes
                   FROM walk w
                  CROSS JOIN LATERAL (
                      SELECT coalesce((SELECT {JOB_BYTES} FROM apiary_jobs j
                                        WHERE j.id = ($1::uuid[])[w.ord + 1]), 0) AS bytes
                  ) nx
                  WHERE w.ord < cardinality($1::uuid[])
                    AND w.total + nx.bytes <= $2
             )
             SELECT {JOB_COLUMNS} FROM walk JOIN apiary_jobs USING (id) ORDER BY walk.ord"
        );
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(ids)
            .bind(max_bytes)
            .fetch_all(self.pool())
            .await
            .context("reading a page of jobs")
    }

    /// How Postgres runs the first statement of [`Store::list_jobs`] for `filter`, executed
    /// (`EXPLAIN (ANALYZE, FORMAT JSON)`): the plan with the rows each node actually read.
    /// Shows operators and tests that a filter reads what its bounds allow and no more.
    pub async fn explain_list_jobs(
        &self,
        filter: &JobFilter,
    ) -> Result<serde_json::Value, StoreError> {
        let mut q = filter.candidates_query("EXPLAIN (ANALYZE, FORMAT JSON) ");
        let plan: sqlx::types::Json<serde_json::Value> = q
            .build_query_scalar()
            .fetch_one(self.pool())
            .await
            .context("explaining a job listing")?;
        Ok(plan.0)
    }
}
