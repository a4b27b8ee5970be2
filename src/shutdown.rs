//! The only place that sees signals. The first SIGTERM or SIGINT asks for a drain; a second
//! one forces the stop. Everything long-running takes a [`Shutdown`] instead, so tests stop
//! it without signals.

use futures_util::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio_util::sync::CancellationToken;

/// Two-phase stop. `drain` fires first (stop taking work, finish what is running); `force`
/// fires on a second signal (hand everything back now). Cancelled by the signal task, or by a
/// test; watched by the worker and the API. Work handed back is not lost: see the crate's
/// [guarantees](crate#guarantees).
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Stop taking new work and finish in-flight work.
    pub drain: CancellationToken,
    /// Stop now: hand back whatever is unfinished.
    pub force: CancellationToken,
}

impl Shutdown {
    /// A shutdown nothing has asked for yet.
    pub fn new() -> Self {
        Shutdown::default()
    }

    /// A shutdown driven by SIGTERM and SIGINT: the first signal drains, the second forces.
    pub fn on_signals() -> std::io::Result<Self> {
        let shutdown = Shutdown::new();
        let mut signals = Signals::new([SIGTERM, SIGINT])?;
        let s = shutdown.clone();
        tokio::spawn(async move {
            while let Some(sig) = signals.next().await {
                if s.drain.is_cancelled() {
                    tracing::warn!(
                        signal = sig,
                        "second signal: handing back everything and stopping now"
                    );
                    s.force.cancel();
                    break;
                }
                tracing::info!(
                    signal = sig,
                    "signal received: draining (send it again to stop at once)"
                );
                s.drain.cancel();
            }
        });
        Ok(shutdown)
    }
}
