//! `tally`: `{"counter": "NAME", "by": N}` adds N (default 1) to row NAME of `demo_tally`
//! inside the job's transaction and returns `{"value": <new value>}`. The counter moves once
//! per job however often the message is delivered: the demonstration of effectively-once.
//! `{"ms": N}` works N milliseconds first (stopping early if cancelled), for tests of jobs
//! whose worker stalls or dies mid-run.

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Handler, HandlerError, JobContext};

/// Adds to a counter in the job's transaction.
///
/// See the crate's [guarantees](crate#guarantees).
pub struct Tally;

#[derive(Deserialize)]
struct Args {
    counter: String,
    #[serde(default = "one")]
    by: i64,
    #[serde(default)]
    ms: u64,
}

fn one() -> i64 {
    1
}

impl Handler for Tally {
    type Output = Value;

    async fn handle(&self, ctx: &mut JobContext) -> Result<Value, HandlerError> {
        let Args { counter, by, ms } = ctx.payload()?;
        if ms > 0 {
            tokio::select! {
                () = tokio::time::sleep(std::time::Duration::from_millis(ms)) => {}
                () = ctx.cancelled().cancelled() => return Err(HandlerError::retry("interrupted")),
            }
        }
        let value: i64 = sqlx::query_scalar(
            "INSERT INTO demo_tally (counter, value) VALUES ($1, $2)
             ON CONFLICT (counter) DO UPDATE SET value = demo_tally.value + EXCLUDED.value
             RETURNING value",
        )
        .bind(&counter)
        .bind(by)
        .fetch_one(ctx.tx().await?)
        .await?;
        Ok(json!({ "value": value }))
    }
}
