//! ⑤ What runs a job: the [`Handler`] trait users implement (or [`Work`], its typed form, in
//! `work.rs`), the [`Registry`] that maps kinds to handlers, and the [`JobContext`] a handler
//! receives. The built-in handlers live in one file each.
//!
//! A handler's database writes go through [`JobContext::tx`]: that transaction also records
//! the job's completion and commits before the message is acknowledged, so the writes happen
//! exactly once even when the message is delivered twice.

mod collect;
mod echo;
mod fail;
mod sleep;
mod tally;
mod webhook;
mod work;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;

pub use collect::Collect;
pub use echo::Echo;
pub use fail::Fail;
pub use sleep::Sleep;
pub use tally::Tally;
pub use webhook::{MAX_ANSWER_BYTES, Webhook};
pub use work::Work;

use crate::job::JobId;

/// How a handler says an attempt failed, and what should happen next. A retry waits in the
/// broker, never in a worker's memory; see the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// Worth another attempt, after the backoff or after `delay` if given.
    #[error("{message}")]
    Retry {
        /// What went wrong.
        message: String,
        /// Wait this long instead of the backoff schedule.
        delay: Option<Duration>,
    },
    /// Will never succeed: the job is dead at once.
    #[error("{message}")]
    Permanent {
        /// What went wrong.
        message: String,
    },
}

impl HandlerError {
    /// A retryable error.
    pub fn retry(message: impl Into<String>) -> Self {
        HandlerError::Retry {
            message: message.into(),
            delay: None,
        }
    }

    /// A retryable error that asks for a specific delay.
    pub fn retry_after(message: impl Into<String>, delay: Duration) -> Self {
        HandlerError::Retry {
            message: message.into(),
            delay: Some(delay),
        }
    }

    /// A permanent error.
    pub fn permanent(message: impl Into<String>) -> Self {
        HandlerError::Permanent {
            message: message.into(),
        }
    }
}

/// Database errors inside a handler are worth retrying: the transaction rolled back, so the
/// next attempt starts clean.
impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        HandlerError::retry(format!("database: {e}"))
    }
}

/// A job handler: runs one attempt of jobs of one kind, with the payload as JSON. For a
/// payload with a Rust type of its own, [`Work`] decodes it for you and takes the kind from
/// the type.
///
/// What a handler can rely on (writes through [`JobContext::tx`] happen once; other effects
/// at least once) is in the crate's [guarantees](crate#guarantees).
///
/// ```
/// use apiary::handler::{Handler, HandlerError, JobContext};
///
/// struct Greet;
///
/// impl Handler for Greet {
///     type Output = String;
///     async fn handle(&self, ctx: &mut JobContext) -> Result<String, HandlerError> {
///         let name: String = ctx.payload()?;
///         Ok(format!("hello, {name}"))
///     }
/// }
/// ```
pub trait Handler: Send + Sync + 'static {
    /// The result, stored as JSON in the job record.
    type Output: Serialize + Send;

    /// Runs one attempt. Return [`HandlerError::Retry`] for failures worth retrying and
    /// [`HandlerError::Permanent`] for the others. Long handlers should watch
    /// [`JobContext::cancelled`].
    fn handle(
        &self,
        ctx: &mut JobContext,
    ) -> impl Future<Output = Result<Self::Output, HandlerError>> + Send;
}

/// The result of a type-erased handler: the output already encoded as JSON.
pub(crate) type Erased<'a> =
    Pin<Box<dyn Future<Output = Result<Box<RawValue>, HandlerError>> + Send + 'a>>;

/// [`Handler`] with its output type erased, so handlers of different types share a registry.
pub(crate) trait DynHandler: Send + Sync {
    fn call<'a>(&'a self, ctx: &'a mut JobContext) -> Erased<'a>;
}

impl<H: Handler> DynHandler for H {
    fn call<'a>(&'a self, ctx: &'a mut JobContext) -> Erased<'a> {
        Box::pin(async move {
            let out = self.handle(ctx).await?;
            serde_json::value::to_raw_value(&out).map_err(|e| {
                HandlerError::permanent(format!("the handler's result is not JSON: {e}"))
            })
        })
    }
}

pub use crate::config::KindOptions;

/// A registered handler with its options.
#[derive(Clone)]
pub(crate) struct Entry {
    pub(crate) handler: Arc<dyn DynHandler>,
    pub(crate) options: KindOptions,
}

