//! Outage bookkeeping: one warning when a dependency goes away, one line when it is back, and
//! nothing per retry in between.

use std::sync::Mutex;
use std::time::Instant;

/// Tracks whether one dependency is down, and since when.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug)]
pub struct Outage {
    what: &'static str,
    since: Mutex<Option<Instant>>,
}

impl Outage {
    /// A tracker for `what` ("rabbitmq", "postgres").
    pub const fn new(what: &'static str) -> Self {
        Outage {
            what,
            since: Mutex::new(None),
        }
    }

    /// Records a failure; logs only if this starts an outage.
    pub fn down(&self, error: &dyn std::fmt::Display) {
        let Ok(mut since) = self.since.lock() else {
            return;
        };
        if since.is_none() {
            *since = Some(Instant::now());
            tracing::warn!(dependency = self.what, error = %error, "{} unavailable; retrying with backoff", self.what);
        }
    }

    /// Records a success; logs only if this ends an outage.
    pub fn up(&self) {
        let Ok(mut since) = self.since.lock() else {
            return;
        };
        if let Some(start) = since.take() {
            tracing::warn!(
                dependency = self.what,
                down_seconds = start.elapsed().as_secs_f64(),
                "{} available again",
                self.what
            );
        }
    }

    /// Whether the dependency is down now.
    pub fn is_down(&self) -> bool {
        self.since.lock().map(|s| s.is_some()).unwrap_or(false)
    }
}
