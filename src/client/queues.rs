//! The operator's view of a deployment's queues, and pausing and resuming them: what
//! `apiary queue`, `apiary status` and `/v1/queues` show. Each queue's figures join what
//! Postgres knows ([`crate::store::queues`]) with what RabbitMQ holds.

use serde::{Deserialize, Serialize};

use super::{Client, StatsError};
use crate::broker::BrokerError;
use crate::broker::topology::{self, QueueDepths};
use crate::job::{DEFAULT_QUEUE, InvalidJob, validate_queue};
use crate::store::StoreError;
use crate::store::queues::QueueRow;

/// One queue of the deployment, as an operator sees it.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueInfo {
    /// The queue's name.
    pub name: String,
    /// Whether it is paused: no worker starts its jobs; they wait in RabbitMQ.
    pub paused: bool,
    /// Messages ready in its work queue (0 while its broker queues are not declared yet).
    pub ready: u32,
    /// Messages in its delay tiers (scheduled jobs and retries).
    pub delayed: u32,
    /// Messages in its dead-letter queue.
    pub dead: u32,
    /// Consumers on its work queue (none while paused).
    pub consumers: u32,
    /// Its jobs running now.
    pub in_flight: i64,
    /// How long its oldest due job has waited; `None` when none waits.
    pub oldest_waiting_seconds: Option<f64>,
    /// Its jobs that succeeded in the last minute, per second.
    pub succeeded_per_second: f64,
    /// Its jobs that failed for good in the last minute, per second.
    pub failed_per_second: f64,
}

impl QueueInfo {
    fn of(row: QueueRow, d: QueueDepths) -> QueueInfo {
        QueueInfo {
            name: row.name,
            paused: row.paused,
            ready: d.ready,
            delayed: d.delayed,
            dead: d.dead,
            consumers: d.consumers,
            in_flight: row.in_flight,
            oldest_waiting_seconds: row.oldest_waiting_seconds,
            succeeded_per_second: row.succeeded_per_second,
            failed_per_second: row.failed_per_second,
        }
    }
}

/// Why a queue operation failed.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The queue's name is not a queue name; nothing was changed.
    #[error("{0}")]
    Invalid(InvalidJob),
    /// Postgres failed. A pause or resume is idempotent: trying again is safe.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// RabbitMQ failed while reading the queue's depths (a pause or resume asked for was
    /// recorded all the same).
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl From<StatsError> for QueueError {
    fn from(e: StatsError) -> Self {
        match e {
            StatsError::Store(s) => QueueError::Store(s),
            StatsError::Broker(b) => QueueError::Broker(b),
        }
    }
}

impl Client {
    /// Every queue the deployment knows (`default`, the configured ones, those an operator
    /// paused or resumed, those live workers consume), `default` first, with its depths
    /// from RabbitMQ and its figures from Postgres.
    pub async fn queues(&self) -> Result<Vec<QueueInfo>, StatsError> {
        let names = self.known_queues().await?;
        self.queue_infos(&names).await
    }

    /// Pauses `queue`: within about a second (each worker reads the paused queues every 500 ms)
    /// no worker starts another of its jobs, and its messages wait in RabbitMQ, uncharged,
    /// until [`Client::resume`]. Jobs already running finish. Survives worker restarts.
    /// Returns the queue's entry.
    pub async fn pause(&self, queue: &str) -> Result<QueueInfo, QueueError> {
        self.set_paused(queue, true).await
    }

    /// Resumes a paused `queue`; workers take its jobs again within about a second. Returns
    /// the queue's entry.
    pub async fn resume(&self, queue: &str) -> Result<QueueInfo, QueueError> {
        self.set_paused(queue, false).await
    }

    async fn set_paused(&self, queue: &str, paused: bool) -> Result<QueueInfo, QueueError> {
        validate_queue(queue).map_err(QueueError::Invalid)?;
        let prefix = self.inner.publisher.prefix();
        self.inner.store.set_paused(prefix, queue, paused).await?;
        let mut infos = self.queue_infos(&[queue.to_string()]).await?;
        infos.pop().ok_or_else(|| {
            QueueError::Store(StoreError::Query {
                context: "reading the queue's figures",
                source: sqlx::Error::RowNotFound,
            })
        })
    }

    /// The names [`Client::queues`] lists.
    pub(crate) async fn known_queues(&self) -> Result<Vec<String>, StoreError> {
        self.inner
            .store
            .known_queues(
                self.inner.publisher.prefix(),
                &self.inner.configured,
                self.inner.lease * 3,
            )
            .await
    }

    /// The entries of `names`, in order.
    pub(crate) async fn queue_infos(&self, names: &[String]) -> Result<Vec<QueueInfo>, StatsError> {
        let rows = self
            .inner
            .store
            .queue_rows(self.inner.publisher.prefix(), names)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let d = self.depths_of(&row.name).await?;
            out.push(QueueInfo::of(row, d));
        }
        Ok(out)
    }

    /// The broker depths of every queue in `names`, added up.
    pub(crate) async fn total_depths(&self, names: &[String]) -> Result<QueueDepths, BrokerError> {
        let mut total = QueueDepths::default();
        for name in names {
            total.add(&self.depths_of(name).await?);
        }
        Ok(total)
    }

    /// One queue's broker depths, on a channel of its own: a passive declare of a missing
    /// queue closes the channel it was sent on. A named queue not declared yet (no worker
    /// consumed it, `apiary migrate` never heard of it) holds nothing: zeros. The `default`
    /// queue missing means the deployment was never migrated, which is the error it was.
    async fn depths_of(&self, queue: &str) -> Result<QueueDepths, BrokerError> {
        let names = self.inner.publisher.names(queue);
        let leftover = self.inner.publisher.leftover_shards(&names).await;
        let channel = self.inner.publisher.open_channel().await?;
        let depths = topology::depths_with(&channel, &names, &leftover).await;
        // Already closed by the broker after a 404; closing again only fails.
        let _ = channel.close(200, "depths read".into()).await;
        match depths {
            Err(BrokerError::Amqp { source, .. })
                if queue != DEFAULT_QUEUE && topology::is_not_found(&source) =>
            {
                Ok(QueueDepths::default())
            }
            other => other,
        }
    }
}
