//! Outages: connections to RabbitMQ and Postgres killed mid-stream, and dependencies away for
//! a while. Nothing is lost, nothing runs twice, the processes live on and recover by
//! themselves, and they say so once per outage rather than once per retry.

mod common;

use common::call;

use std::time::Duration;

use apiary::{JobStatus, NewJob};
use common::{Proxy, TestEnv};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

async fn terminate_postgres_backends(db: &str) -> i64 {
    let mut conn =
        <sqlx::PgConnection as sqlx::Connection>::connect(&format!("{}/postgres", common::PG_ROOT))
            .await
            .expect("postgres");
    sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(db)
    .fetch_one(&mut conn)
    .await
    .expect("terminate")
}

#[tokio::test]
async fn connection_kills_on_both_sides_mid_stream_lose_nothing() {
    let env = TestEnv::new().await;
    let client = env.client();
    const N: usize = 1500;
    let jobs: Vec<NewJob> = (0..N)
        .map(|i| {
            if i % 10 == 0 {
                NewJob::new("sleep", json!({"ms": 50}))
            } else {
                NewJob::new("tally", json!({"counter": format!("c{}", i % 3)}))
                    .with_dedup_key(format!("t{i}"))
            }
        })
        .collect();
    let tallies = (0..N).filter(|i| i % 10 != 0).count();
    let mut worker = env.spawn(&["worker"], &[("APIARY_CONCURRENCY", "8")]);
    for chunk in jobs.chunks(300) {
        client.enqueue_many(chunk.to_vec()).await.expect("enqueue");
        // Kill both sides' connections while work is in flight.
        env.wait_until("some progress", T, || async {
            (env.count(JobStatus::Succeeded).await > 0).then_some(())
        })
        .await;
        assert!(
            common::close_rabbit_connections_of(worker.pid()).await >= 1,
            "found the worker's connection"
        );
        terminate_postgres_backends(&env.name).await;
    }
    env.wait_until("all jobs to succeed", Duration::from_secs(120), || async {
        (env.count(JobStatus::Succeeded).await == N as i64).then_some(())
    })
    .await;
    let mut total = 0;
    for c in 0..3 {
        total += env.tally(&format!("c{c}")).await.unwrap_or(0);
    }
    assert_eq!(total, tallies as i64, "every tally exactly once");
    // The same process is still running, and recovered on its own each time.
    assert!(
        worker.child.try_wait().expect("try_wait").is_none(),
        "worker died:\n{}",
        worker.log_text()
    );
    let log = worker.log_text();
    assert!(log.contains("rabbitmq available again"), "{log}");
    worker.signal("TERM");
    assert!(worker.wait(T).await.success());
    env.assert_invariants_quiescent().await;
}

