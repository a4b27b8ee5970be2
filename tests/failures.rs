//! What happens when things go wrong: retries with backoff, dead letters and their replay,
//! panics, timeouts, and messages that are not jobs at all.

mod common;

async fn post(app: &axum::Router, uri: &str) -> (u16, serde_json::Value) {
    common::call(app, "POST", uri, None).await
}

use std::time::Duration;

use apiary::handler::Echo;
use apiary::{JobStatus, NewJob, Registry};
use chrono::{DateTime, Utc};
use common::TestEnv;
use serde_json::{Value, json};
use uuid::Uuid;

const T: Duration = Duration::from_secs(30);

fn ts(v: &Value) -> DateTime<Utc> {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a timestamp: {v}"))
}

#[tokio::test]
async fn retries_follow_the_backoff_schedule_and_keep_every_error() {
    let env = TestEnv::new().await;
    let mut cfg = env.cfg.clone();
    cfg.retry_base = Duration::from_millis(400);
    cfg.retry_cap = Duration::from_millis(1200);
    let worker = env.start_worker_with(cfg.clone(), Registry::builtins());
    let id = env.enqueue(NewJob::new("fail", json!({"times": 3}))).await;

    // While it waits between attempts, the record says so, with the last attempt's error. Full
    // jitter may make a wait too short to see, so the one seen may follow any of the three.
    let retrying = env.wait_for_status(id, JobStatus::Retrying, T).await;
    assert!(retrying.next_attempt_at.is_some());
    let error = retrying.error.as_deref().unwrap_or_default();
    assert!(
        (1..=3).any(|n| error == format!("failing attempt {n} of the first 3, as asked")),
        "{error}"
    );

    let job = env.wait_for_status(id, JobStatus::Succeeded, T).await;
    assert_eq!(job.attempts, 4);
    assert_eq!(job.result, Some(json!({"attempts": 4})));
    let errors = job.errors.as_array().expect("errors");
    assert_eq!(errors.len(), 3, "{errors:?}");
    let mut starts = Vec::new();
    for (i, e) in errors.iter().enumerate() {
        let attempt = i as i32 + 1;
        assert_eq!(e["attempt"], json!(attempt));
        let failed_at = ts(&e["at"]);
        let retry_at = ts(&e["retry_at"]);
        // Full jitter: anywhere from now to min(cap, base * 2^(attempt-1)).
        let ceiling = apiary::worker::retry::ceiling(attempt, cfg.retry_base, cfg.retry_cap);
        let wait = (retry_at - failed_at).to_std().unwrap_or_default();
        assert!(
            wait <= ceiling + Duration::from_millis(20),
            "attempt {attempt}: waited {wait:?} > {ceiling:?}"
        );
        starts.push(retry_at);
    }
    // The next attempt never ran before its time (the delay tiers' finest step is 100 ms).
    for (i, retry_at) in starts.iter().enumerate() {
        let next_ran_at = if i + 1 < errors.len() {
            ts(&errors[i + 1]["at"])
        } else {
            job.started_at.expect("started")
        };
        assert!(
            next_ran_at >= *retry_at - chrono::Duration::milliseconds(100),
            "attempt {} ran early",
            i + 2
        );
    }
    worker.stop().await;
}

#[tokio::test]
async fn permanent_errors_and_exhausted_attempts_dead_letter_with_the_reason() {
    let env = TestEnv::new().await;
    let worker = env.start_worker();
    let client = env.client();
    let permanent = client
        .enqueue(NewJob::new("fail", json!({"permanent": true})))
        .await
        .expect("enqueue")
        .job
        .id;
    let exhausted = client
        .enqueue(NewJob::new("fail", json!({"times": 10})).with_max_attempts(3))
        .await
        .expect("enqueue")
        .job
        .id;
    let p = env.wait_for_status(permanent, JobStatus::Dead, T).await;
    assert_eq!(p.attempts, 1, "a permanent error is not retried");
    assert!(
        p.error
            .as_deref()
            .unwrap_or_default()
            .contains("failed permanently")
    );
    let e = env.wait_for_status(exhausted, JobStatus::Dead, T).await;
    assert_eq!(e.attempts, 3);
    assert_eq!(e.errors.as_array().map(Vec::len), Some(3));
    assert!(
        e.error
            .as_deref()
            .unwrap_or_default()
            .contains("no attempts left")
    );

    let letters = env
        .wait_until("two dead letters", T, || async {
            let l = common::peek_dead_letters(&env.names().dead).await;
            (l.len() == 2).then_some(l)
        })
        .await;
    for id in [permanent, exhausted] {
        let letter = letters
            .iter()
            .find(|(jid, _)| jid.as_deref() == Some(&id.to_string()))
            .expect("letter for job");
        assert!(
            letter.1.as_deref().is_some_and(|r| !r.is_empty()),
            "reason header"
        );
    }
    worker.stop().await;
}

