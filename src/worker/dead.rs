//! Messages that end here without running: a poison message (not a job at all, or a job
//! Postgres cannot store) is recorded dead with its reason, its letter goes to its queue's
//! dead-letter queue, and only then is it acked. Nothing here requeues a message for being
//! what it is, so no message can loop.

use std::sync::Arc;
use std::time::Duration;

use super::shared::{DeliveryRef, Failed, Shared, hand_back};
use crate::broker::QueueNames;
use crate::broker::consume::Settle;

/// Records a message that cannot run as dead, dead-letters it with its reason, then acks. A
/// message is never requeued for being what it is, so it cannot loop. It is recorded in the
/// queue it arrived on (`names`), whose dead-letter queue gets its letter.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn bury_poison(
    shared: &Shared,
    names: &Arc<QueueNames>,
    queue: &str,
    body: &[u8],
    id: crate::job::JobId,
    kind: Option<String>,
    why: &str,
    delivery: DeliveryRef,
) {
    tracing::warn!(job_id = %id, reason = %why, "poison message: recording it as dead");
    let limit = shared.cfg.max_payload_bytes;
    let reason = format!("poison message: {why}");
    let route = (queue, shared.cfg.queue.as_str());
    let mut recorded = shared
        .with_store(|| {
            shared
                .store
                .record_poison(id, kind.as_deref(), route, body, &reason, limit)
        })
        .await;
    if let Err(Failed::Refused(e)) = &recorded {
        // Postgres refused even the record (the kind, say, breaks a rule of the schema): keep
        // what it cannot refuse, the reason and the body's text.
        tracing::warn!(job_id = %id, error = %e, "postgres refused a poison record; recording it without its kind");
        recorded = shared
            .with_store(|| {
                shared
                    .store
                    .record_poison(id, None, route, body, &reason, limit)
            })
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
                crate::broker::publish::Outgoing::dead(names.clone(), id, body.to_vec(), &reason);
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
    super::relay::flush_outbox(shared, &[id]).await;
    delivery.settle(Settle::Ack);
}

/// Requeues a delivery after a pause, for failures that would otherwise send it straight
/// back to be failed again (a broker that refuses publishes, say).
pub(crate) async fn requeue_later(shared: &Shared, delivery: DeliveryRef) {
    requeue_all_later(shared, [delivery]).await
}

pub(crate) async fn requeue_all_later(
    shared: &Shared,
    deliveries: impl IntoIterator<Item = DeliveryRef>,
) {
    tokio::select! {
        () = tokio::time::sleep(Duration::from_secs(1)) => {}
        () = shared.consuming_stopped.cancelled() => {}
    }
    hand_back(shared, deliveries);
}

/// Records a raw producer's job that names parents (`depends_on`) as [`Store::insert_jobs`]
/// would for an enqueue: `waiting`, or `queued` if its parents have all succeeded (then it
/// is published at once from its outbox row), or `cancelled` if one ended otherwise. Then
/// acks the message, which has done its part: the job's release publishes a message of its
/// own. A parent that is unknown, or an id taken by another job, makes the message a dead
/// letter with the reason. Postgres unreachable: the message goes back to the queue.
///
/// [`Store::insert_jobs`]: crate::store::Store::insert_jobs
pub(crate) async fn record_waiting(
    shared: &Shared,
    names: &Arc<QueueNames>,
    queue: &str,
    job: crate::wire::WireJob,
    parents: Vec<crate::job::JobId>,
    body: &[u8],
    delivery: DeliveryRef,
) {
    use crate::store::insert_job::{InsertOutcome, Inserted, JobRow};
    let options = shared.kind_options(&job.kind);
    let row = JobRow {
        id: job.id,
        kind: job.kind.clone(),
        payload: job.payload.clone(),
        dedup_key: job.dedup_key.clone(),
        max_attempts: job
            .max_attempts
            .or(options.max_attempts)
            .unwrap_or(shared.cfg.max_attempts),
        run_at: job.run_at,
        queue: job.queue_name().to_string(),
        prefix: shared.cfg.queue.clone(),
        priority: job.priority.or(options.priority).unwrap_or(0),
        concurrency_key: job.concurrency_key.clone(),
        depends_on: parents,
        batch_id: None,
        callback_url: job.callback_url.clone(),
        trace: None,
    };
    let rows = [row];
    let written = shared
        .with_store(|| shared.store.insert_jobs(&rows, false))
        .await;
    let refusal = match written {
        Ok(InsertOutcome::Written(answers)) => match answers.first() {
            Some(Inserted::Conflict(reason)) => Some(format!("conflict: {reason}")),
            Some(Inserted::New(_)) => {
                super::relay::flush_outbox(shared, &[job.id]).await;
                None
            }
            _ => None,
        },
        Ok(InsertOutcome::BadParent { reason, .. }) => Some(format!("depends_on: {reason}")),
        Ok(InsertOutcome::RolledBack { reason, .. }) => Some(reason),
        Err(Failed::Refused(e)) => Some(e.refusal().unwrap_or_else(|| e.to_string())),
        Err(Failed::Interrupted) => {
            delivery.settle(crate::broker::consume::Settle::Requeue);
            return;
        }
    };
    match refusal {
        None => delivery.settle(crate::broker::consume::Settle::Ack),
        Some(reason) => {
            bury_poison(
                shared,
                names,
                queue,
                body,
                job.id,
                Some(job.kind),
                &reason,
                delivery,
            )
            .await
        }
    }
}
