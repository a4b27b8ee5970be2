//! RabbitMQ: the work not yet done. [`topology`] declares the queues, [`publish`] ③ sends with
//! publisher confirms, [`consume`] ④ receives and acknowledges in batches, [`migrate`] moves
//! queues from one type to the other.
//!
//! `AMQP_URL` may list several addresses, comma-separated (the nodes of one cluster).
//! [`connect`] tries them in order from a start shared by the whole process, and uses the
//! first that answers; a reconnect loop that lost its connection calls [`lost`], so its next
//! attempt starts from the address after the one lost, and wraps around to it last.

pub mod consume;
pub mod dead;
pub mod migrate;
pub mod publish;
pub mod topology;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};

use crate::config::{mask_url, url_list};

pub use publish::Publisher;
pub use topology::QueueNames;

/// Errors from RabbitMQ, with what we were doing.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// An AMQP operation failed.
    #[error("rabbitmq: {context}: {source}")]
    Amqp {
        /// What we were doing.
        context: &'static str,
        /// The client's error.
        #[source]
        source: lapin::Error,
    },
    /// The broker refused a publish (a negative confirm).
    #[error("rabbitmq refused {0} published message(s) (negative confirm)")]
    Nacked(usize),
    /// No channel is open: the connection is down.
    #[error("rabbitmq is not connected")]
    Disconnected,
    /// The broker did not confirm in time (it may be blocking publishers).
    #[error("rabbitmq did not confirm the publish within {0:?}")]
    Timeout(std::time::Duration),
    /// An address of `AMQP_URL` did not answer in time.
    #[error("rabbitmq did not answer within {0:?}")]
    ConnectTimeout(std::time::Duration),
    /// A queue exists with another type than `APIARY_QUEUE_TYPE` asks for; RabbitMQ cannot
    /// change a queue's type in place.
    #[error(
        "the queue {queue} exists as a {existing} queue, but APIARY_QUEUE_TYPE is {wanted}; a queue's type cannot be changed in place: set APIARY_QUEUE_TYPE={existing}, or stop every worker and producer and run `apiary migrate-queues --to {wanted}` (see \"Quorum queues\" in the README)"
    )]
    QueueTypeMismatch {
        /// The broker queue.
        queue: String,
        /// Its type as the broker has it (`classic`, `quorum`, `stream`).
        existing: String,
        /// What `APIARY_QUEUE_TYPE` asks for.
        wanted: topology::QueueType,
    },
    /// A queue's shard count could not be recorded in Postgres before its shards were
    /// declared ([`crate::store::shards`]); nothing was published.
    #[error("recording the queue's shard count before declaring its shards: {0}")]
    ShardRecord(#[source] std::sync::Arc<crate::store::StoreError>),
}

/// Adds context to a lapin result.
///
/// See the crate's [guarantees](crate#guarantees).
pub trait Context<T> {
    /// Wraps the error with what we were doing.
    fn context(self, what: &'static str) -> Result<T, BrokerError>;
}

impl<T> Context<T> for Result<T, lapin::Error> {
    fn context(self, what: &'static str) -> Result<T, BrokerError> {
        self.map_err(|source| BrokerError::Amqp {
            context: what,
            source,
        })
    }
}

/// How long one address of a list may take to answer before the next is tried. A single
/// address is given all the time the client takes, as before.
pub const ADDRESS_TIMEOUT: Duration = Duration::from_secs(10);

/// Where each address list's next connection attempt starts, by list, for the whole process:
/// the address last connected to, moved on by [`lost`].
fn starts() -> &'static Mutex<HashMap<String, usize>> {
    static STARTS: OnceLock<Mutex<HashMap<String, usize>>> = OnceLock::new();
    STARTS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The index in `urls` the next attempt starts from.
fn start_of(urls: &str, n: usize) -> usize {
    starts()
        .lock()
        .map(|m| m.get(urls).copied().unwrap_or(0) % n.max(1))
        .unwrap_or(0)
}

fn set_start(urls: &str, i: usize) {
    if let Ok(mut m) = starts().lock() {
        m.insert(urls.to_string(), i);
    }
}

/// Says a connection opened from `urls` was lost: the next attempt starts from the address
/// after the one it was on (a no-op with one address).
pub fn lost(urls: &str) {
    let n = url_list(urls).len();
    if n > 1 {
        set_start(urls, (start_of(urls, n) + 1) % n);
    }
}

/// Opens a connection named `name` (shown by `rabbitmqctl list_connections client_properties`
/// and the management UI, so operators and tests can find one process's connections).
///
/// `urls` is `AMQP_URL`: one address or several, comma-separated, tried in turn from where
/// the last attempt of this process left off; the first that answers is used.
pub async fn connect(urls: &str, name: &str) -> Result<Connection, BrokerError> {
    connect_indexed(urls, name).await.map(|(c, _)| c)
}

/// [`connect`], also saying which address of the list answered (its index).
pub async fn connect_indexed(urls: &str, name: &str) -> Result<(Connection, usize), BrokerError> {
    let list = url_list(urls);
    if list.len() <= 1 {
        let url = list.first().copied().unwrap_or(urls);
        return open(url, name).await.map(|c| (c, 0));
    }
    let start = start_of(urls, list.len());
    let mut last = BrokerError::Disconnected;
    for k in 0..list.len() {
        let i = (start + k) % list.len();
        match tokio::time::timeout(ADDRESS_TIMEOUT, open(list[i], name)).await {
            Ok(Ok(conn)) => {
                set_start(urls, i);
                return Ok((conn, i));
            }
            Ok(Err(e)) => {
                tracing::debug!(address = %mask_url(list[i]), error = %e, "rabbitmq address did not answer; trying the next");
                last = e;
            }
            Err(_) => {
                tracing::debug!(address = %mask_url(list[i]), "rabbitmq address did not answer in time; trying the next");
                last = BrokerError::ConnectTimeout(ADDRESS_TIMEOUT);
            }
        }
    }
    Err(last)
}

/// Opens one connection to one address.
async fn open(url: &str, name: &str) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, props).await.context("connecting")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loss_moves_the_start_to_the_next_address_and_wraps() {
        let urls = "amqp://a:1/%2f,amqp://b:2/%2f,amqp://c:3/%2f";
        assert_eq!(start_of(urls, 3), 0);
        set_start(urls, 2);
        assert_eq!(start_of(urls, 3), 2);
        lost(urls);
        assert_eq!(start_of(urls, 3), 0, "wraps to the first");
        lost(urls);
        assert_eq!(start_of(urls, 3), 1);
        // One address: nothing to rotate.
        let one = "amqp://solo:1/%2f";
        lost(one);
        assert_eq!(start_of(one, 1), 0);
    }
}
