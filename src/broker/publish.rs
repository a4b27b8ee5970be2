//! ③ Publishing with publisher confirms. Confirms are pipelined: a batch is written in full,
//! then every confirm is awaited, so a batch costs one round trip, not one per message. A
//! publish returns `Ok` only once the broker has taken responsibility for every message.

use chrono::Utc;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::Mutex;

use std::collections::HashSet;
use std::sync::Arc;

use super::{BrokerError, Context, QueueNames, topology};
use crate::job::JobId;
use crate::trace::TraceContext;
use crate::wire::{RECORDED_HEADER, WireJob};

/// How long a publish may take, writing and waiting for the broker's confirms. Past it the publish counts as failed
/// (the caller's outbox row stays and is sent again later), so a broker that blocks
/// publishers (a memory or disk alarm) never stalls a worker's duties forever.
pub const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// One message to publish.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The queue (through the default exchange).
    pub queue: String,
    /// The body.
    pub body: Vec<u8>,
    /// The `message_id` property: the job id.
    pub id: JobId,
    /// Extra headers, such as a dead letter's reason.
    pub headers: Option<FieldTable>,
    /// The AMQP `priority` property, 0 to 9.
    pub priority: u8,
    /// The Apiary queue whose broker queues `queue` belongs to: declared on first use.
    pub names: Arc<QueueNames>,
}

impl Outgoing {
    /// A job message for a recorded job, routed by the job's own queue and deployment (the
    /// job's `prefix`, or `prefix` for a job recorded before deployments were) to its shard's
    /// work queue (of the queue's `shards`) or, if it is not due yet, to that shard's delay
    /// tier. It carries [`RECORDED_HEADER`], so a copy that outlives its job's row (pruned)
    /// is recognised and never recorded again.
    pub fn job(prefix: &str, job: &WireJob, shards: &topology::Shards) -> Outgoing {
        let queue = job.queue_name();
        let names = QueueNames::shared_sharded(
            job.prefix.as_deref().unwrap_or(prefix),
            queue,
            shards.of(queue),
        );
        let shard = names.shard_for(job);
        let queue = match job.run_at {
            Some(at) => names.next_hop_in(shard, (at - Utc::now()).num_milliseconds()),
            None => names.shard_work(shard),
        };
        Outgoing::recorded_to(names, queue, job)
    }

    /// A job message for a recorded job, to `queue`, one of `names`.
    pub fn recorded_to(names: Arc<QueueNames>, queue: String, job: &WireJob) -> Outgoing {
        let mut headers = FieldTable::default();
        headers.insert(RECORDED_HEADER.into(), AMQPValue::Boolean(true));
        Outgoing {
            queue,
            body: job.to_body(),
            id: job.id,
            headers: Some(headers),
            priority: job.priority.unwrap_or(0),
            names,
        }
    }

    /// A dead letter: the original body with the reason and job id in headers. The reason is
    /// cut to [`crate::store::MAX_ERROR_BYTES`]: a header frame larger than the broker's
    /// `frame_max` would make RabbitMQ close the whole connection.
    pub fn dead(names: Arc<QueueNames>, id: JobId, body: Vec<u8>, reason: &str) -> Outgoing {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-apiary-reason".into(),
            AMQPValue::LongString(crate::store::clip_error(reason).into()),
        );
        headers.insert(
            "x-apiary-job-id".into(),
            AMQPValue::LongString(id.to_string().into()),
        );
        Outgoing {
            queue: names.dead.clone(),
            body,
            id,
            headers: Some(headers),
            priority: 0,
            names,
        }
    }
}

/// Where a publisher gets its channel: its own connection, opened on demand and reopened after
/// a failure, or a channel lent by a worker's session.
enum Source {
    Own {
        url: String,
        name: String,
        conn: Option<Box<Connection>>,
    },
    Lent(Arc<Connection>),
}

/// Publishes with confirms on one channel. Cheap to share behind an `Arc`; concurrent callers
/// pipeline on the same channel.
///
/// See the crate's [guarantees](crate#guarantees).
pub struct Publisher {
    source: Mutex<Source>,
    channel: Mutex<Option<Channel>>,
    /// The deployment's prefix (`APIARY_QUEUE`): routes jobs that do not carry their own.
    prefix: String,
    /// Work queues declared on the current channel with their shard count, so each is
    /// declared once per channel.
    declared: Mutex<HashSet<(String, u16)>>,
    /// The type queues are declared with (`APIARY_QUEUE_TYPE`).
    queue_type: topology::QueueType,
    /// Each queue's shard count (`shards=`): which work queue a job goes to.
    shards: topology::Shards,
    /// Where shard counts are recorded before shards are declared, and read to find leftover
    /// shards ([`crate::store::shards`]). Without it, leftovers are found by probing.
    ledger: Option<crate::store::Store>,
}

