//! Waiting: scheduled jobs, retries and long jobs wait durably (in the broker or under a
//! lease), never in a worker's memory, and cancellation stops a job in any state.

mod common;

use common::consumer_count;

async fn post(app: &axum::Router, uri: &str) -> (u16, serde_json::Value) {
    common::call(app, "POST", uri, None).await
}

use std::time::Duration;

use apiary::{JobStatus, NewJob};
use common::TestEnv;
use serde_json::json;
use uuid::Uuid;

const T: Duration = Duration::from_secs(30);

async fn all_queues_empty(env: &TestEnv) -> bool {
    for q in env.names().all().iter().filter(|q| !q.ends_with(".dead")) {
        if env.queue_depth(q).await > 0 {
            return false;
        }
    }
    true
}

#[tokio::test]
async fn scheduled_jobs_wait_then_run_and_show_their_time() {
    let env = TestEnv::new().await;
    let worker = env.start_worker();
    let client = env.client();
    let delayed = client
        .enqueue(NewJob {
            delay_ms: Some(1500),
            ..NewJob::new("echo", json!("later"))
        })
        .await
        .expect("enqueue")
        .job;
    let run_at = delayed.run_at.expect("run_at shown");
    assert_eq!(delayed.status(), JobStatus::Queued);
    let at = chrono::Utc::now() + chrono::Duration::milliseconds(1200);
    let scheduled = client
        .enqueue(NewJob::new("echo", json!("at")).with_run_at(at))
        .await
        .expect("enqueue")
        .job;

    // A producer without our code schedules through the wire format's run_at; the job is
    // visible while it waits.
    let raw = Uuid::new_v4();
    let raw_at = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let body = json!({"id": raw, "kind": "echo", "payload": "raw", "run_at": raw_at.to_rfc3339()});
    env.publish_raw(&[(None, body.to_string().into_bytes())])
        .await;
    let seen = env
        .wait_until("the raw scheduled job to be recorded", T, || async {
            env.job(raw).await
        })
        .await;
    assert_eq!(seen.status(), JobStatus::Queued);
    assert!(seen.run_at.is_some());

    for (id, due) in [(delayed.id, run_at), (scheduled.id, at), (raw, raw_at)] {
        let job = env.wait_for_status(id, JobStatus::Succeeded, T).await;
        let started = job.started_at.expect("started");
        assert!(
            started >= due - chrono::Duration::milliseconds(100),
            "{id} started {started} before {due}"
        );
    }
    worker.stop().await;
}

#[tokio::test]
async fn scheduled_and_retrying_jobs_survive_their_workers_death() {
    let env = TestEnv::new().await;
    let client = env.client();
    let mut w1 = env.spawn(
        &["worker"],
        &[("APIARY_KINDS", "fail:retry_base=2s,retry_cap=2s")],
    );
    let scheduled = client
        .enqueue(NewJob {
            delay_ms: Some(3000),
            ..NewJob::new("tally", json!({"counter": "sched"}))
        })
        .await
        .expect("enqueue")
        .job;
    let retried = client
        .enqueue(NewJob::new("fail", json!({"times": 1})))
        .await
        .expect("enqueue")
        .job
        .id;
    env.wait_for_status(retried, JobStatus::Retrying, T).await;
    w1.signal("KILL");
    w1.wait(T).await;
    // Nothing of either job lived in that worker: a new one finds both.
    let mut w2 = env.spawn(&["worker"], &[]);
    let s = env
        .wait_for_status(scheduled.id, JobStatus::Succeeded, T)
        .await;
    assert!(
        s.started_at.expect("started")
            >= scheduled.run_at.expect("run_at") - chrono::Duration::milliseconds(100)
    );
    assert_eq!(env.tally("sched").await, Some(1));
    let r = env.wait_for_status(retried, JobStatus::Succeeded, T).await;
    assert_eq!(r.attempts, 2);
    w2.signal("TERM");
    assert!(w2.wait(T).await.success());
}

