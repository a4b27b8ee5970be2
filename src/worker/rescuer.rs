//! Background duties of every worker, each in a task of its own so none can starve another:
//!
//! - **leases**: renews the leases of the attempts this worker runs (so a killed worker's
//!   claims expire in seconds and live ones never do), passes on cancellations, and stops
//!   handlers whose claim was lost. It has its own small connection pool, and nothing else
//!   runs in its loop: a slow prune, a blocked broker or a busy pool cannot delay it.
//! - **registry**: this worker's row in `apiary_workers`, and the broker's queue depths.
//! - **relay**: outbox rows whose sender died between its commit and the broker's confirm.
//! - **rescue**: running jobs whose lease expired (detached jobs, jobs of workers whose
//!   heartbeat stopped, and once a minute every running job), put back or ended.
//! - **lost messages**: jobs due for a while with nothing in their queue's broker queues to
//!   carry them (every 3 leases), given back to the relay ([`crate::store::Store::requeue_lost`]).
//! - **prune**: finished jobs past their retention.
//! - **dead-letter sweep**: removes the letters of replayed jobs from each of its queues'
//!   dead-letter queues, one pass for many replays, one worker at a time.
//! - **pauses**: which of its queues an operator paused, every half second (`lanes.rs`).
//! - **schedules**: the deployment's due schedules, fired four times a second
//!   (`scheduler.rs`).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::shared::Shared;
use crate::job::JobId;
use crate::store::rescue_job::{FULL_RESCUE_INTERVAL, RESCUE_INTERVAL, RescueScope};

/// Runs every duty until `stop` fires. Each stops at once then, abandoning a call in flight.
pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let tasks = [
        tokio::spawn(every(
            shared.clone(),
            stop.clone(),
            shared.cfg.heartbeat_interval(),
            |s| Box::pin(async move { renew_leases(&s).await }),
        )),
        tokio::spawn(every(
            shared.clone(),
            stop.clone(),
            shared.cfg.heartbeat_interval(),
            |s| {
                Box::pin(async move {
                    register(&s).await;
                    read_depths(&s).await;
                })
            },
        )),
        tokio::spawn(every(
            shared.clone(),
            stop.clone(),
            Duration::from_secs(1),
            |s| Box::pin(async move { super::relay::relay_outbox(&s).await }),
        )),
        tokio::spawn(every(shared.clone(), stop.clone(), RESCUE_INTERVAL, |s| {
            Box::pin(async move { rescue(&s).await })
        })),
        tokio::spawn(every(
            shared.clone(),
            stop.clone(),
            FULL_RESCUE_INTERVAL,
            |s| Box::pin(async move { rescue_all(&s).await }),
        )),
        tokio::spawn(every(
            shared.clone(),
            stop.clone(),
            Duration::from_secs(10),
            |s| Box::pin(async move { sweep_dead_letters(&s).await }),
        )),
        tokio::spawn(every(
            shared.clone(),
            stop.clone(),
            shared.cfg.lease * LOST_AFTER_LEASES,
            |s| Box::pin(async move { requeue_lost(&s).await }),
        )),
        tokio::spawn(prune_loop(shared.clone(), stop.clone())),
        tokio::spawn(every(
            shared.clone(),
            stop.clone(),
            super::lanes::PAUSE_POLL,
            |s| {
                Box::pin(async move {
                    super::lanes::read_pauses(&s).await;
                })
            },
        )),
        tokio::spawn(every(
            shared.clone(),
            stop.clone(),
            super::scheduler::TICK,
            |s| Box::pin(async move { super::scheduler::fire_due(&s).await }),
        )),
    ];
    for t in tasks {
        let _ = t.await;
    }
}

/// In leases (`APIARY_LEASE`, 10 s by default): how often a worker looks for jobs whose
/// messages the broker lost, and how long past its due time a waiting job with nothing in
/// the broker to carry it must be before it counts as lost. A delivery a worker holds is
/// claimed, or put back in a delay tier, well within that.
pub const LOST_AFTER_LEASES: u32 = 3;

/// Finds the queues this worker serves that the broker holds nothing of (not paused, nothing
/// ready, nothing delayed), and has the jobs Postgres says are due in them published again.
async fn requeue_lost(shared: &Shared) {
    // The depths the heartbeat read moments ago (every shard, leftover ones too: a job may
    // sit in any of them); a lane whose read failed is left for the next pass.
    let empty: Vec<String> = shared
        .lanes
        .iter()
        .filter(|lane| !lane.is_paused())
        .filter(|lane| {
            lane.depths
                .lock()
                .ok()
                .and_then(|d| *d)
                .is_some_and(|d| d.ready == 0 && d.delayed == 0)
        })
        .map(|lane| lane.queue().to_string())
        .collect();
    if empty.is_empty() {
        return;
    }
    let grace = shared.cfg.lease * LOST_AFTER_LEASES;
    match shared
        .store
        .requeue_lost(&shared.cfg.queue, &empty, grace)
        .await
    {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            jobs = n,
            queues = ?empty,
            "jobs due with nothing in the broker to carry them: publishing them again"
        ),
        Err(e) => tracing::debug!(error = %e, "could not look for lost messages"),
    }
}

