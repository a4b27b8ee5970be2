//! `GET /healthz` (the process answers), `GET /readyz` (its dependencies answer too, as
//! [`super::readiness`] last saw them), `GET /v1/stats` (the operator's snapshot) and
//! `GET /metrics` (Prometheus).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::AppState;

/// Liveness: the process serves requests.
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: Postgres answered lately, the publisher's channel is open and the API is not
/// draining. Reads state only: a probe never opens a connection to RabbitMQ.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let postgres = state.readiness.postgres(state.client.store()).await;
    let rabbitmq = state.readiness.rabbitmq(state.client.publisher()).await;
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

/// Prometheus metrics of this API process; a JSON 404 when metrics are off.
pub async fn metrics() -> Result<String, super::ApiError> {
    crate::telemetry::render_metrics()
        .ok_or_else(|| super::ApiError::NotFound("metrics are not enabled in this process".into()))
}
