//! Chaos: several real `apiary worker` processes work through thousands of `tally` and `sleep`
//! jobs while random workers get SIGTERM or SIGKILL and replacements start. Nothing may be
//! lost, no `tally` may apply twice, and every SIGTERMed worker must drain and exit 0 within
//! its drain timeout.
//!
//! Two queues and both kinds of limit are in play: a third of the `tally` jobs go to the
//! `emails` queue, which has a rate limit; the `sleep` jobs carry concurrency keys, at most
//! two running per key. Held jobs must come through the kills like the others, and the limits
//! must hold for the attempts that ran to the end.
//!
//! It also measures how long a killed worker's jobs take to run elsewhere ("pickup"): from the
//! SIGKILL to the `started_at` of the attempt that ran the job next. The broker redelivers the
//! dead worker's messages at once, but the jobs are still `running` under its lease, and
//! another worker may claim them only once that lease has passed. The dead worker's last
//! heartbeat renewed the lease at most a fifth of a lease before the kill, so pickup falls
//! between 4/5 of `APIARY_LEASE` and the lease plus a claim: measured 2.6–3.2 s (median 3.0 s)
//! with the 3 s lease used here, so about 8–10 s with the default 10 s lease. A pickup before
//! the lease ended would mean the worker had stopped renewing a job it held; the run reports
//! any it sees.
//!
//! Sizes come from the environment, with defaults small enough for CI; `scripts/chaos` runs it
//! bigger, in release mode. Every process it starts is killed when the test ends, pass or fail,
//! and its database and queues are removed.
//!
//! | variable        | default | meaning                                         |
//! |-----------------|---------|-------------------------------------------------|
//! | `CHAOS_JOBS`    | 6000    | jobs: about 2/3 `tally`, 1/3 `sleep` (20–400 ms) |
//! | `CHAOS_WORKERS` | 3       | worker processes running at once                |
//! | `CHAOS_ROUNDS`  | 8       | disruptions: 60 % SIGTERM, 40 % SIGKILL         |
//! | `CHAOS_SEED`    | clock   | seed of the run's choices, printed to replay it |

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use apiary::{JobStatus, NewJob};
use chrono::{DateTime, Utc};
use common::{Proc, TestEnv};
use serde_json::json;
use uuid::Uuid;

/// Counters the `tally` jobs spread over.
const COUNTERS: u64 = 8;
/// Must match `APIARY_DRAIN_TIMEOUT` below.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// What a SIGTERMed worker may take beyond its drain timeout: closing connections, exiting.
const DRAIN_MARGIN: Duration = Duration::from_secs(5);
/// How long the jobs may take to finish once the disruptions are over.
const SETTLE: Duration = Duration::from_secs(120);
/// How long no job may finish before the run counts as stuck: a killed worker's jobs wait out
/// a 3 s lease, so anything near this is a job stranded, not a slow one.
const STALL: Duration = Duration::from_secs(30);
const WORKER_ENV: &[(&str, &str)] = &[
    ("APIARY_DRAIN_TIMEOUT", "5s"),
    ("APIARY_QUEUES", "default:16,emails:8"),
    ("APIARY_KINDS", "sleep:max_per_key=2"),
    ("APIARY_QUEUE_OPTIONS", "emails:rate=300/s"),
    ("NO_COLOR", "1"),
];
/// Keys the `sleep` jobs spread over, and how many of a key may run at once.
const KEYS: u64 = 16;
const MAX_PER_KEY: usize = 2;
/// The `emails` queue's rate per second.
const EMAILS_RATE: usize = 300;

