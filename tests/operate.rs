//! What operators rely on: a SIGTERM drains cleanly, a second one stops at once, workers are
//! visible in the registry and in `apiary status`, metrics and probes tell the truth, logs
//! are JSON on request, and finished jobs are pruned after their retention.

mod common;

use std::time::{Duration, Instant};

use apiary::{JobStatus, NewJob};
use common::{TestEnv, http_get, strip_ansi};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn sigterm_hands_back_unstarted_work_at_once_and_finishes_in_flight_jobs() {
    let env = TestEnv::new().await;
    let client = env.client();
    // Concurrency 2 and prefetch 6: two jobs run, four more wait in the worker's hands.
    let mut draining = env.spawn(
        &["worker"],
        &[("APIARY_CONCURRENCY", "2"), ("APIARY_PREFETCH", "6")],
    );
    let probe = draining.probe_addr().await;
    let jobs: Vec<NewJob> = (0..6)
        .map(|i| NewJob::new("sleep", json!({"ms": 1500})).with_dedup_key(format!("d{i}")))
        .collect();
    let ids: Vec<_> = client
        .enqueue_many(jobs)
        .await
        .expect("enqueue")
        .into_iter()
        .map(|e| e.job.id)
        .collect();
    env.wait_until("two running", T, || async {
        (env.count(JobStatus::Running).await == 2).then_some(())
    })
    .await;
    assert_eq!(http_get(&format!("http://{probe}/readyz")).await.0, 200);

    let signalled = Instant::now();
    draining.signal("TERM");
    // Not ready while draining.
    env.wait_until("readyz to turn 503", T, || async {
        (http_get(&format!("http://{probe}/readyz")).await.0 == 503).then_some(())
    })
    .await;
    // The four it held but had not started are back in the queue now, not after the drain.
    env.wait_until(
        "the held deliveries to be handed back",
        Duration::from_secs(1),
        || async { (env.queue_depth(&env.cfg.queue).await == 4).then_some(()) },
    )
    .await;
    let status = draining.wait(T).await;
    let drained = signalled.elapsed();
    assert!(status.success(), "exit {status:?}");
    assert!(drained < Duration::from_secs(25), "drained in {drained:?}");
    let summary = draining.wait_for_log("worker stopped:", T).await;
    assert!(summary.contains("2 finished, 4 handed back"), "{summary}");

    // The two in flight finished there; the rest run elsewhere, uncharged.
    let mut other = env.spawn(&["worker"], &[]);
    for id in &ids {
        let job = env.wait_for_status(*id, JobStatus::Succeeded, T).await;
        assert_eq!(job.attempts, 1, "handing back cost no attempt");
    }
    other.signal("TERM");
    assert!(other.wait(T).await.success());
}

#[tokio::test]
async fn past_the_drain_timeout_unfinished_jobs_go_back_uncharged_and_a_second_signal_stops_at_once()
 {
    let env = TestEnv::new().await;
    let client = env.client();
    let mut slow = env.spawn(
        &["worker"],
        &[("APIARY_CONCURRENCY", "1"), ("APIARY_DRAIN_TIMEOUT", "1s")],
    );
    let long = client
        .enqueue(NewJob::new("sleep", json!({"ms": 60000})))
        .await
        .expect("enqueue")
        .job
        .id;
    env.wait_for_status(long, JobStatus::Running, T).await;
    let t0 = Instant::now();
    slow.signal("TERM");
    assert!(slow.wait(T).await.success());
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    let job = env.wait_for_status(long, JobStatus::Queued, T).await;
    assert_eq!(job.attempts, 0, "the interrupted attempt is not charged");
    let summary = slow.wait_for_log("worker stopped:", T).await;
    assert!(
        summary.contains("0 finished, 1 handed back"),
        "{summary}\n{}",
        strip_ansi(&slow.log_text())
    );
    assert_eq!(
        env.queue_depth(&env.cfg.queue).await,
        1,
        "its message is back in the queue"
    );

    // A second signal does not wait for the 25 s drain.
    let mut patient = env.spawn(&["worker"], &[("APIARY_CONCURRENCY", "1")]);
    env.wait_for_status(long, JobStatus::Running, T).await;
    let t0 = Instant::now();
    patient.signal("TERM");
    patient.wait_for_log("signal received: draining", T).await;
    patient.signal("TERM");
    assert!(patient.wait(T).await.success());
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    let job = env.wait_for_status(long, JobStatus::Queued, T).await;
    assert_eq!(job.attempts, 0);
}

