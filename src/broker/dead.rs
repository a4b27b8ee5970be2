//! The dead-letter queue, read back: removing the letters of jobs that were replayed, so the
//! queue holds only jobs that are dead. RabbitMQ cannot delete a message by id, so a pass
//! holds every letter at once, acks the ones to remove and requeues the others, which a
//! classic queue puts back in their original order.
//!
//! A pass costs a read of the whole queue, so replays do not make one each: they queue their
//! ids in Postgres ([`Store::queue_dead_sweep`]) and [`sweep_replayed`], run periodically,
//! removes the letters of many replays in one pass.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::Channel;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};

use super::{BrokerError, Context, QueueNames};
use crate::job::JobId;
use crate::store::{Store, StoreError};

/// The most queued ids one sweep takes; the rest wait for the next.
pub const MAX_SWEEP_IDS: i64 = 10_000;

/// Why a sweep failed. Nothing is lost either way: letters not yet acked go back to the queue
/// when the channel closes, and ids not yet forgotten stay queued for the next sweep.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// Postgres failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// RabbitMQ failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// The job id a dead letter carries: its `x-apiary-job-id` header, else its `message_id`.
pub fn letter_job_id(props: &lapin::BasicProperties) -> Option<JobId> {
    let from_header =
        props
            .headers()
            .as_ref()
            .and_then(|h| match h.inner().get("x-apiary-job-id") {
                Some(AMQPValue::LongString(s)) => std::str::from_utf8(s.as_bytes())
                    .ok()
                    .and_then(|s| s.parse().ok()),
                _ => None,
            });
    from_header.or_else(|| {
        props
            .message_id()
            .as_ref()
            .and_then(|m| m.as_str().parse().ok())
    })
}

/// Removes the dead letters of `ids` from the dead-letter queue, in one pass. Returns how many
/// it removed.
pub async fn remove(
    channel: &Channel,
    names: &QueueNames,
    ids: &HashSet<JobId>,
) -> Result<usize, BrokerError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let pass = hold_all(channel, names).await?;
    pass.settle(channel, |id| ids.contains(&id)).await
}

/// Removes the letters of the jobs queued by replays ([`Store::queue_dead_sweep`]) in one
/// pass over the dead-letter queue, and forgets those ids. Returns how many letters it
/// removed. Does nothing (and returns 0) while another sweep runs, under the advisory lock
/// [`crate::store::dead_job::DEAD_SWEEP_LOCK`], or when nothing is queued.
///
/// Only letters whose job is no longer `dead` go. A job replayed and then dead again keeps
/// every letter it has, its current one among them (they cannot be told apart), and stays
/// queued: its stale letters go after its next replay.
pub async fn sweep_replayed(
    store: &Store,
    channel: &Channel,
    names: &QueueNames,
) -> Result<usize, SweepError> {
    let Some(mut sweep) = store.begin_dead_sweep(MAX_SWEEP_IDS).await? else {
        return Ok(0);
    };
    if sweep.queued.is_empty() {
        sweep.finish(&[]).await?;
        return Ok(0);
    }
    let pass = hold_all(channel, names).await?;
    // Read after the letters are held, not before: every letter in hand was published while
    // its job was dead, so a job not dead now was replayed since and its letters are stale.
    // Read before, a job dying again meanwhile would lose the new letter it just got.
    let queued = sweep.queued.clone();
    let gone: HashSet<JobId> = match sweep.not_dead(&queued, &names.queue).await {
        Ok(ids) => ids.into_iter().collect(),
        Err(e) => {
            // Hand every letter back now: the channel may live on (a worker's), and held
            // letters would stay invisible until it closes.
            pass.settle(channel, |_| false).await?;
            return Err(e.into());
        }
    };
    let seen: HashSet<JobId> = pass.letters.iter().filter_map(|(_, id)| *id).collect();
    let complete = pass.complete;
    let removed = pass.settle(channel, |id| gone.contains(&id)).await?;
    // A pass that did not see the whole queue may have missed letters of the others: they
    // stay queued for the next sweep.
    let forget: Vec<JobId> = gone
        .into_iter()
        .filter(|id| complete || seen.contains(id))
        .collect();
    sweep.finish(&forget).await?;
    if removed > 0 {
        tracing::info!(
            letters_removed = removed,
            jobs = forget.len(),
            "swept dead letters of replayed jobs"
        );
    }
    Ok(removed)
}

/// Every letter of the dead-letter queue, held unacknowledged by one consumer (already
/// cancelled), so none is seen twice and none can be taken by anyone else meanwhile. Until
/// [`Pass::settle`] the letters are out of the queue; closing the channel also returns them.
struct Pass {
    /// Delivery tag and job id of each letter, in queue order.
    letters: Vec<(u64, Option<JobId>)>,
    /// Whether the pass held every letter the queue had when it began.
    complete: bool,
}

/// Takes hold of every letter in the dead-letter queue.
async fn hold_all(channel: &Channel, names: &QueueNames) -> Result<Pass, BrokerError> {
    let passive = QueueDeclareOptions {
        passive: true,
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let depth = channel
        .queue_declare(names.dead.as_str().into(), passive, FieldTable::default())
        .await
        .context("reading the dead-letter queue's depth")?
        .message_count();
    let mut pass = Pass {
        letters: Vec::new(),
        complete: true,
    };
    if depth == 0 {
        return Ok(pass);
    }
    // Hold every letter at once, so none is seen twice within this pass.
    let prefetch = u16::try_from(depth).unwrap_or(u16::MAX);
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .context("setting prefetch")?;
    let tag = format!("apiary-dead-sweep-{}", uuid::Uuid::new_v4());
    let mut consumer = channel
        .basic_consume(
            names.dead.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("reading the dead-letter queue")?;
    for _ in 0..prefetch {
        let next = tokio::time::timeout(Duration::from_secs(2), consumer.next()).await;
        let Ok(Some(Ok(d))) = next else { break };
        pass.letters
            .push((d.delivery_tag, letter_job_id(&d.properties)));
    }
    pass.complete = pass.letters.len() as u64 >= u64::from(depth);
    channel
        .basic_cancel(
            tag.as_str().into(),
            lapin::options::BasicCancelOptions::default(),
        )
        .await
        .context("stopping the sweep")?;
    Ok(pass)
}

impl Pass {
    /// Acks the letters whose job `remove` picks and returns the others to the queue.
    /// Returns how many it removed.
    async fn settle(
        self,
        channel: &Channel,
        remove: impl Fn(JobId) -> bool,
    ) -> Result<usize, BrokerError> {
        let mut removed = 0;
        let mut last_kept = None;
        for (tag, id) in self.letters {
            if id.is_some_and(&remove) {
                channel
                    .basic_ack(tag, BasicAckOptions::default())
                    .await
                    .context("removing a dead letter")?;
                removed += 1;
            } else {
                last_kept = Some(tag);
            }
        }
        if let Some(t) = last_kept {
            // Every tag up to the last kept one that is not acked yet is a kept letter.
            channel
                .basic_nack(
                    t,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                )
                .await
                .context("returning the other dead letters")?;
        }
        Ok(removed)
    }
}
