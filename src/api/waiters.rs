//! Long polls without a polling loop: one LISTEN connection per API process hears every
//! finished job id (sent by the completing transaction's NOTIFY) and wakes the requests
//! waiting on it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::job::JobId;
use crate::store::{DONE_CHANNEL, Store};

/// Requests waiting for jobs to finish. A request registers before it reads the job, so a
/// finish between its read and its wait still wakes it.
pub struct Waiters {
    waiting: Mutex<HashMap<JobId, (Arc<Notify>, usize)>>,
    /// Wakes every waiter: after the listener reconnects (notifications may have been missed).
    all: Notify,
}

/// A registration; dropping it unregisters.
pub struct Registration<'a> {
    waiters: &'a Waiters,
    id: JobId,
    /// Signalled when the job finishes.
    pub notify: Arc<Notify>,
}

impl Waiters {
    /// Starts the listener on `store`; it stops when `stop` fires.
    pub fn start(store: Store, stop: CancellationToken) -> Arc<Waiters> {
        let w = Arc::new(Waiters {
            waiting: Mutex::new(HashMap::new()),
            all: Notify::new(),
        });
        tokio::spawn(listen(store, w.clone(), stop));
        w
    }

    /// Registers interest in `id`.
    pub fn register(&self, id: JobId) -> Registration<'_> {
        let notify = match self.waiting.lock() {
            Ok(mut map) => {
                let entry = map
                    .entry(id)
                    .or_insert_with(|| (Arc::new(Notify::new()), 0));
                entry.1 += 1;
                entry.0.clone()
            }
            Err(_) => Arc::new(Notify::new()),
        };
        Registration {
            waiters: self,
            id,
            notify,
        }
    }

    /// Fires on a listener reconnect.
    pub fn all(&self) -> &Notify {
        &self.all
    }

    fn wake(&self, id: JobId) {
        if let Ok(map) = self.waiting.lock()
            && let Some((n, _)) = map.get(&id)
        {
            n.notify_waiters();
        }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if let Ok(mut map) = self.waiters.waiting.lock()
            && let Some(entry) = map.get_mut(&self.id)
        {
            entry.1 -= 1;
            if entry.1 == 0 {
                map.remove(&self.id);
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