impl Publisher {
    /// A publisher with its own connection to `url`, opened at first use and reopened after a
    /// failure. `declare` the topology on first connect so producers may publish before any
    /// worker started.
    pub fn new(url: &str, name: &str, prefix: &str) -> Publisher {
        Publisher {
            source: Mutex::new(Source::Own {
                url: url.to_string(),
                name: name.to_string(),
                conn: None,
            }),
            channel: Mutex::new(None),
            prefix: prefix.to_string(),
            declared: Mutex::new(HashSet::new()),
            queue_type: topology::QueueType::Classic,
            shards: topology::Shards::default(),
            ledger: None,
        }
    }

    /// A publisher on a channel of an existing connection (a worker's session). It does not
    /// reconnect: the session does.
    pub async fn on(conn: Arc<Connection>, prefix: &str) -> Result<Publisher, BrokerError> {
        let channel = conn
            .create_channel()
            .await
            .context("opening a publish channel")?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("enabling confirms")?;
        Ok(Publisher {
            source: Mutex::new(Source::Lent(conn)),
            channel: Mutex::new(Some(channel)),
            prefix: prefix.to_string(),
            declared: Mutex::new(HashSet::new()),
            queue_type: topology::QueueType::Classic,
            shards: topology::Shards::default(),
            ledger: None,
        })
    }

    /// This publisher, declaring the queues it publishes to as `kind` (classic unless
    /// told).
    pub fn with_queue_type(mut self, kind: topology::QueueType) -> Publisher {
        self.queue_type = kind;
        self
    }

    /// This publisher, spreading each queue's jobs over its shards (one each unless told).
    pub fn with_shards(mut self, shards: topology::Shards) -> Publisher {
        self.shards = shards;
        self
    }

    /// This publisher, recording each queue's shard count in `store` before it declares the
    /// shards, and reading it there to find leftover shards.
    pub fn with_ledger(mut self, store: crate::store::Store) -> Publisher {
        self.ledger = Some(store);
        self
    }

    /// Each queue's shard count this publisher routes by.
    pub fn shards(&self) -> &topology::Shards {
        &self.shards
    }

    /// The deployment's prefix this publisher routes by.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The broker names of `queue` in this publisher's deployment, with its shards.
    pub fn names(&self, queue: &str) -> Arc<QueueNames> {
        QueueNames::shared_sharded(&self.prefix, queue, self.shards.of(queue))
    }

    /// The open channel, opening a connection first if this publisher owns one.
    async fn channel(&self) -> Result<Channel, BrokerError> {
        let mut slot = self.channel.lock().await;
        if let Some(ch) = slot.as_ref()
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        let mut source = self.source.lock().await;
        let Source::Own { url, name, conn } = &mut *source else {
            return Err(BrokerError::Disconnected);
        };
        if conn.as_ref().is_none_or(|c| !c.status().connected()) {
            if conn.is_some() {
                // The connection this publisher had is gone: the next attempt starts from
                // the address after the one it was on.
                super::lost(url);
            }
            *conn = Some(Box::new(super::connect(url, name).await?));
        }
        let Some(c) = conn.as_ref() else {
            return Err(BrokerError::Disconnected);
        };
        let ch = c
            .create_channel()
            .await
            .context("opening a publish channel")?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .context("enabling confirms")?;
        self.declared.lock().await.clear();
        *slot = Some(ch.clone());
        Ok(ch)
    }

    /// Declares, once per channel, the queues of every Apiary queue `messages` go to: a
    /// producer may publish before any worker or `apiary migrate` declared them.
    async fn declare_for(&self, messages: &[Outgoing]) -> Result<(), BrokerError> {
        let mut declared = self.declared.lock().await;
        for m in messages {
            let key = (m.names.work.clone(), m.names.shards);
            if declared.contains(&key) {
                continue;
            }
            let source = self.source.lock().await;
            let conn: &Connection = match &*source {
                Source::Own { conn: Some(c), .. } => c,
                Source::Lent(c) => c,
                Source::Own { conn: None, .. } => return Err(BrokerError::Disconnected),
            };
            if let Some(store) = &self.ledger {
                store
                    .record_shards(&m.names.work, m.names.shards)
                    .await
                    .map_err(|e| BrokerError::ShardRecord(std::sync::Arc::new(e)))?;
            }
            let ch = conn
                .create_channel()
                .await
                .context("opening a channel to declare queues")?;
            topology::declare(conn, &ch, &m.names, self.queue_type).await?;
            let _ = ch.close(200, "declared".into()).await;
            declared.insert(key);
        }
        Ok(())
    }

    /// The shards of `names` above its count that still exist: left over from a larger
    /// `shards=`, still holding messages that are the queue's. With a ledger, only the shards
    /// below the recorded count are looked for, and a count whose top shards were deleted is
    /// lowered; without one, or when Postgres cannot say, shards are probed upward until one
    /// is missing. Each probe is a passive declare on a throwaway channel (a missing queue
    /// closes it). Empty when the broker cannot be asked.
    pub async fn leftover_shards(&self, names: &QueueNames) -> Vec<u16> {
        let recorded = match &self.ledger {
            Some(store) => match store.recorded_shards(&names.work).await {
                Ok(n) => Some(n),
                Err(e) => {
                    tracing::warn!(queue = %names.work, error = %e, "could not read the recorded shard count; probing for leftover shards");
                    None
                }
            },
            None => None,
        };
        let upto = recorded.unwrap_or(topology::MAX_SHARDS);
        let mut found = Vec::new();
        for k in names.shards..upto {
            let Ok(ch) = self.throwaway_channel().await else {
                return found;
            };
            let exists = topology::exists(&ch, &names.shard_work(k)).await;
            let _ = ch.close(200, "probed".into()).await;
            if !exists {
                if let (Some(store), Some(from)) = (&self.ledger, recorded) {
                    tracing::info!(queue = %names.work, deleted_from = k, "leftover shards were deleted; no longer looking for them");
                    if let Err(e) = store.lower_shards(&names.work, from, k).await {
                        tracing::warn!(queue = %names.work, error = %e, "could not lower the recorded shard count");
                    }
                }
                break;
            }
            found.push(k);
        }
        found
    }

