//! What a job is: its id, its status and the transitions between statuses, the record the
//! store keeps ([`Job`]) and what a producer asks for ([`NewJob`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// A job's identifier: a UUID, v7 when Apiary makes it so ids sort by creation time. One id is
/// one job: see the crate's [guarantees](crate#guarantees).
pub type JobId = Uuid;

/// Kinds are `[a-z0-9_.-]{1,64}`: short, printable, safe in metric labels and URLs.
pub const MAX_KIND_LEN: usize = 64;
/// Dedup keys are at most this many bytes.
pub const MAX_DEDUP_KEY_BYTES: usize = 256;
/// The largest allowed `max_attempts`.
pub const MAX_ATTEMPTS_LIMIT: i32 = 1000;
/// Room for a message's envelope (id, kind, dedup key, budget, `run_at`, and whatever else a
/// producer adds) on top of the payload limit. The size rule is one rule everywhere: the
/// payload is at most `APIARY_MAX_PAYLOAD_BYTES`, measured as the JSON text the producer sent
/// (which is also the text Postgres keeps and every republish carries), and a message body
/// may be this much larger. Apiary's own envelopes take well under 1 KiB, so a job accepted at
/// the limit stays acceptable after any number of retries and delay hops.
pub const ENVELOPE_BYTES: usize = 64 * 1024;

/// Where a job stands. Stored as lower-case text; the schema's CHECK lists the same names. A
/// final status never changes except by a replay: see the crate's
/// [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Recorded with `depends_on`: not published until every parent has succeeded (then it
    /// becomes `queued`), and `cancelled` if a parent ends any other way.
    Waiting,
    /// Recorded and published; no worker has claimed it yet (or it is scheduled for later).
    Queued,
    /// A worker holds the claim and is running the handler.
    Running,
    /// An attempt failed with a retryable error; the next attempt waits in a delay queue.
    Retrying,
    /// The handler returned a result, committed with the job's own database writes.
    Succeeded,
    /// Ended without a result and without a dead letter (reserved for operator action).
    Failed,
    /// Failed permanently or ran out of attempts; its message sits in the dead-letter queue.
    Dead,
    /// A raw message repeated the `(kind, dedup_key)` of another job; see `duplicate_of`.
    Duplicate,
    /// Cancelled before it could finish.
    Cancelled,
}

impl JobStatus {
    /// Every status, in the order of a job's life.
    pub const ALL: [JobStatus; 9] = [
        JobStatus::Waiting,
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Retrying,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Dead,
        JobStatus::Duplicate,
        JobStatus::Cancelled,
    ];

    /// The name stored in Postgres and shown in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Waiting => "waiting",
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Retrying => "retrying",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Dead => "dead",
            JobStatus::Duplicate => "duplicate",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// Whether the job has ended: no worker will run it again unless an operator replays it.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded
                | JobStatus::Failed
                | JobStatus::Dead
                | JobStatus::Duplicate
                | JobStatus::Cancelled
        )
    }

    /// Whether a job may move from `self` to `next`. The store's guarded statements encode the
    /// same table in their `WHERE` clauses; this is the readable version, checked by tests.
    pub fn can_become(self, next: JobStatus) -> bool {
        use JobStatus::*;
        match (self, next) {
            (Queued | Retrying, Running) => true,
            // An expired lease is taken over by another worker: running again, one more attempt.
            (Running, Running) => true,
            (Running, Succeeded | Retrying | Dead | Cancelled | Queued) => true,
            (Queued | Retrying, Cancelled | Dead) => true,
            // Released when its last parent succeeds; cancelled when one ends otherwise (or
            // by an operator). A waiting job never runs before it is released.
            (Waiting, Queued | Cancelled) => true,
            // Replay of a dead or failed job.
            (Dead | Failed, Queued) => true,
            _ => false,
        }
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for JobStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown status {s:?}; expected one of {}",
                    JobStatus::ALL.map(JobStatus::as_str).join(", ")
                )
            })
    }
}

