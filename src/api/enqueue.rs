//! ① `POST /v1/jobs`: the wire format's body, answered `202` with the new job or `200` with
//! the existing one when its id or `(kind, dedup_key)` was already taken. A token without
//! `read` gets the job redacted ([`super::view`]): the existing job may be another
//! producer's.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use tracing::Instrument as _;

use super::auth::Granted;
use super::extract::JsonBody;
use super::view::JobView;
use super::{ApiError, AppState};
use crate::job::NewJob;
use crate::trace::{TRACEPARENT, TRACESTATE, TraceContext};

/// Enqueues the job in the body.
#[utoipa::path(
    post, path = "/v1/jobs", tag = "jobs", operation_id = "enqueue",
    description = "Enqueues a job. Needs the `enqueue` scope; without `read` the answer is the redacted record.",
    request_body = crate::job::NewJob,
    responses(
        (status = 202, description = "Recorded and published (or left to the outbox).", body = crate::api::view::JobView),
        (status = 200, description = "The (kind, dedup_key) was taken: the existing job.", body = crate::api::view::JobView),
        (status = 400, description = "Malformed JSON.", body = crate::api::openapi::ErrorBody), (status = 409, description = "The job's `id` already belongs to another job.", body = crate::api::openapi::ErrorBody), (status = 413, description = "The body is over the size limit.", body = crate::api::openapi::ErrorBody), (status = 422, description = "A field has a wrong value; the message names it.", body = crate::api::openapi::ErrorBody),
    ),
    security(("bearer" = ["enqueue"]))
)]
pub async fn enqueue(
    State(state): State<AppState>,
    granted: Granted,
    headers: HeaderMap,
    JsonBody(job): JsonBody<NewJob>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    // The caller's trace continues here, and from here in the job's message.
    let span = tracing::info_span!("POST /v1/jobs", otel.kind = "server", kind = %job.kind);
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(parent) = text(TRACEPARENT).and_then(|p| TraceContext::parse(p, text(TRACESTATE))) {
        crate::telemetry::set_trace_parent(&span, &parent);
    }
    let enqueued = state.client.enqueue(job).instrument(span).await?;
    let status = if enqueued.created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(JobView::of(enqueued.job, granted))))
}
