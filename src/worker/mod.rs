//! The worker pool: one process's consume loop, bounded concurrency and two-phase stop.
//!
//! A session is one RabbitMQ connection with a consuming channel and a publishing channel;
//! when it breaks, the worker opens another with backoff, and the deliveries it held are
//! redelivered by the broker (the claim keeps their effects single). Deliveries arrive in
//! bursts and are claimed in batches by the [`executor`]; finished attempts are written in
//! batches by the [`completer`], which acknowledges only after the commit. The [`rescuer`]
//! renews leases and relays the outbox.
//!
//! On drain the worker stops consuming, hands back what it has not started, lets in-flight
//! jobs finish within the drain timeout, then interrupts and hands back the rest, uncharged.

pub mod completer;
pub mod executor;
pub(crate) mod metrics;
pub mod outage;
mod probe;
pub mod rescuer;
pub mod retry;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::{FutureExt, StreamExt};
use lapin::{Channel, Connection};
use tokio::sync::{RwLock, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::broker::consume::{self, Acks, Settle};
use crate::broker::{BrokerError, Context as _, Publisher, QueueNames};
use crate::config::Config;
use crate::handler::Registry;
use crate::job::JobId;
use crate::shutdown::Shutdown;
use crate::store::{Store, StoreError};
use completer::Completion;
use outage::Outage;

/// Why a worker could not run.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Postgres failed at start-up (for example, an old schema).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// RabbitMQ failed in a way retrying cannot fix.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// What a worker did, reported when it stops.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Attempts finished (any outcome but handed back).
    pub finished: u64,
    /// Deliveries handed back to the queue for another worker.
    pub handed_back: u64,
    /// Milliseconds the drain took, from the stop request to exit.
    pub drain_ms: u64,
}

/// Where a delivery came from, so whoever finishes with it can settle it.
#[derive(Clone)]
pub(crate) struct DeliveryRef {
    pub(crate) tag: u64,
    pub(crate) acks: Acks,
}

impl DeliveryRef {
    pub(crate) fn settle(&self, how: Settle) {
        self.acks.settle(self.tag, how);
    }
}

/// An attempt this worker is running: what the heartbeat renews and what a forced stop
/// releases. Kept by `(job id, attempt)`: after a lapsed lease the same job may come back to
/// this worker as a new attempt, and the two must never be mistaken for each other.
pub(crate) struct Running {
    /// The handler's token; the heartbeat fires it when someone cancels the job, or when the
    /// claim is found lost (the lease lapsed and the job went elsewhere).
    pub(crate) cancel: CancellationToken,
    /// Set with `cancel` when the job itself was cancelled (not the worker stopping or a
    /// timeout): the attempt then ends `cancelled` whatever the handler returns.
    pub(crate) cancel_requested: Arc<AtomicBool>,
    /// Set when the job's message was acked early (a long job): handing it back then means
    /// publishing it again, which the finish's outbox row does.
    pub(crate) detached: Arc<AtomicBool>,
    pub(crate) delivery: DeliveryRef,
}

/// Why a store operation gave up.
#[derive(Debug)]
pub(crate) enum Failed {
    /// The worker was interrupted (forced stop, drain timeout) while Postgres did not answer.
    Interrupted,
    /// Postgres refused the statement because of the data it carried
    /// ([`StoreError::is_data_error`]): the caller isolates the item at fault.
    Refused(StoreError),
}

/// Counters behind the summary, the registry row and the metrics.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) finished: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) handed_back: AtomicU64,
}