/// Maps kinds to handlers. Build one, register handlers, and give it to the worker. See the
/// crate's [guarantees](crate#guarantees).
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Entry>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// The built-in handlers: `echo`, `sleep`, `fail`, `tally` and `collect`.
    pub fn builtins() -> Self {
        let mut r = Registry::new();
        r.register("echo", Echo);
        r.register("sleep", Sleep);
        r.register("fail", Fail);
        r.register("tally", Tally);
        r.register("collect", Collect);
        r
    }

    /// Registers `handler` for `kind`, replacing any earlier one.
    ///
    /// # Panics
    /// If `kind` is not a valid kind (`[a-z0-9_.-]{1,64}`): a programming error, caught at
    /// start-up.
    pub fn register<H: Handler>(&mut self, kind: &str, handler: H) -> &mut Self {
        self.register_with(kind, handler, KindOptions::default())
    }

    /// Registers `handler` for `kind` with its own attempts, timeout and backoff.
    ///
    /// # Panics
    /// If `kind` is not a valid kind.
    pub fn register_with<H: Handler>(
        &mut self,
        kind: &str,
        handler: H,
        options: KindOptions,
    ) -> &mut Self {
        if let Err(e) = crate::job::validate_kind(kind) {
            panic!("cannot register handler: {e}");
        }
        self.handlers.insert(
            kind.to_string(),
            Entry {
                handler: Arc::new(handler),
                options,
            },
        );
        self
    }

    /// Registers a typed handler for the kind of its arguments, [`JobArgs::KIND`], with its
    /// [`Work::options`], replacing any earlier handler of that kind.
    ///
    /// [`JobArgs::KIND`]: crate::JobArgs::KIND
    pub fn add<W: Work>(&mut self, worker: W) -> &mut Self {
        // Evaluated at compile time: an invalid kind is a build error, not a panic here.
        let () = crate::args::KindIsValid::<W::Args>::CHECK;
        let options = worker.options();
        self.register_with(
            <W::Args as crate::JobArgs>::KIND,
            work::Typed(worker),
            options,
        )
    }

    /// The kinds served, sorted.
    pub fn kinds(&self) -> Vec<&str> {
        let mut k: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
        k.sort_unstable();
        k
    }

    pub(crate) fn get(&self, kind: &str) -> Option<&Entry> {
        self.handlers.get(kind)
    }
}

/// What a handler knows about the job it runs, and its way into the database. Writes through
/// [`JobContext::tx`] commit with the job's success, once: see the crate's
/// [guarantees](crate#guarantees).
pub struct JobContext {
    id: JobId,
    kind: String,
    attempt: i32,
    max_attempts: i32,
    dedup_key: Option<String>,
    payload: Box<RawValue>,
    cancel: CancellationToken,
    pool: PgPool,
    tx: Option<Transaction<'static, Postgres>>,
    /// The worker holding the claim, which fences progress writes.
    worker: uuid::Uuid,
    /// When progress was last written, and what was reported since and not written yet.
    progress_written: Option<std::time::Instant>,
    progress_pending: Option<(f64, Option<Box<RawValue>>)>,
}

/// The least time between two progress writes of one job: a handler may report as often as
/// it likes, and Postgres sees at most two writes a second of it.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);

/// The largest progress detail, as JSON text.
pub const MAX_PROGRESS_DETAIL_BYTES: usize = 64 * 1024;

