//! Servers dying under real traffic: a RabbitMQ cluster node killed with `kill -9` (twice, the
//! work queue's leader first) while an API and three workers run thousands of jobs through
//! quorum queues, and a private Postgres stopped for 10 s and started again. Nothing may be
//! lost, no `tally` may apply twice, no job may stay `running`, and every process must come
//! through on its own: still alive, still consuming, the invariants intact.
//!
//! Each test starts heavy private servers (`scripts/rabbitmq-cluster`: three RabbitMQ nodes;
//! `scripts/pg-private`: a Postgres), so they run one after the other (`SERIAL`), each bounded
//! by [`BUDGET`], and stop and remove what they started when they end, pass or fail (a guard
//! runs the script's stop synchronously in its `Drop`; when a test fails, the servers' logs
//! are copied first, and it says where). The cluster test takes 1.5–2.5 minutes (up to 3.5
//! with other builds beside it), the Postgres one about 1 minute, on a 2-core VM. They print
//! their timings (`cluster:` lines on stderr; run with `--nocapture` to see them as they come).
//!
//! The cluster test found a real loss, now covered: jobs waiting in a quorum delay tier when
//! a node dies could stay `queued`/`retrying` with no message anywhere (RabbitMQ 3.10 drops
//! some of what a tier is dead-lettering across its leader's failover). Workers now publish
//! such jobs again once their queue holds nothing ready or delayed for 3 leases
//! (`tests/lost_messages.rs`). When a run stalls it prints which jobs, whether they were
//! delayed, what every queue holds and each process's lines about them (run the workers with
//! `TEST_WORKER_LOG=info,apiary::worker::claim=debug` and `KEEP_LOGS=1` for every delivery
//! a worker acked unrun or sent on to a delay tier).
//!
//! The producer retries every enqueue and cancel that fails during an outage with the same
//! dedup key, as the documented contract says, and counts those retries.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use apiary::broker::topology::QueueType;
use apiary::{JobId, NewJob};
use chrono::{DateTime, Utc};
use common::{Proc, TestEnv};
use serde_json::{Value, json};
use uuid::Uuid;

/// The servers these tests start are heavy: one test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The most a test may take, servers started and stopped included.
const BUDGET: Duration = Duration::from_secs(230);
/// How long every job may take to be final once the faults are over.
const SETTLE: Duration = Duration::from_secs(90);
const T: Duration = Duration::from_secs(30);
/// Jobs in the mixed workload, duplicates not counted.
const JOBS: usize = 3000;
/// Jobs per producer round; one round about every [`PACE`].
const CHUNK: usize = 100;
const PACE: Duration = Duration::from_millis(1200);
const WORKER_ENV: &[(&str, &str)] = &[("APIARY_CONCURRENCY", "16"), ("NO_COLOR", "1")];
/// The tally counters the plain tally jobs spread over.
const COUNTERS: usize = 8;

const CLUSTER_NAME: &str = "apiary-faulttests";
const CLUSTER_BASE_PORT: u16 = 5781;
const PG_PORT: u16 = 5451;