/// A job as the store records it and the API returns it. See the crate's
/// [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Job {
    /// The job's id.
    #[cfg_attr(feature = "api", schema(value_type = String, format = Uuid))]
    pub id: JobId,
    /// The handler name.
    pub kind: String,
    /// Where the job stands.
    #[sqlx(try_from = "String")]
    pub status: JobStatusText,
    /// The handler's input.
    pub payload: Value,
    /// The producer's idempotency key, if any: one job per `(kind, dedup_key)`.
    pub dedup_key: Option<String>,
    /// Attempts started so far.
    pub attempts: i32,
    /// Attempts allowed before the job is dead.
    pub max_attempts: i32,
    /// The handler's result, once succeeded.
    pub result: Option<Value>,
    /// The last error, if any attempt failed.
    pub error: Option<String>,
    /// Every failed attempt's error: `[{"attempt": n, "error": "...", "at": "..."}]`.
    pub errors: Value,
    /// For a `duplicate`: the job that owns the dedup key.
    #[cfg_attr(feature = "api", schema(value_type = Option<String>, format = Uuid))]
    pub duplicate_of: Option<JobId>,
    /// When a scheduled job becomes due.
    pub run_at: Option<DateTime<Utc>>,
    /// When a retrying job's next attempt is due.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// For a poison message: the body as received (cut to the size limit).
    pub raw_body: Option<String>,
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
    /// Its concurrency key, if any.
    pub concurrency_key: Option<String>,
    /// The running attempt's progress, 0 to 1, as its handler last reported it.
    pub progress: Option<f64>,
    /// The detail reported with the progress.
    pub progress_detail: Option<Value>,
    /// When the progress was written.
    pub progress_at: Option<DateTime<Utc>>,
    /// The jobs it waits for (its `depends_on`); empty for a job without parents.
    #[serde(default)]
    #[cfg_attr(feature = "api", schema(value_type = Vec<String>, format = Uuid))]
    pub depends_on: Vec<JobId>,
    /// The batch it belongs to, if any.
    #[serde(default)]
    pub batch_id: Option<Uuid>,
    /// Where the job's final record is POSTed when it ends (a completion webhook), if
    /// anywhere: the producer's, else its kind's.
    #[serde(default)]
    pub callback_url: Option<String>,
}

/// [`JobStatus`] as read from a text column; a thin wrapper so `FromRow` can convert it.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobStatusText(pub JobStatus);

impl TryFrom<String> for JobStatusText {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse().map(JobStatusText)
    }
}

impl Job {
    /// The job's status.
    pub fn status(&self) -> JobStatus {
        self.status.0
    }

    /// The handler's result decoded as `T` (a typed handler's
    /// [`Work::Output`](crate::handler::Work::Output)); `None` until the job has succeeded.
    pub fn result_as<T: serde::de::DeserializeOwned>(
        &self,
    ) -> Result<Option<T>, serde_json::Error> {
        self.result.as_ref().map(T::deserialize).transpose()
    }
}

/// What a producer asks for, with its kind as a string and its payload as JSON: the form other
/// languages' producers send. Build with [`NewJob::new`] and the `with_*` methods; from Rust,
/// [`crate::JobArgs`] names the kind on a type instead. See the crate's
/// [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewJob {
    /// The id to use; a new UUIDv7 when absent.
    #[serde(default)]
    #[cfg_attr(feature = "api", schema(value_type = Option<String>, format = Uuid))]
    pub id: Option<JobId>,
    /// The handler name, `[a-z0-9_.-]{1,64}`.
    pub kind: String,
    /// The handler's input: any JSON.
    #[serde(default)]
    pub payload: Value,
    /// Idempotency key: enqueueing an existing `(kind, dedup_key)` returns the existing job.
    #[serde(default)]
    pub dedup_key: Option<String>,
    /// Attempts allowed; the configured default when absent.
    #[serde(default)]
    pub max_attempts: Option<i32>,
    /// Run no earlier than this instant.
    #[serde(default)]
    pub run_at: Option<DateTime<Utc>>,
    /// Run no earlier than this many milliseconds from now (an alternative to `run_at`).
    #[serde(default)]
    pub delay_ms: Option<u64>,
    /// The queue, `[a-z0-9_.-]{1,64}`; the kind's queue (`APIARY_KINDS`, its handler's
    /// options), else `default`, when absent.
    #[serde(default)]
    pub queue: Option<String>,
    /// 0 to 9, higher first; the kind's priority, else 0, when absent.
    #[serde(default)]
    pub priority: Option<u8>,
    /// Jobs with the same key run at most the kind's `max_per_key` at a time across every
    /// worker.
    #[serde(default)]
    pub concurrency_key: Option<String>,
    /// Jobs that must all succeed before this one starts (at most [`MAX_DEPENDS_ON`]). The
    /// job is recorded `waiting`; it is `cancelled` if a parent ends `dead`, `failed` or
    /// `cancelled`. Every parent must be recorded already (or come earlier in the same
    /// request).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "api", schema(value_type = Vec<String>, format = Uuid))]
    pub depends_on: Vec<JobId>,
    /// When the job ends, its final record is POSTed here, signed (a completion webhook);
    /// the kind's `callback_url`, else none, when absent. `http` or `https`, on a host of
    /// `APIARY_WEBHOOK_HOSTS`.
    #[serde(default)]
    pub callback_url: Option<String>,
}

