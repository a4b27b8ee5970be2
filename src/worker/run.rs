//! ⑤ Running a claimed attempt: the handler under its timeout, with a panic guard and a
//! cancellation token, detached from its message when it runs long; then its outcome, decided
//! here (success, retry with backoff, dead, cancelled, released by a drain), goes to
//! [`super::commit`]. A handler that wrote to the database commits its writes and its success
//! together, here.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use futures_util::FutureExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::claim::Incoming;
use super::commit::Completion;
use super::retry;
use super::shared::{Running, Shared};
use crate::broker::consume::Settle;
use crate::handler::{HandlerError, JobContext};
use crate::store::finish_job::{Finish, Outcome};
use crate::wire::WireJob;

/// Starts a claimed attempt: registers it for the heartbeat before anything else can look
/// (so another delivery of the same job, claimed in the next batch, finds it), then runs it.
/// Gives the delivery back, starting nothing, if this worker already runs that attempt.
pub(crate) fn start_job(
    shared: &Arc<Shared>,
    inc: Incoming,
    attempt: i32,
    max_attempts: i32,
    permit: Option<OwnedSemaphorePermit>,
) -> Result<(), Incoming> {
    let handles = Handles {
        cancel: shared.interrupt.child_token(),
        cancel_requested: Arc::new(AtomicBool::new(false)),
        detached: Arc::new(AtomicBool::new(false)),
    };
    {
        let Ok(mut running) = shared.running.lock() else {
            return Err(inc);
        };
        let key = (inc.job.id, attempt);
        if running.contains_key(&key) {
            return Err(inc);
        }
        running.insert(
            key,
            Running {
                cancel: handles.cancel.clone(),
                cancel_requested: handles.cancel_requested.clone(),
                detached: handles.detached.clone(),
                delivery: inc.delivery.clone(),
            },
        );
    }
    let shared2 = shared.clone();
    shared
        .tasks
        .spawn(async move { run_job(&shared2, inc, attempt, max_attempts, handles, permit).await });
    Ok(())
}

/// What the heartbeat and a forced stop use to reach a running attempt.
struct Handles {
    cancel: CancellationToken,
    cancel_requested: Arc<AtomicBool>,
    detached: Arc<AtomicBool>,
}

