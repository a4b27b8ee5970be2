//! Cancelling a job. A job that has not started is cancelled at once, and its message,
//! wherever it waits, is acked unrun when it arrives. A running job is flagged; its worker's
//! heartbeat sees the flag and fires the handler's cancellation token.

use super::{Context, DONE_CHANNEL, Store, StoreError};
use crate::job::{JobId, JobStatus};

/// What a cancel request did.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It had not started: it is `cancelled` now.
    Cancelled,
    /// It is running: its handler is being told, and it ends `cancelled` when it returns.
    Requested,
    /// It had already finished, with this status.
    AlreadyFinal(JobStatus),
    /// No such job.
    NotFound,
}

impl Store {
    /// Cancels job `id`.
    pub async fn cancel_job(&self, id: JobId) -> Result<CancelOutcome, StoreError> {
        let row: Option<(String, String)> = sqlx::query_as(
            "WITH old AS (
                 SELECT id, status FROM apiary_jobs WHERE id = $1 FOR UPDATE
             ), upd AS (
                 UPDATE apiary_jobs j
                    SET cancel_requested = true,
                        status = CASE WHEN old.status IN ('waiting', 'queued', 'retrying') THEN 'cancelled' ELSE j.status END,
                        finished_at = CASE WHEN old.status IN ('waiting', 'queued', 'retrying') THEN now() ELSE j.finished_at END,
                        next_attempt_at = CASE WHEN old.status IN ('waiting', 'queued', 'retrying') THEN NULL ELSE j.next_attempt_at END
                   FROM old
                  WHERE j.id = old.id AND old.status IN ('waiting', 'queued', 'retrying', 'running')
                 RETURNING j.id, j.status
             )
             SELECT old.status, coalesce(upd.status, old.status) FROM old LEFT JOIN upd ON upd.id = old.id",
        )
        .bind(id)
        .fetch_optional(self.pool())
        .await
        .context("cancelling a job")?;
        let Some((old, new)) = row else {
            return Ok(CancelOutcome::NotFound);
        };
        let old: JobStatus = old.parse().unwrap_or(JobStatus::Failed);
        Ok(match (old, new.as_str()) {
            (_, "cancelled") if !old.is_final() => {
                let _ = sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(DONE_CHANNEL)
                    .bind(id.to_string())
                    .execute(self.pool())
                    .await;
                CancelOutcome::Cancelled
            }
            (JobStatus::Running, _) => CancelOutcome::Requested,
            (s, _) => CancelOutcome::AlreadyFinal(s),
        })
    }
}
