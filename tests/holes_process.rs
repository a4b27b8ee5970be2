//! Regression tests, with real worker processes and real signals, for the holes two reviews
//! found in "kill anything, lose nothing, run nothing twice".

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use apiary::handler::{Handler, HandlerError, JobContext};
use apiary::store::cancel_job::CancelOutcome;
use apiary::{JobStatus, NewJob, Registry};
use common::TestEnv;
use serde_json::json;

const T: Duration = Duration::from_secs(40);

/// Review item 3, as reproduced: a worker running `sleep 60000` is killed with SIGKILL, the
/// job is cancelled while no worker holds it (the API answers 202), a new worker starts: the
/// job used to stay `running` for good.
#[tokio::test]
async fn a_job_cancelled_after_its_worker_was_killed_ends_cancelled() {
    let env = TestEnv::new().await;
    let mut a = env.spawn(&["worker"], &[]);
    let id = env
        .enqueue(NewJob::new("sleep", json!({"ms": 60000})))
        .await;
    env.wait_for_status(id, JobStatus::Running, T).await;
    a.signal("KILL");
    a.wait(T).await;
    assert_eq!(
        env.store.cancel_job(id).await.expect("cancel"),
        CancelOutcome::Requested
    );
    let mut b = env.spawn(&["worker"], &[]);
    let job = env.wait_for_status(id, JobStatus::Cancelled, T).await;
    assert_eq!(job.attempts, 1, "the lost attempt was not run again");
    b.signal("TERM");
    assert!(b.wait(T).await.success());
    env.assert_invariants_quiescent().await;
}

/// Review item 4: a cancelled scheduled job kept hopping through the delay queues, and once
/// pruned its next hop recorded it again and it ran. Both for an enqueued job and for one
/// published raw.
#[tokio::test]
async fn a_cancelled_then_pruned_scheduled_job_never_comes_back() {
    let env = TestEnv::new().await;
    let worker = env.start_worker();
    let client = env.client();
    let mut job = NewJob::new("tally", json!({"counter": "late"}));
    job.delay_ms = Some(3000);
    let enqueued = client.enqueue(job).await.expect("enqueue").job;
    let raw = uuid::Uuid::now_v7();
    let due = chrono::Utc::now() + chrono::Duration::milliseconds(3000);
    let body = json!({"id": raw, "kind": "tally", "payload": {"counter": "late"}, "run_at": due});
    env.publish_raw(&[(None, body.to_string().into_bytes())])
        .await;
    env.wait_until("the raw scheduled job to be recorded", T, || async {
        env.job(raw).await
    })
    .await;
    for id in [enqueued.id, raw] {
        assert_eq!(
            env.store.cancel_job(id).await.expect("cancel"),
            CancelOutcome::Cancelled
        );
    }
    let pruned = env
        .store
        .prune(Duration::ZERO, &[], 100, 1)
        .await
        .expect("prune");
    assert_eq!(pruned, Some(2));
    // Past the due time and a couple of hops more: no row came back, nothing ran, and every
    // delay queue is empty.
    let names = env.names();
    env.wait_until("every message to be gone", T, || async {
        let mut left = 0;
        for q in names.all() {
            if q != names.dead {
                left += env.queue_depth(&q).await;
            }
        }
        (left == 0 && chrono::Utc::now() > due + chrono::Duration::seconds(2)).then_some(())
    })
    .await;
    assert!(env.job(enqueued.id).await.is_none());
    assert!(env.job(raw).await.is_none());
    assert_eq!(env.tally("late").await, None, "it never ran");
    worker.stop().await;
    env.assert_invariants_quiescent().await;
}

/// Runs its handlers while holding a database transaction, the way handlers that write
/// through `ctx.tx()` hold a pool connection.
struct Hold(Arc<AtomicUsize>);

impl Handler for Hold {
    type Output = serde_json::Value;
    async fn handle(&self, ctx: &mut JobContext) -> Result<Self::Output, HandlerError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        sqlx::query("SELECT 1").execute(ctx.tx().await?).await?;
        tokio::time::sleep(Duration::from_secs(7)).await;
        Ok(json!("held"))
    }
}

/// Review item 10: lease renewal shared its loop, and its connection pool, with everything
/// else; with every pool connection held by handlers, leases lapsed under running jobs and
/// another worker ran them again.
#[tokio::test]
async fn leases_hold_while_handlers_hold_every_pool_connection() {
    let env = TestEnv::new().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::builtins();
    registry.register("hold", Hold(runs.clone()));
    let mut cfg = env.cfg.clone();
    cfg.db_pool = 2;
    cfg.concurrency = 2;
    let busy = env.start_worker_with(cfg, registry.clone());
    let ids = vec![
        env.enqueue(NewJob::new("hold", json!(1))).await,
        env.enqueue(NewJob::new("hold", json!(2))).await,
    ];
    for id in &ids {
        env.wait_for_status(*id, JobStatus::Running, T).await;
    }
    // A second worker, whose rescuer would take over any lease that lapsed.
    let other = env.start_worker_with(env.cfg.clone(), registry);
    for id in &ids {
        let j = env.wait_for_status(*id, JobStatus::Succeeded, T).await;
        assert_eq!(j.attempts, 1, "no lease lapsed under a running job");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "each job ran once");
    busy.stop().await;
    other.stop().await;
    env.assert_invariants_quiescent().await;
}

