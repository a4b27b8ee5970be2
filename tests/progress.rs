//! Long work shows progress. With stderr not a terminal (as here: a pipe or a file), a plain
//! line comes every `APIARY_PROGRESS_INTERVAL`: a replay of many dead jobs, a migration held
//! up on a busy table, and a benchmark's publishing each print them while they run, and the
//! work itself comes out as it would without them. (The terminal bar is indicatif's drawing
//! of the same counts; its format is unit-tested in `src/progress.rs`.)
//!
//! Each run is made to last several intervals by construction, not by luck: the replay goes
//! through a proxy that delays every packet, the migration waits on a lock this test holds,
//! and the benchmark publishes at a fixed rate for a fixed time.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{Proxy, TestEnv};
use tokio::process::Command;

/// The lines of `text` that start with `prefix`, for progress lines of one phase.
fn lines_starting<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.starts_with(prefix)).collect()
}

/// `done/total` from a line like `replay: published 2000/10000 (4000/s, ~2s left)`.
fn count(line: &str, prefix: &str) -> (u64, u64) {
    let rest = line.strip_prefix(prefix).unwrap_or("");
    let frac = rest.split_whitespace().next().unwrap_or("");
    let (a, b) = frac.split_once('/').unwrap_or(("", ""));
    (
        a.parse().unwrap_or_else(|_| panic!("a count in {line:?}")),
        b.parse().unwrap_or_else(|_| panic!("a total in {line:?}")),
    )
}

/// No carriage returns or escape codes: these are lines for a log, not a redrawn bar.
fn assert_plain(stderr: &str) {
    assert!(
        !stderr.contains('\r') && !stderr.contains('\x1b'),
        "terminal codes in non-terminal output:\n{stderr:?}"
    );
}

#[tokio::test]
async fn a_large_replay_prints_periodic_lines_and_replays_every_job() {
    let env = TestEnv::new().await;
    const N: u64 = 10_000;
    sqlx::query(
        "INSERT INTO apiary_jobs (id, kind, payload, max_attempts, status, attempts, error, finished_at)
         SELECT gen_random_uuid(), 'echo', to_json(g), 3, 'dead', 3, 'boom', now()
           FROM generate_series(1, $1::int) g",
    )
    .bind(N as i32)
    .execute(env.store.pool())
    .await
    .expect("dead jobs");
    // Every packet to and from RabbitMQ 50 ms late: each chunk of 1000 publishes waits at
    // least 100 ms for its confirms, so publishing takes at least a second.
    let mq = Proxy::start("127.0.0.1:5672").await;
    mq.latency(Duration::from_millis(50));
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        Command::new(env!("CARGO_BIN_EXE_apiary"))
            .args(["dead", "replay", "--all"])
            .envs(env.envs())
            .env(
                "AMQP_URL",
                format!("amqp://guest:guest@127.0.0.1:{}/%2f", mq.port),
            )
            .env("APIARY_PROGRESS_INTERVAL", "100ms")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("replay finished in time")
    .expect("replay ran");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_plain(&stderr);

    let prefix = "replay: published ";
    let progress = lines_starting(&stderr, prefix);
    let counts: Vec<(u64, u64)> = progress.iter().map(|l| count(l, prefix)).collect();
    assert!(
        counts.iter().filter(|(done, _)| *done > 0).count() >= 2,
        "several lines while publishing:\n{stderr}"
    );
    assert!(counts.iter().all(|(_, total)| *total == N), "{stderr}");
    assert!(
        counts.windows(2).all(|w| w[0].0 <= w[1].0),
        "counts only grow:\n{stderr}"
    );
    assert!(
        progress.iter().any(|l| l.contains("/s")),
        "lines give a rate:\n{stderr}"
    );
    assert!(
        stderr.lines().any(|l| l == format!("replayed {N} job(s)")),
        "{stderr}"
    );

    // The replay itself is whole: every job back in queued, each id printed, each published.
    let ids = String::from_utf8_lossy(&out.stdout);
    assert_eq!(ids.lines().count() as u64, N);
    assert_eq!(env.count(apiary::JobStatus::Queued).await as u64, N);
    assert_eq!(env.count(apiary::JobStatus::Dead).await, 0);
    let work = env.cfg.queue.clone();
    env.wait_until(
        "every replayed job on the work queue",
        Duration::from_secs(20),
        || {
            let work = work.clone();
            let env = &env;
            async move { (u64::from(env.queue_depth(&work).await) == N).then_some(()) }
        },
    )
    .await;
}

