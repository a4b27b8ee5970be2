//! The job path end to end, through each way in: the library, the CLI, HTTP, and a raw AMQP
//! publish by a producer that has none of our code.

mod common;

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: Option<&str>,
) -> (StatusCode, Value) {
    let (status, value) = common::call(app, method, uri, body).await;
    (StatusCode::from_u16(status).expect("a status code"), value)
}

use std::time::Duration;

use apiary::api::auth::Tokens;
use apiary::api::{AppState, router};
use apiary::{JobStatus, NewJob, Shutdown};
use axum::http::StatusCode;
use common::TestEnv;
use serde_json::{Value, json};
use uuid::Uuid;

const T: Duration = Duration::from_secs(20);

fn app(env: &TestEnv) -> axum::Router {
    router(AppState::new(
        env.client(),
        Shutdown::new(),
        env.cfg.max_payload_bytes,
        Tokens::default(),
    ))
}

#[tokio::test]
async fn library_enqueue_runs_and_records_the_result() {
    let env = TestEnv::new().await;
    let worker = env.start_worker();
    let client = env.client();
    let enq = client
        .enqueue(NewJob::new("echo", json!({"n": 7})))
        .await
        .expect("enqueue");
    assert!(enq.created);
    assert_eq!(enq.job.status(), JobStatus::Queued);
    let job = env
        .wait_for_status(enq.job.id, JobStatus::Succeeded, T)
        .await;
    assert_eq!(job.result, Some(json!({"n": 7})));
    assert_eq!(job.attempts, 1);
    assert!(job.started_at.is_some() && job.finished_at.is_some());

    let many = client
        .enqueue_many((0..50).map(|i| NewJob::new("echo", json!(i))).collect())
        .await
        .expect("enqueue many");
    for (i, e) in many.iter().enumerate() {
        let job = env.wait_for_status(e.job.id, JobStatus::Succeeded, T).await;
        assert_eq!(job.result, Some(json!(i)));
    }
    // Every confirmed job left the outbox.
    let outbox: i64 = env
        .wait_until("outbox to empty", T, || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM apiary_outbox")
                .fetch_one(env.store.pool())
                .await
                .ok()?;
            (n == 0).then_some(n)
        })
        .await;
    assert_eq!(outbox, 0);
    worker.stop().await;
}

