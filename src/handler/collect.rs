//! `collect`: reads what a job depends on. Returns `{"parents": [{"id", "status", "result"}],
//! "children": [{"id", "status", "result"}] | null, "payload": ...}`: its parents' results
//! (`ctx.parent_results()`), and, for a batch's callback (a payload with `batch_id`), every
//! child of the batch, paged through `ctx.batch_children`. With `{"counter": NAME}` in its
//! payload (or in a callback's `payload`) it also adds 1 to `demo_tally` row NAME in the job's
//! transaction, so a test can count that it ran once. The demonstration of chains and batches.

use serde_json::{Value, json};

use super::{Handler, HandlerError, JobContext};

/// Reads its parents' results and its batch's children.
///
/// See the crate's [guarantees](crate#guarantees).
pub struct Collect;

impl Handler for Collect {
    type Output = Value;

    async fn handle(&self, ctx: &mut JobContext) -> Result<Value, HandlerError> {
        let payload: Value = ctx.payload()?;
        let parents: Vec<Value> = ctx
            .parent_results()
            .await?
            .into_iter()
            .map(|p| json!({"id": p.id, "status": p.status, "result": p.result}))
            .collect();
        let children = if payload.get("batch_id").is_some() {
            let mut all = Vec::new();
            let mut after = None;
            loop {
                let page = ctx.batch_children(after, 500).await?;
                after = page.last().map(|c| c.id);
                let short = page.len() < 500;
                all.extend(
                    page.into_iter()
                        .map(|c| json!({"id": c.id, "status": c.status, "result": c.result})),
                );
                if short {
                    break;
                }
            }
            Value::Array(all)
        } else {
            Value::Null
        };
        let counter = payload
            .get("counter")
            .or_else(|| payload.get("payload").and_then(|p| p.get("counter")))
            .and_then(Value::as_str)
            .map(str::to_string);
        if let Some(counter) = counter {
            sqlx::query(
                "INSERT INTO demo_tally (counter, value) VALUES ($1, 1)
                 ON CONFLICT (counter) DO UPDATE SET value = demo_tally.value + 1",
            )
            .bind(&counter)
            .execute(ctx.tx().await?)
            .await?;
        }
        Ok(json!({"parents": parents, "children": children, "payload": payload}))
    }
}