#[tokio::test]
async fn a_dead_job_replays_with_a_fresh_budget_and_keeps_its_id_and_history() {
    let env = TestEnv::new().await;
    let first = env.start_worker();
    let client = env.client();
    let id = client
        .enqueue(NewJob::new("later", json!({"v": 1})))
        .await
        .expect("enqueue")
        .job
        .id;
    let dead = env.wait_for_status(id, JobStatus::Dead, T).await;
    assert!(
        dead.error
            .as_deref()
            .unwrap_or_default()
            .contains("no handler")
    );
    env.wait_until("its dead letter", T, || async {
        (common::peek_dead_letters(&env.names().dead).await.len() == 1).then_some(())
    })
    .await;
    first.stop().await;

    // A worker that knows the kind now; the operator replays through the API.
    let mut registry = Registry::builtins();
    registry.register("later", Echo);
    let second = env.start_worker_with(env.cfg.clone(), registry);
    let app = apiary::api::router(apiary::api::AppState::new(
        client.clone(),
        apiary::Shutdown::new(),
        env.cfg.max_payload_bytes,
        Default::default(),
    ));
    let (status, _) = post(&app, &format!("/v1/jobs/{id}/retry")).await;
    assert_eq!(status, 202);
    let job = env.wait_for_status(id, JobStatus::Succeeded, T).await;
    assert_eq!(job.attempts, 1, "fresh attempt budget");
    assert_eq!(job.result, Some(json!({"v": 1})));
    assert_eq!(job.errors.as_array().map(Vec::len), Some(1), "history kept");
    // The workers' sweep removes its dead letter, within one sweep interval. Wait on the
    // sweep's own record, not by peeking: a letter a peek holds is one the sweep cannot see.
    env.wait_until("its dead letter to be swept", T, || async {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM apiary_dead_sweep WHERE job_id = $1")
                .bind(id)
                .fetch_one(env.store.pool())
                .await
                .expect("sweep queue");
        (pending == 0).then_some(())
    })
    .await;
    assert!(
        common::peek_dead_letters(&env.names().dead)
            .await
            .is_empty(),
        "the swept letter is gone"
    );
    // Only dead or failed jobs can be retried.
    let (status, body) = post(&app, &format!("/v1/jobs/{id}/retry")).await;
    assert_eq!(status, 409, "{body}");
    let (status, _) = post(&app, &format!("/v1/jobs/{}/retry", Uuid::new_v4())).await;
    assert_eq!(status, 404);
    second.stop().await;
}

#[tokio::test]
async fn dead_list_and_replay_from_the_cli() {
    let env = TestEnv::new().await;
    let worker = env.start_worker();
    let client = env.client();
    let a = client
        .enqueue(NewJob::new("nohandler.a", json!(1)))
        .await
        .expect("enqueue")
        .job
        .id;
    let b = client
        .enqueue(NewJob::new("nohandler.b", json!(2)))
        .await
        .expect("enqueue")
        .job
        .id;
    env.wait_for_status(a, JobStatus::Dead, T).await;
    env.wait_for_status(b, JobStatus::Dead, T).await;
    env.wait_until("two letters", T, || async {
        (common::peek_dead_letters(&env.names().dead).await.len() == 2).then_some(())
    })
    .await;
    worker.stop().await;

    let out = env.run(&["dead", "list", "--kind", "nohandler.a"]).await;
    let listed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(listed.lines().count(), 1, "{listed}");
    assert!(listed.contains(&a.to_string()));
    let out = env.run(&["dead", "replay"]).await;
    assert!(!out.status.success(), "replay needs --id, --kind or --all");
    let out = env.run(&["dead", "replay", "--kind", "nohandler.a"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), a.to_string());
    let job = env.job(a).await.expect("job");
    assert_eq!((job.status(), job.attempts), (JobStatus::Queued, 0));
    // One sweep (what every worker runs every few seconds) removes the replayed letter.
    let conn = lapin::Connection::connect(common::AMQP, Default::default())
        .await
        .expect("rabbitmq");
    let ch = conn.create_channel().await.expect("channel");
    let removed = apiary::broker::dead::sweep_replayed(&env.store, &ch, &env.names())
        .await
        .expect("sweep");
    assert_eq!(removed, 1);
    let _ = conn.close(200, "".into()).await;
    let letters = common::peek_dead_letters(&env.names().dead).await;
    assert_eq!(letters.len(), 1, "only b's letter is left: {letters:?}");
    assert_eq!(letters[0].0.as_deref(), Some(b.to_string().as_str()));
}

