//! Several broker addresses (`AMQP_URL=amqp://a,amqp://b`): a dead first address is skipped by
//! workers and clients, and a worker whose connection is closed under it connects again and
//! keeps consuming, nothing lost and nothing run twice.

mod common;

use std::time::Duration;

use apiary::{JobStatus, NewJob};
use common::{AMQP, TestEnv};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

/// Nothing listens on port 1: a connection there is refused at once.
const DEAD: &str = "amqp://guest:guest@127.0.0.1:1/%2f";

/// A world whose `AMQP_URL` lists a dead address before the real one.
async fn dead_first() -> TestEnv {
    let mut env = TestEnv::new().await;
    env.cfg.amqp_url = format!("{DEAD},{AMQP}");
    env
}

#[tokio::test]
async fn a_dead_first_address_is_skipped_by_the_worker_and_the_client() {
    let env = dead_first().await;
    let mut worker = env.spawn(&["worker"], &[("APIARY_CONCURRENCY", "4")]);
    let ids = env
        .enqueue_all((0..20).map(|i| NewJob::new("echo", json!(i))).collect())
        .await;
    for id in &ids {
        env.wait_for_status(*id, JobStatus::Succeeded, T).await;
    }
    // The CLI's client too.
    let out = env.run(&["enqueue", "echo", "{\"cli\":true}"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id: uuid::Uuid = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("an id");
    env.wait_for_status(id, JobStatus::Succeeded, T).await;
    let log = worker.log_text();
    assert!(!log.contains("guest:guest"), "passwords are masked:\n{log}");
    worker.signal("TERM");
    assert!(worker.wait(T).await.success(), "{}", worker.log_text());
    env.assert_invariants_quiescent().await;
}

#[tokio::test]
async fn a_worker_whose_connection_is_closed_connects_again_and_keeps_consuming() {
    let mut env = TestEnv::new().await;
    // The real broker twice around a dead address: after a loss the worker starts from the
    // address after the one lost, so it tries the dead one (and says so at debug level).
    env.cfg.amqp_url = format!("{AMQP},{DEAD},{AMQP}");
    let mut worker = env.spawn(
        &["worker"],
        &[
            ("APIARY_CONCURRENCY", "4"),
            ("RUST_LOG", "info,apiary::broker=debug"),
        ],
    );
    let client = env.client();
    let mut all = Vec::new();
    for round in 0..3 {
        let ids: Vec<_> = client
            .enqueue_many(
                (0..30)
                    .map(|i| {
                        NewJob::new("tally", json!({"counter": "c"}))
                            .with_dedup_key(format!("r{round}-{i}"))
                    })
                    .collect(),
            )
            .await
            .expect("enqueue")
            .into_iter()
            .map(|e| e.job.id)
            .collect();
        for id in &ids {
            env.wait_for_status(*id, JobStatus::Succeeded, T).await;
        }
        all.extend(ids);
        if round == 0 {
            let log = worker.log_text();
            assert!(
                !log.contains("trying the next"),
                "the first address answered:\n{log}"
            );
        }
        assert!(
            common::close_rabbit_connections_of(worker.pid()).await >= 1,
            "found the worker's connection"
        );
    }
    // Consuming again after the last close, too.
    let last = env.enqueue(NewJob::new("echo", json!("after"))).await;
    env.wait_for_status(last, JobStatus::Succeeded, T).await;
    assert_eq!(env.tally("c").await, Some(all.len() as i64), "each once");
    assert!(
        worker.child.try_wait().expect("try_wait").is_none(),
        "worker died:\n{}",
        worker.log_text()
    );
    let log = worker.log_text();
    assert!(log.contains("rabbitmq available again"), "{log}");
    assert!(
        log.contains("rabbitmq address did not answer; trying the next")
            && log.contains("amqp://guest:***@127.0.0.1:1/%2f"),
        "after a loss the next attempt starts from the next address:\n{log}"
    );
    assert!(!log.contains("guest:guest"), "passwords are masked:\n{log}");
    worker.signal("TERM");
    assert!(worker.wait(T).await.success(), "{}", worker.log_text());
    env.assert_invariants_quiescent().await;
}

#[tokio::test]
async fn the_apis_publisher_connects_again_from_the_next_address() {
    let mut env = TestEnv::new().await;
    env.cfg.amqp_url = format!("{AMQP},{DEAD},{AMQP}");
    let (mut api, base) = env
        .spawn_api(&[("RUST_LOG", "info,apiary::broker=debug")])
        .await;
    let worker = env.start_worker();
    let http = reqwest::Client::new();
    let post = |n: usize| {
        let http = http.clone();
        let base = base.clone();
        async move {
            let r = http
                .post(format!("{base}/v1/jobs"))
                .json(&json!({"kind": "tally", "payload": {"counter": "api"}, "dedup_key": format!("a{n}")}))
                .send()
                .await
                .expect("POST /v1/jobs");
            assert_eq!(r.status().as_u16(), 202, "{:?}", r.text().await);
            let body: serde_json::Value = r.json().await.expect("json");
            body["id"]
                .as_str()
                .and_then(|s| s.parse::<uuid::Uuid>().ok())
                .expect("an id")
        }
    };
    let first = post(0).await;
    env.wait_for_status(first, JobStatus::Succeeded, T).await;
    assert!(
        common::close_rabbit_connections_of(api.pid()).await >= 1,
        "found the api's connection"
    );
    // The next enqueues reconnect, from the address after the lost one.
    let mut ids = Vec::new();
    for n in 1..10 {
        ids.push(post(n).await);
    }
    for id in &ids {
        env.wait_for_status(*id, JobStatus::Succeeded, T).await;
    }
    assert_eq!(env.tally("api").await, Some(10), "each once");
    let log = api.log_text();
    assert!(
        log.contains("rabbitmq address did not answer; trying the next"),
        "{log}"
    );
    assert!(!log.contains("guest:guest"), "passwords are masked:\n{log}");
    worker.stop().await;
    api.signal("TERM");
    api.wait(T).await;
    env.assert_invariants_quiescent().await;
}
