//! ⑤ Typed handlers: [`Work`] receives a job's arguments already decoded as its
//! [`JobArgs`] type, and [`Registry::add`](super::Registry::add) registers it under
//! [`JobArgs::KIND`], so the kind is spelled once. A payload that does not decode is a
//! permanent error naming the field that failed; retrying the same input cannot help.

use std::future::Future;

use serde::Serialize;

use super::{Handler, HandlerError, JobContext, KindOptions};
use crate::args::JobArgs;

/// A handler for the jobs of one [`JobArgs`] type.
///
/// ```
/// use apiary::JobArgs;
/// use apiary::handler::{HandlerError, JobContext, Work};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Resize { url: String, width: u32 }
///
/// impl JobArgs for Resize {
///     const KIND: &'static str = "resize";
/// }
///
/// struct Resizer;
///
/// impl Work for Resizer {
///     type Args = Resize;
///     type Output = String; // any Serialize; stored as the job's `result`
///
///     async fn work(&self, args: Resize, _ctx: &mut JobContext) -> Result<String, HandlerError> {
///         Ok(format!("{}?w={}", args.url, args.width))
///     }
/// }
///
/// let mut registry = apiary::Registry::new();
/// registry.add(Resizer); // serves kind "resize"
/// assert_eq!(registry.kinds(), ["resize"]);
/// ```
///
/// It ends an attempt as a [`Handler`] does: see [`HandlerError`] and the crate's
/// [guarantees](crate#guarantees).
pub trait Work: Send + Sync + 'static {
    /// The arguments, decoded from the job's payload.
    type Args: JobArgs;
    /// The result, stored as JSON in the job record.
    type Output: Serialize + Send;

    /// Runs one attempt with the decoded arguments. `ctx` offers the rest: the attempt
    /// number, the job's transaction ([`JobContext::tx`]) and its cancellation token.
    fn work(
        &self,
        args: Self::Args,
        ctx: &mut JobContext,
    ) -> impl Future<Output = Result<Self::Output, HandlerError>> + Send;

    /// The attempts, timeout and backoff for this kind; `APIARY_KINDS` overrides them, and
    /// unset fields take the global settings. As with
    /// [`Registry::register_with`](super::Registry::register_with), `max_attempts` applies
    /// only to raw messages that do not carry one.
    fn options(&self) -> KindOptions {
        KindOptions::default()
    }
}

/// A [`Work`] seen as a [`Handler`]: decodes the payload, then works.
pub(crate) struct Typed<W>(pub(crate) W);

impl<W: Work> Handler for Typed<W> {
    type Output = W::Output;

    async fn handle(&self, ctx: &mut JobContext) -> Result<W::Output, HandlerError> {
        let args: W::Args = ctx.payload()?;
        self.0.work(args, ctx).await
    }
}
