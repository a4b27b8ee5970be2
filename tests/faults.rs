//! Faults on the wire: real `apiary worker` processes, each talking to Postgres and RabbitMQ
//! through fault-injecting proxies of its own ([`common::Proxy`]), while a mixed workload runs.
//! Every fault a network or a server can throw at one process, on each side in turn: a slow
//! link, a hung server (bytes stop, sockets stay open), connections dropped and refused, and
//! connections cut in the middle of a message. Nothing may be lost, nothing may run twice,
//! every process lives on, and every drain ends cleanly and on time, faults or not.
//!
//! The workers run with the test default `APIARY_LEASE=3s` (renewed every 600 ms), so a
//! stall of a few seconds outlives a lease.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use apiary::store::cancel_job::CancelOutcome;
use apiary::{JobStatus, NewJob};
use chrono::{DateTime, Utc};
use common::{Direction, Proc, Proxy, TestEnv};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const PG: &str = "127.0.0.1:5432";
const MQ: &str = "127.0.0.1:5672";
/// Must match `APIARY_DRAIN_TIMEOUT` in [`WORKER_ENV`].
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// What a SIGTERMed worker may take beyond its drain timeout: closing connections, exiting.
const DRAIN_MARGIN: Duration = Duration::from_secs(10);
const WORKER_ENV: &[(&str, &str)] = &[
    ("APIARY_DRAIN_TIMEOUT", "5s"),
    ("APIARY_CONCURRENCY", "16"),
    ("NO_COLOR", "1"),
];

/// Which dependency a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Postgres,
    Rabbit,
}

/// A worker process whose links to Postgres and RabbitMQ each go through a proxy of its own.
struct Node {
    n: usize,
    proc: Proc,
    pg: Proxy,
    mq: Proxy,
}

impl Node {
    async fn start(env: &TestEnv, n: usize, extra: &[(&str, &str)]) -> Node {
        let pg = Proxy::start(PG).await;
        let mq = Proxy::start(MQ).await;
        let db = pg_url(env, &pg);
        let amqp = amqp_url(&mq);
        let mut vars: Vec<(&str, &str)> = vec![("DATABASE_URL", &db), ("AMQP_URL", &amqp)];
        vars.extend_from_slice(extra);
        let proc = env.spawn(&["worker"], &vars);
        Node { n, proc, pg, mq }
    }

    fn proxy(&self, side: Side) -> &Proxy {
        match side {
            Side::Postgres => &self.pg,
            Side::Rabbit => &self.mq,
        }
    }

    /// Fails the test if the worker exited without being told to.
    fn assert_alive(&mut self) {
        assert_alive(&mut self.proc, self.n);
    }
}

fn pg_url(env: &TestEnv, pg: &Proxy) -> String {
    format!("postgres://postgres@127.0.0.1:{}/{}", pg.port, env.name)
}

fn amqp_url(mq: &Proxy) -> String {
    format!("amqp://guest:guest@127.0.0.1:{}/%2f", mq.port)
}

fn assert_alive(proc: &mut Proc, n: usize) {
    if let Ok(Some(status)) = proc.child.try_wait() {
        panic!(
            "worker #{n} exited on its own with {status}; log:\n{}",
            proc.log_text()
        );
    }
}

/// The id a worker claims jobs under, from its start-up line.
async fn worker_id(proc: &Proc) -> Uuid {
    let line = proc
        .wait_for_log("worker starting", Duration::from_secs(30))
        .await;
    let at = line.find("worker=").expect("worker= in the start-up line") + "worker=".len();
    line[at..at + 36].parse().expect("worker id")
}

/// With `FAULTS_KEEP_LOGS=DIR`, copies a worker's log there (logs are otherwise removed with
/// the process), for reading a run after the fact.
fn keep_log(proc: &Proc, name: &str) {
    if let Ok(dir) = std::env::var("FAULTS_KEEP_LOGS") {
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::copy(
            &proc.log,
            std::path::Path::new(&dir).join(format!("{name}.log")),
        );
    }
}

/// Sends SIGTERM and waits for the exit; returns how long it took. Fails on a non-zero exit
/// or no exit within `limit`.
async fn sigterm(proc: &mut Proc, n: usize, limit: Duration) -> Duration {
    let sent = Instant::now();
    proc.signal("TERM");
    let status = wait_exit(proc, n, limit, "SIGTERM").await;
    assert!(
        status.success(),
        "worker #{n} exited with {status} after SIGTERM; log:\n{}",
        proc.log_text()
    );
    sent.elapsed()
}

async fn wait_exit(
    proc: &mut Proc,
    n: usize,
    limit: Duration,
    after: &str,
) -> std::process::ExitStatus {
    match tokio::time::timeout(limit, proc.child.wait()).await {
        Ok(status) => status.expect("wait"),
        Err(_) => panic!(
            "worker #{n} did not exit within {limit:?} of {after}; log:\n{}",
            proc.log_text()
        ),
    }
}

/// The `worker stopped: N finished, M handed back` line's figures, if it got that far.
fn summary(proc: &Proc) -> Option<(u64, u64)> {
    let log = common::strip_ansi(&proc.log_text());
    let line = log.lines().find(|l| l.contains("worker stopped: "))?;
    let rest = &line[line.find("worker stopped: ")? + "worker stopped: ".len()..];
    let mut words = rest.split_whitespace();
    let finished = words.next()?.parse().ok()?;
    let handed_back = words.nth(1)?.parse().ok()?;
    Some((finished, handed_back))
}

async fn by_status(env: &TestEnv) -> Vec<(String, i64)> {
    sqlx::query_as("SELECT status, count(*) FROM apiary_jobs GROUP BY status ORDER BY status")
        .fetch_all(env.store.pool())
        .await
        .expect("statuses")
}

/// Current statuses of `ids`.
async fn statuses(env: &TestEnv, ids: &[Uuid]) -> HashMap<Uuid, String> {
    let rows: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, status FROM apiary_jobs WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(env.store.pool())
            .await
            .expect("statuses");
    rows.into_iter().collect()
}

