//! ④ Consuming one queue: a lane's consumer, from the broker to its claimer. Each burst of
//! deliveries already received is decoded and passed on at once; a message that is not a job
//! is buried (recorded dead with its reason, dead-lettered, acked) and never requeued.
//!
//! The consumer is registered only while the lane may take work. A pause cancels it and
//! hands back what it holds unstarted; a resume registers it again; the drain cancels it for
//! good. Cancelling first matters: a delivery handed back while the consumer is registered
//! would be sent straight back to it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicCancelOptions, BasicConsumeOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Consumer};
use tokio_util::sync::CancellationToken;

use super::claim::Incoming;
use super::lanes::Lane;
use super::shared::{DeliveryRef, Shared, hand_back};
use crate::broker::consume::Acks;
use crate::broker::{BrokerError, Context as _};
use crate::wire::{RECORDED_HEADER, WireJob};

/// The consumer tag of this worker on `queue`, one of `lane`'s shards: its id, so
/// `rabbitmqctl list_consumers` names it, and for shards past 0 the shard's number, since
/// a tag may be used once per channel and every shard of a lane shares the lane's channel.
pub(crate) fn consumer_tag(shared: &Shared, lane: &Lane, queue: &str) -> String {
    match queue.strip_prefix(lane.names.work.as_str()) {
        Some(shard) if !shard.is_empty() => format!("apiary-{}{shard}", shared.id),
        _ => format!("apiary-{}", shared.id),
    }
}

/// Consumes `queue`, one of `lane`'s shards, on `channel` until the drain begins (returns
/// `None`), `session_lost` fires (another consumer's channel broke; returns `None`), or this
/// channel breaks (returns the error). Every shard of a lane has a consumer of its own on
/// the lane's channel, and all of them feed the lane's one claimer and slots.
pub(crate) async fn consume_lane(
    shared: &Arc<Shared>,
    lane: &Arc<Lane>,
    queue: &str,
    channel: &Channel,
    acks: &Acks,
    session_lost: &CancellationToken,
) -> Option<BrokerError> {
    let mut paused = lane.paused.subscribe();
    loop {
        // Wait while paused: nothing is registered, so the broker keeps the messages.
        while *paused.borrow_and_update() {
            tokio::select! {
                () = shared.stop_taking.cancelled() => return None,
                () = session_lost.cancelled() => return None,
                r = paused.changed() => if r.is_err() { return None },
            }
        }
        let consumer = channel
            .basic_consume(
                queue.into(),
                consumer_tag(shared, lane, queue).as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("starting to consume");
        let mut consumer = match consumer {
            Ok(c) => c,
            Err(e) => return Some(e),
        };
        lane.consuming.fetch_add(1, Ordering::Relaxed);
        let why = deliver(shared, lane, &mut consumer, acks, session_lost, &mut paused).await;
        match why {
            Stop::Lost(e) => {
                lane.consuming.fetch_sub(1, Ordering::Relaxed);
                return Some(e);
            }
            Stop::SessionLost => {
                lane.consuming.fetch_sub(1, Ordering::Relaxed);
                return None;
            }
            Stop::Drain | Stop::Pause => {
                let cancel = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default());
                if tokio::time::timeout(Duration::from_secs(5), cancel)
                    .await
                    .is_err()
                {
                    tracing::warn!(queue = %lane.queue(), "the broker did not confirm the consumer's cancellation in time");
                }
                hand_back_buffered(shared, acks, &mut consumer);
                lane.consuming.fetch_sub(1, Ordering::Relaxed);
                if matches!(why, Stop::Drain) {
                    return None;
                }
            }
        }
    }
}

enum Stop {
    Drain,
    Pause,
    SessionLost,
    Lost(BrokerError),
}

