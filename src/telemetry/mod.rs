//! Logging and metrics. Logs go through tracing to stderr, human-readable by default and JSON
//! with `APIARY_LOG_FORMAT=json`; `RUST_LOG` filters (default `info`). Metrics go to a
//! Prometheus recorder that `/metrics` renders.
//!
//! Two things here keep a long-running process sound: every log line passes through
//! [`mask_url`] on its way out, so no connection string's password reaches the log whoever
//! logged it (a driver's error included); and the recorder's upkeep runs every
//! [`UPKEEP_EVERY`], so histogram samples are folded into their buckets instead of piling up
//! in memory until someone scrapes `/metrics`.

use std::io::{self, IsTerminal as _, Write};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::{LogFormat, mask_url};

#[cfg(feature = "otel")]
mod otel;

/// Installs the global subscriber. Call once, at start-up.
pub fn init(format: LogFormat) {
    init_with(format, "info");
}

/// Installs the global subscriber with `default_filter` when `RUST_LOG` is unset. Call once,
/// at start-up.
pub fn init_with(format: LogFormat, default_filter: &str) {
    init_for(format, default_filter, "apiary");
}

/// Installs the global subscriber: logs to stderr filtered by `RUST_LOG` (else
/// `default_filter`) and, with the `otel` feature and `OTEL_EXPORTER_OTLP_ENDPOINT` set,
/// spans at `info` and above exported as `service` (unless `OTEL_SERVICE_NAME` names it).
/// Call once, at start-up; call [`shutdown`] before exit.
pub fn init_for(format: LogFormat, default_filter: &str, service: &str) {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Colour only on a terminal, and never with NO_COLOR (https://no-color.org).
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(!no_color && io::stderr().is_terminal())
        .with_writer(MaskedStderr);
    let fmt = match format {
        LogFormat::Human => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_filter(filter)
            .boxed(),
    };
    let registry = tracing_subscriber::registry().with(fmt);
    #[cfg(feature = "otel")]
    let registry = registry.with(
        otel::layer(service).map(|l| l.with_filter(tracing_subscriber::filter::LevelFilter::INFO)),
    );
    #[cfg(not(feature = "otel"))]
    let _ = service;
    let _ = registry.try_init();
}

/// Sends the spans still buffered to the OTLP endpoint, if export is on. Call once, before
/// exit.
pub fn shutdown() {
    #[cfg(feature = "otel")]
    otel::shutdown();
}

/// The current span's trace context, for a message published inside it; `None` without the
/// `otel` feature or when no exported span is current.
pub fn current_trace() -> Option<crate::trace::TraceContext> {
    #[cfg(feature = "otel")]
    return otel::current();
    #[cfg(not(feature = "otel"))]
    None
}

/// Makes a message's trace context the parent of `span`; nothing without the `otel` feature.
pub fn set_trace_parent(span: &tracing::Span, parent: &crate::trace::TraceContext) {
    #[cfg(feature = "otel")]
    otel::set_parent(span, parent);
    #[cfg(not(feature = "otel"))]
    let _ = (span, parent);
}

/// Stderr, with the passwords of URLs masked. The formatter writes each event with one
/// `write_all` of the whole line, so a URL is never split across two writes.
struct MaskedStderr;

impl<'a> MakeWriter<'a> for MaskedStderr {
    type Writer = MaskedStderr;

    fn make_writer(&'a self) -> Self::Writer {
        MaskedStderr
    }
}

impl Write for MaskedStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut err = io::stderr().lock();
        // Lines without "://" or "password=" pass untouched and unallocated: the usual case.
        let masked = std::str::from_utf8(buf)
            .ok()
            .map(mask_url)
            .filter(|m| m.as_bytes() != buf);
        match masked {
            Some(m) => err.write_all(m.as_bytes())?,
            None => err.write_all(buf)?,
        }
        // All of `buf` was consumed, masked or not: report it so the caller does not retry.
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// How often the recorder's upkeep folds recorded histogram samples into their buckets. Until
/// then each sample is held in memory (about two per job); scrapes do the same work, but a
/// worker nobody scrapes must not grow.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Upkeep passes run in this process, by every upkeep loop: for tests and diagnostics.
static UPKEEP_PASSES: AtomicU64 = AtomicU64::new(0);

/// Installs the Prometheus recorder for this process and starts its upkeep (once; later
/// calls do nothing).
pub fn init_metrics() {
    if METRICS.get().is_some() {
        return;
    }
    let seconds = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0, 300.0,
    ];
    let builder = metrics_exporter_prometheus::PrometheusBuilder::new().set_buckets(&seconds);
    // `install_recorder` leaves upkeep to the caller (the builder's own upkeep task comes
    // only with its HTTP listener, which we do not use: `/metrics` is served by axum).
    match builder.and_then(|b| b.install_recorder()) {
        Ok(handle) => {
            if METRICS.set(handle.clone()).is_ok() {
                spawn_upkeep(handle, UPKEEP_EVERY);
            }
        }
        Err(e) => tracing::warn!(error = %e, "metrics disabled: could not install the recorder"),
    }
}

/// Runs `handle`'s upkeep every `every`, for the life of the process, on a thread of its own:
/// the recorder is process-wide and outlives any runtime, and the pass is short and
/// synchronous.
pub(crate) fn spawn_upkeep(handle: PrometheusHandle, every: Duration) {
    let spawned = std::thread::Builder::new()
        .name("apiary-metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                handle.run_upkeep();
                UPKEEP_PASSES.fetch_add(1, Ordering::Relaxed);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "metrics upkeep not started: histograms drain only when scraped");
    }
}

/// How many upkeep passes have run in this process.
pub fn upkeep_passes() -> u64 {
    UPKEEP_PASSES.load(Ordering::Relaxed)
}

/// The current metrics in Prometheus text format, if [`init_metrics`] ran.
pub fn render_metrics() -> Option<String> {
    METRICS.get().map(|h| h.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The upkeep loop runs by itself, with no scrape to drive it, and the samples it folds
    /// are all counted.
    #[test]
    fn upkeep_runs_without_a_scrape() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets(&[0.1, 1.0])
            .expect("buckets")
            .build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let h = metrics::histogram!("t_seconds");
            for _ in 0..1000 {
                h.record(0.5);
            }
        });
        let before = upkeep_passes();
        spawn_upkeep(handle.clone(), Duration::from_millis(10));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while upkeep_passes() < before + 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "no upkeep pass ran within 30 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let text = handle.render();
        assert!(text.contains("t_seconds_count 1000"), "{text}");
    }
}
