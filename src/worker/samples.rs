//! What a worker finished since its last heartbeat, for the dashboard's charts: counts of jobs
//! succeeded, dead and retried, and a histogram of enqueue-to-finish times in log buckets.
//! Finishing a job only adds to atomics; the heartbeat takes the totals and writes them as one
//! row (`apiary_worker_samples`, migration 0016), so the charts never scan the jobs table.

use std::sync::atomic::{AtomicU32, Ordering};

/// Buckets per factor e of time: bucket `b` holds times in `(exp(b/8), exp((b+1)/8)]` ms, so
/// a percentile read from them is within 13 % of the true value.
pub const BUCKETS_PER_E: f64 = 8.0;

/// Enough buckets for 1 ms (bucket 0 holds everything up to it) to about 2.7 days.
const BUCKETS: usize = 160;

/// The bucket of a time in milliseconds.
pub fn bucket_of(ms: f64) -> usize {
    if ms <= 1.0 {
        return 0;
    }
    ((ms.ln() * BUCKETS_PER_E).ceil() as usize).clamp(1, BUCKETS - 1) - 1
}

/// The upper bound of bucket `b`, in milliseconds.
pub fn bucket_upper_ms(b: usize) -> f64 {
    ((b as f64 + 1.0) / BUCKETS_PER_E).exp()
}

/// The counts since the last [`Sampler::take`].
pub(crate) struct Sampler {
    succeeded: AtomicU32,
    dead: AtomicU32,
    retried: AtomicU32,
    latency: [AtomicU32; BUCKETS],
}

/// One heartbeat's worth of what a worker finished.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Jobs that succeeded.
    pub succeeded: u32,
    /// Jobs that ended dead.
    pub dead: u32,
    /// Attempts that failed and will be retried.
    pub retried: u32,
    /// `(bucket, count)` of the enqueue-to-finish times of succeeded jobs, non-empty buckets only.
    pub latency: Vec<(usize, u32)>,
}

impl Sample {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.succeeded == 0 && self.dead == 0 && self.retried == 0
    }
}

impl Default for Sampler {
    fn default() -> Self {
        Sampler {
            succeeded: AtomicU32::new(0),
            dead: AtomicU32::new(0),
            retried: AtomicU32::new(0),
            latency: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }
}

impl Sampler {
    /// A job succeeded `ms` after it was due.
    pub(crate) fn succeeded(&self, ms: Option<i64>) {
        self.succeeded.fetch_add(1, Ordering::Relaxed);
        if let Some(ms) = ms {
            self.latency[bucket_of(ms.max(0) as f64)].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A job ended dead.
    pub(crate) fn dead(&self) {
        self.dead.fetch_add(1, Ordering::Relaxed);
    }

    /// An attempt failed and will be retried.
    pub(crate) fn retried(&self) {
        self.retried.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts so far, and zero again. A finish racing with this lands in this sample or
    /// the next, never in both and never in neither.
    pub(crate) fn take(&self) -> Sample {
        Sample {
            succeeded: self.succeeded.swap(0, Ordering::Relaxed),
            dead: self.dead.swap(0, Ordering::Relaxed),
            retried: self.retried.swap(0, Ordering::Relaxed),
            latency: self
                .latency
                .iter()
                .enumerate()
                .filter_map(|(b, n)| match n.swap(0, Ordering::Relaxed) {
                    0 => None,
                    n => Some((b, n)),
                })
                .collect(),
        }
    }

    /// Puts a sample that could not be written back, to go with the next one.
    pub(crate) fn put_back(&self, s: &Sample) {
        self.succeeded.fetch_add(s.succeeded, Ordering::Relaxed);
        self.dead.fetch_add(s.dead, Ordering::Relaxed);
        self.retried.fetch_add(s.retried, Ordering::Relaxed);
        for &(b, n) in &s.latency {
            self.latency[b].fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// The value below which a fraction `q` of the histogram's times fall: the upper bound of the
/// bucket that holds the `q`-th time. `None` for an empty histogram.
pub fn percentile(histogram: &[(usize, i64)], q: f64) -> Option<f64> {
    let total: i64 = histogram.iter().map(|(_, n)| n).sum();
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as i64).max(1);
    let mut sorted = histogram.to_vec();
    sorted.sort_unstable();
    let mut seen = 0;
    for (b, n) in sorted {
        seen += n;
        if seen >= rank {
            return Some(bucket_upper_ms(b));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_their_times_within_13_percent() {
        for ms in [1.5_f64, 2.0, 10.0, 47.0, 1_000.0, 86_400_000.0] {
            let b = bucket_of(ms);
            let upper = bucket_upper_ms(b);
            assert!(
                upper >= ms && upper <= ms * 1.14,
                "{ms} ms -> bucket {b} up to {upper}"
            );
        }
        assert_eq!(bucket_of(0.0), 0);
        assert_eq!(bucket_of(1.0), 0);
        assert_eq!(bucket_of(1e12), BUCKETS - 2);
    }

    #[test]
    fn a_sample_is_taken_once_and_put_back_whole() {
        let s = Sampler::default();
        s.succeeded(Some(10));
        s.succeeded(Some(10));
        s.succeeded(None);
        s.dead();
        s.retried();
        let taken = s.take();
        assert_eq!((taken.succeeded, taken.dead, taken.retried), (3, 1, 1));
        assert_eq!(taken.latency, vec![(bucket_of(10.0), 2)]);
        assert!(s.take().is_empty());
        s.put_back(&taken);
        assert_eq!(s.take(), taken);
    }

    #[test]
    fn percentiles_come_from_the_buckets() {
        let h: Vec<(usize, i64)> = vec![(bucket_of(5.0), 98), (bucket_of(100.0), 2)];
        let p50 = percentile(&h, 0.5).expect("p50");
        let p99 = percentile(&h, 0.99).expect("p99");
        assert!((5.0..5.7).contains(&p50), "{p50}");
        assert!((100.0..114.0).contains(&p99), "{p99}");
        assert_eq!(percentile(&[], 0.5), None);
    }
}
