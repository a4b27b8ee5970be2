//! Batches with a callback, with real worker processes: a 1,000-job batch whose workers are
//! SIGKILLed and restarted while it runs still applies every child's effect once and runs its
//! callback exactly once, and the callback reads every child's id, status and result;
//! `on_success` with a failing child records the batch failed with no callback; the HTTP
//! routes answer with counts and progress, refuse bad input naming the field, and follow the
//! token scopes; and pruning waits for the callback.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use apiary::api::auth::{Tokens, parse_tokens};
use apiary::api::{ApiOptions, AppState, router};
use apiary::client::OnComplete;
use apiary::shutdown::Shutdown;
use apiary::{JobStatus, NewJob};
use common::{TestEnv, call};
use serde_json::{Value, json};
use uuid::Uuid;

const T: Duration = Duration::from_secs(60);

fn app(env: &TestEnv, tokens: Tokens) -> axum::Router {
    router(AppState::with_options(
        env.client(),
        Shutdown::new(),
        env.cfg.max_payload_bytes,
        tokens,
        ApiOptions::default(),
    ))
}

async fn callback_rows(env: &TestEnv, batch: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM apiary_jobs WHERE dedup_key = 'batch:' || $1")
        .bind(batch.to_string())
        .fetch_one(env.store.pool())
        .await
        .expect("count callbacks")
}

#[tokio::test]
async fn a_batch_of_1000_runs_its_callback_exactly_once_through_worker_kills() {
    let env = TestEnv::new().await;
    const N: usize = 1000;
    let jobs: Vec<NewJob> = (0..N)
        .map(|i| {
            NewJob::new(
                "tally",
                json!({"counter": "children", "by": 1, "ms": (i % 7) * 10}),
            )
            .with_max_attempts(20)
        })
        .collect();
    let batch = env
        .client()
        .enqueue_batch(
            jobs,
            OnComplete::new("collect", json!({"counter": "callback"})),
            false,
        )
        .await
        .expect("batch");
    assert_eq!(batch.jobs.len(), N);

    let extra = [("APIARY_CONCURRENCY", "16"), ("NO_COLOR", "1")];
    let mut workers: Vec<_> = (0..3).map(|_| env.spawn(&["worker"], &extra)).collect();
    let began = Instant::now();
    let mut kills = 0;
    let mut round = 0usize;
    loop {
        let b = env
            .client()
            .batch(batch.id)
            .await
            .expect("batch")
            .expect("exists");
        if b.status != "running" || began.elapsed() > Duration::from_secs(120) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        if kills < 6 {
            // SIGKILL one worker and start its replacement: whatever it held comes back through
            // its lease or its unacked deliveries.
            let victim = round % workers.len();
            workers[victim].signal("KILL");
            let _ = workers[victim].wait(T).await;
            workers[victim] = env.spawn(&["worker"], &extra);
            kills += 1;
        }
        round += 1;
    }
    let done = env
        .wait_for_status(batch.callback_id, JobStatus::Succeeded, T)
        .await;
    let b = env
        .client()
        .batch(batch.id)
        .await
        .expect("batch")
        .expect("exists");
    assert_eq!(b.status, "completed", "{b:?}");
    assert_eq!(b.counts.get("succeeded"), Some(&(N as i64)), "{b:?}");
    assert_eq!(b.progress, 1.0);
    assert_eq!(b.callback_status, Some(JobStatus::Succeeded));
    // Effects once: each child once, the callback once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(env.tally("children").await, Some(N as i64));
    assert_eq!(
        env.tally("callback").await,
        Some(1),
        "the callback ran once"
    );
    assert_eq!(callback_rows(&env, batch.id).await, 1);

    // The callback saw every child: id, status and result, as recorded.
    let result = done.result.expect("result");
    assert_eq!(result["payload"]["batch_id"], json!(batch.id));
    assert_eq!(result["payload"]["counts"]["succeeded"], json!(N));
    assert_eq!(result["payload"]["payload"], json!({"counter": "callback"}));
    let seen: HashMap<Uuid, Value> = result["children"]
        .as_array()
        .expect("children")
        .iter()
        .map(|c| {
            (
                serde_json::from_value(c["id"].clone()).expect("id"),
                c.clone(),
            )
        })
        .collect();
    assert_eq!(seen.len(), N);
    for id in &batch.jobs {
        let job = env.job(*id).await.expect("child");
        let c = &seen[id];
        assert_eq!(c["status"], json!("succeeded"));
        assert_eq!(Some(&c["result"]), job.result.as_ref(), "child {id}");
    }
    eprintln!("batch: {kills} kills, completed in {:?}", began.elapsed());
    env.assert_invariants().await;
    for w in &mut workers {
        w.signal("TERM");
        let _ = w.wait(T).await;
    }
}

