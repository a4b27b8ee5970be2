//! `fail`: `{"times": K}` fails its first K attempts with a retryable error, then returns
//! `{"attempts": K+1}`; `{"permanent": true}` fails permanently. `{"panic": true}` panics, to
//! show that a panicking handler costs one attempt and nothing else. `{"message": "..."}` is
//! the error text to fail with, and `{"ms": N}` works N milliseconds before each attempt ends
//! (stopping early if cancelled), so tests can fail long jobs. `{"until": "<RFC 3339>"}` fails
//! every attempt before that instant (permanently with `"permanent": true`) and succeeds after
//! it: a handler whose cause was fixed, for replaying dead jobs. `{"retry_after_ms": N}` asks
//! for the next attempt N milliseconds later instead of the worker's jittered backoff.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Handler, HandlerError, JobContext};

/// Fails on purpose.
///
/// See the crate's [guarantees](crate#guarantees).
pub struct Fail;

#[derive(Deserialize)]
struct Args {
    #[serde(default)]
    times: i32,
    #[serde(default)]
    permanent: bool,
    #[serde(default)]
    panic: bool,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    ms: u64,
    #[serde(default)]
    until: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default)]
    retry_after_ms: Option<u64>,
}

impl Handler for Fail {
    type Output = Value;

    async fn handle(&self, ctx: &mut JobContext) -> Result<Value, HandlerError> {
        let args: Args = ctx.payload()?;
        if args.ms > 0 {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(args.ms)) => {}
                () = ctx.cancelled().cancelled() => return Err(HandlerError::retry("interrupted")),
            }
        }
        if args.panic {
            panic!("fail handler asked to panic");
        }
        if let Some(until) = args.until {
            if chrono::Utc::now() >= until {
                return Ok(json!({ "attempts": ctx.attempt() }));
            }
            let message = args
                .message
                .unwrap_or_else(|| format!("failing until {until}, as asked"));
            return Err(if args.permanent {
                HandlerError::permanent(message)
            } else {
                HandlerError::retry(message)
            });
        }
        if args.permanent {
            return Err(HandlerError::permanent(
                args.message
                    .unwrap_or_else(|| "failed permanently, as asked".into()),
            ));
        }
        if ctx.attempt() <= args.times {
            let message = args.message.unwrap_or_else(|| {
                format!(
                    "failing attempt {} of the first {}, as asked",
                    ctx.attempt(),
                    args.times
                )
            });
            return Err(match args.retry_after_ms {
                Some(ms) => HandlerError::retry_after(message, Duration::from_millis(ms)),
                None => HandlerError::retry(message),
            });
        }
        Ok(json!({ "attempts": ctx.attempt() }))
    }
}
