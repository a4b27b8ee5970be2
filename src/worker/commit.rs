//! ⑥ Committing finished attempts, then acknowledging them. Completions queue up while a
//! commit is in flight and the next commit takes them all: one statement and one
//! multiple-ack for a burst, and no waiting at all when a job finishes alone.
//!
//! The claimers hand their claims to this same loop ([`ClaimRequest`]), so the claims that
//! arrive while a commit is in flight commit together with the next batch of outcomes: one
//! transaction, one WAL flush, for both halves of the hot path. Should that transaction fail
//! for one item's data, or the worker be interrupted, each half is redone on its own by the
//! paths that isolate a refused item ([`finish_isolating`] here, the claimer's own).
//!
//! The order is the guarantee: the outcome commits first, together with an outbox row for
//! whatever message must carry the job on (a retry, a long job handed back, a dead letter);
//! then those messages are published; then the delivery is acked. A crash before the commit
//! leaves the delivery unacked, so it comes back and the claim sees the job as it was; a crash
//! after it leaves the outbox row, which the relay publishes.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::shared::{DeliveryRef, Failed, Shared};
use crate::broker::consume::Settle;
use crate::job::{JobId, JobStatus};
use crate::store::claim_job::{ClaimInput, Claimed};
use crate::store::finish_job::{Finish, Finished, Outcome};
use crate::wire::WireJob;

/// A finished attempt on its way to the database.
pub(crate) struct Completion {
    pub(crate) finish: Finish,
    pub(crate) job: Arc<WireJob>,
    pub(crate) delivery: DeliveryRef,
}

/// A claim for the committer's next commit: the deliveries' jobs with their budgets, and
/// where to send the rows the claim took. `None` there means "claim them yourself": the
/// joint commit failed, or the committer has stopped.
pub(crate) struct ClaimRequest {
    /// Each job with its attempt budget and whether its message says it was recorded.
    pub(crate) jobs: Vec<(Arc<WireJob>, i32, bool)>,
    pub(crate) reply: oneshot::Sender<Option<Vec<Claimed>>>,
}

/// Asks the committer to claim `batch` in its next commit. `None` if the caller should
/// claim it itself.
pub(crate) async fn claim_jointly(
    shared: &Shared,
    batch: &[&super::claim::Incoming],
) -> Option<Vec<Claimed>> {
    let (reply, answer) = oneshot::channel();
    let jobs = batch
        .iter()
        .map(|i| {
            let input = super::claim::claim_input(shared, i);
            (i.job.clone(), input.budget, input.recorded)
        })
        .collect();
    shared.claim_tx.send(ClaimRequest { jobs, reply }).ok()?;
    answer.await.ok().flatten()
}

/// Runs until `stop` fires and everything queued before it is written.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Completion>,
    mut claims_rx: mpsc::UnboundedReceiver<ClaimRequest>,
    stop: CancellationToken,
) {
    let max = shared.cfg.batch;
    loop {
        let mut batch = Vec::with_capacity(max.min(64));
        let mut claims = Vec::new();
        tokio::select! {
            c = rx.recv() => match c {
                Some(c) => batch.push(c),
                None => return,
            },
            Some(r) = claims_rx.recv(), if !stop.is_cancelled() => claims.push(r),
            () = stop.cancelled() => match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => return,
            },
        }
        while batch.len() < max {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        // Every claim waiting now joins this commit (claimers each wait for their answer, so
        // at most one per lane is queued).
        while let Ok(r) = claims_rx.try_recv() {
            claims.push(r);
        }
        if claims.is_empty() {
            flush(&shared, batch).await;
        } else {
            flush_with_claims(&shared, batch, claims).await;
        }
    }
}