#[tokio::test]
async fn a_migration_held_up_shows_which_one_and_for_how_long() {
    let env = TestEnv::new().await;
    let newest = apiary::store::schema::expected_version();
    let name = apiary::store::MIGRATOR
        .iter()
        .find(|m| m.version == newest)
        .map(|m| format!("{newest:04}_{}", m.description.replace(' ', "_")))
        .expect("the newest migration");
    // The database one migration behind, and its tables busy (as a large table under load
    // would keep the migration waiting). The newest migration must be safe to apply again.
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
        .bind(newest)
        .execute(env.store.pool())
        .await
        .expect("forget the newest migration");
    let mut busy = env.store.pool().begin().await.expect("begin");
    // Every table of Apiary's, whichever the newest migration touches.
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE 'apiary%'",
    )
    .fetch_all(&mut *busy)
    .await
    .expect("list tables");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        tables.join(", ")
    )))
    .execute(&mut *busy)
    .await
    .expect("lock the tables");

    let mut migrate = env.spawn(
        &["migrate"],
        &[("APIARY_PROGRESS_INTERVAL", "100ms"), ("RUST_LOG", "warn")],
    );
    let waiting = format!("applying migration 1/1: {name} (");
    let first = migrate
        .wait_for_log(&waiting, Duration::from_secs(60))
        .await;
    assert!(first.ends_with(" elapsed)"), "{first}");
    // Lines keep coming while it waits.
    env.wait_until("a second progress line", Duration::from_secs(30), || {
        let n = lines_starting(&migrate.log_text(), &waiting).len();
        async move { (n >= 2).then_some(()) }
    })
    .await;
    busy.rollback().await.expect("release the table");

    let status = migrate.wait(Duration::from_secs(60)).await;
    let log = migrate.log_text();
    assert!(status.success(), "{log}");
    assert_plain(&log);
    assert!(
        log.lines()
            .any(|l| l.starts_with("applied 1 migration(s) in ")
                && l.ends_with(&format!(": schema {newest}"))),
        "{log}"
    );
    // Nothing left to do the second time.
    let again = env.run(&["migrate"]).await;
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "no migrations to apply: schema {newest} is current"
        )),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_paced_benchmark_prints_periodic_lines_while_it_publishes() {
    // Publishing 200 jobs at 100 a second takes two seconds whatever the machine: at a line
    // every 250 ms, several come before the workers' phase.
    let out = tokio::time::timeout(
        Duration::from_secs(240),
        Command::new(env!("CARGO_BIN_EXE_apiary"))
            .args([
                "bench",
                "--mode",
                "live",
                "--rate",
                "100",
                "--duration",
                "2s",
                "--workers",
                "1",
                // Paced per batch: 20 batches of 10, a tenth of a second apart.
                "--enqueue-batch",
                "10",
                "--progress-interval",
                "250ms",
            ])
            .env("DATABASE_URL", format!("{}/apiary", common::PG_ROOT))
            .env("AMQP_URL", common::AMQP)
            .env("APIARY_WORKER_HTTP_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("bench finished in time")
    .expect("bench ran");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_plain(&stderr);
    let enqueued: Vec<(u64, u64)> = lines_starting(&stderr, "enqueued ")
        .iter()
        .map(|l| count(l, "enqueued "))
        .collect();
    assert!(enqueued.len() >= 3, "lines while publishing:\n{stderr}");
    assert!(enqueued.iter().all(|(_, total)| *total == 200), "{stderr}");
    assert!(
        enqueued.windows(2).all(|w| w[0].0 <= w[1].0),
        "counts only grow:\n{stderr}"
    );
    // The report is whole on stdout, untouched by the progress lines.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("apiary bench: 200 jobs"), "{stdout}");
    assert!(!stdout.contains("enqueued "), "{stdout}");
}

#[tokio::test]
async fn a_replay_cut_off_mid_publish_fails_and_loses_nothing() {
    let env = TestEnv::new().await;
    const N: i64 = 5_000;
    sqlx::query(
        "INSERT INTO apiary_jobs (id, kind, payload, max_attempts, status, attempts, error, finished_at)
         SELECT gen_random_uuid(), 'echo', to_json(g), 3, 'dead', 3, 'boom', now()
           FROM generate_series(1, $1::int) g",
    )
    .bind(N as i32)
    .execute(env.store.pool())
    .await
    .expect("dead jobs");
    // About 1.5 MB of publishes: the connection drops after 400 kB, inside a later chunk than
    // the first, with the replay already committed.
    let mq = Proxy::start("127.0.0.1:5672").await;
    mq.cut_after_bytes(400_000);
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new(env!("CARGO_BIN_EXE_apiary"))
            .args(["dead", "replay", "--all"])
            .envs(env.envs())
            .env(
                "AMQP_URL",
                format!("amqp://guest:guest@127.0.0.1:{}/%2f", mq.port),
            )
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("replay finished in time")
    .expect("replay ran");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        mq.mid_stream_cuts(),
        1,
        "the cut met the publish:\n{stderr}"
    );
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("jobs recorded but not yet published"),
        "{stderr}"
    );
    // All or nothing in Postgres: every job is back in queued.
    assert_eq!(env.count(apiary::JobStatus::Queued).await, N);
    // The outbox relay publishes the rest; each job runs, once.
    let worker = env.start_worker();
    env.wait_until(
        "every replayed job run",
        Duration::from_secs(120),
        || async { (env.count(apiary::JobStatus::Succeeded).await == N).then_some(()) },
    )
    .await;
    worker.stop().await;
    let reruns: i64 = sqlx::query_scalar("SELECT count(*) FROM apiary_jobs WHERE attempts <> 1")
        .fetch_one(env.store.pool())
        .await
        .expect("attempts");
    assert_eq!(reruns, 0, "a job ran more than once");
    env.assert_invariants_quiescent().await;
}