type Duty = fn(Arc<Shared>) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs `duty` every `period` (the first time at once) until `stop` fires. A pass that
/// overruns delays the next one rather than piling passes up.
async fn every(shared: Arc<Shared>, stop: CancellationToken, period: Duration, duty: Duty) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = duty(shared.clone()) => {}
        }
    }
}

async fn renew_leases(shared: &Shared) {
    let mine: Vec<(JobId, i32)> = match shared.running.lock() {
        Ok(r) => r.keys().copied().collect(),
        Err(_) => return,
    };
    if mine.is_empty() {
        return;
    }
    // Bounded by the lease, past which renewing is moot, so a renewal stuck on a dead
    // connection gives way to a fresh one. A slow link (a renewal taking longer than the
    // heartbeat interval) only delays the next beat; it is never abandoned early.
    let renewal = shared
        .lease_store
        .renew_leases(shared.id, &mine, shared.cfg.lease);
    let leases = match tokio::time::timeout(shared.cfg.lease, renewal).await {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => return shared.postgres.down(&e),
        Err(_) => {
            tracing::warn!("lease renewal took longer than a lease; trying again");
            return;
        }
    };
    shared.postgres.up();
    let Ok(running) = shared.running.lock() else {
        return;
    };
    for lease in leases {
        let Some(r) = running.get(&(lease.id, lease.attempt)) else {
            continue;
        };
        if !lease.held {
            if !r.cancel.is_cancelled() {
                // The lease lapsed and the job went elsewhere (rescued, taken over, ended):
                // whatever this attempt does now is fenced out, so stop it doing more.
                tracing::warn!(job_id = %lease.id, attempt = lease.attempt, "claim lost (the lease lapsed); stopping this attempt");
                r.cancel.cancel();
            }
        } else if lease.cancel_requested
            && !r
                .cancel_requested
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            tracing::info!(job_id = %lease.id, "job cancelled while running: signalling its handler");
            r.cancel_requested
                .store(true, std::sync::atomic::Ordering::Relaxed);
            r.cancel.cancel();
        }
    }
}

/// Puts back detached jobs whose lease expired, and the jobs of workers whose heartbeat
/// stopped.
async fn rescue(shared: &Shared) {
    let mut rescued = match shared
        .store
        .rescue_expired(RescueScope::Detached, 100)
        .await
    {
        Ok(ids) => ids.unwrap_or_default(),
        Err(e) => return shared.postgres.down(&e),
    };
    // A worker silent for two leases is gone (or cut off): every lease it held has expired.
    let silent = shared.cfg.lease * 2;
    let lapsed = match shared.store.lapsed_workers(silent).await {
        Ok(w) => w,
        Err(e) => return shared.postgres.down(&e),
    };
    if !lapsed.is_empty() {
        match shared
            .store
            .rescue_expired(RescueScope::Workers(&lapsed), 1000)
            .await
        {
            Ok(ids) => {
                let ids = ids.unwrap_or_default();
                // Forget the workers only once a pass found nothing more of theirs.
                if ids.len() < 1000
                    && let Err(e) = shared.store.forget_workers(&lapsed, silent).await
                {
                    tracing::debug!(error = %e, "could not remove silent workers");
                }
                rescued.extend(ids);
            }
            Err(e) => return shared.postgres.down(&e),
        }
    }
    announce(shared, rescued).await;
}

/// The safety net: every running job whose lease expired, whoever held it.
async fn rescue_all(shared: &Shared) {
    match shared.store.rescue_expired(RescueScope::All, 1000).await {
        Ok(Some(ids)) => announce(shared, ids).await,
        Ok(None) => {}
        Err(e) => shared.postgres.down(&e),
    }
}

async fn announce(shared: &Shared, ids: Vec<JobId>) {
    if ids.is_empty() {
        return;
    }
    tracing::warn!(
        jobs = ids.len(),
        "rescued jobs whose lease expired (their worker stopped or stalled)"
    );
    super::relay::flush_outbox(shared, &ids).await;
}