#[tokio::test]
async fn on_success_with_a_failing_child_fails_the_batch_without_a_callback() {
    let env = TestEnv::new().await;
    let mut worker = env.spawn(&["worker"], &[]);
    let client = env.client();
    let mut jobs: Vec<NewJob> = (0..4).map(|i| NewJob::new("echo", json!(i))).collect();
    jobs.push(NewJob::new("fail", json!({"permanent": true})));

    let strict = client
        .enqueue_batch(jobs.clone(), OnComplete::new("collect", json!({})), true)
        .await
        .expect("strict batch");
    let lenient = client
        .enqueue_batch(jobs, OnComplete::new("collect", json!({})), false)
        .await
        .expect("lenient batch");
    let done = env
        .wait_for_status(lenient.callback_id, JobStatus::Succeeded, T)
        .await;
    let counts = &done.result.expect("result")["payload"]["counts"];
    assert_eq!(counts["succeeded"], json!(4));
    assert_eq!(counts["dead"], json!(1));

    let b = env
        .wait_until("the strict batch to end", T, || async {
            let b = client.batch(strict.id).await.ok()??;
            (b.status != "running").then_some(b)
        })
        .await;
    assert_eq!(b.status, "failed");
    assert_eq!(b.callback_status, None, "no callback");
    assert_eq!(b.counts.get("dead"), Some(&1));
    assert!(env.job(strict.callback_id).await.is_none());
    env.assert_invariants().await;
    worker.signal("TERM");
    assert!(worker.wait(T).await.success(), "{}", worker.log_text());
}

#[tokio::test]
async fn the_batch_routes_answer_counts_refuse_bad_input_and_follow_scopes() {
    let env = TestEnv::new().await;
    let open = app(&env, Tokens::default());
    let body = json!({
        "jobs": [{"kind": "echo", "payload": 1}, {"kind": "echo", "payload": 2}],
        "on_complete": {"kind": "collect", "payload": {"note": "done"}},
    });
    let (status, answer) = call(&open, "POST", "/v1/batches", Some(&body.to_string())).await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["id"].as_str().expect("id").to_string();
    assert_eq!(answer["jobs"].as_array().map(Vec::len), Some(2));

    let (status, b) = call(&open, "GET", &format!("/v1/batches/{id}"), None).await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["status"], json!("running"));
    assert_eq!(b["total"], json!(2));
    assert_eq!(b["counts"], json!({"queued": 2}));
    assert_eq!(b["progress"], json!(0.0));
    assert_eq!(b["callback_status"], Value::Null);

    let mut worker = env.spawn(&["worker"], &[]);
    let callback: Uuid = serde_json::from_value(answer["callback_id"].clone()).expect("cb");
    env.wait_for_status(callback, JobStatus::Succeeded, T).await;
    let (_, b) = call(&open, "GET", &format!("/v1/batches/{id}"), None).await;
    assert_eq!(b["status"], json!("completed"));
    assert_eq!(b["counts"], json!({"succeeded": 2}));
    assert_eq!(b["progress"], json!(1.0));
    assert_eq!(b["callback_status"], json!("succeeded"));

    for (body, field) in [
        (
            json!({"jobs": [], "on_complete": {"kind": "collect"}}),
            "jobs",
        ),
        (
            json!({"jobs": [{"kind": "echo"}], "on_complete": {"kind": "Bad Kind"}}),
            "on_complete.kind",
        ),
        (
            json!({"jobs": [{"kind": "echo", "depends_on": [Uuid::now_v7()]}], "on_complete": {"kind": "collect"}}),
            "depends_on",
        ),
        (
            json!({"jobs": [{"kind": "BAD"}], "on_complete": {"kind": "collect"}}),
            "kind",
        ),
    ] {
        let (status, answer) = call(&open, "POST", "/v1/batches", Some(&body.to_string())).await;
        assert_eq!(status, 422, "{body}: {answer}");
        assert!(
            answer["error"].as_str().unwrap_or_default().contains(field),
            "{body}: {answer}"
        );
    }
    let (status, _) = call(
        &open,
        "GET",
        &format!("/v1/batches/{}", Uuid::now_v7()),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = call(&open, "GET", "/v1/batches/nope", None).await;
    assert_eq!(status, 400);
    // A batch whose job repeats an existing dedup key is refused whole: its jobs must be new.
    env.enqueue(NewJob::new("echo", json!(0)).with_dedup_key("taken"))
        .await;
    let body = json!({"jobs": [{"kind": "echo"}, {"kind": "echo", "dedup_key": "taken"}],
                      "on_complete": {"kind": "collect"}});
    let (status, answer) = call(&open, "POST", "/v1/batches", Some(&body.to_string())).await;
    assert_eq!(status, 409, "{answer}");

    // Scopes: `enqueue` creates, `read` reads, neither does the other.
    let reader = "r".repeat(32);
    let producer = "p".repeat(32);
    let tokens = parse_tokens(&format!("{reader}:read,{producer}:enqueue")).expect("tokens");
    let guarded = app(&env, tokens);
    let req = |method: &str, uri: &str, body: Option<String>, token: &str| {
        let mut r = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {token}"));
        if body.is_some() {
            r = r.header("content-type", "application/json");
        }
        r.body(axum::body::Body::from(body.unwrap_or_default()))
            .expect("request")
    };
    use tower::ServiceExt;
    let small = json!({"jobs": [{"kind": "echo"}], "on_complete": {"kind": "collect"}}).to_string();
    let r = guarded
        .clone()
        .oneshot(req("POST", "/v1/batches", Some(small.clone()), &reader))
        .await
        .expect("resp");
    assert_eq!(r.status(), 403);
    let r = guarded
        .clone()
        .oneshot(req("POST", "/v1/batches", Some(small), &producer))
        .await
        .expect("resp");
    assert_eq!(r.status(), 202);
    let r = guarded
        .clone()
        .oneshot(req("GET", &format!("/v1/batches/{id}"), None, &producer))
        .await
        .expect("resp");
    assert_eq!(r.status(), 403);
    let r = guarded
        .clone()
        .oneshot(req("GET", &format!("/v1/batches/{id}"), None, &reader))
        .await
        .expect("resp");
    assert_eq!(r.status(), 200);
    let chain = json!({"jobs": [{"kind": "echo"}]}).to_string();
    let r = guarded
        .clone()
        .oneshot(req("POST", "/v1/chains", Some(chain), &reader))
        .await
        .expect("resp");
    assert_eq!(r.status(), 403);

    worker.signal("TERM");
    assert!(worker.wait(T).await.success(), "{}", worker.log_text());
}

