//! The `apiary` command line: one subcommand per role. Every setting is also an environment
//! variable; `apiary --help` lists them with their defaults. How a failure is told, and its
//! exit code, is in [`errors`].

pub mod errors;

#[cfg(feature = "api")]
use std::net::SocketAddr;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde_json::Value;

#[cfg(feature = "api")]
use crate::api::{self, AppState};
use crate::broker::{self, QueueNames};
use crate::client::{Client, EnqueueError};
use crate::config::Config;
use crate::handler::Registry;
use crate::job::NewJob;
use crate::progress::{Progress, ProgressArgs};
use crate::shutdown::Shutdown;
use crate::store;
#[cfg(feature = "api")]
use crate::tokens::Tokens;
use crate::worker::Worker;
use errors::{CliError, ErrorClass};

/// `apiary --version`: the crate's version and the schema version this binary expects (its
/// newest migration), e.g. `0.1.0 (schema 8)`.
pub static VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{} (schema {})",
        env!("CARGO_PKG_VERSION"),
        store::schema::expected_version()
    )
});

/// Apiary: background jobs on RabbitMQ, deduplicated and recorded in Postgres.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Parser)]
#[command(name = "apiary", version = VERSION.as_str(), about, long_about = None)]
pub struct Cli {
    /// Settings, from flags or environment variables.
    #[command(flatten)]
    pub config: Config,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the database if missing, apply migrations and declare the RabbitMQ queues.
    /// Safe to run concurrently and repeatedly.
    Migrate {
        /// How progress is shown.
        #[command(flatten)]
        progress: ProgressArgs,
    },
    /// Move the deployment's RabbitMQ queues to another type (`classic` or `quorum`), keeping
    /// every message. Stop every worker and producer first; then set APIARY_QUEUE_TYPE to the
    /// new type and start them again. Safe to run again after a failure: it resumes.
    MigrateQueues {
        /// The type to move to.
        #[arg(long, value_parser = parse_queue_type_arg)]
        to: crate::broker::topology::QueueType,
    },
    /// Serve the HTTP API (and, with the `dashboard` feature, the dashboard at `/`).
    #[cfg(feature = "api")]
    Api {
        /// Listen on a non-loopback address without API tokens. Anyone who can reach the
        /// port can then enqueue and read jobs.
        #[arg(long)]
        insecure_listen_any: bool,
    },
    /// Consume and run jobs with the built-in handlers (echo, sleep, fail, tally, collect).
    Worker,
    /// Enqueue one job and print its id.
    Enqueue {
        /// The handler name.
        kind: String,
        /// The payload, as JSON.
        #[arg(default_value = "null")]
        payload: String,
        /// Idempotency key: an existing (kind, dedup key) returns that job instead.
        #[arg(long)]
        dedup_key: Option<String>,
        /// Attempts allowed.
        #[arg(long)]
        max_attempts: Option<i32>,
        /// Run no earlier than this RFC 3339 instant.
        #[arg(long)]
        run_at: Option<chrono::DateTime<chrono::Utc>>,
        /// Run no earlier than this many milliseconds from now.
        #[arg(long)]
        delay_ms: Option<u64>,
        /// The queue (`[a-z0-9_.-]{1,64}`); the kind's queue, else `default`.
        #[arg(long = "queue", value_name = "QUEUE")]
        job_queue: Option<String>,
        /// 0 to 9, higher first; the kind's priority, else 0.
        #[arg(long)]
        priority: Option<u8>,
        /// Jobs sharing this key run at most the kind's `max_per_key` at a time.
        #[arg(long)]
        concurrency_key: Option<String>,
        /// A job that must succeed before this one starts (repeat for several, at most 100).
        /// The job is recorded `waiting`, and `cancelled` if a parent ends another way.
        #[arg(long = "depends-on", value_name = "JOB_ID")]
        depends_on: Vec<uuid::Uuid>,
        /// POST the job's final record here when it ends (signed; the host must be in
        /// `APIARY_WEBHOOK_HOSTS`); the kind's `callback_url` when absent.
        #[arg(long)]
        callback_url: Option<String>,
    },
    /// Show queue depths, live workers, and jobs by status in the last hour.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Check the invariants behind "nothing lost, nothing run twice" against the live
        /// database and broker; print each violation and exit 1 if there is any.
        #[arg(long)]
        check: bool,
    },
    /// Measure throughput, latency, CPU and memory on the configured servers.
    Bench(crate::bench::BenchArgs),
    /// Print a job as JSON.
    Job {
        /// The job id.
        id: uuid::Uuid,
    },
    /// Dead jobs: list them, or replay them with a fresh attempt budget.
    Dead {
        /// What to do.
        #[command(subcommand)]
        action: DeadAction,
    },
    /// Queues: list them, or pause and resume one. A pause reaches every worker within
    /// about a second and lasts until resumed, across restarts.
    Queue {
        /// What to do.
        #[command(subcommand)]
        action: QueueAction,
    },
    /// Periodic jobs: set, list, show, remove, pause and resume the deployment's schedules.
    /// Every worker fires them; each slot is one job.
    Schedule {
        /// What to do.
        #[command(subcommand)]
        action: ScheduleAction,
    },
    /// Cancel a job: one not yet started never runs; a running one is told to stop.
    Cancel {
        /// The job id.
        id: uuid::Uuid,
    },
    /// Check the configured Postgres and RabbitMQ, the schema, the queues, the broker's
    /// consumer_timeout and the clocks; print what is wrong with the fix for each. Exits 0
    /// when no check failed (warnings allowed, unless --strict), 1 otherwise.
    Doctor(crate::doctor::DoctorArgs),
    /// Print a shell completion script: `apiary completions bash > /etc/bash_completion.d/apiary`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

