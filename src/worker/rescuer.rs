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
        .relay_outbox(shared.cfg.outbox_grace, 500, |jobs| async move {
            publisher.publish_jobs(&jobs).await
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
    let Some(publisher) = shared.publisher().await else {
        return;
    };
    let rescued = match shared.store.rescue_expired(100).await {
        Ok(r) => r,
        Err(e) => return shared.postgres.down(&e),
    };
    if rescued.requeued.is_empty() && rescued.dead.is_empty() {
        return;
    }
    let mut out: Vec<Outgoing> = rescued
        .requeued
        .iter()
        .map(|j| Outgoing::job(&shared.names, j))
        .collect();
    out.extend(
        rescued
            .dead
            .iter()
            .map(|(j, why)| Outgoing::dead(&shared.names, j.id, j.to_body(), why)),
    );
    tracing::warn!(
        requeued = rescued.requeued.len(),
        dead = rescued.dead.len(),
        "rescued long jobs whose worker stopped"
    );
    if let Err(e) = publisher.publish(&out).await {
        // Recorded as queued but not published: enqueue the ids again through the outbox so
        // the relay retries them.
        tracing::warn!(error = %e, "could not publish rescued jobs; the outbox relay will");
        let ids: Vec<JobId> = rescued.requeued.iter().map(|j| j.id).collect();
        if let Err(e) = shared.store.add_to_outbox(&ids).await {
            tracing::error!(error = %e, "rescued jobs are queued but unpublished; replay them with `apiary dead replay` if they stay queued");
        }
    }
}
