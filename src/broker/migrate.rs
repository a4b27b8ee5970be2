//! Moving a deployment's broker queues from one type to the other (`apiary migrate-queues
//! --to quorum`), keeping every message: RabbitMQ cannot change a queue's type in place, so
//! each queue is emptied into a holding queue, deleted, declared again with the new type, and
//! refilled.
//!
//! 1. Refuse if any work queue has consumers: workers must be stopped first (and producers,
//!    the API included, since a message published to a queue in the instant it is deleted
//!    would be dropped; each queue is deleted only if empty, so one published before is not).
//! 2. For each broker queue not already of the new type, delay tiers first (their expired
//!    messages move on into the work queue, which must still be there), then the work queue,
//!    then the dead-letter queue: move every message into a durable classic holding queue
//!    `apiary.migrating.<uuid>` (a name derived from the queue's, so a rerun finds it), then
//!    delete the queue.
//! 3. Declare every queue with the new type, as `apiary migrate` would.
//! 4. Move every held message back to its queue and delete the holding queues.
//!
//! A message is acked from where it was only once its copy is confirmed, so a failure at any
//! point loses nothing: running the command again resumes (queues already converted are
//! skipped, holding queues still full are emptied). A failure between a confirm and its ack
//! may leave a message twice; the claim in Postgres runs its job once all the same. Messages
//! keep their properties (id, priority, headers); one from a delay tier waits its tier's
//! whole delay again, which only ever makes it later.

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};

use super::topology::{self, QueueType};
use super::{BrokerError, Context, QueueNames};

/// Messages moved per round of publishes and confirms.
const BATCH: usize = 500;

/// Why a migration stopped. Nothing is lost either way: rerun it once the cause is fixed.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Workers still consume a queue.
    #[error(
        "{consumers} consumer(s) still read {queue}: stop every worker (and producer) of the deployment first"
    )]
    Consumers {
        /// The broker queue.
        queue: String,
        /// How many consume it.
        consumers: u32,
    },
    /// Messages arrived in a queue while it was being emptied.
    #[error(
        "messages kept arriving in {0} while it was being moved: stop every producer (the API too) and run the command again"
    )]
    StillPublished(String),
    /// RabbitMQ failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// What a migration did to one broker queue.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    /// The broker queue.
    pub queue: String,
    /// Whether it was declared again with the new type (false: it already had it).
    pub converted: bool,
    /// Messages it held that were moved back into it.
    pub messages: u64,
}

/// The holding queue of `queue`: the same name every run, so a rerun finds what an
/// interrupted one left there.
pub fn holding_queue(queue: &str) -> String {
    let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, queue.as_bytes());
    format!("apiary.migrating.{}", id.simple())
}

/// Moves every queue of each of `queues` to `to`, keeping their messages; see the module
/// docs for the steps and what must be stopped first.
pub async fn migrate_queues(
    conn: &Connection,
    queues: &[QueueNames],
    to: QueueType,
) -> Result<Vec<Moved>, MigrateError> {
    let channel = conn.create_channel().await.context("opening a channel")?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("enabling confirms")?;
    for names in queues {
        for work in names.work_queues() {
            if let Some(q) = peek(conn, &work).await?
                && q.consumer_count() > 0
            {
                return Err(MigrateError::Consumers {
                    queue: work,
                    consumers: q.consumer_count(),
                });
            }
        }
    }
    let mut out = Vec::new();
    for names in queues {
        // Each shard's delay tiers first: what expires in them moves into the shard's work
        // queue, which must still be there.
        let mut order: Vec<String> = Vec::new();
        for k in 0..names.shards {
            order.extend(
                topology::DELAY_TIERS_MS
                    .iter()
                    .map(|t| names.shard_delay(k, *t)),
            );
            order.push(names.shard_work(k));
        }
        order.push(names.dead.clone());
        for queue in order {
            let converted = !has_type(conn, names, &queue, to).await?;
            if converted {
                tracing::info!(%queue, to = %to, "moving the queue's messages aside");
            }
            if converted {
                let hold = holding_queue(&queue);
                channel
                    .queue_declare(
                        hold.as_str().into(),
                        topology::durable(),
                        FieldTable::default(),
                    )
                    .await
                    .context("declaring a holding queue")?;
                move_all(&channel, &queue, &hold).await?;
                channel
                    .queue_delete(
                        queue.as_str().into(),
                        QueueDeleteOptions {
                            if_empty: true,
                            ..QueueDeleteOptions::default()
                        },
                    )
                    .await
                    .map_err(|_| MigrateError::StillPublished(queue.clone()))?;
            }
            out.push(Moved {
                queue,
                converted,
                messages: 0,
            });
        }
    }
    // A fresh channel from here: RabbitMQ 3.10 keeps, per channel, the state of each queue it
    // used by name, and a publish to the new queue on the channel that read the old one
    // crashes the channel (`function_clause` in `rabbit_classic_queue:update`).
    let _ = channel.close(200, "emptied".into()).await;
    let channel = conn.create_channel().await.context("opening a channel")?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("enabling confirms")?;
    for names in queues {
        topology::declare(conn, &channel, names, to).await?;
    }
    for moved in &mut out {
        let hold = holding_queue(&moved.queue);
        if peek(conn, &hold).await?.is_none() {
            continue;
        }
        moved.messages = move_all(&channel, &hold, &moved.queue).await?;
        channel
            .queue_delete(hold.as_str().into(), QueueDeleteOptions::default())
            .await
            .context("deleting a holding queue")?;
    }
    Ok(out)
}