/// A job's claim, as Postgres has it.
#[derive(Debug, sqlx::FromRow)]
struct ClaimRow {
    id: Uuid,
    status: String,
    attempts: i32,
    worker_id: Option<Uuid>,
    lease_until: Option<DateTime<Utc>>,
    /// `next_attempt_at` or `run_at`; shown in reports (through `Debug`).
    #[allow(dead_code)]
    due: Option<DateTime<Utc>>,
    /// Postgres's clock.
    now: DateTime<Utc>,
}

async fn claims(env: &TestEnv, ids: &[Uuid]) -> Vec<ClaimRow> {
    sqlx::query_as(
        "SELECT id, status, attempts, worker_id, lease_until, coalesce(next_attempt_at, run_at) AS due,
                now() AS now
           FROM apiary_jobs WHERE id = ANY($1) ORDER BY id",
    )
    .bind(ids)
    .fetch_all(env.store.pool())
    .await
    .expect("claims")
}

/// What the broker and the outbox hold for this test's world, for reports on stuck jobs:
/// queue depths with unacknowledged counts, and channels holding unacked messages.
async fn carried_report(env: &TestEnv, ids: &[Uuid]) -> String {
    let mut out = String::new();
    let outbox: Vec<(Uuid, DateTime<Utc>, Option<String>)> = sqlx::query_as(
        "SELECT job_id, created_at, dead_reason FROM apiary_outbox WHERE job_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(env.store.pool())
    .await
    .expect("outbox");
    out += &format!("  outbox rows for them: {outbox:?}\n");
    let queues = tokio::process::Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
            "--no-table-headers",
            "-q",
        ])
        .output()
        .await;
    if let Ok(q) = queues {
        for line in String::from_utf8_lossy(&q.stdout)
            .lines()
            .filter(|l| l.starts_with(&env.cfg.queue))
        {
            out += &format!("  queue (ready, unacked, consumers): {line}\n");
        }
    }
    // The channels consuming this world's work queue, with what each holds unacked.
    let rabbitmqctl = |args: &'static [&'static str]| async move {
        tokio::process::Command::new("rabbitmqctl")
            .args(args)
            .output()
            .await
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let consumers = rabbitmqctl(&[
        "list_consumers",
        "queue_name",
        "channel_pid",
        "--no-table-headers",
        "-q",
    ])
    .await;
    let ours: HashSet<&str> = consumers
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(q, _)| *q == env.cfg.queue)
        .map(|(_, pid)| pid.trim())
        .collect();
    let channels = rabbitmqctl(&[
        "list_channels",
        "pid",
        "name",
        "messages_unacknowledged",
        "--no-table-headers",
        "-q",
    ])
    .await;
    for line in channels.lines() {
        let mut cols = line.split('\t');
        if cols.next().is_some_and(|pid| ours.contains(pid.trim())) {
            out += &format!(
                "  consuming channel (name, unacked): {}\n",
                cols.collect::<Vec<_>>().join(", ")
            );
        }
    }
    out
}

/// `min / median / max` in seconds.
fn spread(xs: &mut [f64]) -> String {
    if xs.is_empty() {
        return "none".into();
    }
    xs.sort_by(f64::total_cmp);
    format!(
        "min {:.2}s / median {:.2}s / max {:.2}s",
        xs[0],
        xs[xs.len() / 2],
        xs[xs.len() - 1]
    )
}

/// What every job of the mixed workload must end as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Tally,
    Scheduled,
    Sleep,
    RetryOnce,
    Permanent,
    Cancelled,
    Poison,
}

impl Kind {
    fn status(self) -> &'static str {
        match self {
            Kind::Tally | Kind::Scheduled | Kind::Sleep | Kind::RetryOnce => "succeeded",
            Kind::Permanent | Kind::Poison => "dead",
            Kind::Cancelled => "cancelled",
        }
    }
}

const COUNTERS: usize = 8;

/// What the producer enqueued.
#[derive(Default)]
struct Produced {
    jobs: Vec<(Uuid, Kind)>,
    tallies: HashMap<String, i64>,
}

/// Enqueues a steady mix, 10 jobs every 100 ms, until `stop` fires: mostly `tally` over a handful of
/// counters, some of them scheduled; `sleep` 300 ms; `fail` once then succeed; `fail` for
/// good; and now and then a scheduled job cancelled while it waits.
async fn produce(client: apiary::Client, stop: CancellationToken) -> Produced {
    let mut out = Produced::default();
    let mut i = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut round = 0usize;
    while !stop.is_cancelled() {
        tick.tick().await;
        round += 1;
        let mut batch = Vec::with_capacity(16);
        let mut kinds = Vec::with_capacity(16);
        for _ in 0..10 {
            i += 1;
            let (kind, job) = match i % 100 {
                0 => (Kind::RetryOnce, NewJob::new("fail", json!({"times": 1}))),
                1 => (
                    Kind::Permanent,
                    NewJob::new("fail", json!({"permanent": true})),
                ),
                2..=4 => (Kind::Sleep, NewJob::new("sleep", json!({"ms": 300}))),
                k => {
                    let counter = format!("c{}", i % COUNTERS);
                    *out.tallies.entry(counter.clone()).or_default() += 1;
                    let mut job = NewJob::new("tally", json!({"counter": counter}))
                        .with_dedup_key(format!("mixed-{i}"));
                    if k < 10 {
                        job.delay_ms = Some(300 + (i as u64 * 37) % 3000);
                        (Kind::Scheduled, job)
                    } else {
                        (Kind::Tally, job)
                    }
                }
            };
            batch.push(job);
            kinds.push(kind);
        }
        let enqueued = client.enqueue_many(batch).await.expect("enqueue");
        out.jobs
            .extend(enqueued.iter().map(|e| e.job.id).zip(kinds));
        if round.is_multiple_of(10) {
            // Waits in a delay tier; cancelled before it is due, so it must never run.
            let mut job = NewJob::new("tally", json!({"counter": "never"}));
            job.delay_ms = Some(1500);
            let id = client.enqueue(job).await.expect("enqueue").job.id;
            let outcome = client.store().cancel_job(id).await.expect("cancel");
            assert_eq!(outcome, CancelOutcome::Cancelled, "job {id}");
            out.jobs.push((id, Kind::Cancelled));
        }
    }
    out
}