/// Puts this worker in the registry, retrying until it is there or the worker is told to
/// stop: a worker claims nothing before a rescuer could find it.
pub(crate) async fn register_now(shared: &Shared, stop: &CancellationToken) {
    let mut wait = Duration::from_millis(100);
    loop {
        match shared.store.beat_worker(&registry_row(shared, 0.0)).await {
            Ok(()) => return,
            Err(e) => shared.postgres.down(&e),
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

fn registry_row(shared: &Shared, rate: f64) -> crate::store::workers::WorkerRow {
    use std::sync::atomic::Ordering;
    let processed = shared.counters.finished.load(Ordering::Relaxed);
    crate::store::workers::WorkerRow {
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
        kinds: Some(
            shared
                .registry
                .kinds()
                .into_iter()
                .map(str::to_string)
                .collect(),
        ),
        queues: Some(
            shared
                .lanes
                .iter()
                .map(|l| {
                    (
                        l.queue().to_string(),
                        i64::try_from(l.concurrency).unwrap_or(i64::MAX),
                    )
                })
                .collect(),
        ),
    }
}

/// Upserts this worker's registry row with its counters and recent rate.
async fn register(shared: &Shared) {
    use std::sync::atomic::Ordering;
    let processed = shared.counters.finished.load(Ordering::Relaxed);
    let rate = {
        let Ok(mut last) = shared.last_beat.lock() else {
            return;
        };
        let elapsed = last.0.elapsed().as_secs_f64();
        let rate = if elapsed > 0.0 {
            processed.saturating_sub(last.1) as f64 / elapsed
        } else {
            0.0
        };
        *last = (std::time::Instant::now(), processed);
        rate
    };
    let row = registry_row(shared, rate);
    let sample = shared.samples.take();
    let beat = async {
        shared.store.beat_worker(&row).await?;
        if !sample.is_empty() {
            shared
                .store
                .record_sample(&shared.cfg.queue, shared.id, &sample)
                .await?;
        }
        Ok::<(), crate::store::StoreError>(())
    };
    // Bounded by the lease, like a renewal: a slow link delays the next beat, never abandons
    // this one (which would leave the row to look silent, and the worker gone).
    // A sample that was not written goes with the next one: the charts lose no finish, they
    // only place it a heartbeat late.
    match tokio::time::timeout(shared.cfg.lease, beat).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            shared.samples.put_back(&sample);
            tracing::debug!(error = %e, "could not update the worker registry");
        }
        Err(_) => {
            shared.samples.put_back(&sample);
            tracing::debug!("the worker registry update timed out");
        }
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
        // Between sessions nothing is known of the broker: no lane counts as empty.
        for lane in &shared.lanes {
            if let Ok(mut last) = lane.depths.lock() {
                *last = None;
            }
        }
        return;
    };
    let mut sum = crate::broker::topology::QueueDepths::default();
    let mut complete = true;
    for lane in &shared.lanes {
        let leftover = lane.leftover();
        let read = crate::broker::topology::depths_with(&ch, &lane.names, &leftover);
        let read = match tokio::time::timeout(Duration::from_secs(5), read).await {
            Ok(Ok(d)) => Some(d),
            _ => None,
        };
        if let Ok(mut last) = lane.depths.lock() {
            *last = read;
        }
        match read {
            Some(d) => sum.add(&d),
            None => complete = false,
        }
    }
    // A partial sum would understate the backlog: keep the last whole one.
    if !complete {
        return;
    }
    if let Ok(mut depths) = shared.depths.lock() {
        *depths = sum;
    }
}

/// Removes the dead letters of replayed jobs. Every worker tries; an advisory lock lets one
/// sweep at a time. The stats channel serves: the sweep hands every letter back on error.
async fn sweep_dead_letters(shared: &Shared) {
    let Some(channel) = shared.stats_channel.read().await.clone() else {
        return;
    };
    for lane in &shared.lanes {
        if let Err(e) =
            crate::broker::dead::sweep_replayed(&shared.store, &channel, &lane.names).await
        {
            tracing::debug!(error = %e, queue = %lane.queue(), "dead-letter sweep failed; the next one tries again");
            return;
        }
    }
}

/// Prunes in a task of its own: as fast as it can while there is a backlog, then once per
/// `APIARY_PRUNE_INTERVAL`. Per-kind retention comes from `APIARY_KINDS` and from handler
/// registrations.
async fn prune_loop(shared: Arc<Shared>, stop: CancellationToken) {
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
    // Abandoned at once on stop (each pass is its own short transaction), so pruning never
    // holds up a drain.
    let pruning = shared.store.keep_pruned(
        shared.cfg.retention,
        &overrides,
        shared.cfg.prune_interval,
        stop.clone(),
    );
    tokio::select! {
        () = pruning => {}
        () = stop.cancelled() => {}
    }
}
