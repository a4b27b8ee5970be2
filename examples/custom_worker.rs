//! A worker binary of your own: register your handlers next to (or instead of) the built-in
//! ones and run the pool. Configuration comes from the same environment variables as
//! `apiary worker` (DATABASE_URL, AMQP_URL, APIARY_QUEUE, APIARY_CONCURRENCY, ...).
//!
//! ```sh
//! cargo run --example custom_worker
//! cargo run --example typed_producer -- "to be or not to be"   # or, as JSON from any language:
//! apiary enqueue word_count '{"text": "to be or not to be"}'
//! ```

#[path = "shared/word_count.rs"]
mod word_count;

use std::time::Duration;

use apiary::handler::{HandlerError, JobContext, KindOptions, Work};
use apiary::{Config, Registry, Shutdown, Worker};
use word_count::{CountWords, Counted};

/// Counts the words and adds them up in the `demo_tally` table, in the job's transaction.
struct WordCount;

impl Work for WordCount {
    type Args = CountWords;
    type Output = Counted;

    async fn work(&self, args: CountWords, ctx: &mut JobContext) -> Result<Counted, HandlerError> {
        // A payload that is not `{"text": "..."}` never gets here: it is dead at once, and its
        // error names the field.
        if args.text.is_empty() {
            // Retrying the same input cannot help.
            return Err(HandlerError::permanent("text is empty"));
        }
        let words = args.text.split_whitespace().count() as i64;
        // Written through the job's transaction: it commits with the job's success, once.
        sqlx::query(
            "INSERT INTO demo_tally (counter, value) VALUES ('words', $1)
             ON CONFLICT (counter) DO UPDATE SET value = demo_tally.value + EXCLUDED.value",
        )
        .bind(words)
        .execute(ctx.tx().await?)
        .await?;
        Ok(Counted { words })
    }

    fn options(&self) -> KindOptions {
        KindOptions {
            timeout: Some(Duration::from_secs(10)),
            ..KindOptions::default()
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cfg = Config::from_env()?;
    apiary::telemetry::init(cfg.log_format);
    let mut registry = Registry::builtins();
    registry.add(WordCount); // serves "word_count", the kind CountWords names
    let summary = Worker::new(cfg, registry, Shutdown::on_signals()?)?
        .run()
        .await?;
    eprintln!("{summary:?}");
    Ok(())
}
