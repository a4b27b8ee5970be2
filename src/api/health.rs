//! `GET /healthz` (the process answers), `GET /readyz` (its dependencies answer too),
//! `GET /v1/stats` (the operator's snapshot) and `GET /metrics` (Prometheus).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::AppState;

/// Liveness: the process serves requests.
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: Postgres answers and the publisher's channel is open (or can be opened).
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let postgres = state.client.store().ping().await.is_ok();
    let rabbitmq = state.client.publisher().ensure_connected().await.is_ok();
    let draining = state.shutdown.drain.is_cancelled();
    let ready = postgres && rabbitmq && !draining;
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(
            json!({ "ready": ready, "postgres": postgres, "rabbitmq": rabbitmq, "draining": draining }),
        ),
    )
}

/// The operator's snapshot: queue depths, workers, jobs by status in the last hour.
pub async fn stats(
    State(state): State<AppState>,
) -> Result<Json<crate::client::Stats>, super::ApiError> {
    Ok(Json(state.client.stats().await?))
}

/// Prometheus metrics of this API process.
pub async fn metrics() -> (StatusCode, String) {
    match crate::telemetry::render_metrics() {
        Some(text) => (StatusCode::OK, text),
        None => (
            StatusCode::NOT_FOUND,
            "metrics are not enabled in this process\n".into(),
        ),
    }
}
