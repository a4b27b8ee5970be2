//! The worker pool: one process's queues, bounded concurrency per queue, and a two-phase
//! stop. This module only wires the roles together; one delivery's path reads in file order:
//!
//! 1. `session.rs`: connect, declare each queue, open a channel per lane;
//! 2. `consume.rs`: a lane's consumer receives, decodes, passes on (or buries poison, `dead.rs`);
//! 3. `claim.rs`: a lane's claimer claims in batches within the lane's slots;
//! 4. `run.rs`: the handler runs and its outcome is decided;
//! 5. `commit.rs`: outcomes commit in batches, then their messages are published, then acked;
//! 6. `relay.rs`: what a commit promised to publish, and what a dead sender left in the outbox.
//!
//! Beside that path: `lanes.rs` (the queues this worker consumes, and pauses), `rescuer.rs`
//! (leases, rescues, registry, pruning), `scheduler.rs` (firing due schedules), `drain.rs`
//! (the stop), `shared.rs` (what they share).

mod claim;
pub(crate) mod commit;
mod consume;
mod dead;
mod drain;
pub(crate) mod lanes;
mod limits;
pub(crate) mod metrics;
pub mod outage;
mod probe;
mod relay;
pub mod rescuer;
pub mod retry;
mod run;
pub mod samples;
pub mod scheduler;
mod session;
pub(crate) mod shared;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{RwLock, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::broker::BrokerError;
use crate::config::Config;
use crate::handler::Registry;
use crate::shutdown::Shutdown;
use crate::store::{Store, StoreError};
use commit::Completion;
use lanes::Lane;
use outage::Outage;
use shared::{Counters, Shared};

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

/// A worker process's pool: build one with [`Worker::new`], then [`Worker::run`] it. Any
/// worker may die at any moment without losing a job: see the crate's
/// [guarantees](crate#guarantees).
pub struct Worker {
    shared: Arc<Shared>,
    done_rx: mpsc::UnboundedReceiver<Completion>,
    claim_req_rx: mpsc::UnboundedReceiver<commit::ClaimRequest>,
    claim_rxs: Vec<mpsc::UnboundedReceiver<claim::Incoming>>,
    shutdown: Shutdown,
}

impl Worker {
    /// A worker with `registry`'s handlers, stopping when `shutdown` says so.
    pub fn new(cfg: Config, registry: Registry, shutdown: Shutdown) -> Result<Worker, WorkerError> {
        // Every worker delivers completion webhooks, whatever registry it was given: a
        // delivery lands in the queue of the job it reports on.
        let mut registry = registry;
        crate::handler::Webhook::register(&mut registry, &cfg);
        let store = Store::connect_lazy(&cfg.database_url, cfg.db_pool)?;
        let lease_store = Store::connect_lazy(&cfg.database_url, 2)?;
        let known_kinds: Vec<String> = registry
            .kinds()
            .into_iter()
            .map(str::to_string)
            .chain(cfg.kinds.0.keys().cloned())
            .collect();
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let (claim_tx, claim_req_rx) = mpsc::unbounded_channel();
        let mut lanes = Vec::new();
        let mut claim_rxs = Vec::new();
        for (queue, concurrency) in cfg.worker_queues() {
            let prefetch = if cfg.prefetch > 0 {
                cfg.prefetch
            } else {
                u16::try_from(concurrency.saturating_mul(2)).unwrap_or(u16::MAX)
            };
            let rate = cfg.queue_options.0.get(&queue).and_then(|o| o.rate);
            let shards = cfg.shards().of(&queue);
            let (lane, rx) = Lane::new(&cfg.queue, &queue, shards, concurrency, prefetch, rate);
            lanes.push(lane);
            claim_rxs.push(rx);
        }
        let limited = known_kinds
            .iter()
            .filter_map(|k| {
                let registered = registry
                    .get(k)
                    .map(|e| e.options.clone())
                    .unwrap_or_default();
                let o = cfg.kinds.get(k).or(registered);
                (o.rate.is_some() || o.max_per_key.is_some())
                    .then(|| (k.clone(), (o.rate, o.max_per_key)))
            })
            .collect();
        let shared = Arc::new(Shared {
            lanes,
            limited,
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
            samples: samples::Sampler::default(),
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
            claim_req_rx,
            claim_rxs,
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
            claim_req_rx,
            claim_rxs,
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
        // Before any consumer starts: a queue paused while no worker ran stays untouched by
        // this one. Should Postgres not answer now, the lanes start unpaused and the watch
        // corrects them within a poll; a claim needs Postgres anyway.
        lanes::read_pauses(&shared).await;
        let queues: Vec<String> = shared
            .lanes
            .iter()
            .map(|l| format!("{}:{}", l.queue(), l.concurrency))
            .collect();
        tracing::info!(
            worker = %shared.id, prefix = %cfg.queue, queues = %queues.join(","),
            kinds = ?shared.registry.kinds(), "worker starting"
        );
        if cfg.queue_type == crate::broker::topology::QueueType::Quorum {
            // Once here rather than per session: a reconnect changes nothing about it.
            tracing::info!(
                prefix = %cfg.queue,
                "APIARY_QUEUE_TYPE is quorum: RabbitMQ 3.x quorum queues have no priorities, so job priorities are ignored and jobs run in arrival order"
            );
        }

        let claimer_stop = CancellationToken::new();
        let claimers = shared
            .lanes
            .iter()
            .zip(claim_rxs)
            .map(|(lane, rx)| {
                tokio::spawn(claim::claimer(
                    shared.clone(),
                    lane.clone(),
                    rx,
                    claimer_stop.clone(),
                ))
            })
            .collect();
        let committer_stop = CancellationToken::new();
        let committer = tokio::spawn(commit::run(
            shared.clone(),
            done_rx,
            claim_req_rx,
            committer_stop.clone(),
        ));
        let background_stop = CancellationToken::new();
        let background = vec![
            tokio::spawn(rescuer::run(shared.clone(), background_stop.clone())),
            tokio::spawn(probe::serve(
                shared.clone(),
                cfg.worker_http_addr,
                background_stop.clone(),
            )),
        ];
        let tasks = drain::Tasks {
            claimers,
            claimer_stop,
            committer,
            committer_stop,
            background,
            background_stop,
        };

        let session = session::keep_consuming(&shared).await;
        Ok(drain::drain(&shared, &shutdown, tasks, session).await)
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