impl Command {
    /// The OpenTelemetry `service.name` of this command's spans, unless `OTEL_SERVICE_NAME`
    /// names one.
    pub fn service_name(&self) -> &'static str {
        match self {
            #[cfg(feature = "api")]
            Command::Api { .. } => "apiary-api",
            Command::Worker => "apiary-worker",
            _ => "apiary",
        }
    }

    /// The log filter when `RUST_LOG` is unset. A command that runs once reports its own failure,
    /// so lapin's log lines about the same refused or lost connection would only repeat it; the
    /// long-running roles keep them, since they carry on after a broker outage. Postgres's notices
    /// ("relation ... already exists, skipping", on every `migrate`) say nothing to act on.
    /// Doctor's passive declares of missing queues are how it finds them: its report says it.
    pub fn default_log_filter(&self) -> &'static str {
        match self {
            #[cfg(feature = "api")]
            Command::Api { .. } => "info,sqlx::postgres::notice=warn",
            Command::Worker => "info,sqlx::postgres::notice=warn",
            Command::Doctor(_) => "warn,sqlx::postgres::notice=warn,lapin=off",
            _ => "info,sqlx::postgres::notice=warn,lapin=off",
        }
    }
}

/// `apiary dead ...`.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Subcommand)]
pub enum DeadAction {
    /// List dead jobs, newest first, one JSON object per line.
    List {
        /// Only this kind.
        #[arg(long)]
        kind: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Replay dead jobs: same id and history, fresh attempts; their dead letters are removed.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["id", "kind", "all"])))]
    Replay {
        /// One job.
        #[arg(long)]
        id: Option<uuid::Uuid>,
        /// Every dead job of this kind.
        #[arg(long)]
        kind: Option<String>,
        /// Every dead job.
        #[arg(long)]
        all: bool,
        /// How progress is shown.
        #[command(flatten)]
        progress: ProgressArgs,
    },
}