    /// A fresh channel on whichever connection this publisher uses, its own or a lent one.
    async fn throwaway_channel(&self) -> Result<Channel, BrokerError> {
        if matches!(&*self.source.lock().await, Source::Own { .. }) {
            self.ensure_connected().await?;
        }
        let source = self.source.lock().await;
        match &*source {
            Source::Own { conn: Some(c), .. } => c.create_channel().await,
            Source::Lent(c) => c.create_channel().await,
            Source::Own { conn: None, .. } => return Err(BrokerError::Disconnected),
        }
        .context("opening a channel")
    }

    /// A fresh channel on this publisher's own connection, for one-off work such as sweeping
    /// the dead-letter queue. The caller closes it.
    pub async fn open_channel(&self) -> Result<Channel, BrokerError> {
        self.ensure_connected().await?;
        let source = self.source.lock().await;
        match &*source {
            Source::Own { conn: Some(c), .. } => {
                c.create_channel().await.context("opening a channel")
            }
            _ => Err(BrokerError::Disconnected),
        }
    }

    /// Opens the channel if it is not open: readiness, and failing early.
    pub async fn ensure_connected(&self) -> Result<(), BrokerError> {
        self.channel().await.map(|_| ())
    }

    /// Whether the channel is open right now (for readiness).
    pub async fn is_connected(&self) -> bool {
        self.channel
            .lock()
            .await
            .as_ref()
            .is_some_and(|c| c.status().connected())
    }

    /// Publishes jobs, each to its queue's work queue or first delay tier, carrying the
    /// current span's trace context (`traceparent`) when there is one.
    pub async fn publish_jobs(&self, jobs: &[WireJob]) -> Result<(), BrokerError> {
        let trace = crate::telemetry::current_trace();
        self.publish_traced(jobs.iter().map(|j| (j, trace.as_ref())))
            .await
    }

    /// Publishes jobs as [`Publisher::publish_jobs`] does, each with its own trace context:
    /// jobs written together for several callers each continue their own caller's trace.
    pub async fn publish_traced<'a>(
        &self,
        jobs: impl IntoIterator<Item = (&'a WireJob, Option<&'a TraceContext>)>,
    ) -> Result<(), BrokerError> {
        let out: Vec<Outgoing> = jobs
            .into_iter()
            .map(|(j, trace)| {
                let mut m = Outgoing::job(&self.prefix, j, &self.shards);
                if let (Some(t), Some(h)) = (trace, m.headers.as_mut()) {
                    t.write_headers(h);
                }
                m
            })
            .collect();
        self.publish(&out).await
    }

    /// Publishes persistent messages and waits for every confirm.
    pub async fn publish(&self, messages: &[Outgoing]) -> Result<(), BrokerError> {
        if messages.is_empty() {
            return Ok(());
        }
        let channel = self.channel().await?;
        self.declare_for(messages).await?;
        let result =
            match tokio::time::timeout(CONFIRM_TIMEOUT, publish_on(&channel, messages)).await {
                Ok(r) => r,
                Err(_) => Err(BrokerError::Timeout(CONFIRM_TIMEOUT)),
            };
        if result.is_err() && !channel.status().connected() {
            // Forget the dead channel so the next call opens a new one.
            *self.channel.lock().await = None;
        }
        result
    }
}

/// Writes every message, then awaits every confirm.
async fn publish_on(channel: &Channel, messages: &[Outgoing]) -> Result<(), BrokerError> {
    let json: ShortString = "application/json".into();
    let mut pending = Vec::with_capacity(messages.len());
    for m in messages {
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(json.clone())
            .with_message_id(m.id.to_string().into())
            .with_priority(m.priority);
        if let Some(h) = &m.headers {
            props = props.with_headers(h.clone());
        }
        let confirm = channel
            .basic_publish(
                "".into(),
                m.queue.as_str().into(),
                BasicPublishOptions::default(),
                &m.body,
                props,
            )
            .await
            .context("publishing")?;
        pending.push(confirm);
    }
    let mut nacked = 0;
    for confirm in pending {
        let c = confirm.await.context("waiting for a publisher confirm")?;
        if !c.is_ack() {
            nacked += 1;
        }
    }
    if nacked > 0 {
        Err(BrokerError::Nacked(nacked))
    } else {
        Ok(())
    }
}
