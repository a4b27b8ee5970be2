//! ④→⑤ From delivery to handler: decode, claim in batches, run each claimed job under its
//! timeout with a panic guard, and pass the outcome to the completer.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use futures_util::{FutureExt, StreamExt};
use lapin::Consumer;
use std::collections::VecDeque;

use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;

use super::completer::Completion;
use super::{DeliveryRef, Running, Shared, hand_back, hand_back_buffered, retry};
use crate::broker::BrokerError;
use crate::broker::consume::{Acks, Settle};
use crate::handler::{HandlerError, JobContext};
use crate::store::claim_job::{Claim, DUE_TOLERANCE_MS};
use crate::store::finish_job::{Finish, Outcome};
use crate::wire::WireJob;

/// The consumer tag of this worker: its id, so `rabbitmqctl list_consumers` names it.
pub(crate) fn consumer_tag(shared: &Shared) -> String {
    format!("apiary-{}", shared.id)
}

/// One delivery, decoded, with where to settle it.
pub(crate) struct Incoming {
    job: Arc<WireJob>,
    redelivered: bool,
    delivery: DeliveryRef,
}

/// Pulls deliveries until the drain begins (returns `None`) or the session breaks (returns
/// the error). Each burst of deliveries already received is claimed as one batch.
pub(crate) async fn consume(
    shared: &Arc<Shared>,
    channel: &lapin::Channel,
    mut consumer: Consumer,
    acks: &Acks,
) -> Option<BrokerError> {
    let max = shared.cfg.batch;
    loop {
        let first = tokio::select! {
            biased;
            () = shared.stop_taking.cancelled() => {
                // Cancel first: a delivery handed back while the consumer is still registered
                // would be sent straight back to it.
                let cancel = channel.basic_cancel(consumer.tag(), lapin::options::BasicCancelOptions::default());
                if tokio::time::timeout(Duration::from_secs(5), cancel).await.is_err() {
                    tracing::warn!("the broker did not confirm the consumer's cancellation in time");
                }
                hand_back_buffered(shared, acks, &mut consumer);
                shared.consuming_stopped.cancel();
                return None;
            }
            d = consumer.next() => d,
        };
        let mut batch = Vec::with_capacity(8);
        match first {
            Some(Ok(d)) => batch.push(d),
            Some(Err(e)) => {
                return Some(BrokerError::Amqp {
                    context: "consuming",
                    source: e,
                });
            }
            None => {
                return Some(BrokerError::Disconnected);
            }
        }
        // Take whatever else has already arrived, without waiting: batches grow with load and
        // a lone job is never held back for company.
        while batch.len() < max {
            match consumer.next().now_or_never() {
                Some(Some(Ok(d))) => batch.push(d),
                _ => break,
            }
        }
        let mut jobs = Vec::with_capacity(batch.len());
        for d in batch {
            // Tracked before anything can settle it, so multiple-acks never cover it unseen.
            acks.track(d.delivery_tag);
            let delivery = DeliveryRef {
                tag: d.delivery_tag,
                acks: acks.clone(),
            };
            let message_id = d
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_string());
            match WireJob::decode(&d.data, message_id.as_deref(), shared.cfg.max_payload_bytes) {
                Ok(job) => jobs.push(Incoming {
                    job: Arc::new(job),
                    redelivered: d.redelivered,
                    delivery,
                }),
                Err(poison) => {
                    let shared = shared.clone();
                    shared
                        .tasks
                        .clone()
                        .spawn(async move { bury_poison(&shared, d.data, poison, delivery).await });
                }
            }
        }
        for inc in jobs {
            // The claimer outlives every session; a failed send means it has stopped, and the
            // delivery goes back with the channel.
            let _ = shared.claim_tx.send(inc);
        }
    }
}

