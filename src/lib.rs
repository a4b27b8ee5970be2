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
//! 4. **Consume and claim** ([`broker::consume`], [`worker::executor`], [`store::claim_job`]):
//!    a guarded statement makes each job run at most once at a time and never again once
//!    finished.
//! 5. **Run the handler** ([`handler`]) under a timeout and a panic guard.
//! 6. **Commit the result, then ack** ([`worker::completer`], [`store::finish_job`]): in
//!    batches, fenced by the claim, with the handler's own writes in the same transaction.
//! 7. **Poll the result** ([`api::jobs`]), by id or dedup key, or long-poll until it finishes.
//!
//! Retries wait in broker delay queues ([`broker::topology`]), not in a worker's memory; dead
//! jobs go to a dead-letter queue with their reason.
//!
//! # Embedding
//!
//! Register your handlers and run a worker:
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
#![warn(missing_docs)]

pub mod api;
pub mod bench;
pub mod broker;
pub mod cli;
pub mod client;
pub mod completions;
pub mod config;
pub mod doctor;
pub mod handler;
pub mod job;
pub mod progress;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod wire;
pub mod worker;

pub use client::{Client, EnqueueError, Enqueued};
pub use config::Config;
pub use handler::{Handler, HandlerError, JobContext, Registry};
pub use job::{Job, JobId, JobStatus, NewJob};
pub use shutdown::Shutdown;
pub use worker::Worker;
