//! A message the broker loses after confirming it: RabbitMQ 3.x can drop one that a quorum
//! delay tier is dead-lettering back to its work queue while the tier's leader dies (seen in
//! `tests/cluster.rs`). Postgres still says the job waits; a worker that sees the job's queue
//! hold nothing (nothing ready, nothing delayed) for a while has it published again, and it
//! runs exactly once. Simulated here by purging the delay tier that holds the message.

mod common;

use std::time::Duration;

use apiary::{JobStatus, NewJob};
use common::{AMQP, TestEnv};
use lapin::options::QueuePurgeOptions;
use serde_json::json;

/// The job's own delay (up to 8 s), then the sweep's 3 leases (3 s here) of grace and its
/// 3-lease period, with room for a loaded machine.
const T: Duration = Duration::from_secs(60);

async fn purge_delay_tiers(env: &TestEnv) -> u32 {
    let conn = apiary::broker::connect(AMQP, "test purge")
        .await
        .expect("rabbitmq");
    let ch = conn.create_channel().await.expect("channel");
    let mut purged = 0;
    for ms in apiary::broker::topology::DELAY_TIERS_MS {
        purged += ch
            .queue_purge(
                env.names().delay(ms).as_str().into(),
                QueuePurgeOptions::default(),
            )
            .await
            .expect("purge");
    }
    let _ = conn.close(200, "purged".into()).await;
    purged
}

#[tokio::test]
async fn a_delayed_job_whose_message_is_lost_still_runs_once() {
    let env = TestEnv::new().await;
    let _worker = env.spawn(&["worker"], &[]);
    let id = env
        .enqueue(
            NewJob::new("tally", json!({ "counter": "lost-delayed" }))
                .with_run_at(chrono::Utc::now() + chrono::Duration::seconds(3)),
        )
        .await;
    assert_eq!(
        purge_delay_tiers(&env).await,
        1,
        "the message sat in a delay tier"
    );
    let job = env.wait_for_status(id, JobStatus::Succeeded, T).await;
    assert_eq!(job.attempts, 1);
    assert_eq!(env.tally("lost-delayed").await, Some(1));
    env.assert_invariants_quiescent().await;
}

#[tokio::test]
async fn a_retry_whose_message_is_lost_still_runs_once() {
    let env = TestEnv::new().await;
    let worker = env.spawn(&["worker"], &[]);
    // Fails its first attempt, then waits 8 s in a delay tier for its retry (a fixed wait, not
    // the jittered backoff, which can be near zero): lose that message.
    let id = env
        .enqueue(NewJob::new(
            "fail",
            json!({ "times": 1, "retry_after_ms": 8000 }),
        ))
        .await;
    env.wait_for_status(id, JobStatus::Retrying, T).await;
    let mut purged = 0;
    let deadline = std::time::Instant::now() + T;
    while purged == 0 && env.job(id).await.map(|j| j.status()) == Some(JobStatus::Retrying) {
        purged += purge_delay_tiers(&env).await;
        assert!(
            std::time::Instant::now() < deadline,
            "never found the retry's message"
        );
    }
    assert!(
        purged >= 1,
        "the retry's message was not in a tier: it ran first"
    );
    let job = env.wait_for_status(id, JobStatus::Succeeded, T).await;
    assert_eq!(job.attempts, 2, "one failed attempt, one that succeeded");
    assert!(
        worker
            .log_text()
            .contains("jobs due with nothing in the broker to carry them"),
        "{}",
        worker.log_text()
    );
    env.assert_invariants_quiescent().await;
}