#[tokio::test]
async fn a_panicking_handler_costs_an_attempt_and_the_worker_lives_on() {
    let env = TestEnv::new().await;
    let worker = env.start_worker();
    let client = env.client();
    let slow = client
        .enqueue(NewJob::new("sleep", json!({"ms": 800})))
        .await
        .expect("enqueue")
        .job
        .id;
    let boom = client
        .enqueue(NewJob::new("fail", json!({"panic": true})).with_max_attempts(2))
        .await
        .expect("enqueue")
        .job
        .id;
    let dead = env.wait_for_status(boom, JobStatus::Dead, T).await;
    assert_eq!(dead.attempts, 2);
    let errors = dead.errors.as_array().expect("errors");
    assert!(
        errors.iter().all(|e| e["error"]
            .as_str()
            .unwrap_or_default()
            .contains("handler panicked")),
        "{errors:?}"
    );
    // The job running beside it finished, and new work still runs.
    env.wait_for_status(slow, JobStatus::Succeeded, T).await;
    let after = client
        .enqueue(NewJob::new("echo", json!("still here")))
        .await
        .expect("enqueue")
        .job
        .id;
    env.wait_for_status(after, JobStatus::Succeeded, T).await;
    worker.stop().await;
}

#[tokio::test]
async fn an_attempt_past_its_kinds_timeout_is_cancelled_and_counted() {
    let env = TestEnv::new().await;
    let mut cfg = env.cfg.clone();
    cfg.kinds = apiary::config::parse_kinds("sleep:timeout=300ms,max_attempts=2").expect("kinds");
    let worker = env.start_worker_with(cfg.clone(), Registry::builtins());
    let client = apiary::Client::new(&cfg).expect("client");
    let id = client
        .enqueue(NewJob::new("sleep", json!({"ms": 5000})))
        .await
        .expect("enqueue")
        .job
        .id;
    let job = env.wait_for_status(id, JobStatus::Dead, T).await;
    assert_eq!(
        (job.attempts, job.max_attempts),
        (2, 2),
        "the kind's max_attempts applied at enqueue"
    );
    assert!(
        job.error
            .as_deref()
            .unwrap_or_default()
            .contains("timed out after 300ms"),
        "{:?}",
        job.error
    );
    let quick = client
        .enqueue(NewJob::new("sleep", json!({"ms": 10})))
        .await
        .expect("enqueue")
        .job
        .id;
    env.wait_for_status(quick, JobStatus::Succeeded, T).await;
    worker.stop().await;
}

#[tokio::test]
async fn poison_messages_are_recorded_dead_letter_at_once_and_never_loop() {
    let env = TestEnv::new().await;
    let mut cfg = env.cfg.clone();
    cfg.max_payload_bytes = 2048;
    let worker = env.start_worker_with(cfg, Registry::builtins());
    let ids: Vec<Uuid> = (0..7).map(|_| Uuid::new_v4()).collect();
    let big = format!(r#"{{"kind":"echo","payload":"{}"}}"#, "x".repeat(4096));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"this is not json".to_vec(), "not a JSON object"),
        (br#"{"payload": 1}"#.to_vec(), "kind: missing"),
        (br#"{"kind": 42}"#.to_vec(), "kind: expected a string"),
        (
            br#"{"kind": "echo", "max_attempts": "many"}"#.to_vec(),
            "max_attempts",
        ),
        (
            br#"{"kind": "echo", "run_at": "someday"}"#.to_vec(),
            "run_at",
        ),
        (big.into_bytes(), "limit is 2048"),
        (vec![0xff, 0x00, 0xfe], "UTF-8"),
    ];
    let bodies: Vec<(Option<String>, Vec<u8>)> = cases
        .iter()
        .zip(&ids)
        .map(|((body, _), id)| (Some(id.to_string()), body.clone()))
        .collect();
    env.publish_raw(&bodies).await;
    for ((_, reason), id) in cases.iter().zip(&ids) {
        let job = env.wait_for_status(*id, JobStatus::Dead, T).await;
        assert!(
            job.error.as_deref().unwrap_or_default().contains(reason),
            "{id}: {:?} should mention {reason}",
            job.error
        );
        assert!(job.raw_body.is_some(), "raw body kept");
        assert!(job.raw_body.as_deref().unwrap_or_default().len() <= 2048);
    }
    let letters = env
        .wait_until("seven dead letters", T, || async {
            let l = common::peek_dead_letters(&env.names().dead).await;
            (l.len() == 7).then_some(l)
        })
        .await;
    assert!(letters.iter().all(|(_, reason)| {
        reason
            .as_deref()
            .unwrap_or_default()
            .starts_with("poison message")
    }));
    assert_eq!(env.queue_depth(&env.cfg.queue).await, 0, "nothing requeued");
    // The worker is alive and well.
    let ok = env.enqueue(NewJob::new("echo", json!(1))).await;
    env.wait_for_status(ok, JobStatus::Succeeded, T).await;
    let summary = worker.stop().await;
    assert_eq!(summary.handed_back, 0);
}