#[tokio::test]
async fn dependencies_away_for_a_while_pause_work_and_the_api_says_503() {
    let env = TestEnv::new().await;
    let pg = Proxy::start("127.0.0.1:5432").await;
    let mq = Proxy::start("127.0.0.1:5672").await;
    let db_url = format!("postgres://postgres@127.0.0.1:{}/{}", pg.port, env.name);
    let amqp_url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", mq.port);
    let mut worker = env.spawn(
        &["worker"],
        &[("DATABASE_URL", &db_url), ("AMQP_URL", &amqp_url)],
    );
    let mut cfg = env.cfg.clone();
    cfg.database_url = db_url.clone();
    cfg.amqp_url = amqp_url.clone();
    let api_client = apiary::Client::new(&cfg).expect("client");
    let app = apiary::api::router(apiary::api::AppState::new(
        api_client,
        apiary::Shutdown::new(),
        cfg.max_payload_bytes,
        Default::default(),
    ));

    let first = env.enqueue(NewJob::new("echo", json!(1))).await;
    env.wait_for_status(first, JobStatus::Succeeded, T).await;
    let (s, ready) = call(&app, "GET", "/readyz", None).await;
    assert_eq!(s, 200, "{ready}");

    // RabbitMQ away: jobs enqueued meanwhile wait; the API says 503 for enqueues and readyz
    // names the broker.
    mq.cut();
    let waiting = env
        .enqueue(NewJob::new("tally", json!({"counter": "mq"})))
        .await;
    let (s, ready) = call(&app, "GET", "/readyz", None).await;
    assert_eq!(
        (s, ready["rabbitmq"].as_bool(), ready["postgres"].as_bool()),
        (503, Some(false), Some(true)),
        "{ready}"
    );
    let (s, err) = call(
        &app,
        "POST",
        "/v1/jobs",
        Some(r#"{"kind":"tally","payload":{"counter":"mq"},"dedup_key":"during"}"#),
    )
    .await;
    assert_eq!(s, 503, "{err}");
    assert!(
        err["error"]
            .as_str()
            .unwrap_or_default()
            .contains("will be published"),
        "{err}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await; // an outage long enough for several reconnect attempts
    mq.restore();
    env.wait_for_status(waiting, JobStatus::Succeeded, T).await;
    // The job the API recorded during the outage was published by the outbox relay.
    let during = env
        .wait_until("the job recorded during the outage", T, || async {
            env.store
                .get_job_by_dedup_key("tally", "during")
                .await
                .ok()
                .flatten()
                .filter(|j| j.status() == JobStatus::Succeeded)
        })
        .await;
    assert_eq!(during.attempts, 1);
    assert_eq!(env.tally("mq").await, Some(2));

    // Postgres away: the API answers 503 with JSON; the worker holds its deliveries.
    pg.cut();
    let (s, err) = call(&app, "GET", &format!("/v1/jobs/{first}"), None).await;
    assert_eq!(s, 503);
    assert!(err["error"].is_string());
    let (s, ready) = call(&app, "GET", "/readyz", None).await;
    assert_eq!(
        (s, ready["postgres"].as_bool()),
        (503, Some(false)),
        "{ready}"
    );
    let during_pg = env
        .enqueue(NewJob::new("tally", json!({"counter": "pg"})))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await; // an outage long enough for several retries
    pg.restore();
    env.wait_for_status(during_pg, JobStatus::Succeeded, T)
        .await;
    assert_eq!(env.tally("pg").await, Some(1));
    let (s, _) = call(&app, "GET", "/readyz", None).await;
    assert_eq!(s, 200);

    worker.signal("TERM");
    assert!(worker.wait(T).await.success());
    // One line when each outage began and one when it ended, not one per retry.
    let log = worker.log_text();
    for dep in ["rabbitmq", "postgres"] {
        let down = log.matches(&format!("{dep} unavailable")).count();
        let up = log.matches(&format!("{dep} available again")).count();
        assert!(
            (1..=2).contains(&down) && down == up,
            "{dep}: {down} down / {up} up lines:\n{log}"
        );
    }
}

/// The whole failure story at once: thousands of jobs, some failing a few times, some for
/// good, some poison, with both sides' connections killed in the middle. Every job ends in its
/// right state, every tally is exact, the dead-letter queue holds exactly the dead, and the
/// workers are still running.
#[tokio::test]
async fn a_mixed_run_with_connection_kills_ends_with_everything_in_its_place() {
    let env = TestEnv::new().await;
    let client = env.client();
    let mut w1 = env.spawn(&["worker"], &[]);
    let mut w2 = env.spawn(&["worker"], &[]);
    const N: usize = 3000;
    let mut expect_tally = 0i64;
    let mut jobs = Vec::with_capacity(N);
    for i in 0..N {
        jobs.push(match i % 10 {
            0 => NewJob::new("fail", json!({"times": 2})),
            1 => NewJob::new("fail", json!({"permanent": true})),
            2 => NewJob::new("fail", json!({"times": 9})).with_max_attempts(2),
            _ => {
                expect_tally += 1;
                NewJob::new("tally", json!({"counter": format!("m{}", i % 4)}))
                    .with_dedup_key(format!("m{i}"))
            }
        });
    }
    let dead_expected = (N / 10) * 2;
    let poison: Vec<(Option<String>, Vec<u8>)> = (0..30)
        .map(|i| {
            (
                Some(uuid::Uuid::new_v4().to_string()),
                format!("poison #{i}").into_bytes(),
            )
        })
        .collect();
    let started = std::time::Instant::now();
    for (n, chunk) in jobs.chunks(500).enumerate() {
        client.enqueue_many(chunk.to_vec()).await.expect("enqueue");
        if n == 2 {
            env.publish_raw(&poison).await;
            for w in [&w1, &w2] {
                common::close_rabbit_connections_of(w.pid()).await;
            }
            terminate_postgres_backends(&env.name).await;
        }
    }
    env.wait_until(
        "every job to reach its final state",
        Duration::from_secs(180),
        || async {
            let ok = env.count(JobStatus::Succeeded).await;
            let dead = env.count(JobStatus::Dead).await;
            (ok == (N - dead_expected) as i64 && dead == (dead_expected + poison.len()) as i64)
                .then_some(())
        },
    )
    .await;
    let elapsed = started.elapsed();
    let mut total = 0;
    for c in 0..4 {
        total += env.tally(&format!("m{c}")).await.unwrap_or(0);
    }
    assert_eq!(total, expect_tally);
    let retried_ok: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM apiary_jobs WHERE kind = 'fail' AND status = 'succeeded' AND attempts = 3",
    )
    .fetch_one(env.store.pool())
    .await
    .expect("count");
    assert_eq!(
        retried_ok,
        (N / 10) as i64,
        "jobs that fail twice succeed on their third attempt"
    );
    let letters = env
        .wait_until("the dead letters", T, || async {
            let l = common::peek_dead_letters(&env.names().dead).await;
            (l.len() >= dead_expected + poison.len()).then_some(l)
        })
        .await;
    let letter_ids: std::collections::HashSet<String> =
        letters.iter().filter_map(|(id, _)| id.clone()).collect();
    let dead_ids: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT id FROM apiary_jobs WHERE status = 'dead'")
            .fetch_all(env.store.pool())
            .await
            .expect("dead ids");
    let dead_ids: std::collections::HashSet<String> =
        dead_ids.iter().map(ToString::to_string).collect();
    assert_eq!(
        letter_ids, dead_ids,
        "the dead-letter queue holds exactly the dead jobs"
    );
    for w in [&mut w1, &mut w2] {
        assert!(
            w.child.try_wait().expect("try_wait").is_none(),
            "a worker died:\n{}",
            w.log_text()
        );
        w.signal("TERM");
        assert!(w.wait(T).await.success());
    }
    env.assert_invariants_quiescent().await;
    eprintln!(
        "mixed run: {N} jobs + {} poison in {:.1}s; {} succeeded, {} dead, {} dead letters ({} distinct)",
        poison.len(),
        elapsed.as_secs_f64(),
        N - dead_expected,
        dead_expected + poison.len(),
        letters.len(),
        letter_ids.len()
    );
}
