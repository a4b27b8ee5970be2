//! What `GET /readyz` reports, read from state the API keeps rather than by connecting per
//! probe: probes come every few seconds from every kubelet and load balancer, and during an
//! outage a probe that reconnected would pile connection attempts onto the broker and hold the
//! publisher's lock that enqueues need.
//!
//! - Postgres: one `SELECT 1`, its answer reused for [`PING_TTL`]; concurrent probes share it.
//! - RabbitMQ: whether the publisher's channel is open now. The reconnector, a background task
//!   started with the API, reopens it with backoff when it closes, so the answer turns true
//!   again without a probe's help.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;

use crate::broker::{BrokerError, Publisher};
use crate::client::Client;
use crate::store::Store;

/// How long a Postgres ping's answer is reused.
pub const PING_TTL: Duration = Duration::from_secs(1);
/// The longest a ping may take before Postgres counts as down.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest one reconnect attempt may take (a blackholed host would otherwise hold the
/// publisher's lock for the OS's connect timeout).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the reconnector looks at an open channel.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a probe waits for the reconnector's first attempt, at start-up only: until then
/// the channel is closed because nobody opened it yet, not because RabbitMQ is down.
const FIRST_ATTEMPT_WAIT: Duration = Duration::from_secs(5);
/// How long a probe waits for the publisher's lock. It is held that long only while someone
/// is reconnecting, and then the channel is not open.
const LOCK_WAIT: Duration = Duration::from_millis(100);

/// The reconnector's backoff between failed attempts.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The first wait (defaults to 100 ms).
    pub min: Duration,
    /// The longest wait (defaults to 2 s): how long readiness may lag RabbitMQ's return.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(2),
        }
    }
}

/// Readiness state of one API process.
///
/// See the crate's [guarantees](crate#guarantees).
pub struct Readiness {
    /// The last ping: when, and whether it answered. The lock is held across a ping, so
    /// concurrent probes wait for it instead of pinging too.
    postgres: Mutex<Option<(Instant, bool)>>,
    /// Set by the reconnector once its first attempt has ended, either way; read by probes.
    tried: watch::Sender<bool>,
}

impl Readiness {
    /// Readiness for `client`, with its reconnector running until `stop` fires.
    pub fn start(client: Client, backoff: Backoff, stop: CancellationToken) -> Arc<Readiness> {
        let ready = Arc::new(Readiness {
            postgres: Mutex::new(None),
            tried: watch::Sender::new(false),
        });
        tokio::spawn(keep_connected(client, backoff, ready.clone(), stop));
        ready
    }

    /// Whether Postgres answered a ping within the last [`PING_TTL`].
    pub async fn postgres(&self, store: &Store) -> bool {
        let mut last = self.postgres.lock().await;
        if let Some((at, ok)) = *last
            && at.elapsed() < PING_TTL
        {
            return ok;
        }
        let ok = matches!(
            tokio::time::timeout(PING_TIMEOUT, store.ping()).await,
            Ok(Ok(()))
        );
        *last = Some((Instant::now(), ok));
        ok
    }

    /// Whether the publisher's channel is open. Never connects.
    pub async fn rabbitmq(&self, publisher: &Publisher) -> bool {
        let mut tried = self.tried.subscribe();
        // Either way the answer below is right; waiting only spares a process that just
        // started a false "down".
        let _ = tokio::time::timeout(FIRST_ATTEMPT_WAIT, tried.wait_for(|t| *t)).await;
        tokio::time::timeout(LOCK_WAIT, publisher.is_connected())
            .await
            .unwrap_or(false)
    }
}

/// The reconnector: opens the publisher's channel, then looks at it every [`CHECK_EVERY`] and
/// reopens it with backoff when it has closed. Logs once when the broker goes and once when
/// it is back, not per attempt.
async fn keep_connected(
    client: Client,
    backoff: Backoff,
    ready: Arc<Readiness>,
    stop: CancellationToken,
) {
    let mut first = true;
    loop {
        let attempt = || async {
            match tokio::time::timeout(CONNECT_TIMEOUT, client.publisher().ensure_connected()).await
            {
                Ok(result) => result,
                Err(_) => Err(BrokerError::Disconnected),
            }
        };
        let mut logged = false;
        let reconnect = attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(backoff.min)
                    .with_max_delay(backoff.max.max(backoff.min))
                    .with_jitter()
                    .without_max_times(),
            )
            .notify(|e: &BrokerError, after: Duration| {
                ready.tried.send_replace(true);
                if !logged {
                    tracing::warn!(error = %e, "api: rabbitmq unavailable; reconnecting in the background");
                    logged = true;
                }
                tracing::debug!(error = %e, ?after, "api: rabbitmq reconnect failed");
            });
        tokio::select! {
            result = reconnect => {
                if result.is_ok() && !first {
                    tracing::info!("api: rabbitmq available again");
                }
            }
            () = stop.cancelled() => return,
        }
        ready.tried.send_replace(true);
        first = false;
        loop {
            tokio::select! {
                () = tokio::time::sleep(CHECK_EVERY) => {}
                () = stop.cancelled() => return,
            }
            if !client.publisher().is_connected().await {
                break;
            }
        }
    }
}