#[tokio::test]
async fn the_api_drains_and_open_long_polls_answer_with_the_current_state() {
    let env = TestEnv::new().await;
    let port = 20000 + (std::process::id() % 20000) as u16;
    let addr = format!("127.0.0.1:{port}");
    let mut api = env.spawn(&["api"], &[("APIARY_HTTP_ADDR", &addr)]);
    api.wait_for_log("api listening", T).await;
    let id = env.enqueue(NewJob::new("echo", json!(1))).await;
    let poll = tokio::spawn({
        let url = format!("http://{addr}/v1/jobs/{id}?wait=60");
        async move {
            let t0 = Instant::now();
            (http_get(&url).await, t0.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await; // let the poll start waiting
    api.signal("TERM");
    let ((status, body), took) = poll.await.expect("poll");
    assert_eq!(status, 200, "{body}");
    let job: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(job["status"], "queued");
    assert!(
        took < Duration::from_secs(10),
        "the long poll answered at the drain, after {took:?}"
    );
    assert!(api.wait(T).await.success());
}

#[tokio::test]
async fn workers_register_show_in_status_and_leave_on_exit() {
    let env = TestEnv::new().await;
    let mut w1 = env.spawn(&["worker"], &[("APIARY_CONCURRENCY", "7")]);
    let w2 = env.spawn(&["worker"], &[]);
    let jobs: Vec<NewJob> = (0..200).map(|i| NewJob::new("echo", json!(i))).collect();
    env.client().enqueue_many(jobs).await.expect("enqueue");
    env.wait_until("all done", T, || async {
        (env.count(JobStatus::Succeeded).await == 200).then_some(())
    })
    .await;
    let stats: Value = env
        .wait_until(
            "both workers in status, with their work counted",
            T,
            || async {
                let out = env.run(&["status", "--json"]).await;
                let v: Value = serde_json::from_slice(&out.stdout).ok()?;
                let workers = v["workers"].as_array()?;
                let processed: i64 = workers.iter().filter_map(|w| w["processed"].as_i64()).sum();
                (workers.len() == 2 && processed == 200).then_some(v)
            },
        )
        .await;
    let pids: Vec<i64> = stats["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w["pid"].as_i64())
        .collect();
    assert!(pids.contains(&i64::from(w1.pid())) && pids.contains(&i64::from(w2.pid())));
    assert!(
        stats["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .any(|w| w["concurrency"] == 7)
    );
    assert_eq!(stats["last_hour"]["succeeded"], 200);
    assert_eq!(stats["depths"]["consumers"], 2);
    let table = env.run(&["status"]).await;
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("workers (2 alive)") && text.contains("succeeded  200"),
        "{text}"
    );

    // A clean exit removes the row; a killed worker's row expires.
    w1.signal("TERM");
    assert!(w1.wait(T).await.success());
    let pool = env.store.pool().clone();
    let rows = |n: i64| {
        let pool = pool.clone();
        async move {
            let c: i64 = sqlx::query_scalar("SELECT count(*) FROM apiary_workers")
                .fetch_one(&pool)
                .await
                .ok()?;
            (c == n).then_some(())
        }
    };
    env.wait_until("w1's row to go", T, || rows(1)).await;
    let mut w3 = env.spawn(&["worker"], &[]);
    env.wait_until("w3 registered", T, || rows(2)).await;
    w2.signal("KILL");
    env.wait_until("the killed worker's row to expire", T, || rows(1))
        .await;
    w3.signal("TERM");
    assert!(w3.wait(T).await.success());
}

#[tokio::test]
async fn metrics_and_json_logs_tell_the_truth() {
    let env = TestEnv::new().await;
    let mut w = env.spawn(
        &["worker"],
        &[("APIARY_LOG_FORMAT", "json"), ("APIARY_CONCURRENCY", "5")],
    );
    let client = env.client();
    let jobs: Vec<NewJob> = (0..30).map(|i| NewJob::new("echo", json!(i))).collect();
    client.enqueue_many(jobs).await.expect("enqueue");
    let failing = client
        .enqueue(NewJob::new("fail", json!({"permanent": true})))
        .await
        .expect("enqueue")
        .job
        .id;
    env.wait_for_status(failing, JobStatus::Dead, T).await;
    env.wait_until("echoes done", T, || async {
        (env.count(JobStatus::Succeeded).await == 30).then_some(())
    })
    .await;
    // The probe address is in a JSON line here.
    let line = w.wait_for_log("worker probes listening", T).await;
    let v: Value = serde_json::from_str(&line).expect("json log line");
    let addr = v["addr"].as_str().expect("addr").to_string();
    let needles = [
        "apiary_jobs_succeeded_total{kind=\"echo\"} 30",
        "apiary_jobs_started_total{kind=\"echo\"} 30",
        "apiary_jobs_dead_total{kind=\"fail\"} 1",
        "apiary_handler_duration_seconds_bucket{kind=\"echo\"",
        "apiary_job_enqueue_to_finish_seconds_count{kind=\"echo\"} 30",
        "apiary_worker_free_slots 5",
        "apiary_worker_jobs_in_flight 0",
        "apiary_queue_ready_messages",
        "apiary_queue_oldest_waiting_seconds",
    ];
    // Counters move right after each batch's commit: wait for them to catch up with the rows.
    let url = format!("http://{addr}/metrics");
    env.wait_until(
        "the metrics to match the job records",
        Duration::from_secs(10),
        || async {
            let (status, metrics) = http_get(&url).await;
            (status == 200 && needles.iter().all(|n| metrics.contains(n))).then_some(())
        },
    )
    .await;
    assert_eq!(http_get(&format!("http://{addr}/healthz")).await.0, 200);
    w.signal("TERM");
    assert!(w.wait(T).await.success());
    // Every line is JSON; every line about a job names it.
    let log = strip_ansi(&w.log_text());
    let mut about_the_dead_job = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if line.contains(&failing.to_string()) {
            about_the_dead_job += 1;
            let kind = v["kind"].as_str().or_else(|| v["span"]["kind"].as_str());
            assert_eq!(kind, Some("fail"), "{line}");
        }
    }
    assert!(about_the_dead_job >= 1, "the dead job was logged:\n{log}");
}

#[tokio::test]
async fn finished_jobs_are_pruned_after_their_retention() {
    let env = TestEnv::new().await;
    let client = env.client();
    let short = client
        .enqueue(NewJob::new("echo", json!(1)).with_dedup_key("k"))
        .await
        .expect("enqueue")
        .job
        .id;
    let kept = client
        .enqueue(NewJob::new("sleep", json!({"ms": 1})))
        .await
        .expect("enqueue")
        .job
        .id;
    let waiting = client
        .enqueue(NewJob {
            delay_ms: Some(3_600_000),
            ..NewJob::new("echo", json!(2))
        })
        .await
        .expect("enqueue")
        .job
        .id;
    let mut w = env.spawn(
        &["worker"],
        &[
            ("APIARY_RETENTION", "1s"),
            ("APIARY_PRUNE_INTERVAL", "300ms"),
            ("APIARY_KINDS", "sleep:retention=1h"),
        ],
    );
    env.wait_until("the echo job to be pruned", T, || async {
        env.job(short).await.is_none().then_some(())
    })
    .await;
    assert_eq!(
        env.job(kept).await.map(|j| j.status()),
        Some(JobStatus::Succeeded),
        "its kind keeps it an hour"
    );
    assert_eq!(
        env.job(waiting).await.map(|j| j.status()),
        Some(JobStatus::Queued),
        "unfinished jobs are never pruned"
    );
    // The dedup key went with the job: the same key makes a new job.
    let again = client
        .enqueue(NewJob::new("echo", json!(3)).with_dedup_key("k"))
        .await
        .expect("enqueue");
    assert!(again.created);
    w.signal("TERM");
    assert!(w.wait(T).await.success());
}