/// Review item 11: deliveries prefetched behind long jobs were held unacked until RabbitMQ's
/// consumer timeout killed the channel. Now a delivery that waits for a slot longer than
/// `APIARY_DETACH_AFTER` goes back to the queue, where another worker takes it.
#[tokio::test]
async fn deliveries_waiting_behind_a_long_job_go_to_another_worker() {
    let env = TestEnv::new().await;
    let slow = [
        ("APIARY_CONCURRENCY", "1"),
        ("APIARY_PREFETCH", "8"),
        ("APIARY_DETACH_AFTER", "1s"),
    ];
    let mut a = env.spawn(&["worker"], &slow);
    let long = env
        .enqueue(NewJob::new("sleep", json!({"ms": 30000})))
        .await;
    env.wait_for_status(long, JobStatus::Running, T).await;
    let mut waiting = Vec::new();
    for i in 0..3 {
        waiting.push(env.enqueue(NewJob::new("echo", json!(i))).await);
    }
    let mut b = env.spawn(&["worker"], &[]);
    for id in &waiting {
        env.wait_for_status(*id, JobStatus::Succeeded, T).await;
    }
    assert_eq!(
        env.job(long).await.expect("job").status(),
        JobStatus::Running,
        "they ran while the long job still held the only slot of their first worker"
    );
    for p in [&mut a, &mut b] {
        p.signal("TERM");
    }
    for p in [&mut a, &mut b] {
        assert!(p.wait(T).await.success());
    }
}

/// Review item 14: a raw message with no id got a fresh id at each delivery, so after a
/// kill -9 its redelivery was recorded, and run, as a second job.
#[tokio::test]
async fn a_redelivered_message_without_an_id_is_the_same_job() {
    let env = TestEnv::new().await;
    let mut a = env.spawn(&["worker"], &[]);
    let body = json!({"kind": "tally", "payload": {"counter": "noid", "ms": 4000}});
    env.publish_raw(&[(None, body.to_string().into_bytes())])
        .await;
    let id: uuid::Uuid = env
        .wait_until("the job to start", T, || async {
            sqlx::query_scalar("SELECT id FROM apiary_jobs WHERE status = 'running'")
                .fetch_optional(env.store.pool())
                .await
                .ok()
                .flatten()
        })
        .await;
    a.signal("KILL");
    a.wait(T).await;
    let mut b = env.spawn(&["worker"], &[]);
    let job = env.wait_for_status(id, JobStatus::Succeeded, T).await;
    assert_eq!(job.attempts, 2);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM apiary_jobs")
        .fetch_one(env.store.pool())
        .await
        .expect("count");
    assert_eq!(rows, 1, "one job, not one per delivery");
    assert_eq!(env.tally("noid").await, Some(1));
    b.signal("TERM");
    assert!(b.wait(T).await.success());
    env.assert_invariants_quiescent().await;
}

/// Review item 15: a lease lapses on a live worker (here, a paused process). What follows
/// is one more run of that job, and no more: the paused worker, once resumed, learns its claim
/// is lost and its result is fenced out, and its effect does not happen. If the job comes
/// back to the paused worker itself as attempt 2, its bookkeeping keeps the two attempts
/// apart (fenced by attempt, not by job id), so attempt 2's lease is still renewed.
#[tokio::test]
async fn a_paused_worker_costs_at_most_one_more_run() {
    let env = TestEnv::new().await;
    let mut a = env.spawn(&["worker"], &[]);
    let id = env
        .enqueue(NewJob::new(
            "tally",
            json!({"counter": "paused", "ms": 5000}),
        ))
        .await;
    env.wait_for_status(id, JobStatus::Running, T).await;
    a.signal("STOP");
    // The other worker's rescuer finds the paused one silent and its lease lapsed, and puts
    // the job back. (The paused process's consumer may even receive the republished message:
    // a stalled worker still holds its connection. Either way, one more run.)
    let mut b = env.spawn(&["worker"], &[]);
    b.wait_for_log("rescued jobs whose lease expired", T).await;
    a.signal("CONT");
    let job = env.wait_for_status(id, JobStatus::Succeeded, T).await;
    assert_eq!(job.attempts, 2);
    assert_eq!(
        env.tally("paused").await,
        Some(1),
        "the effect happened once"
    );
    // Two more leases: nothing cascades.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let job = env.job(id).await.expect("job");
    assert_eq!((job.status(), job.attempts), (JobStatus::Succeeded, 2));
    assert_eq!(env.tally("paused").await, Some(1));
    for p in [&mut a, &mut b] {
        p.signal("TERM");
    }
    for p in [&mut a, &mut b] {
        assert!(p.wait(T).await.success());
    }
    env.assert_invariants_quiescent().await;
}
