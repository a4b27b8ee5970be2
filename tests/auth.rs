//! API access control: every route under every kind of credential (none, malformed, wrong, and
//! each combination of scopes) answers exactly as documented; a denied call changes nothing and
//! an allowed one really runs its handler; a token without `read` never sees what a job
//! carries, whatever route answers it; health checks stay open; and `apiary api` refuses to
//! listen beyond loopback without tokens.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use apiary::Shutdown;
use apiary::api::auth::{Scope, Tokens, parse_tokens};
use apiary::api::{AppState, router};
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::TestEnv;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;
use uuid::Uuid;

const T: Duration = Duration::from_secs(20);

/// One token per combination of scopes.
const TOKENS: [(&str, &[Scope]); 7] = [
    ("enqueue-0123456789abcd", &[Scope::Enqueue]),
    ("read-0123456789abcdefg", &[Scope::Read]),
    ("admin-0123456789abcdef", &[Scope::Admin]),
    ("enq-read-0123456789abc", &[Scope::Enqueue, Scope::Read]),
    ("read-admin-0123456789a", &[Scope::Read, Scope::Admin]),
    ("enq-admin-0123456789ab", &[Scope::Enqueue, Scope::Admin]),
    (
        "everything-0123456789",
        &[Scope::Enqueue, Scope::Read, Scope::Admin],
    ),
];
const READER: &str = TOKENS[1].0;

/// What every stored job in these tests carries, so an answer that leaks any of it shows.
const SECRET: &str = "s3cret";

fn tokens() -> Tokens {
    let spec: Vec<String> = TOKENS
        .iter()
        .map(|(t, scopes)| {
            let names: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
            format!("{t}:{}", names.join("+"))
        })
        .collect();
    parse_tokens(&spec.join(",")).expect("tokens")
}

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

/// Every route that needs a scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// `POST /v1/jobs` with a new job.
    EnqueueNew,
    /// `POST /v1/jobs` with the dedup key of an existing job (someone else's, say).
    EnqueueTaken,
    List,
    Get,
    Cancel,
    Retry,
    Stats,
}

impl Route {
    const ALL: [Route; 7] = [
        Route::EnqueueNew,
        Route::EnqueueTaken,
        Route::List,
        Route::Get,
        Route::Cancel,
        Route::Retry,
        Route::Stats,
    ];

    fn scope(self) -> Scope {
        match self {
            Route::EnqueueNew | Route::EnqueueTaken => Scope::Enqueue,
            Route::List | Route::Get | Route::Stats => Scope::Read,
            Route::Cancel | Route::Retry => Scope::Admin,
        }
    }

    /// The status an allowed call answers.
    fn success(self) -> StatusCode {
        match self {
            Route::EnqueueNew | Route::Retry => StatusCode::ACCEPTED,
            _ => StatusCode::OK,
        }
    }
}

/// The state one call works on, made fresh for it.
struct Target {
    method: &'static str,
    uri: String,
    body: Option<String>,
    /// The job the call is about.
    job: Uuid,
}

/// The job every read and every `EnqueueTaken` is about: finished, with a payload, a
/// result and errors that all carry [`SECRET`].
const TAKEN_KEY: &str = "taken-key";

async fn insert_job(env: &TestEnv, id: Uuid, status: &str, dedup_key: Option<&str>) {
    let finished = matches!(status, "succeeded" | "dead");
    sqlx::query(
        "INSERT INTO apiary_jobs (id, kind, payload, result, dedup_key, max_attempts, status, attempts,
                                  error, errors, finished_at)
         VALUES ($1, 'echo', json_build_object('secret', $2::text),
                 CASE WHEN $3 = 'succeeded' THEN to_json($2::text) END, $4, 3, $3,
                 CASE WHEN $5 THEN 3 ELSE 0 END, 'failed with ' || $2,
                 jsonb_build_array(jsonb_build_object('attempt', 1, 'error', 'failed with ' || $2)),
                 CASE WHEN $5 THEN now() END)",
    )
    .bind(id)
    .bind(SECRET)
    .bind(status)
    .bind(dedup_key)
    .bind(finished)
    .execute(env.store.pool())
    .await
    .expect("insert job");
}

