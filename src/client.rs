//! ① Enqueueing: the library's way in, used by the API and the CLI too, so all three share
//! one semantics. A job is recorded in Postgres with an outbox entry, published with a
//! confirm, and only then reported enqueued.

mod queues;
mod schedules;

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use chrono::Utc;
use sqlx::postgres::PgListener;
use tokio::sync::mpsc;
use uuid::Uuid;

pub use crate::args::IntoNewJob;
use crate::broker::{BrokerError, Publisher};
use crate::config::Config;
use crate::job::{InvalidJob, Job, JobId, JobStatus, JobStatusText, NewJob};
use crate::store::insert_job::{InsertOutcome, Inserted, JobRow};
use crate::store::{DONE_CHANNEL, Store, StoreError};
use crate::wire::WireJob;
pub use queues::{QueueError, QueueInfo};
pub use schedules::{
    FireTime, JOBS_SHOWN, SLOTS_LOOKED_UP, ScheduleError, ScheduleInfo, ScheduleSet,
};

/// Why an enqueue failed. Whatever the variant, a job either was recorded (and will be
/// published) or was not written at all: see the crate's [guarantees](crate#guarantees).
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// The job itself is wrong; nothing was written.
    #[error("invalid job: {0}")]
    Invalid(#[from] InvalidJob),
    /// Typed arguments ([`crate::JobArgs`]) have no JSON form, so there is no payload;
    /// nothing was written. A bug in the arguments' type (a map with non-string keys, say),
    /// not in the input.
    #[error("cannot encode the arguments of kind {kind:?} as JSON: {source}")]
    Encode {
        /// The arguments' kind.
        kind: &'static str,
        /// serde_json's reason.
        source: serde_json::Error,
    },
    /// Postgres failed; nothing was recorded.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The job's id belongs to a different job (another kind, dedup key or payload); nothing
    /// was written. Enqueue it with a new id, or none.
    #[error("conflict: {0}")]
    Conflict(String),
    /// Postgres refused to store this job's data (its reason is given); nothing was written.
    #[error("the job store refused this job: {0}")]
    Refused(String),
    /// The jobs were recorded but the broker did not confirm them. They are not lost: the
    /// outbox relay publishes them once the broker is back. Enqueueing again with the same
    /// ids or dedup keys is safe.
    #[error(
        "jobs recorded but not yet published ({source}); they will be published when RabbitMQ is back"
    )]
    NotPublished {
        /// The broker's error.
        source: BrokerError,
        /// The recorded jobs.
        ids: Vec<JobId>,
    },
}

/// The most jobs one chain or one batch may hold.
pub const MAX_GROUP_JOBS: usize = 10_000;

/// Room left in the payload limit for what a batch's callback payload adds around
/// `on_complete.payload` (`{"batch_id", "counts"}`).
pub const CALLBACK_ENVELOPE_BYTES: usize = 512;

/// The jobs of a chain or batch (`what`), checked for count: at least one, at most
/// [`MAX_GROUP_JOBS`].
fn group_jobs<J: IntoNewJob>(jobs: Vec<J>, what: &str) -> Result<Vec<NewJob>, EnqueueError> {
    let jobs = jobs
        .into_iter()
        .map(IntoNewJob::into_new_job)
        .collect::<Result<Vec<_>, _>>()?;
    if jobs.is_empty() {
        return Err(InvalidJob::new("jobs", format!("a {what} needs at least one job")).into());
    }
    if jobs.len() > MAX_GROUP_JOBS {
        return Err(InvalidJob::new(
            "jobs",
            format!(
                "holds {} jobs; at most {MAX_GROUP_JOBS} allowed",
                jobs.len()
            ),
        )
        .into());
    }
    Ok(jobs)
}

/// How a batch ends, besides its callback: `on_success` and a `callback_url`. A `bool` converts
/// into it (`on_success`), so `enqueue_batch(jobs, on_complete, true)` reads as before.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOptions {
    /// Enqueue the callback only if every child succeeded.
    pub on_success: bool,
    /// When the last child is final, POST the batch's record here, signed, as a job's
    /// `callback_url` is (same allow-list and secret).
    pub callback_url: Option<String>,
}

impl BatchOptions {
    /// Also POSTs the batch's record to `url` when it finishes (a completion webhook).
    pub fn with_callback_url(mut self, url: impl Into<String>) -> Self {
        self.callback_url = Some(url.into());
        self
    }
}

impl From<bool> for BatchOptions {
    fn from(on_success: bool) -> Self {
        BatchOptions {
            on_success,
            callback_url: None,
        }
    }
}

/// A batch's callback: the job enqueued once its last child is final. Its payload is
/// `{"batch_id", "counts": {"total", "succeeded", "failed", "dead", "cancelled"}, "payload"}`,
/// with this `payload` inside.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OnComplete {
    /// The callback's kind.
    pub kind: String,
    /// What the callback carries besides the batch's id and counts.
    #[serde(default)]
    pub payload: serde_json::Value,
    /// The callback's queue; the kind's queue, else `default`, when absent.
    #[serde(default)]
    pub queue: Option<String>,
    /// The callback's attempt budget; the kind's, else the configured default, when absent.
    #[serde(default)]
    pub max_attempts: Option<i32>,
}