/// The most parents one job may name in `depends_on`.
pub const MAX_DEPENDS_ON: usize = 100;

impl NewJob {
    /// A job of `kind` with `payload`, everything else defaulted.
    pub fn new(kind: impl Into<String>, payload: Value) -> Self {
        NewJob {
            id: None,
            kind: kind.into(),
            payload,
            dedup_key: None,
            max_attempts: None,
            run_at: None,
            delay_ms: None,
            queue: None,
            priority: None,
            concurrency_key: None,
            depends_on: Vec::new(),
            callback_url: None,
        }
    }

    /// Makes the job wait for `parents` to succeed (see [`NewJob::depends_on`]).
    pub fn with_depends_on(mut self, parents: impl IntoIterator<Item = JobId>) -> Self {
        self.depends_on.extend(parents);
        self
    }

    /// Sets the dedup key.
    pub fn with_dedup_key(mut self, key: impl Into<String>) -> Self {
        self.dedup_key = Some(key.into());
        self
    }

    /// Sets the attempt budget.
    pub fn with_max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    /// Sets the id instead of letting Apiary make one.
    pub fn with_id(mut self, id: JobId) -> Self {
        self.id = Some(id);
        self
    }

    /// Schedules the job for `at`.
    pub fn with_run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(at);
        self
    }

    /// Sends the job to `queue` instead of its kind's queue.
    pub fn with_queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// Sets the priority, 0 to 9 (higher first).
    pub fn with_priority(mut self, priority: u8) -> Self {
        self.priority = Some(priority);
        self
    }

    /// Sets the concurrency key: jobs sharing it run at most `max_per_key` at a time.
    pub fn with_concurrency_key(mut self, key: impl Into<String>) -> Self {
        self.concurrency_key = Some(key.into());
        self
    }

    /// POSTs the job's final record to `url` when it ends (a completion webhook).
    pub fn with_callback_url(mut self, url: impl Into<String>) -> Self {
        self.callback_url = Some(url.into());
        self
    }

    /// Checks the fields a producer controls; the error names the field. A `callback_url`
    /// is checked here for its form only; the host allow-list is the client's to apply.
    pub fn validate(&self, max_payload_bytes: usize) -> Result<(), InvalidJob> {
        validate_kind(&self.kind)?;
        if let Some(key) = &self.dedup_key {
            validate_dedup_key(key)?;
        }
        if let Some(n) = self.max_attempts {
            validate_max_attempts(n)?;
        }
        if let Some(q) = &self.queue {
            validate_queue(q)?;
        }
        if let Some(p) = self.priority {
            validate_priority(i64::from(p))?;
        }
        if let Some(key) = &self.concurrency_key {
            validate_concurrency_key(key)?;
        }
        validate_depends_on(self.id, &self.depends_on)?;
        if let Some(url) = &self.callback_url {
            crate::webhook::validate_form(url)?;
        }
        if self.run_at.is_some() && self.delay_ms.is_some() {
            return Err(InvalidJob::new(
                "delay_ms",
                "give either run_at or delay_ms, not both",
            ));
        }
        if let Some(ms) = self.delay_ms
            && ms > MAX_DELAY_MS
        {
            return Err(InvalidJob::new(
                "delay_ms",
                format!("must be at most {MAX_DELAY_MS} (one year)"),
            ));
        }
        if let Some(at) = self.run_at {
            validate_run_at(at, Utc::now())?;
        }
        // Serialising again costs an allocation, but only at the edge, once per enqueue.
        let size = serde_json::to_vec(&self.payload)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if size > max_payload_bytes {
            return Err(InvalidJob::new(
                "payload",
                format!("is {size} bytes; the limit is {max_payload_bytes}"),
            ));
        }
        Ok(())
    }

    /// When the job becomes due, from `run_at` or `delay_ms`; `None` means now.
    pub fn due_at(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match (self.run_at, self.delay_ms) {
            (Some(at), _) => Some(at),
            (None, Some(ms)) => Some(now + chrono::Duration::milliseconds(ms as i64)),
            (None, None) => None,
        }
    }
}

