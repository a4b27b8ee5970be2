//! The API's contract: the OpenAPI 3.1 document served at `GET /openapi.json`, generated from
//! the handlers' `#[utoipa::path]` attributes and the request and answer types' schemas.
//!
//! Every operation that needs a token lists its scope under `security` and, through
//! [`CommonAnswers`], the 401, 403, 500 and 503 that any guarded route may give; every error
//! body is [`ErrorBody`]. `tests/openapi.rs` fails when a route exists that this document does
//! not describe, or the other way round: it compares the paths [`super::route_paths`] reads
//! off the router with the document's, and sends every method to every path.

use axum::http::header;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{RefOr, Response, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

/// Every error's body: `{"error": "..."}`, with a message naming what is wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a person to read.
    pub error: String,
}

/// `DELETE /v1/schedules/{name}`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Deleted {
    /// The schedule that was deleted.
    pub deleted: String,
}

/// `GET /healthz`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// `GET /readyz`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ready {
    /// Whether the process takes requests: Postgres and RabbitMQ answer and it is not draining.
    pub ready: bool,
    /// Postgres answered lately.
    pub postgres: bool,
    /// The publisher's channel is open.
    pub rabbitmq: bool,
    /// The process is stopping.
    pub draining: bool,
}

/// The whole document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Apiary",
        description = "Enqueue background jobs and poll their results. Tokens go in \
                       `Authorization: Bearer <token>`; each operation names the scope it needs. \
                       Without configured tokens the API is open (on loopback only).",
        license(name = "MIT OR Apache-2.0")
    ),
    paths(
        super::enqueue::enqueue,
        super::jobs::list,
        super::jobs::get,
        super::jobs::children,
        super::jobs::cancel,
        super::jobs::retry,
        super::batches::chain,
        super::batches::create,
        super::batches::get,
        super::queues::list,
        super::queues::pause,
        super::queues::resume,
        super::schedules::list,
        super::schedules::set,
        super::schedules::get,
        super::schedules::delete,
        super::schedules::pause,
        super::schedules::resume,
        super::health::stats,
        super::health::series,
        super::dead::replay,
        super::health::metrics,
        super::health::healthz,
        super::health::readyz,
        document,
    ),
    modifiers(&CommonAnswers),
    tags(
        (name = "jobs", description = "Enqueue, read, cancel and replay jobs."),
        (name = "batches", description = "Batches of jobs with a callback."),
        (name = "queues", description = "Queues: depths, pause and resume."),
        (name = "schedules", description = "Periodic jobs."),
        (name = "operate", description = "Health, readiness, metrics and the operator's snapshot."),
    )
)]
pub struct ApiDoc;

/// Adds the bearer scheme, and to every guarded operation the answers any guard or handler may
/// give besides its own: 401, 403, 500 and 503.
pub struct CommonAnswers;

impl Modify for CommonAnswers {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token from APIARY_API_TOKENS; scopes: enqueue, read, admin.",
                    ))
                    .build(),
            ),
        );
        let error = |text: &str| -> RefOr<Response> {
            ResponseBuilder::new()
                .description(text)
                .content(
                    "application/json",
                    utoipa::openapi::ContentBuilder::new()
                        .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .into()
        };
        for item in doc.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                let guarded = op
                    .security
                    .as_ref()
                    .is_some_and(|s| !s.is_empty() && s.iter().any(|r| *r != Default::default()));
                let answers = &mut op.responses.responses;
                if guarded {
                    answers.entry("401".into()).or_insert_with(|| {
                        error("No token, a malformed header or an unknown token.")
                    });
                    answers.entry("403".into()).or_insert_with(|| {
                        error("The token lacks the scope this operation needs.")
                    });
                }
                answers
                    .entry("500".into())
                    .or_insert_with(|| error("A bug on our side; the details are in the log."));
                answers.entry("503".into()).or_insert_with(|| {
                    error("Postgres or RabbitMQ is unreachable, or the process is at a limit: retry later.")
                });
            }
        }
    }
}

/// This document.
#[utoipa::path(
    get, path = "/openapi.json", tag = "operate", operation_id = "openapi",
    description = "This OpenAPI 3.1 document. Open.",
    responses((status = 200, description = "The document.", content_type = "application/json")),
    security(())
)]
pub async fn document() -> impl IntoResponse {
    // Built once: the document is fixed for the life of the binary.
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let body = DOC.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .unwrap_or_else(|e| format!("{{\"error\":\"openapi: {e}\"}}"))
    });
    ([(header::CONTENT_TYPE, "application/json")], body.as_str())
}

/// The document as JSON, for tests and `apiary` tooling.
pub fn json() -> serde_json::Value {
    serde_json::to_value(ApiDoc::openapi()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_openapi_3_1_with_error_bodies_and_scopes() {
        let doc = json();
        assert!(
            doc["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.1"))
        );
        assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
        assert!(doc["components"]["schemas"]["Job"].is_object());
        let enqueue = &doc["paths"]["/v1/jobs"]["post"];
        assert_eq!(enqueue["security"][0]["bearer"][0], "enqueue");
        for code in [
            "202", "200", "400", "401", "403", "413", "422", "500", "503",
        ] {
            assert!(
                enqueue["responses"][code].is_object(),
                "POST /v1/jobs lacks {code}"
            );
        }
        assert!(doc["paths"]["/healthz"]["get"]["responses"]["401"].is_null());
    }
}
