//! `apiary bench`: Apiary measured end to end on the configured Postgres and RabbitMQ, the way
//! `../shared/bench` measures Celery and Dramatiq, so the figures sit side by side.
//!
//! It makes a scratch database and queue, enqueues N `echo` jobs through the library (recorded
//! in Postgres, published with confirms), runs real `apiary worker` processes until every
//! result is committed, reads the timings back from the job records, samples the workers'
//! CPU and peak memory from `/proc`, and removes everything it made.
//!
//! With `--duration` (live mode) it publishes at `--rate` for that long and samples, every
//! [`SAMPLE_EVERY`], the completions per second, the size of the job table and each worker's
//! memory: whether a rate holds for minutes with pruning running, not just for a burst.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::json;

use crate::broker;

mod components;
use crate::client::Client;
use crate::config::Config;
use crate::job::{DEFAULT_QUEUE, NewJob};

/// How the work arrives.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Publish everything, then start the workers: the drain rate of a backlog.
    Backlog,
    /// Start the workers, then publish (paced with --rate): throughput and latency under load.
    Live,
    /// Only enqueue (library batch enqueue): the producer side alone.
    Enqueue,
}

/// `apiary bench` options.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Jobs to run.
    #[arg(long, default_value_t = 20_000)]
    pub jobs: usize,
    /// backlog, live or enqueue.
    #[arg(long, value_enum, default_value = "backlog")]
    pub mode: Mode,
    /// Worker processes.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Concurrency per worker (default: the worker's own default).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Live mode: publish at this many jobs per second (default: as fast as possible).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Concurrent enqueue_many callers.
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Jobs per enqueue_many call.
    #[arg(long, default_value_t = 500)]
    pub enqueue_batch: usize,
    /// Bytes of payload per job.
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Give job i the concurrency key `k{i % N}`, to measure a kind with `max_per_key` in
    /// APIARY_KINDS (default: no key). The workers inherit the bench's environment, so set
    /// limits with the APIARY_KINDS variable: the `--kinds` flag reaches only the bench.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub keys: Option<u64>,
    /// Enqueue every job as one batch (`Client::enqueue_batch`, at most 10,000 jobs) with an
    /// `echo` callback: the batch's enqueue rate, and its drain against plain jobs' for the
    /// completion overhead per child.
    /// (`--batch` is taken: it is the worker's APIARY_BATCH.)
    #[arg(long, conflicts_with = "pairs")]
    pub one_batch: bool,
    /// Enqueue the jobs as pairs, the second depending on the first, and report how long each
    /// child started after its parent finished (the release latency).
    #[arg(long)]
    pub pairs: bool,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Keep the scratch database and queues afterwards (to inspect them).
    #[arg(long)]
    pub keep: bool,
    /// Classic queues only: declare the work queues without priority levels first, as an
    /// Apiary before priorities did, to measure what RabbitMQ's priority queues cost.
    #[arg(long)]
    pub without_priorities: bool,
    /// Give up after this long (counted from the end of publishing with --duration).
    #[arg(long, default_value = "10m", value_parser = crate::config::parse_duration)]
    pub timeout: Duration,
    /// Live mode: publish at --rate for this long (`5m`, `10m`) instead of a fixed --jobs,
    /// sampling rates, table size and worker memory every 10 s.
    #[arg(long, value_parser = crate::config::parse_duration)]
    pub duration: Option<Duration>,
    /// The workers' APIARY_RETENTION (default: theirs, 7d).
    #[arg(long, value_parser = crate::config::parse_duration)]
    pub retention: Option<Duration>,
    /// The workers' APIARY_PRUNE_INTERVAL (default: theirs, 1m).
    #[arg(long, value_parser = crate::config::parse_duration)]
    pub prune_interval: Option<Duration>,
    /// Run `VACUUM` on the job and outbox tables this often, as autovacuum would: for servers
    /// with `autovacuum = off` (CI setups), where nothing else reclaims pruned rows.
    #[arg(long, value_parser = crate::config::parse_duration)]
    pub vacuum_every: Option<Duration>,
    /// How progress is shown.
    #[command(flatten)]
    pub progress: crate::progress::ProgressArgs,
}