#[tokio::test]
async fn cancellation_in_every_state() {
    let env = TestEnv::new().await;
    let mut cfg = env.cfg.clone();
    cfg.kinds = apiary::config::parse_kinds("fail:retry_base=2s,retry_cap=2s").expect("kinds");
    let client = apiary::Client::new(&cfg).expect("client");
    let app = apiary::api::router(apiary::api::AppState::new(
        client.clone(),
        apiary::Shutdown::new(),
        cfg.max_payload_bytes,
        Default::default(),
    ));

    // Queued, with no worker at all yet.
    let queued = client
        .enqueue(NewJob::new("tally", json!({"counter": "never"})))
        .await
        .expect("enqueue")
        .job
        .id;
    let (status, body) = post(&app, &format!("/v1/jobs/{queued}/cancel")).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("cancelled")));

    let worker = env.start_worker_with(cfg.clone(), apiary::Registry::builtins());
    // Scheduled.
    let scheduled = client
        .enqueue(NewJob {
            delay_ms: Some(1000),
            ..NewJob::new("tally", json!({"counter": "never"}))
        })
        .await
        .expect("enqueue")
        .job
        .id;
    let (status, _) = post(&app, &format!("/v1/jobs/{scheduled}/cancel")).await;
    assert_eq!(status, 200);
    // Retrying.
    let retrying = client
        .enqueue(NewJob::new("fail", json!({"times": 5})))
        .await
        .expect("enqueue")
        .job
        .id;
    env.wait_for_status(retrying, JobStatus::Retrying, T).await;
    let (status, body) = post(&app, &format!("/v1/jobs/{retrying}/cancel")).await;
    assert_eq!(status, 200, "{body}");
    // Full jitter may have let a second attempt run already; none may run after this.
    let attempts_at_cancel = body["attempts"].as_i64().expect("attempts") as i32;
    // Running: the handler is told, and the job ends cancelled when it returns.
    let running = client
        .enqueue(NewJob::new("sleep", json!({"ms": 60000})))
        .await
        .expect("enqueue")
        .job
        .id;
    env.wait_for_status(running, JobStatus::Running, T).await;
    let (status, body) = post(&app, &format!("/v1/jobs/{running}/cancel")).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("running")));
    let r = env.wait_for_status(running, JobStatus::Cancelled, T).await;
    assert!(r.finished_at.is_some());

    // Every message, wherever it waited, went through and was acked without running.
    env.wait_until("every queue to drain", T, || async {
        all_queues_empty(&env).await.then_some(())
    })
    .await;
    for (id, attempts) in [(queued, 0), (scheduled, 0), (retrying, attempts_at_cancel)] {
        let job = env.job(id).await.expect("job");
        assert_eq!(
            (job.status(), job.attempts),
            (JobStatus::Cancelled, attempts),
            "{id}"
        );
    }
    assert_eq!(env.tally("never").await, None);

    // Finished: 409. Unknown: 404. Malformed: 400.
    let (status, body) = post(&app, &format!("/v1/jobs/{running}/cancel")).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        post(&app, &format!("/v1/jobs/{}/cancel", Uuid::new_v4()))
            .await
            .0,
        404
    );
    assert_eq!(post(&app, "/v1/jobs/nope/cancel").await.0, 400);

    // The CLI says the same.
    let cli = client
        .enqueue(NewJob {
            delay_ms: Some(60_000),
            ..NewJob::new("echo", json!(1))
        })
        .await
        .expect("enqueue")
        .job
        .id;
    let out = env.run(&["cancel", &cli.to_string()]).await;
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "cancelled");
    let out = env.run(&["cancel", &cli.to_string()]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already finished"));
    worker.stop().await;
}

