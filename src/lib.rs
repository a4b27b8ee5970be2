//! Apiary: a background job worker pool on RabbitMQ and Postgres.
//!
//! Producers enqueue jobs; interchangeable, stateless workers consume them from RabbitMQ,
//! run each one at most once to completion per dedup key, and record the result in Postgres,
//! where an HTTP API serves it.
//!
//! # A job's path, and where each step lives
//!
//! 1. **Enqueue** ([`client::Client::enqueue`], `POST /v1/jobs` in [`api::enqueue`], the CLI,
//!    or any AMQP client publishing the [`wire`] format).
//! 2. **Record** it in Postgres with an outbox entry ([`store::insert_job`]).
//! 3. **Publish** it with a publisher confirm ([`broker::publish`]); the outbox relay
//!    ([`worker::rescuer`]) covers a producer that dies in between.
//! 4. **Consume and claim** ([`broker::consume`], `worker/consume.rs` and `worker/claim.rs`,
//!    [`store::claim_job`], [`store::limits`] for kinds with limits):
//!    a guarded statement makes each job run at most once at a time and never again once
//!    finished.
//! 5. **Run the handler** ([`handler`]) under a timeout and a panic guard.
//! 6. **Commit the result, then ack** (`worker/commit.rs`, [`store::finish_job`]): in
//!    batches, fenced by the claim, with the handler's own writes in the same transaction.
//! 7. **Poll the result** ([`api::jobs`]), by id or dedup key, or long-poll until it finishes.
//!
//! Periodic jobs ([`schedule`]) enter at step 1 too: every worker fires due schedules
//! (`worker/scheduler.rs`, [`store::fire_schedules`]), each slot one job by its dedup key.
//!
//! Retries wait in broker delay queues ([`broker::topology`]), not in a worker's memory; dead
//! jobs go to a dead-letter queue with their reason. The queues are classic or quorum
//! (`APIARY_QUEUE_TYPE`); [`broker::migrate`] moves a deployment's queues from one type to the
//! other. `AMQP_URL` may list several nodes, tried in turn ([`broker::connect`]).
//!
//! A job with `depends_on` stops at step 2 as `waiting`: a trigger releases it in the
//! transaction of its last parent's success, and step 6 publishes it
//! ([`store::dependencies`]). A batch's last child to finish enqueues its callback the same way
//! ([`store::batches`], `POST /v1/batches` in [`api::batches`]).
//!
//! # Guide: a typed job from enqueue to result
//!
//! A job's arguments are a serde type that names its kind once ([`JobArgs`]); its handler
//! receives them decoded ([`Work`]); the [`Client`] enqueues them and reads the result back.
//! A payload that does not fit the type (sent by a producer in another language, say) fails
//! the job permanently, and its error names the field.
//!
//! ```
//! use std::time::Duration;
//!
//! use apiary::handler::{HandlerError, JobContext, Work};
//! use apiary::{Client, Config, JobArgs, JobStatus, Registry, Shutdown, Worker};
//! use serde::{Deserialize, Serialize};
//!
//! // 1. The job: its arguments, and its kind, spelled here only.
//! #[derive(Serialize, Deserialize)]
//! struct SendWelcome {
//!     email: String,
//! }
//!
//! impl JobArgs for SendWelcome {
//!     const KIND: &'static str = "send_welcome";
//! }
//!
//! // 2. Its handler, which gets the arguments decoded.
//! struct Welcomer;
//!
//! impl Work for Welcomer {
//!     type Args = SendWelcome;
//!     type Output = String; // stored as the job's result
//!
//!     async fn work(&self, args: SendWelcome, _ctx: &mut JobContext) -> Result<String, HandlerError> {
//!         Ok(format!("welcomed {}", args.email))
//!     }
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Settings come from DATABASE_URL, AMQP_URL, APIARY_QUEUE, ... (see `apiary --help`).
//! let cfg = Config::from_env()?;
//! # let (cfg, _world) = doc_world::Isolated::new(cfg).await?;
//!
//! // 3. A worker that serves the kind. A program of its own would stop on signals
//! //    (`Shutdown::on_signals()`); this one stops itself once it has the result.
//! let mut registry = Registry::new();
//! registry.add(Welcomer);
//! let shutdown = Shutdown::new();
//! let worker = tokio::spawn(Worker::new(cfg.clone(), registry, shutdown.clone())?.run());
//!
//! // 4. Enqueue: recorded in Postgres, then published to RabbitMQ.
//! let client = Client::new(&cfg)?;
//! let enqueued = client.enqueue(SendWelcome { email: "ada@example.com".into() }).await?;
//!
//! // 5. Read the result, waiting up to ten seconds for the job to finish.
//! let job = client.wait(enqueued.job.id, Duration::from_secs(10)).await?.ok_or("no job")?;
//! assert_eq!(job.status(), JobStatus::Succeeded);
//! assert_eq!(job.result_as::<String>()?.as_deref(), Some("welcomed ada@example.com"));
//!
//! // Drain: finish what runs, then stop.
//! shutdown.drain.cancel();
//! worker.await??;
//! # Ok(())
//! # }
//! #
//! # /// An isolated world for this example: its own database and queues on the servers
//! # /// `DATABASE_URL` and `AMQP_URL` point at, removed when it ends.
//! # mod doc_world {
//! #     pub struct Isolated { admin_url: String, database: String, amqp_url: String, queue: String }
//! #
//! #     impl Isolated {
//! #         pub async fn new(mut cfg: apiary::Config)
//! #             -> Result<(apiary::Config, Isolated), Box<dyn std::error::Error>> {
//! #             let short = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
//! #             let base = cfg.database_url.split('?').next().unwrap_or_default();
//! #             // The server part: the URL up to the database's name, if it names one.
//! #             let host_at = base.find("://").map_or(0, |i| i + 3);
//! #             let server = base[host_at..].find('/').map_or(base, |i| &base[..host_at + i]).to_string();
//! #             let database = format!("apiary_doc_{short}");
//! #             cfg.database_url = format!("{server}/{database}");
//! #             cfg.queue = format!("apiary.doc.{short}");
//! #             let world = Isolated {
//! #                 admin_url: format!("{server}/postgres"),
//! #                 database,
//! #                 amqp_url: cfg.amqp_url.clone(),
//! #                 queue: cfg.queue.clone(),
//! #             };
//! #             apiary::store::migrate(&cfg.database_url).await?;
//! #             Ok((cfg, world))
//! #         }
//! #     }
//! #
//! #     impl Drop for Isolated {
//! #         fn drop(&mut self) {
//! #             let (admin, db, amqp) = (self.admin_url.clone(), self.database.clone(), self.amqp_url.clone());
//! #             let queues = apiary::broker::QueueNames::new(&self.queue).all();
//! #             // Drop runs inside the example's runtime, which cannot block on itself.
//! #             let cleanup = std::thread::spawn(move || {
//! #                 let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
//! #                 rt.block_on(async move {
//! #                     use sqlx::Connection;
//! #                     if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
//! #                         let sql = format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)");
//! #                         let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await;
//! #                     }
//! #                     if let Ok(conn) = apiary::broker::connect(&amqp, "apiary doc cleanup").await
//! #                         && let Ok(ch) = conn.create_channel().await
//! #                     {
//! #                         for q in queues {
//! #                             let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
//! #                         }
//! #                         let _ = conn.close(200, "".into()).await;
//! #                     }
//! #                 });
//! #             });
//! #             let _ = cleanup.join();
//! #         }
//! #     }
//! # }
//! ```
//!
//! To enqueue with options (a dedup key, a delay, an attempt budget), wrap the arguments in a
//! [`TypedJob`]; [`Client::enqueue_many`] takes a `Vec` of either. The JSON API of the next
//! section stays beside the typed one: a [`NewJob`] names its kind as a string, and
//! [`Client::enqueue`] takes it too.
//!
//! # Embedding with JSON handlers
//!
//! A [`Handler`] reads the payload itself, as JSON or any type, and is registered under a
//! kind given as a string:
//!
//! ```no_run
//! use apiary::{Config, Registry, Shutdown, Worker};
//! use apiary::handler::{Handler, HandlerError, JobContext};
//!
//! struct Resize;
//! impl Handler for Resize {
//!     type Output = serde_json::Value;
//!     async fn handle(&self, ctx: &mut JobContext) -> Result<Self::Output, HandlerError> {
//!         let url: String = ctx.payload()?;
//!         Ok(serde_json::json!({ "resized": url }))
//!     }
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let mut registry = Registry::new();
//! registry.register("resize", Resize);
//! let worker = Worker::new(Config::from_env()?, registry, Shutdown::on_signals()?)?;
//! worker.run().await?;
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! In brief; the README's "Guarantees" section states each one in full, with its limits, and
//! its "How the promise is tested" section says which tests hold it.
//!
//! - **Nothing is lost.** An enqueued job is recorded in Postgres, with an outbox row, before
//!   it is published; until it finishes, a message, an outbox row or a live lease always
//!   carries it back to a worker, whichever worker dies.
//! - **At most one completion per `(kind, dedup_key)`**, or per id for jobs without a key.
//!   Enqueueing a taken key returns the existing job.
//! - **Postgres effects happen effectively once.** Writes through [`JobContext::tx`] commit in
//!   the transaction that records the job's success, fenced by the claim on this attempt.
//! - **Effects outside Postgres happen at least once**: make them idempotent, for example with
//!   [`JobContext::id`] as the idempotency key.
//! - **Ack after commit**, so a crash at any point leaves the job to be run or finished, never
//!   forgotten; a finished job stays finished.
//! - **Bad input costs nothing else.** A payload that does not fit its type, or a message that
//!   is not a job, is `dead` at once with its reason; no other job is charged for it.
//! - **Waits live in the broker.** Retries and scheduled jobs wait in delay queues, never in a
//!   worker's memory.
#![warn(missing_docs)]

#[cfg(feature = "api")]
pub mod api;
pub mod args;
pub mod bench;
pub mod broker;
pub mod cli;
pub mod client;
pub mod completions;
pub mod config;
#[cfg(feature = "dashboard")]
pub mod dashboard;
pub mod doctor;
pub mod handler;
pub mod job;
pub mod progress;
pub mod schedule;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod tokens;
pub mod trace;
pub mod webhook;
pub mod wire;
pub mod worker;

pub use args::{IntoNewJob, JobArgs, TypedJob};
pub use client::{Client, EnqueueError, Enqueued};
pub use config::Config;
pub use handler::{Handler, HandlerError, JobContext, Registry, Work};
pub use job::{Job, JobId, JobStatus, NewJob};
pub use schedule::{Missed, ScheduleSpec};
pub use shutdown::Shutdown;
pub use worker::Worker;