/// One fault as injected.
struct Injected {
    side: Side,
    what: String,
    targets: Vec<usize>,
    /// Bytes the targets' proxies forwarded on that side while the fault was on.
    traffic: u64,
    held: Duration,
}

fn side_bytes(nodes: &[Node], targets: &[usize], side: Side) -> u64 {
    targets
        .iter()
        .map(|t| {
            let (up, down) = nodes[*t].proxy(side).bytes();
            up + down
        })
        .sum()
}

/// xorshift64*: deterministic for a seed.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

fn seed() -> u64 {
    match std::env::var("FAULTS_SEED") {
        Ok(v) => v.trim().parse().expect("FAULTS_SEED is a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    }
}

/// Three workers, each behind its own Postgres and RabbitMQ proxies, run a steady mixed
/// workload while every fault hits each side in turn: latency (50–200 ms, all workers),
/// a stall of 2–5 s (one worker), a cut of every connection with new ones refused (one
/// worker), and a cut in the middle of the stream (one worker). Then every job must be in its
/// final state (tally, sleep, retried once, scheduled: succeeded; permanent failure and
/// poison: dead; cancelled: cancelled), every counter exact, the dead-letter queue holding
/// exactly the dead, every worker alive until told to stop and exiting 0 on SIGTERM, and the
/// invariants holding once all is quiet.
#[tokio::test]
async fn a_mixed_workload_survives_every_fault_on_both_sides() {
    let began = Instant::now();
    let seed = seed();
    eprintln!("faults: seed {seed} (replay with FAULTS_SEED={seed})");
    let mut rng = XorShift::new(seed);
    let env = TestEnv::new().await;
    let mut nodes = Vec::new();
    for n in 0..3 {
        nodes.push(Node::start(&env, n, WORKER_ENV).await);
    }
    for node in &nodes {
        worker_id(&node.proc).await;
    }

    let stop = CancellationToken::new();
    let producer = tokio::spawn(produce(env.client(), stop.clone()));
    env.wait_until("work to flow", Duration::from_secs(30), || async {
        (env.count(JobStatus::Succeeded).await >= 50).then_some(())
    })
    .await;

    let poison: Vec<(Option<String>, Vec<u8>)> = (0..12)
        .map(|i| {
            let body = match i % 3 {
                0 => format!("not json #{i}").into_bytes(),
                1 => br#"{"payload": {"no": "kind"}}"#.to_vec(),
                _ => br#"{"kind": "Bad Kind!", "payload": 1}"#.to_vec(),
            };
            (Some(Uuid::new_v4().to_string()), body)
        })
        .collect();

    let faults_began = Instant::now();
    let mut injected: Vec<Injected> = Vec::new();
    let mut target = 0usize;
    for side in [Side::Postgres, Side::Rabbit] {
        // Latency on every worker at once, a different figure on each.
        let lat: Vec<u64> = (0..nodes.len()).map(|_| rng.between(50, 200)).collect();
        let all: Vec<usize> = (0..nodes.len()).collect();
        let before = side_bytes(&nodes, &all, side);
        for (node, ms) in nodes.iter().zip(&lat) {
            node.proxy(side).latency(Duration::from_millis(*ms));
        }
        let held = Duration::from_millis(4000);
        tokio::time::sleep(held).await;
        for node in &nodes {
            node.proxy(side).heal();
        }
        injected.push(Injected {
            side,
            what: format!("latency {lat:?} ms"),
            targets: all.clone(),
            traffic: side_bytes(&nodes, &all, side) - before,
            held,
        });
        settle_gap(&mut nodes).await;

        // A hung server or a partition: bytes stop, sockets stay open. On Postgres, longer
        // than a lease at the top of the range.
        let t = target % nodes.len();
        target += 1;
        let held = Duration::from_millis(rng.between(2000, 5000));
        let p = nodes[t].proxy(side);
        let before = p.bytes();
        p.stall();
        tokio::time::sleep(held).await;
        let during = p.bytes();
        p.heal();
        injected.push(Injected {
            side,
            what: format!("stall {:.1}s", held.as_secs_f64()),
            targets: vec![t],
            traffic: (during.0 + during.1) - (before.0 + before.1),
            held,
        });
        settle_gap(&mut nodes).await;

        // Every connection dropped, new ones refused, then let back in.
        let t = target % nodes.len();
        target += 1;
        let p = nodes[t].proxy(side);
        let dropped = p.dropped();
        let refused = p.refused();
        let held = Duration::from_millis(1500);
        p.cut();
        tokio::time::sleep(held).await;
        p.restore();
        injected.push(Injected {
            side,
            what: format!(
                "cut: {} connections dropped, {} refused",
                p.dropped() - dropped,
                p.refused() - refused
            ),
            targets: vec![t],
            traffic: 0,
            held,
        });
        settle_gap(&mut nodes).await;

        // A cut in the middle of a message (a claim, a commit, a delivery, an ack).
        let t = target % nodes.len();
        target += 1;
        let p = nodes[t].proxy(side);
        let n = rng.between(100, 40_000);
        let fired_before = p.mid_stream_cuts();
        let dropped = p.dropped();
        let armed = Instant::now();
        p.cut_after_bytes(n);
        env.wait_until(
            "the mid-stream cut to fire",
            Duration::from_secs(10),
            || async { (p.mid_stream_cuts() > fired_before).then_some(()) },
        )
        .await;
        injected.push(Injected {
            side,
            what: format!(
                "cut after {n} bytes: {} connections dropped",
                p.dropped() - dropped
            ),
            targets: vec![t],
            traffic: n,
            held: armed.elapsed(),
        });
        settle_gap(&mut nodes).await;

        if side == Side::Postgres {
            env.publish_raw(&poison).await;
        }
    }
    let faults_took = faults_began.elapsed();
    stop.cancel();
    let mut produced = producer.await.expect("producer");
    produced.jobs.extend(poison.iter().map(|(id, _)| {
        (
            id.as_deref().expect("id").parse().expect("uuid"),
            Kind::Poison,
        )
    }));

    // Settle: every job in its final state, the workers alive meanwhile.
    let settle_began = Instant::now();
    let ids: Vec<Uuid> = produced.jobs.iter().map(|(id, _)| *id).collect();
    let want: HashMap<Uuid, Kind> = produced.jobs.iter().copied().collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last_report = Instant::now();
    let mut reported_carriers = false;
    loop {
        for node in &mut nodes {
            node.assert_alive();
        }
        let now = statuses(&env, &ids).await;
        let wrong: Vec<(Uuid, Kind, Option<&String>)> = want
            .iter()
            .filter(|(id, k)| now.get(id).map(String::as_str) != Some(k.status()))
            .map(|(id, k)| (*id, *k, now.get(id)))
            .collect();
        if wrong.is_empty() {
            break;
        }
        for node in &nodes {
            keep_log(&node.proc, &format!("mixed-{}", node.n));
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            let mut line = format!(
                "faults: settling {:.0}s: {} jobs not final yet",
                settle_began.elapsed().as_secs_f64(),
                wrong.len()
            );
            let first: Vec<Uuid> = wrong.iter().take(5).map(|(id, _, _)| *id).collect();
            for row in claims(&env, &first).await {
                line += &format!("\n    {:?}: {row:?}", want[&row.id]);
            }
            if settle_began.elapsed() > Duration::from_secs(15) && !reported_carriers {
                reported_carriers = true;
                line += &format!("\n{}", carried_report(&env, &first).await);
            }
            eprintln!("{line}");
        }
        if Instant::now() >= deadline {
            let mut report = String::new();
            for (id, k, st) in wrong.iter().take(10) {
                let job = env.job(*id).await;
                report += &format!(
                    "  {id} {k:?}: want {}, is {st:?}; attempts {:?}, error {:?}\n",
                    k.status(),
                    job.as_ref().map(|j| j.attempts),
                    job.as_ref().and_then(|j| j.error.clone())
                );
                for node in &nodes {
                    for line in node.proc.log_text().lines() {
                        if line.contains(&id.to_string()) {
                            report += &format!("    #{}: {line}\n", node.n);
                        }
                    }
                }
            }
            panic!(
                "{} of {} jobs not in their final state 60 s after the faults; by status {:?}:\n{report}",
                wrong.len(),
                want.len(),
                by_status(&env).await
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let settled = settle_began.elapsed();

    // Nothing lost, nothing twice.
    for (counter, n) in &produced.tallies {
        assert_eq!(env.tally(counter).await, Some(*n), "counter {counter}");
    }
    assert_eq!(env.tally("never").await, None, "a cancelled job ran");
    let tallied: i64 = sqlx::query_scalar("SELECT coalesce(sum(value), 0)::int8 FROM demo_tally")
        .fetch_one(env.store.pool())
        .await
        .expect("tally sum");
    assert_eq!(tallied, produced.tallies.values().sum::<i64>());
    let retried_once: Vec<(Uuid, i32)> = sqlx::query_as(
        "SELECT id, attempts FROM apiary_jobs WHERE kind = 'fail' AND status = 'succeeded'",
    )
    .fetch_all(env.store.pool())
    .await
    .expect("retried");
    assert!(
        retried_once.iter().all(|(_, a)| *a >= 2),
        "a fail-once job succeeded on its first attempt: {retried_once:?}"
    );
    let poison_ids: HashSet<Uuid> = produced
        .jobs
        .iter()
        .filter(|(_, k)| *k == Kind::Poison)
        .map(|(id, _)| *id)
        .collect();
    for id in &poison_ids {
        let job = env.job(*id).await.expect("poison recorded");
        assert!(
            job.raw_body.is_some() && job.error.as_deref().unwrap_or("").contains("poison"),
            "{job:#?}"
        );
    }
    // Every job the test did not create is accounted for: nothing else was recorded.
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM apiary_jobs")
        .fetch_one(env.store.pool())
        .await
        .expect("count");
    assert_eq!(
        total,
        want.len() as i64,
        "jobs recorded that nobody enqueued"
    );

    // The dead-letter queue holds exactly the dead jobs, once each.
    let dead_ids: HashSet<String> = want
        .iter()
        .filter(|(_, k)| k.status() == "dead")
        .map(|(id, _)| id.to_string())
        .collect();
    let letters = env
        .wait_until("the dead letters", Duration::from_secs(20), || async {
            let l = common::peek_dead_letters(&env.names().dead).await;
            (l.len() >= dead_ids.len()).then_some(l)
        })
        .await;
    let letter_ids: HashSet<String> = letters.iter().filter_map(|(id, _)| id.clone()).collect();
    assert_eq!(letter_ids, dead_ids, "dead letters are the dead jobs");

    // Every worker lived through it all, and drains cleanly.
    let mut drains = Vec::new();
    for node in &mut nodes {
        node.assert_alive();
        drains.push(sigterm(&mut node.proc, node.n, DRAIN_TIMEOUT + DRAIN_MARGIN).await);
    }
    env.assert_invariants_quiescent().await;

    // Figures.
    let mut count: HashMap<Kind, usize> = HashMap::new();
    for k in want.values() {
        *count.entry(*k).or_default() += 1;
    }
    let attempts: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT attempts, count(*) FROM apiary_jobs WHERE kind = 'tally' OR kind = 'sleep'
          GROUP BY attempts ORDER BY attempts",
    )
    .fetch_all(env.store.pool())
    .await
    .expect("attempts");
    let why_again: Vec<(String, i64)> = sqlx::query_as(
        "SELECT coalesce(errors->-1->>'error', '(no error recorded: a lapsed lease claimed again)'), count(*)
           FROM apiary_jobs WHERE attempts > 1 AND kind IN ('tally', 'sleep') GROUP BY 1 ORDER BY 2 DESC",
    )
    .fetch_all(env.store.pool())
    .await
    .expect("why again");
    // What the workers said about it: attempts stopped because their claim was found gone,
    // and jobs only the rescuer brought back (their lease lapsed with no message to carry
    // them).
    let mut claims_lost = 0;
    let mut rescued = 0u64;
    for node in &nodes {
        let log = common::strip_ansi(&node.proc.log_text());
        claims_lost += log.matches("claim lost (the lease lapsed)").count();
        for line in log
            .lines()
            .filter(|l| l.contains("rescued jobs whose lease expired"))
        {
            rescued += line
                .split("jobs=")
                .nth(1)
                .and_then(|n| n.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    eprintln!("faults figures");
    eprintln!(
        "  jobs                 {} ({} tally + {} scheduled tally over {COUNTERS} counters, {} sleep, {} fail-once, {} permanent, {} cancelled, {} poison)",
        want.len(),
        count.get(&Kind::Tally).unwrap_or(&0),
        count.get(&Kind::Scheduled).unwrap_or(&0),
        count.get(&Kind::Sleep).unwrap_or(&0),
        count.get(&Kind::RetryOnce).unwrap_or(&0),
        count.get(&Kind::Permanent).unwrap_or(&0),
        count.get(&Kind::Cancelled).unwrap_or(&0),
        count.get(&Kind::Poison).unwrap_or(&0),
    );
    eprintln!(
        "  faults               {} in {:.1}s",
        injected.len(),
        faults_took.as_secs_f64()
    );
    for f in &injected {
        eprintln!(
            "    {:<8} workers {:?}: {} ({:.1}s, {} bytes through meanwhile)",
            format!("{:?}", f.side),
            f.targets,
            f.what,
            f.held.as_secs_f64(),
            f.traffic
        );
    }
    for node in &nodes {
        eprintln!(
            "  worker #{}            postgres: {} connections, {} dropped; rabbitmq: {} connections, {} dropped",
            node.n,
            node.pg.connections(),
            node.pg.dropped(),
            node.mq.connections(),
            node.mq.dropped()
        );
    }
    eprintln!("  attempts (tally, sleep)  {attempts:?}; second attempts because: {why_again:?}");
    eprintln!(
        "  settled after faults {:.1}s; {rescued} jobs brought back by a rescuer, {claims_lost} attempts stopped as \"claim lost\"",
        settled.as_secs_f64()
    );
    let mut drains: Vec<f64> = drains.iter().map(Duration::as_secs_f64).collect();
    eprintln!("  drain on SIGTERM     {}", spread(&mut drains));
    eprintln!(
        "  wall time            {:.1}s",
        began.elapsed().as_secs_f64()
    );
}

/// Between faults: a moment for the workers to recover, and a check that they all did.
async fn settle_gap(nodes: &mut [Node]) {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for node in nodes {
        node.assert_alive();
    }
}

/// A claim in flight when SIGTERM arrives must not cost its job an attempt.
///
/// Fails intermittently on 628dd24 (main) (about one run in two), not because of the drain, which
/// runs the in-flight claim's jobs and commits them every time, but because on this link no
/// lease renewal ever completes (see [`leases_are_renewed_over_a_slow_postgres_link`]): the
/// batch claimed as the signal arrives is finished more than a lease later, and the worker's
/// own rescuer, seeing its registry row silent, takes the jobs first. With one attempt
/// per job and a 400 ms Postgres link (every claim takes over 800 ms), a stream of `echo` jobs
/// keeps claims on the wire; each of several fresh workers is SIGTERMed while bytes are in
/// flight to or from Postgres. Every job must still succeed (none dead, none "lease expired"),
/// and every worker exits 0.
#[tokio::test]
async fn sigterm_during_an_in_flight_claim_charges_no_attempt() {
    let env = TestEnv::new().await;
    let stop = CancellationToken::new();
    let client = env.client();
    let stop2 = stop.clone();
    let producer = tokio::spawn(async move {
        let mut ids = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut i = 0;
        while !stop2.is_cancelled() {
            tick.tick().await;
            let batch: Vec<NewJob> = (0..5)
                .map(|_| {
                    i += 1;
                    NewJob::new("echo", json!({"n": i})).with_max_attempts(1)
                })
                .collect();
            let done = client.enqueue_many(batch).await.expect("enqueue");
            ids.extend(done.iter().map(|e| e.job.id));
        }
        ids
    });
    let mut rng = XorShift::new(seed());
    let mut rounds = Vec::new();
    for n in 0..4 {
        let pg = Proxy::start(PG).await;
        pg.latency(Duration::from_millis(400));
        let db = pg_url(&env, &pg);
        let mut proc = env.spawn(
            &["worker"],
            &[
                ("DATABASE_URL", &db),
                ("APIARY_MAX_ATTEMPTS", "1"),
                ("APIARY_DRAIN_TIMEOUT", "10s"),
                // A lease several round trips of this link long: the claim in flight at the
                // signal is what is tested, not whether renewals beat a 3 s lease over a
                // 400 ms link on a loaded CI machine (a worker past its lease loses its jobs
                // by design; that is tested elsewhere).
                ("APIARY_LEASE", "8s"),
                ("NO_COLOR", "1"),
            ],
        );
        let id = worker_id(&proc).await;
        // It is working: it has claimed at least one job (a finished job keeps no worker id,
        // so look at the log's settle lines instead: count successes since it started).
        let base = env.count(JobStatus::Succeeded).await;
        env.wait_until(
            "the worker to finish something",
            Duration::from_secs(30),
            || async { (env.count(JobStatus::Succeeded).await > base).then_some(()) },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(rng.between(0, 800))).await;
        // Signal while a statement is on the wire.
        let on_wire = env
            .wait_until(
                "a statement on the wire",
                Duration::from_secs(5),
                || async {
                    let f = pg.in_flight();
                    (f > 0).then_some(f)
                },
            )
            .await;
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM apiary_jobs WHERE status = 'running' AND worker_id = $1",
        )
        .bind(id)
        .fetch_one(env.store.pool())
        .await
        .expect("running");
        let took = sigterm(&mut proc, n, Duration::from_secs(30)).await;
        rounds.push((on_wire, running, took, summary(&proc), proc));
    }
    stop.cancel();
    let ids = producer.await.expect("producer");
    // A healthy worker takes what is left.
    let mut last = env.spawn(&["worker"], &[("NO_COLOR", "1")]);
    env.wait_until("every job to end", Duration::from_secs(60), || async {
        let done: i64 =
            sqlx::query_scalar("SELECT count(*) FROM apiary_jobs WHERE finished_at IS NOT NULL")
                .fetch_one(env.store.pool())
                .await
                .expect("count");
        (done == ids.len() as i64).then_some(())
    })
    .await;
    sigterm(&mut last, 9, Duration::from_secs(30)).await;
    let dead: Vec<(Uuid, Option<String>)> =
        sqlx::query_as("SELECT id, error FROM apiary_jobs WHERE status <> 'succeeded' ORDER BY id")
            .fetch_all(env.store.pool())
            .await
            .expect("dead");
    eprintln!("drain with claims in flight: {} jobs", ids.len());
    for (n, (on_wire, running, took, summary, proc)) in rounds.iter().enumerate() {
        let log = common::strip_ansi(&proc.log_text());
        let rescues: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("rescued jobs whose lease expired"))
            .filter_map(|l| l.split("jobs=").nth(1))
            .collect();
        eprintln!(
            "  worker #{n}: SIGTERM with {on_wire} bytes on the wire and {running} jobs running; exited 0 in {:.2}s; {summary:?} (finished, handed back); {} lease renewals abandoned; rescues it ran (jobs): {rescues:?}",
            took.as_secs_f64(),
            log.matches("lease renewal took longer").count()
        );
    }
    if !dead.is_empty() {
        let mut report = String::new();
        for (id, error) in dead.iter().take(10) {
            report += &format!("  {id}: {error:?}\n");
            for (n, (.., proc)) in rounds.iter().enumerate() {
                for line in proc.log_text().lines() {
                    if line.contains(&id.to_string()) {
                        report += &format!("    #{n}: {line}\n");
                    }
                }
            }
        }
        panic!(
            "{} of {} jobs did not succeed (by status {:?}):\n{report}",
            dead.len(),
            ids.len(),
            by_status(&env).await
        );
    }
    env.assert_invariants_quiescent().await;
}

/// A drain while Postgres hangs (bytes stop, the sockets stay open) still ends: a second
/// SIGTERM within ~10 s, or one SIGTERM within the drain timeout plus ~10 s. The jobs it
/// held are not lost: once Postgres is back, another worker runs them after their leases
/// lapse.
async fn drain_with_postgres_stalled(second_signal: bool) {
    let env = TestEnv::new().await;
    let pg = Proxy::start(PG).await;
    let db = pg_url(&env, &pg);
    let drain = if second_signal { "25s" } else { "3s" };
    let mut proc = env.spawn(
        &["worker"],
        &[
            ("DATABASE_URL", &db),
            ("APIARY_DRAIN_TIMEOUT", drain),
            ("NO_COLOR", "1"),
        ],
    );
    let id = worker_id(&proc).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            env.enqueue(NewJob::new("sleep", json!({"ms": 60000})))
                .await,
        );
    }
    env.wait_until("the jobs to run", Duration::from_secs(30), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM apiary_jobs WHERE status = 'running' AND worker_id = $1",
        )
        .bind(id)
        .fetch_one(env.store.pool())
        .await
        .expect("count");
        (n == 3).then_some(())
    })
    .await;
    pg.stall();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let first = Instant::now();
    proc.signal("TERM");
    let (status, took, limit) = if second_signal {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let second = Instant::now();
        proc.signal("TERM");
        let limit = Duration::from_secs(10);
        let status = wait_exit(
            &mut proc,
            0,
            limit + Duration::from_secs(20),
            "the second SIGTERM",
        )
        .await;
        (status, second.elapsed(), limit)
    } else {
        let limit = Duration::from_secs(3 + 10);
        let status = wait_exit(&mut proc, 0, limit + Duration::from_secs(20), "SIGTERM").await;
        (status, first.elapsed(), limit)
    };
    let in_flight = pg.in_flight();
    eprintln!(
        "drain with postgres stalled ({}): exited with {status} {:.2}s after the {} signal ({} bytes held in the stalled proxy)",
        if second_signal {
            "two signals"
        } else {
            "one signal, APIARY_DRAIN_TIMEOUT=3s"
        },
        took.as_secs_f64(),
        if second_signal { "second" } else { "first" },
        in_flight
    );
    assert!(
        took <= limit,
        "the worker took {took:?} to exit (limit {limit:?}); log:\n{}",
        proc.log_text()
    );
    assert!(status.success(), "exit {status}; log:\n{}", proc.log_text());

    // Postgres back: another worker runs the jobs once their leases lapse.
    pg.heal();
    let restored = Instant::now();
    let mut other = env.spawn(&["worker"], &[("NO_COLOR", "1")]);
    for id in &ids {
        let job = env
            .wait_for_status(*id, JobStatus::Succeeded, Duration::from_secs(100))
            .await;
        assert!(job.attempts <= 2, "{job:#?}");
    }
    eprintln!(
        "  the jobs ran again elsewhere and succeeded {:.1}s after postgres came back",
        restored.elapsed().as_secs_f64()
    );
    sigterm(&mut other, 1, Duration::from_secs(30)).await;
    env.assert_invariants_quiescent().await;
}

#[tokio::test]
async fn a_second_sigterm_ends_a_drain_stuck_on_a_stalled_postgres() {
    drain_with_postgres_stalled(true).await;
}

#[tokio::test]
async fn the_drain_timeout_bounds_a_drain_stuck_on_a_stalled_postgres() {
    drain_with_postgres_stalled(false).await;
}

/// A broker that stops reading (a memory alarm blocks publishers' sockets), or hangs
/// altogether, for longer than a lease: leases need only Postgres, so the worker keeps
/// renewing them, no other worker takes its jobs, and no job runs twice.
#[tokio::test]
async fn leases_outlive_a_stalled_rabbitmq() {
    let env = TestEnv::new().await;
    let mut w1 = Node::start(&env, 1, &[("NO_COLOR", "1")]).await;
    let w1_id = worker_id(&w1.proc).await;
    let mut rounds = Vec::new();
    for (round, dir) in [Some(Direction::ToUpstream), None].into_iter().enumerate() {
        let counter = format!("x{round}");
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.push(
                env.enqueue(NewJob::new(
                    "tally",
                    json!({"counter": counter, "ms": 8000}),
                ))
                .await,
            );
        }
        env.wait_until("w1 to run the jobs", Duration::from_secs(20), || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM apiary_jobs WHERE status = 'running' AND worker_id = $1 AND id = ANY($2)",
            )
            .bind(w1_id)
            .bind(&ids)
            .fetch_one(env.store.pool())
            .await
            .expect("count");
            (n == 4).then_some(())
        })
        .await;
        // A healthy worker, ready to take any job whose lease lapses.
        let mut w2 = env.spawn(&["worker"], &[("NO_COLOR", "1")]);
        worker_id(&w2).await;
        match dir {
            Some(d) => w1.mq.stall_direction(d),
            None => w1.mq.stall(),
        }
        let stalled = Instant::now();
        // Watch the leases through the stall: they must stay w1's and never lapse.
        let mut tightest = f64::MAX;
        while stalled.elapsed() < Duration::from_secs(5) {
            for ClaimRow {
                status,
                worker_id: worker,
                attempts,
                lease_until: lease,
                now,
                ..
            } in claims(&env, &ids).await
            {
                if status != "running" {
                    continue;
                }
                assert_eq!(worker, Some(w1_id), "another worker took a job");
                assert_eq!(attempts, 1, "a job started again");
                let left = (lease.expect("lease") - now).as_seconds_f64();
                tightest = tightest.min(left);
                assert!(
                    left > 0.0,
                    "a lease lapsed while its worker was alive ({left:.2}s); log:\n{}",
                    w1.proc.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        w1.mq.heal();
        for id in &ids {
            let job = env
                .wait_for_status(*id, JobStatus::Succeeded, Duration::from_secs(30))
                .await;
            assert_eq!(job.attempts, 1, "{job:#?}");
        }
        assert_eq!(env.tally(&counter).await, Some(4), "counter {counter}");
        w1.assert_alive();
        // Stopped, so the next round's jobs go to w1 alone.
        sigterm(&mut w2, 2, Duration::from_secs(30)).await;
        rounds.push((dir, tightest));
    }
    for (dir, tightest) in &rounds {
        eprintln!(
            "rabbitmq stalled ({}) for 5s: leases kept, closest to lapsing {tightest:.2}s before",
            match dir {
                Some(_) => "broker stops reading",
                None => "both ways",
            }
        );
    }
    sigterm(&mut w1.proc, 1, Duration::from_secs(30)).await;
    env.assert_invariants_quiescent().await;
}

/// PRODUCT BUG (fails on 628dd24 (main)): a worker on a slow Postgres link never renews a lease.
/// Each heartbeat's renewal is abandoned after lease/5 (600 ms here), the registry beat too,
/// and on a link with 150 ms each way a renewal needs longer than that (a connection to open,
/// a statement to prepare, one to run). So a live worker's leases lapse 3 s after each
/// claim; its own rescuer soon counts it as gone (its registry row is silent) and takes its
/// running jobs away, charging the attempt: with one attempt each they die "lease expired"
/// while the handler is still running them. A renewal that cannot finish within a heartbeat
/// is still worth finishing within the lease.
#[tokio::test]
async fn leases_are_renewed_over_a_slow_postgres_link() {
    let env = TestEnv::new().await;
    // One way; `FAULTS_SLOW_LINK_MS` to try another figure.
    let one_way: u64 = std::env::var("FAULTS_SLOW_LINK_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    let pg = Proxy::start(PG).await;
    pg.latency(Duration::from_millis(one_way));
    let db = pg_url(&env, &pg);
    let mut proc = env.spawn(&["worker"], &[("DATABASE_URL", &db), ("NO_COLOR", "1")]);
    let id = worker_id(&proc).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(
            env.enqueue(
                NewJob::new("tally", json!({"counter": "slow", "ms": 8000})).with_max_attempts(1),
            )
            .await,
        );
    }
    env.wait_until("the jobs to run", Duration::from_secs(30), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM apiary_jobs WHERE status = 'running' AND worker_id = $1",
        )
        .bind(id)
        .fetch_one(env.store.pool())
        .await
        .expect("count");
        (n == 4).then_some(())
    })
    .await;
    // Watch the leases while the handlers run: a live worker's lease must never lapse. Once
    // one has, a healthy second worker starts, as one would in production at any moment: its
    // first rescue pass looks at every running job.
    let mut lapsed: HashMap<Uuid, f64> = HashMap::new();
    let mut other: Option<Proc> = None;
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(7) {
        for ClaimRow {
            id: job,
            status,
            lease_until: lease,
            now,
            ..
        } in claims(&env, &ids).await
        {
            if let (true, Some(lease)) = (status == "running", lease)
                && lease < now
            {
                lapsed.entry(job).or_insert((now - lease).as_seconds_f64());
            }
        }
        if !lapsed.is_empty() && other.is_none() {
            other = Some(env.spawn(&["worker"], &[("NO_COLOR", "1")]));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut ends = Vec::new();
    for job in &ids {
        let j = env
            .wait_until("the job to end", Duration::from_secs(30), || async {
                env.job(*job).await.filter(|j| j.finished_at.is_some())
            })
            .await;
        ends.push((j.status().as_str().to_string(), j.attempts, j.error));
    }
    let log = common::strip_ansi(&proc.log_text());
    let slow_renewals = log.matches("lease renewal took longer").count();
    let rescued = log.lines().filter(|l| l.contains("rescued jobs")).count();
    eprintln!(
        "slow postgres link ({one_way} ms each way): {} of 4 leases lapsed under a live worker; {slow_renewals} renewals abandoned, {rescued} rescue passes; outcomes {ends:?}",
        lapsed.len()
    );
    sigterm(&mut proc, 0, Duration::from_secs(40)).await;
    if let Some(mut other) = other {
        sigterm(&mut other, 1, Duration::from_secs(40)).await;
    }
    assert!(
        lapsed.is_empty() && ends.iter().all(|(s, a, _)| s == "succeeded" && *a == 1),
        "leases lapsed under a live worker on a slow link: {lapsed:?}; outcomes {ends:?}"
    );
    assert_eq!(env.tally("slow").await, Some(4));
}

/// PRODUCT BUG (fails on 628dd24 (main)): a claim whose answer is lost strands its job. The claim
/// statement commits in Postgres, then the connection dies before the answer reaches the
/// worker (a reset, a proxy or pooler restart). The worker retries the claim, finds the job
/// `running` under its own id, takes that for another live worker's claim
/// ([`Claim::Busy`] in `executor::dispatch`) and acks the message unrun. Nobody runs the job
/// and nobody renews its lease; no message is left, so only the full rescue pass (once a
/// minute) puts it back, charging an attempt that never started: with one attempt, the job
/// dies without ever having run.
#[tokio::test]
async fn a_claim_whose_answer_is_lost_does_not_strand_its_job() {
    let env = TestEnv::new().await;
    let pg = Proxy::start(PG).await;
    let db = pg_url(&env, &pg);
    let mut proc = env.spawn(
        &["worker"],
        &[
            ("DATABASE_URL", &db),
            ("APIARY_CONCURRENCY", "1"),
            ("NO_COLOR", "1"),
        ],
    );
    let id = worker_id(&proc).await;
    // Warm the worker's connections up, so the claim below runs on one that has its statement
    // prepared already and needs no answer before the statement executes.
    for i in 0..3 {
        let job = env
            .enqueue(
                NewJob::new("tally", json!({"counter": "warm"})).with_dedup_key(format!("w{i}")),
            )
            .await;
        env.wait_for_status(job, JobStatus::Succeeded, Duration::from_secs(30))
            .await;
    }
    // The claim reaches Postgres and commits; its answer never comes back (the connection is
    // cut while the answer waits in the proxy). The claim binds the job's id, 16 raw bytes.
    let job = Uuid::now_v7();
    pg.lose_answer_to(job.as_bytes());
    env.enqueue(
        NewJob::new("tally", json!({"counter": "lost"}))
            .with_id(job)
            .with_max_attempts(1),
    )
    .await;
    let claimed = env
        .wait_until("the claim to commit", Duration::from_secs(10), || async {
            let worker: Option<Option<Uuid>> = sqlx::query_scalar(
                "SELECT worker_id FROM apiary_jobs WHERE id = $1 AND status = 'running'",
            )
            .bind(job)
            .fetch_optional(env.store.pool())
            .await
            .expect("job");
            worker
        })
        .await;
    assert_eq!(claimed, Some(id));
    assert_eq!(pg.answers_lost(), 1, "the claim's answer was held");
    let held = pg.in_flight();
    pg.cut();
    pg.heal();
    let cut_at = Instant::now();
    // The worker is alive and healthy again: the job must run within about a lease.
    let outcome = env
        .wait_until("the job to end", Duration::from_secs(75), || async {
            env.job(job).await.filter(|j| j.finished_at.is_some())
        })
        .await;
    let took = cut_at.elapsed();
    eprintln!(
        "lost claim answer ({held} bytes held): the job ended {} after {:.1}s, attempts {}, error {:?}",
        outcome.status().as_str(),
        took.as_secs_f64(),
        outcome.attempts,
        outcome.error
    );
    assert_alive(&mut proc, 0);
    sigterm(&mut proc, 0, Duration::from_secs(30)).await;
    keep_log(&proc, "lost-claim-answer");
    assert!(
        outcome.status() == JobStatus::Succeeded && took < Duration::from_secs(15),
        "a job whose claim answer was lost ended {} after {took:?} ({:?}); it never ran",
        outcome.status().as_str(),
        outcome.error
    );
    assert_eq!(env.tally("lost").await, Some(1));
}

/// PRODUCT BUG (fails on 628dd24 (main)), minor: a worker reports "claim lost (the lease
/// lapsed)" for attempts its own completer has just ended as a retry. Between the commit of a
/// `retrying` outcome and the moment the completer forgets the attempt (after publishing the
/// retry and its confirm), a heartbeat's renewal reads the job as no longer `running` and
/// counts the claim as lost: it fires the attempt's token and logs the warning. main counts
/// a finished job as held, but a retrying (or handed back) one is not finished. Harmless to
/// the job; misleading for whoever reads the log during an incident (the mixed workload logs
/// ~30 per run, every one of them followed by the same worker's own "retrying").
#[tokio::test]
async fn a_worker_does_not_report_its_own_retries_as_lost_claims() {
    let env = TestEnv::new().await;
    let mq = Proxy::start(MQ).await;
    // A slow broker link widens the gap between the retry's commit and its confirm.
    mq.latency(Duration::from_millis(150));
    let amqp = amqp_url(&mq);
    let mut proc = env.spawn(&["worker"], &[("AMQP_URL", &amqp), ("NO_COLOR", "1")]);
    worker_id(&proc).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(env.enqueue(NewJob::new("fail", json!({"times": 1}))).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in &ids {
        env.wait_for_status(*id, JobStatus::Succeeded, Duration::from_secs(30))
            .await;
    }
    let log = common::strip_ansi(&proc.log_text());
    let lost: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("claim lost (the lease lapsed)"))
        .collect();
    eprintln!(
        "own retries reported as lost claims: {} of {} retried attempts",
        lost.len(),
        ids.len()
    );
    sigterm(&mut proc, 0, Duration::from_secs(30)).await;
    assert!(
        lost.is_empty(),
        "a live, healthy worker reported {} lost claims for its own retries:\n{}",
        lost.len(),
        lost.join("\n")
    );
}
