//! The worker's Prometheus metrics. Handles are looked up once per kind and cached, so the
//! hot path only increments.
//!
//! Label sets are bounded: a raw AMQP message may carry any well-formed kind, and a series per
//! kind seen would grow without end (each one memory in this process and in Prometheus). Kinds
//! the worker knows (registered handlers, `APIARY_KINDS`) get their own series; every other
//! kind is counted under `kind="other"`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

use super::shared::Shared;

/// One kind's handles (or those of `other`).
pub(crate) struct KindMetrics {
    pub(crate) started: Counter,
    pub(crate) succeeded: Counter,
    pub(crate) failed: Counter,
    pub(crate) retried: Counter,
    pub(crate) dead: Counter,
    pub(crate) duration: Histogram,
    pub(crate) end_to_end: Histogram,
}

/// The label that every kind outside the known ones is counted under.
pub(crate) const OTHER_KIND: &str = "other";

/// Until [`WorkerMetrics::with_known_kinds`] is used, this many distinct kinds get their own
/// series, first come first served, and later ones fold into [`OTHER_KIND`].
pub(crate) const UNNAMED_KIND_SERIES: usize = 64;

/// The worker's metrics.
pub(crate) struct WorkerMetrics {
    kinds: Mutex<KindSeries>,
    in_flight: Gauge,
    free_slots: Gauge,
    queue_ready: Gauge,
    queue_delayed: Gauge,
    queue_dead: Gauge,
    oldest_waiting: Gauge,
    /// Jobs a rate or concurrency limit held back (each hold counts once).
    pub(crate) held: metrics::Counter,
    /// When the newest delivery was enqueued (ms since the epoch), for the age of the head
    /// of the queue.
    pub(crate) last_enqueued_ms: std::sync::atomic::AtomicI64,
}

/// The per-kind handles: one entry per known kind, plus the shared `other`.
struct KindSeries {
    by_kind: HashMap<String, Arc<KindMetrics>>,
    /// How many kinds not named up front may still get a series of their own.
    spare: usize,
    other: Arc<KindMetrics>,
}

impl WorkerMetrics {
    /// Metrics with no kinds named up front: the first [`UNNAMED_KIND_SERIES`] kinds seen get
    /// their own series, the rest count as `other`. Prefer [`WorkerMetrics::with_known_kinds`].
    #[allow(
        dead_code,
        reason = "the worker uses one of new() and with_known_kinds(), whichever it is given"
    )]
    pub(crate) fn new() -> Self {
        Self::build(std::iter::empty::<String>(), UNNAMED_KIND_SERIES)
    }

    /// Metrics with a series for each of `known` (the registry's kinds and those of
    /// `APIARY_KINDS`), created now so they read 0 before the first job; any other kind counts
    /// as `other`.
    #[allow(
        dead_code,
        reason = "the worker uses one of new() and with_known_kinds(), whichever it is given"
    )]
    pub(crate) fn with_known_kinds<I, S>(known: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::build(known, 0)
    }

    fn build<I, S>(known: I, spare: usize) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let other = Arc::new(KindMetrics::for_kind(OTHER_KIND));
        let mut by_kind = HashMap::new();
        for kind in known {
            let kind = kind.into();
            let m = if kind == OTHER_KIND {
                other.clone()
            } else {
                Arc::new(KindMetrics::for_kind(&kind))
            };
            by_kind.insert(kind, m);
        }
        WorkerMetrics {
            kinds: Mutex::new(KindSeries {
                by_kind,
                spare,
                other,
            }),
            in_flight: gauge!("apiary_worker_jobs_in_flight"),
            free_slots: gauge!("apiary_worker_free_slots"),
            held: metrics::counter!("apiary_jobs_held_total"),
            queue_ready: gauge!("apiary_queue_ready_messages"),
            queue_delayed: gauge!("apiary_queue_delayed_messages"),
            queue_dead: gauge!("apiary_queue_dead_messages"),
            oldest_waiting: gauge!("apiary_queue_oldest_waiting_seconds"),
            last_enqueued_ms: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// The handles of `kind`: its own if it is known, else those of `other`.
    pub(crate) fn kind(&self, kind: &str) -> Arc<KindMetrics> {
        let Ok(mut kinds) = self.kinds.lock() else {
            // A poisoned lock means a panic mid-insert elsewhere; counting as `other` keeps
            // the series bounded all the same.
            return Arc::new(KindMetrics::for_kind(OTHER_KIND));
        };
        // Looked up before inserting, so the hot path allocates nothing for a known kind.
        if let Some(m) = kinds.by_kind.get(kind) {
            return m.clone();
        }
        if kinds.spare == 0 {
            return kinds.other.clone();
        }
        kinds.spare -= 1;
        let m = Arc::new(KindMetrics::for_kind(kind));
        kinds.by_kind.insert(kind.to_string(), m.clone());
        m
    }

    /// Sets the gauges that are read rather than counted.
    pub(crate) fn refresh_gauges(&self, shared: &Shared) {
        let in_flight = shared.running.lock().map(|r| r.len()).unwrap_or(0);
        self.in_flight.set(in_flight as f64);
        let free: usize = shared
            .lanes
            .iter()
            .map(|l| l.slots.available_permits())
            .sum();
        self.free_slots.set(free as f64);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Renders what `f` records into a recorder of its own.
    fn rendered(f: impl FnOnce()) -> String {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, f);
        handle.render()
    }

    #[test]
    fn unknown_kinds_fold_into_other() {
        let text = rendered(|| {
            let m = WorkerMetrics::with_known_kinds(["echo", "tally"]);
            m.kind("echo").started.increment(1);
            for i in 0..500 {
                m.kind(&format!("random-{i}")).started.increment(1);
            }
            assert!(
                Arc::ptr_eq(&m.kind("x"), &m.kind("y")),
                "one handle for all others"
            );
            assert!(!Arc::ptr_eq(&m.kind("echo"), &m.kind("x")));
        });
        assert!(
            text.contains(r#"apiary_jobs_started_total{kind="echo"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"apiary_jobs_started_total{kind="other"} 500"#),
            "{text}"
        );
        // Known kinds exist from the start, at 0.
        assert!(
            text.contains(r#"apiary_jobs_started_total{kind="tally"} 0"#),
            "{text}"
        );
        assert!(!text.contains("random-"), "{text}");
    }

    #[test]
    fn a_kind_named_other_shares_the_other_series() {
        let text = rendered(|| {
            let m = WorkerMetrics::with_known_kinds(["other"]);
            assert!(Arc::ptr_eq(&m.kind("other"), &m.kind("unknown")));
            m.kind("other").started.increment(2);
        });
        assert!(
            text.contains(r#"apiary_jobs_started_total{kind="other"} 2"#),
            "{text}"
        );
    }

    #[test]
    fn without_known_kinds_the_series_are_still_bounded() {
        let text = rendered(|| {
            let m = WorkerMetrics::new();
            for i in 0..(UNNAMED_KIND_SERIES + 100) {
                m.kind(&format!("k{i}")).started.increment(1);
            }
        });
        let series = text
            .lines()
            .filter(|l| l.starts_with("apiary_jobs_started_total{"))
            .count();
        // Each kind seen first gets one; `other` takes the rest.
        assert_eq!(series, UNNAMED_KIND_SERIES + 1, "{text}");
        assert!(
            text.contains(r#"apiary_jobs_started_total{kind="other"} 100"#),
            "{text}"
        );
    }
}
