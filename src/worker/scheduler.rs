//! ① for periodic jobs: every worker's firing duty. About four times a second it fires the
//! deployment's due schedules one at a time ([`crate::store::fire_schedules`]: lock, record
//! the due slots' jobs, move the cursor, commit), then publishes each firing's new jobs at
//! once. There is no leader and no scheduler process: any number of workers fire the same
//! schedules, the row lock spreads them, and each slot's dedup key makes it one job. A worker
//! killed between its commit and its publish loses nothing: the outbox relay publishes.

use std::time::Duration;

use super::shared::Shared;
use crate::schedule::{self, Compiled, GRACE, Missed};
use crate::store::fire_schedules::{DueSchedule, Firing};
use crate::store::insert_job::JobRow;

/// How often each worker looks for due schedules. A slot is enqueued at most this late
/// (plus a commit and a publish) while any worker runs.
pub const TICK: Duration = Duration::from_millis(250);

/// The most schedules one tick fires; the rest wait for the next tick (or another worker).
const PER_TICK: usize = 100;

/// One tick: fires due schedules until none is due, publishing each firing's new jobs.
pub(crate) async fn fire_due(shared: &Shared) {
    let prefix = shared.cfg.queue.as_str();
    // Schedules this tick could not fire (Postgres refused their jobs): not tried again
    // until the next tick, so one cannot hold up the rest.
    let mut refused: Vec<String> = Vec::new();
    for _ in 0..PER_TICK {
        let fired = shared
            .store
            .fire_schedule(prefix, &refused, |due| plan(shared, due))
            .await;
        match fired {
            Ok(None) => return,
            Ok(Some(f)) => {
                if let Some(reason) = f.refused {
                    tracing::warn!(schedule = %f.name, %reason, "postgres refused a schedule's jobs; trying again next tick");
                    refused.push(f.name);
                    continue;
                }
                if !f.new.is_empty() {
                    tracing::debug!(schedule = %f.name, slots = f.slots, new = f.new.len(), "fired a schedule");
                    // Recorded with their outbox rows: if this publish fails, the relay's does.
                    super::relay::flush_outbox(shared, &f.new).await;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "firing schedules failed; the next tick tries again");
                return;
            }
        }
    }
}

/// The jobs of `due`'s due slots and its new cursor. A schedule whose stored expression no
/// longer compiles (written by another version, say) fires nothing and stops, with a
/// warning, until it is set again.
fn plan(shared: &Shared, due: &DueSchedule) -> Firing {
    let stopped = || Firing {
        rows: Vec::new(),
        cursor: due.now,
        next_at: None,
    };
    let compiled = match Compiled::new(&due.cron, &due.timezone) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(schedule = %due.name, error = %e, "a stored schedule does not compile; it stops until set again");
            return stopped();
        }
    };
    let payload = match due.raw_payload() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(schedule = %due.name, error = %e, "a stored schedule's payload does not parse; it stops until set again");
            return stopped();
        }
    };
    let missed: Missed = due.missed.parse().unwrap_or_default();
    let slots = schedule::due(&compiled, due.cursor, due.now, missed, GRACE);
    let options = kind_options(shared, &due.kind);
    let rows = slots
        .slots
        .iter()
        .map(|slot| JobRow {
            id: uuid::Uuid::now_v7(),
            kind: due.kind.clone(),
            payload: payload.clone(),
            dedup_key: Some(schedule::dedup_key(&due.name, *slot)),
            max_attempts: due
                .max_attempts
                .or(options.max_attempts)
                .unwrap_or(shared.cfg.max_attempts),
            run_at: None,
            queue: due
                .queue
                .clone()
                .or_else(|| options.queue.clone())
                .unwrap_or_else(|| crate::job::DEFAULT_QUEUE.to_string()),
            prefix: shared.cfg.queue.clone(),
            priority: due
                .priority
                .and_then(|p| u8::try_from(p).ok())
                .or(options.priority)
                .unwrap_or(0),
            concurrency_key: None,
            depends_on: Vec::new(),
            batch_id: None,
            callback_url: options.callback_url.clone(),
            trace: None,
        })
        .collect();
    Firing {
        rows,
        cursor: slots.cursor,
        next_at: slots.next_at,
    }
}

/// The kind's options, as an enqueue from this process applies them: `APIARY_KINDS`, then
/// the handler's registration.
fn kind_options(shared: &Shared, kind: &str) -> crate::config::KindOptions {
    let registered = shared
        .registry
        .get(kind)
        .map(|e| e.options.clone())
        .unwrap_or_default();
    shared.cfg.kinds.get(kind).or(registered)
}
