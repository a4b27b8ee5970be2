//! The worker's Prometheus metrics. Handles are looked up once per kind and cached, so the
//! hot path only increments.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

use super::Shared;

/// One kind's handles.
pub(crate) struct KindMetrics {
    pub(crate) started: Counter,
    pub(crate) succeeded: Counter,
    pub(crate) failed: Counter,
    pub(crate) retried: Counter,
    pub(crate) dead: Counter,
    pub(crate) duration: Histogram,
    pub(crate) end_to_end: Histogram,
}

/// The worker's metrics.
pub(crate) struct WorkerMetrics {
    kinds: Mutex<HashMap<String, std::sync::Arc<KindMetrics>>>,
    in_flight: Gauge,
    free_slots: Gauge,
    queue_ready: Gauge,
    queue_delayed: Gauge,
    queue_dead: Gauge,
    oldest_waiting: Gauge,
    /// When the newest delivery was enqueued (ms since the epoch), for the age of the head
    /// of the queue.
    pub(crate) last_enqueued_ms: std::sync::atomic::AtomicI64,
}

impl WorkerMetrics {
    pub(crate) fn new() -> Self {
        WorkerMetrics {
            kinds: Mutex::new(HashMap::new()),
            in_flight: gauge!("apiary_worker_jobs_in_flight"),
            free_slots: gauge!("apiary_worker_free_slots"),
            queue_ready: gauge!("apiary_queue_ready_messages"),
            queue_delayed: gauge!("apiary_queue_delayed_messages"),
            queue_dead: gauge!("apiary_queue_dead_messages"),
            oldest_waiting: gauge!("apiary_queue_oldest_waiting_seconds"),
            last_enqueued_ms: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// The handles of `kind`.
    pub(crate) fn kind(&self, kind: &str) -> std::sync::Arc<KindMetrics> {
        let Ok(mut kinds) = self.kinds.lock() else {
            return std::sync::Arc::new(KindMetrics::for_kind(kind));
        };
        // Looked up before inserting, so the hot path allocates nothing for a known kind.
        if let Some(m) = kinds.get(kind) {
            return m.clone();
        }
        let m = std::sync::Arc::new(KindMetrics::for_kind(kind));
        kinds.insert(kind.to_string(), m.clone());
        m
    }

    /// Sets the gauges that are read rather than counted.
    pub(crate) fn refresh_gauges(&self, shared: &Shared) {
        let in_flight = shared.running.lock().map(|r| r.len()).unwrap_or(0);
        self.in_flight.set(in_flight as f64);
        self.free_slots.set(shared.slots.available_permits() as f64);
        if let Ok(d) = shared.depths.lock() {
            self.queue_ready.set(f64::from(d.ready));
            self.queue_delayed.set(f64::from(d.delayed));
            self.queue_dead.set(f64::from(d.dead));
            // With messages waiting, the one at the head was enqueued no later than the newest
            // one this worker took: its age is at least that message's age.
            let last = self.last_enqueued_ms.load(Ordering::Relaxed);
            let age = if d.ready > 0 && last > 0 {
                ((chrono::Utc::now().timestamp_millis() - last).max(0) as f64) / 1000.0
            } else {
                0.0
            };
            self.oldest_waiting.set(age);
        }
    }
}

impl KindMetrics {
    fn for_kind(kind: &str) -> Self {
        let k = kind.to_string();
        KindMetrics {
            started: counter!("apiary_jobs_started_total", "kind" => k.clone()),
            succeeded: counter!("apiary_jobs_succeeded_total", "kind" => k.clone()),
            failed: counter!("apiary_jobs_failed_total", "kind" => k.clone()),
            retried: counter!("apiary_jobs_retried_total", "kind" => k.clone()),
            dead: counter!("apiary_jobs_dead_total", "kind" => k.clone()),
            duration: histogram!("apiary_handler_duration_seconds", "kind" => k.clone()),
            end_to_end: histogram!("apiary_job_enqueue_to_finish_seconds", "kind" => k),
        }
    }

    /// Records an attempt's handler time.
    pub(crate) fn ran(&self, took: Duration) {
        self.duration.record(took.as_secs_f64());
    }
}