/// `apiary queue ...`.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Subcommand)]
pub enum QueueAction {
    /// List the deployment's queues: paused or not, depths, running and waiting jobs.
    List {
        /// Print JSON (`{"queues": [...]}`, as `GET /v1/queues`) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Pause a queue: no worker starts another of its jobs (running ones finish); its
    /// messages wait in RabbitMQ, uncharged.
    Pause {
        /// The queue's name.
        name: String,
    },
    /// Resume a paused queue.
    Resume {
        /// The queue's name.
        name: String,
    },
}

/// `apiary schedule ...`.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Subcommand)]
pub enum ScheduleAction {
    /// Create or replace a schedule. A new cron or time zone counts its slots from now.
    Set {
        /// The schedule's name (`[a-z0-9_.-]{1,64}`).
        name: String,
        /// A cron expression: 5 fields, or 6 with a leading seconds field.
        #[arg(long)]
        cron: String,
        /// The kind of its jobs.
        #[arg(long)]
        kind: String,
        /// The payload of its jobs, as JSON.
        #[arg(long, default_value = "null")]
        payload: String,
        /// The IANA time zone the expression is read in.
        #[arg(long, default_value = "UTC")]
        timezone: String,
        /// The queue of its jobs; the kind's queue, else `default`.
        #[arg(long = "queue", value_name = "QUEUE")]
        job_queue: Option<String>,
        /// 0 to 9, higher first; the kind's priority, else 0.
        #[arg(long)]
        priority: Option<i64>,
        /// Attempts allowed per job; the kind's, else APIARY_MAX_ATTEMPTS.
        #[arg(long)]
        max_attempts: Option<i32>,
        /// Slots missed while no worker ran or it was paused: skip, one (the latest) or all.
        #[arg(long, default_value = "one")]
        missed: String,
    },
    /// List the schedules, one JSON object per line with --json.
    List {
        /// Print JSON (`{"schedules": [...]}`, as `GET /v1/schedules`) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a schedule as JSON, with its next five fire times and its recent jobs.
    Show {
        /// The schedule's name.
        name: String,
    },
    /// Remove a schedule; its jobs stay.
    Rm {
        /// The schedule's name.
        name: String,
    },
    /// Pause a schedule: no slot is enqueued until resumed.
    Pause {
        /// The schedule's name.
        name: String,
    },
    /// Resume a schedule; the slots of the pause follow its missed policy.
    Resume {
        /// The schedule's name.
        name: String,
    },
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // These two need no valid settings: completions use none, and doctor reports a bad one
    // among its findings.
    match &cli.command {
        Command::Completions { shell } => return crate::completions::print(*shell),
        Command::Doctor(args) => return crate::doctor::run(&cli.config, args).await,
        _ => {}
    }
    let cfg = cli.config.validate()?;
    match cli.command {
        Command::Completions { .. } | Command::Doctor(_) => Ok(()), // handled above
        Command::Bench(args) => crate::bench::run(&cfg, &args).await.map(|_| ()),
        Command::Status { json, check: true } => {
            let client = Client::new(&cfg)?;
            client.store().check_schema().await?;
            let violations = client.check().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&violations)?);
            } else if violations.is_empty() {
                println!("invariants hold: no violations");
            } else {
                for v in &violations {
                    match v.job {
                        Some(id) => println!("invariant {}: job {id}: {}", v.invariant, v.detail),
                        None => println!("invariant {}: {}", v.invariant, v.detail),
                    }
                }
            }
            if violations.is_empty() {
                Ok(())
            } else {
                anyhow::bail!("{} invariant violation(s)", violations.len())
            }
        }
        Command::Status { json, check: false } => {
            let client = Client::new(&cfg)?;
            let stats = client.stats().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                print!("{stats}");
            }
            Ok(())
        }
        Command::Dead {
            action: DeadAction::List { kind, limit },
        } => {
            let store = store::Store::connect_lazy(&cfg.database_url, 2)?;
            for job in store.list_dead(kind.as_deref(), limit).await? {
                println!("{}", serde_json::to_string(&job)?);
            }
            Ok(())
        }
        Command::Dead {
            action:
                DeadAction::Replay {
                    id,
                    kind,
                    all,
                    progress,
                },
        } => {
            use crate::store::dead_job::ReplaySelector;
            let selector = match (id, kind, all) {
                (Some(id), _, _) => ReplaySelector::Id(id),
                (None, Some(kind), _) => ReplaySelector::Kind(kind),
                _ => ReplaySelector::All,
            };
            let client = Client::new(&cfg)?;
            let shown = Progress::spinner("replay: moving dead jobs back to queued", &progress);
            let replayed = client
                .replay_reporting(&selector, |done, total| {
                    if done == 0 {
                        shown.phase("replay: published", Some(total as u64), 0);
                    } else {
                        shown.set(done as u64);
                    }
                })
                .await;
            shown.finish();
            let ids = replayed?;
            for id in &ids {
                println!("{id}");
            }
            eprintln!("replayed {} job(s)", ids.len());
            Ok(())
        }
        Command::Queue { action } => queue(&cfg, action).await,
        Command::Schedule { action } => schedule(&cfg, action).await,
        Command::Cancel { id } => {
            use crate::store::cancel_job::CancelOutcome;
            let store = store::Store::connect_lazy(&cfg.database_url, 2)?;
            match store.cancel_job(id).await? {
                CancelOutcome::Cancelled => println!("cancelled"),
                CancelOutcome::Requested => {
                    println!("cancellation requested; the running handler is being told")
                }
                CancelOutcome::AlreadyFinal(s) => {
                    return Err(CliError::new(
                        ErrorClass::Input,
                        format!("job {id} has already finished ({s})"),
                    )
                    .into());
                }
                CancelOutcome::NotFound => return Err(no_job(id).into()),
            }
            Ok(())
        }
        Command::Migrate { progress } => migrate(&cfg, &progress).await,
        Command::MigrateQueues { to } => migrate_queues(&cfg, to).await,
        #[cfg(feature = "api")]
        Command::Api {
            insecure_listen_any,
        } => serve_api(cfg, insecure_listen_any).await,
        Command::Worker => {
            crate::telemetry::init_metrics();
            let shutdown = Shutdown::on_signals().context("installing signal handlers")?;
            let worker = Worker::new(cfg, Registry::builtins(), shutdown)?;
            worker.run().await?;
            Ok(())
        }
        Command::Enqueue {
            kind,
            payload,
            dedup_key,
            max_attempts,
            run_at,
            delay_ms,
            job_queue,
            priority,
            concurrency_key,
            depends_on,
            callback_url,
        } => {
            let payload: Value = serde_json::from_str(&payload).map_err(|e| {
                CliError::new(
                    ErrorClass::Input,
                    format!("the payload is not valid JSON: {e}"),
                )
            })?;
            let client = Client::new(&cfg)?;
            client.store().check_schema().await?;
            let job = NewJob {
                id: None,
                kind,
                payload,
                dedup_key,
                max_attempts,
                run_at,
                delay_ms,
                queue: job_queue,
                priority,
                concurrency_key,
                depends_on,
                callback_url,
            };
            let enqueued = match client.enqueue(job).await {
                Ok(e) => e,
                Err(e) => {
                    // Recorded all the same: say which job, then why it is not on its way.
                    if let EnqueueError::NotPublished { ids, .. } = &e {
                        for id in ids {
                            println!("{id}");
                        }
                    }
                    return Err(e.into());
                }
            };
            println!("{}", enqueued.job.id);
            if !enqueued.created {
                eprintln!("(already existed: {})", enqueued.job.status());
            } else if let Ok(workers) = client.store().live_workers(cfg.lease * 3).await {
                // The queues this deployment's workers consume (one from before named
                // queues consumes `default`), each with the worker's kinds.
                let workers: Vec<(String, Option<Vec<String>>)> = workers
                    .into_iter()
                    .filter(|w| w.queue == cfg.queue)
                    .flat_map(|w| {
                        let queues: Vec<String> = match &w.queues {
                            Some(q) => q.keys().cloned().collect(),
                            None => vec![crate::job::DEFAULT_QUEUE.to_string()],
                        };
                        queues.into_iter().map(move |q| (q, w.kinds.clone()))
                    })
                    .collect();
                if let Some(w) =
                    errors::unserved_kind(&enqueued.job.kind, &enqueued.job.queue, &workers)
                {
                    errors::warn(&w);
                }
            }
            Ok(())
        }
        Command::Job { id } => {
            let store = store::Store::connect_lazy(&cfg.database_url, 2)?;
            let job = store.get_job(id).await?.ok_or_else(|| no_job(id))?;
            println!("{}", serde_json::to_string_pretty(&job)?);
            Ok(())
        }
    }
}

