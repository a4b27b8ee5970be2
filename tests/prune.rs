//! Pruning at the store level: one call deletes a large backlog of finished jobs past their
//! retention, and nothing else; one pruner at a time; the bounded form still works.

mod common;

use std::time::Duration;

use apiary::store::prune::Pruned;
use common::TestEnv;

/// Inserts `n` jobs of `kind` with `status`, created `created_ago` and (if final) finished
/// `finished_ago`, in one statement.
async fn insert(
    env: &TestEnv,
    n: i64,
    kind: &str,
    status: &str,
    created_ago: &str,
    finished_ago: Option<&str>,
) {
    sqlx::query(
        "INSERT INTO apiary_jobs (id, kind, status, max_attempts, result, created_at, finished_at)
         SELECT gen_random_uuid(), $2, $3, 5,
                CASE WHEN $3 = 'succeeded' THEN 'null'::json END,
                now() - $4::interval - i * interval '1 microsecond',
                now() - $5::interval
           FROM generate_series(1, $1) AS i",
    )
    .bind(n)
    .bind(kind)
    .bind(status)
    .bind(created_ago)
    .bind(finished_ago)
    .execute(env.store.pool())
    .await
    .expect("insert jobs");
}

async fn count(env: &TestEnv, filter: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM apiary_jobs WHERE {filter}"
    )))
    .fetch_one(env.store.pool())
    .await
    .expect("count")
}

#[tokio::test]
async fn one_call_prunes_a_large_backlog_and_only_what_is_due() {
    let env = TestEnv::new().await;
    // Due: finished two hours ago, default retention one hour.
    insert(
        &env,
        50_000,
        "echo",
        "succeeded",
        "3 hours",
        Some("2 hours"),
    )
    .await;
    insert(&env, 2_000, "echo", "dead", "3 hours", Some("2 hours")).await;
    // Not due: unfinished however old, finished recently, or kept longer by their kind.
    insert(&env, 300, "echo", "queued", "3 hours", None).await;
    insert(&env, 300, "echo", "retrying", "3 hours", None).await;
    insert(
        &env,
        300,
        "echo",
        "succeeded",
        "3 hours",
        Some("10 minutes"),
    )
    .await;
    insert(&env, 300, "report", "succeeded", "3 hours", Some("2 hours")).await;
    // Due under its kind's shorter retention.
    insert(
        &env,
        7_000,
        "burst",
        "succeeded",
        "30 minutes",
        Some("20 minutes"),
    )
    .await;

    let overrides = vec![
        ("report".to_string(), Duration::from_secs(86_400)),
        ("burst".to_string(), Duration::from_secs(600)),
    ];
    // A budget no run reaches: the call ends because nothing is left, not because of time.
    let pruned = env
        .store
        .prune_step(
            Duration::from_secs(3_600),
            &overrides,
            apiary::store::prune::PRUNE_BATCH,
            Duration::from_secs(3_600),
        )
        .await
        .expect("prune")
        .expect("the lock was free");
    assert_eq!(
        pruned,
        Pruned {
            deleted: 59_000,
            more: false
        }
    );
    assert_eq!(
        count(&env, "true").await,
        1_200,
        "only the jobs not due are left"
    );
    assert_eq!(count(&env, "finished_at IS NULL").await, 600);
    assert_eq!(count(&env, "kind = 'report'").await, 300);
    assert_eq!(count(&env, "kind = 'burst'").await, 0);
    assert_eq!(
        count(&env, "finished_at > now() - interval '1 hour'").await,
        300
    );

    // Caught up: the next call finds nothing.
    let again = env
        .store
        .prune_step(
            Duration::from_secs(3_600),
            &overrides,
            apiary::store::prune::PRUNE_BATCH,
            Duration::from_secs(3_600),
        )
        .await
        .expect("prune");
    assert_eq!(
        again,
        Some(Pruned {
            deleted: 0,
            more: false
        })
    );
}

#[tokio::test]
async fn a_spent_budget_says_there_is_more() {
    let env = TestEnv::new().await;
    insert(&env, 3_000, "echo", "succeeded", "3 hours", Some("2 hours")).await;
    // A zero budget stops before the first batch: there is more, and nothing went.
    let pruned = env
        .store
        .prune_step(Duration::from_secs(3_600), &[], 1_000, Duration::ZERO)
        .await
        .expect("prune")
        .expect("lock");
    assert_eq!(
        pruned,
        Pruned {
            deleted: 0,
            more: true
        }
    );
    assert_eq!(count(&env, "true").await, 3_000);
}

#[tokio::test]
async fn one_pruner_at_a_time() {
    let env = TestEnv::new().await;
    insert(&env, 100, "echo", "succeeded", "3 hours", Some("2 hours")).await;
    // Another process holds the pruning lock ("apiary" in ASCII) for its transaction.
    let mut other = env.store.pool().begin().await.expect("begin");
    let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(0x61_70_69_61_72_79_i64)
        .fetch_one(&mut *other)
        .await
        .expect("lock");
    assert!(held);
    let step = env
        .store
        .prune_step(
            Duration::from_secs(3_600),
            &[],
            1_000,
            Duration::from_secs(60),
        )
        .await
        .expect("prune");
    assert_eq!(step, None, "the lock is taken: nothing pruned");
    let bounded = env
        .store
        .prune(Duration::from_secs(3_600), &[], 500, 20)
        .await
        .expect("prune");
    assert_eq!(bounded, None);
    assert_eq!(count(&env, "true").await, 100);
    other.rollback().await.expect("rollback");
}

/// The bounded form the worker's loop calls today: `batch` rows per statement, at most
/// `max_batches` statements per retention rule.
#[tokio::test]
async fn the_bounded_form_stops_after_its_batches() {
    let env = TestEnv::new().await;
    insert(&env, 2_500, "echo", "succeeded", "3 hours", Some("2 hours")).await;
    let pruned = env
        .store
        .prune(Duration::from_secs(3_600), &[], 500, 2)
        .await
        .expect("prune");
    assert_eq!(pruned, Some(1_000));
    let rest = env
        .store
        .prune(Duration::from_secs(3_600), &[], 500, 20)
        .await
        .expect("prune");
    assert_eq!(rest, Some(1_500));
    assert_eq!(count(&env, "true").await, 0);
}

/// `keep_pruned`, the loop a pruner task runs, keeps deleting what becomes due and stops when
/// told.
#[tokio::test]
async fn the_pruner_loop_prunes_until_stopped() {
    let env = TestEnv::new().await;
    insert(
        &env,
        12_000,
        "echo",
        "succeeded",
        "3 hours",
        Some("2 hours"),
    )
    .await;
    let stop = tokio_util::sync::CancellationToken::new();
    let task = {
        let (store, stop) = (env.store.clone(), stop.clone());
        tokio::spawn(async move {
            store
                .keep_pruned(
                    Duration::from_secs(3_600),
                    &[],
                    Duration::from_millis(100),
                    stop,
                )
                .await
        })
    };
    env.wait_until(
        "the backlog to be pruned",
        Duration::from_secs(60),
        || async { (count(&env, "true").await == 0).then_some(()) },
    )
    .await;
    // Due later: found on a later pass, after the pause.
    insert(&env, 10, "echo", "succeeded", "3 hours", Some("2 hours")).await;
    env.wait_until(
        "the new jobs to be pruned",
        Duration::from_secs(60),
        || async { (count(&env, "true").await == 0).then_some(()) },
    )
    .await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("the loop stops when told")
        .expect("task");
}
