//! A handler's progress: reported as often as the handler likes, written at most twice a
//! second, fenced by the attempt, shown on the job while it runs, and refused with a clear
//! error when it is not a fraction.

mod common;

use std::time::Duration;

use apiary::handler::{Handler, HandlerError, JobContext};
use apiary::{JobStatus, NewJob, Registry};
use common::TestEnv;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

/// Reports 101 times in about a second, then once more after a pause, then holds so the test
/// can look; answers with how many of its reports were written.
struct Chatty;

impl Handler for Chatty {
    type Output = Value;

    async fn handle(&self, ctx: &mut JobContext) -> Result<Value, HandlerError> {
        let mut writes = 0;
        for step in 0..=100 {
            let fraction = f64::from(step) / 100.0 * 0.9;
            if ctx
                .progress(fraction, Some(json!({ "step": step })))
                .await?
            {
                writes += 1;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
        if ctx.progress(1.0, Some(json!({ "step": "done" }))).await? {
            writes += 1;
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Ok(json!({ "writes": writes }))
    }
}

/// Reports a fraction that is not one.
struct Overshoot;

impl Handler for Overshoot {
    type Output = ();

    async fn handle(&self, ctx: &mut JobContext) -> Result<(), HandlerError> {
        ctx.progress(1.5, None).await?;
        Ok(())
    }
}

/// Reports half done on its first attempt and fails it; its second attempt reports nothing.
struct Halfway;

impl Handler for Halfway {
    type Output = ();

    async fn handle(&self, ctx: &mut JobContext) -> Result<(), HandlerError> {
        if ctx.attempt() == 1 {
            ctx.progress(0.5, Some(json!({ "attempt": 1 }))).await?;
            return Err(HandlerError::retry("try again"));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Ok(())
    }
}

#[tokio::test]
async fn progress_is_throttled_shown_while_running_and_checked() {
    let env = TestEnv::new().await;
    let mut registry = Registry::new();
    registry.register("chatty", Chatty);
    registry.register("overshoot", Overshoot);
    registry.register("halfway", Halfway);
    let worker = env.start_worker_with(env.cfg.clone(), registry);

    let id = env.enqueue(NewJob::new("chatty", json!(null))).await;
    // While it runs, the job shows the last report that was written: the final one.
    let seen = env
        .wait_until("the final progress while the job runs", T, || async {
            let job = env.job(id).await?;
            (job.status() == JobStatus::Running && job.progress == Some(1.0)).then_some(job)
        })
        .await;
    assert_eq!(seen.progress_detail, Some(json!({ "step": "done" })));
    assert!(seen.progress_at.is_some());
    let done = env.wait_for_status(id, JobStatus::Succeeded, T).await;
    let writes = done.result.as_ref().and_then(|r| r["writes"].as_i64());
    // About 1.6 s of reports at most every 0.5 s: a handful of writes for 102 reports.
    assert!(
        writes.is_some_and(|w| (2..=6).contains(&w)),
        "102 reports made {writes:?} writes"
    );

    let id = env.enqueue(NewJob::new("overshoot", json!(null))).await;
    let dead = env.wait_for_status(id, JobStatus::Dead, T).await;
    let error = dead.error.unwrap_or_default();
    assert!(
        error.contains("progress") && error.contains("between 0 and 1"),
        "{error}"
    );
    assert_eq!(dead.progress, None, "nothing was written for it");

    // A new attempt starts without the last one's progress.
    let id = env.enqueue(NewJob::new("halfway", json!(null))).await;
    let second = env
        .wait_until("the second attempt to run", T, || async {
            let job = env.job(id).await?;
            (job.status() == JobStatus::Running && job.attempts == 2).then_some(job)
        })
        .await;
    assert_eq!((second.progress, second.progress_detail), (None, None));
    env.wait_for_status(id, JobStatus::Succeeded, T).await;
    worker.stop().await;
}