async fn queue(cfg: &Config, action: QueueAction) -> anyhow::Result<()> {
    let client = Client::new(cfg)?;
    match action {
        QueueAction::List { json } => {
            client.store().check_schema().await?;
            let queues = client.queues().await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "queues": queues }))?
                );
            } else {
                print!("{}", crate::client::QueueTable(&queues));
            }
        }
        QueueAction::Pause { name } => {
            let q = set_paused(&client, &name, true).await?;
            println!(
                "paused {} ({} ready, {} running)",
                q.name, q.ready, q.in_flight
            );
        }
        QueueAction::Resume { name } => {
            let q = set_paused(&client, &name, false).await?;
            println!("resumed {} ({} ready)", q.name, q.ready);
        }
    }
    Ok(())
}

/// Pauses or resumes `name`: a bad name is told before anything connects, an old schema
/// before anything is written.
async fn set_paused(
    client: &Client,
    name: &str,
    paused: bool,
) -> anyhow::Result<crate::client::QueueInfo> {
    crate::job::validate_queue(name)?;
    client.store().check_schema().await?;
    Ok(if paused {
        client.pause(name).await?
    } else {
        client.resume(name).await?
    })
}

async fn schedule(cfg: &Config, action: ScheduleAction) -> anyhow::Result<()> {
    use crate::schedule::{Missed, ScheduleSpec, validate_name};
    // Bad input is told before anything connects.
    let spec = match &action {
        ScheduleAction::Set {
            name,
            cron,
            kind,
            payload,
            timezone,
            job_queue,
            priority,
            max_attempts,
            missed,
        } => {
            let payload: Value = serde_json::from_str(payload).map_err(|e| {
                CliError::new(
                    ErrorClass::Input,
                    format!("--payload is not valid JSON: {e}"),
                )
            })?;
            let spec = ScheduleSpec {
                cron: cron.clone(),
                timezone: timezone.clone(),
                kind: kind.clone(),
                payload,
                queue: job_queue.clone(),
                max_attempts: max_attempts.map(i64::from),
                priority: *priority,
                missed: missed.parse::<Missed>()?,
            };
            spec.validate(name, cfg.max_payload_bytes, chrono::Utc::now())?;
            Some(spec)
        }
        ScheduleAction::Show { name }
        | ScheduleAction::Rm { name }
        | ScheduleAction::Pause { name }
        | ScheduleAction::Resume { name } => {
            validate_name(name)?;
            None
        }
        ScheduleAction::List { .. } => None,
    };
    let client = Client::new(cfg)?;
    client.store().check_schema().await?;
    match action {
        ScheduleAction::Set { name, .. } => {
            let Some(spec) = spec else { return Ok(()) };
            let set = client.set_schedule(&name, &spec).await?;
            let next = set
                .schedule
                .next_at
                .map_or("never".to_string(), |t| t.to_rfc3339());
            println!(
                "{} schedule {name} (next slot {next})",
                if set.created { "created" } else { "updated" }
            );
        }
        ScheduleAction::List { json } => {
            let schedules = client.schedules().await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "schedules": schedules }))?
                );
            } else {
                println!(
                    "  {:<24}  {:<20}  {:<16}  {:<16}  {:<6}  {:<6}  next",
                    "name", "cron", "timezone", "kind", "missed", "paused"
                );
                for s in schedules {
                    println!(
                        "  {:<24}  {:<20}  {:<16}  {:<16}  {:<6}  {:<6}  {}",
                        s.name,
                        s.cron,
                        s.timezone,
                        s.kind,
                        s.missed,
                        if s.paused { "yes" } else { "no" },
                        s.next_at.map_or("never".to_string(), |t| t.to_rfc3339())
                    );
                }
            }
        }
        ScheduleAction::Show { name } => {
            let info = client.schedule(&name).await?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        ScheduleAction::Rm { name } => {
            client.delete_schedule(&name).await?;
            println!("removed schedule {name}");
        }
        ScheduleAction::Pause { name } => {
            client.pause_schedule(&name).await?;
            println!("paused schedule {name}");
        }
        ScheduleAction::Resume { name } => {
            client.resume_schedule(&name).await?;
            println!("resumed schedule {name}");
        }
    }
    Ok(())
}