/// How often a `--duration` run samples.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// What one run measured.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The mode.
    pub mode: Mode,
    /// Jobs.
    pub jobs: usize,
    /// Worker processes.
    pub workers: usize,
    /// Concurrency per worker.
    pub concurrency: Option<usize>,
    /// Target rate in live mode.
    pub rate: Option<f64>,
    /// Jobs recorded and confirmed per second by the publisher.
    pub publish_rate: f64,
    /// Jobs per second from the first publish to the last result committed.
    pub e2e_rate: f64,
    /// Jobs per second from the workers' start to the last result committed.
    pub drain_rate: f64,
    /// Enqueue-to-finished latency percentiles, milliseconds.
    pub latency_ms: Percentiles,
    /// With `--pairs`: parent finished to child started, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release_ms: Option<Percentiles>,
    /// Largest peak RSS among the workers, MiB.
    pub worker_peak_rss_mib: f64,
    /// Workers' RSS once idle after the run, MiB (largest).
    pub worker_idle_rss_mib: f64,
    /// CPU seconds used by all workers.
    pub worker_cpu_seconds: f64,
    /// Worker CPU per job, microseconds.
    pub worker_cpu_us_per_job: f64,
    /// With `--duration`: how long it published.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
    /// With `--duration`: one sample every [`SAMPLE_EVERY`] while publishing.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<Sample>,
    /// With `--duration`: whether the rate, memory and table size held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steady: Option<Steadiness>,
    /// With `--duration`: the server's `autovacuum` setting. Off, nothing reclaims the rows
    /// the pruner deletes (unless `--vacuum-every`), and the table grows whatever it holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autovacuum: Option<bool>,
    /// `--vacuum-every`, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vacuum_every_s: Option<f64>,
    /// What RabbitMQ and Postgres spent per job while the workers ran (backlog: the drain;
    /// live: the whole run, publishing included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub components: Option<components::Components>,
}

/// One sample of a `--duration` run.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since publishing began.
    pub at_s: f64,
    /// Jobs enqueued so far.
    pub published: usize,
    /// Jobs finished so far.
    pub completed: usize,
    /// Jobs finished per second since the previous sample.
    pub completions_per_s: f64,
    /// Rows in `apiary_jobs`.
    pub job_rows: i64,
    /// `pg_total_relation_size('apiary_jobs')` (table, indexes, TOAST), MiB.
    pub jobs_table_mib: f64,
    /// Each worker's resident memory, MiB.
    pub worker_rss_mib: Vec<f64>,
}

/// Whether a `--duration` run held steady: its last minute against its first.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Serialize)]
pub struct Steadiness {
    /// Completions per second over the first minute.
    pub first_minute_rate: f64,
    /// Completions per second over the last minute.
    pub last_minute_rate: f64,
    /// The last minute reached at least 90% of the first.
    pub rate_held: bool,
    /// Largest worker RSS at the end of the first minute, MiB.
    pub rss_start_mib: f64,
    /// Largest worker RSS at the end, MiB.
    pub rss_end_mib: f64,
    /// RSS grew by at most 10% or 4 MiB, whichever is larger.
    pub rss_flat: bool,
    /// Job table size once retention could apply (retention + 1 min into the run), MiB.
    pub table_settled_mib: f64,
    /// Job table size at the end, MiB.
    pub table_end_mib: f64,
    /// Rows once retention could apply.
    pub rows_settled: i64,
    /// Rows at the end.
    pub rows_end: i64,
    /// Table size and rows grew by at most 25% after settling.
    pub table_flat: bool,
}

