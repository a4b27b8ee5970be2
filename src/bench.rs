//! `apiary bench`: Apiary measured end to end on the configured Postgres and RabbitMQ, the way
//! `../shared/bench` measures Celery and Dramatiq, so the figures sit side by side.
//!
//! It makes a scratch database and queue, enqueues N `echo` jobs through the library (recorded
//! in Postgres, published with confirms), runs real `apiary worker` processes until every
//! result is committed, reads the timings back from the job records, samples the workers'
//! CPU and peak memory from `/proc`, and removes everything it made.

use std::io::IsTerminal;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::json;

use crate::broker::{self, QueueNames};
use crate::client::Client;
use crate::config::Config;
use crate::job::NewJob;

/// How the work arrives.
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
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Keep the scratch database and queues afterwards (to inspect them).
    #[arg(long)]
    pub keep: bool,
    /// Give up after this long.
    #[arg(long, default_value = "10m", value_parser = crate::config::parse_duration)]
    pub timeout: Duration,
}

/// What one run measured.
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
    /// Largest peak RSS among the workers, MiB.
    pub worker_peak_rss_mib: f64,
    /// Workers' RSS once idle after the run, MiB (largest).
    pub worker_idle_rss_mib: f64,
    /// CPU seconds used by all workers.
    pub worker_cpu_seconds: f64,
    /// Worker CPU per job, microseconds.
    pub worker_cpu_us_per_job: f64,
}

/// p50/p95/p99.
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
        broker::topology::declare(&ch, &QueueNames::new(&cfg.queue)).await?;
        let _ = conn.close(200, "".into()).await;
    }
    let result = measure(&cfg, args).await;
    if args.keep {
        eprintln!("kept database {} and queue {}", cfg.database_url, cfg.queue);
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
            for q in QueueNames::new(&self.cfg.queue).all() {
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
                .env("APIARY_WORKER_HTTP_ADDR", "127.0.0.1:0")
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .kill_on_drop(true);
            if let Some(c) = args.concurrency {
                cmd.env("APIARY_CONCURRENCY", c.to_string());
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
    let client = Client::new(cfg)?;
    client.publisher().ensure_connected().await?;
    let pool = client.store().pool().clone();
    let payload = json!({ "data": "x".repeat(args.payload_bytes.saturating_sub(12)) });
    let mut workers = None;
    let mut workers_started = None;
    if args.mode == Mode::Live {
        let w = Workers::start(cfg, args)?;
        wait_for_consumers(cfg, args.workers).await?;
        workers_started = Some(chrono::Utc::now());
        workers = Some(w);
    }
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
    listener.listen(crate::store::DONE_CHANNEL).await?;
    let progress = Progress::new(args.jobs);
    let started = Instant::now();
    // Publishers take batches from a shared counter; paced, each batch waits for its due time.
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut publishers = tokio::task::JoinSet::new();
    for _ in 0..args.publishers.max(1) {
        let (client, payload, next, sent) =
            (client.clone(), payload.clone(), next.clone(), sent.clone());
        let (jobs, batch, rate, mode) =
            (args.jobs, args.enqueue_batch.max(1), args.rate, args.mode);
        publishers.spawn(async move {
            loop {
                let from = next.fetch_add(batch, std::sync::atomic::Ordering::Relaxed);
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
                let jobs: Vec<NewJob> = (0..n)
                    .map(|_| NewJob::new("echo", payload.clone()))
                    .collect();
                client.enqueue_many(jobs).await?;
                sent.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    while let Some(r) = publishers.join_next().await {
        r.context("a publisher task failed")??;
        progress.show("enqueued", sent.load(std::sync::atomic::Ordering::Relaxed));
    }
    let published = started.elapsed();
    if args.mode == Mode::Enqueue {
        progress.done();
        return Ok(Report {
            mode: args.mode,
            jobs: args.jobs,
            workers: 0,
            concurrency: None,
            rate: None,
            publish_rate: args.jobs as f64 / published.as_secs_f64(),
            e2e_rate: 0.0,
            drain_rate: 0.0,
            latency_ms: Percentiles::default(),
            worker_peak_rss_mib: 0.0,
            worker_idle_rss_mib: 0.0,
            worker_cpu_seconds: 0.0,
            worker_cpu_us_per_job: 0.0,
        });
    }
    let workers = match workers {
        Some(w) => w,
        None => {
            workers_started = Some(chrono::Utc::now());
            Workers::start(cfg, args)?
        }
    };
    // Count finished jobs from the completions' NOTIFYs rather than by scanning the table,
    // which would compete with the system under test.
    let deadline = tokio::time::Instant::now() + args.timeout;
    let mut done = 0usize;
    while done < args.jobs {
        let n = tokio::time::timeout_at(deadline, listener.recv()).await;
        let n = match n {
            Ok(n) => n.context("listening for finished jobs")?,
            Err(_) => anyhow::bail!(
                "only {done} of {} jobs finished within {:?}",
                args.jobs,
                args.timeout
            ),
        };
        done += n.payload().split(',').count();
        progress.show("finished", done);
    }
    progress.done();
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
    let lat: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM finished_at - created_at)::float8 * 1000 FROM apiary_jobs ORDER BY 1",
    )
    .fetch_all(&pool)
    .await?;
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let pids = workers.pids();
    let (peak, cpu) = proc_stats(&pids);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = pids.iter().map(|p| rss_now(*p)).fold(0.0, f64::max);
    workers.stop().await;
    Ok(Report {
        mode: args.mode,
        jobs: args.jobs,
        workers: args.workers,
        concurrency: args.concurrency,
        rate: args.rate,
        publish_rate: args.jobs as f64 / published.as_secs_f64(),
        e2e_rate: args.jobs as f64 / span.as_secs_f64(),
        drain_rate: args.jobs as f64 / drain_span.as_secs_f64().max(0.001),
        latency_ms: Percentiles {
            p50: pct(0.50),
            p95: pct(0.95),
            p99: pct(0.99),
        },
        worker_peak_rss_mib: peak,
        worker_idle_rss_mib: idle,
        worker_cpu_seconds: cpu,
        worker_cpu_us_per_job: cpu * 1e6 / args.jobs as f64,
    })
}

async fn wait_for_consumers(cfg: &Config, n: usize) -> anyhow::Result<()> {
    let conn = broker::connect(&cfg.amqp_url, "apiary bench probe").await?;
    let ch = conn.create_channel().await.context("channel")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = broker::topology::depths(&ch, &QueueNames::new(&cfg.queue)).await?;
        if d.consumers as usize >= n {
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

/// A one-line progress display, only on a terminal.
struct Progress {
    total: usize,
    tty: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        Progress {
            total,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn show(&self, what: &str, n: usize) {
        if self.tty {
            let width = 30;
            let filled = (n * width / self.total.max(1)).min(width);
            eprint!(
                "\r[{}{}] {what} {n}/{}   ",
                "#".repeat(filled),
                " ".repeat(width - filled),
                self.total
            );
        }
    }

    fn done(&self) {
        if self.tty {
            eprintln!();
        }
    }
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
        println!(
            "  worker peak RSS / idle       {:.1} / {:.1} MiB",
            r.worker_peak_rss_mib, r.worker_idle_rss_mib
        );
        println!(
            "  worker CPU                   {:.2} s ({:.1} µs/job)",
            r.worker_cpu_seconds, r.worker_cpu_us_per_job
        );
    }
}
