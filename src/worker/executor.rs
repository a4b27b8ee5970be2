//! ④→⑤ From delivery to handler: decode, claim in batches, run each claimed job under its
//! timeout with a panic guard, and pass the outcome to the completer.
//!
//! Every delivery is settled exactly once, on every path: run and committed, acked unrun
//! (finished, a duplicate, gone, a second copy), sent on to a delay tier, dead-lettered, or
//! handed back. None is held longer than `APIARY_DETACH_AFTER` without being claimed, so
//! RabbitMQ's consumer timeout never closes a channel over deliveries waiting for a slot.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::{FutureExt, StreamExt};
use lapin::Consumer;
use lapin::types::AMQPValue;
use std::collections::VecDeque;

use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;

use super::completer::Completion;
use super::{DeliveryRef, Failed, Running, Shared, hand_back, hand_back_buffered, retry};
use crate::broker::BrokerError;
use crate::broker::consume::{Acks, Settle};
use crate::handler::{HandlerError, JobContext};
use crate::store::claim_job::{Claim, ClaimInput, DUE_TOLERANCE_MS};
use crate::store::dead_job::Waiting;
use crate::store::finish_job::{Finish, Outcome};
use crate::wire::{RECORDED_HEADER, WireJob};

/// How many times a delivery is claimed again after a race ([`Claim::Again`]) before it is
/// handed back instead: a bound, so no state can make a worker loop on one message.
const MAX_AGAIN: u32 = 50;
/// How many lease-long waits a redelivered message spends on a job another worker holds
/// before it is acked: the holder renewed its lease meanwhile, so it is alive, and if it dies
/// later the rescuer puts the job back.
const MAX_BUSY_WAITS: u32 = 2;

/// The consumer tag of this worker: its id, so `rabbitmqctl list_consumers` names it.
pub(crate) fn consumer_tag(shared: &Shared) -> String {
    format!("apiary-{}", shared.id)
}

/// One delivery, decoded, with where to settle it.
pub(crate) struct Incoming {
    job: Arc<WireJob>,
    redelivered: bool,
    /// The message carries [`RECORDED_HEADER`]: Apiary published it for a recorded job.
    recorded: bool,
    delivery: DeliveryRef,
    /// When it arrived: a delivery is never held unclaimed past `APIARY_DETACH_AFTER`.
    arrived: Instant,
    /// Claims made again after races, and lease-long waits on a busy job.
    again: u32,
    busy_waits: u32,
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
        let now = Instant::now();
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
            let recorded = d.properties.headers().as_ref().is_some_and(|h| {
                matches!(
                    h.inner().get(RECORDED_HEADER),
                    Some(AMQPValue::Boolean(true))
                )
            });
            match WireJob::decode(&d.data, message_id.as_deref(), shared.cfg.max_payload_bytes) {
                Ok(job) => {
                    // The claimer outlives every session; a failed send means it has stopped,
                    // and the delivery goes back with the channel.
                    let _ = shared.claim_tx.send(Incoming {
                        job: Arc::new(job),
                        redelivered: d.redelivered,
                        recorded,
                        delivery,
                        arrived: now,
                        again: 0,
                        busy_waits: 0,
                    });
                }
                Err(poison) => {
                    let shared2 = shared.clone();
                    shared.tasks.spawn(async move {
                        bury_poison(
                            &shared2,
                            &d.data,
                            poison.id,
                            poison.kind,
                            &poison.reason,
                            delivery,
                        )
                        .await
                    });
                }
            }
        }
    }
}

