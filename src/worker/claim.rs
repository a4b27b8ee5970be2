//! ④→⑤ Claiming: from deliveries to attempts this worker holds. A lane's claimer takes
//! what its consumer passed on, sends on to a delay tier what is not due yet, takes one of the
//! lane's handler slots per job, claims the batch in one statement, and acts on each answer:
//! an attempt starts ([`super::run`]), a finished or duplicate message is acked unrun, a busy
//! one waits out the holder's lease, a conflict or an exhausted job is dead-lettered.
//!
//! Every delivery is settled exactly once, on every path. None is held longer than
//! `APIARY_DETACH_AFTER` without being claimed, so RabbitMQ's consumer timeout never closes a
//! channel over deliveries waiting for a slot.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;

use super::dead::{bury_poison, dead_letter_then_ack, requeue_all_later, requeue_later};
use super::lanes::Lane;
use super::shared::{DeliveryRef, Failed, Shared, hand_back};
use crate::broker::consume::Settle;
use crate::store::claim_job::{Claim, ClaimInput, DUE_TOLERANCE_MS};
use crate::store::dead_job::Waiting;
use crate::wire::WireJob;

/// How many times a delivery is claimed again after a race ([`Claim::Again`]) before it is
/// handed back instead: a bound, so no state can make a worker loop on one message.
const MAX_AGAIN: u32 = 50;
/// How many lease-long waits a redelivered message spends on a job another worker holds
/// before it is acked: the holder renewed its lease meanwhile, so it is alive, and if it dies
/// later the rescuer puts the job back.
const MAX_BUSY_WAITS: u32 = 2;

/// One delivery, decoded, with where to settle it.
pub(crate) struct Incoming {
    pub(crate) job: Arc<WireJob>,
    /// The lane it arrived on.
    pub(crate) lane: Arc<Lane>,
    pub(crate) redelivered: bool,
    /// The message carries [`crate::wire::RECORDED_HEADER`]: Apiary published it for a
    /// recorded job.
    pub(crate) recorded: bool,
    /// The producer's trace context, from the message's `traceparent` header.
    pub(crate) trace: Option<crate::trace::TraceContext>,
    pub(crate) delivery: DeliveryRef,
    /// When it arrived: a delivery is never held unclaimed past `APIARY_DETACH_AFTER`.
    pub(crate) arrived: Instant,
    /// Claims made again after races, and lease-long waits on a busy job.
    pub(crate) again: u32,
    pub(crate) busy_waits: u32,
}