/// A long job whose worker dies after its message was acked: the lease runs out and the
/// rescuer puts it back, so another worker runs it.
#[tokio::test]
async fn a_long_job_whose_worker_dies_after_detaching_is_rescued() {
    let env = TestEnv::new().await;
    let mut w1 = env.spawn(&["worker"], &[("APIARY_DETACH_AFTER", "500ms")]);
    let id = env.enqueue(NewJob::new("sleep", json!({"ms": 3000}))).await;
    env.wait_until("the job to detach", T, || async {
        let d: bool = sqlx::query_scalar("SELECT detached FROM apiary_jobs WHERE id = $1")
            .bind(id)
            .fetch_one(env.store.pool())
            .await
            .ok()?;
        d.then_some(())
    })
    .await;
    assert_eq!(env.queue_depth(&env.cfg.queue).await, 0);
    w1.signal("KILL");
    w1.wait(T).await;
    let mut w2 = env.spawn(&["worker"], &[]);
    let job = env.wait_for_status(id, JobStatus::Succeeded, T).await;
    assert_eq!(job.attempts, 2, "the lost attempt counts");
    assert!(job.errors.to_string().contains("lease expired"));
    w2.signal("TERM");
    assert!(w2.wait(T).await.success());
}

/// RabbitMQ closes the channel of a consumer that holds a message past its consumer timeout
/// (30 min by default; checked about once a minute). Lowered to 3 s for the channels opened
/// here, a job of 75 s runs through on a worker that detaches long jobs, while a worker that
/// does not has its channel closed under it.
#[tokio::test]
async fn a_job_outlives_a_lowered_consumer_timeout() {
    let env = TestEnv::new().await;
    let control = TestEnv::new().await;
    let before = rabbitmqctl_eval("application:get_env(rabbit, consumer_timeout).").await;
    // Restored on every path out of this test, a panic included: a broker left with a 3 s
    // timeout would close the channels of everything that connects after.
    let restore = RestoreOnDrop(match before.trim() {
        s if s.starts_with("{ok,") => {
            format!(
                "application:set_env(rabbit, consumer_timeout, {}).",
                &s[4..s.len() - 1]
            )
        }
        _ => "application:unset_env(rabbit, consumer_timeout).".to_string(),
    });
    // Channels read the setting when they open: lower it just while these two workers connect.
    rabbitmqctl_eval("application:set_env(rabbit, consumer_timeout, 3000).").await;
    let mut detaching = env.spawn(&["worker"], &[("APIARY_DETACH_AFTER", "1s")]);
    let mut holding = control.spawn(&["worker"], &[("APIARY_DETACH_AFTER", "10m")]);
    for e in [&env, &control] {
        e.wait_until("the worker to consume", T, || async {
            (consumer_count(&e.cfg.queue).await >= 1).then_some(())
        })
        .await;
    }
    drop(restore);

    let long = json!({"ms": 75_000});
    let id = env.enqueue(NewJob::new("sleep", long.clone())).await;
    let cid = control
        .client()
        .enqueue(NewJob::new("sleep", long))
        .await
        .expect("enqueue")
        .job
        .id;
    let job = env
        .wait_for_status(id, JobStatus::Succeeded, Duration::from_secs(150))
        .await;
    assert_eq!(job.attempts, 1);
    control
        .wait_for_status(cid, JobStatus::Succeeded, Duration::from_secs(150))
        .await;
    detaching.signal("TERM");
    holding.signal("TERM");
    assert!(detaching.wait(T).await.success());
    assert!(holding.wait(T).await.success());
    assert!(
        !detaching.log_text().contains("rabbitmq unavailable"),
        "the detaching worker's channel was closed:\n{}",
        detaching.log_text()
    );
    assert!(
        holding.log_text().contains("rabbitmq unavailable"),
        "control: the consumer timeout should have closed the holding worker's channel"
    );
}

async fn rabbitmqctl_eval(expr: &str) -> String {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["eval", expr])
        .output()
        .await
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl eval {expr}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a `rabbitmqctl eval` expression when dropped.
struct RestoreOnDrop(String);

impl Drop for RestoreOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["eval", &self.0])
            .output();
    }
}