/// p50/p95/p99.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// Runs a benchmark against `cfg`'s servers and prints the report.
pub async fn run(cfg: &Config, args: &BenchArgs) -> anyhow::Result<Report> {
    let id = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
    let mut cfg = cfg.clone();
    let base = cfg
        .database_url
        .rsplit_once('/')
        .map(|(b, _)| b.to_string())
        .unwrap_or(cfg.database_url.clone());
    cfg.database_url = format!("{base}/apiary_bench_{id}");
    cfg.queue = format!("apiary.bench.{id}");
    let scratch = Scratch { cfg: cfg.clone() };
    crate::store::migrate(&cfg.database_url)
        .await
        .context("creating the scratch database")?;
    {
        let conn = broker::connect(&cfg.amqp_url, "apiary bench setup").await?;
        let ch = conn.create_channel().await.context("channel")?;
        let names = cfg.queue_names(DEFAULT_QUEUE);
        if args.without_priorities {
            anyhow::ensure!(
                cfg.queue_type == broker::topology::QueueType::Classic,
                "--without-priorities is for classic queues"
            );
            for work in names.work_queues() {
                ch.queue_declare(
                    work.as_str().into(),
                    broker::topology::durable(),
                    broker::topology::work_args_without_priorities(),
                )
                .await
                .context("declaring a work queue without priorities")?;
            }
        }
        broker::topology::declare(&conn, &ch, &names, cfg.queue_type).await?;
        let _ = conn.close(200, "".into()).await;
    }
    let result = measure(&cfg, args).await;
    if args.keep {
        eprintln!(
            "kept database {} and queue {}",
            crate::config::mask_url(&cfg.database_url),
            cfg.queue
        );
    } else {
        scratch.remove().await;
    }
    let report = result?;
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

struct Scratch {
    cfg: Config,
}

impl Scratch {
    async fn remove(&self) {
        if let Some((base, db)) = self.cfg.database_url.rsplit_once('/')
            && let Ok(mut conn) =
                <sqlx::PgConnection as sqlx::Connection>::connect(&format!("{base}/postgres")).await
        {
            let sql = format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)");
            let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut conn)
                .await;
        }
        if let Ok(conn) = broker::connect(&self.cfg.amqp_url, "apiary bench cleanup").await
            && let Ok(ch) = conn.create_channel().await
        {
            for q in self.cfg.queue_names(DEFAULT_QUEUE).all() {
                let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
            }
            let _ = conn.close(200, "".into()).await;
        }
    }
}

struct Workers {
    children: Vec<tokio::process::Child>,
}

impl Workers {
    fn start(cfg: &Config, args: &BenchArgs) -> anyhow::Result<Workers> {
        let exe = std::env::current_exe().context("finding the apiary binary")?;
        let mut children = Vec::new();
        for _ in 0..args.workers {
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.arg("worker")
                .env("DATABASE_URL", &cfg.database_url)
                .env("AMQP_URL", &cfg.amqp_url)
                .env("APIARY_QUEUE", &cfg.queue)
                // Given as flags to the bench, these are not in its environment to inherit.
                .env("APIARY_QUEUE_TYPE", cfg.queue_type.as_str())
                .env("APIARY_QUEUE_OPTIONS", cfg.queue_options.to_string())
                .env("APIARY_WORKER_HTTP_ADDR", "127.0.0.1:0")
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .kill_on_drop(true);
            if let Some(c) = args.concurrency {
                cmd.env("APIARY_CONCURRENCY", c.to_string());
            }
            if let Some(r) = args.retention {
                cmd.env(
                    "APIARY_RETENTION",
                    humantime::format_duration(r).to_string(),
                );
            }
            if let Some(p) = args.prune_interval {
                cmd.env(
                    "APIARY_PRUNE_INTERVAL",
                    humantime::format_duration(p).to_string(),
                );
            }
            children.push(cmd.spawn().context("starting a worker")?);
        }
        Ok(Workers { children })
    }

    fn pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(|c| c.id()).collect()
    }

    async fn stop(mut self) {
        for c in &self.children {
            if let Some(pid) = c.id() {
                let _ = std::process::Command::new("kill")
                    .arg("-TERM")
                    .arg(pid.to_string())
                    .status();
            }
        }
        for c in &mut self.children {
            let _ = tokio::time::timeout(Duration::from_secs(30), c.wait()).await;
        }
    }
}

