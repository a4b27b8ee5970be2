//! What a worker's tasks share: the settings, the stores, the queues it consumes, the
//! attempts it runs, its counters, and the way every task talks to Postgres
//! ([`Shared::with_store`]). Nothing here acts on a delivery by itself.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::Channel;
use tokio::sync::{RwLock, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::commit::Completion;
use super::lanes::Lane;
use super::outage::Outage;
use crate::broker::Publisher;
use crate::broker::consume::{Acks, Settle};
use crate::config::Config;
use crate::handler::Registry;
use crate::job::JobId;
use crate::store::{Store, StoreError};

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
    /// The queues this worker consumes, each with its own slots and claimer.
    pub(crate) lanes: Vec<Arc<Lane>>,
    /// The kinds with a rate limit or a concurrency limit, and those limits. Jobs of other
    /// kinds are claimed without looking at limits at all.
    pub(crate) limited: HashMap<String, (Option<crate::config::Rate>, Option<u32>)>,
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
    /// Finished attempts, to the completer. Closed when the completer stops, after the drain.
    pub(crate) done_tx: mpsc::UnboundedSender<Completion>,
    /// Claims for the committer to fold into its next commit ([`super::commit`]).
    pub(crate) claim_tx: mpsc::UnboundedSender<super::commit::ClaimRequest>,
    /// The current session's publisher; `None` while RabbitMQ is unreachable.
    pub(crate) publisher: RwLock<Option<Arc<Publisher>>>,
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
    /// What it finished since its last heartbeat, for the dashboard's charts.
    pub(crate) samples: super::samples::Sampler,
    pub(crate) rabbit: Outage,
    pub(crate) postgres: Outage,
    pub(crate) ready: AtomicBool,
    pub(crate) metrics: super::metrics::WorkerMetrics,
    /// The broker's queue depths of every lane, summed, refreshed by the rescuer; read by
    /// `/metrics`.
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
            .map(|e| e.options.clone())
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

/// Requeues deliveries without touching Postgres: they were never claimed.
pub(crate) fn hand_back(shared: &Shared, deliveries: impl IntoIterator<Item = DeliveryRef>) {
    for d in deliveries {
        d.settle(Settle::Requeue);
        shared.counters.handed_back.fetch_add(1, Ordering::Relaxed);
    }
}