impl OnComplete {
    /// A callback of `kind` carrying `payload`.
    pub fn new(kind: impl Into<String>, payload: serde_json::Value) -> Self {
        OnComplete {
            kind: kind.into(),
            payload,
            queue: None,
            max_attempts: None,
        }
    }
}

/// What [`Client::enqueue_batch`] recorded.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BatchEnqueued {
    /// The batch's id.
    pub id: Uuid,
    /// The id its callback job will have.
    #[cfg_attr(feature = "api", schema(value_type = String, format = Uuid))]
    pub callback_id: JobId,
    /// The children's ids, in order.
    #[cfg_attr(feature = "api", schema(value_type = Vec<String>, format = Uuid))]
    pub jobs: Vec<JobId>,
}

/// How many replayed jobs [`Client::replay`] publishes at once: each chunk is written in full
/// and confirmed before the next.
pub const REPLAY_CHUNK: usize = 1000;

/// The result of enqueueing one job. See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, PartialEq)]
pub struct Enqueued {
    /// The job, as recorded.
    pub job: Job,
    /// False when the id or `(kind, dedup_key)` already existed and this is that job.
    pub created: bool,
}

/// Enqueues jobs and reads them back. Cheap to clone.
///
/// A job enqueued is recorded before it is published, so it is never lost, and one
/// `(kind, dedup_key)` is one job: see the crate's [guarantees](crate#guarantees).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    /// Single enqueues on their way to the batcher, which writes whatever has queued up as
    /// one batch. Closed when the last clone of the client is dropped, which ends the batcher.
    batcher: mpsc::UnboundedSender<Pending>,
}

/// What enqueueing needs; shared by the client's clones and its batcher.
struct Inner {
    store: Store,
    publisher: Arc<Publisher>,
    confirmed: mpsc::UnboundedSender<Vec<JobId>>,
    max_attempts: i32,
    kinds: crate::config::KindSettings,
    /// Options of handlers this process registered, below `APIARY_KINDS`.
    registered: std::sync::RwLock<std::collections::HashMap<String, crate::config::KindOptions>>,
    max_payload_bytes: usize,
    lease: Duration,
    /// The queues the configuration names ([`Config::configured_queues`]): listed by
    /// [`Client::queues`] even before anything ran on them.
    configured: Vec<String>,
    /// `APIARY_WEBHOOK_HOSTS`: the hosts a `callback_url` may name.
    webhook_hosts: crate::webhook::WebhookHosts,
    /// `APIARY_WEBHOOK_SECRET`: a `callback_url` is refused without one.
    webhook_secret: Option<crate::webhook::WebhookSecret>,
}

/// One job waiting for the batcher, and where its answer goes.
struct Pending {
    job: NewJob,
    /// The caller's trace context: the batcher publishes outside the caller's span.
    trace: Option<crate::trace::TraceContext>,
    reply: tokio::sync::oneshot::Sender<Result<Enqueued, EnqueueError>>,
}

impl Client {
    /// A client for `cfg`'s Postgres and RabbitMQ. Connections open on first use. Must be
    /// called within a tokio runtime.
    pub fn new(cfg: &Config) -> Result<Client, StoreError> {
        let store = Store::connect_lazy(&cfg.database_url, cfg.db_pool)?;
        let name = format!("apiary client pid {}", std::process::id());
        let publisher = Arc::new(
            Publisher::new(&cfg.amqp_url, &name, &cfg.queue)
                .with_queue_type(cfg.queue_type)
                .with_shards(cfg.shards())
                .with_ledger(store.clone()),
        );
        Ok(Client::from_parts(store, publisher, cfg))
    }

    /// A client on an existing store and publisher.
    pub fn from_parts(store: Store, publisher: Arc<Publisher>, cfg: &Config) -> Client {
        let (confirmed, rx) = mpsc::unbounded_channel();
        tokio::spawn(clean_outbox(store.clone(), rx));
        let inner = Arc::new(Inner {
            store,
            publisher,
            confirmed,
            max_attempts: cfg.max_attempts,
            kinds: cfg.kinds.clone(),
            registered: std::sync::RwLock::new(std::collections::HashMap::new()),
            lease: cfg.lease,
            max_payload_bytes: cfg.max_payload_bytes,
            configured: cfg.configured_queues(),
            webhook_hosts: cfg.webhook_hosts.clone(),
            webhook_secret: cfg.webhook_secret.clone(),
        });
        let (batcher, pending) = mpsc::unbounded_channel();
        tokio::spawn(batch_enqueues(inner.clone(), pending));
        Client { inner, batcher }
    }

    /// Takes the options of `registry`'s handlers (their `KindOptions`: queue, priority,
    /// attempt budget) as the defaults of the jobs this client enqueues, below `APIARY_KINDS`,
    /// as a worker with the same handlers applies them. A process that enqueues jobs of its
    /// own handlers calls it once.
    pub fn use_handler_options(&self, registry: &crate::handler::Registry) {
        if let Ok(mut r) = self.inner.registered.write() {
            for kind in registry.kinds() {
                if let Some(e) = registry.get(kind) {
                    r.insert(kind.to_string(), e.options.clone());
                }
            }
        }
    }

    /// The store, for reading jobs.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The publisher, for readiness checks.
    pub fn publisher(&self) -> &Publisher {
        &self.inner.publisher
    }