fn no_job(id: uuid::Uuid) -> CliError {
    CliError::new(ErrorClass::NotFound, format!("no job with id {id}"))
}

/// Parses `--to`.
fn parse_queue_type_arg(s: &str) -> Result<crate::broker::topology::QueueType, String> {
    crate::broker::topology::QueueType::parse(s)
        .ok_or_else(|| format!("{s:?} is not a queue type; it must be classic or quorum"))
}

/// `apiary migrate-queues --to TYPE`: every queue the deployment knows (configured, paused,
/// or consumed by a recent worker), with the shards each has ever had, moved by
/// [`broker::migrate`].
async fn migrate_queues(
    cfg: &Config,
    to: crate::broker::topology::QueueType,
) -> anyhow::Result<()> {
    let store = store::Store::connect_lazy(&cfg.database_url, 2)?;
    let known = store
        .known_queues(
            &cfg.queue,
            &cfg.configured_queues(),
            std::time::Duration::from_secs(86_400),
        )
        .await?;
    // Shards left over from a larger count are moved too: they may still hold messages.
    let mut names: Vec<QueueNames> = Vec::with_capacity(known.len());
    for q in &known {
        let n = cfg.queue_names(q);
        let recorded = store.recorded_shards(&n.work).await?;
        let shards = n.shards.max(recorded);
        names.push(n.with_shards(shards));
    }
    let conn = broker::connect(&cfg.amqp_url, "apiary migrate-queues")
        .await
        .context("connecting to RabbitMQ")?;
    let moved = broker::migrate::migrate_queues(&conn, &names, to).await;
    let _ = conn.close(200, "done".into()).await;
    let moved = moved?;
    for m in &moved {
        if m.converted {
            println!("{}: now {to}, {} message(s) kept", m.queue, m.messages);
        } else {
            println!("{}: already {to}", m.queue);
        }
    }
    if to != cfg.queue_type {
        eprintln!("now set APIARY_QUEUE_TYPE={to} for every worker and producer");
    }
    Ok(())
}

