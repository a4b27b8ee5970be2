//! Every HTTP error is JSON, `{"error": "..."}`, axum's own answers included (unknown path,
//! wrong method, rejected query string, path or body); and input Postgres cannot store or
//! compare is the caller's error (400 or 422), never a 503.

mod common;

use apiary::Shutdown;
use apiary::api::auth::Tokens;
use apiary::api::{ApiError, AppState, router};
use apiary::store::StoreError;
use axum::body::Body;
use axum::http::{Request, header};
use axum::response::IntoResponse;
use common::TestEnv;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;
use uuid::Uuid;

fn app(env: &TestEnv) -> axum::Router {
    router(AppState::new(
        env.client(),
        Shutdown::new(),
        env.cfg.max_payload_bytes,
        Tokens::default(),
    ))
}

/// What came back: status, `Content-Type`, `Allow`, and the body parsed as JSON (`Null` if
/// it is not JSON).
struct Answer {
    status: u16,
    content_type: Option<String>,
    allow: Option<String>,
    body: Value,
}

async fn send(app: &axum::Router, req: Request<Body>) -> Answer {
    let resp = app.clone().oneshot(req).await.expect("response");
    let header_of = |name| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let content_type = header_of(header::CONTENT_TYPE);
    let allow = header_of(header::ALLOW);
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    Answer {
        status,
        content_type,
        allow,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

fn request(method: &str, uri: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::empty())
        .expect("request")
}

/// Asserts the documented error shape: JSON, one `error` string, the expected status.
fn assert_error(a: &Answer, status: u16, what: &str) {
    assert_eq!(a.status, status, "{what}: {}", a.body);
    assert_eq!(
        a.content_type.as_deref(),
        Some("application/json"),
        "{what}: not JSON"
    );
    let obj = a.body.as_object().expect("an object");
    assert_eq!(obj.len(), 1, "{what}: {}", a.body);
    assert!(
        a.body["error"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {}",
        a.body
    );
}

#[tokio::test]
async fn axums_own_answers_are_json() {
    let env = TestEnv::new().await;
    let app = app(&env);
    let id = Uuid::now_v7();

    for uri in ["/nope", "/v1/jobs/", "/v1/jobs/x/y/z", "/v1"] {
        let a = send(&app, request("GET", uri)).await;
        assert_error(&a, 404, uri);
    }

    for (method, uri, allowed) in [
        ("DELETE", "/v1/jobs".to_string(), "POST"),
        ("PUT", format!("/v1/jobs/{id}"), "GET"),
        ("GET", format!("/v1/jobs/{id}/cancel"), "POST"),
        ("GET", format!("/v1/jobs/{id}/retry"), "POST"),
        ("POST", "/healthz".to_string(), "GET"),
        ("OPTIONS", "/readyz".to_string(), "GET"),
    ] {
        let what = format!("{method} {uri}");
        let a = send(&app, request(method, &uri)).await;
        assert_error(&a, 405, &what);
        assert!(
            a.allow.as_deref().is_some_and(|h| h.contains(allowed)),
            "{what}: Allow is {:?}",
            a.allow
        );
    }

    // Query strings axum's extractor refuses.
    for uri in [
        format!("/v1/jobs/{id}?wait=1&wait=2"),
        "/v1/jobs?limit=1&limit=2".to_string(),
        "/v1/jobs?status=queued&status=dead".to_string(),
    ] {
        let a = send(&app, request("GET", &uri)).await;
        assert_error(&a, 400, &uri);
        assert!(
            a.body["error"]
                .as_str()
                .is_some_and(|m| m.contains("duplicate field")),
            "{uri}: {}",
            a.body
        );
    }

    // A path parameter that is not UTF-8 once decoded.
    for (method, uri) in [
        ("GET", "/v1/jobs/%FF"),
        ("POST", "/v1/jobs/%FF%FE/cancel"),
        ("POST", "/v1/jobs/%C3/retry"),
    ] {
        let a = send(&app, request(method, uri)).await;
        assert_error(&a, 400, uri);
        assert!(
            a.body["error"]
                .as_str()
                .is_some_and(|m| m.starts_with("malformed path")),
            "{uri}: {}",
            a.body
        );
    }

    // Bodies: no content type, a wrong one, malformed JSON, one over the limit.
    let post = |content_type: Option<&str>, body: Vec<u8>| {
        let mut r = Request::builder().method("POST").uri("/v1/jobs");
        if let Some(ct) = content_type {
            r = r.header(header::CONTENT_TYPE, ct);
        }
        r.body(Body::from(body)).expect("request")
    };
    let job = br#"{"kind":"echo","payload":1}"#.to_vec();
    let a = send(&app, post(None, job.clone())).await;
    assert_error(&a, 400, "no content type");
    let a = send(&app, post(Some("text/plain"), job)).await;
    assert_error(&a, 400, "text/plain");
    let a = send(&app, post(Some("application/json"), b"{".to_vec())).await;
    assert_error(&a, 400, "malformed JSON");
    let a = send(
        &app,
        post(Some("application/json"), b"{\"kind\":1}".to_vec()),
    )
    .await;
    assert_error(&a, 422, "wrong field type");
    let huge = format!(
        r#"{{"kind":"echo","payload":"{}"}}"#,
        "x".repeat(env.cfg.max_payload_bytes + 128 * 1024)
    );
    let a = send(&app, post(Some("application/json"), huge.into_bytes())).await;
    assert_error(&a, 413, "over the body limit");

    // Metrics are off in this process: the 404 is JSON too.
    let a = send(&app, request("GET", "/metrics")).await;
    assert_error(&a, 404, "/metrics without metrics");

    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM apiary_jobs")
        .fetch_one(env.store.pool())
        .await
        .expect("count");
    assert_eq!(n, 0, "a refused request wrote a job");
}

#[tokio::test]
async fn filters_postgres_cannot_store_are_the_callers_error() {
    let env = TestEnv::new().await;
    let app = app(&env);
    let long = "k".repeat(257);
    for uri in [
        "/v1/jobs?kind=%00".to_string(),
        "/v1/jobs?kind=echo%00".to_string(),
        "/v1/jobs?kind=Echo".to_string(),
        format!("/v1/jobs?kind={}", "x".repeat(65)),
        "/v1/jobs?dedup_key=a%00b".to_string(),
        "/v1/jobs?dedup_key=".to_string(),
        format!("/v1/jobs?dedup_key={long}"),
        "/v1/jobs?before=not-a-uuid".to_string(),
        "/v1/jobs?before=%00".to_string(),
        "/v1/jobs?status=nope".to_string(),
        "/v1/jobs?limit=0".to_string(),
        "/v1/jobs?limit=abc".to_string(),
    ] {
        let a = send(&app, request("GET", &uri)).await;
        assert_error(&a, 400, &uri);
    }
    // Within the limits, the same filters are fine.
    let a = send(
        &app,
        request(
            "GET",
            &format!("/v1/jobs?kind=echo&dedup_key={}", "k".repeat(256)),
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
}

#[tokio::test]
async fn a_value_postgres_refuses_is_a_422_with_its_reason() {
    let env = TestEnv::new().await;
    let app = app(&env);
    // Postgres text cannot hold NUL: the insert is refused for the caller's value.
    let req = Request::builder()
        .method("POST")
        .uri("/v1/jobs")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            r#"{"kind":"echo","payload":1,"dedup_key":"a\u0000b"}"#,
        ))
        .expect("request");
    let a = send(&app, req).await;
    assert_error(&a, 422, "a dedup key with NUL");

    // The mapping itself, on an error straight from Postgres.
    let refused = sqlx::query("SELECT $1::text")
        .bind("a\0b")
        .execute(env.store.pool())
        .await
        .expect_err("postgres refuses NUL");
    let e = StoreError::Query {
        context: "test",
        source: refused,
    };
    assert!(e.is_data_error());
    let resp = ApiError::from(e).into_response();
    assert_eq!(resp.status().as_u16(), 422);
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let body: Value = serde_json::from_slice(&bytes).expect("json");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|m| m.contains("invalid byte sequence")),
        "{body}"
    );
}