/// Runs one claimed attempt and hands its outcome to the completer (or, when the handler
/// wrote to the database, commits the outcome with those writes itself).
async fn run_job(
    shared: &Arc<Shared>,
    inc: Incoming,
    attempt: i32,
    max_attempts: i32,
    handles: Handles,
    _permit: Option<OwnedSemaphorePermit>,
) {
    let job = inc.job.clone();
    let span = tracing::info_span!(
        "job",
        job_id = %job.id,
        kind = %job.kind,
        attempt,
        queue = job.queue_name(),
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
    );
    if let Some(parent) = &inc.trace {
        crate::telemetry::set_trace_parent(&span, parent);
    }
    let Handles {
        cancel,
        cancel_requested,
        detached: detached_flag,
    } = handles;
    let finish = |outcome, detached: bool| Finish {
        id: job.id,
        attempt,
        outcome,
        detached,
    };

    let km = shared.metrics.kind(&job.kind);
    km.started.increment(1);
    if let Some(ms) = enqueued_ms(&job) {
        shared
            .metrics
            .last_enqueued_ms
            .fetch_max(ms, Ordering::Relaxed);
    }
    let options = shared.kind_options(&job.kind);
    let Some(entry) = shared.registry.get(&job.kind).cloned() else {
        let reason = format!(
            "no handler is registered for kind {:?} on this worker",
            job.kind
        );
        tracing::warn!(parent: &span, "{reason}");
        return complete(shared, finish(Outcome::Dead(reason), false), inc);
    };
    let timeout = options.timeout.unwrap_or(shared.cfg.job_timeout);
    let mut ctx = JobContext::new(
        job.id,
        job.kind.clone(),
        attempt,
        max_attempts,
        job.dedup_key.clone(),
        job.payload.clone(),
        cancel.clone(),
        shared.store.pool().clone(),
        shared.id,
    );
    let mut detached = false;
    let began = std::time::Instant::now();
    let result = {
        let run = AssertUnwindSafe(entry.handler.call(&mut ctx)).catch_unwind();
        let run = tokio::time::timeout(timeout, tracing::Instrument::instrument(run, span.clone()));
        tokio::pin!(run);
        let detach_timer = tokio::time::sleep(shared.cfg.detach_after);
        tokio::pin!(detach_timer);
        loop {
            tokio::select! {
                r = &mut run => break r,
                () = &mut detach_timer, if !detached => {
                    // A long job: ack now, before RabbitMQ's consumer timeout closes the
                    // channel, and let the lease protect it (the rescuer republishes it if
                    // this worker dies).
                    detached = true;
                    match shared.store.detach_job(job.id, shared.id, attempt).await {
                        Ok(true) => {
                            detached_flag.store(true, Ordering::Relaxed);
                            tracing::info!(parent: &span, "long job: message acked, lease keeps the claim");
                            inc.delivery.settle(Settle::Ack);
                        }
                        Ok(false) => {}
                        Err(e) => tracing::warn!(parent: &span, error = %e, "could not detach a long job; keeping its message"),
                    }
                }
            }
        }
    };
    km.ran(began.elapsed());
    // The last report a throttled handler made, so a reader sees where it ended.
    ctx.flush_progress().await;
    let detached = detached_flag.load(Ordering::Relaxed);
    let failure = |message: String, delay: Option<Duration>| {
        if attempt >= max_attempts {
            Outcome::Dead(format!(
                "{message} (attempt {attempt} of {max_attempts}; no attempts left)"
            ))
        } else {
            let base = options.retry_base.unwrap_or(shared.cfg.retry_base);
            let cap = options.retry_cap.unwrap_or(shared.cfg.retry_cap);
            let wait = delay
                .unwrap_or_else(|| retry::backoff(attempt, base, cap, &mut rand::rng()))
                .min(retry::MAX_RETRY_DELAY);
            let at = Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
            Outcome::Retry { error: message, at }
        }
    };
    let outcome = match result {
        Ok(Ok(Ok(output))) if output.get().len() > shared.cfg.max_payload_bytes => {
            Outcome::Dead(format!(
                "the handler's result is {} bytes; the limit is {} (APIARY_MAX_PAYLOAD_BYTES)",
                output.get().len(),
                shared.cfg.max_payload_bytes
            ))
        }
        Ok(Ok(Ok(output))) => Outcome::Succeeded(output),
        // Interrupted by the drain: not the job's fault, so not its attempt.
        Ok(Ok(Err(_))) if shared.interrupt.is_cancelled() => Outcome::Released,
        Ok(Ok(Err(HandlerError::Retry { message, delay }))) => failure(message, delay),
        Ok(Ok(Err(HandlerError::Permanent { message }))) => Outcome::Dead(message),
        Ok(Err(panic)) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string panic".into());
            tracing::error!(parent: &span, panic = %what, "handler panicked");
            failure(format!("handler panicked: {what}"), None)
        }
        Err(_) => {
            cancel.cancel();
            failure(
                format!("timed out after {}", humantime::format_duration(timeout)),
                None,
            )
        }
    };
    // A cancellation requested while the job ran decides the outcome, whatever the handler
    // returned; its transaction, if any, rolls back below. (The finish statement enforces
    // the same rule for a cancellation the heartbeat has not seen yet.)
    let outcome = if cancel_requested.load(Ordering::Relaxed) {
        Outcome::Cancelled
    } else {
        outcome
    };

    if let (Outcome::Succeeded(_), Some(mut tx)) = (&outcome, ctx.take_tx()) {
        // The handler wrote to the database: its writes and the job's success commit together,
        // fenced by the claim and refused if a cancellation came in, and only then is the
        // message acknowledged.
        let done = crate::store::finish_job::finish_rows(
            &mut *tx,
            shared.id,
            &[finish(outcome.clone(), detached)],
            true,
        )
        .await;
        let outcome = match done {
            Ok((rows, follow)) if !rows.is_empty() => match tx.commit().await {
                Ok(()) => {
                    super::relay::flush_released(shared, &follow).await;
                    shared.counters.finished.fetch_add(1, Ordering::Relaxed);
                    km.succeeded.increment(1);
                    shared.samples.succeeded(
                        due_ms(&job).map(|at| chrono::Utc::now().timestamp_millis() - at),
                    );
                    if let Some(at) = enqueued_ms(&job) {
                        let ms = (chrono::Utc::now().timestamp_millis() - at).max(0);
                        km.end_to_end.record(ms as f64 / 1000.0);
                    }
                    forget(shared, job.id, attempt);
                    inc.delivery.settle(Settle::Ack);
                    let hooks: Vec<_> = rows.iter().filter_map(|r| r.webhook).collect();
                    super::relay::flush_outbox(shared, &hooks).await;
                    return;
                }
                Err(e) => {
                    // Maybe committed, maybe not: the redelivery's claim finds out which (the
                    // job is finished, or its lease lapses and it runs again).
                    tracing::warn!(parent: &span, error = %e, "commit failed; requeueing the message");
                    forget(shared, job.id, attempt);
                    inc.delivery.settle(Settle::Requeue);
                    return;
                }
            },
            // Cancelled meanwhile, or the claim was lost: roll the writes back and let the
            // completer record what holds (the cancellation, or nothing, fenced out).
            Ok(_) => {
                let _ = tx.rollback().await;
                Outcome::Cancelled
            }
            // The handler's transaction failed (its own writes broke a rule, or the
            // connection went): the writes are rolled back, and the attempt failed.
            Err(e) => {
                let _ = tx.rollback().await;
                tracing::warn!(parent: &span, error = %e, "the job's transaction failed");
                failure(format!("the job's database transaction failed: {e}"), None)
            }
        };
        return complete(shared, finish(outcome, detached), inc);
    }
    // Any transaction the handler began but did not succeed with rolls back here, on drop.
    drop(ctx);
    complete(shared, finish(outcome, detached), inc);
}