/// A passive declare of `queue` on a channel of its own (a missing queue closes it): its
/// counts, or `None` if it does not exist.
async fn peek(conn: &Connection, queue: &str) -> Result<Option<lapin::Queue>, BrokerError> {
    let ch = conn.create_channel().await.context("opening a channel")?;
    let passive = QueueDeclareOptions {
        passive: true,
        durable: true,
        ..QueueDeclareOptions::default()
    };
    match ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
    {
        Ok(q) => {
            let _ = ch.close(200, "looked".into()).await;
            Ok(Some(q))
        }
        Err(e) if topology::is_not_found(&e) => Ok(None),
        Err(e) => Err(e).context("looking up a queue"),
    }
}

/// Whether `queue` (one of `names`) exists with type `to`, or does not exist at all: a
/// declare with the arguments of `to` succeeds on a channel of its own.
async fn has_type(
    conn: &Connection,
    names: &QueueNames,
    queue: &str,
    to: QueueType,
) -> Result<bool, BrokerError> {
    if peek(conn, queue).await?.is_none() {
        return Ok(true);
    }
    let args = topology::specs(names, to)
        .into_iter()
        .find(|s| s.name == queue)
        .map(|s| s.args)
        .unwrap_or_default();
    let ch = conn.create_channel().await.context("opening a channel")?;
    match ch
        .queue_declare(queue.into(), topology::durable(), args)
        .await
    {
        Ok(_) => {
            let _ = ch.close(200, "checked".into()).await;
            Ok(true)
        }
        // Another type, or other arguments (a classic work queue without priorities): either
        // way it is declared again, now as Apiary declares it.
        Err(e) if topology::is_precondition_failed(&e) => Ok(false),
        Err(e) => Err(e).context("checking a queue's type"),
    }
}

/// Moves every message of `from` to `to` on `channel` (in confirm mode): each batch is
/// published, confirmed, and only then acked from `from`. Returns how many moved.
async fn move_all(channel: &Channel, from: &str, to: &str) -> Result<u64, BrokerError> {
    let mut moved = 0;
    loop {
        let mut batch = Vec::with_capacity(BATCH);
        while batch.len() < BATCH {
            match channel
                .basic_get(from.into(), BasicGetOptions { no_ack: false })
                .await
                .context("reading a message to move")?
            {
                Some(m) => batch.push(m.delivery),
                None => break,
            }
        }
        let Some(last) = batch.last().map(|d| d.delivery_tag) else {
            return Ok(moved);
        };
        let mut confirms = Vec::with_capacity(batch.len());
        for d in &batch {
            confirms.push(
                channel
                    .basic_publish(
                        "".into(),
                        to.into(),
                        BasicPublishOptions::default(),
                        &d.data,
                        d.properties.clone(),
                    )
                    .await
                    .context("moving a message")?,
            );
        }
        for c in confirms {
            if !c.await.context("waiting for a move's confirm")?.is_ack() {
                return Err(BrokerError::Nacked(1));
            }
        }
        // Every copy is confirmed: only now do the originals go.
        channel
            .basic_ack(last, BasicAckOptions { multiple: true })
            .await
            .context("acking moved messages")?;
        moved += batch.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holding_queues_are_stable_and_apart() {
        assert_eq!(holding_queue("a"), holding_queue("a"));
        assert_ne!(holding_queue("a"), holding_queue("a.dead"));
        assert!(holding_queue("a").starts_with("apiary.migrating."));
    }
}
