//! Relaying the outbox: what a commit promised to publish (a new job, a retry, a rescued
//! job, a dead letter), sent by whoever committed it at once ([`flush_outbox`]) and by every
//! worker's relay for rows whose sender died before the broker confirmed ([`relay_outbox`]).
//! Both take the same row locks, so each row is published by one of them at a time.

use std::time::Duration;

use super::shared::Shared;
use crate::broker::publish::Outgoing;
use crate::job::JobId;

/// One pass of the relay: outbox rows whose sender died between its commit and the broker's
/// confirm (or that a rescue or retry wrote for the relay), published by their jobs' queues.
pub(crate) async fn relay_outbox(shared: &Shared) {
    let Some(publisher) = shared.publisher().await else {
        return;
    };
    let relayed = shared
        .store
        .relay_outbox(shared.cfg.outbox_grace, 500, None, |items| async move {
            let out: Vec<Outgoing> = items
                .iter()
                .map(|i| outgoing(&shared.cfg.queue, publisher.shards(), i))
                .collect();
            publisher.publish(&out).await
        })
        .await;
    match relayed {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            relayed = n,
            "republished jobs whose sender stopped before the broker confirmed"
        ),
        Err(e) => tracing::debug!(error = %e, "outbox relay pass failed; the next one retries"),
    }
}

/// Sends what the outbox holds for `ids` (dead letters, rescued jobs) now, under the same row
/// locks as the relay, so each is published by one of them, not both. Returns false if the
/// broker did not confirm (the rows stay, and the relay tries again later).
pub(crate) async fn flush_outbox(shared: &Shared, ids: &[JobId]) -> bool {
    if ids.is_empty() {
        return true;
    }
    let Some(publisher) = shared.publisher().await else {
        return false;
    };
    let prefix = shared.cfg.queue.as_str();
    let limit = i64::try_from(ids.len()).unwrap_or(i64::MAX);
    let sent = shared
        .store
        .relay_outbox(Duration::ZERO, limit, Some(ids), |items| async move {
            let out: Vec<crate::broker::publish::Outgoing> = items
                .iter()
                .map(|i| outgoing(prefix, publisher.shards(), i))
                .collect();
            publisher.publish(&out).await
        })
        .await;
    match sent {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, "not sent yet; the outbox relay will send it");
            false
        }
    }
}

/// Publishes at once what the final statuses of `finished` (jobs with dependents, or in a
/// batch) put in the outbox through the triggers: released children and batch callbacks.
/// Those rows were written by the same commit, so if this fails (or the worker dies first),
/// the relay sends them after its grace.
pub(crate) async fn flush_released(shared: &Shared, finished: &[JobId]) {
    if finished.is_empty() {
        return;
    }
    match shared.store.released_by(finished).await {
        Ok(ids) => {
            flush_outbox(shared, &ids).await;
        }
        Err(e) => {
            tracing::debug!(error = %e, "could not read released jobs; the outbox relay will send them")
        }
    }
}

/// The message an outbox row asks for.
///
/// Routed by the job's recorded queue and deployment, never by this worker's: a relay of one
/// deployment sends another's rows to that deployment's queues. `prefix` routes only rows
/// recorded before deployments were.
pub(crate) fn outgoing(
    prefix: &str,
    shards: &crate::broker::topology::Shards,
    item: &crate::store::outbox::OutboxItem,
) -> crate::broker::publish::Outgoing {
    use crate::broker::QueueNames;
    use crate::broker::publish::Outgoing;
    use crate::store::outbox::OutboxItem;
    match item {
        OutboxItem::Job(job) => Outgoing::job(prefix, job, shards),
        OutboxItem::DeadLetter {
            id,
            body,
            reason,
            queue,
            prefix: own,
        } => Outgoing::dead(
            QueueNames::shared(own.as_deref().unwrap_or(prefix), queue),
            *id,
            body.clone(),
            reason,
        ),
    }
}