#[tokio::test]
async fn pruning_waits_for_the_callback_then_takes_the_batch() {
    let env = TestEnv::new().await;
    let client = env.client();
    let batch = client
        .enqueue_batch(
            vec![NewJob::new("echo", json!(1))],
            OnComplete::new("collect", json!({})),
            false,
        )
        .await
        .expect("batch");
    let child = batch.jobs[0];
    // The child finished long ago; the callback has not run yet (no worker).
    sqlx::query(
        "UPDATE apiary_jobs SET status = 'succeeded', result = '1', finished_at = now() - interval '2 days',
                created_at = now() - interval '2 days' WHERE id = $1",
    )
    .bind(child)
    .execute(env.store.pool())
    .await
    .expect("age the child");
    let cb = env.job(batch.callback_id).await.expect("callback enqueued");
    assert_eq!(cb.status(), JobStatus::Queued);
    let keep = Duration::from_secs(3600);
    env.store.prune(keep, &[], 1000, 10).await.expect("prune");
    assert!(
        env.job(child).await.is_some(),
        "kept while the callback is unfinished"
    );

    let mut worker = env.spawn(&["worker"], &[]);
    let done = env
        .wait_for_status(batch.callback_id, JobStatus::Succeeded, T)
        .await;
    assert_eq!(done.result.expect("r")["children"][0]["id"], json!(child));
    worker.signal("TERM");
    assert!(worker.wait(T).await.success(), "{}", worker.log_text());
    env.store.prune(keep, &[], 1000, 10).await.expect("prune");
    assert!(
        env.job(child).await.is_none(),
        "pruned once the callback finished"
    );
    // The batch row goes once it is past retention and its children are gone.
    sqlx::query("UPDATE apiary_batches SET finished_at = now() - interval '2 days' WHERE id = $1")
        .bind(batch.id)
        .execute(env.store.pool())
        .await
        .expect("age the batch");
    env.store.prune(keep, &[], 1000, 10).await.expect("prune");
    assert!(client.batch(batch.id).await.expect("read").is_none());
}
