//! Typed jobs, ① and ⑤ in Rust types: [`JobArgs`] names a job's kind once, on the serde type
//! that is its payload, so the producer ([`crate::Client::enqueue`]) and the handler
//! ([`crate::handler::Work`]) cannot disagree on it. [`TypedJob`] adds the options of one
//! enqueue (dedup key, schedule, attempts), and [`IntoNewJob`] is what the client accepts:
//! typed arguments, a `TypedJob`, or the JSON [`NewJob`] that other languages' producers use.
//!
//! On the queue and in Postgres a typed job is an ordinary job: its kind is
//! [`JobArgs::KIND`] and its payload the arguments as JSON, so a producer in another language
//! can enqueue it and `GET /v1/jobs/{id}` shows it like any other. See the crate's
//! [guarantees](crate#guarantees).

use std::marker::PhantomData;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::client::EnqueueError;
use crate::job::{JobId, NewJob};

/// The arguments of a job of one kind: a serde type whose JSON form is the payload.
///
/// The kind is spelled here and nowhere else: [`crate::Client::enqueue`] takes it from
/// [`KIND`](JobArgs::KIND), and so does [`crate::Registry::add`] for the
/// [`Work`](crate::handler::Work) that runs it.
///
/// ```
/// use apiary::JobArgs;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct SendEmail {
///     to: String,
///     template: String,
/// }
///
/// impl JobArgs for SendEmail {
///     const KIND: &'static str = "send_email";
///
///     // Optional: enqueueing the same welcome twice returns the first job.
///     fn dedup_key(&self) -> Option<String> {
///         Some(format!("{}/{}", self.template, self.to))
///     }
/// }
/// ```
///
/// A kind that is not `[a-z0-9_.-]{1,64}` fails to compile once the type is enqueued or
/// registered:
///
/// ```compile_fail
/// # use serde::{Deserialize, Serialize};
/// #[derive(Serialize, Deserialize)]
/// struct Bad;
/// impl apiary::JobArgs for Bad {
///     const KIND: &'static str = "Send Email";
/// }
/// let _ = apiary::TypedJob::new(Bad);
/// ```
///
/// Guarantees: the job is an ordinary job once enqueued; see the crate's
/// [guarantees](crate#guarantees).
pub trait JobArgs: Serialize + DeserializeOwned + Send + 'static {
    /// The job's kind, `[a-z0-9_.-]{1,64}`: the name producers and workers share.
    const KIND: &'static str;

    /// The dedup key to enqueue these arguments with, unless the enqueue gives one
    /// ([`TypedJob::with_dedup_key`]). `None`, the default, means no key: every enqueue is a
    /// new job.
    fn dedup_key(&self) -> Option<String> {
        None
    }
}

/// Typed arguments with the options of one enqueue. Build with [`TypedJob::new`] (or
/// [`From`]) and the `with_*` methods, and pass it to [`crate::Client::enqueue`].
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)]
/// # struct SendEmail { to: String }
/// # impl apiary::JobArgs for SendEmail { const KIND: &'static str = "send_email"; }
/// use std::time::Duration;
/// use apiary::TypedJob;
///
/// let job = TypedJob::new(SendEmail { to: "ada@example.com".into() })
///     .with_dedup_key("welcome-ada")
///     .with_delay(Duration::from_secs(60))
///     .with_max_attempts(5);
/// ```
///
/// Guarantees: one completion per dedup key, and the rest of the crate's
/// [guarantees](crate#guarantees).
#[derive(Debug, Clone, PartialEq)]
pub struct TypedJob<A> {
    /// The arguments: the payload, as JSON.
    pub args: A,
    /// The id to use; a new UUIDv7 when absent.
    pub id: Option<JobId>,
    /// The dedup key; [`JobArgs::dedup_key`] when absent.
    pub dedup_key: Option<String>,
    /// Attempts allowed; the configured default when absent.
    pub max_attempts: Option<i32>,
    /// Run no earlier than this instant.
    pub run_at: Option<DateTime<Utc>>,
    /// Run no earlier than this long from now (an alternative to `run_at`).
    pub delay: Option<Duration>,
    /// The queue; the kind's queue, else `default`, when absent.
    pub queue: Option<String>,
    /// 0 to 9, higher first; the kind's priority, else 0, when absent.
    pub priority: Option<u8>,
    /// Jobs sharing it run at most the kind's `max_per_key` at a time.
    pub concurrency_key: Option<String>,
    /// Jobs that must succeed first (see [`NewJob::depends_on`]).
    pub depends_on: Vec<crate::job::JobId>,
    /// Where the job's final record is POSTed when it ends; the kind's when absent.
    pub callback_url: Option<String>,
}