    /// Enqueues one job. Returns once it is recorded and the broker has confirmed it, or, if
    /// its id or `(kind, dedup_key)` exists, returns that job and writes nothing.
    ///
    /// `job` is a [`NewJob`], or typed arguments: a [`crate::JobArgs`] value or a
    /// [`crate::TypedJob`] (see [`IntoNewJob`]).
    ///
    /// Concurrent calls are written together: each waits only for the batch in flight, and
    /// then shares one statement and one pipelined publish with whatever queued up meanwhile.
    pub async fn enqueue(&self, job: impl IntoNewJob) -> Result<Enqueued, EnqueueError> {
        let job = job.into_new_job()?;
        // Checked here, so one caller's bad input never fails another's batch.
        job.validate(self.inner.max_payload_bytes)?;
        if !job.depends_on.is_empty() {
            // Its parents are locked and checked in its own statement: an unknown parent is
            // this caller's error alone, never a shared batch's.
            let mut out = self.inner.enqueue_many(vec![job]).await?;
            return out
                .pop()
                .ok_or_else(|| EnqueueError::Invalid(InvalidJob::new("kind", "no job given")));
        }
        // Named here, so a batch that fails after recording can tell each caller which job.
        let mut job = job;
        job.id.get_or_insert_with(Uuid::now_v7);
        let began = std::time::Instant::now();
        let (reply, rx) = tokio::sync::oneshot::channel();
        let trace = crate::telemetry::current_trace();
        let result = match self.batcher.send(Pending { job, trace, reply }) {
            Ok(()) => rx.await.unwrap_or_else(|_| {
                Err(InvalidJob::new("kind", "the enqueue batcher stopped").into())
            }),
            Err(mpsc::error::SendError(Pending { job, .. })) => {
                let mut out = self.inner.enqueue_many(vec![job]).await?;
                out.pop()
                    .ok_or_else(|| EnqueueError::Invalid(InvalidJob::new("kind", "no job given")))
            }
        };
        metrics::histogram!("apiary_enqueue_duration_seconds")
            .record(began.elapsed().as_secs_f64());
        result
    }

    /// Enqueues many jobs in one statement and one pipelined publish, answering in input
    /// order. All are encoded and validated first: one invalid job rejects the batch and
    /// writes nothing. The jobs are [`NewJob`]s or typed arguments of one type; for typed
    /// jobs of several kinds, convert each with [`IntoNewJob::into_new_job`].
    pub async fn enqueue_many<J: IntoNewJob>(
        &self,
        jobs: Vec<J>,
    ) -> Result<Vec<Enqueued>, EnqueueError> {
        let began = std::time::Instant::now();
        let jobs = jobs
            .into_iter()
            .map(IntoNewJob::into_new_job)
            .collect::<Result<Vec<_>, _>>()?;
        let result = self.inner.enqueue_many(jobs).await;
        metrics::histogram!("apiary_enqueue_duration_seconds")
            .record(began.elapsed().as_secs_f64());
        result
    }

    /// Enqueues a chain: every job depends on the one before it (besides any `depends_on` of
    /// its own), so they run strictly in order, and a step that ends `dead` or `cancelled`
    /// cancels the rest. Recorded in one transaction, all or nothing; every job must be new
    /// (an id or dedup key that resolves to an existing job rejects the chain). Returns the
    /// jobs in order.
    pub async fn enqueue_chain<J: IntoNewJob>(
        &self,
        jobs: Vec<J>,
    ) -> Result<Vec<Enqueued>, EnqueueError> {
        let mut jobs = group_jobs(jobs, "chain")?;
        let mut previous: Option<JobId> = None;
        for job in &mut jobs {
            let id = *job.id.get_or_insert_with(Uuid::now_v7);
            if let Some(p) = previous
                && !job.depends_on.contains(&p)
            {
                job.depends_on.push(p);
            }
            previous = Some(id);
        }
        let rows = self.inner.rows(&jobs)?;
        let answers = self
            .inner
            .record_and_publish_in(jobs, rows, true, None, true)
            .await?;
        answers.into_iter().collect()
    }