/// State shared by a worker's tasks.
pub(crate) struct Shared {
    pub(crate) cfg: Config,
    pub(crate) store: Store,
    pub(crate) registry: Registry,
    pub(crate) id: Uuid,
    pub(crate) names: QueueNames,
    /// A small pool of its own for lease renewals, so a heartbeat never waits for a
    /// connection behind claims, finishes and handlers' transactions.
    pub(crate) lease_store: Store,
    /// Attempts claimed and not yet finished, by `(job, attempt)`. Written by the executor and
    /// completer; read by the heartbeat and by a forced stop.
    pub(crate) running: std::sync::Mutex<HashMap<(JobId, i32), Running>>,
    /// Postgres's clock minus this process's, in milliseconds, as last seen by a claim: due
    /// times are judged by the store's clock, so a skewed worker neither runs jobs early nor
    /// hops them in a loop.
    pub(crate) clock_offset_ms: std::sync::atomic::AtomicI64,
    /// Deliveries to claim, to the claimer.
    pub(crate) claim_tx: mpsc::UnboundedSender<executor::Incoming>,
    /// Finished attempts, to the completer. Closed when the completer stops, after the drain.
    pub(crate) done_tx: mpsc::UnboundedSender<Completion>,
    /// The current session's publisher; `None` while RabbitMQ is unreachable.
    pub(crate) publisher: RwLock<Option<Arc<Publisher>>>,
    /// Handler slots: `concurrency` permits.
    pub(crate) slots: Arc<Semaphore>,
    /// Fires when the worker stops taking work (the drain begins).
    pub(crate) stop_taking: CancellationToken,
    /// Fires once the consumer is cancelled (or there is none): from then on nothing more can
    /// arrive, so what is held but not started can go back to the queue without coming
    /// straight back to this worker.
    pub(crate) consuming_stopped: CancellationToken,
    /// Fires when running handlers must stop (drain timeout or forced stop).
    pub(crate) interrupt: CancellationToken,
    /// Every task that holds a delivery.
    pub(crate) tasks: TaskTracker,
    pub(crate) counters: Counters,
    pub(crate) rabbit: Outage,
    pub(crate) postgres: Outage,
    pub(crate) ready: AtomicBool,
    pub(crate) metrics: metrics::WorkerMetrics,
    /// The broker's queue depths, refreshed by the rescuer; read by `/metrics`.
    pub(crate) depths: std::sync::Mutex<crate::broker::topology::QueueDepths>,
    /// A channel of the current session for reading queue depths; `None` between sessions.
    pub(crate) stats_channel: RwLock<Option<Channel>>,
    pub(crate) started_at: chrono::DateTime<chrono::Utc>,
    /// When the registry row was last written, and the finished count then: for the rate.
    pub(crate) last_beat: std::sync::Mutex<(Instant, u64)>,
}

impl Shared {
    /// The options for `kind`: `APIARY_KINDS`, then the handler's registration; unset
    /// fields fall back to the global settings at the point of use.
    pub(crate) fn kind_options(&self, kind: &str) -> crate::config::KindOptions {
        let registered = self
            .registry
            .get(kind)
            .map(|e| e.options)
            .unwrap_or_default();
        self.cfg.kinds.get(kind).or(registered)
    }

    pub(crate) async fn publisher(&self) -> Option<Arc<Publisher>> {
        self.publisher.read().await.clone()
    }

    /// Postgres's clock, estimated from this process's and the last offset seen.
    pub(crate) fn db_now(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now()
            + chrono::Duration::milliseconds(self.clock_offset_ms.load(Ordering::Relaxed))
    }

    /// Records Postgres's `now()` as returned by a statement that just ran.
    pub(crate) fn observe_db_now(&self, db_now: Option<chrono::DateTime<chrono::Utc>>) {
        if let Some(t) = db_now {
            let offset = (t - chrono::Utc::now()).num_milliseconds();
            self.clock_offset_ms.store(offset, Ordering::Relaxed);
        }
    }

    /// Runs a store operation until it succeeds. While Postgres is unreachable, and also when
    /// it rejects the statement for a reason no retry of ours can fix at once (a schema an
    /// operator is migrating), it backs off and tries again, logging once. Once the worker is
    /// interrupted it makes one last attempt bounded to a couple of seconds (so a drain still
    /// records what finished when Postgres answers) and then gives up. A refusal of the data
    /// itself is returned at once, for the caller to isolate.
    pub(crate) async fn with_store<T, F, Fut>(&self, mut op: F) -> Result<T, Failed>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        const LAST_TRY: Duration = Duration::from_secs(2);
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(2))
            .without_max_times()
            .with_jitter()
            .build();
        loop {
            let interrupted = self.interrupt.is_cancelled();
            let result = if interrupted {
                match tokio::time::timeout(LAST_TRY, op()).await {
                    Ok(r) => r,
                    Err(_) => return Err(Failed::Interrupted),
                }
            } else {
                tokio::select! {
                    r = op() => r,
                    // Abandon the call in flight; the next round is the bounded last try.
                    () = self.interrupt.cancelled() => continue,
                }
            };
            match result {
                Ok(v) => {
                    self.postgres.up();
                    return Ok(v);
                }
                Err(e) if e.is_data_error() => return Err(Failed::Refused(e)),
                Err(e) => {
                    if !e.is_transient() {
                        tracing::error!(error = %e, "postgres rejected a worker statement; retrying with backoff");
                    }
                    self.postgres.down(&e);
                    if interrupted {
                        return Err(Failed::Interrupted);
                    }
                    let wait = delays.next().unwrap_or(Duration::from_secs(2));
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = self.interrupt.cancelled() => {}
                    }
                }
            }
        }
    }
}

