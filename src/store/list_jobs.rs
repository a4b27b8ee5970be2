//! ⑦ Listing jobs newest first, filtered, with a cursor.

use sqlx::{Postgres, QueryBuilder};

use super::get_job::JOB_COLUMNS;
use super::{Context, Store, StoreError};
use crate::job::{Job, JobId, JobStatus};

/// Filters for [`Store::list_jobs`]; every field is optional.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// Only jobs in this status.
    pub status: Option<JobStatus>,
    /// Only jobs of this kind.
    pub kind: Option<String>,
    /// Only jobs with this dedup key (the owner and its duplicates).
    pub dedup_key: Option<String>,
    /// Only jobs older than this one: the cursor from the previous page.
    pub before: Option<JobId>,
    /// At most this many.
    pub limit: i64,
}

impl Store {
    /// Jobs matching `filter`, newest first. An unknown cursor id yields an empty page.
    pub async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, StoreError> {
        let mut q: QueryBuilder<Postgres> =
            QueryBuilder::new(format!("SELECT {JOB_COLUMNS} FROM apiary_jobs WHERE true"));
        if let Some(status) = filter.status {
            q.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(kind) = &filter.kind {
            q.push(" AND kind = ").push_bind(kind.clone());
        }
        if let Some(key) = &filter.dedup_key {
            q.push(" AND dedup_key = ").push_bind(key.clone());
        }
        if let Some(before) = filter.before {
            q.push(" AND (created_at, id) < (SELECT created_at, id FROM apiary_jobs WHERE id = ")
                .push_bind(before)
                .push(")");
        }
        q.push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind(filter.limit);
        q.build_query_as()
            .fetch_all(self.pool())
            .await
            .context("listing jobs")
    }
}
