//! Background duties of every worker: renewing the leases of the jobs it runs (so a killed
//! worker's claims expire in seconds and live ones never do), passing on cancellations of
//! running jobs, putting back long (detached) jobs whose worker died, and relaying outbox rows whose
//! enqueuer died between its commit and the broker's confirm.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::broker::publish::Outgoing;
use crate::job::JobId;

/// Runs the heartbeat and the relay until `stop` fires.
pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let mut beat = tokio::time::interval(shared.cfg.heartbeat_interval());
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut relay = tokio::time::interval(Duration::from_secs(1));
    relay.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rescue = tokio::time::interval(crate::store::rescue_job::RESCUE_INTERVAL);
    rescue.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = beat.tick() => heartbeat(&shared).await,
            _ = relay.tick() => relay_outbox(&shared).await,
            _ = rescue.tick() => rescue_detached(&shared).await,
        }
    }
}

async fn heartbeat(shared: &Shared) {
    let ids: Vec<JobId> = match shared.running.lock() {
        Ok(r) => r.keys().copied().collect(),
        Err(_) => return,
    };
    if ids.is_empty() {
        return;
    }
    match shared
        .store
        .renew_leases(shared.id, &ids, shared.cfg.lease)
        .await
    {
        Ok(cancelled) => {
            shared.postgres.up();
            let Ok(running) = shared.running.lock() else {
                return;
            };
            for id in cancelled {
                if let Some(r) = running.get(&id) {
                    tracing::info!(job_id = %id, "job cancelled while running: signalling its handler");
                    r.cancel_requested
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    r.cancel.cancel();
                }
            }
        }
        Err(e) => shared.postgres.down(&e),
    }
}

async fn relay_outbox(shared: &Shared) {
    let Some(publisher) = shared.publisher().await else {
        return;
    };
    let relayed = shared
        .store
        .relay_outbox(shared.cfg.outbox_grace, 500, None, |items| async move {
            let out: Vec<Outgoing> = items
                .iter()
                .map(|i| super::outgoing(&shared.names, i))
                .collect();
            publisher.publish(&out).await
        })
        .await;
    match relayed {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            relayed = n,
            "republished jobs whose enqueuer stopped before the broker confirmed"
        ),
        Err(e) => tracing::debug!(error = %e, "outbox relay pass failed; the next one retries"),
    }
}

/// Puts back detached jobs whose worker died (their lease expired and no message is left).
async fn rescue_detached(shared: &Shared) {
    let ids = match shared.store.rescue_expired(100).await {
        Ok(ids) => ids,
        Err(e) => return shared.postgres.down(&e),
    };
    if ids.is_empty() {
        return;
    }
    tracing::warn!(jobs = ids.len(), "rescued long jobs whose worker stopped");
    super::flush_outbox(shared, &ids).await;
}