/// A worker process's pool: build one with [`Worker::new`], then [`Worker::run`] it. Any
/// worker may die at any moment without losing a job: see the crate's
/// [guarantees](crate#guarantees).
pub struct Worker {
    shared: Arc<Shared>,
    done_rx: mpsc::UnboundedReceiver<Completion>,
    claim_rx: mpsc::UnboundedReceiver<executor::Incoming>,
    shutdown: Shutdown,
}

impl Worker {
    /// A worker with `registry`'s handlers, stopping when `shutdown` says so.
    pub fn new(cfg: Config, registry: Registry, shutdown: Shutdown) -> Result<Worker, WorkerError> {
        let store = Store::connect_lazy(&cfg.database_url, cfg.db_pool)?;
        let lease_store = Store::connect_lazy(&cfg.database_url, 2)?;
        let known_kinds: Vec<String> = registry
            .kinds()
            .into_iter()
            .map(str::to_string)
            .chain(cfg.kinds.0.keys().cloned())
            .collect();
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let (claim_tx, claim_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            names: QueueNames::new(&cfg.queue),
            slots: Arc::new(Semaphore::new(cfg.concurrency)),
            cfg,
            store,
            registry,
            id: Uuid::now_v7(),
            lease_store,
            running: std::sync::Mutex::new(HashMap::new()),
            clock_offset_ms: std::sync::atomic::AtomicI64::new(0),
            done_tx,
            claim_tx,
            publisher: RwLock::new(None),
            stop_taking: shutdown.drain.clone(),
            consuming_stopped: CancellationToken::new(),
            interrupt: CancellationToken::new(),
            tasks: TaskTracker::new(),
            counters: Counters::default(),
            rabbit: Outage::new("rabbitmq"),
            postgres: Outage::new("postgres"),
            ready: AtomicBool::new(false),
            metrics: metrics::WorkerMetrics::with_known_kinds(known_kinds),
            depths: std::sync::Mutex::new(Default::default()),
            stats_channel: RwLock::new(None),
            started_at: chrono::Utc::now(),
            last_beat: std::sync::Mutex::new((Instant::now(), 0)),
        });
        Ok(Worker {
            shared,
            done_rx,
            claim_rx,
            shutdown,
        })
    }

    /// This worker's id, as recorded on the jobs it claims.
    pub fn id(&self) -> Uuid {
        self.shared.id
    }

    /// A probe for readiness: true while consuming, false while connecting or draining.
    pub fn readiness(&self) -> Readiness {
        Readiness(self.shared.clone())
    }

    /// Runs until the shutdown drains it. Returns what it did.
    pub async fn run(self) -> Result<Summary, WorkerError> {
        let Worker {
            shared,
            done_rx,
            claim_rx,
            shutdown,
        } = self;
        let cfg = &shared.cfg;
        // An old schema is an operator error, not an outage: say what to run and stop.
        loop {
            match shared.store.check_schema().await {
                Ok(()) => break,
                Err(e) if e.is_transient() => {
                    shared.postgres.down(&e);
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = shutdown.drain.cancelled() => return Ok(Summary::default()),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        shared.postgres.up();
        // In the registry before the first claim, so a rescuer can find this worker's jobs
        // the moment its heartbeat stops.
        rescuer::register_now(&shared, &shutdown.drain).await;
        tracing::info!(
            worker = %shared.id, queue = %cfg.queue, concurrency = cfg.concurrency,
            prefetch = cfg.effective_prefetch(), kinds = ?shared.registry.kinds(), "worker starting"
        );

        let completer_stop = CancellationToken::new();
        let claimer_stop = CancellationToken::new();
        let claimer = tokio::spawn(executor::claimer(
            shared.clone(),
            claim_rx,
            claimer_stop.clone(),
        ));
        let completer = tokio::spawn(completer::run(
            shared.clone(),
            done_rx,
            completer_stop.clone(),
        ));
        let background_stop = CancellationToken::new();
        let rescuer = tokio::spawn(rescuer::run(shared.clone(), background_stop.clone()));
        let probes = tokio::spawn(probe::serve(
            shared.clone(),
            cfg.worker_http_addr,
            background_stop.clone(),
        ));

        let mut session: Option<(Connection, Channel, Acks)> = None;
        let mut delays = reconnect_delays();
        while !shared.stop_taking.is_cancelled() {
            let name = format!("apiary worker {} pid {}", shared.id, std::process::id());
            let opened = tokio::select! {
                r = open_session(&shared, &name) => r,
                () = shared.stop_taking.cancelled() => break,
            };
            match opened {
                Ok((conn, channel, consumer, acks)) => {
                    shared.rabbit.up();
                    delays = reconnect_delays();
                    shared.ready.store(true, Ordering::Relaxed);
                    let lost = executor::consume(&shared, &channel, consumer, &acks).await;
                    shared.ready.store(false, Ordering::Relaxed);
                    match lost {
                        None => {
                            session = Some((conn, channel, acks));
                            break;
                        }
                        Some(e) => {
                            shared.rabbit.down(&e);
                            *shared.publisher.write().await = None;
                        }
                    }
                }
                Err(e) => shared.rabbit.down(&e),
            }
            let wait = delays.next().unwrap_or(Duration::from_secs(5));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = shared.stop_taking.cancelled() => break,
            }
        }

        // The drain. New work has stopped; what follows only finishes or hands back. Every
        // step is bounded: by the drain timeout, and by a second signal, which hands back
        // everything at once, whether or not Postgres and RabbitMQ answer.
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + cfg.drain_timeout;
        // The consume loop cancelled its consumer on the way out; without a session there is
        // nothing to cancel.
        shared.consuming_stopped.cancel();
        shared.tasks.close();
        let finished_in_time = tokio::select! {
            () = shared.tasks.wait() => true,
            () = tokio::time::sleep_until(deadline) => false,
            () = shutdown.force.cancelled() => false,
        };
        if !finished_in_time {
            // Handlers see their token fire and return; their attempts are handed back uncharged.
            shared.interrupt.cancel();
            let grace = if shutdown.force.is_cancelled() {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(2)
            };
            if tokio::time::timeout(grace, shared.tasks.wait())
                .await
                .is_err()
            {
                // Handlers that ignore their token: release their jobs without them.
                release_stuck(&shared).await;
            }
        }
        claimer_stop.cancel();
        let _ = claimer.await;
        // The completer writes what finished in time. It gets until the drain deadline (and at
        // least a few seconds); past it, or on a second signal, it stops waiting for Postgres
        // and hands the rest back.
        completer_stop.cancel();
        let mut completer = completer;
        let completer_deadline = deadline.max(tokio::time::Instant::now() + Duration::from_secs(5));
        tokio::select! {
            _ = &mut completer => {}
            () = tokio::time::sleep_until(completer_deadline) => {
                shared.interrupt.cancel();
                let _ = completer.await;
            }
            () = shutdown.force.cancelled() => {
                shared.interrupt.cancel();
                let _ = completer.await;
            }
        }
        background_stop.cancel();
        let _ = rescuer.await;
        let _ = probes.await;
        let quick = Duration::from_secs(2);
        match tokio::time::timeout(quick, shared.store.remove_worker(shared.id)).await {
            Ok(Ok(())) => {}
            _ => {
                tracing::debug!("could not remove this worker's registry row; a rescuer removes it")
            }
        }
        if let Some((conn, channel, acks)) = session {
            let _ = tokio::time::timeout(quick, acks.flush()).await;
            let _ = tokio::time::timeout(quick, channel.close(200, "worker stopping".into())).await;
            let _ = tokio::time::timeout(quick, conn.close(200, "worker stopping".into())).await;
        }
        let summary = Summary {
            finished: shared.counters.finished.load(Ordering::Relaxed),
            handed_back: shared.counters.handed_back.load(Ordering::Relaxed),
            drain_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        };
        tracing::info!(
            finished = summary.finished,
            handed_back = summary.handed_back,
            drain_seconds = summary.drain_ms as f64 / 1000.0,
            "worker stopped: {} finished, {} handed back, drained in {:.1}s",
            summary.finished,
            summary.handed_back,
            summary.drain_ms as f64 / 1000.0
        );
        Ok(summary)
    }
}

/// Whether a worker is taking work, for `/readyz`.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Clone)]
pub struct Readiness(Arc<Shared>);

impl Readiness {
    /// True while the worker consumes and neither dependency is known to be down.
    pub fn is_ready(&self) -> bool {
        self.0.ready.load(Ordering::Relaxed)
            && !self.0.postgres.is_down()
            && !self.0.rabbit.is_down()
    }
}

fn reconnect_delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .without_max_times()
        .with_jitter()
        .build()
}