impl<A: JobArgs> TypedJob<A> {
    /// `args`, with every option defaulted.
    pub fn new(args: A) -> Self {
        // Evaluated at compile time for each `A`: an invalid kind is a build error.
        let () = KindIsValid::<A>::CHECK;
        TypedJob {
            args,
            id: None,
            dedup_key: None,
            max_attempts: None,
            run_at: None,
            delay: None,
            queue: None,
            priority: None,
            concurrency_key: None,
            depends_on: Vec::new(),
            callback_url: None,
        }
    }

    /// Sets the dedup key, in place of [`JobArgs::dedup_key`].
    pub fn with_dedup_key(mut self, key: impl Into<String>) -> Self {
        self.dedup_key = Some(key.into());
        self
    }

    /// Sets the id instead of letting Apiary make one.
    pub fn with_id(mut self, id: JobId) -> Self {
        self.id = Some(id);
        self
    }

    /// Sets the attempt budget.
    pub fn with_max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    /// Schedules the job for `at`.
    pub fn with_run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(at);
        self
    }

    /// Schedules the job `delay` from now.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
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

    /// Sets the concurrency key.
    pub fn with_concurrency_key(mut self, key: impl Into<String>) -> Self {
        self.concurrency_key = Some(key.into());
        self
    }

    /// Makes the job wait for `parents` to succeed (see [`NewJob::depends_on`]).
    pub fn with_depends_on(mut self, parents: impl IntoIterator<Item = crate::job::JobId>) -> Self {
        self.depends_on.extend(parents);
        self
    }

    /// POSTs the job's final record to `url` when it ends (a completion webhook).
    pub fn with_callback_url(mut self, url: impl Into<String>) -> Self {
        self.callback_url = Some(url.into());
        self
    }
}

impl<A: JobArgs> From<A> for TypedJob<A> {
    fn from(args: A) -> Self {
        TypedJob::new(args)
    }
}

/// What [`crate::Client::enqueue`] and [`crate::Client::enqueue_many`] accept: a [`NewJob`]
/// as it is, or typed arguments ([`JobArgs`], [`TypedJob`]) encoded into one.
///
/// To enqueue typed jobs of several kinds in one batch, convert each with
/// [`into_new_job`](IntoNewJob::into_new_job) and pass the `Vec<NewJob>`.
///
/// Guarantees: see the crate's [guarantees](crate#guarantees).
pub trait IntoNewJob {
    /// The job to enqueue. Fails with [`EnqueueError::Encode`] when typed arguments have no
    /// JSON form (a map with non-string keys, say, or a `Serialize` impl that fails).
    fn into_new_job(self) -> Result<NewJob, EnqueueError>;
}

impl IntoNewJob for NewJob {
    fn into_new_job(self) -> Result<NewJob, EnqueueError> {
        Ok(self)
    }
}

impl<A: JobArgs> IntoNewJob for TypedJob<A> {
    fn into_new_job(self) -> Result<NewJob, EnqueueError> {
        let payload = serde_json::to_value(&self.args).map_err(|source| EnqueueError::Encode {
            kind: A::KIND,
            source,
        })?;
        Ok(NewJob {
            id: self.id,
            kind: A::KIND.to_string(),
            dedup_key: self.dedup_key.or_else(|| self.args.dedup_key()),
            payload,
            max_attempts: self.max_attempts,
            run_at: self.run_at,
            // Beyond u64 milliseconds is far past the one-year limit, which validation reports.
            delay_ms: self
                .delay
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            queue: self.queue,
            priority: self.priority,
            concurrency_key: self.concurrency_key,
            depends_on: self.depends_on,
            callback_url: self.callback_url,
        })
    }
}

impl<A: JobArgs> IntoNewJob for A {
    fn into_new_job(self) -> Result<NewJob, EnqueueError> {
        TypedJob::new(self).into_new_job()
    }
}

/// Checks `A::KIND` when the compiler instantiates [`TypedJob::new`] or
/// [`crate::Registry::add`] for `A`, so a kind the store would refuse never builds.
pub(crate) struct KindIsValid<A>(PhantomData<A>);

impl<A: JobArgs> KindIsValid<A> {
    pub(crate) const CHECK: () = assert!(
        kind_is_valid(A::KIND),
        "JobArgs::KIND must be 1 to 64 of a-z, 0-9, '_', '.' and '-'"
    );
}