/// Records a message that cannot run as dead, dead-letters it with its reason, then acks. A
/// message is never requeued for being what it is, so it cannot loop.
async fn bury_poison(
    shared: &Shared,
    body: &[u8],
    id: crate::job::JobId,
    kind: Option<String>,
    why: &str,
    delivery: DeliveryRef,
) {
    tracing::warn!(job_id = %id, reason = %why, "poison message: recording it as dead");
    let limit = shared.cfg.max_payload_bytes;
    let reason = format!("poison message: {why}");
    let mut recorded = shared
        .with_store(|| {
            shared
                .store
                .record_poison(id, kind.as_deref(), body, &reason, limit)
        })
        .await;
    if let Err(Failed::Refused(e)) = &recorded {
        // Postgres refused even the record (the kind, say, breaks a rule of the schema): keep
        // what it cannot refuse, the reason and the body's text.
        tracing::warn!(job_id = %id, error = %e, "postgres refused a poison record; recording it without its kind");
        recorded = shared
            .with_store(|| shared.store.record_poison(id, None, body, &reason, limit))
            .await;
    }
    match recorded {
        Ok(recorded_as) => dead_letter_then_ack(shared, recorded_as, delivery).await,
        Err(Failed::Interrupted) => hand_back(shared, [delivery]),
        Err(Failed::Refused(e)) => {
            // Nothing can be recorded: the letter still goes to the dead-letter queue with its
            // reason, straight from here, and only then is the delivery acked.
            let reason = format!(
                "{reason}; not recorded: {}",
                e.refusal().unwrap_or_default()
            );
            let letter =
                crate::broker::publish::Outgoing::dead(&shared.names, id, body.to_vec(), &reason);
            match shared.publisher().await {
                Some(p) if p.publish(std::slice::from_ref(&letter)).await.is_ok() => {
                    delivery.settle(Settle::Ack)
                }
                _ => requeue_later(shared, delivery).await,
            }
        }
    }
}

/// Sends a dead job's letter (queued in the outbox when it became dead) and acks the delivery.
/// The outbox row was committed with the job's death, so the letter is safe whether or not
/// this publish works now: the relay sends what this could not.
pub(crate) async fn dead_letter_then_ack(
    shared: &Shared,
    id: crate::job::JobId,
    delivery: DeliveryRef,
) {
    super::flush_outbox(shared, &[id]).await;
    delivery.settle(Settle::Ack);
}

/// Requeues a delivery after a pause, for failures that would otherwise send it straight
/// back to be failed again (a broker that refuses publishes, say).
async fn requeue_later(shared: &Shared, delivery: DeliveryRef) {
    requeue_all_later(shared, [delivery]).await
}

async fn requeue_all_later(shared: &Shared, deliveries: impl IntoIterator<Item = DeliveryRef>) {
    tokio::select! {
        () = tokio::time::sleep(Duration::from_secs(1)) => {}
        () = shared.consuming_stopped.cancelled() => {}
    }
    hand_back(shared, deliveries);
}

/// The claimer: one claim statement in flight at a time, for everything that arrived while
/// the previous one ran. Under load the batches grow, and one commit covers many jobs; when
/// idle, a lone delivery is claimed at once. Runs until `stop` fires, then hands back what it
/// still holds.
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
                () = stop.cancelled() => break,
            }
        }
        while let Ok(i) = rx.try_recv() {
            pending.push_back(i);
        }
        if shared.consuming_stopped.is_cancelled() {
            // Draining: nothing more starts here; back to the queue for another worker.
            hand_back(&shared, pending.drain(..).map(|i| i.delivery));
            if stop.is_cancelled() {
                break;
            }
            continue;
        }
        // A delivery waiting this long for a slot goes back to the queue untouched, before the
        // broker's consumer timeout would close the channel over it.
        let hold = shared.cfg.detach_after;
        let (stale, fresh): (Vec<Incoming>, Vec<Incoming>) =
            pending.drain(..).partition(|i| i.arrived.elapsed() >= hold);
        if !stale.is_empty() {
            tracing::info!(
                deliveries = stale.len(),
                "handing back deliveries that waited too long for a free slot"
            );
            hand_back(&shared, stale.into_iter().map(|i| i.delivery));
        }
        // A scheduled job or a retry that came back from a delay tier early, or was published
        // with a future run_at: sent on to the next tier without claiming, after a look at its
        // record (a cancelled job's message stops here).
        let now = shared.db_now();
        let (waiting, due): (Vec<Incoming>, Vec<Incoming>) = fresh.into_iter().partition(|inc| {
            inc.job
                .run_at
                .is_some_and(|at| (at - now).num_milliseconds() > DUE_TOLERANCE_MS)
        });
        if !waiting.is_empty() {
            let shared2 = shared.clone();
            shared
                .tasks
                .spawn(async move { hop_waiting(&shared2, waiting).await });
        }
        pending = due.into();
        if pending.is_empty() {
            continue;
        }
        // Claim only what can start now: a job is `running` in Postgres only once it has a
        // handler slot, and deliveries waiting for one stay untouched, so a drain hands them
        // back as they came.
        let oldest = pending
            .iter()
            .map(|i| i.arrived)
            .min()
            .unwrap_or_else(Instant::now);
        let first = tokio::select! {
            biased;
            () = shared.consuming_stopped.cancelled() => continue,
            () = stop.cancelled() => break,
            p = shared.slots.clone().acquire_owned() => p,
            () = tokio::time::sleep_until((oldest + hold).into()) => continue,
        };
        let Ok(first) = first else { break };
        let want = pending.len().min(shared.cfg.batch);
        let mut permits = vec![first];
        while permits.len() < want {
            match shared.slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let batch: Vec<Incoming> = pending.drain(..permits.len()).collect();
        // Tracked, so a drain that begins while this claim is in flight waits for it and for
        // the jobs it starts, instead of exiting under a freshly committed claim.
        let token = shared.tasks.token();
        claim_now(&shared, batch, permits).await;
        drop(token);
    }
    // Stopped: whatever is still here was never claimed.
    while let Ok(i) = rx.try_recv() {
        pending.push_back(i);
    }
    hand_back(&shared, pending.drain(..).map(|i| i.delivery));
}

