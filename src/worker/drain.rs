//! The drain, in order: stop taking work (the consumers are already cancelled), hand back
//! what is held but not started, let in-flight jobs finish within `APIARY_DRAIN_TIMEOUT`, then
//! interrupt the rest and hand them back uncharged; let the committer write what finished;
//! stop the background duties; leave the registry; close the session. Every step is bounded:
//! by the drain timeout, and by a second signal, which hands back everything at once, whether
//! or not Postgres and RabbitMQ answer.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Summary;
use super::session::Session;
use super::shared::{DeliveryRef, Shared};
use crate::broker::consume::Settle;
use crate::job::JobId;
use crate::shutdown::Shutdown;

/// The tasks a worker started, for the drain to stop in order.
pub(crate) struct Tasks {
    pub(crate) claimers: Vec<JoinHandle<()>>,
    pub(crate) claimer_stop: CancellationToken,
    pub(crate) committer: JoinHandle<()>,
    pub(crate) committer_stop: CancellationToken,
    pub(crate) background: Vec<JoinHandle<()>>,
    pub(crate) background_stop: CancellationToken,
}

/// Drains and stops; returns what the worker did.
pub(crate) async fn drain(
    shared: &Arc<Shared>,
    shutdown: &Shutdown,
    tasks: Tasks,
    session: Option<Session>,
) -> Summary {
    let cfg = &shared.cfg;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + cfg.drain_timeout;
    // The consume loops cancelled their consumers on the way out; without a session there is
    // nothing to cancel.
    shared.consuming_stopped.cancel();
    shared.tasks.close();
    let finished_in_time = tokio::select! {
        () = shared.tasks.wait() => true,
        () = tokio::time::sleep_until(deadline) => false,
        () = shutdown.force.cancelled() => false,
    };
    if !finished_in_time {
        // Handlers see their token fire and return; their attempts are handed back uncharged.
        shared.interrupt.cancel();
        let grace = if shutdown.force.is_cancelled() {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(2)
        };
        if tokio::time::timeout(grace, shared.tasks.wait())
            .await
            .is_err()
        {
            // Handlers that ignore their token: release their jobs without them.
            release_stuck(shared).await;
        }
    }
    tasks.claimer_stop.cancel();
    for c in tasks.claimers {
        let _ = c.await;
    }
    // The committer writes what finished in time. It gets until the drain deadline (and at
    // least a few seconds); past it, or on a second signal, it stops waiting for Postgres
    // and hands the rest back.
    tasks.committer_stop.cancel();
    let mut committer = tasks.committer;
    let committer_deadline = deadline.max(tokio::time::Instant::now() + Duration::from_secs(5));
    tokio::select! {
        _ = &mut committer => {}
        () = tokio::time::sleep_until(committer_deadline) => {
            shared.interrupt.cancel();
            let _ = committer.await;
        }
        () = shutdown.force.cancelled() => {
            shared.interrupt.cancel();
            let _ = committer.await;
        }
    }
    tasks.background_stop.cancel();
    for t in tasks.background {
        let _ = t.await;
    }
    let quick = Duration::from_secs(2);
    // What it finished since its last heartbeat, so the charts miss nothing of a drain.
    let sample = shared.samples.take();
    if !sample.is_empty() {
        let write = shared
            .store
            .record_sample(&shared.cfg.queue, shared.id, &sample);
        if !matches!(tokio::time::timeout(quick, write).await, Ok(Ok(()))) {
            tracing::debug!("could not write this worker's last sample for the charts");
        }
    }
    match tokio::time::timeout(quick, shared.store.remove_worker(shared.id)).await {
        Ok(Ok(())) => {}
        _ => {
            tracing::debug!("could not remove this worker's registry row; a rescuer removes it")
        }
    }
    if let Some(session) = session {
        session.close().await;
    }
    let summary = Summary {
        finished: shared.counters.finished.load(Ordering::Relaxed),
        handed_back: shared.counters.handed_back.load(Ordering::Relaxed),
        drain_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    tracing::info!(
        finished = summary.finished,
        handed_back = summary.handed_back,
        drain_seconds = summary.drain_ms as f64 / 1000.0,
        "worker stopped: {} finished, {} handed back, drained in {:.1}s",
        summary.finished,
        summary.handed_back,
        summary.drain_ms as f64 / 1000.0
    );
    summary
}

/// After the drain's grace: whatever still runs is released in Postgres (uncharged) and its
/// delivery requeued, so another worker starts it now rather than after the lease. A long
/// job's release queues an outbox row that publishes it again. Bounded in time: if Postgres
/// does not answer, the leases lapse and the jobs are rescued instead.
async fn release_stuck(shared: &Arc<Shared>) {
    let stuck: Vec<(JobId, i32, bool, DeliveryRef)> = match shared.running.lock() {
        Ok(mut running) => running
            .drain()
            .map(|((id, attempt), r)| (id, attempt, r.detached.load(Ordering::Relaxed), r.delivery))
            .collect(),
        Err(_) => return,
    };
    if stuck.is_empty() {
        return;
    }
    let batch: Vec<crate::store::finish_job::Finish> = stuck
        .iter()
        .map(
            |(id, attempt, detached, _)| crate::store::finish_job::Finish {
                id: *id,
                attempt: *attempt,
                outcome: crate::store::finish_job::Outcome::Released,
                detached: *detached,
            },
        )
        .collect();
    let quick = Duration::from_secs(3);
    match tokio::time::timeout(quick, shared.store.finish_jobs(shared.id, &batch)).await {
        Ok(Ok(done)) => {
            let ids: Vec<JobId> = done.iter().map(|d| d.id).collect();
            let _ = tokio::time::timeout(quick, super::relay::flush_outbox(shared, &ids)).await;
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not release stuck jobs; their leases will lapse and a rescuer puts them back")
        }
        Err(_) => tracing::warn!(
            "postgres did not answer in time to release stuck jobs; their leases will lapse and a rescuer puts them back"
        ),
    }
    for (_, _, _, d) in &stuck {
        d.settle(Settle::Requeue);
    }
    shared
        .counters
        .handed_back
        .fetch_add(stuck.len() as u64, Ordering::Relaxed);
}
