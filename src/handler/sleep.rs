//! `sleep`: `{"ms": N}` waits N milliseconds, then returns `{"slept_ms": N}`. A stand-in for
//! slow I/O, used by drain and chaos tests; it stops early when cancelled.

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Handler, HandlerError, JobContext};

/// Sleeps for the payload's `ms`.
///
/// See the crate's [guarantees](crate#guarantees).
pub struct Sleep;

#[derive(Deserialize)]
struct Args {
    ms: u64,
}

impl Handler for Sleep {
    type Output = Value;

    async fn handle(&self, ctx: &mut JobContext) -> Result<Value, HandlerError> {
        let Args { ms } = ctx.payload()?;
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_millis(ms)) => Ok(json!({ "slept_ms": ms })),
            () = ctx.cancelled().cancelled() => Err(HandlerError::retry("interrupted")),
        }
    }
}