async fn migrate(cfg: &Config, progress: &ProgressArgs) -> anyhow::Result<()> {
    // A bad schedules file is a configuration error, told before anything is written.
    let schedules = match &cfg.schedules_file {
        Some(path) => Some(crate::schedule::file::load(
            path,
            cfg.max_payload_bytes,
            chrono::Utc::now(),
        )?),
        None => None,
    };
    // A migration is SQL that Postgres runs as a whole, so there is no count within one: the
    // display says which migration is running and for how long (long on a large table).
    let shown = Progress::spinner("migrating", progress);
    let began = std::time::Instant::now();
    let mut applied = 0;
    let migrated = store::migrate_reporting(&cfg.database_url, |step| {
        applied = step.count;
        shown.phase(
            &format!(
                "applying migration {}/{}: {:04}_{}",
                step.index + 1,
                step.count,
                step.version,
                step.description.replace(' ', "_")
            ),
            None,
            0,
        );
    })
    .await;
    shown.finish();
    migrated.context("migrating Postgres")?;
    // The summary comes last, so that a failure on RabbitMQ is the first thing said.
    let conn = broker::connect(&cfg.amqp_url, "apiary migrate")
        .await
        .context("connecting to RabbitMQ")?;
    let channel = conn.create_channel().await.context("opening a channel")?;
    let ledger = store::Store::connect_lazy(&cfg.database_url, 1)?;
    for queue in cfg.configured_queues() {
        let names = cfg.queue_names(&queue);
        ledger.record_shards(&names.work, names.shards).await?;
        broker::topology::declare(&conn, &channel, &names, cfg.queue_type)
            .await
            .context("declaring queues")?;
    }
    let _ = conn.close(200, "done".into()).await;
    if let Some(specs) = schedules {
        let count = specs.len();
        let removed = Client::new(cfg)?.apply_schedules_file(specs).await?;
        eprintln!(
            "schedules file: {count} schedule(s) set{}",
            if removed.is_empty() {
                String::new()
            } else {
                format!(", removed {}", removed.join(", "))
            }
        );
    }
    let schema = store::schema::expected_version();
    if applied == 0 {
        eprintln!("no migrations to apply: schema {schema} is current");
    } else {
        eprintln!(
            "applied {applied} migration(s) in {}: schema {schema}",
            crate::progress::human(began.elapsed())
        );
    }
    tracing::info!(queue = %cfg.queue, "database migrated and queues declared");
    Ok(())
}

#[cfg(feature = "api")]
async fn serve_api(cfg: Config, insecure_listen_any: bool) -> anyhow::Result<()> {
    check_listen_addr(cfg.http_addr, insecure_listen_any, &cfg.api_tokens)?;
    let shutdown = Shutdown::on_signals().context("installing signal handlers")?;
    crate::telemetry::init_metrics();
    let client = Client::new(&cfg)?;
    client.store().check_schema().await?;
    let state = AppState::new(
        client,
        shutdown,
        cfg.max_payload_bytes,
        cfg.api_tokens.clone(),
    );
    api::serve(cfg.http_addr, state)
        .await
        .context("serving the API")?;
    tracing::info!("api stopped");
    Ok(())
}

#[cfg(feature = "api")]
/// Without tokens the API is open to anyone who reaches it, so it listens on loopback unless
/// told otherwise; with tokens every job route needs one, so any address will do. Says at
/// start-up which of the two it is.
fn check_listen_addr(
    addr: SocketAddr,
    insecure_listen_any: bool,
    tokens: &Tokens,
) -> anyhow::Result<()> {
    if !tokens.is_empty() {
        tracing::info!(
            "API tokens configured: {} tokens; bearer authentication required",
            tokens.len()
        );
        return Ok(());
    }
    if addr.ip().is_loopback() {
        tracing::info!("no API tokens configured: authentication off, listening on loopback only");
        return Ok(());
    }
    if insecure_listen_any {
        tracing::warn!(%addr, "listening beyond loopback WITHOUT authentication (--insecure-listen-any)");
        return Ok(());
    }
    Err(CliError::new(
        ErrorClass::Config,
        format!(
            "refusing to listen on {addr} without authentication: use a loopback address, or \
             pass --insecure-listen-any to accept unauthenticated requests from the network"
        ),
    )
    .into())
}