async fn measure(cfg: &Config, args: &BenchArgs) -> anyhow::Result<Report> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    if args.duration.is_some() {
        anyhow::ensure!(
            args.mode == Mode::Live && args.rate.is_some_and(|r| r > 0.0),
            "--duration needs --mode live and a --rate"
        );
    }
    // With a duration, the job count is what the rate publishes in that time.
    let jobs = match (args.duration, args.rate) {
        (Some(d), Some(rate)) => ((d.as_secs_f64() * rate).ceil() as usize).max(1),
        _ => args.jobs,
    };
    let client = Client::new(cfg)?;
    client.publisher().ensure_connected().await?;
    let pool = client.store().pool().clone();
    let payload = json!({ "data": "x".repeat(args.payload_bytes.saturating_sub(12)) });
    let mut workers = None;
    let mut workers_started = None;
    let mut window_start = None;
    if args.mode == Mode::Live {
        window_start = Some(components::snapshot(&pool).await?);
        let w = Workers::start(cfg, args)?;
        wait_for_consumers(cfg, args.workers).await?;
        workers_started = Some(chrono::Utc::now());
        workers = Some(w);
    }
    // Count finished jobs from the completions' NOTIFYs rather than by scanning the table,
    // which would compete with the system under test. A task of its own owns the listener,
    // so the loop below can wait on publishers, samples and completions at once.
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
    listener.listen(crate::store::DONE_CHANNEL).await?;
    let done = Arc::new(AtomicUsize::new(0));
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(());
    let counter = {
        let done = done.clone();
        tokio::spawn(async move {
            loop {
                let n = match listener.recv().await {
                    Ok(n) => n,
                    Err(e) => {
                        return Err::<(), _>(
                            anyhow::Error::from(e).context("listening for finished jobs"),
                        );
                    }
                };
                done.fetch_add(n.payload().split(',').count(), Ordering::Relaxed);
                let _ = done_tx.send(());
            }
        })
    };
    // Counts what the publishers enqueued, then what the workers finished.
    let progress = crate::progress::Progress::counting("enqueued", jobs as u64, &args.progress);
    let started = Instant::now();
    // Publishers take batches from a shared counter; paced, each batch waits for its due time.
    let next = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let mut publishers = tokio::task::JoinSet::new();
    if args.one_batch {
        anyhow::ensure!(
            (1..=crate::client::MAX_GROUP_JOBS).contains(&jobs),
            "--one-batch takes 1 to {} jobs",
            crate::client::MAX_GROUP_JOBS
        );
        let (client, payload, sent, progress) = (
            client.clone(),
            payload.clone(),
            sent.clone(),
            progress.clone(),
        );
        publishers.spawn(async move {
            let jobs: Vec<NewJob> = (0..jobs)
                .map(|_| NewJob::new("echo", payload.clone()))
                .collect();
            let n = jobs.len();
            client
                .enqueue_batch(
                    jobs,
                    crate::client::OnComplete::new("echo", json!("bench")),
                    false,
                )
                .await?;
            sent.fetch_add(n, Ordering::Relaxed);
            progress.inc(n as u64);
            Ok::<(), anyhow::Error>(())
        });
    }
    for _ in 0..if args.one_batch {
        0
    } else {
        args.publishers.max(1)
    } {
        let (client, payload, next, sent, progress) = (
            client.clone(),
            payload.clone(),
            next.clone(),
            sent.clone(),
            progress.clone(),
        );
        let (batch, rate, mode, keys, pairs) = (
            args.enqueue_batch.max(1),
            args.rate,
            args.mode,
            args.keys,
            args.pairs,
        );
        // Pairs never straddle two calls: the child names its parent in the same request.
        let batch = if pairs { batch.div_ceil(2) * 2 } else { batch };
        publishers.spawn(async move {
            loop {
                let from = next.fetch_add(batch, Ordering::Relaxed);
                if from >= jobs {
                    return Ok::<(), anyhow::Error>(());
                }
                let n = batch.min(jobs - from);
                if let (Some(rate), Mode::Live) = (rate, mode) {
                    tokio::time::sleep_until(
                        (started + Duration::from_secs_f64(from as f64 / rate)).into(),
                    )
                    .await;
                }
                let mut parent = None;
                let jobs: Vec<NewJob> = (from..from + n)
                    .map(|i| {
                        let job = NewJob::new("echo", payload.clone());
                        let job = match keys {
                            Some(k) => job.with_concurrency_key(format!("k{}", i as u64 % k)),
                            None => job,
                        };
                        if !pairs {
                            return job;
                        }
                        let id = uuid::Uuid::now_v7();
                        match (i % 2, parent.take()) {
                            (1, Some(p)) => job.with_id(id).with_depends_on([p]),
                            _ => {
                                parent = Some(id);
                                job.with_id(id)
                            }
                        }
                    })
                    .collect();
                client.enqueue_many(jobs).await?;
                sent.fetch_add(n, Ordering::Relaxed);
                progress.inc(n as u64);
            }
        });
    }
    let sampling = args.duration.is_some();
    let autovacuum = if sampling {
        let on: String = sqlx::query_scalar("SHOW autovacuum")
            .fetch_one(&pool)
            .await
            .context("reading the autovacuum setting")?;
        if on != "on" && args.vacuum_every.is_none() {
            progress.println(&format!(
                "note: this server runs with autovacuum = {on}: the rows the pruner deletes are \
                 never reclaimed and the job table grows whatever it holds (see --vacuum-every)"
            ));
        }
        Some(on == "on")
    } else {
        None
    };
    let vacuum = args.vacuum_every.map(|every| {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at((Instant::now() + every).into(), every);
            loop {
                ticks.tick().await;
                // Plain VACUUM, as autovacuum runs it: marks dead rows' space reusable
                // without locking out the workers (VACUUM FULL would). One statement per
                // query: several in one string would share a transaction, which VACUUM refuses.
                for table in ["apiary_jobs", "apiary_outbox"] {
                    let sql = format!("VACUUM {table}");
                    if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&pool).await {
                        eprintln!("VACUUM {table} failed: {e}");
                    }
                }
            }
        })
    });
    let mut samples: Vec<Sample> = Vec::new();
    let mut ticks = tokio::time::interval_at((started + SAMPLE_EVERY).into(), SAMPLE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut published = None;
    let mut deadline =
        tokio::time::Instant::now() + args.duration.unwrap_or_default() + args.timeout;
    loop {
        let finished = done.load(Ordering::Relaxed);
        // A batch's callback finishes last, and counts as one more completion.
        if published.is_some()
            && (args.mode == Mode::Enqueue || finished >= jobs + usize::from(args.one_batch))
        {
            break;
        }
        tokio::select! {
            r = publishers.join_next(), if published.is_none() => match r {
                Some(r) => r.context("a publisher task failed")??,
                None => {
                    published = Some(started.elapsed());
                    if args.mode != Mode::Enqueue {
                        progress.phase("finished", Some(jobs as u64), finished as u64);
                    }
                    if sampling {
                        let pids = workers.as_ref().map(Workers::pids).unwrap_or_default();
                        let prev = samples.last();
                        let s = sample(&pool, started, &sent, finished, prev, &pids).await?;
                        samples.push(s);
                        deadline = tokio::time::Instant::now() + args.timeout;
                    }
                    if args.mode == Mode::Backlog {
                        // The scratch table was empty when Postgres last planned for it; a
                        // deployment's autovacuum keeps statistics current, so measure with
                        // them, not with the plan of an empty table.
                        sqlx::query("ANALYZE apiary_jobs")
                            .execute(&pool)
                            .await
                            .context("analyzing the scratch job table")?;
                        window_start = Some(components::snapshot(&pool).await?);
                        workers_started = Some(chrono::Utc::now());
                        workers = Some(Workers::start(cfg, args)?);
                    }
                }
            },
            _ = ticks.tick(), if sampling && published.is_none() => {
                let pids = workers.as_ref().map(Workers::pids).unwrap_or_default();
                let s = sample(&pool, started, &sent, finished, samples.last(), &pids).await?;
                if samples.is_empty() {
                    progress.println(&sample_header());
                }
                progress.println(&sample_line(&s));
                samples.push(s);
            }
            r = done_rx.changed() => {
                if r.is_err() {
                    // The counter stopped: say why.
                    counter.await.context("the completion counter failed")??;
                    anyhow::bail!("the completion counter stopped");
                }
                if published.is_some() {
                    progress.set(done.load(Ordering::Relaxed) as u64);
                }
            }
            () = tokio::time::sleep_until(deadline) => anyhow::bail!(
                "only {finished} of {jobs} jobs finished within {:?}",
                args.timeout
            ),
        }
    }
    let window_end = match window_start {
        Some(_) => Some(components::snapshot(&pool).await?),
        None => None,
    };
    counter.abort();
    if let Some(v) = &vacuum {
        v.abort();
    }
    progress.finish();
    let published = published.unwrap_or_else(|| started.elapsed());
    if args.mode == Mode::Enqueue {
        return Ok(Report {
            mode: args.mode,
            jobs,
            workers: 0,
            concurrency: None,
            rate: None,
            publish_rate: jobs as f64 / published.as_secs_f64(),
            e2e_rate: 0.0,
            drain_rate: 0.0,
            latency_ms: Percentiles::default(),
            release_ms: None,
            worker_peak_rss_mib: 0.0,
            worker_idle_rss_mib: 0.0,
            worker_cpu_seconds: 0.0,
            worker_cpu_us_per_job: 0.0,
            duration_s: None,
            samples: Vec::new(),
            steady: None,
            autovacuum: None,
            vacuum_every_s: None,
            components: None,
        });
    }
    let Some(workers) = workers else {
        anyhow::bail!("no workers ran");
    };
    let (e2e_rate, drain_rate) = if sampling {
        // Records past their retention are gone: the rates come from the clock and the
        // NOTIFY count instead of the table.
        let span = started.elapsed().as_secs_f64();
        (jobs as f64 / span, jobs as f64 / span)
    } else {
        // The job records carry the truth about timing: first record to last commit.
        let (first, last): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
            sqlx::query_as("SELECT min(created_at), max(finished_at) FROM apiary_jobs")
                .fetch_one(&pool)
                .await?;
        let span = (last - first)
            .to_std()
            .unwrap_or_default()
            .max(Duration::from_millis(1));
        let drain_span = workers_started
            .map(|w| (last - w).to_std().unwrap_or_default())
            .unwrap_or(span)
            .max(Duration::from_millis(1));
        (
            jobs as f64 / span.as_secs_f64(),
            jobs as f64 / drain_span.as_secs_f64().max(0.001),
        )
    };
    // With retention running, these are the jobs still kept: the last retention's worth.
    let lat: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM finished_at - created_at)::float8 * 1000 FROM apiary_jobs
          WHERE finished_at IS NOT NULL ORDER BY 1",
    )
    .fetch_all(&pool)
    .await?;
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let release_ms = if args.pairs {
        let lat: Vec<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM c.started_at - p.finished_at)::float8 * 1000
               FROM apiary_job_deps d JOIN apiary_jobs c ON c.id = d.child
               JOIN apiary_jobs p ON p.id = d.parent
              WHERE c.started_at IS NOT NULL ORDER BY 1",
        )
        .fetch_all(&pool)
        .await?;
        let at = |p: f64| {
            lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        Some(Percentiles {
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
        })
    } else {
        None
    };
    let pids = workers.pids();
    let (peak, cpu) = proc_stats(&pids);
    // Backends flush their statistics at most once a second: read the commits after that.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let idle = pids.iter().map(|p| rss_now(*p)).fold(0.0, f64::max);
    let components = match (&window_start, &window_end) {
        (Some(from), Some(to)) => {
            let stats = components::snapshot(&pool).await?;
            Some(components::between(from, to, &stats, jobs))
        }
        _ => None,
    };
    workers.stop().await;
    let steady = sampling.then(|| steadiness(&samples, args.retention));
    Ok(Report {
        mode: args.mode,
        jobs,
        workers: args.workers,
        concurrency: args.concurrency,
        rate: args.rate,
        publish_rate: jobs as f64 / published.as_secs_f64(),
        e2e_rate,
        drain_rate,
        latency_ms: Percentiles {
            p50: pct(0.50),
            p95: pct(0.95),
            p99: pct(0.99),
        },
        release_ms,
        worker_peak_rss_mib: peak,
        worker_idle_rss_mib: idle,
        worker_cpu_seconds: cpu,
        worker_cpu_us_per_job: cpu * 1e6 / jobs as f64,
        duration_s: sampling.then_some(published.as_secs_f64()),
        samples,
        steady,
        autovacuum,
        vacuum_every_s: args.vacuum_every.map(|d| d.as_secs_f64()),
        components,
    })
}

