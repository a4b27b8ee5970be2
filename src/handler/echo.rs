//! `echo`: the result is the payload. The cheapest possible job, used by benchmarks.

use serde_json::value::RawValue;

use super::{Handler, HandlerError, JobContext};

/// Returns its payload unchanged.
///
/// See the crate's [guarantees](crate#guarantees).
pub struct Echo;

impl Handler for Echo {
    type Output = Box<RawValue>;

    async fn handle(&self, ctx: &mut JobContext) -> Result<Box<RawValue>, HandlerError> {
        Ok(ctx.raw_payload().to_owned())
    }
}