/// Commits `batch`'s outcomes and `claims` together, answers the claimers, then does what
/// follows the outcomes' commit. If the joint commit fails, the claimers claim on their own
/// and the outcomes go the separate way ([`flush`]).
async fn flush_with_claims(shared: &Shared, batch: Vec<Completion>, claims: Vec<ClaimRequest>) {
    let finishes: Vec<Finish> = batch.iter().map(|c| c.finish.clone()).collect();
    let inputs: Vec<Vec<ClaimInput<'_>>> = claims
        .iter()
        .map(|r| {
            r.jobs
                .iter()
                .map(|(job, budget, recorded)| ClaimInput {
                    job,
                    budget: *budget,
                    recorded: *recorded,
                    prefix: &shared.cfg.queue,
                })
                .collect()
        })
        .collect();
    let joint = shared
        .with_store(|| {
            shared
                .store
                .finish_and_claim(shared.id, &finishes, &inputs, shared.cfg.lease)
        })
        .await;
    drop(inputs);
    let ((done, released), claimed) = match joint {
        Ok(j) => j,
        Err(_) => {
            for r in claims {
                let _ = r.reply.send(None);
            }
            if !batch.is_empty() {
                flush(shared, batch).await;
            }
            return;
        }
    };
    // The claimers first: their jobs start while the outcomes' messages go out.
    for (r, rows) in claims.into_iter().zip(claimed) {
        let _ = r.reply.send(Some(rows));
    }
    if batch.is_empty() {
        return;
    }
    let webhooks = done.iter().filter_map(|d| d.webhook).collect();
    let applied = applied_of(&finishes, &done);
    after_commit(shared, batch, applied, released, webhooks).await;
}

/// Per finish, the status its row ended in, or `None` where its claim no longer held.
fn applied_of(finishes: &[Finish], done: &[Finished]) -> Vec<Option<JobStatus>> {
    finishes
        .iter()
        .map(|f| {
            done.iter()
                .find(|d| d.id == f.id && d.attempt == f.attempt)
                .map(|d| d.status)
        })
        .collect()
}

async fn flush(shared: &Shared, mut batch: Vec<Completion>) {
    let mut follow = Vec::new();
    let mut webhooks = Vec::new();
    let Some(applied) = finish_isolating(shared, &mut batch, &mut follow, &mut webhooks).await
    else {
        // Interrupted while Postgres was unreachable. Hand the deliveries back: their claims
        // lapse with the lease (nothing renews them now), and the redelivery claims them
        // again; holding them unacked would strand them until the channel closed.
        for c in &batch {
            super::run::forget(shared, c.finish.id, c.finish.attempt);
            c.delivery.settle(Settle::Requeue);
        }
        return;
    };
    after_commit(shared, batch, applied, follow, webhooks).await;
}

