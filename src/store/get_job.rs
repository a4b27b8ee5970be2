//! ⑦ Reading one job: by id, or by its `(kind, dedup_key)`.

use super::{Context, Store, StoreError};
use crate::job::{Job, JobId};

/// The columns of [`Job`], in one place for every query that returns jobs.
pub(crate) const JOB_COLUMNS: &str = "id, kind, status, payload, dedup_key, attempts, max_attempts, result, error, \
     errors, duplicate_of, run_at, next_attempt_at, raw_body, created_at, started_at, finished_at, \
     queue, priority, concurrency_key, progress, progress_detail, progress_at, callback_url, batch_id, \
     CASE WHEN deps_left IS NULL THEN '{}'::uuid[] ELSE ARRAY(SELECT d.parent FROM apiary_job_deps d \
          WHERE d.child = apiary_jobs.id ORDER BY d.parent) END AS depends_on";

impl Store {
    /// The job with this id, if any.
    pub async fn get_job(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM apiary_jobs WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(self.pool())
        .await
        .context("reading a job")
    }

    /// The job that owns `(kind, dedup_key)`, if any (never a `duplicate` record).
    pub async fn get_job_by_dedup_key(
        &self,
        kind: &str,
        dedup_key: &str,
    ) -> Result<Option<Job>, StoreError> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM apiary_jobs WHERE kind = $1 AND dedup_key = $2 AND duplicate_of IS NULL"
        )))
        .bind(kind)
        .bind(dedup_key)
        .fetch_optional(self.pool())
        .await
        .context("reading a job by dedup key")
    }

    /// The jobs with these ids, in no particular order.
    pub async fn get_jobs(&self, ids: &[JobId]) -> Result<Vec<Job>, StoreError> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM apiary_jobs WHERE id = ANY($1)"
        )))
        .bind(ids)
        .fetch_all(self.pool())
        .await
        .context("reading jobs")
    }
}
