//! The dead-letter queue, read back: removing the letters of jobs that were replayed, so the
//! queue holds exactly the jobs that are dead. RabbitMQ cannot delete a message by id, so this
//! reads the queue once through, acks the letters to remove and requeues the others, which a
//! classic queue puts back in their original order.

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

/// Removes the dead letters of `ids` from the dead-letter queue. Returns how many it removed.
pub async fn remove(
    channel: &Channel,
    names: &QueueNames,
    ids: &HashSet<JobId>,
) -> Result<usize, BrokerError> {
    if ids.is_empty() {
        return Ok(0);
    }
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
    if depth == 0 {
        return Ok(0);
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
    let mut removed = 0;
    let mut last_kept = None;
    for _ in 0..depth.min(u32::from(u16::MAX)) {
        let next = tokio::time::timeout(Duration::from_secs(2), consumer.next()).await;
        let Ok(Some(Ok(d))) = next else { break };
        if letter_job_id(&d.properties).is_some_and(|id| ids.contains(&id)) {
            channel
                .basic_ack(d.delivery_tag, BasicAckOptions::default())
                .await
                .context("removing a dead letter")?;
            removed += 1;
        } else {
            last_kept = Some(d.delivery_tag);
        }
    }
    channel
        .basic_cancel(
            tag.as_str().into(),
            lapin::options::BasicCancelOptions::default(),
        )
        .await
        .context("stopping the sweep")?;
    if let Some(t) = last_kept {
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