/// Reads one sample: counts so far, the job table's rows and size, the workers' memory.
async fn sample(
    pool: &sqlx::PgPool,
    started: Instant,
    sent: &std::sync::atomic::AtomicUsize,
    completed: usize,
    prev: Option<&Sample>,
    pids: &[u32],
) -> anyhow::Result<Sample> {
    let at_s = started.elapsed().as_secs_f64();
    // count(*) reads the whole table, once per sample: the one extra load the bench adds.
    let (job_rows, bytes): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM apiary_jobs), pg_total_relation_size('apiary_jobs')",
    )
    .fetch_one(pool)
    .await
    .context("sampling the job table")?;
    let (prev_at, prev_done) = prev.map_or((0.0, 0), |p| (p.at_s, p.completed));
    Ok(Sample {
        at_s,
        published: sent.load(std::sync::atomic::Ordering::Relaxed),
        completed,
        completions_per_s: completed.saturating_sub(prev_done) as f64 / (at_s - prev_at).max(0.001),
        job_rows,
        jobs_table_mib: bytes as f64 / (1024.0 * 1024.0),
        worker_rss_mib: pids.iter().map(|p| rss_now(*p)).collect(),
    })
}

/// The last minute against the first: rate, worker memory, and the job table once retention
/// had time to apply.
fn steadiness(samples: &[Sample], retention: Option<Duration>) -> Steadiness {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return Steadiness {
            first_minute_rate: 0.0,
            last_minute_rate: 0.0,
            rate_held: false,
            rss_start_mib: 0.0,
            rss_end_mib: 0.0,
            rss_flat: false,
            table_settled_mib: 0.0,
            table_end_mib: 0.0,
            rows_settled: 0,
            rows_end: 0,
            table_flat: false,
        };
    };
    // The first sample at or past `t` seconds, or the last one.
    let at = |t: f64| samples.iter().find(|s| s.at_s >= t - 0.5).unwrap_or(last);
    let minute = at(60.0);
    let first_minute_rate = minute.completed as f64 / minute.at_s.max(0.001);
    let before_last = samples
        .iter()
        .rev()
        .find(|s| s.at_s <= last.at_s - 59.5)
        .unwrap_or(first);
    let last_minute_rate = last.completed.saturating_sub(before_last.completed) as f64
        / (last.at_s - before_last.at_s).max(0.001);
    let rss = |s: &Sample| s.worker_rss_mib.iter().copied().fold(0.0, f64::max);
    let (rss_start, rss_end) = (rss(minute), rss(last));
    // Retention starts deleting `retention` after the first jobs finished; a minute more
    // lets the pruner catch up with the backlog of its first pass.
    let settled = at(retention.map_or(f64::INFINITY, |r| r.as_secs_f64()) + 60.0);
    let grew = |from: f64, to: f64| to <= from * 1.25;
    Steadiness {
        first_minute_rate,
        last_minute_rate,
        rate_held: last_minute_rate >= 0.9 * first_minute_rate,
        rss_start_mib: rss_start,
        rss_end_mib: rss_end,
        rss_flat: rss_end - rss_start <= (rss_start * 0.10).max(4.0),
        table_settled_mib: settled.jobs_table_mib,
        table_end_mib: last.jobs_table_mib,
        rows_settled: settled.job_rows,
        rows_end: last.job_rows,
        table_flat: grew(settled.jobs_table_mib, last.jobs_table_mib)
            && grew(settled.job_rows as f64, last.job_rows as f64),
    }
}

