//! API access control: bearer tokens and their scopes on every job route, open health checks,
//! nothing written or published for a rejected request, and `apiary api` refusing to listen
//! beyond loopback without tokens.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use apiary::Shutdown;
use apiary::api::auth::{Tokens, parse_tokens};
use apiary::api::{AppState, router};
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::TestEnv;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;
use uuid::Uuid;

const T: Duration = Duration::from_secs(20);

const ENQUEUER: &str = "enqueuer-0123456789";
const READER: &str = "reader-0123456789ab";
const ADMIN: &str = "admin-0123456789abcd";
const WRONG: &str = "wrong-0123456789abcd";

/// A response's status, its `WWW-Authenticate` header and its JSON body.
struct Answer {
    status: StatusCode,
    www_authenticate: Option<String>,
    body: Value,
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: Option<&str>,
    authorization: Option<&str>,
) -> Answer {
    let mut req = Request::builder().method(method).uri(uri);
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    if let Some(a) = authorization {
        req = req.header(header::AUTHORIZATION, a);
    }
    let req = req
        .body(Body::from(body.unwrap_or("").to_string()))
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("response");
    let status = resp.status();
    let www_authenticate = resp
        .headers()
        .get(header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        www_authenticate,
        body,
    }
}

fn app(env: &TestEnv, tokens: Tokens) -> axum::Router {
    router(AppState::new(
        env.client(),
        Shutdown::new(),
        env.cfg.max_payload_bytes,
        tokens,
    ))
}

fn tokens() -> Tokens {
    parse_tokens(&format!(
        "{ENQUEUER}:enqueue,{READER}:read,{ADMIN}:admin+read"
    ))
    .expect("tokens")
}

/// A job route, a body to send, a token lacking its scope and one holding it.
struct Route {
    method: &'static str,
    uri: String,
    body: Option<&'static str>,
    without_scope: &'static str,
    with_scope: &'static str,
}

fn routes() -> Vec<Route> {
    let id = Uuid::new_v4();
    vec![
        Route {
            method: "POST",
            uri: "/v1/jobs".into(),
            body: Some(r#"{"kind":"echo","payload":1}"#),
            without_scope: ADMIN,
            with_scope: ENQUEUER,
        },
        Route {
            method: "GET",
            uri: "/v1/jobs".into(),
            body: None,
            without_scope: ENQUEUER,
            with_scope: READER,
        },
        Route {
            method: "GET",
            uri: format!("/v1/jobs/{id}"),
            body: None,
            without_scope: ENQUEUER,
            with_scope: READER,
        },
        Route {
            method: "POST",
            uri: format!("/v1/jobs/{id}/cancel"),
            body: None,
            without_scope: READER,
            with_scope: ADMIN,
        },
    ]
}

#[tokio::test]
async fn every_job_route_needs_a_token_with_its_scope() {
    let env = TestEnv::new().await;
    let app = app(&env, tokens());
    let bearer = |t: &str| format!("Bearer {t}");

    // Every rejection first, so the database and the queue can be checked untouched.
    for r in routes() {
        let cases: [(&str, Option<String>, StatusCode); 5] = [
            ("no header", None, StatusCode::UNAUTHORIZED),
            (
                "malformed header",
                Some("Basic x".into()),
                StatusCode::UNAUTHORIZED,
            ),
            ("wrong token", Some(bearer(WRONG)), StatusCode::UNAUTHORIZED),
            (
                "a prefix of a real token",
                Some(bearer(&READER[..READER.len() - 1])),
                StatusCode::UNAUTHORIZED,
            ),
            (
                "token without the scope",
                Some(bearer(r.without_scope)),
                StatusCode::FORBIDDEN,
            ),
        ];
        for (what, authorization, want) in cases {
            let a = call(&app, r.method, &r.uri, r.body, authorization.as_deref()).await;
            let ctx = format!("{} {} with {what}", r.method, r.uri);
            assert_eq!(a.status, want, "{ctx}: {}", a.body);
            assert!(
                a.body["error"].as_str().is_some_and(|m| !m.is_empty()),
                "{ctx}: no error message: {}",
                a.body
            );
            if want == StatusCode::UNAUTHORIZED {
                assert_eq!(a.www_authenticate.as_deref(), Some("Bearer"), "{ctx}");
            } else {
                assert_eq!(a.www_authenticate, None, "{ctx}");
            }
        }
    }
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM apiary_jobs")
        .fetch_one(env.store.pool())
        .await
        .expect("count");
    assert_eq!(n, 0, "a rejected enqueue wrote a job");
    assert_eq!(
        env.queue_depth(&env.cfg.queue).await,
        0,
        "a rejected enqueue published a message"
    );

    // The right token gets through to the handler.
    for r in routes() {
        let a = call(&app, r.method, &r.uri, r.body, Some(&bearer(r.with_scope))).await;
        assert!(
            a.status.is_success() || a.status == StatusCode::NOT_FOUND,
            "{} {} with its scope: {} {}",
            r.method,
            r.uri,
            a.status,
            a.body
        );
    }
    // The scheme is case-insensitive.
    let a = call(
        &app,
        "GET",
        "/v1/jobs",
        None,
        Some(&format!("bearer {READER}")),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);

    // Health checks stay open.
    for uri in ["/healthz", "/readyz"] {
        let a = call(&app, "GET", uri, None, None).await;
        assert_eq!(a.status, StatusCode::OK, "{uri}: {}", a.body);
    }
}

#[tokio::test]
async fn without_tokens_every_route_is_open() {
    let env = TestEnv::new().await;
    let app = app(&env, Tokens::default());
    for r in routes() {
        let a = call(&app, r.method, &r.uri, r.body, None).await;
        assert!(
            a.status.is_success() || a.status == StatusCode::NOT_FOUND,
            "{} {}: {} {}",
            r.method,
            r.uri,
            a.status,
            a.body
        );
    }
}

#[tokio::test]
async fn api_refuses_a_public_address_without_tokens() {
    let env = TestEnv::new().await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_apiary"))
        .args(["api"])
        .envs(env.envs())
        .env("APIARY_HTTP_ADDR", "0.0.0.0:0")
        .env_remove("APIARY_API_TOKENS")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run apiary");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it started: {stderr}");
    assert!(stderr.contains("--insecure-listen-any"), "{stderr}");
}

#[tokio::test]
async fn api_with_tokens_listens_on_a_public_address() {
    let env = TestEnv::new().await;
    let mut api = env.spawn(
        &["api"],
        &[
            ("APIARY_HTTP_ADDR", "0.0.0.0:0"),
            ("APIARY_API_TOKENS", "abcdefghijklmnop1234:read"),
        ],
    );
    // Wait for it to say it is listening, failing at once if it exits instead.
    let deadline = Instant::now() + T;
    while !api.log_text().contains("api listening") {
        if let Some(status) = api.child.try_wait().expect("try_wait") {
            panic!("apiary api exited with {status}:\n{}", api.log_text());
        }
        assert!(
            Instant::now() < deadline,
            "apiary api did not start listening within {T:?}:\n{}",
            api.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = api.log_text();
    assert!(
        log.contains("API tokens configured: 1 tokens; bearer authentication required"),
        "{log}"
    );
    assert!(
        !log.contains("abcdefghijklmnop1234"),
        "the token is in the log:\n{log}"
    );
    assert!(api.child.try_wait().expect("try_wait").is_none());
    api.signal("TERM");
    assert!(api.wait(T).await.success(), "{}", api.log_text());
}