/// Records a message that is not a job as dead, dead-letters it with its reason, then acks.
async fn bury_poison(
    shared: &Shared,
    body: Vec<u8>,
    poison: crate::wire::Poison,
    delivery: DeliveryRef,
) {
    tracing::warn!(job_id = %poison.id, reason = %poison.reason, "poison message: recording it as dead");
    let limit = shared.cfg.max_payload_bytes;
    let reason = format!("poison message: {}", poison.reason);
    let recorded = shared
        .with_store(|| {
            shared
                .store
                .record_poison(poison.id, poison.kind.as_deref(), &body, &reason, limit)
        })
        .await;
    match recorded {
        None => hand_back(shared, [delivery]),
        // A redelivery of a poison message whose letter was already confirmed.
        Some(false) => delivery.settle(Settle::Ack),
        Some(true) => dead_letter_then_ack(shared, poison.id, delivery).await,
    }
}

/// Sends a dead job's letter (queued in the outbox when it became dead) and acks the delivery
/// once the broker has it.
pub(crate) async fn dead_letter_then_ack(
    shared: &Shared,
    id: crate::job::JobId,
    delivery: DeliveryRef,
) {
    if super::flush_outbox(shared, &[id]).await {
        delivery.settle(Settle::Ack);
    }
}

/// The claimer: one claim statement in flight at a time, for everything that arrived while
/// the previous one ran. Under load the batches grow, and one commit covers many jobs; when
/// idle, a lone delivery is claimed at once. Runs until `stop` fires.
pub(crate) async fn claimer(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Incoming>,
    stop: CancellationToken,
) {
    let mut pending: VecDeque<Incoming> = VecDeque::new();
    loop {
        if pending.is_empty() {
            tokio::select! {
                i = rx.recv() => match i {
                    Some(i) => pending.push_back(i),
                    None => return,
                },
                () = stop.cancelled() => return,
            }
        }
        while let Ok(i) = rx.try_recv() {
            pending.push_back(i);
        }
        if shared.consuming_stopped.is_cancelled() {
            // Draining: nothing more starts here; back to the queue for another worker.
            hand_back(&shared, pending.drain(..).map(|i| i.delivery));
            continue;
        }
        // A scheduled job or a retry that came back from a delay tier early, or was published
        // with a future run_at: send it on to the next tier without claiming.
        let now = Utc::now();
        let mut due = VecDeque::with_capacity(pending.len());
        for inc in pending.drain(..) {
            match inc.job.run_at {
                Some(at) if (at - now).num_milliseconds() > DUE_TOLERANCE_MS => {
                    let shared2 = shared.clone();
                    shared
                        .tasks
                        .spawn(async move { delay_then_ack(&shared2, inc, at, true).await });
                }
                _ => due.push_back(inc),
            }
        }
        pending = due;
        if pending.is_empty() {
            continue;
        }
        // Claim only what can start now: a job is `running` in Postgres only once it has a
        // handler slot, and deliveries waiting for one stay untouched, so a drain hands them
        // back as they came.
        let first = tokio::select! {
            biased;
            () = shared.consuming_stopped.cancelled() => continue,
            () = stop.cancelled() => return,
            p = shared.slots.clone().acquire_owned() => p,
        };
        let Ok(first) = first else { return };
        let want = pending.len().min(shared.cfg.batch);
        let mut permits = vec![first];
        while permits.len() < want {
            match shared.slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let batch: Vec<Incoming> = pending.drain(..permits.len()).collect();
        claim_now(&shared, batch, permits).await;
    }
}

/// Claims jobs that each hold a handler slot, and dispatches each by what the claim found.
async fn claim_now(shared: &Arc<Shared>, batch: Vec<Incoming>, permits: Vec<OwnedSemaphorePermit>) {
    let refs: Vec<&WireJob> = batch.iter().map(|i| i.job.as_ref()).collect();
    // Jobs recorded by an enqueue already have a budget; this one is for raw messages.
    let budgets: Vec<i32> = refs
        .iter()
        .map(|j| {
            j.max_attempts
                .or_else(|| shared.kind_options(&j.kind).max_attempts)
                .unwrap_or(shared.cfg.max_attempts)
        })
        .collect();
    let cfg = &shared.cfg;
    let claims = shared
        .with_store(|| {
            shared
                .store
                .claim_jobs(&refs, shared.id, cfg.lease, &budgets)
        })
        .await;
    let Some(claims) = claims else {
        return hand_back(shared, batch.into_iter().map(|i| i.delivery));
    };
    for ((inc, claim), permit) in batch.into_iter().zip(claims).zip(permits) {
        dispatch(shared, inc, claim, permit);
    }
}

/// Acts on a claim. `permit` is the job's handler slot: kept by a job that runs, released at
/// once otherwise.
fn dispatch(shared: &Arc<Shared>, inc: Incoming, claim: Claim, permit: OwnedSemaphorePermit) {
    match claim {
        Claim::Claimed {
            attempt,
            max_attempts,
        } => {
            let shared2 = shared.clone();
            shared
                .tasks
                .spawn(async move { run_job(&shared2, inc, attempt, max_attempts, permit).await });
        }
        Claim::Finished | Claim::Duplicate(_) | Claim::Cancelled => {
            inc.delivery.settle(Settle::Ack)
        }
        Claim::Exhausted => {
            let shared2 = shared.clone();
            shared.tasks.spawn(async move {
                dead_letter_then_ack(&shared2, inc.job.id, inc.delivery).await
            });
        }
        Claim::NotDue(at) => {
            let shared2 = shared.clone();
            shared
                .tasks
                .spawn(async move { delay_then_ack(&shared2, inc, at, false).await });
        }
        Claim::Busy(_) if !inc.redelivered => {
            // A second copy of a job another delivery is running (a relay's republish, a raw
            // duplicate). That delivery stays unacked until its job finishes, and comes back
            // if its worker dies, so this copy can go.
            inc.delivery.settle(Settle::Ack);
        }
        Claim::Busy(until) => {
            // A redelivery: possibly the very message of a worker that died holding the claim.
            // Wait for the lease to end, then claim again.
            let shared2 = shared.clone();
            shared
                .tasks
                .spawn(async move { wait_then_claim(&shared2, inc, Some(until)).await });
        }
        Claim::Again => {
            let shared2 = shared.clone();
            shared
                .tasks
                .spawn(async move { wait_then_claim(&shared2, inc, None).await });
        }
    }
}

async fn wait_then_claim(
    shared: &Arc<Shared>,
    inc: Incoming,
    until: Option<chrono::DateTime<Utc>>,
) {
    let wait = until
        .map(|u| (u - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(50))
        .unwrap_or(Duration::from_millis(20))
        .min(Duration::from_secs(2));
    tokio::select! {
        () = tokio::time::sleep(wait) => {}
        () = shared.consuming_stopped.cancelled() => return hand_back(shared, [inc.delivery]),
    }
    let _ = shared.claim_tx.send(inc);
}

/// Sends a job on to the delay tier for `at`, then acks this delivery. `record` also records
/// a raw-published scheduled job so it is visible while it waits.
async fn delay_then_ack(shared: &Shared, inc: Incoming, at: chrono::DateTime<Utc>, record: bool) {
    if record
        && shared
            .with_store(|| {
                shared
                    .store
                    .record_scheduled(&inc.job, shared.cfg.max_attempts)
            })
            .await
            .is_none()
    {
        return hand_back(shared, [inc.delivery]);
    }
    let Some(publisher) = shared.publisher().await else {
        return;
    };
    let mut job = (*inc.job).clone();
    job.run_at = Some(at);
    match publisher.publish_jobs(std::slice::from_ref(&job)).await {
        Ok(()) => inc.delivery.settle(Settle::Ack),
        Err(e) => {
            tracing::warn!(job_id = %job.id, error = %e, "could not re-delay; the message will come back")
        }
    }
}

/// Runs one claimed attempt and hands its outcome to the completer (or, when the handler
/// wrote to the database, commits the outcome with those writes itself).
async fn run_job(
    shared: &Arc<Shared>,
    inc: Incoming,
    attempt: i32,
    max_attempts: i32,
    _permit: OwnedSemaphorePermit,
) {
    let job = inc.job.clone();
    let span = tracing::info_span!("job", job_id = %job.id, kind = %job.kind, attempt);
    let cancel = shared.interrupt.child_token();
    let cancel_requested = Arc::new(AtomicBool::new(false));
    let detached_flag = Arc::new(AtomicBool::new(false));
    if let Ok(mut running) = shared.running.lock() {
        let entry = Running {
            attempt,
            cancel: cancel.clone(),
            cancel_requested: cancel_requested.clone(),
            detached: detached_flag.clone(),
            job: job.clone(),
            delivery: inc.delivery.clone(),
        };
        running.insert(job.id, entry);
    }
    let finish = |outcome| Finish {
        id: job.id,
        attempt,
        outcome,
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
        return complete(shared, finish(Outcome::Dead(reason)), inc, false);
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
    let failure = |message: String, delay: Option<Duration>| {
        if attempt >= max_attempts {
            Outcome::Dead(format!(
                "{message} (attempt {attempt} of {max_attempts}; no attempts left)"
            ))
        } else {
            let base = options.retry_base.unwrap_or(shared.cfg.retry_base);
            let cap = options.retry_cap.unwrap_or(shared.cfg.retry_cap);
            let wait =
                delay.unwrap_or_else(|| retry::backoff(attempt, base, cap, &mut rand::rng()));
            let at = Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
            Outcome::Retry { error: message, at }
        }
    };
    let outcome = match result {
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
    // returned; its transaction, if any, rolls back below.
    let outcome = if cancel_requested.load(Ordering::Relaxed) {
        Outcome::Cancelled
    } else {
        outcome
    };

    if let (Outcome::Succeeded(_), Some(mut tx)) = (&outcome, ctx.take_tx()) {
        // The handler wrote to the database: its writes and the job's success commit together,
        // fenced by the claim, and only then is the message acknowledged.
        let done =
            crate::store::finish_job::finish_jobs(&mut *tx, shared.id, &[finish(outcome.clone())])
                .await;
        let settle = match done {
            Ok(ids) if !ids.is_empty() => match tx.commit().await {
                Ok(()) => {
                    shared.counters.finished.fetch_add(1, Ordering::Relaxed);
                    km.succeeded.increment(1);
                    if let Some(at) = enqueued_ms(&job) {
                        let ms = (chrono::Utc::now().timestamp_millis() - at).max(0);
                        km.end_to_end.record(ms as f64 / 1000.0);
                    }
                    Settle::Ack
                }
                Err(e) => {
                    // Maybe committed, maybe not: the redelivery's claim finds out which.
                    tracing::warn!(parent: &span, error = %e, "commit failed; requeueing the message");
                    Settle::Requeue
                }
            },
            Ok(_) => {
                // The claim was lost (lease expired and another worker took the job): roll
                // back, so the effect happens once, there.
                let _ = tx.rollback().await;
                tracing::warn!(parent: &span, "claim lost before commit; effect rolled back");
                Settle::Ack
            }
            Err(e) => {
                // Rolled back when `tx` drops. The job stays claimed until the lease runs out
                // (no heartbeat renews it now); then the requeued message claims it again.
                tracing::warn!(parent: &span, error = %e, "could not commit the job; requeueing the message");
                Settle::Requeue
            }
        };
        forget(shared, job.id);
        inc.delivery.settle(settle);
        return;
    }
    // Any transaction the handler began but did not succeed with rolls back here, on drop.
    drop(ctx);
    complete(shared, finish(outcome), inc, detached);
}

fn forget(shared: &Shared, id: crate::job::JobId) {
    if let Ok(mut running) = shared.running.lock() {
        running.remove(&id);
    }
}

fn complete(shared: &Shared, finish: Finish, inc: Incoming, detached: bool) {
    let c = Completion {
        finish,
        job: inc.job,
        delivery: inc.delivery,
        detached,
    };
    if let Err(e) = shared.done_tx.send(c) {
        // The completer is gone only after the drain; the delivery is requeued by the close.
        tracing::debug!(job_id = %e.0.job.id, "completer closed");
    }
}

/// When a job was enqueued, from its UUIDv7 id (ids of other versions carry no time).
pub(crate) fn enqueued_ms(job: &WireJob) -> Option<i64> {
    let (secs, nanos) = job.id.get_timestamp()?.to_unix();
    i64::try_from(secs)
        .ok()
        .map(|s| s * 1000 + i64::from(nanos / 1_000_000))
}
