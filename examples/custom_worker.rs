//! A worker binary of your own: register your handlers next to (or instead of) the built-in
//! ones and run the pool. Configuration comes from the same environment variables as
//! `apiary worker` (DATABASE_URL, AMQP_URL, APIARY_QUEUE, APIARY_CONCURRENCY, ...).
//!
//! ```sh
//! cargo run --example custom_worker
//! apiary enqueue word_count '{"text": "to be or not to be"}'
//! ```

use std::time::Duration;

use apiary::handler::{Handler, HandlerError, JobContext, KindOptions};
use apiary::{Config, Registry, Shutdown, Worker};
use serde::Deserialize;
use serde_json::{Value, json};

/// Counts the words of `{"text": "..."}` and records the count in the job's transaction.
struct WordCount;

#[derive(Deserialize)]
struct Input {
    text: String,
}

impl Handler for WordCount {
    type Output = Value;

    async fn handle(&self, ctx: &mut JobContext) -> Result<Value, HandlerError> {
        let Input { text } = ctx.payload()?;
        if text.is_empty() {
            // Retrying the same input cannot help.
            return Err(HandlerError::permanent("text is empty"));
        }
        let words = text.split_whitespace().count() as i64;
        // Written through the job's transaction: it commits with the job's success, once.
        sqlx::query(
            "INSERT INTO demo_tally (counter, value) VALUES ('words', $1)
             ON CONFLICT (counter) DO UPDATE SET value = demo_tally.value + EXCLUDED.value",
        )
        .bind(words)
        .execute(ctx.tx().await?)
        .await?;
        Ok(json!({ "words": words }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cfg = Config::from_env()?;
    apiary::telemetry::init(cfg.log_format);
    let mut registry = Registry::builtins();
    registry.register_with(
        "word_count",
        WordCount,
        KindOptions {
            max_attempts: Some(3),
            timeout: Some(Duration::from_secs(10)),
            ..KindOptions::default()
        },
    );
    let summary = Worker::new(cfg, registry, Shutdown::on_signals()?)?
        .run()
        .await?;
    eprintln!("{summary:?}");
    Ok(())
}