/// The longest allowed delay: one year.
pub const MAX_DELAY_MS: u64 = 365 * 24 * 3600 * 1000;

/// A producer's input that cannot become a job; names the field and what is wrong with it.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidJob {
    /// The offending field, as named in the wire format.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl InvalidJob {
    /// An error about `field`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        InvalidJob {
            field,
            reason: reason.into(),
        }
    }
}

/// Checks a kind: `[a-z0-9_.-]{1,64}`.
pub fn validate_kind(kind: &str) -> Result<(), InvalidJob> {
    validate_name("kind", kind)
}

fn validate_name(field: &'static str, name: &str) -> Result<(), InvalidJob> {
    if name.is_empty() {
        return Err(InvalidJob::new(field, "must not be empty"));
    }
    if name.len() > MAX_KIND_LEN {
        return Err(InvalidJob::new(
            field,
            format!("is {} bytes; at most {MAX_KIND_LEN} allowed", name.len()),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-')))
    {
        return Err(InvalidJob::new(
            field,
            format!("has {c:?}; only a-z, 0-9, '_', '.' and '-' are allowed"),
        ));
    }
    Ok(())
}

/// The queue a job goes to when neither its producer nor its kind names one.
pub const DEFAULT_QUEUE: &str = "default";

/// The highest priority; 0 is the lowest and the default.
pub const MAX_PRIORITY: u8 = 9;

/// Checks a queue name: `[a-z0-9_.-]{1,64}`, the same rule as a kind.
pub fn validate_queue(queue: &str) -> Result<(), InvalidJob> {
    validate_name("queue", queue)
}

/// Checks a priority: 0 to 9.
pub fn validate_priority(p: i64) -> Result<(), InvalidJob> {
    if !(0..=i64::from(MAX_PRIORITY)).contains(&p) {
        return Err(InvalidJob::new(
            "priority",
            format!("is {p}; must be between 0 and {MAX_PRIORITY}"),
        ));
    }
    Ok(())
}

/// Checks a concurrency key: the same rule as a dedup key (non-empty, at most 256 bytes, no
/// NUL).
pub fn validate_concurrency_key(key: &str) -> Result<(), InvalidJob> {
    validate_dedup_key(key).map_err(|e| InvalidJob::new("concurrency_key", e.reason))
}

/// Checks a dedup key: non-empty, at most 256 bytes, no NUL (Postgres text cannot hold it).
pub fn validate_dedup_key(key: &str) -> Result<(), InvalidJob> {
    if key.contains('\0') {
        return Err(InvalidJob::new(
            "dedup_key",
            "must not contain NUL (\\u0000): Postgres text cannot store it",
        ));
    }
    if key.is_empty() {
        return Err(InvalidJob::new(
            "dedup_key",
            "must not be empty (omit it instead)",
        ));
    }
    if key.len() > MAX_DEDUP_KEY_BYTES {
        return Err(InvalidJob::new(
            "dedup_key",
            format!(
                "is {} bytes; at most {MAX_DEDUP_KEY_BYTES} allowed",
                key.len()
            ),
        ));
    }
    Ok(())
}

/// Checks a due time: at most one year ahead of `now` (the same bound as `delay_ms`), so a
/// typo cannot park a job in the delay queues for centuries. Any past instant means "now".
pub fn validate_run_at(at: DateTime<Utc>, now: DateTime<Utc>) -> Result<(), InvalidJob> {
    let limit = now + chrono::Duration::milliseconds(MAX_DELAY_MS as i64);
    if at > limit {
        return Err(InvalidJob::new(
            "run_at",
            format!("is {}; it must be at most one year ahead", at.to_rfc3339()),
        ));
    }
    Ok(())
}

/// Checks a `depends_on` list: at most [`MAX_DEPENDS_ON`] parents, and not the job itself.
/// Repeats are allowed and count once.
pub fn validate_depends_on(id: Option<JobId>, parents: &[JobId]) -> Result<(), InvalidJob> {
    if parents.len() > MAX_DEPENDS_ON {
        return Err(InvalidJob::new(
            "depends_on",
            format!(
                "names {} jobs; at most {MAX_DEPENDS_ON} allowed",
                parents.len()
            ),
        ));
    }
    if let Some(id) = id
        && parents.contains(&id)
    {
        return Err(InvalidJob::new(
            "depends_on",
            format!("names the job itself ({id}); a job cannot depend on itself"),
        ));
    }
    Ok(())
}

/// Checks an attempt budget: 1 to 1000.
pub fn validate_max_attempts(n: i32) -> Result<(), InvalidJob> {
    if !(1..=MAX_ATTEMPTS_LIMIT).contains(&n) {
        return Err(InvalidJob::new(
            "max_attempts",
            format!("is {n}; must be between 1 and {MAX_ATTEMPTS_LIMIT}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_names_round_trip() {
        for st in JobStatus::ALL {
            assert_eq!(st.as_str().parse::<JobStatus>(), Ok(st));
            assert_eq!(serde_json::to_value(st).ok(), Some(json!(st.as_str())));
        }
        assert!("nope".parse::<JobStatus>().unwrap_err().contains("queued"));
    }

    #[test]
    fn final_statuses_never_run_again() {
        for st in JobStatus::ALL.into_iter().filter(|s| s.is_final()) {
            assert!(
                !st.can_become(JobStatus::Running),
                "{st} must not run again"
            );
        }
        assert!(JobStatus::Queued.can_become(JobStatus::Running));
        assert!(JobStatus::Retrying.can_become(JobStatus::Running));
        assert!(!JobStatus::Succeeded.can_become(JobStatus::Queued));
        assert!(JobStatus::Dead.can_become(JobStatus::Queued));
        assert!(!JobStatus::Duplicate.can_become(JobStatus::Queued));
    }

    #[test]
    fn a_waiting_job_is_released_or_cancelled_and_never_runs_first() {
        use JobStatus::*;
        assert!(!Waiting.is_final());
        assert!(Waiting.can_become(Queued));
        assert!(Waiting.can_become(Cancelled));
        for next in [Running, Succeeded, Retrying, Dead, Failed, Duplicate] {
            assert!(!Waiting.can_become(next), "waiting must not become {next}");
        }
        for from in JobStatus::ALL {
            assert!(
                !from.can_become(Waiting),
                "nothing goes back to waiting ({from})"
            );
        }
    }

    #[test]
    fn depends_on_is_bounded_and_never_the_job_itself() {
        let id = Uuid::now_v7();
        assert!(validate_depends_on(Some(id), &[Uuid::now_v7()]).is_ok());
        assert!(validate_depends_on(None, &vec![id; MAX_DEPENDS_ON]).is_ok());
        let e = validate_depends_on(None, &vec![id; MAX_DEPENDS_ON + 1]).unwrap_err();
        assert_eq!(e.field, "depends_on");
        let e = validate_depends_on(Some(id), &[id]).unwrap_err();
        assert!(e.reason.contains("itself"), "{e}");
    }

    #[test]
    fn kinds_are_checked() {
        assert!(validate_kind("echo").is_ok());
        assert!(validate_kind("a.b-c_9").is_ok());
        assert_eq!(validate_kind("").unwrap_err().field, "kind");
        assert!(validate_kind("Echo").unwrap_err().reason.contains("'E'"));
        assert!(validate_kind(&"x".repeat(65)).is_err());
        assert!(validate_kind(&"x".repeat(64)).is_ok());
    }

    #[test]
    fn new_job_validation_names_the_field() {
        let ok = NewJob::new("echo", json!({"a": 1}));
        assert!(ok.validate(1024).is_ok());
        let big = NewJob::new("echo", json!("x".repeat(100)));
        assert_eq!(big.validate(50).unwrap_err().field, "payload");
        let key = NewJob::new("echo", json!(null)).with_dedup_key("k".repeat(257));
        assert_eq!(key.validate(1024).unwrap_err().field, "dedup_key");
        let nul = NewJob::new("echo", json!(null)).with_dedup_key("a\0b");
        assert!(nul.validate(1024).unwrap_err().reason.contains("NUL"));
        let far =
            NewJob::new("echo", json!(null)).with_run_at(Utc::now() + chrono::Duration::days(400));
        assert_eq!(far.validate(1024).unwrap_err().field, "run_at");
        let att = NewJob::new("echo", json!(null)).with_max_attempts(0);
        assert_eq!(att.validate(1024).unwrap_err().field, "max_attempts");
        let mut both = NewJob::new("echo", json!(null));
        both.delay_ms = Some(5);
        both.run_at = Some(Utc::now());
        assert_eq!(both.validate(1024).unwrap_err().field, "delay_ms");
    }
}
