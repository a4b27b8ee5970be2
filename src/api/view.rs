//! What a route that answers with a job shows its caller: the whole record to one who may
//! read jobs, a redacted view to one who may not.
//!
//! Enqueue and admin tokens change jobs without reading them: a producer whose dedup key
//! is already taken gets back the existing job, possibly another producer's, and an operator
//! who cancels or replays gets back the job it acted on. Neither may see what the job
//! carries, so without the `read` scope the answer keeps what identifies the job and where
//! it stands, and leaves out everything a producer or handler wrote into it: `payload`,
//! `result`, `error`, `errors` (handler messages often quote their input), `raw_body` and
//! `callback_url` (its query string may hold the receiver's token).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::auth::{Granted, Scope};
use crate::job::{Job, JobId, JobStatus};

/// A job as one caller may see it.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum JobView {
    /// The whole record: the caller holds `read` (or authentication is off).
    Full(Box<Job>),
    /// The record without anything written into the job.
    Redacted(RedactedJob),
}

impl JobView {
    /// `job` as a caller granted `granted` may see it.
    pub fn of(job: Job, granted: Granted) -> JobView {
        if granted.allows(Scope::Read) {
            JobView::Full(Box::new(job))
        } else {
            JobView::Redacted(RedactedJob::from(job))
        }
    }

    /// The job's id.
    pub fn id(&self) -> JobId {
        match self {
            JobView::Full(j) => j.id,
            JobView::Redacted(r) => r.id,
        }
    }
}

/// A job without its contents: what a token without `read` sees.
///
/// `dedup_key` stays: the producer chose it to name the job, and a producer told "this key is
/// taken" needs it to tell which of its jobs that is. Timestamps and counters say where the
/// job stands and nothing of what it carries.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RedactedJob {
    /// The job's id.
    #[cfg_attr(feature = "api", schema(value_type = String, format = Uuid))]
    pub id: JobId,
    /// The handler name.
    pub kind: String,
    /// Where the job stands.
    pub status: JobStatus,
    /// The producer's idempotency key, if any.
    pub dedup_key: Option<String>,
    /// Attempts started so far.
    pub attempts: i32,
    /// Attempts allowed before the job is dead.
    pub max_attempts: i32,
    /// For a `duplicate`: the job that owns the dedup key.
    #[cfg_attr(feature = "api", schema(value_type = Option<String>, format = Uuid))]
    pub duplicate_of: Option<JobId>,
    /// When a scheduled job becomes due.
    pub run_at: Option<DateTime<Utc>>,
    /// When a retrying job's next attempt is due.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// When the job was recorded.
    pub created_at: DateTime<Utc>,
    /// When the latest attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When the job reached a final status.
    pub finished_at: Option<DateTime<Utc>>,
    /// The queue it belongs to.
    pub queue: String,
    /// 0 to 9, higher first.
    pub priority: i16,
    /// The running attempt's progress, 0 to 1 (its detail is content, and left out).
    pub progress: Option<f64>,
    /// Always true: the contents were left out because the token lacks `read`.
    pub redacted: bool,
}

impl From<Job> for RedactedJob {
    fn from(job: Job) -> RedactedJob {
        RedactedJob {
            id: job.id,
            kind: job.kind,
            status: job.status.0,
            dedup_key: job.dedup_key,
            attempts: job.attempts,
            max_attempts: job.max_attempts,
            duplicate_of: job.duplicate_of,
            run_at: job.run_at,
            next_attempt_at: job.next_attempt_at,
            created_at: job.created_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
            queue: job.queue,
            priority: job.priority,
            progress: job.progress,
            redacted: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobStatusText;
    use serde_json::json;

    fn job() -> Job {
        Job {
            id: uuid::Uuid::now_v7(),
            kind: "echo".into(),
            status: JobStatusText(JobStatus::Dead),
            payload: json!({"secret": "payload"}),
            dedup_key: Some("key-1".into()),
            attempts: 3,
            max_attempts: 3,
            result: Some(json!("secret result")),
            error: Some("secret error".into()),
            errors: json!([{"attempt": 1, "error": "secret error"}]),
            duplicate_of: None,
            run_at: None,
            next_attempt_at: None,
            raw_body: Some("secret body".into()),
            created_at: Utc::now(),
            started_at: Some(Utc::now()),
            finished_at: Some(Utc::now()),
            queue: "default".into(),
            priority: 0,
            concurrency_key: None,
            progress: Some(0.5),
            progress_detail: Some(json!({"secret": "detail"})),
            progress_at: Some(Utc::now()),
            depends_on: Vec::new(),
            batch_id: None,
            // A URL's query often carries the receiver's token.
            callback_url: Some("https://hooks.test/x?token=secret".into()),
        }
    }

    #[test]
    fn without_read_nothing_written_into_the_job_is_shown() {
        let j = job();
        let shown = serde_json::to_value(JobView::of(j.clone(), Granted::NONE)).expect("json");
        for field in [
            "payload",
            "result",
            "error",
            "errors",
            "raw_body",
            "callback_url",
        ] {
            assert!(shown.get(field).is_none(), "{field} shown: {shown}");
        }
        assert!(!shown.to_string().contains("secret"), "{shown}");
        assert_eq!(shown["id"], json!(j.id));
        assert_eq!(shown["status"], json!("dead"));
        assert_eq!(shown["dedup_key"], json!("key-1"));
        assert_eq!(shown["redacted"], json!(true));
    }

    #[test]
    fn with_read_or_without_authentication_the_whole_job_is_shown() {
        let j = job();
        let whole = serde_json::to_value(&j).expect("json");
        let shown = serde_json::to_value(JobView::of(j, Granted::ALL)).expect("json");
        assert_eq!(shown, whole);
    }
}
