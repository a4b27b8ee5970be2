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
