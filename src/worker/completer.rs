//! ⑥ Committing finished attempts, then acknowledging them. Completions queue up while a
//! commit is in flight and the next commit takes them all: one statement and one
//! multiple-ack for a burst, and no waiting at all when a job finishes alone.
//!
//! The order is the guarantee: the outcome commits first, then retries and dead letters are
//! published with confirms, then the delivery is acked. A crash anywhere in between leaves
//! the delivery unacked; it comes back, and the claim sees the committed outcome.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{DeliveryRef, Shared};
use crate::broker::consume::Settle;
use crate::broker::publish::Outgoing;
use crate::store::finish_job::{Finish, Outcome};
use crate::wire::WireJob;

/// A finished attempt on its way to the database.
pub(crate) struct Completion {
    pub(crate) finish: Finish,
    pub(crate) job: Arc<WireJob>,
    pub(crate) delivery: DeliveryRef,
    /// The message was already acked (a long job): handing the job back means publishing it
    /// again, since there is no delivery left to requeue.
    pub(crate) detached: bool,
}

/// Runs until `stop` fires and everything queued before it is written.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Completion>,
    stop: CancellationToken,
) {
    let max = shared.cfg.batch;
    loop {
        let first = tokio::select! {
            c = rx.recv() => c,
            () = stop.cancelled() => rx.try_recv().ok(),
        };
        let Some(first) = first else { return };
        let mut batch = Vec::with_capacity(max.min(64));
        batch.push(first);
        while batch.len() < max {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        flush(&shared, batch).await;
    }
}

async fn flush(shared: &Shared, batch: Vec<Completion>) {
    let finishes: Vec<Finish> = batch.iter().map(|c| c.finish.clone()).collect();
    let Some(applied) = shared
        .with_store(|| shared.store.finish_jobs(shared.id, &finishes))
        .await
    else {
        // Postgres refused the batch, or stayed down until the stop. Hand the deliveries back:
        // their claims lapse with the lease (nothing renews them now), and the redelivery
        // claims them again; holding them unacked would strand them until the channel closed.
        forget(shared, &batch);
        for c in &batch {
            c.delivery.settle(Settle::Requeue);
        }
        return;
    };
    let applied: HashSet<_> = applied.into_iter().collect();

    // Retries wait in a delay tier and dead jobs go to the dead-letter queue: both must be in
    // the broker before the original delivery is acked.
    let mut outgoing = Vec::new();
    for c in &batch {
        if !applied.contains(&c.finish.id) {
            continue;
        }
        match &c.finish.outcome {
            Outcome::Retry { at, error } => {
                tracing::info!(job_id = %c.job.id, kind = %c.job.kind, attempt = c.finish.attempt, error = %error, next_attempt_at = %at, "attempt failed; retrying");
                let mut next = (*c.job).clone();
                next.run_at = Some(*at);
                outgoing.push(Outgoing::job(&shared.names, &next));
            }
            Outcome::Released if c.detached => {
                let mut again = (*c.job).clone();
                again.run_at = None;
                outgoing.push(Outgoing::job(&shared.names, &again));
            }
            Outcome::Dead(reason) => {
                tracing::warn!(job_id = %c.job.id, kind = %c.job.kind, attempt = c.finish.attempt, reason = %reason, "job is dead");
            }
            _ => {}
        }
    }
    if !outgoing.is_empty() {
        let published = match shared.publisher().await {
            Some(p) => p.publish(&outgoing).await.map_err(|e| e.to_string()),
            None => Err("rabbitmq is not connected".into()),
        };
        if let Err(e) = published {
            // The deliveries stay unacked and come back; the claim then re-delays the retries.
            tracing::warn!(error = %e, "retries or dead letters not published; their messages will come back");
            forget(shared, &batch);
            return;
        }
    }

    // Dead letters were queued in the outbox by the commit; send them now.
    let dead: Vec<_> = batch
        .iter()
        .filter(|c| matches!(c.finish.outcome, Outcome::Dead(_)) && applied.contains(&c.finish.id))
        .map(|c| c.finish.id)
        .collect();
    let letters_sent = super::flush_outbox(shared, &dead).await;

    let now_ms = chrono::Utc::now().timestamp_millis();
    for c in batch.iter().filter(|c| applied.contains(&c.finish.id)) {
        let km = shared.metrics.kind(&c.job.kind);
        match c.finish.outcome {
            Outcome::Succeeded(_) => km.succeeded.increment(1),
            Outcome::Retry { .. } => {
                km.failed.increment(1);
                km.retried.increment(1);
            }
            Outcome::Dead(_) => {
                km.failed.increment(1);
                km.dead.increment(1);
            }
            Outcome::Cancelled | Outcome::Released => {}
        }
        if matches!(c.finish.outcome, Outcome::Succeeded(_) | Outcome::Dead(_))
            && let Some(at) = super::executor::enqueued_ms(&c.job)
        {
            km.end_to_end.record((now_ms - at).max(0) as f64 / 1000.0);
        }
    }

    let mut finished = 0;
    let mut handed_back = 0;
    for c in &batch {
        if matches!(c.finish.outcome, Outcome::Dead(_)) && !letters_sent {
            // Left unacked: it comes back, finds the job dead, and its letter is still queued.
            continue;
        }
        let how = if !applied.contains(&c.finish.id) {
            // The claim was no longer ours (the lease ran out and another worker took the job,
            // or a forced stop released it first). Requeue rather than ack: the redelivery's
            // claim finds the job running or finished and settles it, whereas an ack here
            // could drop the only message of a job that is queued again.
            Settle::Requeue
        } else if matches!(c.finish.outcome, Outcome::Released) {
            // Handed back: requeue so another worker starts it now.
            handed_back += 1;
            Settle::Requeue
        } else {
            finished += 1;
            Settle::Ack
        };
        tracing::debug!(job_id = %c.finish.id, outcome = ?c.finish.outcome.status(), applied = applied.contains(&c.finish.id), settle = ?how, "settled");
        c.delivery.settle(how);
    }
    if let Ok(mut running) = shared.running.lock() {
        for c in &batch {
            running.remove(&c.finish.id);
        }
    }
    shared
        .counters
        .finished
        .fetch_add(finished, Ordering::Relaxed);
    shared
        .counters
        .handed_back
        .fetch_add(handed_back, Ordering::Relaxed);
    let failed = batch
        .iter()
        .filter(|c| matches!(c.finish.outcome, Outcome::Retry { .. } | Outcome::Dead(_)))
        .count();
    shared
        .counters
        .failed
        .fetch_add(failed as u64, Ordering::Relaxed);
}

fn forget(shared: &Shared, batch: &[Completion]) {
    if let Ok(mut running) = shared.running.lock() {
        for c in batch {
            running.remove(&c.finish.id);
        }
    }
}