async fn open_session(
    shared: &Arc<Shared>,
    name: &str,
) -> Result<(Connection, Channel, lapin::Consumer, Acks), BrokerError> {
    let conn = crate::broker::connect(&shared.cfg.amqp_url, name).await?;
    let publisher = Arc::new(Publisher::on(&conn, shared.names.clone()).await?);
    let (channel, consumer) = consume::open(
        &conn,
        &shared.names,
        shared.cfg.effective_prefetch(),
        &executor::consumer_tag(shared),
    )
    .await?;
    let (acks, _task) = Acks::spawn(channel.clone());
    *shared.publisher.write().await = Some(publisher);
    *shared.stats_channel.write().await = Some(
        conn.create_channel()
            .await
            .context("opening a stats channel")?,
    );
    Ok((conn, channel, consumer, acks))
}

/// After the drain's grace: whatever still runs is released in Postgres (uncharged) and its
/// delivery requeued, so another worker starts it now rather than after the lease. A long
/// job's release queues an outbox row that publishes it again. Bounded in time: if Postgres
/// does not answer, the leases lapse and the jobs are rescued instead.
async fn release_stuck(shared: &Arc<Shared>) {
    let stuck: Vec<(JobId, i32, bool, DeliveryRef)> = match shared.running.lock() {
        Ok(mut running) => running
            .drain()
            .map(|((id, attempt), r)| (id, attempt, r.detached.load(Ordering::Relaxed), r.delivery))
            .collect(),
        Err(_) => return,
    };
    if stuck.is_empty() {
        return;
    }
    let batch: Vec<crate::store::finish_job::Finish> = stuck
        .iter()
        .map(
            |(id, attempt, detached, _)| crate::store::finish_job::Finish {
                id: *id,
                attempt: *attempt,
                outcome: crate::store::finish_job::Outcome::Released,
                detached: *detached,
            },
        )
        .collect();
    let quick = Duration::from_secs(3);
    match tokio::time::timeout(quick, shared.store.finish_jobs(shared.id, &batch)).await {
        Ok(Ok(done)) => {
            let ids: Vec<JobId> = done.iter().map(|d| d.id).collect();
            let _ = tokio::time::timeout(quick, flush_outbox(shared, &ids)).await;
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not release stuck jobs; their leases will lapse and a rescuer puts them back")
        }
        Err(_) => tracing::warn!(
            "postgres did not answer in time to release stuck jobs; their leases will lapse and a rescuer puts them back"
        ),
    }
    for (_, _, _, d) in &stuck {
        d.settle(Settle::Requeue);
    }
    shared
        .counters
        .handed_back
        .fetch_add(stuck.len() as u64, Ordering::Relaxed);
}

