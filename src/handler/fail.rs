//! `fail`: `{"times": K}` fails its first K attempts with a retryable error, then returns
//! `{"attempts": K+1}`; `{"permanent": true}` fails permanently. `{"panic": true}` panics, to
//! show that a panicking handler costs one attempt and nothing else.

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Handler, HandlerError, JobContext};

/// Fails on purpose.
pub struct Fail;

#[derive(Deserialize)]
struct Args {
    #[serde(default)]
    times: i32,
    #[serde(default)]
    permanent: bool,
    #[serde(default)]
    panic: bool,
}

impl Handler for Fail {
    type Output = Value;

    async fn handle(&self, ctx: &mut JobContext) -> Result<Value, HandlerError> {
        let args: Args = ctx.payload()?;
        if args.panic {
            panic!("fail handler asked to panic");
        }
        if args.permanent {
            return Err(HandlerError::permanent("failed permanently, as asked"));
        }
        if ctx.attempt() <= args.times {
            return Err(HandlerError::retry(format!(
                "failing attempt {} of the first {}, as asked",
                ctx.attempt(),
                args.times
            )));
        }
        Ok(json!({ "attempts": ctx.attempt() }))
    }
}