fn script(name: &str) -> String {
    format!("{}/scripts/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Runs `scripts/NAME ARGS...` and returns its stdout, failing the test with its stderr if it
/// fails.
async fn run_script(name: &str, args: &[&str]) -> String {
    let out = tokio::process::Command::new(script(name))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("scripts/{name}: {e}"));
    assert!(
        out.status.success(),
        "scripts/{name} {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs `scripts/NAME ARGS...`; its stdout if it succeeded.
async fn try_script(name: &str, args: &[&str]) -> Option<String> {
    let out = tokio::process::Command::new(script(name))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Runs a script's clean-up command when dropped, synchronously, however the test ends.
struct Teardown {
    name: &'static str,
    args: Vec<String>,
    /// The servers' state directory: when the test fails, its `*.log` files are copied to
    /// `${TMPDIR:-/tmp}/apiary-cluster-failure-PID/` first, to explain the failure.
    logs: Option<std::path::PathBuf>,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = &self.logs
        {
            let keep =
                std::env::temp_dir().join(format!("apiary-cluster-failure-{}", std::process::id()));
            let _ = std::fs::create_dir_all(&keep);
            let _ = std::process::Command::new("sh")
                .arg("-c")
                .arg(r#"find "$1" -name '*.log' -exec cp --parents {} "$2" \;"#)
                .args(["sh", &dir.to_string_lossy(), &keep.to_string_lossy()])
                .status();
            eprintln!("cluster: the servers' logs are in {}", keep.display());
        }
        let _ = std::process::Command::new(script(self.name))
            .args(&self.args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status();
    }
}

/// What one planned job is and what it must end as.
#[derive(Clone)]
struct Plan {
    job: NewJob,
    /// Through `POST /v1/jobs` rather than the client.
    via_api: bool,
    /// The counter it adds 1 to when it succeeds.
    counter: Option<String>,
    /// Due this long after it is enqueued.
    delay: Option<Duration>,
    /// Cancelled this long after it is enqueued.
    cancel_after: Option<Duration>,
    /// Enqueued a second time, a few rounds later, with the same dedup key.
    duplicate: bool,
}

/// The mixed workload: mostly `tally` with dedup keys, some `fail` that succeed on their
/// second or third attempt, some delayed tallies, some long `sleep`s, some of the last two
/// cancelled. Every job has a dedup key, so every retry of an enqueue is safe.
fn plans(prefix: &str) -> Vec<Plan> {
    (0..JOBS)
        .map(|i| {
            let key = format!("{prefix}-{i}");
            let mut p = match i % 20 {
                0 => Plan {
                    job: NewJob::new("sleep", json!({"ms": 2000 + (i * 37) % 3000})),
                    via_api: false,
                    counter: None,
                    delay: None,
                    // Half of them cancelled, most while running.
                    cancel_after: (i % 40 == 0).then_some(Duration::from_millis(1500)),
                    duplicate: false,
                },
                1 | 2 => Plan {
                    job: NewJob::new("fail", json!({"times": 1 + i % 2})),
                    via_api: false,
                    counter: None,
                    delay: None,
                    cancel_after: None,
                    duplicate: false,
                },
                3 | 4 => {
                    // A third of the delayed ones cancelled long before they are due; each has
                    // a counter of its own, so the test sees whether it ran.
                    let cancelled = i % 20 == 3 && (i / 20) % 3 == 0;
                    let counter = if cancelled {
                        format!("x{i}")
                    } else {
                        format!("d{}", i % 4)
                    };
                    Plan {
                        job: NewJob::new("tally", json!({"counter": counter})),
                        via_api: false,
                        counter: Some(counter),
                        delay: Some(Duration::from_millis(3000 + (i as u64 * 53) % 3000)),
                        cancel_after: cancelled.then_some(Duration::ZERO),
                        duplicate: false,
                    }
                }
                _ => {
                    let counter = format!("c{}", i % COUNTERS);
                    Plan {
                        job: NewJob::new("tally", json!({"counter": counter})),
                        via_api: i % 10 == 5,
                        counter: Some(counter),
                        delay: None,
                        cancel_after: None,
                        duplicate: i % 20 == 7,
                    }
                }
            };
            p.job = p.job.with_dedup_key(key).with_max_attempts(25);
            p
        })
        .collect()
}

/// What happened to one planned job at enqueue and cancel time.
#[derive(Clone, Debug)]
struct Outcome {
    id: JobId,
    run_at: Option<DateTime<Utc>>,
    /// The status a cancel's answer says the job must end in: `cancelled` for 200 and 202,
    /// the status a 409 names for a job that had already finished.
    cancel: Option<String>,
}

/// The test's side of a world: the API's address, the client, and counts of retries.
struct Producer {
    env_client: apiary::Client,
    http: reqwest::Client,
    api: String,
    enqueue_retries: std::sync::atomic::AtomicU64,
    cancel_retries: std::sync::atomic::AtomicU64,
    errors: std::sync::Mutex<HashMap<String, u64>>,
}

impl Producer {
    fn note(&self, what: String) {
        let what: String = what.chars().take(120).collect();
        if let Ok(mut e) = self.errors.lock() {
            *e.entry(what).or_default() += 1;
        }
    }

    /// Enqueues `jobs` through the client, again and again with the same dedup keys until
    /// the store takes them.
    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Vec<JobId> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.env_client.enqueue_many(jobs.clone()).await {
                Ok(done) => return done.into_iter().map(|e| e.job.id).collect(),
                Err(e) => {
                    assert!(Instant::now() < deadline, "enqueue kept failing: {e}");
                    self.enqueue_retries
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.note(format!("client: {e}"));
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }

    /// `POST /v1/jobs` until it answers 200 or 202 (retrying 5xx and transport errors).
    async fn post(&self, job: &NewJob) -> JobId {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let answer = self
                .http
                .post(format!("{}/v1/jobs", self.api))
                .json(job)
                .timeout(Duration::from_secs(20))
                .send()
                .await;
            let retry = match answer {
                Ok(r) if r.status().as_u16() == 200 || r.status().as_u16() == 202 => {
                    let body: Value = r.json().await.expect("json");
                    return body["id"]
                        .as_str()
                        .and_then(|s| s.parse::<Uuid>().ok())
                        .expect("an id");
                }
                Ok(r) if r.status().is_server_error() => {
                    format!("api {}: {}", r.status(), r.text().await.unwrap_or_default())
                }
                Ok(r) => panic!("POST /v1/jobs: {} {:?}", r.status(), r.text().await),
                Err(e) => format!("api: {e}"),
            };
            assert!(Instant::now() < deadline, "POST kept failing: {retry}");
            self.enqueue_retries
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.note(retry);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `POST /v1/jobs/{id}/cancel` until it answers; returns the status the job must end in.
    async fn cancel(&self, id: JobId) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let answer = self
                .http
                .post(format!("{}/v1/jobs/{id}/cancel", self.api))
                .timeout(Duration::from_secs(20))
                .send()
                .await;
            let retry = match answer {
                Ok(r) if r.status().as_u16() == 200 || r.status().as_u16() == 202 => {
                    return "cancelled".into();
                }
                Ok(r) if r.status().as_u16() == 409 => {
                    // "job ... has already finished (succeeded); nothing to cancel"
                    let body: Value = r.json().await.expect("json");
                    let msg = body["error"].as_str().unwrap_or_default().to_string();
                    let status = msg
                        .split('(')
                        .nth(1)
                        .and_then(|s| s.split(')').next())
                        .unwrap_or_else(|| panic!("a status in {msg:?}"));
                    return status.to_string();
                }
                Ok(r) if r.status().is_server_error() => format!("cancel: api {}", r.status()),
                Ok(r) => panic!("cancel {id}: {} {:?}", r.status(), r.text().await),
                Err(e) => format!("cancel: {e}"),
            };
            assert!(Instant::now() < deadline, "cancel kept failing: {retry}");
            self.cancel_retries
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.note(retry);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Enqueues the whole plan, [`CHUNK`] jobs a round, rounds [`PACE`] apart, so the work
    /// goes on through the faults. Duplicates go again three rounds after their first time
    /// and must get the same job back.
    async fn produce(&self, plans: &[Plan]) -> Vec<Outcome> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; plans.len()];
        let mut cancels = Vec::new();
        let chunks: Vec<Vec<usize>> = (0..plans.len())
            .collect::<Vec<_>>()
            .chunks(CHUNK)
            .map(|c| c.to_vec())
            .collect();
        let mut duplicates_checked = 0;
        for (round, chunk) in chunks.iter().enumerate() {
            let began = Instant::now();
            let now = Utc::now();
            let mut jobs = Vec::new();
            let mut by_client = Vec::new();
            let mut by_api = Vec::new();
            for &i in chunk {
                let mut job = plans[i].job.clone();
                if let Some(d) = plans[i].delay {
                    job = job.with_run_at(now + chrono::Duration::from_std(d).expect("delay"));
                }
                if plans[i].via_api {
                    by_api.push((i, job));
                } else {
                    by_client.push(i);
                    jobs.push(job);
                }
            }
            let run_ats: HashMap<usize, Option<DateTime<Utc>>> = chunk
                .iter()
                .map(|&i| {
                    let at = plans[i]
                        .delay
                        .map(|d| now + chrono::Duration::from_std(d).expect("delay"));
                    (i, at)
                })
                .collect();
            let posts = futures_util::future::join_all(by_api.iter().map(|(_, j)| self.post(j)));
            let (ids, posted) = tokio::join!(self.enqueue_many(jobs), posts);
            for (i, id) in by_client.into_iter().zip(ids).chain(
                by_api
                    .iter()
                    .map(|(i, _)| *i)
                    .zip(posted)
                    .collect::<Vec<_>>(),
            ) {
                outcomes[i] = Some(Outcome {
                    id,
                    run_at: run_ats[&i],
                    cancel: None,
                });
                if let Some(after) = plans[i].cancel_after {
                    cancels.push((i, id, after));
                }
            }
            // Cancels, each after its wait, beside the next rounds.
            let due: Vec<_> = std::mem::take(&mut cancels);
            for (i, id, after) in due {
                let wait = after.saturating_sub(began.elapsed());
                if wait.is_zero() {
                    outcomes[i].as_mut().expect("enqueued").cancel = Some(self.cancel(id).await);
                } else {
                    cancels.push((i, id, after));
                }
            }
            // Duplicates of three rounds ago: the same job comes back.
            if round >= 3 {
                let old = &chunks[round - 3];
                let dups: Vec<usize> = old
                    .iter()
                    .copied()
                    .filter(|&i| plans[i].duplicate)
                    .collect();
                let again = self
                    .enqueue_many(dups.iter().map(|&i| plans[i].job.clone()).collect())
                    .await;
                for (i, id) in dups.iter().zip(again) {
                    assert_eq!(
                        Some(id),
                        outcomes[*i].as_ref().map(|o| o.id),
                        "a repeated dedup key gives the same job"
                    );
                    duplicates_checked += 1;
                }
            }
            tokio::time::sleep(PACE.saturating_sub(began.elapsed())).await;
            // Cancels still waiting (a round is longer than any wait): due now.
            for (i, id, _) in std::mem::take(&mut cancels) {
                outcomes[i].as_mut().expect("enqueued").cancel = Some(self.cancel(id).await);
            }
        }
        for chunk in chunks.iter().skip(chunks.len().saturating_sub(3)) {
            let dups: Vec<usize> = chunk
                .iter()
                .copied()
                .filter(|&i| plans[i].duplicate)
                .collect();
            let again = self
                .enqueue_many(dups.iter().map(|&i| plans[i].job.clone()).collect())
                .await;
            for (i, id) in dups.iter().zip(again) {
                assert_eq!(Some(id), outcomes[*i].as_ref().map(|o| o.id));
                duplicates_checked += 1;
            }
        }
        eprintln!("cluster: {duplicates_checked} duplicate enqueues answered with the first job");
        outcomes
            .into_iter()
            .map(|o| o.expect("every job enqueued"))
            .collect()
    }
}

/// Fails the test if any process exited on its own.
fn assert_alive(procs: &mut [(&str, &mut Proc)]) {
    for (what, p) in procs.iter_mut() {
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!(
                "{what} exited on its own with {status}; log:\n{}",
                p.log_text()
            );
        }
    }
}

/// Jobs not yet final.
async fn unfinished(env: &TestEnv) -> Option<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM apiary_jobs
          WHERE status NOT IN ('succeeded', 'cancelled', 'dead', 'failed')",
    )
    .fetch_one(env.store.pool())
    .await
    .ok()
}

async fn by_status(env: &TestEnv) -> Vec<(String, i64)> {
    sqlx::query_as("SELECT status, count(*) FROM apiary_jobs GROUP BY status ORDER BY status")
        .fetch_all(env.store.pool())
        .await
        .expect("statuses")
}

async fn succeeded(env: &TestEnv) -> Option<i64> {
    sqlx::query_scalar("SELECT count(*) FROM apiary_jobs WHERE status = 'succeeded'")
        .fetch_one(env.store.pool())
        .await
        .ok()
}

/// Enqueues one `tally` of counter `probe` with dedup key `key` (retrying through the
/// outage) and returns how long after `since` it succeeded.
async fn probe(env: &TestEnv, producer: &Producer, key: &str, since: Instant) -> Duration {
    let job = NewJob::new("tally", json!({"counter": "probe"})).with_dedup_key(key);
    let id = producer.enqueue_many(vec![job]).await[0];
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let done: Option<String> =
            sqlx::query_scalar("SELECT status FROM apiary_jobs WHERE id = $1")
                .bind(id)
                .fetch_optional(env.store.pool())
                .await
                .ok()
                .flatten();
        if done.as_deref() == Some("succeeded") {
            return since.elapsed();
        }
        assert!(Instant::now() < deadline, "probe {key} not done: {done:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the broker's queues of `env` hold, from the first node of `cluster` that answers
/// (the shared broker when `None`).
async fn queue_report(env: &TestEnv, cluster: Option<&str>) -> String {
    let host = std::process::Command::new("hostname")
        .arg("-s")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let nodes: Vec<Option<String>> = match cluster {
        Some(c) => (1..=3).map(|n| Some(format!("{c}-{n}@{host}"))).collect(),
        None => vec![None],
    };
    for node in nodes {
        let mut cmd = tokio::process::Command::new("rabbitmqctl");
        if let Some(n) = &node {
            cmd.args(["-n", n]);
        }
        let cols = [
            "list_queues",
            "name",
            "type",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ];
        let Ok(out) = cmd
            .args(cols)
            .args(["--no-table-headers", "-q"])
            .stdin(std::process::Stdio::null())
            .output()
            .await
        else {
            continue;
        };
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with(&env.cfg.queue))
                .collect::<Vec<_>>()
                .join("\n");
        }
    }
    "no node answered".into()
}

/// Waits until every job is final, failing early if none finishes for 45 s (the lost-message
/// sweep may take two of its 3-lease periods), or after
/// [`SETTLE`], with the statuses, the queues and the workers' logs.
async fn settle(env: &TestEnv, procs: &mut [(&str, &mut Proc)], cluster: Option<&str>) -> Duration {
    let began = Instant::now();
    let mut progress = (succeeded(env).await.unwrap_or(0), Instant::now());
    loop {
        assert_alive(procs);
        if unfinished(env).await == Some(0) {
            return began.elapsed();
        }
        let done = succeeded(env).await.unwrap_or(0);
        if done > progress.0 {
            progress = (done, Instant::now());
        }
        if began.elapsed() > SETTLE || progress.1.elapsed() > Duration::from_secs(45) {
            eprintln!(
                "--- queues (name, type, ready, unacked, consumers)\n{}",
                queue_report(env, cluster).await
            );
            let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM apiary_outbox")
                .fetch_one(env.store.pool())
                .await
                .unwrap_or(-1);
            eprintln!("--- outbox rows: {outbox}");
            type Stuck = (
                Uuid,
                String,
                String,
                i32,
                Option<String>,
                Option<DateTime<Utc>>,
            );
            let stuck: Vec<Stuck> = sqlx::query_as(
                "SELECT id, kind, status, attempts, dedup_key, run_at FROM apiary_jobs
                  WHERE status NOT IN ('succeeded', 'cancelled', 'dead', 'failed')
                  ORDER BY id LIMIT 40",
            )
            .fetch_all(env.store.pool())
            .await
            .unwrap_or_default();
            let delayed: Vec<(bool, i64)> = sqlx::query_as(
                "SELECT run_at IS NOT NULL, count(*) FROM apiary_jobs
                  WHERE status NOT IN ('succeeded', 'cancelled', 'dead', 'failed')
                  GROUP BY 1",
            )
            .fetch_all(env.store.pool())
            .await
            .unwrap_or_default();
            eprintln!("--- not final, (delayed?, count): {delayed:?}");
            for (what, p) in procs.iter() {
                let log = common::strip_ansi(&p.log_text());
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!("--- {what} (last lines, newest first)");
                for l in tail {
                    eprintln!("{l}");
                }
                for (id, ..) in &stuck {
                    for l in log.lines().filter(|l| l.contains(&id.to_string())) {
                        eprintln!("{what}: {l}");
                    }
                }
            }
            panic!(
                "jobs not final after {:?}: {:?}; first stuck: {stuck:#?}",
                began.elapsed(),
                by_status(env).await
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every job ended as it must, and every counter moved exactly once per succeeded tally.
async fn assert_outcomes(
    env: &TestEnv,
    plans: &[Plan],
    outcomes: &[Outcome],
    extra: &[(&str, i64)],
) {
    type Row = (String, i32, Option<DateTime<Utc>>);
    let rows: Vec<(Uuid, String, i32, Option<DateTime<Utc>>)> =
        sqlx::query_as("SELECT id, status, attempts, started_at FROM apiary_jobs")
            .fetch_all(env.store.pool())
            .await
            .expect("jobs");
    let rows: HashMap<Uuid, Row> = rows
        .into_iter()
        .map(|(id, s, a, at)| (id, (s, a, at)))
        .collect();
    let mut want: HashMap<String, i64> = HashMap::new();
    let (mut cancelled, mut cancel_came_late, mut retried) = (0, 0, 0);
    for (p, o) in plans.iter().zip(outcomes) {
        let (status, attempts, started) = rows
            .get(&o.id)
            .unwrap_or_else(|| panic!("job {} ({}) is missing", o.id, p.job.kind));
        let must = o.cancel.as_deref().unwrap_or("succeeded");
        assert_eq!(
            status, must,
            "job {} ({} {}): cancel answer {:?}",
            o.id, p.job.kind, p.job.payload, o.cancel
        );
        match o.cancel.as_deref() {
            Some("cancelled") => cancelled += 1,
            Some(_) => cancel_came_late += 1,
            None => {}
        }
        retried += usize::from(*attempts > 1);
        if status == "succeeded" {
            if let Some(c) = &p.counter {
                *want.entry(c.clone()).or_default() += 1;
            }
            // A job may start up to the finest delay tier early (documented).
            let early = chrono::Duration::milliseconds(apiary::store::claim_job::DUE_TOLERANCE_MS);
            if let (Some(at), Some(started)) = (o.run_at, started) {
                assert!(
                    *started >= at - early,
                    "delayed job {} started {started}, more than {early} before it was due at {at}",
                    o.id
                );
            }
        }
    }
    for (c, n) in extra {
        *want.entry(c.to_string()).or_default() += n;
    }
    let got: HashMap<String, i64> = sqlx::query_as("SELECT counter, value FROM demo_tally")
        .fetch_all(env.store.pool())
        .await
        .expect("tallies")
        .into_iter()
        .collect();
    let wrong: Vec<_> = want
        .iter()
        .filter(|(c, n)| got.get(*c) != Some(n))
        .map(|(c, n)| (c.clone(), *n, got.get(c).copied()))
        .chain(
            got.iter()
                .filter(|(c, _)| !want.contains_key(*c))
                .map(|(c, n)| (c.clone(), 0, Some(*n))),
        )
        .collect();
    assert!(
        wrong.is_empty(),
        "counters off (counter, want, got): {wrong:?}"
    );
    eprintln!(
        "cluster: {} jobs checked: {cancelled} cancelled, {cancel_came_late} finished before their cancel, {retried} ran more than once (retries and redeliveries), every counter exact ({} counters)",
        outcomes.len(),
        want.len()
    );
}

/// Jobs enqueued after the faults run to succeeded, and each worker ran some of them (its
/// `processed` count in `apiary_workers`, renewed with its heartbeat, grew): every worker is
/// consuming again.
async fn assert_consuming(env: &TestEnv, producer: &Producer, workers: &[Proc]) {
    let pids: Vec<i32> = workers.iter().map(Proc::pid).collect();
    let processed = || async {
        let rows: Vec<(i32, i64)> = sqlx::query_as("SELECT pid, processed FROM apiary_workers")
            .fetch_all(env.store.pool())
            .await
            .expect("workers");
        rows.into_iter()
            .filter(|(pid, _)| pids.contains(pid))
            .collect::<HashMap<i32, i64>>()
    };
    let before = processed().await;
    assert_eq!(
        before.len(),
        pids.len(),
        "every worker is registered: {before:?}"
    );
    let jobs: Vec<NewJob> = (0..90)
        .map(|i| NewJob::new("sleep", json!({"ms": 300})).with_dedup_key(format!("final-{i}")))
        .collect();
    let ids = producer.enqueue_many(jobs).await;
    for id in &ids {
        env.wait_for_status(*id, apiary::JobStatus::Succeeded, Duration::from_secs(60))
            .await;
    }
    env.wait_until("every worker to count some of the last jobs", T, || async {
        let now = processed().await;
        before
            .iter()
            .all(|(pid, n)| now.get(pid).is_some_and(|m| m > n))
            .then_some(())
    })
    .await;
}

/// The `down_seconds` of each "available again" line of a log.
fn down_times(log: &str) -> Vec<String> {
    common::strip_ansi(log)
        .lines()
        .filter(|l| l.contains("available again"))
        .map(|l| {
            l.split("down_seconds=")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse::<f64>().ok())
                .map(|s| format!("{s:.1}s"))
                .unwrap_or_else(|| "?".into())
        })
        .collect()
}

/// SIGTERM, and a clean exit.
async fn stop(what: &str, p: &mut Proc) {
    p.signal("TERM");
    let status = p.wait(T).await;
    assert!(
        status.success(),
        "{what} exited with {status}:\n{}",
        p.log_text()
    );
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

#[tokio::test]
async fn a_broker_node_dies_mid_traffic_and_nothing_is_lost_or_doubled() {
    let _serial = SERIAL.lock().await;
    tokio::time::timeout(BUDGET, broker_node_dies())
        .await
        .expect("the test ran over its budget");
}

async fn broker_node_dies() {
    let began = Instant::now();
    let cluster = |cmd: &'static str| {
        let mut args = vec![cmd.to_string(), "--name".into(), CLUSTER_NAME.into()];
        if cmd == "start" {
            args.extend(["--base-port".into(), CLUSTER_BASE_PORT.to_string()]);
        }
        args
    };
    // A cluster left by an earlier run that could not clean up goes first.
    let _ = try_script("rabbitmq-cluster", &["stop", "--name", CLUSTER_NAME]).await;
    let _cluster = Teardown {
        name: "rabbitmq-cluster",
        args: cluster("stop"),
        logs: Some(
            std::env::temp_dir()
                .join("apiary-rabbitmq-cluster")
                .join(CLUSTER_NAME),
        ),
    };
    let start: Vec<String> = cluster("start");
    let start: Vec<&str> = start.iter().map(String::as_str).collect();
    let urls = run_script("rabbitmq-cluster", &start).await;
    let cluster_up = began.elapsed();
    let addrs: Vec<&str> = urls.split(',').collect();
    assert_eq!(addrs.len(), 3, "three addresses: {urls}");
    let env = TestEnv::on(&urls, common::PG_ROOT, QueueType::Quorum).await;
    let work_queue = env.names().work.clone();
    let ctl = |args: Vec<String>| async move {
        let mut a: Vec<String> = args;
        a.extend(["--name".into(), CLUSTER_NAME.into()]);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        run_script("rabbitmq-cluster", &a).await
    };
    // The leader's number, or None while the cluster has none to name.
    let leader_of = |queue: String| async move {
        try_script(
            "rabbitmq-cluster",
            &["leader", &queue, "--name", CLUSTER_NAME],
        )
        .await
        .and_then(|s| s.parse::<usize>().ok())
    };

    let (mut api, base) = env.spawn_api(&[("NO_COLOR", "1")]).await;
    // Each worker starts from another node, so a node's death cuts one worker, not all.
    let mut workers: Vec<Proc> = (0..3)
        .map(|k| {
            let list: Vec<&str> = (0..3).map(|j| addrs[(k + j) % 3]).collect();
            let list = list.join(",");
            let mut vars = WORKER_ENV.to_vec();
            vars.push(("AMQP_URL", &list));
            env.spawn(&["worker"], &vars)
        })
        .collect();
    for w in &workers {
        w.wait_for_log("worker starting", T).await;
    }
    let producer = Producer {
        env_client: env.client(),
        http: reqwest::Client::new(),
        api: base,
        enqueue_retries: Default::default(),
        cancel_retries: Default::default(),
        errors: Default::default(),
    };
    let plans = plans("cl");

    let faults = async {
        let mut timings = Vec::new();
        env.wait_until("traffic under way", T, || async {
            (succeeded(&env).await.unwrap_or(0) >= 300).then_some(())
        })
        .await;
        let mut killed = Vec::new();
        for round in 1..=2 {
            let leader = leader_of(work_queue.clone())
                .await
                .expect("the work queue has a leader");
            // The leader first; then the leader again if it moved elsewhere, or else
            // another node than the first victim.
            let victim = if round == 1 || !killed.contains(&leader) {
                leader
            } else {
                (1..=3).find(|n| !killed.contains(n)).expect("a node")
            };
            killed.push(victim);
            let running: i64 = env.count(apiary::JobStatus::Running).await;
            ctl(vec!["kill".into(), victim.to_string()]).await;
            let at = Instant::now();
            eprintln!(
                "cluster: round {round}: killed node {victim} (leader of the work queue: {leader}) with {running} jobs running, at {}",
                secs(began.elapsed())
            );
            let moved = async {
                loop {
                    if let Some(n) = leader_of(work_queue.clone()).await
                        && n != victim
                    {
                        return (n, at.elapsed());
                    }
                    assert!(at.elapsed() < T, "no new leader {T:?} after the kill");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            };
            let probe_key = format!("probe-{round}");
            let ((new_leader, moved_in), recovered) =
                tokio::join!(moved, probe(&env, &producer, &probe_key, at));
            // Down about 5 s, then back.
            tokio::time::sleep(Duration::from_secs(5).saturating_sub(at.elapsed())).await;
            let restart_began = Instant::now();
            ctl(vec!["restart".into(), victim.to_string()]).await;
            let restarted_in = restart_began.elapsed();
            eprintln!(
                "cluster: round {round}: leader moved to node {new_leader} {} after the kill; a job enqueued after the kill succeeded {} after it; node {victim} restarted in {}",
                secs(moved_in),
                secs(recovered),
                secs(restarted_in)
            );
            timings.push((victim, moved_in, recovered, restarted_in));
            // Let the restarted node catch up with its queues before the next kill.
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        timings
    };
    let (outcomes, timings) = tokio::join!(producer.produce(&plans), faults);
    let produced = began.elapsed();
    {
        let mut procs: Vec<(&str, &mut Proc)> = vec![("api", &mut api)];
        procs.extend(workers.iter_mut().map(|w| ("worker", w)));
        let settled = settle(&env, &mut procs, Some(CLUSTER_NAME)).await;
        eprintln!(
            "cluster: every job final {} after the producer ended",
            secs(settled)
        );
    }
    assert_outcomes(&env, &plans, &outcomes, &[("probe", 2)]).await;
    assert_eq!(env.count(apiary::JobStatus::Running).await, 0);
    assert_consuming(&env, &producer, &workers).await;
    // Each process's own account of its outages: "rabbitmq available again ... down_seconds=".
    let outages: Vec<Vec<String>> = std::iter::once(&api)
        .chain(&workers)
        .map(|p| down_times(&p.log_text()))
        .collect();
    for (k, w) in workers.iter_mut().enumerate() {
        stop(&format!("worker {k}"), w).await;
    }
    stop("api", &mut api).await;
    env.assert_invariants_quiescent().await;

    eprintln!("cluster figures (RabbitMQ node kills, quorum queues)");
    eprintln!("  cluster start            {}", secs(cluster_up));
    for (victim, moved, recovered, restarted) in &timings {
        eprintln!(
            "  kill node {victim}              leader elsewhere after {}, first new job done after {}, restart {}",
            secs(*moved),
            secs(*recovered),
            secs(*restarted)
        );
    }
    eprintln!("  down, as each process saw it (api, workers): {outages:?}");
    eprintln!(
        "  producer retries         {} enqueues, {} cancels: {:?}",
        producer
            .enqueue_retries
            .load(std::sync::atomic::Ordering::Relaxed),
        producer
            .cancel_retries
            .load(std::sync::atomic::Ordering::Relaxed),
        producer
            .errors
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    );
    eprintln!("  producing                {}", secs(produced));
    eprintln!("  wall time                {}", secs(began.elapsed()));
}

#[tokio::test]
async fn postgres_restarts_and_workers_resume_on_their_own() {
    let _serial = SERIAL.lock().await;
    tokio::time::timeout(BUDGET, postgres_restarts())
        .await
        .expect("the test ran over its budget");
}

async fn postgres_restarts() {
    let began = Instant::now();
    let port = PG_PORT.to_string();
    // A server left by an earlier run that could not clean up goes first.
    let _ = try_script("pg-private", &["remove", "--port", &port]).await;
    let _pg = Teardown {
        name: "pg-private",
        args: vec!["remove".into(), "--port".into(), port.clone()],
        logs: Some(std::env::temp_dir().join("apiary-pg-private").join(&port)),
    };
    let url = run_script("pg-private", &["start", "--port", &port]).await;
    let root = url
        .strip_suffix("/postgres")
        .unwrap_or_else(|| panic!("a server URL: {url}"))
        .to_string();
    let env = TestEnv::on(common::AMQP, &root, QueueType::Classic).await;
    let (mut api, base) = env.spawn_api(&[("NO_COLOR", "1")]).await;
    let mut workers: Vec<Proc> = (0..3).map(|_| env.spawn(&["worker"], WORKER_ENV)).collect();
    for w in &workers {
        w.wait_for_log("worker starting", T).await;
    }
    let producer = Producer {
        env_client: env.client(),
        http: reqwest::Client::new(),
        api: base,
        enqueue_retries: Default::default(),
        cancel_retries: Default::default(),
        errors: Default::default(),
    };
    let plans = plans("pg");

    let fault = async {
        env.wait_until("traffic under way", T, || async {
            (succeeded(&env).await.unwrap_or(0) >= 500).then_some(())
        })
        .await;
        let running = env.count(apiary::JobStatus::Running).await;
        let stop_began = Instant::now();
        run_script("pg-private", &["stop", "--port", &port, "--mode", "fast"]).await;
        let stopped_in = stop_began.elapsed();
        eprintln!(
            "cluster: postgres stopped (fast) with {running} jobs running, at {}",
            secs(began.elapsed())
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        let start_began = Instant::now();
        run_script("pg-private", &["start", "--port", &port]).await;
        let up = Instant::now();
        let started_in = up - start_began;
        let before = succeeded(&env).await.unwrap_or(0);
        let first_progress = async {
            loop {
                if succeeded(&env).await.unwrap_or(0) > before {
                    return up.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let (progress, recovered) =
            tokio::join!(first_progress, probe(&env, &producer, "probe-pg", up));
        eprintln!(
            "cluster: postgres back (stop {}, start {}); first job finished {} after the start, a job enqueued after the start succeeded {} after it",
            secs(stopped_in),
            secs(started_in),
            secs(progress),
            secs(recovered)
        );
        (stopped_in, started_in, progress, recovered)
    };
    let (outcomes, (stopped_in, started_in, progress, recovered)) =
        tokio::join!(producer.produce(&plans), fault);
    let produced = began.elapsed();
    {
        let mut procs: Vec<(&str, &mut Proc)> = vec![("api", &mut api)];
        procs.extend(workers.iter_mut().map(|w| ("worker", w)));
        let settled = settle(&env, &mut procs, None).await;
        eprintln!(
            "cluster: every job final {} after the producer ended",
            secs(settled)
        );
    }
    assert_outcomes(&env, &plans, &outcomes, &[("probe", 1)]).await;
    assert_eq!(env.count(apiary::JobStatus::Running).await, 0);
    assert_consuming(&env, &producer, &workers).await;
    for (k, w) in workers.iter_mut().enumerate() {
        stop(&format!("worker {k}"), w).await;
    }
    stop("api", &mut api).await;
    env.assert_invariants_quiescent().await;

    let outages: Vec<Vec<String>> = std::iter::once(&api)
        .chain(&workers)
        .map(|p| down_times(&p.log_text()))
        .collect();
    eprintln!("cluster figures (Postgres stopped 10 s)");
    eprintln!("  down, as each process saw it (api, workers): {outages:?}");
    eprintln!(
        "  stop / start             {} / {}",
        secs(stopped_in),
        secs(started_in)
    );
    eprintln!(
        "  first job done after     {} (from the start)",
        secs(progress)
    );
    eprintln!(
        "  new job done after       {} (from the start)",
        secs(recovered)
    );
    eprintln!(
        "  producer retries         {} enqueues, {} cancels: {:?}",
        producer
            .enqueue_retries
            .load(std::sync::atomic::Ordering::Relaxed),
        producer
            .cancel_retries
            .load(std::sync::atomic::Ordering::Relaxed),
        producer
            .errors
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    );
    eprintln!("  producing                {}", secs(produced));
    eprintln!("  wall time                {}", secs(began.elapsed()));
}
