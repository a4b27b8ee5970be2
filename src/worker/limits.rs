//! Limits: claiming the jobs of kinds with a rate limit (`rate=`) or a concurrency limit
//! (`max_per_key=`) through [`crate::store::limits`], which decides across every worker at
//! once. A job the limits hold back is charged nothing and kept in nobody's memory: its
//! message goes to a delay tier (the same path as a job that is not due yet, which also
//! records a raw job first), and comes back when the limit should let it through.

use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;

use super::claim::{Incoming, claim_input, dispatch, hop_waiting};
use super::shared::{Failed, Shared, hand_back};
use crate::store::limits::{Gate, Limited};

/// The limits of one delivery.
fn gate_of(shared: &Shared, inc: &Incoming) -> Gate {
    let (rate, max_per_key) = shared
        .limited
        .get(&inc.job.kind)
        .copied()
        .unwrap_or((None, None));
    // Counted per deployment: another deployment sharing the database has its own.
    let prefix = &shared.cfg.queue;
    let mut rates = Vec::new();
    if let Some(r) = rate {
        rates.push((format!("{prefix}/kind:{}", inc.job.kind), r));
    }
    if let Some(r) = inc.lane.rate {
        rates.push((format!("{prefix}/queue:{}", inc.lane.queue()), r));
    }
    Gate {
        rates,
        key: max_per_key.and_then(|n| inc.job.concurrency_key.clone().map(|k| (k, n))),
    }
}

/// Claims jobs of limited kinds, each holding a handler slot; held ones give theirs back.
pub(crate) async fn claim_gated(
    shared: &Arc<Shared>,
    batch: Vec<Incoming>,
    permits: Vec<OwnedSemaphorePermit>,
) {
    let gates: Vec<Gate> = batch.iter().map(|i| gate_of(shared, i)).collect();
    let inputs: Vec<_> = batch.iter().map(|i| claim_input(shared, i)).collect();
    let answered = shared
        .with_store(|| {
            shared
                .store
                .claim_limited(&inputs, &gates, shared.id, shared.cfg.lease)
        })
        .await;
    drop(inputs);
    let (answers, db_now) = match answered {
        Ok(a) => a,
        Err(Failed::Interrupted) => {
            return hand_back(shared, batch.into_iter().map(|i| i.delivery));
        }
        Err(Failed::Refused(e)) if batch.len() == 1 => {
            // Postgres refuses this job's data: the plain claim path isolates and buries it.
            tracing::warn!(error = %e, "a limited claim was refused for its data");
            return super::claim::claim_refused(shared, batch, permits, e).await;
        }
        Err(Failed::Refused(_)) => {
            // One of them carries data Postgres refuses: claim them one by one.
            for (inc, permit) in batch.into_iter().zip(permits) {
                Box::pin(claim_gated(shared, vec![inc], vec![permit])).await;
            }
            return;
        }
    };
    shared.observe_db_now(db_now);
    let now = shared.db_now();
    let mut held = Vec::new();
    for ((mut inc, answer), permit) in batch.into_iter().zip(answers).zip(permits) {
        match answer {
            Limited::Claim(claim) => dispatch(shared, inc, claim, permit),
            Limited::Held(wait) => {
                drop(permit);
                let mut job = inc.job.as_ref().clone();
                job.run_at = Some(now + chrono::Duration::from_std(wait).unwrap_or_default());
                inc.job = Arc::new(job);
                held.push(inc);
            }
        }
    }
    if !held.is_empty() {
        tracing::debug!(
            jobs = held.len(),
            "held back by a limit; waiting in a delay tier"
        );
        shared.metrics.held.increment(held.len() as u64);
        let shared2 = shared.clone();
        shared
            .tasks
            .spawn(async move { hop_waiting(&shared2, held).await });
    }
}
