//! Rate limits and concurrency keys, enforced across several real worker processes: no
//! one-second window ever holds more starts than the rate, no key ever has two jobs running
//! at once, and the jobs held back are neither lost nor charged an attempt.

mod common;

use std::time::Duration;

use apiary::{JobStatus, NewJob};
use chrono::{DateTime, Utc};
use common::TestEnv;
use serde_json::json;

/// Waits until every job of the test has succeeded, and returns (started_at, finished_at,
/// attempts, concurrency key) of each.
async fn all_succeeded(
    env: &TestEnv,
    n: i64,
    timeout: Duration,
) -> Vec<(DateTime<Utc>, DateTime<Utc>, i32, Option<String>)> {
    env.wait_until("every job to succeed", timeout, || async {
        (env.count(JobStatus::Succeeded).await == n).then_some(())
    })
    .await;
    sqlx::query_as(
        "SELECT started_at, finished_at, attempts, concurrency_key FROM apiary_jobs ORDER BY started_at",
    )
    .fetch_all(env.store.pool())
    .await
    .expect("read jobs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_of_20_per_second_holds_across_three_workers_in_every_window() {
    let env = TestEnv::new().await;
    let kinds = ("APIARY_KINDS", "echo:rate=20/s");
    let workers: Vec<_> = (0..3).map(|_| env.spawn(&["worker"], &[kinds])).collect();
    let client = env.client();
    let jobs: Vec<NewJob> = (0..100)
        .map(|i| NewJob::new("echo", json!({ "i": i })))
        .collect();
    client.enqueue_many(jobs).await.expect("enqueue");

    let rows = all_succeeded(&env, 100, Duration::from_secs(60)).await;
    let starts: Vec<DateTime<Utc>> = rows.iter().map(|r| r.0).collect();
    // Every window of one second that begins at a start (the windows where the count can
    // peak) holds at most 20 starts.
    let mut worst = 0;
    for (i, s) in starts.iter().enumerate() {
        let end = *s + chrono::Duration::seconds(1);
        let n = starts[i..].iter().take_while(|t| **t < end).count();
        worst = worst.max(n);
    }
    assert!(worst <= 20, "a one-second window held {worst} starts");
    // The limit was reached, so the test did test it: 100 jobs at 20/s take over 4 s.
    assert!(
        worst >= 15,
        "the rate was never approached ({worst} in the busiest second)"
    );
    assert!(
        rows.iter().all(|r| r.2 == 1),
        "a job held back by the limit was charged an attempt"
    );
    env.assert_invariants().await;
    drop(workers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_per_key_one_never_runs_two_jobs_of_a_key_at_once() {
    let env = TestEnv::new().await;
    let kinds = ("APIARY_KINDS", "sleep:max_per_key=1");
    let workers: Vec<_> = (0..3).map(|_| env.spawn(&["worker"], &[kinds])).collect();
    let client = env.client();
    let mut jobs = Vec::new();
    for round in 0..5 {
        for key in 0..4 {
            jobs.push(
                NewJob::new("sleep", json!({ "ms": 150, "round": round }))
                    .with_concurrency_key(format!("customer-{key}")),
            );
        }
    }
    client.enqueue_many(jobs).await.expect("enqueue");

    let rows = all_succeeded(&env, 20, Duration::from_secs(60)).await;
    for key in 0..4 {
        let key = format!("customer-{key}");
        let mut mine: Vec<_> = rows
            .iter()
            .filter(|r| r.3.as_deref() == Some(key.as_str()))
            .collect();
        assert_eq!(mine.len(), 5, "{key}: every job ran");
        mine.sort_by_key(|r| r.0);
        for pair in mine.windows(2) {
            assert!(
                pair[1].0 >= pair[0].1,
                "{key}: a job started at {} while another ran until {}",
                pair[1].0,
                pair[0].1
            );
        }
    }
    // Different keys do run side by side: the limit is per key, not per kind.
    let overlapping = rows.windows(2).any(|w| w[1].0 < w[0].1 && w[0].3 != w[1].3);
    assert!(overlapping, "jobs of different keys never overlapped");
    assert!(
        rows.iter().all(|r| r.2 == 1),
        "a held job was charged an attempt"
    );
    env.assert_invariants().await;
    drop(workers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_without_limits_beside_a_limited_one_is_not_held() {
    let env = TestEnv::new().await;
    // A limit so low that its backlog outlives the test: the other kind must not wait on it.
    let kinds = ("APIARY_KINDS", "sleep:rate=1/m");
    let _worker = env.spawn(&["worker"], &[kinds]);
    let client = env.client();
    let slow: Vec<NewJob> = (0..5)
        .map(|i| NewJob::new("sleep", json!({ "ms": 1, "i": i })))
        .collect();
    client.enqueue_many(slow).await.expect("enqueue limited");
    let fast: Vec<NewJob> = (0..30)
        .map(|i| NewJob::new("echo", json!({ "i": i })))
        .collect();
    let ids: Vec<_> = env.enqueue_all(fast).await;
    for id in ids {
        env.wait_for_status(id, JobStatus::Succeeded, Duration::from_secs(20))
            .await;
    }
    // One sleep job started; the other four wait, queued and uncharged.
    let waiting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM apiary_jobs WHERE kind = 'sleep' AND status = 'queued' AND attempts = 0",
    )
    .fetch_one(env.store.pool())
    .await
    .expect("count");
    assert_eq!(waiting, 4, "held jobs stay queued with no attempt charged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_rate_counts_every_kind_in_the_queue_together() {
    let env = TestEnv::with_queues(&[("emails", 8)]).await;
    let queues = env.queues_var();
    let extra = [
        ("APIARY_QUEUES", queues.as_str()),
        ("APIARY_QUEUE_OPTIONS", "emails:rate=10/s"),
    ];
    let workers: Vec<_> = (0..2).map(|_| env.spawn(&["worker"], &extra)).collect();
    let client = env.client();
    let jobs: Vec<NewJob> = (0..40)
        .map(|i| {
            let kind = if i % 2 == 0 { "echo" } else { "sleep" };
            NewJob::new(kind, json!({ "ms": 1, "i": i })).with_queue("emails")
        })
        .collect();
    client.enqueue_many(jobs).await.expect("enqueue");
    let rows = all_succeeded(&env, 40, Duration::from_secs(60)).await;
    let starts: Vec<DateTime<Utc>> = rows.iter().map(|r| r.0).collect();
    let worst = starts
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let end = *s + chrono::Duration::seconds(1);
            starts[i..].iter().take_while(|t| **t < end).count()
        })
        .max()
        .unwrap_or(0);
    assert!(
        worst <= 10,
        "a one-second window held {worst} starts of the queue"
    );
    assert!(
        worst >= 7,
        "the queue's rate was never approached ({worst})"
    );
    assert!(
        rows.iter().all(|r| r.2 == 1),
        "a held job was charged an attempt"
    );
    drop(workers);
}
