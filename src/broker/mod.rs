//! RabbitMQ: the work not yet done. [`topology`] declares the queues, [`publish`] ③ sends with
//! publisher confirms, [`consume`] ④ receives and acknowledges in batches.

pub mod consume;
pub mod dead;
pub mod publish;
pub mod topology;

use lapin::{Connection, ConnectionProperties};

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

/// Opens a connection named `name` (shown by `rabbitmqctl list_connections client_properties`
/// and the management UI, so operators and tests can find one process's connections).
pub async fn connect(url: &str, name: &str) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, props).await.context("connecting")
}