impl JobContext {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: JobId,
        kind: String,
        attempt: i32,
        max_attempts: i32,
        dedup_key: Option<String>,
        payload: Box<RawValue>,
        cancel: CancellationToken,
        pool: PgPool,
        worker: uuid::Uuid,
    ) -> Self {
        JobContext {
            id,
            kind,
            attempt,
            max_attempts,
            dedup_key,
            payload,
            cancel,
            pool,
            tx: None,
            worker,
            progress_written: None,
            progress_pending: None,
        }
    }

    /// Reports progress: `fraction` of the work done (0 to 1), and optionally a detail (any
    /// JSON, at most [`MAX_PROGRESS_DETAIL_BYTES`]), shown by `GET /v1/jobs/{id}`. Cheap to
    /// call often: it writes at most once per [`PROGRESS_INTERVAL`], keeping the latest
    /// report for the next write (and for the end of the attempt). Returns whether this call
    /// wrote. Progress is best effort: a write Postgres does not take is logged, not an
    /// error; a fraction outside 0 to 1 or a detail too large is a permanent error.
    pub async fn progress(
        &mut self,
        fraction: f64,
        detail: Option<serde_json::Value>,
    ) -> Result<bool, HandlerError> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(HandlerError::permanent(format!(
                "progress: the fraction is {fraction}; it must be between 0 and 1"
            )));
        }
        let detail = match detail {
            None => None,
            Some(d) => {
                let raw = serde_json::value::to_raw_value(&d)
                    .map_err(|e| HandlerError::permanent(format!("progress detail: {e}")))?;
                if raw.get().len() > MAX_PROGRESS_DETAIL_BYTES {
                    return Err(HandlerError::permanent(format!(
                        "progress detail is {} bytes; the limit is {MAX_PROGRESS_DETAIL_BYTES}",
                        raw.get().len()
                    )));
                }
                Some(raw)
            }
        };
        self.progress_pending = Some((fraction, detail));
        let due = self
            .progress_written
            .is_none_or(|at| at.elapsed() >= PROGRESS_INTERVAL);
        if !due {
            return Ok(false);
        }
        self.write_progress().await;
        Ok(true)
    }

    /// Writes the latest report not written yet, if any: at the end of the attempt, so the
    /// last report of a chatty handler is not lost to the throttle.
    pub(crate) async fn flush_progress(&mut self) {
        if self.progress_pending.is_some() {
            self.write_progress().await;
        }
    }

    async fn write_progress(&mut self) {
        let Some((fraction, detail)) = self.progress_pending.take() else {
            return;
        };
        self.progress_written = Some(std::time::Instant::now());
        let detail = detail.map(|d| crate::store::storable_text(d.get()).into_owned());
        // Fenced like a result: only this attempt, while this worker holds it.
        let written = sqlx::query(
            "UPDATE apiary_jobs SET progress = $3, progress_detail = $4::json, progress_at = now()
              WHERE id = $1 AND attempts = $2 AND worker_id = $5 AND status = 'running'",
        )
        .bind(self.id)
        .bind(self.attempt)
        .bind(fraction)
        .bind(detail)
        .bind(self.worker)
        .execute(&self.pool)
        .await;
        if let Err(e) = written {
            tracing::debug!(job_id = %self.id, error = %e, "could not write progress");
        }
    }

    /// The job's id.
    pub fn id(&self) -> JobId {
        self.id
    }

    /// The job's kind.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// This attempt's number, from 1.
    pub fn attempt(&self) -> i32 {
        self.attempt
    }

    /// The attempt budget.
    pub fn max_attempts(&self) -> i32 {
        self.max_attempts
    }

    /// The job's dedup key.
    pub fn dedup_key(&self) -> Option<&str> {
        self.dedup_key.as_deref()
    }

    /// The payload, decoded. A payload of the wrong shape is a permanent error, naming the
    /// field that failed (`at `to.address`: invalid type ...`): retrying the same input
    /// cannot help.
    pub fn payload<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        crate::args::decode(&self.kind, self.payload.get()).map_err(HandlerError::permanent)
    }

    /// The payload as raw JSON.
    pub fn raw_payload(&self) -> &RawValue {
        &self.payload
    }

    /// Fires when the job is cancelled or the worker must stop; a long handler should return
    /// soon after.
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancel
    }

    /// The job's transaction, begun on first use. Whatever the handler writes through it
    /// commits together with the job's success, or not at all.
    pub async fn tx(&mut self) -> Result<&mut PgConnection, HandlerError> {
        if self.tx.is_none() {
            self.tx = Some(self.pool.begin().await?);
        }
        match self.tx.as_mut() {
            Some(tx) => Ok(&mut **tx),
            None => Err(HandlerError::retry("no transaction")),
        }
    }

    /// The job's parents (its `depends_on`), in id order, each with its kind, status and
    /// result, read from Postgres now. Every parent has succeeded by the time the job runs;
    /// a parent pruned meanwhile comes back with no kind, status or result. Empty for a job
    /// without parents.
    pub async fn parent_results(
        &self,
    ) -> Result<Vec<crate::store::dependencies::ParentResult>, HandlerError> {
        crate::store::Store::from_pool(self.pool.clone())
            .parent_results(self.id)
            .await
            .map_err(|e| HandlerError::retry(e.to_string()))
    }

    /// The parents' results decoded as `T`, in the order of [`JobContext::parent_results`].
    /// A result of the wrong shape is a permanent error.
    pub async fn parent_results_as<T: DeserializeOwned>(&self) -> Result<Vec<T>, HandlerError> {
        self.parent_results()
            .await?
            .iter()
            .map(|p| match p.result_as::<T>() {
                Ok(Some(t)) => Ok(t),
                Ok(None) => Err(HandlerError::permanent(format!(
                    "parent {} has no result",
                    p.id
                ))),
                Err(e) => Err(HandlerError::permanent(format!(
                    "parent {}'s result: {e}",
                    p.id
                ))),
            })
            .collect()
    }

    /// For a batch's callback: a page of the batch's children in id order, after `after`
    /// (from the start when `None`), at most `limit` (1 to 1000), each with its id, status,
    /// result and error. The batch is the one named by the payload's `batch_id`; a payload
    /// without one is a permanent error. Page on with the last child's id until a page comes
    /// back shorter than `limit`.
    pub async fn batch_children(
        &self,
        after: Option<JobId>,
        limit: i64,
    ) -> Result<Vec<crate::store::batches::BatchChild>, HandlerError> {
        #[derive(serde::Deserialize)]
        struct Callback {
            batch_id: uuid::Uuid,
        }
        let batch = serde_json::from_str::<Callback>(self.payload.get())
            .map_err(|e| HandlerError::permanent(format!("not a batch callback: {e}")))?
            .batch_id;
        crate::store::Store::from_pool(self.pool.clone())
            .batch_children(batch, after, limit)
            .await
            .map_err(|e| HandlerError::retry(e.to_string()))
    }

    /// The pool, for built-in handlers that read outside the job's transaction.
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Takes the transaction, if the handler began one.
    pub(crate) fn take_tx(&mut self) -> Option<Transaction<'static, Postgres>> {
        self.tx.take()
    }
}