/// Passes deliveries on until something stops the consumer.
async fn deliver(
    shared: &Arc<Shared>,
    lane: &Arc<Lane>,
    consumer: &mut Consumer,
    acks: &Acks,
    session_lost: &CancellationToken,
    paused: &mut tokio::sync::watch::Receiver<bool>,
) -> Stop {
    let max = shared.cfg.batch;
    loop {
        let first = tokio::select! {
            biased;
            () = shared.stop_taking.cancelled() => return Stop::Drain,
            () = session_lost.cancelled() => return Stop::SessionLost,
            r = paused.changed() => {
                if r.is_err() || *paused.borrow_and_update() {
                    return Stop::Pause;
                }
                continue;
            }
            d = consumer.next() => d,
        };
        let mut batch = Vec::with_capacity(8);
        match first {
            Some(Ok(d)) => batch.push(d),
            Some(Err(e)) => {
                return Stop::Lost(BrokerError::Amqp {
                    context: "consuming",
                    source: e,
                });
            }
            None => return Stop::Lost(BrokerError::Disconnected),
        }
        // Take whatever else has already arrived, without waiting: batches grow with load and
        // a lone job is never held back for company.
        while batch.len() < max {
            match consumer.next().now_or_never() {
                Some(Some(Ok(d))) => batch.push(d),
                _ => break,
            }
        }
        let now = Instant::now();
        for d in batch {
            // Tracked before anything can settle it, so multiple-acks never cover it unseen.
            acks.track(d.delivery_tag);
            let delivery = DeliveryRef {
                tag: d.delivery_tag,
                acks: acks.clone(),
            };
            let message_id = d
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_string());
            let recorded = d.properties.headers().as_ref().is_some_and(|h| {
                matches!(
                    h.inner().get(RECORDED_HEADER),
                    Some(AMQPValue::Boolean(true))
                )
            });
            let decoded =
                WireJob::decode(&d.data, message_id.as_deref(), shared.cfg.max_payload_bytes)
                    .and_then(|job| in_its_queue(&shared.cfg.queue, lane, job))
                    .and_then(|job| callback_allowed(&shared.cfg, recorded, job));
            // A raw producer's job with parents is recorded, not claimed: it waits for them.
            let parents = match (&decoded, recorded) {
                (Ok(job), false) => {
                    crate::wire::depends_on(&d.data, job.id).map_err(|reason| crate::wire::Poison {
                        id: job.id,
                        kind: Some(job.kind.clone()),
                        reason,
                    })
                }
                _ => Ok(Vec::new()),
            };
            let decoded = match (decoded, parents) {
                (Ok(_), Err(p)) => Err(p),
                (Ok(mut job), Ok(parents)) if !parents.is_empty() => {
                    job.queue.get_or_insert_with(|| lane.queue().to_string());
                    let shared2 = shared.clone();
                    let names = lane.names.clone();
                    let queue = lane.queue().to_string();
                    let body = d.data;
                    shared.tasks.spawn(async move {
                        super::dead::record_waiting(
                            &shared2, &names, &queue, job, parents, &body, delivery,
                        )
                        .await
                    });
                    continue;
                }
                (d, _) => d,
            };
            match decoded {
                Ok(mut job) => {
                    // Recorded with the queue it arrived on; the priority the broker ordered it
                    // by if the body does not say, else the kind's (only raw messages lack
                    // one: Apiary's own always carry it).
                    job.queue.get_or_insert_with(|| lane.queue().to_string());
                    if job.priority.is_none() {
                        job.priority = d
                            .properties
                            .priority()
                            .map(|p| p.min(crate::job::MAX_PRIORITY))
                            .or_else(|| shared.kind_options(&job.kind).priority);
                    }
                    // The claimer outlives every session; a failed send means it has stopped,
                    // and the delivery goes back with the channel.
                    let _ = lane.claim_tx.send(Incoming {
                        job: Arc::new(job),
                        lane: lane.clone(),
                        redelivered: d.redelivered,
                        recorded,
                        trace: crate::trace::TraceContext::from_headers(
                            d.properties.headers().as_ref(),
                        ),
                        delivery,
                        arrived: now,
                        again: 0,
                        busy_waits: 0,
                    });
                }
                Err(poison) => {
                    let shared2 = shared.clone();
                    let names = lane.names.clone();
                    let queue = lane.queue().to_string();
                    shared.tasks.spawn(async move {
                        super::dead::bury_poison(
                            &shared2,
                            &names,
                            &queue,
                            &d.data,
                            poison.id,
                            poison.kind,
                            &poison.reason,
                            delivery,
                        )
                        .await
                    });
                }
            }
        }
    }
}

/// A message that names a queue other than the one it arrived on is refused: running it here
/// would take the slots, the limits and the pause of the wrong queue.
fn in_its_queue(prefix: &str, lane: &Lane, job: WireJob) -> Result<WireJob, crate::wire::Poison> {
    match job.queue.as_deref() {
        Some(q) if q != lane.queue() => Err(crate::wire::Poison {
            id: job.id,
            kind: Some(job.kind.clone()),
            reason: format!(
                "queue: the message names queue {q:?} but was published to the broker queue {:?} of queue {:?}; publish it to {:?}",
                lane.names.work,
                lane.queue(),
                crate::broker::QueueNames::for_queue(prefix, q).work
            ),
        }),
        _ => Ok(job),
    }
}

/// A raw message's `callback_url` must pass this deployment's webhook policy, as an enqueue's
/// would: a producer who can publish must not make workers call an address the allow-list
/// does not name. Messages Apiary published for a recorded job were checked at enqueue (and
/// every delivery checks again).
fn callback_allowed(
    cfg: &crate::config::Config,
    recorded: bool,
    job: WireJob,
) -> Result<WireJob, crate::wire::Poison> {
    match &job.callback_url {
        Some(url) if !recorded => {
            match crate::webhook::check(url, &cfg.webhook_hosts, cfg.webhook_secret.as_ref()) {
                Ok(()) => Ok(job),
                Err(e) => Err(crate::wire::Poison {
                    id: job.id,
                    kind: Some(job.kind.clone()),
                    reason: e.to_string(),
                }),
            }
        }
        _ => Ok(job),
    }
}

/// Requeues everything the consumer had already received but not yet given us.
pub(crate) fn hand_back_buffered(shared: &Shared, acks: &Acks, consumer: &mut Consumer) {
    while let Some(Some(Ok(d))) = consumer.next().now_or_never() {
        acks.track(d.delivery_tag);
        hand_back(
            shared,
            [DeliveryRef {
                tag: d.delivery_tag,
                acks: acks.clone(),
            }],
        );
    }
}