/// Requeues deliveries without touching Postgres: they were never claimed.
pub(crate) fn hand_back(shared: &Shared, deliveries: impl IntoIterator<Item = DeliveryRef>) {
    for d in deliveries {
        d.settle(Settle::Requeue);
        shared.counters.handed_back.fetch_add(1, Ordering::Relaxed);
    }
}

/// Requeues everything the consumer had already received but not yet given us.
pub(crate) fn hand_back_buffered(shared: &Shared, acks: &Acks, consumer: &mut lapin::Consumer) {
    while let Some(Some(Ok(d))) = consumer.next().now_or_never() {
        acks.track(d.delivery_tag);
        hand_back(
            shared,
            [DeliveryRef {
                tag: d.delivery_tag,
                acks: acks.clone(),
            }],
        );
    }
}

/// Sends what the outbox holds for `ids` (dead letters, rescued jobs) now, under the same row
/// locks as the relay, so each is published by one of them, not both. Returns false if the
/// broker did not confirm (the rows stay, and the relay tries again later).
pub(crate) async fn flush_outbox(shared: &Shared, ids: &[JobId]) -> bool {
    if ids.is_empty() {
        return true;
    }
    let Some(publisher) = shared.publisher().await else {
        return false;
    };
    let names = &shared.names;
    let limit = i64::try_from(ids.len()).unwrap_or(i64::MAX);
    let sent = shared
        .store
        .relay_outbox(Duration::ZERO, limit, Some(ids), |items| async move {
            let out: Vec<crate::broker::publish::Outgoing> =
                items.iter().map(|i| outgoing(names, i)).collect();
            publisher.publish(&out).await
        })
        .await;
    match sent {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, "not sent yet; the outbox relay will send it");
            false
        }
    }
}

/// The message an outbox row asks for.
pub(crate) fn outgoing(
    names: &QueueNames,
    item: &crate::store::outbox::OutboxItem,
) -> crate::broker::publish::Outgoing {
    use crate::broker::publish::Outgoing;
    use crate::store::outbox::OutboxItem;
    match item {
        OutboxItem::Job(job) => Outgoing::job(names, job),
        OutboxItem::DeadLetter { id, body, reason } => {
            Outgoing::dead(names, *id, body.clone(), reason)
        }
    }
}
