//! The retry schedule: exponential backoff with full jitter. Pure, so it is unit-tested here
//! and the worker only asks it for the next delay.

use std::time::Duration;

use rand::Rng;

/// The longest wait before a retry, whatever a handler asks for with
/// [`crate::HandlerError::retry_after`]: one year, the bound on every delay.
pub const MAX_RETRY_DELAY: Duration = Duration::from_millis(crate::job::MAX_DELAY_MS);

/// The ceiling of the wait before attempt `attempt + 1`, after `attempt` failed:
/// `min(cap, base * 2^(attempt-1))`.
pub fn ceiling(attempt: i32, base: Duration, cap: Duration) -> Duration {
    let exp = u32::try_from(attempt.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
    base.checked_mul(1u32 << exp).map_or(cap, |d| d.min(cap))
}

/// The wait before the next attempt: uniform in `[0, ceiling]` (full jitter), so retries of
/// many jobs that failed together spread out instead of failing together again.
pub fn backoff(attempt: i32, base: Duration, cap: Duration, rng: &mut impl Rng) -> Duration {
    let top = ceiling(attempt, base, cap);
    let ms = u64::try_from(top.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rng.random_range(0..=ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn ceiling_doubles_then_caps() {
        let cap = Duration::from_secs(600);
        assert_eq!(ceiling(1, S, cap), S);
        assert_eq!(ceiling(2, S, cap), 2 * S);
        assert_eq!(ceiling(4, S, cap), 8 * S);
        assert_eq!(ceiling(11, S, cap), cap);
        assert_eq!(ceiling(1000, S, cap), cap);
        assert_eq!(ceiling(0, S, cap), S);
    }

    #[test]
    fn a_handlers_delay_is_bounded_and_representable() {
        // What `retry_after` may ask for is cut to a year, which chrono can always add to now.
        let asked = Duration::from_secs(u64::MAX / 2);
        let wait = asked.min(MAX_RETRY_DELAY);
        assert_eq!(wait, MAX_RETRY_DELAY);
        assert!(chrono::Duration::from_std(wait).is_ok());
    }

    #[test]
    fn jitter_stays_within_bounds_and_spreads() {
        let mut rng = rand::rng();
        let cap = Duration::from_secs(600);
        let draws: Vec<Duration> = (0..1000).map(|_| backoff(3, S, cap, &mut rng)).collect();
        assert!(draws.iter().all(|d| *d <= 4 * S));
        let low = draws.iter().filter(|d| **d < 2 * S).count();
        assert!(
            (300..700).contains(&low),
            "full jitter is uniform; {low} of 1000 below half"
        );
    }
}