fn sample_header() -> String {
    format!(
        "{:>7} {:>10} {:>10} {:>10} {:>11} {:>10}  worker RSS MiB",
        "t (s)", "published", "finished", "jobs/s", "job rows", "table MiB"
    )
}

fn sample_line(s: &Sample) -> String {
    let rss: Vec<String> = s.worker_rss_mib.iter().map(|r| format!("{r:.1}")).collect();
    format!(
        "{:>7.0} {:>10} {:>10} {:>10.0} {:>11} {:>10.1}  {}",
        s.at_s,
        s.published,
        s.completed,
        s.completions_per_s,
        s.job_rows,
        s.jobs_table_mib,
        rss.join(" ")
    )
}

async fn wait_for_consumers(cfg: &Config, n: usize) -> anyhow::Result<()> {
    let conn = broker::connect(&cfg.amqp_url, "apiary bench probe").await?;
    let ch = conn.create_channel().await.context("channel")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let names = cfg.queue_names(DEFAULT_QUEUE);
    // One consumer per shard per worker.
    let want = n * usize::from(names.shards);
    loop {
        let d = broker::topology::depths(&ch, &names).await?;
        if d.consumers as usize >= want {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "workers did not start consuming within 30s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = conn.close(200, "".into()).await;
    Ok(())
}

/// Peak RSS (MiB, largest) and total CPU seconds of `pids`, from /proc.
fn proc_stats(pids: &[u32]) -> (f64, f64) {
    let mut peak: f64 = 0.0;
    let mut cpu = 0.0;
    // Clock ticks per second: 100 on Linux unless the kernel was built otherwise.
    let ticks = 100.0;
    for pid in pids {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            peak = peak.max(kib_field(&status, "VmHWM:") / 1024.0);
        }
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            && let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r)
        {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of stat; 12 and 13 after the comm field.
            let t = |i: usize| {
                fields
                    .get(i)
                    .and_then(|f| f.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            cpu += (t(11) + t(12)) / ticks;
        }
    }
    (peak, cpu)
}

fn rss_now(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| kib_field(&s, "VmRSS:") / 1024.0)
        .unwrap_or(0.0)
}

fn kib_field(status: &str, name: &str) -> f64 {
    status
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn print_report(r: &Report) {
    println!(
        "apiary bench: {} jobs, mode {:?}, {} worker(s), concurrency {}",
        r.jobs,
        r.mode,
        r.workers,
        r.concurrency
            .map_or("default".to_string(), |c| c.to_string())
    );
    println!(
        "  publish (record + confirm)   {:>10.0} jobs/s",
        r.publish_rate
    );
    if r.mode != Mode::Enqueue {
        println!("  end to end                   {:>10.0} jobs/s", r.e2e_rate);
        println!(
            "  drain                        {:>10.0} jobs/s",
            r.drain_rate
        );
        println!(
            "  latency p50/p95/p99          {:.1} / {:.1} / {:.1} ms",
            r.latency_ms.p50, r.latency_ms.p95, r.latency_ms.p99
        );
        if let Some(r) = &r.release_ms {
            println!(
                "  release p50/p95/p99          {:.1} / {:.1} / {:.1} ms (parent finished to child started)",
                r.p50, r.p95, r.p99
            );
        }
        println!(
            "  worker peak RSS / idle       {:.1} / {:.1} MiB",
            r.worker_peak_rss_mib, r.worker_idle_rss_mib
        );
        println!(
            "  worker CPU                   {:.2} s ({:.1} µs/job)",
            r.worker_cpu_seconds, r.worker_cpu_us_per_job
        );
    }
    if let Some(c) = &r.components {
        println!(
            "  broker / postgres CPU        {:.1} / {:.1} µs/job",
            c.broker_cpu_us_per_job, c.postgres_cpu_us_per_job
        );
        println!(
            "  postgres commits             {:.0}/s ({:.3} per job), WAL syncs {:.0}/s, WAL {:.0} B/job",
            c.pg_commits_per_s, c.pg_commits_per_job, c.pg_wal_syncs_per_s, c.wal_bytes_per_job
        );
        println!("  machine CPU busy             {:.0} %", c.box_cpu_busy_pct);
    }
    if !r.samples.is_empty() {
        println!("\n{}", sample_header());
        for s in &r.samples {
            println!("{}", sample_line(s));
        }
    }
    if let Some(on) = r.autovacuum {
        let vacuum = r
            .vacuum_every_s
            .map_or("no".to_string(), |v| format!("every {v:.0} s"));
        println!(
            "  server autovacuum: {}; bench VACUUM: {vacuum}",
            if on { "on" } else { "off" }
        );
    }
    if let Some(s) = &r.steady {
        let verdict = |ok: bool| if ok { "yes" } else { "NO" };
        println!(
            "  rate held (last minute / first)   {:.0} / {:.0} jobs/s: {}",
            s.last_minute_rate,
            s.first_minute_rate,
            verdict(s.rate_held)
        );
        println!(
            "  worker RSS flat (end / 1 min)     {:.1} / {:.1} MiB: {}",
            s.rss_end_mib,
            s.rss_start_mib,
            verdict(s.rss_flat)
        );
        println!(
            "  job table flat (end / settled)    {:.1} / {:.1} MiB, {} / {} rows: {}",
            s.table_end_mib,
            s.table_settled_mib,
            s.rows_end,
            s.rows_settled,
            verdict(s.table_flat)
        );
    }
}
