//! `GET /healthz` (the process answers), `GET /readyz` (its dependencies answer too, as
//! [`super::readiness`] last saw them), `GET /v1/stats` (the operator's snapshot) and
//! `GET /metrics` (Prometheus).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::AppState;

/// Liveness: the process serves requests.
#[utoipa::path(
    get, path = "/healthz", tag = "operate", operation_id = "healthz",
    description = "Liveness: the process serves requests. Open.",
    responses((status = 200, description = "Alive.", body = crate::api::openapi::Health)),
    security(())
)]
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: Postgres answered lately, the publisher's channel is open and the API is not
/// draining. Reads state only: a probe never opens a connection to RabbitMQ.
#[utoipa::path(
    get, path = "/readyz", tag = "operate", operation_id = "readyz",
    description = "Readiness: Postgres answered lately, the publisher's channel is open and the API is not draining. Open.",
    responses(
        (status = 200, description = "Ready.", body = crate::api::openapi::Ready),
        (status = 503, description = "Not ready; the fields say why.", body = crate::api::openapi::Ready),
    ),
    security(())
)]
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
#[utoipa::path(
    get, path = "/v1/stats", tag = "operate", operation_id = "stats",
    description = "The operator's snapshot: queue depths, workers, jobs by status in the last hour. Needs `read`.",
    responses((status = 200, description = "The snapshot.", body = crate::client::Stats)),
    security(("bearer" = ["read"]))
)]
pub async fn stats(
    State(state): State<AppState>,
) -> Result<Json<crate::client::Stats>, super::ApiError> {
    Ok(Json(state.client.stats().await?))
}

/// `GET /v1/stats/series`' filters.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SeriesParams {
    /// How far back, in minutes: 1 to 1440, default 60. The window is cut in 120 slots
    /// (a slot is at least a second).
    pub minutes: Option<String>,
}

/// The slots of a window of `minutes`: 120 of them, each at least a second long.
fn slots_of(minutes: i64) -> (i64, i64) {
    let seconds = minutes * 60;
    let slots = 120.min(seconds);
    (seconds / slots, slots)
}

/// Throughput and latency over time, for the dashboard's charts.
#[utoipa::path(
    get, path = "/v1/stats/series", tag = "operate", operation_id = "stats_series",
    description = "Jobs finished per second (succeeded, dead), retries per second and enqueue-to-finish latency (p50, p99, within 13 %) in equal slots up to now, from the workers' samples. Needs `read`.",
    params(crate::api::health::SeriesParams),
    responses(
        (status = 200, description = "The series, oldest slot first.", body = crate::store::series::Series),
        (status = 400, description = "`minutes` out of range.", body = crate::api::openapi::ErrorBody),
    ),
    security(("bearer" = ["read"]))
)]
pub async fn series(
    State(state): State<AppState>,
    super::extract::QueryParams(p): super::extract::QueryParams<SeriesParams>,
) -> Result<Json<crate::store::series::Series>, super::ApiError> {
    let minutes = super::extract::int_param("minutes", p.minutes.as_deref(), 60, 1..=1440)?;
    let (step, slots) = slots_of(minutes);
    let prefix = state.client.publisher().prefix().to_string();
    Ok(Json(
        state.client.store().series(&prefix, step, slots).await?,
    ))
}

/// Prometheus metrics of this API process; a JSON 404 when metrics are off.
#[utoipa::path(
    get, path = "/metrics", tag = "operate", operation_id = "metrics",
    description = "Prometheus metrics of this API process. Open.",
    responses((status = 200, description = "Prometheus text format.", body = String, content_type = "text/plain"), (status = 404, description = "Metrics are off in this process.", body = crate::api::openapi::ErrorBody)),
    security(())
)]
pub async fn metrics() -> Result<String, super::ApiError> {
    crate::telemetry::render_metrics()
        .ok_or_else(|| super::ApiError::NotFound("metrics are not enabled in this process".into()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_window_is_cut_in_whole_slots() {
        assert_eq!(super::slots_of(60), (30, 120));
        assert_eq!(super::slots_of(1), (1, 60));
        assert_eq!(super::slots_of(1440), (720, 120));
    }
}
