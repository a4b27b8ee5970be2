//! The queues a worker consumes (`APIARY_QUEUES`), one lane each: its broker names, its own
//! handler slots (so a slow queue never takes the slots of a fast one), its own claimer, and
//! whether an operator has paused it. A paused lane cancels its consumer, so its messages
//! wait in RabbitMQ, untouched and uncharged, until it is resumed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, watch};

use super::claim::Incoming;
use super::shared::Shared;
use crate::broker::QueueNames;

/// How often a worker reads which of its queues are paused: the bound on how long a pause
/// takes to reach every worker.
pub(crate) const PAUSE_POLL: Duration = Duration::from_millis(500);

/// One queue this worker consumes.
pub(crate) struct Lane {
    /// Its broker names.
    pub(crate) names: Arc<QueueNames>,
    /// Jobs of this queue this worker runs at once.
    pub(crate) concurrency: usize,
    /// Unacknowledged deliveries the lane's consumer holds.
    pub(crate) prefetch: u16,
    /// The queue's rate limit (`APIARY_QUEUE_OPTIONS`): every job of the lane is claimed
    /// under it.
    pub(crate) rate: Option<crate::config::Rate>,
    /// Handler slots: `concurrency` permits.
    pub(crate) slots: Arc<Semaphore>,
    /// Deliveries to claim, to this lane's claimer.
    pub(crate) claim_tx: mpsc::UnboundedSender<Incoming>,
    /// Whether the queue is paused, as last read from Postgres.
    pub(crate) paused: watch::Sender<bool>,
    /// How many of the lane's consumers (one per shard) are registered with the broker right
    /// now. Deliveries held by a paused lane go back only once none is, so they go to no one
    /// until the resume.
    pub(crate) consuming: AtomicUsize,
    /// Shards above the queue's count that still exist, found when the session opened: the
    /// lane consumes them too, and counts them in its depths (see
    /// [`crate::broker::Publisher::leftover_shards`]).
    pub(crate) leftover: std::sync::Mutex<Vec<u16>>,
    /// The broker's depths of the lane's queues (every shard, leftover ones too), as the
    /// heartbeat last read them; `None` when that read failed.
    pub(crate) depths: std::sync::Mutex<Option<crate::broker::topology::QueueDepths>>,
}

impl Lane {
    /// A lane for `queue` of the deployment `prefix`, and the receiver its claimer reads.
    pub(crate) fn new(
        prefix: &str,
        queue: &str,
        shards: u16,
        concurrency: usize,
        prefetch: u16,
        rate: Option<crate::config::Rate>,
    ) -> (Arc<Lane>, mpsc::UnboundedReceiver<Incoming>) {
        let (claim_tx, claim_rx) = mpsc::unbounded_channel();
        let lane = Lane {
            names: QueueNames::shared_sharded(prefix, queue, shards),
            concurrency,
            prefetch,
            rate,
            slots: Arc::new(Semaphore::new(concurrency)),
            claim_tx,
            paused: watch::Sender::new(false),
            consuming: AtomicUsize::new(0),
            depths: std::sync::Mutex::new(None),
            leftover: std::sync::Mutex::new(Vec::new()),
        };
        (Arc::new(lane), claim_rx)
    }

    /// The Apiary queue's name.
    pub(crate) fn queue(&self) -> &str {
        &self.names.queue
    }

    /// Whether an operator has paused the queue.
    pub(crate) fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Whether any of its consumers is registered.
    pub(crate) fn is_consuming(&self) -> bool {
        self.consuming.load(Ordering::Relaxed) > 0
    }

    /// The shards left over from a larger count, as last found.
    pub(crate) fn leftover(&self) -> Vec<u16> {
        self.leftover.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// Reads once which lanes are paused and tells each lane whose state changed. Returns false
/// when Postgres did not answer, leaving every lane as it was. Also called before the first
/// consumer starts, so a worker started while a queue is paused never takes its messages.
pub(crate) async fn read_pauses(shared: &Shared) -> bool {
    let queues: Vec<String> = shared.lanes.iter().map(|l| l.queue().to_string()).collect();
    let read = shared.lease_store.paused_queues(&shared.cfg.queue, &queues);
    let paused = match tokio::time::timeout(Duration::from_secs(5), read).await {
        Ok(Ok(p)) => p,
        // Postgres unreachable: keep the last state (the other duties report the outage).
        _ => return false,
    };
    for lane in &shared.lanes {
        let now = paused.iter().any(|q| q == lane.queue());
        lane.paused.send_if_modified(|p| {
            if *p == now {
                return false;
            }
            *p = now;
            tracing::info!(queue = %lane.queue(), paused = now, "queue {}", if now { "paused: starting nothing from it" } else { "resumed" });
            true
        });
    }
    true
}