#[tokio::test]
async fn chaos_terms_and_kills_lose_nothing_and_apply_nothing_twice() {
    let began = Instant::now();
    let jobs = env_number("CHAOS_JOBS", 6000) as usize;
    let concurrent = env_number("CHAOS_WORKERS", 3).max(1) as usize;
    let rounds = env_number("CHAOS_ROUNDS", 8) as usize;
    let seed = env_number(
        "CHAOS_SEED",
        u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
                % u128::from(u64::MAX),
        )
        .unwrap_or(1),
    );
    eprintln!(
        "chaos: seed {seed} (replay with CHAOS_SEED={seed}), {jobs} jobs, {concurrent} workers, {rounds} rounds"
    );
    let mut rng = XorShift::new(seed);
    let env = TestEnv::with_queues(&[("default", 16), ("emails", 8)]).await;

    // The jobs, kinds interleaved at random so every worker holds both at every moment. A job
    // can be in flight at every kill, and each kill charges it an attempt: give it enough.
    let budget = i32::try_from(rounds + 2).unwrap_or(1000).min(1000);
    let mut want: HashMap<String, i64> = HashMap::new();
    let mut all = Vec::with_capacity(jobs);
    for i in 0..jobs {
        let job = if rng.below(3) == 0 {
            NewJob::new("sleep", json!({"ms": 20 + rng.below(380)}))
                .with_concurrency_key(format!("k{}", rng.below(KEYS)))
        } else {
            let counter = format!("c{}", rng.below(COUNTERS));
            *want.entry(counter.clone()).or_default() += 1;
            let job = NewJob::new("tally", json!({"counter": counter, "by": 1}))
                .with_dedup_key(format!("chaos-{i}"));
            if rng.below(3) == 0 {
                job.with_queue("emails")
            } else {
                job
            }
        };
        all.push(job.with_max_attempts(budget));
    }
    let client = env.client();
    while !all.is_empty() {
        let rest = all.split_off(all.len().min(500));
        client.enqueue_many(all).await.expect("enqueue");
        all = rest;
    }
    let total = i64::try_from(jobs).expect("job count");

    let mut started = 0usize;
    let mut live: Vec<Worker> = Vec::new();
    for _ in 0..concurrent {
        started += 1;
        live.push(Worker::start(&env, started));
    }

    let mut terms: Vec<Term> = Vec::new();
    let mut kills: Vec<Kill> = Vec::new();
    let mut in_flight_at_disruption = Vec::new();
    // Stopped workers, kept so their logs can explain a failure.
    let mut gone: Vec<Worker> = Vec::new();
    for round in 1..=rounds {
        tokio::time::sleep(Duration::from_millis(300 + rng.below(1200))).await;
        for w in &mut live {
            w.assert_alive();
        }
        let in_flight = env.count(JobStatus::Running).await;
        in_flight_at_disruption.push(in_flight);
        let pick = usize::try_from(rng.below(live.len() as u64)).expect("index");
        let mut victim = live.swap_remove(pick);
        // The last round makes up for a kind the dice never chose, so every run has both.
        let term = match (round == rounds, terms.is_empty(), kills.is_empty()) {
            (true, true, false) => true,
            (true, false, true) => false,
            _ => rng.below(100) < 60,
        };
        if term {
            let term = sigterm(&mut victim).await;
            eprintln!(
                "chaos: round {round}: SIGTERM worker #{} ({in_flight} jobs running): exited 0 in {:.2}s, {}",
                term.n,
                term.took.as_secs_f64(),
                match term.summary {
                    Some(s) => format!("{} finished, {} handed back", s.finished, s.handed_back),
                    None => "no summary (stopped before it started)".into(),
                }
            );
            terms.push(term);
        } else {
            let kill = sigkill(&env, &mut victim).await;
            eprintln!(
                "chaos: round {round}: SIGKILL worker #{} ({in_flight} jobs running, {} of them its own)",
                kill.n,
                kill.running.len()
            );
            kills.push(kill);
        }
        gone.push(victim);
        started += 1;
        live.push(Worker::start(&env, started));
    }
    let chaos_over = Instant::now();
    let done_at_chaos_end = env.count(JobStatus::Succeeded).await;

    // Like `env.wait_until`, but it also fails if a worker dies on its own meanwhile, and
    // early if nothing finishes for a while: then something is stranded, and waiting longer
    // only delays the report.
    let deadline = Instant::now() + SETTLE;
    let mut progress = (done_at_chaos_end, Instant::now());
    loop {
        for w in &mut live {
            w.assert_alive();
        }
        let done = env.count(JobStatus::Succeeded).await;
        if done == total {
            break;
        }
        if done > progress.0 {
            progress = (done, Instant::now());
        }
        if Instant::now() >= deadline || progress.1.elapsed() >= STALL {
            eprintln!("{}", stuck_report(&env, live.iter().chain(&gone)).await);
            panic!(
                "{done} of {total} jobs succeeded, none for {:?}, {:?} after the last disruption; by status: {:?}",
                progress.1.elapsed(),
                chaos_over.elapsed(),
                by_status(&env).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let settled = chaos_over.elapsed();

    // The survivors drain too, and must exit 0 like the others.
    let mut final_terms = Vec::new();
    for mut w in live.drain(..) {
        final_terms.push(sigterm(&mut w).await);
        gone.push(w);
    }

    // Nothing lost, nothing twice.
    assert_eq!(
        by_status(&env).await,
        vec![("succeeded".to_string(), total)],
        "every job, and only those, succeeded"
    );
    for (counter, n) in &want {
        assert_eq!(env.tally(counter).await, Some(*n), "counter {counter}");
    }
    let tallied: i64 = sqlx::query_scalar("SELECT coalesce(sum(value), 0)::int8 FROM demo_tally")
        .fetch_one(env.store.pool())
        .await
        .expect("tally sum");
    assert_eq!(
        tallied,
        want.values().sum::<i64>(),
        "no counter moved that no job targets"
    );
    // Every worker has stopped: every message of this world is counted.
    env.assert_invariants_quiescent().await;
    assert_limits_held(&env).await;
    for t in terms.iter().chain(&final_terms) {
        assert!(
            t.took <= DRAIN_TIMEOUT + DRAIN_MARGIN,
            "worker #{} took {:?} to drain",
            t.n,
            t.took
        );
    }

    // Pickup after a kill: the first attempt that started after the kill. A job killed twice
    // was seen running again at the later kill, so every snapshot is a sighting of a start.
    let finals: Vec<(Uuid, DateTime<Utc>, i32, i64)> = sqlx::query_as(
        "SELECT id, started_at, attempts, jsonb_array_length(errors)::int8 FROM apiary_jobs",
    )
    .fetch_all(env.store.pool())
    .await
    .expect("final attempts");
    let mut starts: HashMap<Uuid, Vec<DateTime<Utc>>> = HashMap::new();
    for (id, at, _, _) in &finals {
        starts.entry(*id).or_default().push(*at);
    }
    for k in &kills {
        for (id, at, _) in &k.running {
            starts.entry(*id).or_default().push(*at);
        }
    }
    let mut pickups = Vec::new();
    let mut early = Vec::new();
    let mut finished_by_victim = 0;
    for k in &kills {
        for (id, started, lease) in &k.running {
            // After the kill, and after the attempt it held: a claim the victim sent just
            // before it died can land in Postgres just after.
            let next = starts[id]
                .iter()
                .filter(|at| **at > k.at && *at > started)
                .min();
            match next {
                Some(at) => {
                    // Its lease had already lapsed while its worker was alive: the worker
                    // had stopped renewing it. Not a double run (the finish is fenced), but
                    // a job nobody was working on.
                    if at < lease {
                        early.push(format!(
                            "job {id} on worker #{}: started {started}, lease until {lease}, killed {}, ran again {at}",
                            k.n, k.at
                        ));
                    }
                    pickups.push((*at - k.at).as_seconds_f64())
                }
                // Its commit was already on its way when the process died.
                None => finished_by_victim += 1,
            }
        }
    }
    let retried = finals.iter().filter(|(_, _, a, _)| *a > 1).count();
    let max_attempts = finals.iter().map(|(_, _, a, _)| *a).max().unwrap_or(0);
    let with_errors = finals.iter().filter(|(_, _, _, e)| *e > 0).count();
    let killed_in_flight: usize = kills.iter().map(|k| k.running.len()).sum();

    let mut drains: Vec<f64> = terms.iter().map(|t| t.took.as_secs_f64()).collect();
    let mut final_drains: Vec<f64> = final_terms.iter().map(|t| t.took.as_secs_f64()).collect();
    let handed_back: u64 = terms
        .iter()
        .chain(&final_terms)
        .filter_map(|t| t.summary.map(|s| s.handed_back))
        .sum();
    let busy = in_flight_at_disruption.iter().filter(|n| **n > 0).count();
    eprintln!("chaos figures");
    eprintln!("  seed                     {seed}");
    eprintln!(
        "  jobs                     {jobs} ({} tally over {} counters, {} sleep)",
        want.values().sum::<i64>(),
        want.len(),
        total - want.values().sum::<i64>()
    );
    eprintln!("  workers started          {started} ({concurrent} at a time)");
    eprintln!(
        "  disruptions              {rounds}: {} SIGTERM, {} SIGKILL; {busy} landed with jobs running",
        terms.len(),
        kills.len()
    );
    eprintln!(
        "  done when chaos ended    {done_at_chaos_end}/{total}; the rest took {:.1}s",
        settled.as_secs_f64()
    );
    eprintln!(
        "  drain after SIGTERM      {} (final stops: {})",
        spread(&mut drains),
        spread(&mut final_drains)
    );
    eprintln!("  handed back on drain     {handed_back}");
    eprintln!(
        "  running on killed        {killed_in_flight} jobs ({finished_by_victim} committed by the victim as it died)"
    );
    if pickups.is_empty() {
        eprintln!("  pickup after kill        no in-flight jobs at kill time");
    } else {
        eprintln!(
            "  pickup after kill        {} over {} jobs",
            spread(&mut pickups),
            pickups.len()
        );
    }
    eprintln!("  pickup before lease end  {}", early.len());
    for e in &early {
        eprintln!("    {e}");
    }
    eprintln!("  attempts > 1             {retried} jobs (most attempts: {max_attempts})");
    eprintln!("  jobs with errors         {with_errors}");
    eprintln!(
        "  wall time                {:.1}s",
        began.elapsed().as_secs_f64()
    );
}

/// A worker process this test started, numbered in start order.
struct Worker {
    n: usize,
    proc: Proc,
}

impl Worker {
    fn start(env: &TestEnv, n: usize) -> Worker {
        Worker {
            n,
            proc: env.spawn(&["worker"], WORKER_ENV),
        }
    }

    /// Fails the test if the worker exited without being told to.
    fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.proc.child.try_wait() {
            panic!(
                "worker #{} exited on its own with {status}; log:\n{}",
                self.n,
                self.proc.log_text()
            );
        }
    }

    /// The id it claims jobs under, from its start-up line, once it has logged it.
    fn id(&self) -> Option<Uuid> {
        let log = strip_ansi(&self.proc.log_text());
        let line = log.lines().find(|l| l.contains("worker starting"))?;
        let at = line.find("worker=")? + "worker=".len();
        line.get(at..at + 36)?.parse().ok()
    }

    /// The `worker stopped: ...` line, if it got that far.
    fn summary(&self) -> Option<Summary> {
        let log = strip_ansi(&self.proc.log_text());
        let line = log.lines().find(|l| l.contains("worker stopped: "))?;
        let rest = &line[line.find("worker stopped: ")? + "worker stopped: ".len()..];
        let mut words = rest.split_whitespace();
        let finished = words.next()?.parse().ok()?;
        let handed_back = words.nth(1)?.parse().ok()?;
        Some(Summary {
            finished,
            handed_back,
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Summary {
    finished: u64,
    handed_back: u64,
}

struct Term {
    n: usize,
    took: Duration,
    summary: Option<Summary>,
}

struct Kill {
    n: usize,
    at: DateTime<Utc>,
    /// The jobs it held as it died, with when their attempt on it started and its lease.
    running: Vec<(Uuid, DateTime<Utc>, DateTime<Utc>)>,
}

/// Sends SIGTERM and waits for a clean exit within the drain timeout and margin.
async fn sigterm(w: &mut Worker) -> Term {
    let sent = Instant::now();
    w.proc.signal("TERM");
    let status = w.proc.wait(DRAIN_TIMEOUT + DRAIN_MARGIN).await;
    let took = sent.elapsed();
    assert!(
        status.success(),
        "worker #{} exited with {status} after SIGTERM; log:\n{}",
        w.n,
        w.proc.log_text()
    );
    Term {
        n: w.n,
        took,
        summary: w.summary(),
    }
}

/// Sends SIGKILL and records which jobs the worker held at that instant.
async fn sigkill(env: &TestEnv, w: &mut Worker) -> Kill {
    w.proc.signal("KILL");
    let at = Utc::now();
    let status = w.proc.wait(Duration::from_secs(5)).await;
    assert!(!status.success(), "SIGKILL ends a process with a signal");
    // Read after the kill: a worker logs its id before it consumes, so one that never logged
    // it claimed nothing.
    let id = w.id();
    let running = match id {
        Some(id) => sqlx::query_as(
            "SELECT id, started_at, lease_until FROM apiary_jobs
              WHERE status = 'running' AND worker_id = $1",
        )
        .bind(id)
        .fetch_all(env.store.pool())
        .await
        .expect("running jobs"),
        None => Vec::new(),
    };
    Kill {
        n: w.n,
        at,
        running,
    }
}

/// The jobs that did not succeed, and what every worker's log says about them.
async fn stuck_report<'a>(env: &TestEnv, workers: impl Iterator<Item = &'a Worker>) -> String {
    let logs: Vec<(usize, Option<Uuid>, String)> = workers
        .map(|w| (w.n, w.id(), strip_ansi(&w.proc.log_text())))
        .collect();
    #[derive(sqlx::FromRow)]
    struct Stuck {
        id: Uuid,
        kind: String,
        status: String,
        attempts: i32,
        worker_id: Option<Uuid>,
        started_at: Option<DateTime<Utc>>,
        lease_until: Option<DateTime<Utc>>,
    }
    let stuck: Vec<Stuck> = sqlx::query_as(
        "SELECT id, kind, status, attempts, worker_id, started_at, lease_until FROM apiary_jobs
          WHERE status <> 'succeeded' ORDER BY id LIMIT 10",
    )
    .fetch_all(env.store.pool())
    .await
    .expect("stuck jobs");
    let mut out = format!(
        "chaos: stuck jobs (first 10); {} messages ready in {}; now {}\n",
        env.queue_depth(&env.cfg.queue).await,
        env.cfg.queue,
        Utc::now()
    );
    for j in stuck {
        let holder = logs
            .iter()
            .find(|(_, wid, _)| j.worker_id.is_some() && *wid == j.worker_id)
            .map(|(n, _, _)| format!("#{n}"))
            .unwrap_or_else(|| "-".into());
        out += &format!(
            "  {} {} {} attempts={} worker={holder} started={:?} lease_until={:?}\n",
            j.id, j.kind, j.status, j.attempts, j.started_at, j.lease_until
        );
        let needle = j.id.to_string();
        for (n, _, log) in &logs {
            for line in log.lines().filter(|l| l.contains(&needle)) {
                out += &format!("    #{n}: {line}\n");
            }
        }
    }
    out
}

/// How many jobs are in each status.
async fn by_status(env: &TestEnv) -> Vec<(String, i64)> {
    sqlx::query_as("SELECT status, count(*) FROM apiary_jobs GROUP BY status ORDER BY status")
        .fetch_all(env.store.pool())
        .await
        .expect("statuses")
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

/// The log without its colour codes (`ESC [ ... m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// xorshift64*: small, deterministic for a seed, and plenty for picking victims.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        // Zero is xorshift's one fixed point; mix the seed so nearby seeds diverge at once.
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

/// The limits held for the attempts that ran to the end (an attempt cut off by a kill leaves
/// no interval behind: the next attempt's claim overwrote it): no key ever had more than
/// [`MAX_PER_KEY`] jobs running, and no second of `emails` more than [`EMAILS_RATE`] starts.
async fn assert_limits_held(env: &TestEnv) {
    /// A keyed job's final attempt, to show when a limit did not hold.
    type Run = (String, Uuid, i32, DateTime<Utc>, DateTime<Utc>);
    let detail: Vec<Run> = sqlx::query_as(
        "SELECT concurrency_key, id, attempts, started_at, finished_at FROM apiary_jobs
          WHERE concurrency_key IS NOT NULL ORDER BY started_at",
    )
    .fetch_all(env.store.pool())
    .await
    .expect("keyed jobs");
    let rows: Vec<(String, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT concurrency_key, started_at, finished_at FROM apiary_jobs
          WHERE concurrency_key IS NOT NULL ORDER BY started_at",
    )
    .fetch_all(env.store.pool())
    .await
    .expect("keyed jobs");
    type Runs = Vec<(DateTime<Utc>, DateTime<Utc>)>;
    let mut by_key: HashMap<String, Runs> = HashMap::new();
    for (key, start, end) in rows {
        by_key.entry(key).or_default().push((start, end));
    }
    for (key, runs) in &by_key {
        for (i, (start, _)) in runs.iter().enumerate() {
            let running = runs[..=i].iter().filter(|(_, end)| end > start).count();
            assert!(
                running <= MAX_PER_KEY,
                "key {key}: {running} jobs running at {start}: {:#?}",
                detail
                    .iter()
                    .filter(|d| &d.0 == key && d.3 <= *start && d.4 > *start)
                    .collect::<Vec<_>>()
            );
        }
    }
    let starts: Vec<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT started_at FROM apiary_jobs WHERE queue = 'emails' ORDER BY started_at",
    )
    .fetch_all(env.store.pool())
    .await
    .expect("emails starts");
    for (i, s) in starts.iter().enumerate() {
        let end = *s + chrono::Duration::seconds(1);
        let n = starts[i..].iter().take_while(|t| **t < end).count();
        assert!(
            n <= EMAILS_RATE,
            "{n} emails jobs started in the second from {s}"
        );
    }
    eprintln!(
        "chaos: limits held: {} keys, at most {MAX_PER_KEY} running each; {} emails jobs within {EMAILS_RATE}/s",
        by_key.len(),
        starts.len()
    );
}