/// What follows a commit of outcomes: the messages it recorded go out, then the deliveries
/// are settled and counted.
async fn after_commit(
    shared: &Shared,
    batch: Vec<Completion>,
    applied: Vec<Option<JobStatus>>,
    follow: Vec<JobId>,
    webhooks: Vec<JobId>,
) {
    // The outcomes are written: from here on these attempts are not this worker's to renew (a
    // heartbeat now would take a committed retry for a lost claim).
    for c in &batch {
        super::run::forget(shared, c.finish.id, c.finish.attempt);
    }

    // Retries, long jobs handed back and dead jobs each got an outbox row in the commit: send
    // those messages now, under the relay's row locks. If this fails the relay sends them
    // later; either way the deliveries can be acked, since the commit made them redundant.
    // Webhook deliveries recorded by the commit go with them, so a receiver hears of a
    // finish as soon as the job's own messages are out, not after the relay's grace.
    let to_send: Vec<_> = batch
        .iter()
        .zip(&applied)
        .filter_map(|(c, status)| match status {
            Some(JobStatus::Dead | JobStatus::Retrying) => Some(c.finish.id),
            Some(JobStatus::Queued) if c.finish.detached => Some(c.finish.id),
            _ => None,
        })
        .chain(webhooks)
        .collect();
    super::relay::flush_outbox(shared, &to_send).await;
    // Children these outcomes released, and callbacks of batches they completed.
    super::relay::flush_released(shared, &follow).await;

    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut finished = 0;
    let mut handed_back = 0;
    let mut failed = 0;
    for (c, status) in batch.iter().zip(&applied) {
        let km = shared.metrics.kind(&c.job.kind);
        let how = match status {
            // The claim was no longer ours (the lease ran out and another worker or the
            // rescuer took the job, or a forced stop released it first). Requeue rather than
            // ack: the redelivery's claim finds the job as it is and settles it.
            None => Settle::Requeue,
            Some(JobStatus::Queued) => {
                handed_back += 1;
                if c.finish.detached {
                    // Its message was acked at detach; the outbox row carries it back.
                    Settle::Ack
                } else {
                    // Handed back: requeue so another worker starts it now.
                    Settle::Requeue
                }
            }
            Some(st) => {
                finished += 1;
                match st {
                    JobStatus::Succeeded => {
                        km.succeeded.increment(1);
                        shared
                            .samples
                            .succeeded(super::run::due_ms(&c.job).map(|at| now_ms - at));
                    }
                    JobStatus::Retrying => {
                        failed += 1;
                        km.failed.increment(1);
                        km.retried.increment(1);
                        shared.samples.retried();
                        tracing::info!(job_id = %c.job.id, kind = %c.job.kind, attempt = c.finish.attempt, "attempt failed; retrying");
                    }
                    JobStatus::Dead => {
                        failed += 1;
                        km.failed.increment(1);
                        km.dead.increment(1);
                        shared.samples.dead();
                        if let Outcome::Dead(reason) = &c.finish.outcome {
                            tracing::warn!(job_id = %c.job.id, kind = %c.job.kind, attempt = c.finish.attempt, reason = %reason, "job is dead");
                        }
                    }
                    _ => {}
                }
                if matches!(st, JobStatus::Succeeded | JobStatus::Dead)
                    && let Some(at) = super::run::enqueued_ms(&c.job)
                {
                    km.end_to_end.record((now_ms - at).max(0) as f64 / 1000.0);
                }
                Settle::Ack
            }
        };
        tracing::debug!(job_id = %c.finish.id, outcome = ?c.finish.outcome.status(), status = ?status, settle = ?how, "settled");
        c.delivery.settle(how);
    }
    shared
        .counters
        .finished
        .fetch_add(finished, Ordering::Relaxed);
    shared
        .counters
        .handed_back
        .fetch_add(handed_back, Ordering::Relaxed);
    shared.counters.failed.fetch_add(failed, Ordering::Relaxed);
}

/// Writes the batch's outcomes. Returns, per completion, the status it ended in, or `None`
/// where the claim no longer held. If Postgres refuses the statement because of one job's data
/// (a result or error it cannot store), the rest are written without it, and that job's
/// outcome becomes `dead` with Postgres's reason: no other job is requeued or charged for it.
/// `None` overall if the worker was interrupted first. Also returns the webhook deliveries
/// the commit recorded.
async fn finish_isolating(
    shared: &Shared,
    batch: &mut [Completion],
    follow: &mut Vec<JobId>,
    webhooks: &mut Vec<JobId>,
) -> Option<Vec<Option<JobStatus>>> {
    let finishes: Vec<Finish> = batch.iter().map(|c| c.finish.clone()).collect();
    match shared
        .with_store(|| shared.store.finish_jobs_following(shared.id, &finishes))
        .await
    {
        Ok((done, released)) => {
            follow.extend(released);
            webhooks.extend(done.iter().filter_map(|d| d.webhook));
            Some(applied_of(&finishes, &done))
        }
        Err(Failed::Interrupted) => None,
        Err(Failed::Refused(e)) if batch.len() == 1 => {
            let c = &mut batch[0];
            if matches!(c.finish.outcome, Outcome::Dead(_)) {
                // Even the plainest outcome is refused: leave the job to its lease.
                tracing::error!(job_id = %c.finish.id, error = %e, "postgres refused to record a job's outcome");
                return Some(vec![None]);
            }
            let reason = format!(
                "the attempt's outcome could not be stored: {}",
                e.refusal().unwrap_or_else(|| e.to_string())
            );
            tracing::warn!(job_id = %c.finish.id, %reason, "recording the job as dead instead");
            c.finish.outcome = Outcome::Dead(reason);
            Box::pin(finish_isolating(shared, batch, follow, webhooks)).await
        }
        Err(Failed::Refused(_)) => {
            let mid = batch.len() / 2;
            let (left, right) = batch.split_at_mut(mid);
            let mut out = Box::pin(finish_isolating(shared, left, follow, webhooks)).await?;
            out.extend(Box::pin(finish_isolating(shared, right, follow, webhooks)).await?);
            Some(out)
        }
    }
}