/// The claim input of a delivery: its budget if it is a raw job recorded now.
fn claim_input<'a>(shared: &Shared, inc: &'a Incoming) -> ClaimInput<'a> {
    let job = inc.job.as_ref();
    ClaimInput {
        job,
        budget: job
            .max_attempts
            .or_else(|| shared.kind_options(&job.kind).max_attempts)
            .unwrap_or(shared.cfg.max_attempts),
        recorded: inc.recorded,
    }
}

/// Claims jobs that each hold a handler slot, and dispatches each by what the claim found.
async fn claim_now(shared: &Arc<Shared>, batch: Vec<Incoming>, permits: Vec<OwnedSemaphorePermit>) {
    let refs: Vec<&Incoming> = batch.iter().collect();
    let Some(claims) = claim_isolating(shared, &refs).await else {
        return hand_back(shared, batch.into_iter().map(|i| i.delivery));
    };
    for ((inc, claim), permit) in batch.into_iter().zip(claims).zip(permits) {
        match claim {
            Ok(claim) => dispatch(shared, inc, claim, permit),
            Err(refusal) => {
                drop(permit);
                let shared2 = shared.clone();
                shared.tasks.spawn(async move {
                    let reason = format!("Postgres cannot store this job: {refusal}");
                    let body = inc.job.to_body();
                    bury_poison(&shared2, &body, inc.job.id, None, &reason, inc.delivery).await
                });
            }
        }
    }
}

/// Claims `batch`; if Postgres refuses the statement because of one job's data, claims the
/// rest without it: the batch is split in halves until the refused jobs stand alone, and each
/// of those comes back as `Err` with Postgres's reason. `None` if the worker was interrupted.
async fn claim_isolating(
    shared: &Arc<Shared>,
    batch: &[&Incoming],
) -> Option<Vec<Result<Claim, String>>> {
    let inputs: Vec<ClaimInput<'_>> = batch.iter().map(|i| claim_input(shared, i)).collect();
    let claimed = shared
        .with_store(|| {
            shared
                .store
                .claim_jobs(&inputs, shared.id, shared.cfg.lease)
        })
        .await;
    match claimed {
        Ok(c) => {
            shared.observe_db_now(c.db_now);
            Some(c.claims.into_iter().map(Ok).collect())
        }
        Err(Failed::Interrupted) => None,
        Err(Failed::Refused(e)) if batch.len() == 1 => {
            Some(vec![Err(e.refusal().unwrap_or_else(|| e.to_string()))])
        }
        Err(Failed::Refused(_)) => {
            let (left, right) = batch.split_at(batch.len() / 2);
            let mut out = Box::pin(claim_isolating(shared, left)).await?;
            out.extend(Box::pin(claim_isolating(shared, right)).await?);
            Some(out)
        }
    }
}