/// [`crate::job::validate_kind`], as a `const fn` for [`KindIsValid`].
const fn kind_is_valid(kind: &str) -> bool {
    let b = kind.as_bytes();
    if b.is_empty() || b.len() > crate::job::MAX_KIND_LEN {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'.' | b'-')) {
            return false;
        }
        i += 1;
    }
    true
}

/// Decodes a payload as `T`. The error names the field that failed (`to.address`,
/// `items[2]`), so a producer can see what to fix.
pub(crate) fn decode<T: DeserializeOwned>(kind: &str, json: &str) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_str(json);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        // The path of an error in the payload as a whole is ".": nothing to name.
        if path == "." {
            format!("payload does not fit kind {kind:?}: {}", e.inner())
        } else {
            format!(
                "payload does not fit kind {kind:?}: at `{path}`: {}",
                e.inner()
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};
    use serde_json::json;

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Email {
        to: Address,
        cc: Vec<Address>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Address {
        address: String,
    }

    impl JobArgs for Email {
        const KIND: &'static str = "email";
        fn dedup_key(&self) -> Option<String> {
            Some(self.to.address.clone())
        }
    }

    #[derive(Serialize, Deserialize)]
    struct Grid(BTreeMap<(i32, i32), i32>);

    impl JobArgs for Grid {
        const KIND: &'static str = "grid";
    }

    fn email() -> Email {
        Email {
            to: Address {
                address: "ada@example.com".into(),
            },
            cc: vec![],
        }
    }

    #[test]
    fn typed_args_become_a_new_job_of_their_kind() {
        let job = email().into_new_job().expect("encodes");
        assert_eq!(job.kind, "email");
        assert_eq!(
            job.payload,
            json!({"to": {"address": "ada@example.com"}, "cc": []})
        );
        assert_eq!(job.dedup_key.as_deref(), Some("ada@example.com"));
        assert_eq!(job.delay_ms, None);
    }

    #[test]
    fn enqueue_options_override_the_args_defaults() {
        let id = uuid::Uuid::now_v7();
        let job = TypedJob::new(email())
            .with_dedup_key("k")
            .with_id(id)
            .with_max_attempts(4)
            .with_delay(Duration::from_millis(1500))
            .into_new_job()
            .expect("encodes");
        assert_eq!(job.dedup_key.as_deref(), Some("k"));
        assert_eq!(job.id, Some(id));
        assert_eq!(job.max_attempts, Some(4));
        assert_eq!(job.delay_ms, Some(1500));
    }

    #[test]
    fn args_without_a_json_form_are_an_encode_error() {
        let grid = Grid(BTreeMap::from([((1, 2), 3)]));
        match grid.into_new_job() {
            Err(EnqueueError::Encode { kind, source }) => {
                assert_eq!(kind, "grid");
                assert!(
                    source.to_string().contains("key must be a string"),
                    "{source}"
                );
            }
            other => panic!("expected an encode error, got {other:?}"),
        }
    }

    #[test]
    fn a_bad_payload_names_the_failing_field() {
        let nested = decode::<Email>("email", r#"{"to": {"address": 5}, "cc": []}"#);
        let e = nested.expect_err("wrong type");
        assert!(e.contains("at `to.address`"), "{e}");
        let listed = decode::<Email>(
            "email",
            r#"{"to": {"address": "a"}, "cc": [{"address": "b"}, {}]}"#,
        );
        let e = listed.expect_err("missing field");
        assert!(
            e.contains("at `cc[1]`") && e.contains("missing field `address`"),
            "{e}"
        );
        let whole = decode::<Email>("email", "7").expect_err("not an object");
        assert!(
            whole.starts_with("payload does not fit kind \"email\": invalid type"),
            "{whole}"
        );
        assert_eq!(
            decode::<Email>(
                "email",
                &serde_json::to_string(&email()).unwrap_or_default()
            ),
            Ok(email())
        );
    }

    #[test]
    fn the_const_kind_check_agrees_with_validate_kind() {
        for kind in [
            "echo",
            "a.b-c_9",
            "",
            "Echo",
            "send email",
            &"x".repeat(64),
            &"x".repeat(65),
            "é",
        ] {
            assert_eq!(
                kind_is_valid(kind),
                crate::job::validate_kind(kind).is_ok(),
                "{kind:?}"
            );
        }
    }
}