    /// Enqueues a batch: `jobs` recorded in one transaction with the batch, all new, and the
    /// `on_complete` callback enqueued exactly once when the last of them reaches a final
    /// status (with `on_success`, only if every one succeeded). Returns the batch's id.
    /// `options` is `on_success` as a `bool`, or a [`BatchOptions`] with a `callback_url`.
    pub async fn enqueue_batch<J: IntoNewJob>(
        &self,
        jobs: Vec<J>,
        on_complete: OnComplete,
        options: impl Into<BatchOptions>,
    ) -> Result<BatchEnqueued, EnqueueError> {
        let BatchOptions {
            on_success,
            callback_url,
        } = options.into();
        if let Some(url) = &callback_url {
            crate::webhook::check(
                url,
                &self.inner.webhook_hosts,
                self.inner.webhook_secret.as_ref(),
            )?;
        }
        let jobs = group_jobs(jobs, "batch")?;
        if let Some(i) = jobs.iter().position(|j| !j.depends_on.is_empty()) {
            return Err(InvalidJob::new(
                "depends_on",
                format!("job {i}: a batch's jobs cannot have depends_on"),
            )
            .into());
        }
        crate::job::validate_kind(&on_complete.kind)
            .map_err(|e| InvalidJob::new("on_complete.kind", e.reason))?;
        if let Some(q) = &on_complete.queue {
            crate::job::validate_queue(q)
                .map_err(|e| InvalidJob::new("on_complete.queue", e.reason))?;
        }
        if let Some(n) = on_complete.max_attempts {
            crate::job::validate_max_attempts(n)
                .map_err(|e| InvalidJob::new("on_complete.max_attempts", e.reason))?;
        }
        let payload = serde_json::value::to_raw_value(&on_complete.payload)
            .map_err(|e| InvalidJob::new("on_complete.payload", e.to_string()))?;
        // The callback's payload wraps this one with the batch's id and counts.
        let room = self
            .inner
            .max_payload_bytes
            .saturating_sub(CALLBACK_ENVELOPE_BYTES);
        if payload.get().len() > room {
            return Err(InvalidJob::new(
                "on_complete.payload",
                format!(
                    "is {} bytes; the limit is {room} (the payload limit less {CALLBACK_ENVELOPE_BYTES} for the batch's counts)",
                    payload.get().len()
                ),
            )
            .into());
        }
        let mut rows = self.inner.rows(&jobs)?;
        let id = Uuid::now_v7();
        for r in &mut rows {
            r.batch_id = Some(id);
        }
        let options = self.inner.kind_options(&on_complete.kind);
        let batch = crate::store::batches::BatchRow {
            id,
            total: i32::try_from(rows.len()).unwrap_or(i32::MAX),
            callback_id: Uuid::now_v7(),
            callback_kind: on_complete.kind.clone(),
            callback_payload: payload,
            callback_queue: on_complete
                .queue
                .clone()
                .or(options.queue)
                .unwrap_or_else(|| crate::job::DEFAULT_QUEUE.to_string()),
            callback_max_attempts: on_complete
                .max_attempts
                .or(options.max_attempts)
                .unwrap_or(self.inner.max_attempts),
            prefix: self.inner.publisher.prefix().to_string(),
            on_success,
            callback_url,
        };
        let answers = self
            .inner
            .record_and_publish_in(jobs, rows, true, Some(&batch), true)
            .await?;
        let mut ids = Vec::with_capacity(answers.len());
        let mut unpublished: Option<BrokerError> = None;
        for a in answers {
            match a {
                Ok(e) => ids.push(e.job.id),
                Err(EnqueueError::NotPublished { source, ids: more }) => {
                    ids.extend(more);
                    unpublished.get_or_insert(source);
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(source) = unpublished {
            return Err(EnqueueError::NotPublished { source, ids });
        }
        Ok(BatchEnqueued {
            id,
            callback_id: batch.callback_id,
            jobs: ids,
        })
    }

    /// The batch with this id, its children counted by status.
    pub async fn batch(
        &self,
        id: Uuid,
    ) -> Result<Option<crate::store::batches::Batch>, StoreError> {
        self.inner.store.get_batch(id).await
    }

    /// Replays dead jobs: back to `queued` with a fresh attempt budget, same id and history,
    /// published again, and their letters removed from the dead-letter queue. Returns the ids
    /// replayed.
    pub async fn replay(
        &self,
        selector: &crate::store::dead_job::ReplaySelector,
    ) -> Result<Vec<JobId>, EnqueueError> {
        self.replay_reporting(selector, |_, _| {}).await
    }

    /// [`Client::replay`], calling `published(done, total)` once the jobs are back in `queued`
    /// (with `done` 0) and again after each confirmed chunk of [`REPLAY_CHUNK`] messages.
    ///
    /// The replay itself is one statement, all or nothing, as before: every selected job is
    /// `queued` with its outbox row in one commit. Only the publish comes in chunks, each
    /// confirmed before the next, so a large replay shows its progress and no single publish
    /// outlives [`crate::broker::publish::CONFIRM_TIMEOUT`]. If a chunk fails, the error names
    /// every replayed job, as it would have without chunks: the confirmed ones are on the
    /// queue, and the outbox relay publishes the rest.
    pub async fn replay_reporting(
        &self,
        selector: &crate::store::dead_job::ReplaySelector,
        mut published: impl FnMut(usize, usize),
    ) -> Result<Vec<JobId>, EnqueueError> {
        let jobs = self.inner.store.replay_dead(selector).await?;
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
        published(0, ids.len());
        // Queued before the publish: once replayed, the old letters are stale whether or not
        // this publish is confirmed. The workers' sweep removes them, one pass for many
        // replays; failing to queue leaves stale letters, not lost jobs.
        if let Err(e) = self.inner.store.queue_dead_sweep(&ids).await {
            tracing::warn!(error = %e, "replayed, but could not queue their dead letters for removal");
        }
        let mut done = 0;
        for chunk in jobs.chunks(REPLAY_CHUNK) {
            if let Err(source) = self.inner.publisher.publish_jobs(chunk).await {
                return Err(EnqueueError::NotPublished { source, ids });
            }
            // Confirmed: their outbox rows can go now, whatever happens to the next chunk.
            let _ = self
                .inner
                .confirmed
                .send(chunk.iter().map(|j| j.id).collect());
            done += chunk.len();
            published(done, ids.len());
        }
        tracing::info!(replayed = ids.len(), "replayed dead jobs");
        Ok(ids)
    }

    /// Checks the invariants ([`crate::store::invariants`]) against the live database, with the
    /// dead-letter queues' depths from RabbitMQ (every known queue's, added up). Safe while
    /// work runs; exact checks of the broker side need [`Client::check_quiescent`].
    pub async fn check(&self) -> Result<Vec<crate::store::invariants::Violation>, StatsError> {
        let names = self.known_queues().await?;
        let depths = self.total_depths(&names).await?;
        let quiet = crate::store::invariants::Quiet::Live {
            dead_letters: Some(u64::from(depths.dead)),
        };
        Ok(self.inner.store.check_invariants(quiet).await?)
    }

    /// Like [`Client::check`], for a deployment where nothing is in flight (no worker holds a
    /// delivery): then every message of every known queue is counted, and every unfinished
    /// job must be accounted for by a message or an outbox row.
    pub async fn check_quiescent(
        &self,
    ) -> Result<Vec<crate::store::invariants::Violation>, StatsError> {
        let names = self.known_queues().await?;
        let depths = self.total_depths(&names).await?;
        let quiet = crate::store::invariants::Quiet::Quiescent {
            messages: u64::from(depths.ready) + u64::from(depths.delayed),
            dead_letters: u64::from(depths.dead),
        };
        Ok(self.inner.store.check_invariants(quiet).await?)
    }

    /// A snapshot for operators: queue depths from RabbitMQ (added up over every known
    /// queue, and per queue), live workers, jobs by status in the last hour, and the oldest
    /// waiting job.
    pub async fn stats(&self) -> Result<Stats, StatsError> {
        let lease = self.inner.lease;
        let workers = self.inner.store.live_workers(lease * 3).await?;
        let queues = self.queues().await?;
        let mut depths = crate::broker::topology::QueueDepths::default();
        for q in &queues {
            depths.add(&crate::broker::topology::QueueDepths {
                ready: q.ready,
                consumers: q.consumers,
                delayed: q.delayed,
                dead: q.dead,
            });
        }
        let in_flight = workers.iter().map(|w| i64::from(w.in_flight)).sum();
        let throughput = workers.iter().map(|w| w.rate).sum();
        Ok(Stats {
            queue: self
                .inner
                .publisher
                .names(crate::job::DEFAULT_QUEUE)
                .work
                .clone(),
            depths,
            in_flight,
            throughput_per_second: throughput,
            oldest_waiting_seconds: self.inner.store.oldest_waiting_seconds().await?,
            last_hour: self.inner.store.counts_last_hour().await?,
            queues,
            workers,
        })
    }

    /// The job with this id.
    pub async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        self.inner.store.get_job(id).await
    }

    /// Waits up to `timeout` for the job to reach a final status ([`JobStatus::is_final`])
    /// and returns it, or returns it as it stands when the time runs out; `None` if there is
    /// no such job. The library's `GET /v1/jobs/{id}?wait=N`: it wakes on the finishing
    /// commit's notification, not by polling.
    pub async fn wait(&self, id: JobId, timeout: Duration) -> Result<Option<Job>, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        // Listening before the first read, so a finish between the read and the wait still
        // wakes us. Without a listener (LISTEN refused, say) this polls instead.
        let mut listener = match PgListener::connect_with(self.inner.store.pool()).await {
            Ok(mut l) => l.listen(DONE_CHANNEL).await.is_ok().then_some(l),
            Err(_) => None,
        };
        let wanted = id.to_string();
        loop {
            let job = self.get(id).await?;
            match &job {
                Some(j) if !j.status().is_final() => {}
                _ => return Ok(job),
            }
            let woken = async {
                match &mut listener {
                    Some(l) => loop {
                        match l.try_recv().await {
                            Ok(Some(n)) if n.payload().split(',').any(|s| s == wanted) => break,
                            Ok(Some(_)) => {}
                            // The connection dropped (the listener reconnects on the next
                            // call) and a notification may be lost: read the job again.
                            Ok(None) | Err(_) => break,
                        }
                    },
                    None => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            tokio::select! {
                () = woken => {}
                () = tokio::time::sleep_until(deadline) => return self.get(id).await,
            }
        }
    }
}

impl Inner {
    /// The options for `kind`: `APIARY_KINDS`, then the handler's registration.
    fn kind_options(&self, kind: &str) -> crate::config::KindOptions {
        let registered = self
            .registered
            .read()
            .ok()
            .and_then(|r| r.get(kind).cloned())
            .unwrap_or_default();
        self.kinds.get(kind).or(registered)
    }

    /// The job's `callback_url`, else its kind's, checked against the webhook policy: a
    /// URL this deployment would not call is refused here, before anything is written.
    fn callback_url(
        &self,
        job: &NewJob,
        kind_url: Option<String>,
    ) -> Result<Option<String>, EnqueueError> {
        let Some(url) = job.callback_url.clone().or(kind_url) else {
            return Ok(None);
        };
        crate::webhook::check(&url, &self.webhook_hosts, self.webhook_secret.as_ref())?;
        Ok(Some(url))
    }

    /// Validates and shapes jobs into rows, every default applied. Nothing is written.
    fn rows(&self, jobs: &[NewJob]) -> Result<Vec<JobRow>, EnqueueError> {
        let now = Utc::now();
        let mut rows = Vec::with_capacity(jobs.len());
        for job in jobs {
            job.validate(self.max_payload_bytes)?;
            let payload = serde_json::value::to_raw_value(&job.payload)
                .map_err(|e| InvalidJob::new("payload", e.to_string()))?;
            let options = self.kind_options(&job.kind);
            rows.push(JobRow {
                id: job.id.unwrap_or_else(Uuid::now_v7),
                kind: job.kind.clone(),
                payload,
                dedup_key: job.dedup_key.clone(),
                max_attempts: job
                    .max_attempts
                    .or(options.max_attempts)
                    .unwrap_or(self.max_attempts),
                run_at: job.due_at(now),
                queue: job
                    .queue
                    .clone()
                    .or(options.queue)
                    .unwrap_or_else(|| crate::job::DEFAULT_QUEUE.to_string()),
                prefix: self.publisher.prefix().to_string(),
                priority: job.priority.or(options.priority).unwrap_or(0),
                concurrency_key: job.concurrency_key.clone(),
                depends_on: job.depends_on.clone(),
                batch_id: None,
                callback_url: self.callback_url(job, options.callback_url)?,
                trace: crate::telemetry::current_trace(),
            });
        }
        Ok(rows)
    }

    /// Records and publishes `jobs` as one batch for one caller: all are validated first, and
    /// one invalid or conflicting job rejects the batch with nothing written.
    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>, EnqueueError> {
        let rows = self.rows(&jobs)?;
        let answers = self.record_and_publish(jobs, rows, true).await?;
        let mut out = Vec::with_capacity(answers.len());
        let mut unpublished: Option<(BrokerError, Vec<JobId>)> = None;
        for answer in answers {
            match answer {
                Ok(e) => out.push(e),
                Err(EnqueueError::NotPublished { source, ids }) => match &mut unpublished {
                    Some((_, all)) => all.extend(ids),
                    None => unpublished = Some((source, ids)),
                },
                Err(e) => return Err(e),
            }
        }
        match unpublished {
            Some((source, ids)) => Err(EnqueueError::NotPublished { source, ids }),
            None => Ok(out),
        }
    }

    /// Records `rows` (made from `jobs`), publishes the new ones, and answers each job on its
    /// own: the batch may be shared by unrelated callers, so what befalls one job (a conflict,
    /// a failed read of an existing one) is that job's answer alone. `Err` only when nothing
    /// was written.
    async fn record_and_publish(
        &self,
        jobs: Vec<NewJob>,
        rows: Vec<JobRow>,
        all_or_nothing: bool,
    ) -> Result<Vec<Result<Enqueued, EnqueueError>>, EnqueueError> {
        self.record_and_publish_in(jobs, rows, all_or_nothing, None, false)
            .await
    }

    /// [`Inner::record_and_publish`], recording `batch` with the rows when given.
    async fn record_and_publish_in(
        &self,
        jobs: Vec<NewJob>,
        rows: Vec<JobRow>,
        all_or_nothing: bool,
        batch: Option<&crate::store::batches::BatchRow>,
        all_new: bool,
    ) -> Result<Vec<Result<Enqueued, EnqueueError>>, EnqueueError> {
        let many = rows.len() > 1;
        let inserted = match self
            .store
            .insert_jobs_in_batch(&rows, all_or_nothing, batch, all_new)
            .await?
        {
            InsertOutcome::Written(v) => v,
            InsertOutcome::RolledBack { index, reason } => {
                return Err(EnqueueError::Conflict(format!("job {index}: {reason}")));
            }
            InsertOutcome::BadParent { index, reason } => {
                let reason = if many {
                    format!("job {index}: {reason}")
                } else {
                    reason
                };
                return Err(InvalidJob::new("depends_on", reason).into());
            }
        };

        // A new job with parents may be waiting or cancelled: read back how it was recorded,
        // and publish only the queued ones (the others have no outbox row either). If the
        // read fails, none of them is published here; the relay sends the queued ones.
        let with_parents: Vec<JobId> = rows
            .iter()
            .zip(&inserted)
            .filter(|(r, ins)| !r.depends_on.is_empty() && matches!(ins, Inserted::New(_)))
            .map(|(r, _)| r.id)
            .collect();
        let recorded: Vec<Job> = if with_parents.is_empty() {
            Vec::new()
        } else {
            self.store.get_jobs(&with_parents).await.unwrap_or_default()
        };
        let (fresh, traces): (Vec<WireJob>, Vec<Option<&crate::trace::TraceContext>>) = rows
            .iter()
            .zip(&inserted)
            .filter(|(r, ins)| {
                matches!(ins, Inserted::New(_))
                    && (r.depends_on.is_empty()
                        || recorded
                            .iter()
                            .any(|j| j.id == r.id && j.status() == JobStatus::Queued))
            })
            .map(|(r, _)| (wire_of(r), r.trace.as_ref()))
            .unzip();
        let mut publish_error: Option<BrokerError> = None;
        if !fresh.is_empty() {
            let publish = || async {
                self.publisher
                    .publish_traced(fresh.iter().zip(traces.iter().copied()))
                    .await
            };
            // A brief broker hiccup should not fail the call; a longer outage does, and the
            // relay publishes the recorded jobs later.
            match publish
                .retry(
                    ExponentialBuilder::default()
                        .with_min_delay(Duration::from_millis(50))
                        .with_max_times(3),
                )
                .await
            {
                Ok(()) => {
                    let _ = self.confirmed.send(fresh.iter().map(|j| j.id).collect());
                }
                Err(e) => publish_error = Some(e),
            }
        }

        let existing: Vec<JobId> = inserted
            .iter()
            .filter_map(|i| match i {
                Inserted::Existing(id) => Some(*id),
                _ => None,
            })
            .collect();
        let found = if existing.is_empty() {
            Ok(Vec::new())
        } else {
            self.store.get_jobs(&existing).await
        };
        let mut out = Vec::with_capacity(jobs.len());
        for ((job, row), ins) in jobs.into_iter().zip(rows).zip(inserted) {
            out.push(match ins {
                Inserted::New(_) if publish_error.is_some() => Err(EnqueueError::NotPublished {
                    source: publish_error.clone().unwrap_or(BrokerError::Disconnected),
                    ids: vec![row.id],
                }),
                Inserted::New(created_at) => Ok(Enqueued {
                    job: match recorded.iter().find(|j| j.id == row.id) {
                        Some(j) => j.clone(),
                        None => new_record(job, row, created_at),
                    },
                    created: true,
                }),
                Inserted::Conflict(reason) => Err(EnqueueError::Conflict(reason)),
                Inserted::Existing(id) => match &found {
                    Ok(found) => found
                        .iter()
                        .find(|j| j.id == id)
                        .map(|j| Enqueued {
                            job: j.clone(),
                            created: false,
                        })
                        .ok_or_else(|| {
                            EnqueueError::Store(StoreError::Query {
                                context: "reading an existing job (it was just pruned; retry)",
                                source: sqlx::Error::RowNotFound,
                            })
                        }),
                    Err(e) => Err(EnqueueError::Store(StoreError::Query {
                        context: "reading an existing job",
                        source: sqlx::Error::Protocol(e.to_string()),
                    })),
                },
            });
        }
        Ok(out)
    }

    /// Records a batch of unrelated callers' jobs (already validated), isolating any job
    /// Postgres refuses: the batch is split until the refused job stands alone, and only its
    /// caller hears of it.
    async fn record_isolating(
        &self,
        jobs: Vec<NewJob>,
        rows: Vec<JobRow>,
    ) -> Vec<Result<Enqueued, EnqueueError>> {
        let n = jobs.len();
        match self
            .record_and_publish(jobs.clone(), rows.clone(), false)
            .await
        {
            Ok(answers) => answers,
            Err(EnqueueError::Store(e)) if e.is_data_error() && n > 1 => {
                let mid = n / 2;
                let (jl, jr) = (jobs[..mid].to_vec(), jobs[mid..].to_vec());
                let (rl, rr) = (rows[..mid].to_vec(), rows[mid..].to_vec());
                let mut out = Box::pin(self.record_isolating(jl, rl)).await;
                out.extend(Box::pin(self.record_isolating(jr, rr)).await);
                out
            }
            Err(EnqueueError::Store(e)) if e.is_data_error() => {
                vec![Err(EnqueueError::Refused(
                    e.refusal().unwrap_or_else(|| e.to_string()),
                ))]
            }
            // Nothing was written and the cause is not one job's data (Postgres is down, say):
            // every caller hears it.
            Err(e) => {
                let text = e.to_string();
                let mut out = Vec::with_capacity(n);
                out.push(Err(e));
                out.extend((1..n).map(|_| {
                    Err(EnqueueError::Store(StoreError::Query {
                        context: "recording jobs",
                        source: sqlx::Error::Protocol(text.clone()),
                    }))
                }));
                out
            }
        }
    }
}

/// Writes single enqueues in batches: everything that queued up while the previous batch was
/// in flight goes in one statement and one pipelined publish, and each caller gets the answer
/// for its own job.
async fn batch_enqueues(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    const MAX: usize = 500;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        // Each job was validated by its caller; shaping cannot fail for a valid job, but if
        // it did, only that caller hears it.
        let mut jobs = Vec::with_capacity(batch.len());
        let mut rows = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for Pending { job, trace, reply } in batch {
            match inner.rows(std::slice::from_ref(&job)) {
                Ok(mut r) => {
                    rows.extend(r.pop().map(|row| JobRow { trace, ..row }));
                    jobs.push(job);
                    replies.push(reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        if jobs.is_empty() {
            continue;
        }
        let answers = inner.record_isolating(jobs, rows).await;
        for (reply, answer) in replies.into_iter().zip(answers) {
            let _ = reply.send(answer);
        }
    }
}

fn wire_of(row: &JobRow) -> WireJob {
    WireJob {
        id: row.id,
        kind: row.kind.clone(),
        payload: row.payload.clone(),
        dedup_key: row.dedup_key.clone(),
        max_attempts: Some(row.max_attempts),
        run_at: row.run_at,
        queue: Some(row.queue.clone()),
        priority: Some(row.priority),
        concurrency_key: row.concurrency_key.clone(),
        prefix: Some(row.prefix.clone()),
        callback_url: row.callback_url.clone(),
    }
}

/// The record of a job just inserted, built without reading it back.
fn new_record(job: NewJob, row: JobRow, created_at: chrono::DateTime<Utc>) -> Job {
    Job {
        id: row.id,
        kind: row.kind,
        status: JobStatusText(JobStatus::Queued),
        payload: job.payload,
        dedup_key: row.dedup_key,
        attempts: 0,
        max_attempts: row.max_attempts,
        result: None,
        error: None,
        errors: serde_json::Value::Array(Vec::new()),
        duplicate_of: None,
        run_at: row.run_at,
        next_attempt_at: None,
        raw_body: None,
        created_at,
        started_at: None,
        finished_at: None,
        queue: row.queue,
        priority: i16::from(row.priority),
        concurrency_key: row.concurrency_key,
        progress: None,
        progress_detail: None,
        progress_at: None,
        depends_on: row.depends_on,
        batch_id: row.batch_id,
        callback_url: row.callback_url,
    }
}

/// Deletes the outbox rows of confirmed jobs in batches, off the enqueue's path. A row this
/// misses (the process stopped first) is republished by the relay: a harmless duplicate.
async fn clean_outbox(store: Store, mut rx: mpsc::UnboundedReceiver<Vec<JobId>>) {
    while let Some(mut ids) = rx.recv().await {
        while let Ok(more) = rx.try_recv() {
            ids.extend(more);
            if ids.len() >= 4096 {
                break;
            }
        }
        if let Err(e) = store.delete_outbox(&ids).await {
            tracing::debug!(error = %e, "outbox cleanup failed; the relay will republish those jobs");
        }
    }
}

/// Why a stats snapshot could not be read.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// Postgres failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// RabbitMQ failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// What `apiary status` prints and `GET /v1/stats` returns.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    /// The `default` queue's work queue: the deployment's name on the broker.
    pub queue: String,
    /// Messages in the deployment's broker queues, from RabbitMQ, added up over every queue
    /// in `queues`.
    pub depths: crate::broker::topology::QueueDepths,
    /// Deliveries held by live workers (RabbitMQ's unacknowledged count, as the workers report it).
    pub in_flight: i64,
    /// Jobs finished per second across live workers, recently.
    pub throughput_per_second: f64,
    /// How long the oldest due job has waited.
    pub oldest_waiting_seconds: Option<f64>,
    /// Jobs created in the last hour, by status.
    pub last_hour: std::collections::BTreeMap<String, i64>,
    /// Each queue of the deployment, `default` first.
    #[serde(default)]
    pub queues: Vec<QueueInfo>,
    /// Live workers.
    pub workers: Vec<crate::store::workers::WorkerRow>,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = &self.depths;
        writeln!(f, "queue {}", self.queue)?;
        writeln!(
            f,
            "  ready {}   in flight {}   delayed {}   dead letters {}   consumers {}",
            d.ready, self.in_flight, d.delayed, d.dead, d.consumers
        )?;
        match self.oldest_waiting_seconds {
            Some(s) => writeln!(f, "  oldest waiting job: {s:.1}s")?,
            None => writeln!(f, "  oldest waiting job: none")?,
        }
        writeln!(f, "  throughput {:.1} jobs/s", self.throughput_per_second)?;
        write!(f, "{}", QueueTable(&self.queues))?;
        writeln!(f, "workers ({} alive)", self.workers.len())?;
        for w in &self.workers {
            writeln!(
                f,
                "  {}  {}:{}  v{}  in flight {}/{}  processed {}  failed {}  {:.1} jobs/s{}",
                w.id,
                w.host,
                w.pid,
                w.version,
                w.in_flight,
                w.concurrency,
                w.processed,
                w.failed,
                w.rate,
                if w.draining { "  draining" } else { "" }
            )?;
        }
        writeln!(f, "jobs created in the last hour")?;
        if self.last_hour.is_empty() {
            writeln!(f, "  none")?;
        }
        for (status, n) in &self.last_hour {
            writeln!(f, "  {status:<10} {n}")?;
        }
        Ok(())
    }
}

/// Queues as a table: name, paused, ready, in flight, oldest waiting, with a heading line.
/// What `apiary status` and `apiary queue list` print.
///
/// See the crate's [guarantees](crate#guarantees).
pub struct QueueTable<'a>(pub &'a [QueueInfo]);

impl std::fmt::Display for QueueTable<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let width = self
            .0
            .iter()
            .map(|q| q.name.len())
            .chain(std::iter::once("queue".len()))
            .max()
            .unwrap_or(5);
        writeln!(
            f,
            "  {:<width$}  {:<6}  {:>8}  {:>9}  oldest waiting",
            "queue", "paused", "ready", "in flight"
        )?;
        for q in self.0 {
            let oldest = match q.oldest_waiting_seconds {
                Some(s) => format!("{s:.1}s"),
                None => "none".into(),
            };
            writeln!(
                f,
                "  {:<width$}  {:<6}  {:>8}  {:>9}  {oldest}",
                q.name,
                if q.paused { "yes" } else { "no" },
                q.ready,
                q.in_flight,
            )?;
        }
        Ok(())
    }
}