/// Acts on a claim. `permit` is the job's handler slot: kept by a job that runs, released at
/// once otherwise.
fn dispatch(shared: &Arc<Shared>, mut inc: Incoming, claim: Claim, permit: OwnedSemaphorePermit) {
    // A job that runs keeps its slot; any other answer frees it at once.
    let permit = matches!(claim, Claim::Claimed { .. }).then_some(permit);
    let shared2 = shared.clone();
    match claim {
        Claim::Claimed {
            attempt,
            max_attempts,
        } => {
            shared
                .tasks
                .spawn(async move { run_job(&shared2, inc, attempt, max_attempts, permit).await });
        }
        Claim::Finished | Claim::Duplicate(_) | Claim::Cancelled | Claim::Gone => {
            if matches!(claim, Claim::Gone) {
                tracing::info!(job_id = %inc.job.id, "message of a job that finished and was pruned: acked unrun");
            }
            inc.delivery.settle(Settle::Ack)
        }
        Claim::Exhausted => {
            let id = inc.job.id;
            shared
                .tasks
                .spawn(async move { dead_letter_then_ack(&shared2, id, inc.delivery).await });
        }
        Claim::Conflict(recorded_as) => {
            tracing::warn!(job_id = %inc.job.id, recorded_as = %recorded_as, "a message reuses a recorded job's id for other content: recorded apart as dead, not run");
            shared.tasks.spawn(async move {
                dead_letter_then_ack(&shared2, recorded_as, inc.delivery).await
            });
        }
        Claim::NotDue { remaining_ms } => {
            shared
                .tasks
                .spawn(async move { hop(&shared2, inc, remaining_ms).await });
        }
        Claim::Busy {
            until,
            worker,
            attempt,
        } => {
            let ours = worker == shared.id
                && shared
                    .running
                    .lock()
                    .is_ok_and(|r| r.contains_key(&(inc.job.id, attempt)));
            if ours || !inc.redelivered || inc.busy_waits >= MAX_BUSY_WAITS {
                // A second copy of a job a live claim holds (a relay's republish, a raw
                // duplicate, a redelivery after a channel broke under a live worker). The
                // holder commits it; if the holder dies, its lease lapses and the rescuer
                // puts the job back. Holding this copy would only risk the consumer timeout.
                inc.delivery.settle(Settle::Ack);
            } else {
                // A redelivery: possibly the very message of a worker that just died holding
                // the claim. Wait for the lease to end, then claim again: the fast path back.
                inc.busy_waits += 1;
                let wait = (until - shared.db_now())
                    .to_std()
                    .unwrap_or_default()
                    .min(shared.cfg.lease)
                    + Duration::from_millis(50);
                shared
                    .tasks
                    .spawn(async move { claim_later(&shared2, inc, wait).await });
            }
        }
        Claim::Again if inc.again < MAX_AGAIN => {
            inc.again += 1;
            shared
                .tasks
                .spawn(async move { claim_later(&shared2, inc, Duration::from_millis(20)).await });
        }
        Claim::Again => {
            tracing::warn!(job_id = %inc.job.id, "claim kept racing; handing the message back");
            shared
                .tasks
                .spawn(async move { requeue_later(&shared2, inc.delivery).await });
        }
    }
}

async fn claim_later(shared: &Arc<Shared>, inc: Incoming, wait: Duration) {
    tokio::select! {
        () = tokio::time::sleep(wait) => {}
        () = shared.consuming_stopped.cancelled() => return hand_back(shared, [inc.delivery]),
    }
    if let Err(e) = shared.claim_tx.send(inc) {
        hand_back(shared, [e.0.delivery]);
    }
}

/// Looks up messages that are not due yet, then sends each on to its next delay tier, or
/// acks it if its job has ended, was pruned, or is a duplicate.
async fn hop_waiting(shared: &Arc<Shared>, batch: Vec<Incoming>) {
    let inputs: Vec<ClaimInput<'_>> = batch.iter().map(|i| claim_input(shared, i)).collect();
    let looked = shared
        .with_store(|| shared.store.check_waiting(&inputs))
        .await;
    drop(inputs);
    let verdicts = match looked {
        Ok(v) => v,
        Err(Failed::Interrupted) => {
            return hand_back(shared, batch.into_iter().map(|i| i.delivery));
        }
        Err(Failed::Refused(_)) => {
            // One of them is data Postgres refuses: the claim path isolates and records it.
            for inc in batch {
                let _ = shared.claim_tx.send(inc);
            }
            return;
        }
    };
    let now = shared.db_now();
    let mut hops = Vec::new();
    for (inc, verdict) in batch.into_iter().zip(verdicts) {
        match verdict {
            Waiting::Hop => hops.push(inc),
            Waiting::Finished | Waiting::Gone | Waiting::Duplicate(_) => {
                inc.delivery.settle(Settle::Ack)
            }
            // The claim records the conflict and dead-letters the message.
            Waiting::Conflict => {
                let _ = shared.claim_tx.send(inc);
            }
        }
    }
    if hops.is_empty() {
        return;
    }
    let Some(publisher) = shared.publisher().await else {
        return hand_back(shared, hops.into_iter().map(|i| i.delivery));
    };
    let out: Vec<crate::broker::publish::Outgoing> = hops
        .iter()
        .map(|inc| {
            let remaining = inc
                .job
                .run_at
                .map(|at| (at - now).num_milliseconds())
                .unwrap_or(0);
            hop_message(shared, &inc.job, remaining)
        })
        .collect();
    match publisher.publish(&out).await {
        Ok(()) => {
            for inc in hops {
                inc.delivery.settle(Settle::Ack);
            }
        }
        Err(e) => {
            tracing::warn!(jobs = hops.len(), error = %e, "could not send waiting jobs on; handing their messages back");
            requeue_all_later(shared, hops.into_iter().map(|i| i.delivery)).await;
        }
    }
}

