//! Logging and metrics. Logs go through tracing to stderr, human-readable by default and JSON
//! with `APIARY_LOG_FORMAT=json`; `RUST_LOG` filters (default `info`). Metrics go to a
//! Prometheus recorder that `/metrics` renders.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Call once, at start-up.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
}

static METRICS: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
    std::sync::OnceLock::new();

/// Installs the Prometheus recorder for this process (once; later calls do nothing).
pub fn init_metrics() {
    if METRICS.get().is_some() {
        return;
    }
    let seconds = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0, 300.0,
    ];
    let builder = metrics_exporter_prometheus::PrometheusBuilder::new().set_buckets(&seconds);
    match builder.and_then(|b| b.install_recorder()) {
        Ok(handle) => {
            let _ = METRICS.set(handle);
        }
        Err(e) => tracing::warn!(error = %e, "metrics disabled: could not install the recorder"),
    }
}

/// The current metrics in Prometheus text format, if [`init_metrics`] ran.
pub fn render_metrics() -> Option<String> {
    METRICS.get().map(|h| h.render())
}
