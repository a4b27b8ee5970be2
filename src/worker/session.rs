//! Connecting: one RabbitMQ connection per session, with a publishing channel and a consuming
//! channel per lane, each with its own prefetch. A lane of a sharded queue has one consumer
//! per shard on its channel (and one per shard left over from a larger count), its prefetch
//! split between them. When any of them breaks the whole session is
//! dropped and another opened with backoff; the deliveries it held are redelivered by the
//! broker, and the claim keeps their effects single.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::options::BasicQosOptions;
use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;

use super::consume::consume_lane;
use super::lanes::Lane;
use super::shared::Shared;
use crate::broker::consume::Acks;
use crate::broker::topology::{self, Declared};
use crate::broker::{BrokerError, Context as _, Publisher};

/// An open session: the connection, and each lane's consuming channel with the broker
/// queues (its shards) it consumes there.
pub(crate) struct Session {
    pub(crate) conn: Arc<Connection>,
    pub(crate) lanes: Vec<(Arc<Lane>, Channel, Acks, Vec<String>)>,
}

impl Session {
    /// Flushes pending acks and closes every channel and the connection, each step bounded.
    pub(crate) async fn close(self) {
        let quick = Duration::from_secs(2);
        for (_, channel, acks, _) in &self.lanes {
            let _ = tokio::time::timeout(quick, acks.flush()).await;
            let _ = tokio::time::timeout(quick, channel.close(200, "worker stopping".into())).await;
        }
        let _ = tokio::time::timeout(quick, self.conn.close(200, "worker stopping".into())).await;
    }
}

/// Opens sessions and consumes every lane until the drain begins. Returns the session that
/// was open then, for the drain to settle and close.
pub(crate) async fn keep_consuming(shared: &Arc<Shared>) -> Option<Session> {
    let mut delays = reconnect_delays();
    let mut said_mismatch = false;
    while !shared.stop_taking.is_cancelled() {
        let opened = tokio::select! {
            r = open(shared) => r,
            () = shared.stop_taking.cancelled() => break,
        };
        match opened {
            Ok(session) => {
                shared.rabbit.up();
                delays = reconnect_delays();
                shared.ready.store(true, Ordering::Relaxed);
                let lost = consume_all(shared, &session).await;
                shared.ready.store(false, Ordering::Relaxed);
                match lost {
                    None => return Some(session),
                    Some(e) => {
                        shared.rabbit.down(&e);
                        // The next attempt starts from the next address of AMQP_URL.
                        crate::broker::lost(&shared.cfg.amqp_url);
                        *shared.publisher.write().await = None;
                        *shared.stats_channel.write().await = None;
                    }
                }
            }
            // Not an outage but a setting at odds with the broker: said at error level, once,
            // and retried, so the worker starts consuming once the queues are migrated.
            Err(e @ BrokerError::QueueTypeMismatch { .. }) => {
                if !said_mismatch {
                    tracing::error!(error = %e, "cannot consume until the queues and APIARY_QUEUE_TYPE agree; retrying with backoff");
                    said_mismatch = true;
                }
            }
            // Postgres, not the broker, is what failed: the shards are declared once it answers.
            Err(e @ BrokerError::ShardRecord(_)) => {
                tracing::warn!(error = %e, "cannot declare the queues' shards until Postgres answers; retrying with backoff");
            }
            Err(e) => shared.rabbit.down(&e),
        }
        let wait = delays.next().unwrap_or(Duration::from_secs(5));
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shared.stop_taking.cancelled() => break,
        }
    }
    None
}

/// Consumes every shard of every lane of `session` at once. The first consumer whose channel
/// breaks ends the session for all of them.
async fn consume_all(shared: &Arc<Shared>, session: &Session) -> Option<BrokerError> {
    let lost = CancellationToken::new();
    let lanes = session
        .lanes
        .iter()
        .flat_map(|(lane, channel, acks, queues)| {
            queues.iter().map(move |q| (lane, channel, acks, q))
        })
        .map(|(lane, channel, acks, queue)| {
            let lost = lost.clone();
            async move {
                let r = consume_lane(shared, lane, queue, channel, acks, &lost).await;
                if r.is_some() {
                    lost.cancel();
                }
                r
            }
        });
    futures_util::future::join_all(lanes)
        .await
        .into_iter()
        .flatten()
        .next()
}

fn reconnect_delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .without_max_times()
        .with_jitter()
        .build()
}

/// Connects, declares each lane's queues, and opens the channels.
async fn open(shared: &Arc<Shared>) -> Result<Session, BrokerError> {
    let name = format!("apiary worker {} pid {}", shared.id, std::process::id());
    let conn = Arc::new(crate::broker::connect(&shared.cfg.amqp_url, &name).await?);
    let publisher = Arc::new(
        Publisher::on(conn.clone(), &shared.cfg.queue)
            .await?
            .with_queue_type(shared.cfg.queue_type)
            .with_shards(shared.cfg.shards())
            .with_ledger(shared.store.clone()),
    );
    let mut lanes = Vec::with_capacity(shared.lanes.len());
    for lane in &shared.lanes {
        let channel = conn
            .create_channel()
            .await
            .context("opening a consume channel")?;
        shared
            .store
            .record_shards(&lane.names.work, lane.names.shards)
            .await
            .map_err(|e| BrokerError::ShardRecord(std::sync::Arc::new(e)))?;
        let declared =
            topology::declare(&conn, &channel, &lane.names, shared.cfg.queue_type).await?;
        if declared == Declared::WithoutPriorities {
            tracing::warn!(queue = %lane.queue(), "priorities are ignored for this queue until its work queue is declared again with them (see the README)");
        }
        // Shards left over from a larger count are consumed until someone deletes them, so
        // no message in them is stranded when `shards=` shrinks.
        let leftover = publisher.leftover_shards(&lane.names).await;
        if !leftover.is_empty() {
            tracing::info!(queue = %lane.queue(), shards = lane.names.shards, leftover = ?leftover, "also consuming shards left over from a larger shards= count; delete them once empty");
        }
        let mut queues = lane.names.work_queues();
        queues.extend(leftover.iter().map(|k| lane.names.shard_work(*k)));
        if let Ok(mut l) = lane.leftover.lock() {
            *l = leftover;
        }
        // Per consumer (RabbitMQ applies a non-global prefetch to each consumer of the
        // channel; quorum queues support no other), so the lane's prefetch is split between
        // its shards. The lane's slots bound what runs, whatever the shards hold.
        let consumers = u16::try_from(queues.len()).unwrap_or(u16::MAX).max(1);
        let prefetch = lane.prefetch.div_ceil(consumers).max(1);
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .context("setting prefetch")?;
        let (acks, _task) = Acks::spawn(channel.clone());
        lanes.push((lane.clone(), channel, acks, queues));
    }
    *shared.publisher.write().await = Some(publisher);
    *shared.stats_channel.write().await = Some(
        conn.create_channel()
            .await
            .context("opening a stats channel")?,
    );
    Ok(Session { conn, lanes })
}
