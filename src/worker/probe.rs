//! The worker's own small HTTP listener (`APIARY_WORKER_HTTP_ADDR`): `/healthz` for liveness,
//! `/readyz` for readiness (false while connecting, draining, or a dependency is down), and
//! `/metrics` for Prometheus.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use super::Readiness;
use super::shared::Shared;

/// Serves the probes until `stop` fires. A bind failure is logged, not fatal: the worker's
/// job is the queue, and a port clash must not stop it.
pub(crate) async fn serve(shared: Arc<Shared>, addr: SocketAddr, stop: CancellationToken) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Readiness(shared));
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot serve /metrics, /healthz and /readyz");
            return;
        }
    };
    if let Ok(bound) = listener.local_addr() {
        tracing::info!(addr = %bound, "worker probes listening");
    }
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await;
}

async fn readyz(State(r): State<Readiness>) -> (StatusCode, &'static str) {
    if r.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(r): State<Readiness>) -> (StatusCode, String) {
    r.0.metrics.refresh_gauges(&r.0);
    match crate::telemetry::render_metrics() {
        Some(text) => (StatusCode::OK, text),
        None => (
            StatusCode::NOT_FOUND,
            "metrics are not enabled in this process\n".into(),
        ),
    }
}