/// Drops this worker's bookkeeping of one attempt (never of another attempt of the same job).
pub(crate) fn forget(shared: &Shared, id: crate::job::JobId, attempt: i32) {
    if let Ok(mut running) = shared.running.lock() {
        running.remove(&(id, attempt));
    }
}

fn complete(shared: &Shared, finish: Finish, inc: Incoming) {
    let c = Completion {
        finish,
        job: inc.job,
        delivery: inc.delivery,
    };
    if let Err(e) = shared.done_tx.send(c) {
        // The completer is gone only after the drain; the delivery is requeued by the close.
        tracing::debug!(job_id = %e.0.job.id, "completer closed");
    }
}

/// When the job was due, in ms since the epoch: when it was enqueued, or its `run_at` when
/// later (a scheduled job's wait is not latency).
pub(crate) fn due_ms(job: &WireJob) -> Option<i64> {
    let enqueued = enqueued_ms(job)?;
    Some(
        job.run_at
            .map_or(enqueued, |t| t.timestamp_millis().max(enqueued)),
    )
}

/// When a job was enqueued, from its UUIDv7 id (ids of other versions carry no time).
pub(crate) fn enqueued_ms(job: &WireJob) -> Option<i64> {
    if job.id.get_version_num() != 7 {
        return None;
    }
    let (secs, nanos) = job.id.get_timestamp()?.to_unix();
    i64::try_from(secs)
        .ok()
        .map(|s| s * 1000 + i64::from(nanos / 1_000_000))
}