/// The claimer: one claim statement in flight at a time, for everything that arrived while
/// the previous one ran. Under load the batches grow, and one commit covers many jobs; when
/// idle, a lone delivery is claimed at once. Runs until `stop` fires, then hands back what it
/// still holds.
pub(crate) async fn claimer(
    shared: Arc<Shared>,
    lane: Arc<Lane>,
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
        if lane.is_paused() {
            // Paused: nothing starts. Once the consumer is cancelled, what is held goes back
            // and waits in the broker for the resume; until then, wait a moment.
            if !lane.is_consuming() {
                hand_back(&shared, pending.drain(..).map(|i| i.delivery));
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
                () = stop.cancelled() => break,
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
            p = lane.slots.clone().acquire_owned() => p,
            () = tokio::time::sleep_until((oldest + hold).into()) => continue,
        };
        let Ok(first) = first else { break };
        let want = pending.len().min(shared.cfg.batch);
        let mut permits = vec![first];
        while permits.len() < want {
            match lane.slots.clone().try_acquire_owned() {
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
pub(crate) fn claim_input<'a>(shared: &'a Shared, inc: &'a Incoming) -> ClaimInput<'a> {
    let job = inc.job.as_ref();
    ClaimInput {
        job,
        budget: job
            .max_attempts
            .or_else(|| shared.kind_options(&job.kind).max_attempts)
            .unwrap_or(shared.cfg.max_attempts),
        recorded: inc.recorded,
        prefix: &shared.cfg.queue,
    }
}

/// Claims jobs that each hold a handler slot, and dispatches each by what the claim found.
async fn claim_now(shared: &Arc<Shared>, batch: Vec<Incoming>, permits: Vec<OwnedSemaphorePermit>) {
    // Limits cost nothing to kinds and queues without them: an empty map and a `None`.
    let limited = |i: &Incoming| i.lane.rate.is_some() || shared.limited.contains_key(&i.job.kind);
    if batch.iter().any(limited) {
        let mut plain = (Vec::new(), Vec::new());
        let mut gated = (Vec::new(), Vec::new());
        for (inc, permit) in batch.into_iter().zip(permits) {
            let to = if limited(&inc) {
                &mut gated
            } else {
                &mut plain
            };
            to.0.push(inc);
            to.1.push(permit);
        }
        if !plain.0.is_empty() {
            claim_plain(shared, plain.0, plain.1).await;
        }
        return super::limits::claim_gated(shared, gated.0, gated.1).await;
    }
    claim_plain(shared, batch, permits).await
}

/// Claims a batch of jobs without limits.
async fn claim_plain(
    shared: &Arc<Shared>,
    batch: Vec<Incoming>,
    permits: Vec<OwnedSemaphorePermit>,
) {
    let refs: Vec<&Incoming> = batch.iter().collect();
    let Some(claims) = claim_batch(shared, &refs).await else {
        return hand_back(shared, batch.into_iter().map(|i| i.delivery));
    };
    for ((inc, claim), permit) in batch.into_iter().zip(claims).zip(permits) {
        match claim {
            Ok(claim) => dispatch(shared, inc, claim, permit),
            Err(refusal) => {
                drop(permit);
                bury_refused(shared, inc, refusal);
            }
        }
    }
}

/// Buries jobs whose claim Postgres refused for their data, with its reason.
pub(crate) async fn claim_refused(
    shared: &Arc<Shared>,
    batch: Vec<Incoming>,
    permits: Vec<OwnedSemaphorePermit>,
    e: crate::store::StoreError,
) {
    drop(permits);
    let refusal = e.refusal().unwrap_or_else(|| e.to_string());
    for inc in batch {
        bury_refused(shared, inc, refusal.clone());
    }
}

fn bury_refused(shared: &Arc<Shared>, inc: Incoming, refusal: String) {
    let shared2 = shared.clone();
    shared.tasks.spawn(async move {
        let reason = format!("Postgres cannot store this job: {refusal}");
        let body = inc.job.to_body();
        let names = inc.lane.names.clone();
        bury_poison(
            &shared2,
            &names,
            inc.lane.queue(),
            &body,
            inc.job.id,
            None,
            &reason,
            inc.delivery,
        )
        .await
    });
}

/// Claims `batch` in the committer's next commit, together with the outcomes that finished
/// meanwhile; if that commit fails, on its own ([`claim_isolating`]).
async fn claim_batch(
    shared: &Arc<Shared>,
    batch: &[&Incoming],
) -> Option<Vec<Result<Claim, String>>> {
    if let Some(rows) = super::commit::claim_jointly(shared, batch).await {
        let inputs: Vec<ClaimInput<'_>> = batch.iter().map(|i| claim_input(shared, i)).collect();
        // The claim is committed; what remains reads why the others claimed nothing.
        match shared
            .with_store(|| shared.store.resolve_claims(&inputs, rows.clone()))
            .await
        {
            Ok(c) => {
                shared.observe_db_now(c.db_now);
                return Some(c.claims.into_iter().map(Ok).collect());
            }
            Err(Failed::Interrupted) => return None,
            // Read again by the separate path, which isolates what Postgres refuses; a job
            // claimed above is found running under this worker's own claim.
            Err(Failed::Refused(_)) => {}
        }
    }
    claim_isolating(shared, batch).await
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
pub(crate) fn dispatch(
    shared: &Arc<Shared>,
    mut inc: Incoming,
    claim: Claim,
    permit: OwnedSemaphorePermit,
) {
    // A job that runs keeps its slot; any other answer frees it at once.
    let runs = matches!(claim, Claim::Claimed { .. })
        || matches!(claim, Claim::Busy { worker, .. } if worker == shared.id);
    let permit = runs.then_some(permit);
    let shared2 = shared.clone();
    match claim {
        Claim::Claimed {
            attempt,
            max_attempts,
        } => {
            if let Err(inc) = super::run::start_job(shared, inc, attempt, max_attempts, permit) {
                // Cannot happen for a fresh claim; settle rather than strand it.
                inc.delivery.settle(Settle::Ack);
            }
        }
        Claim::Finished | Claim::Duplicate(_) | Claim::Cancelled | Claim::Gone => {
            tracing::debug!(job_id = %inc.job.id, claim = ?claim, "acked unrun");
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
            worker,
            attempt,
            max_attempts,
            ..
        } if worker == shared.id => {
            // This worker holds the claim. If it is not running that attempt, its claim
            // committed and the answer was lost (a connection cut mid-statement): the lease is
            // this worker's, so run it now rather than strand the job until the lease lapses
            // and costs an attempt. If it is running it, this is a second copy: ack it.
            let job_id = inc.job.id;
            match super::run::start_job(shared, inc, attempt, max_attempts, permit) {
                Ok(()) => {
                    tracing::info!(%job_id, attempt, "adopting a claim of this worker's whose answer was lost")
                }
                Err(inc) => inc.delivery.settle(Settle::Ack),
            }
        }
        Claim::Busy { until, .. } => {
            if !inc.redelivered || inc.busy_waits >= MAX_BUSY_WAITS {
                // A second copy of a job a live claim holds (a relay's republish, a raw
                // duplicate, a redelivery after a channel broke under a live worker, or a
                // copy of an attempt this worker runs). The holder commits it; if the holder
                // dies, its lease lapses and the rescuer puts the job back. Holding this copy
                // would only risk the consumer timeout.
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
    let lane = inc.lane.clone();
    if let Err(e) = lane.claim_tx.send(inc) {
        hand_back(shared, [e.0.delivery]);
    }
}

/// Looks up messages that are not due yet, then sends each on to its next delay tier, or
/// acks it if its job has ended, was pruned, or is a duplicate.
pub(crate) async fn hop_waiting(shared: &Arc<Shared>, batch: Vec<Incoming>) {
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
                let lane = inc.lane.clone();
                let _ = lane.claim_tx.send(inc);
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
                let lane = inc.lane.clone();
                let _ = lane.claim_tx.send(inc);
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
            hop_message(inc, remaining)
        })
        .collect();
    match publisher.publish(&out).await {
        Ok(()) => {
            for (inc, m) in hops.into_iter().zip(&out) {
                tracing::debug!(job_id = %inc.job.id, tier = %m.queue, "sent on to a delay tier");
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
fn hop_message(inc: &Incoming, remaining_ms: i64) -> crate::broker::publish::Outgoing {
    let remaining_ms = hop_wait_ms(remaining_ms);
    let names = inc.lane.names.clone();
    let mut job = inc.job.as_ref().clone();
    job.run_at = Some(
        job.run_at
            .unwrap_or_else(|| Utc::now() + chrono::Duration::milliseconds(remaining_ms)),
    );
    // Routed by the current shard count, not the shard it came from: a job drained from a
    // shard left over from a larger count waits in a shard that is still consumed.
    let queue = names.next_hop_in(names.shard_for(&job), remaining_ms);
    crate::broker::publish::Outgoing::recorded_to(names, queue, &job)
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
    let out = hop_message(&inc, remaining_ms);
    match publisher.publish(std::slice::from_ref(&out)).await {
        Ok(()) => {
            tracing::debug!(job_id = %inc.job.id, tier = %out.queue, "sent on to a delay tier");
            inc.delivery.settle(Settle::Ack)
        }
        Err(e) => {
            tracing::warn!(job_id = %inc.job.id, error = %e, "could not send a waiting job on; handing its message back");
            requeue_later(shared, inc.delivery).await
        }
    }
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
