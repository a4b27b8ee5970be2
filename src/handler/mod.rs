//! ⑤ What runs a job: the [`Handler`] trait users implement (or [`Work`], its typed form, in
//! `work.rs`), the [`Registry`] that maps kinds to handlers, and the [`JobContext`] a handler
//! receives. The built-in handlers live in one file each.
//!
//! A handler's database writes go through [`JobContext::tx`]: that transaction also records
//! the job's completion and commits before the message is acknowledged, so the writes happen
//! exactly once even when the message is delivered twice.

mod echo;
mod fail;
mod sleep;
mod tally;
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

pub use echo::Echo;
pub use fail::Fail;
pub use sleep::Sleep;
pub use tally::Tally;
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

    /// The built-in handlers: `echo`, `sleep`, `fail` and `tally`.
    pub fn builtins() -> Self {
        let mut r = Registry::new();
        r.register("echo", Echo);
        r.register("sleep", Sleep);
        r.register("fail", Fail);
        r.register("tally", Tally);
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
}

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

    /// Takes the transaction, if the handler began one.
    pub(crate) fn take_tx(&mut self) -> Option<Transaction<'static, Postgres>> {
        self.tx.take()
    }
}