#[tokio::test]
async fn cli_enqueue_prints_the_id_and_the_job_runs() {
    let env = TestEnv::new().await;
    let mut worker = env.spawn(&["worker"], &[]);
    let out = env
        .run(&[
            "enqueue",
            "sleep",
            r#"{"ms": 10}"#,
            "--dedup-key",
            "cli-1",
            "--max-attempts",
            "2",
        ])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id: Uuid = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a job id on stdout");
    let job = env.wait_for_status(id, JobStatus::Succeeded, T).await;
    assert_eq!(job.result, Some(json!({"slept_ms": 10})));
    assert_eq!(job.max_attempts, 2);
    assert_eq!(job.dedup_key.as_deref(), Some("cli-1"));

    // The same key again: the same id, nothing new.
    let again = env
        .run(&["enqueue", "sleep", r#"{"ms": 10}"#, "--dedup-key", "cli-1"])
        .await;
    assert_eq!(
        String::from_utf8_lossy(&again.stdout).trim(),
        id.to_string()
    );

    // Bad input is a clear error and a failing exit.
    let bad = env.run(&["enqueue", "Bad Kind", "{}"]).await;
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("kind"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let bad = env.run(&["enqueue", "echo", "{not json"]).await;
    assert!(String::from_utf8_lossy(&bad.stderr).contains("payload is not valid JSON"));

    worker.signal("TERM");
    assert!(worker.wait(T).await.success());
}

#[tokio::test]
async fn http_enqueue_then_long_poll_returns_the_result() {
    let env = TestEnv::new().await;
    let worker = env.start_worker();
    let app = app(&env);
    let (status, job) = call(
        &app,
        "POST",
        "/v1/jobs",
        Some(r#"{"kind":"sleep","payload":{"ms":300},"dedup_key":"h1"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    assert_eq!(job["status"], "queued");
    let id = job["id"].as_str().expect("id").to_string();

    // The long poll answers with the finished job: had it not been woken, it would have
    // answered at the end of its wait with the job still running.
    let (status, done) = call(&app, "GET", &format!("/v1/jobs/{id}?wait=30"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"], json!({"slept_ms": 300}));
    for field in [
        "id",
        "kind",
        "status",
        "dedup_key",
        "attempts",
        "result",
        "error",
        "created_at",
        "started_at",
        "finished_at",
    ] {
        assert!(done.get(field).is_some(), "missing {field}");
    }

    // Same key: 200 and the same job.
    let (status, same) = call(
        &app,
        "POST",
        "/v1/jobs",
        Some(r#"{"kind":"sleep","payload":{"ms":1},"dedup_key":"h1"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(same["id"], id.as_str());
    assert_eq!(same["status"], "succeeded");

    // A wait shorter than the job answers with the job as it stands.
    let (_, slow) = call(
        &app,
        "POST",
        "/v1/jobs",
        Some(r#"{"kind":"sleep","payload":{"ms":3000}}"#),
    )
    .await;
    let slow_id = slow["id"].as_str().expect("id");
    let (status, pending) = call(&app, "GET", &format!("/v1/jobs/{slow_id}?wait=0.3"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        ["queued", "running"].contains(&pending["status"].as_str().unwrap_or("")),
        "{pending}"
    );
    worker.stop().await;
}

#[tokio::test]
async fn listing_filters_and_pages_newest_first() {
    let env = TestEnv::new().await;
    let client = env.client();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            client
                .enqueue(NewJob::new("echo", json!(i)).with_dedup_key(format!("k{i}")))
                .await
                .expect("enqueue")
                .job
                .id,
        );
    }
    client
        .enqueue(NewJob::new("sleep", json!({"ms": 1})))
        .await
        .expect("enqueue");
    let app = app(&env);
    let (s, page) = call(&app, "GET", "/v1/jobs?kind=echo&limit=3", None).await;
    assert_eq!(s, StatusCode::OK);
    let got: Vec<&str> = page["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| j["id"].as_str().unwrap_or(""))
        .collect();
    let want: Vec<String> = ids.iter().rev().take(3).map(ToString::to_string).collect();
    assert_eq!(got, want);
    let next = page["next"].as_str().expect("cursor");
    let (_, page2) = call(
        &app,
        "GET",
        &format!("/v1/jobs?kind=echo&limit=3&before={next}"),
        None,
    )
    .await;
    let got2: Vec<&str> = page2["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| j["id"].as_str().unwrap_or(""))
        .collect();
    let want2: Vec<String> = ids.iter().rev().skip(3).map(ToString::to_string).collect();
    assert_eq!(got2, want2);
    assert!(page2["next"].is_null());
    let (_, by_key) = call(&app, "GET", "/v1/jobs?dedup_key=k2", None).await;
    assert_eq!(by_key["jobs"][0]["id"], ids[2].to_string());
    let (_, queued) = call(&app, "GET", "/v1/jobs?status=queued&kind=sleep", None).await;
    assert_eq!(queued["jobs"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn raw_amqp_publish_is_recorded_and_fetchable_by_id() {
    let env = TestEnv::new().await;
    let worker = env.start_worker();
    let with_id = Uuid::new_v4();
    let by_prop = Uuid::new_v4();
    let dedup_only = "raw-key";
    env.publish_raw(&[
        (
            None,
            format!(r#"{{"id":"{with_id}","kind":"echo","payload":{{"raw":1}}}}"#).into_bytes(),
        ),
        (
            Some(by_prop.to_string()),
            br#"{"kind":"echo","payload":"from message_id"}"#.to_vec(),
        ),
        (
            None,
            format!(
                r#"{{"kind":"tally","payload":{{"counter":"raw"}},"dedup_key":"{dedup_only}"}}"#
            )
            .into_bytes(),
        ),
    ])
    .await;
    let a = env.wait_for_status(with_id, JobStatus::Succeeded, T).await;
    assert_eq!(a.result, Some(json!({"raw": 1})));
    let b = env.wait_for_status(by_prop, JobStatus::Succeeded, T).await;
    assert_eq!(b.result, Some(json!("from message_id")));
    // No id anywhere: the worker derived one from the body (the same for every delivery of
    // the message), and the job is found by its key.
    let c = env
        .wait_until("the keyed raw job", T, || async {
            env.store
                .get_job_by_dedup_key("tally", dedup_only)
                .await
                .ok()
                .flatten()
                .filter(|j| j.status() == JobStatus::Succeeded)
        })
        .await;
    assert_eq!(c.id.get_version_num(), 5);
    assert_eq!(env.tally("raw").await, Some(1));
    worker.stop().await;
}

#[tokio::test]
async fn api_rejects_bad_input_with_the_field_named_and_writes_nothing() {
    let env = TestEnv::new().await;
    let app = app(&env);
    let cases: &[(&str, &str, StatusCode, &str)] = &[
        (
            "POST",
            "{not json",
            StatusCode::BAD_REQUEST,
            "malformed JSON",
        ),
        (
            "POST",
            r#"{"payload":1}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "kind",
        ),
        (
            "POST",
            r#"{"kind":5}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "kind",
        ),
        (
            "POST",
            r#"{"kind":""}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "kind",
        ),
        (
            "POST",
            r#"{"kind":"Has Space"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "kind",
        ),
        (
            "POST",
            r#"{"kind":"echo","max_attempts":-1}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "max_attempts",
        ),
        (
            "POST",
            r#"{"kind":"echo","max_attempts":"3"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "max_attempts",
        ),
        (
            "POST",
            r#"{"kind":"echo","dedup_key":""}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "dedup_key",
        ),
    ];
    for (method, body, want, field) in cases {
        let (status, err) = call(&app, method, "/v1/jobs", Some(body)).await;
        assert_eq!(status, *want, "{body}: {err}");
        let msg = err["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains(field),
            "{body}: error {msg:?} should name {field}"
        );
    }
    let long_key = format!(r#"{{"kind":"echo","dedup_key":"{}"}}"#, "k".repeat(257));
    let (status, err) = call(&app, "POST", "/v1/jobs", Some(&long_key)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        err["error"]
            .as_str()
            .unwrap_or_default()
            .contains("dedup_key")
    );

    let (status, err) = call(&app, "GET", &format!("/v1/jobs/{}", Uuid::new_v4()), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
    let (status, err) = call(&app, "GET", "/v1/jobs/not-a-uuid", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        err["error"]
            .as_str()
            .unwrap_or_default()
            .contains("malformed job id")
    );
    for q in ["wait=-1", "wait=abc", "wait=100000"] {
        let (status, err) = call(
            &app,
            "GET",
            &format!("/v1/jobs/{}?{q}", Uuid::new_v4()),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{q}: {err}");
        assert!(err["error"].as_str().unwrap_or_default().contains("wait"));
    }
    for q in ["status=nope", "limit=0", "limit=x", "before=zzz"] {
        let (status, _) = call(&app, "GET", &format!("/v1/jobs?{q}"), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{q}");
    }
    // Nothing was written, and nothing was published.
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM apiary_jobs")
        .fetch_one(env.store.pool())
        .await
        .expect("count");
    assert_eq!(n, 0);
    assert_eq!(env.queue_depth(&env.cfg.queue).await, 0);

    let (status, health) = call(&app, "GET", "/healthz", None).await;
    assert_eq!(
        (status, health["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let (status, ready) = call(&app, "GET", "/readyz", None).await;
    assert_eq!(status, StatusCode::OK, "{ready}");
}

#[tokio::test]
async fn an_unknown_kind_is_recorded_as_an_error_and_the_worker_goes_on() {
    let env = TestEnv::new().await;
    let worker = env.start_worker();
    let client = env.client();
    let unknown = client
        .enqueue(NewJob::new("no.such.kind", json!(1)))
        .await
        .expect("enqueue")
        .job
        .id;
    let fine = client
        .enqueue(NewJob::new("echo", json!(2)))
        .await
        .expect("enqueue")
        .job
        .id;
    let job = env.wait_for_status(unknown, JobStatus::Dead, T).await;
    assert!(
        job.error
            .as_deref()
            .unwrap_or_default()
            .contains("no handler is registered for kind \"no.such.kind\"")
    );
    env.wait_for_status(fine, JobStatus::Succeeded, T).await;
    worker.stop().await;
}
