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
    let mut prune = tokio::time::interval(shared.cfg.prune_interval);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = (std::time::Instant::now(), 0u64);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = beat.tick() => {
                heartbeat(&shared).await;
                register(&shared, &mut last).await;
                read_depths(&shared).await;
            }
            _ = prune.tick() => prune_old(&shared).await,
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

/// Upserts this worker's registry row with its counters and recent rate.
async fn register(shared: &Shared, last: &mut (std::time::Instant, u64)) {
    use std::sync::atomic::Ordering;
    let processed = shared.counters.finished.load(Ordering::Relaxed);
    let elapsed = last.0.elapsed().as_secs_f64();
    let rate = if elapsed > 0.0 {
        processed.saturating_sub(last.1) as f64 / elapsed
    } else {
        0.0
    };
    *last = (std::time::Instant::now(), processed);
    let row = crate::store::workers::WorkerRow {
        id: shared.id,
        queue: shared.cfg.queue.clone(),
        host: hostname(),
        pid: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
        version: env!("CARGO_PKG_VERSION").to_string(),
        concurrency: i32::try_from(shared.cfg.concurrency).unwrap_or(i32::MAX),
        started_at: shared.started_at,
        heartbeat_at: chrono::Utc::now(),
        in_flight: shared.running.lock().map(|r| r.len()).unwrap_or(0) as i32,
        processed: i64::try_from(processed).unwrap_or(i64::MAX),
        failed: i64::try_from(shared.counters.failed.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
        rate,
        draining: shared.stop_taking.is_cancelled(),
    };
    // A worker silent for three leases is gone: its claims have expired too.
    if let Err(e) = shared.store.beat_worker(&row, shared.cfg.lease * 3).await {
        tracing::debug!(error = %e, "could not update the worker registry");
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

async fn read_depths(shared: &Shared) {
    let Some(ch) = shared.stats_channel.read().await.clone() else {
        return;
    };
    if let Ok(d) = crate::broker::topology::depths(&ch, &shared.names).await
        && let Ok(mut depths) = shared.depths.lock()
    {
        *depths = d;
    }
}

async fn prune_old(shared: &Shared) {
    // Per-kind retention from APIARY_KINDS and from handler registrations.
    let mut kinds: Vec<String> = shared
        .registry
        .kinds()
        .iter()
        .map(|k| k.to_string())
        .collect();
    kinds.extend(shared.cfg.kinds.0.keys().cloned());
    kinds.sort_unstable();
    kinds.dedup();
    let overrides: Vec<(String, std::time::Duration)> = kinds
        .into_iter()
        .filter_map(|k| shared.kind_options(&k).retention.map(|r| (k, r)))
        .collect();
    match shared
        .store
        .prune(shared.cfg.retention, &overrides, 500, 20)
        .await
    {
        Ok(Some(n)) if n > 0 => {
            tracing::info!(pruned = n, "pruned finished jobs past their retention")
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "prune pass failed; the next one retries"),
    }
}
