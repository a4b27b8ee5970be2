//! Each `(kind, dedup_key)`, and each id, runs at most once to completion: sequentially,
//! concurrently across worker processes, and when a message comes back after its job's
//! result was committed but before the ack.

mod common;

use common::consumer_count;

use std::collections::HashMap;
use std::time::Duration;

use apiary::store::finish_job::{Finish, Outcome, finish_jobs};
use apiary::wire::WireJob;
use apiary::{JobStatus, NewJob};
use common::TestEnv;
use serde_json::json;
use uuid::Uuid;

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn enqueueing_an_existing_key_returns_the_existing_job() {
    let env = TestEnv::new().await;
    let client = env.client();
    let first = client
        .enqueue(NewJob::new("tally", json!({"counter": "a"})).with_dedup_key("k"))
        .await
        .expect("first");
    let second = client
        .enqueue(NewJob::new("tally", json!({"counter": "b"})).with_dedup_key("k"))
        .await
        .expect("second");
    assert!(first.created && !second.created);
    assert_eq!(first.job.id, second.job.id);
    assert_eq!(
        second.job.payload,
        json!({"counter": "a"}),
        "the existing job, not the new request"
    );
    // The same key under another kind is another job.
    let other = client
        .enqueue(NewJob::new("echo", json!(1)).with_dedup_key("k"))
        .await
        .expect("other kind");
    assert!(other.created);
    // Within one batch, repeated keys resolve to the first.
    let batch = client
        .enqueue_many(vec![
            NewJob::new("echo", json!(1)).with_dedup_key("b1"),
            NewJob::new("echo", json!(2)).with_dedup_key("b1"),
            NewJob::new("echo", json!(3)).with_dedup_key("k"),
        ])
        .await
        .expect("batch");
    assert!(batch[0].created && !batch[1].created && !batch[2].created);
    assert_eq!(batch[0].job.id, batch[1].job.id);
    assert_eq!(batch[2].job.id, other.job.id);
    // Re-enqueueing by id is idempotent too, for the same job; the same id for another job
    // is a conflict, never answered with the job that holds the id.
    let again = client
        .enqueue(
            NewJob::new("echo", json!(1))
                .with_dedup_key("k")
                .with_id(other.job.id),
        )
        .await
        .expect("by id");
    assert!(!again.created);
    assert_eq!(again.job.id, other.job.id);
    let clash = client
        .enqueue(NewJob::new("echo", json!(9)).with_id(other.job.id))
        .await;
    assert!(
        matches!(&clash, Err(apiary::EnqueueError::Conflict(r)) if r.contains(&other.job.id.to_string())),
        "{clash:?}"
    );
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM apiary_jobs")
        .fetch_one(env.store.pool())
        .await
        .expect("count");
    assert_eq!(n, 3);

    let worker = env.start_worker();
    env.wait_for_status(first.job.id, JobStatus::Succeeded, T)
        .await;
    assert_eq!(env.tally("a").await, Some(1));
    assert_eq!(env.tally("b").await, None);
    worker.stop().await;
}

/// Two worker processes receive copies of the same keys at the same moment: round-robin
/// dispatch sends consecutive messages to different consumers. Each key's effect happens once.
#[tokio::test]
async fn concurrent_duplicates_across_two_worker_processes_run_once() {
    let env = TestEnv::new().await;
    let mut w1 = env.spawn(&["worker"], &[]);
    let mut w2 = env.spawn(&["worker"], &[]);
    // Both consuming before anything is published.
    env.wait_until("two consumers", T, || async {
        let n = consumer_count(&env.cfg.queue).await;
        (n >= 2).then_some(())
    })
    .await;

    const KEYS: usize = 300;
    let mut bodies = Vec::new();
    let mut same_id = Vec::new();
    for k in 0..KEYS {
        let counter = format!("c{}", k % 7);
        let key = format!("key-{k}");
        if k % 2 == 0 {
            // Two copies with different ids: one runs, one is recorded as a duplicate.
            for _ in 0..2 {
                let body = json!({"id": Uuid::now_v7(), "kind": "tally", "payload": {"counter": counter}, "dedup_key": key});
                bodies.push((None, body.to_string().into_bytes()));
            }
        } else {
            // Two copies of one message (same id): one runs, the other is acked unrun.
            let id = Uuid::now_v7();
            same_id.push(id);
            let body = json!({"id": id, "kind": "tally", "payload": {"counter": counter}, "dedup_key": key});
            bodies.push((None, body.to_string().into_bytes()));
            bodies.push((None, body.to_string().into_bytes()));
        }
    }
    env.publish_raw(&bodies).await;

    let expect_dupes = (KEYS / 2) as i64;
    env.wait_until("every key to finish", T, || async {
        let done = env.count(JobStatus::Succeeded).await;
        let dupes = env.count(JobStatus::Duplicate).await;
        (done == KEYS as i64 && dupes == expect_dupes).then_some(())
    })
    .await;
    let mut want: HashMap<String, i64> = HashMap::new();
    for k in 0..KEYS {
        *want.entry(format!("c{}", k % 7)).or_default() += 1;
    }
    for (counter, n) in want {
        assert_eq!(env.tally(&counter).await, Some(n), "counter {counter}");
    }
    for id in same_id {
        let job = env.job(id).await.expect("job");
        assert_eq!((job.status(), job.attempts), (JobStatus::Succeeded, 1));
    }
    // Every duplicate points at the job that owns its key.
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM apiary_jobs d LEFT JOIN apiary_jobs o ON o.id = d.duplicate_of
          WHERE d.status = 'duplicate' AND (o.id IS NULL OR o.dedup_key <> d.dedup_key OR o.status <> 'succeeded')",
    )
    .fetch_one(env.store.pool())
    .await
    .expect("orphans");
    assert_eq!(orphans, 0);
    env.wait_until("the queue to drain", T, || async {
        (env.queue_depth(&env.cfg.queue).await == 0).then_some(())
    })
    .await;
    for w in [&mut w1, &mut w2] {
        w.signal("TERM");
        assert!(w.wait(T).await.success());
    }
}