/// The message that carries a waiting job to the delay tier for `remaining_ms` (by Postgres's
/// clock; at least the finest tier, so a worker whose clock runs ahead never republishes a
/// not-due job straight back into the work queue).
fn hop_message(
    shared: &Shared,
    job: &WireJob,
    remaining_ms: i64,
) -> crate::broker::publish::Outgoing {
    let remaining_ms = hop_wait_ms(remaining_ms);
    let mut job = job.clone();
    job.run_at = Some(
        job.run_at
            .unwrap_or_else(|| Utc::now() + chrono::Duration::milliseconds(remaining_ms)),
    );
    crate::broker::publish::Outgoing::recorded_to(shared.names.next_hop(remaining_ms), &job)
}

/// How long a job that is not due waits before it is looked at again: what remains by
/// Postgres's clock, but never less than the finest delay tier. A job judged not due is never
/// sent straight back to the work queue, whatever the clocks say, so no skew makes it loop.
fn hop_wait_ms(remaining_ms: i64) -> i64 {
    remaining_ms.max(crate::broker::topology::DELAY_TIERS_MS[0] as i64)
}

/// Sends one job that is not due on to its next delay tier, then acks this delivery.
async fn hop(shared: &Shared, inc: Incoming, remaining_ms: i64) {
    let Some(publisher) = shared.publisher().await else {
        // No session: the channel is gone, and with it this delivery; the broker has it back.
        return hand_back(shared, [inc.delivery]);
    };
    let out = hop_message(shared, &inc.job, remaining_ms);
    match publisher.publish(std::slice::from_ref(&out)).await {
        Ok(()) => inc.delivery.settle(Settle::Ack),
        Err(e) => {
            tracing::warn!(job_id = %inc.job.id, error = %e, "could not send a waiting job on; handing its message back");
            requeue_later(shared, inc.delivery).await
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
    _permit: Option<OwnedSemaphorePermit>,
) {
    let job = inc.job.clone();
    let span = tracing::info_span!("job", job_id = %job.id, kind = %job.kind, attempt);
    let cancel = shared.interrupt.child_token();
    let cancel_requested = Arc::new(AtomicBool::new(false));
    let detached_flag = Arc::new(AtomicBool::new(false));
    if let Ok(mut running) = shared.running.lock() {
        let entry = Running {
            cancel: cancel.clone(),
            cancel_requested: cancel_requested.clone(),
            detached: detached_flag.clone(),
            delivery: inc.delivery.clone(),
        };
        running.insert((job.id, attempt), entry);
    }
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
        let done = crate::store::finish_job::finish_jobs(
            &mut *tx,
            shared.id,
            &[finish(outcome.clone(), detached)],
            true,
        )
        .await;
        let outcome = match done {
            Ok(rows) if !rows.is_empty() => match tx.commit().await {
                Ok(()) => {
                    shared.counters.finished.fetch_add(1, Ordering::Relaxed);
                    km.succeeded.increment(1);
                    if let Some(at) = enqueued_ms(&job) {
                        let ms = (chrono::Utc::now().timestamp_millis() - at).max(0);
                        km.end_to_end.record(ms as f64 / 1000.0);
                    }
                    forget(shared, job.id, attempt);
                    inc.delivery.settle(Settle::Ack);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::QueueNames;

    #[test]
    fn a_job_judged_not_due_always_waits_in_a_delay_tier() {
        let names = QueueNames::new("q");
        // A worker whose clock runs ahead of Postgres's sees a not-due job as due, or
        // overdue: the hop still goes through the finest tier, not back to the work queue.
        for remaining in [-60_000, -1, 0, 50, 99] {
            assert_eq!(names.next_hop(hop_wait_ms(remaining)), "q.delay.100");
        }
        assert_eq!(names.next_hop(hop_wait_ms(30_000)), "q.delay.25000");
    }
}