async fn prepare(env: &TestEnv, route: Route, taken: Uuid) -> Target {
    let target = |method, uri: String, body: Option<String>, job| Target {
        method,
        uri,
        body,
        job,
    };
    match route {
        Route::EnqueueNew => {
            let id = Uuid::now_v7();
            let body =
                format!(r#"{{"id":"{id}","kind":"echo","payload":{{"secret":"{SECRET}"}}}}"#);
            target("POST", "/v1/jobs".into(), Some(body), id)
        }
        Route::EnqueueTaken => {
            let body = format!(r#"{{"kind":"echo","payload":"mine","dedup_key":"{TAKEN_KEY}"}}"#);
            target("POST", "/v1/jobs".into(), Some(body), taken)
        }
        Route::List => target("GET", "/v1/jobs".into(), None, taken),
        Route::Get => target("GET", format!("/v1/jobs/{taken}"), None, taken),
        Route::Cancel => {
            let id = Uuid::now_v7();
            insert_job(env, id, "queued", None).await;
            target("POST", format!("/v1/jobs/{id}/cancel"), None, id)
        }
        Route::Retry => {
            let id = Uuid::now_v7();
            insert_job(env, id, "dead", None).await;
            target("POST", format!("/v1/jobs/{id}/retry"), None, id)
        }
        Route::Stats => target("GET", "/v1/stats".into(), None, taken),
    }
}

async fn status_of(env: &TestEnv, id: Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT status FROM apiary_jobs WHERE id = $1")
        .bind(id)
        .fetch_optional(env.store.pool())
        .await
        .expect("status")
}

async fn job_count(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM apiary_jobs")
        .fetch_one(env.store.pool())
        .await
        .expect("count")
}

/// The job in an answer, whichever route gave it.
fn job_in(route: Route, body: &Value, id: Uuid) -> Value {
    match route {
        Route::List => body["jobs"]
            .as_array()
            .and_then(|jobs| jobs.iter().find(|j| j["id"] == id.to_string()))
            .cloned()
            .unwrap_or_else(|| panic!("job {id} is not in the page: {body}")),
        _ => body.clone(),
    }
}

/// That `job` shows nothing written into the job, or everything.
fn assert_view(ctx: &str, job: &Value, may_read: bool) {
    if may_read {
        assert!(job.get("payload").is_some(), "{ctx}: no payload: {job}");
        assert!(job.get("redacted").is_none(), "{ctx}: {job}");
    } else {
        for field in ["payload", "result", "error", "errors", "raw_body"] {
            assert!(job.get(field).is_none(), "{ctx}: {field} shown: {job}");
        }
        assert_eq!(job["redacted"], true, "{ctx}: {job}");
        assert!(!job.to_string().contains(SECRET), "{ctx}: leaks: {job}");
    }
}

/// How a call presents itself, and what it then holds.
struct Credential {
    what: String,
    authorization: Option<String>,
    /// The scopes of a known token; `None` for anything that is not one.
    scopes: Option<&'static [Scope]>,
}

fn credentials() -> Vec<Credential> {
    let unknown = |what: &str, authorization: Option<String>| Credential {
        what: what.into(),
        authorization,
        scopes: None,
    };
    let mut all = vec![
        unknown("no header", None),
        unknown("Basic credentials", Some("Basic YWxhZGRpbjpvcGVu".into())),
        unknown("Bearer without a token", Some("Bearer ".into())),
        unknown("a token without a scheme", Some(READER.into())),
        unknown(
            "a wrong token",
            Some("Bearer wrong-0123456789abcdef".into()),
        ),
        unknown(
            "a prefix of a real token",
            Some(format!("Bearer {}", &READER[..READER.len() - 1])),
        ),
    ];
    for (token, scopes) in TOKENS {
        let names: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
        all.push(Credential {
            what: format!("a token with {}", names.join("+")),
            authorization: Some(format!("Bearer {token}")),
            scopes: Some(scopes),
        });
    }
    all
}

#[tokio::test]
async fn every_route_under_every_credential() {
    let env = TestEnv::new().await;
    let app = app(&env, tokens());
    let taken = Uuid::now_v7();
    insert_job(&env, taken, "succeeded", Some(TAKEN_KEY)).await;

    for route in Route::ALL {
        for cred in credentials() {
            let ctx = format!("{route:?} with {}", cred.what);
            let t = prepare(&env, route, taken).await;
            let jobs_before = job_count(&env).await;
            let status_before = status_of(&env, t.job).await;
            let a = call(
                &app,
                t.method,
                &t.uri,
                t.body.as_deref(),
                cred.authorization.as_deref(),
            )
            .await;
            let allowed = cred.scopes.is_some_and(|s| s.contains(&route.scope()));
            if !allowed {
                let want = if cred.scopes.is_some() {
                    StatusCode::FORBIDDEN
                } else {
                    StatusCode::UNAUTHORIZED
                };
                assert_eq!(a.status, want, "{ctx}: {}", a.body);
                let msg = a.body["error"].as_str().unwrap_or_default();
                assert!(!msg.is_empty(), "{ctx}: no error message: {}", a.body);
                assert_eq!(a.body.as_object().map(|o| o.len()), Some(1), "{ctx}");
                assert!(!a.body.to_string().contains(SECRET), "{ctx}");
                if want == StatusCode::UNAUTHORIZED {
                    assert_eq!(a.www_authenticate.as_deref(), Some("Bearer"), "{ctx}");
                } else {
                    assert!(msg.contains(route.scope().as_str()), "{ctx}: {msg}");
                    assert_eq!(a.www_authenticate, None, "{ctx}");
                }
                // Nothing changed: no job written, none cancelled or replayed.
                assert_eq!(
                    job_count(&env).await,
                    jobs_before,
                    "{ctx}: a job was written"
                );
                assert_eq!(status_of(&env, t.job).await, status_before, "{ctx}");
                continue;
            }

            assert_eq!(a.status, route.success(), "{ctx}: {}", a.body);
            let may_read = cred.scopes.is_some_and(|s| s.contains(&Scope::Read));
            // The handler ran: its effect is in the database, or its answer is the real one.
            match route {
                Route::EnqueueNew => {
                    assert_eq!(
                        status_of(&env, t.job).await.as_deref(),
                        Some("queued"),
                        "{ctx}"
                    );
                }
                Route::EnqueueTaken => {
                    assert_eq!(
                        job_count(&env).await,
                        jobs_before,
                        "{ctx}: the key was taken"
                    );
                }
                Route::Cancel => {
                    assert_eq!(
                        status_of(&env, t.job).await.as_deref(),
                        Some("cancelled"),
                        "{ctx}"
                    );
                    assert_eq!(a.body["status"], "cancelled", "{ctx}");
                }
                Route::Retry => {
                    assert_eq!(
                        status_of(&env, t.job).await.as_deref(),
                        Some("queued"),
                        "{ctx}"
                    );
                    assert_eq!(a.body["status"], "queued", "{ctx}");
                    assert_eq!(a.body["attempts"], 0, "{ctx}");
                }
                Route::Stats => {
                    assert_eq!(a.body["queue"], env.cfg.queue.as_str(), "{ctx}: {}", a.body);
                }
                Route::List | Route::Get => {}
            }
            if route != Route::Stats {
                let job = job_in(route, &a.body, t.job);
                assert_eq!(job["id"], t.job.to_string(), "{ctx}: {}", a.body);
                assert_view(&ctx, &job, may_read);
            }
        }
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

    // Health checks stay open; /metrics too (a JSON 404 here, where metrics are off).
    for (uri, want) in [
        ("/healthz", StatusCode::OK),
        ("/readyz", StatusCode::OK),
        ("/metrics", StatusCode::NOT_FOUND),
    ] {
        let a = call(&app, "GET", uri, None, None).await;
        assert_eq!(a.status, want, "{uri}: {}", a.body);
        assert_eq!(a.www_authenticate, None, "{uri}");
    }
}

#[tokio::test]
async fn without_tokens_every_route_is_open_and_nothing_is_redacted() {
    let env = TestEnv::new().await;
    let app = app(&env, Tokens::default());
    let taken = Uuid::now_v7();
    insert_job(&env, taken, "succeeded", Some(TAKEN_KEY)).await;
    for route in Route::ALL {
        let t = prepare(&env, route, taken).await;
        let a = call(&app, t.method, &t.uri, t.body.as_deref(), None).await;
        assert_eq!(a.status, route.success(), "{route:?}: {}", a.body);
        if route != Route::Stats {
            let job = job_in(route, &a.body, t.job);
            assert_view(&format!("{route:?}"), &job, true);
        }
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