/// A worker died after committing a job's result and before acking its message: the message
/// comes back, and the next worker acks it without running the handler again.
#[tokio::test]
async fn a_redelivery_after_commit_does_not_run_the_handler_again() {
    let env = TestEnv::new().await;
    let client = env.client();
    let job = client
        .enqueue(NewJob::new("tally", json!({"counter": "once"})))
        .await
        .expect("enqueue")
        .job;

    // Play the worker that died: claim, apply the effect and the completion in one
    // transaction, commit, and never ack. The message is still in the queue.
    let dead_worker = Uuid::now_v7();
    let wire = WireJob {
        id: job.id,
        kind: job.kind.clone(),
        payload: serde_json::value::to_raw_value(&job.payload).expect("raw"),
        dedup_key: None,
        max_attempts: Some(job.max_attempts),
        run_at: None,
        queue: None,
        priority: None,
        concurrency_key: None,
        callback_url: None,
        prefix: None,
    };
    let claims = env
        .store
        .claim_jobs(
            &[apiary::store::claim_job::ClaimInput {
                job: &wire,
                budget: 5,
                recorded: true,
                prefix: &env.cfg.queue,
            }],
            dead_worker,
            Duration::from_secs(30),
        )
        .await
        .expect("claim");
    assert!(matches!(
        claims.claims[0],
        apiary::store::claim_job::Claim::Claimed { attempt: 1, .. }
    ));
    let mut tx = env.store.pool().begin().await.expect("tx");
    sqlx::query("INSERT INTO demo_tally VALUES ('once', 1)")
        .execute(&mut *tx)
        .await
        .expect("effect");
    let result = serde_json::value::to_raw_value(&json!({"value": 1})).expect("raw");
    let finished = finish_jobs(
        &mut *tx,
        dead_worker,
        &[Finish {
            id: job.id,
            attempt: 1,
            outcome: Outcome::Succeeded(result),
            detached: false,
        }],
        true,
    )
    .await
    .expect("finish");
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0].id, job.id);
    tx.commit().await.expect("commit");
    assert_eq!(
        env.queue_depth(&env.cfg.queue).await,
        1,
        "the unacked message is still queued"
    );

    let worker = env.start_worker();
    env.wait_until("the message to be acked", T, || async {
        (env.queue_depth(&env.cfg.queue).await == 0).then_some(())
    })
    .await;
    let summary = worker.stop().await;
    assert_eq!(
        env.tally("once").await,
        Some(1),
        "the handler did not run again"
    );
    let after = env.job(job.id).await.expect("job");
    assert_eq!((after.status(), after.attempts), (JobStatus::Succeeded, 1));
    assert_eq!(summary.finished, 0, "nothing ran");
}

/// Real processes killed without warning in the middle of a stream of tally jobs: every job
/// still succeeds, and every counter is exact.
#[tokio::test]
async fn kill_9_mid_stream_loses_nothing_and_applies_nothing_twice() {
    let env = TestEnv::new().await;
    let client = env.client();
    const N: usize = 600;
    let jobs: Vec<NewJob> = (0..N)
        .map(|i| {
            NewJob::new("tally", json!({"counter": format!("k{}", i % 5), "by": 1}))
                .with_dedup_key(format!("j{i}"))
        })
        .collect();
    // Slow the first worker down with sleeps so the kill lands with jobs in flight.
    let sleeps: Vec<NewJob> = (0..40)
        .map(|_| NewJob::new("sleep", json!({"ms": 400})))
        .collect();
    client.enqueue_many(sleeps).await.expect("sleeps");
    client.enqueue_many(jobs).await.expect("enqueue");

    let victim = env.spawn(&["worker"], &[("APIARY_CONCURRENCY", "16")]);
    env.wait_until("some progress", T, || async {
        (env.count(JobStatus::Succeeded).await >= 20).then_some(())
    })
    .await;
    victim.signal("KILL");
    drop(victim);
    let mut survivor = env.spawn(&["worker"], &[]);
    env.wait_until("all jobs to succeed", Duration::from_secs(60), || async {
        (env.count(JobStatus::Succeeded).await == (N + 40) as i64).then_some(())
    })
    .await;
    for k in 0..5 {
        assert_eq!(
            env.tally(&format!("k{k}")).await,
            Some((N / 5) as i64),
            "counter k{k}"
        );
    }
    survivor.signal("TERM");
    assert!(survivor.wait(T).await.success());
}
