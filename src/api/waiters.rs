//! Long polls without a polling loop: one LISTEN connection per API process hears every
//! finished job id (sent by the completing transaction's NOTIFY) and wakes the requests
//! waiting on it. How many requests may wait at once is capped, so callers cannot grow the
//! registry without bound.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::job::JobId;
use crate::store::{DONE_CHANNEL, Store};

/// The most requests one API process lets wait at once, by default.
pub const DEFAULT_MAX_WAITERS: usize = 10_000;

/// Requests waiting for jobs to finish. A request registers before it reads the job, so a
/// finish between its read and its wait still wakes it.
///
/// See the crate's [guarantees](crate#guarantees).
pub struct Waiters {
    registry: Mutex<Registry>,
    /// At most this many registrations at once.
    max: usize,
    /// Wakes every waiter: after the listener reconnects (notifications may have been missed).
    all: Notify,
}

/// Who waits for which job.
#[derive(Default)]
struct Registry {
    /// Per job: what wakes its waiters, and how many there are.
    jobs: HashMap<JobId, (Arc<Notify>, usize)>,
    /// Registrations over all jobs.
    total: usize,
}

/// A registration; dropping it unregisters.
///
/// See the crate's [guarantees](crate#guarantees).
pub struct Registration<'a> {
    waiters: &'a Waiters,
    id: JobId,
    /// Signalled when the job finishes.
    pub notify: Arc<Notify>,
}

impl Waiters {
    /// Starts the listener on `store`, letting at most `max` requests wait at once; it stops
    /// when `stop` fires.
    pub fn start(store: Store, stop: CancellationToken, max: usize) -> Arc<Waiters> {
        let w = Arc::new(Waiters {
            registry: Mutex::new(Registry::default()),
            max,
            all: Notify::new(),
        });
        tokio::spawn(listen(store, w.clone(), stop));
        w
    }

    /// The registry. Every change to it is a whole insert or remove, so a thread that
    /// panicked holding the lock left nothing half-done: a poisoned lock is used as it is.
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers interest in `id`; `None` when [`Waiters::start`]'s `max` requests wait
    /// already.
    pub fn register(&self, id: JobId) -> Option<Registration<'_>> {
        let mut reg = self.registry();
        if reg.total >= self.max {
            return None;
        }
        reg.total += 1;
        let entry = reg
            .jobs
            .entry(id)
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        entry.1 += 1;
        let notify = entry.0.clone();
        Some(Registration {
            waiters: self,
            id,
            notify,
        })
    }

    /// How many requests wait now.
    pub fn waiting(&self) -> usize {
        self.registry().total
    }

    /// Fires on a listener reconnect.
    pub fn all(&self) -> &Notify {
        &self.all
    }

    fn wake(&self, id: JobId) {
        if let Some((n, _)) = self.registry().jobs.get(&id) {
            n.notify_waiters();
        }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut reg = self.waiters.registry();
        reg.total = reg.total.saturating_sub(1);
        if let Some(entry) = reg.jobs.get_mut(&self.id) {
            entry.1 -= 1;
            if entry.1 == 0 {
                reg.jobs.remove(&self.id);
            }
        }
    }
}

async fn listen(store: Store, waiters: Arc<Waiters>, stop: CancellationToken) {
    loop {
        let mut listener = match PgListener::connect_with(store.pool()).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "long-poll listener cannot connect; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = stop.cancelled() => return,
                }
            }
        };
        if listener.listen(DONE_CHANNEL).await.is_err() {
            continue;
        }
        // Anything finished while we were not listening: let every waiter look again.
        waiters.all.notify_waiters();
        loop {
            let n = tokio::select! {
                n = listener.try_recv() => n,
                () = stop.cancelled() => return,
            };
            match n {
                Ok(Some(n)) => {
                    for id in n.payload().split(',').filter_map(|s| s.parse().ok()) {
                        waiters.wake(id);
                    }
                }
                // The connection dropped; the next loop reconnects and wakes everyone.
                Ok(None) | Err(_) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn registrations_stop_at_the_cap_and_free_their_place() {
        let store = Store::connect_lazy("postgres://nobody@127.0.0.1:1/none", 1).expect("pool");
        let stop = CancellationToken::new();
        let w = Waiters::start(store, stop.clone(), 2);
        let id = uuid::Uuid::now_v7();
        let a = w.register(id).expect("first");
        let b = w.register(uuid::Uuid::now_v7()).expect("second");
        assert!(
            w.register(id).is_none(),
            "a third registration passed the cap of 2"
        );
        assert_eq!(w.waiting(), 2);
        drop(a);
        assert_eq!(w.waiting(), 1);
        let c = w.register(id).expect("a freed place is taken again");
        drop((b, c));
        assert_eq!(w.waiting(), 0);
        assert!(w.registry().jobs.is_empty());
        stop.cancel();
    }
}
