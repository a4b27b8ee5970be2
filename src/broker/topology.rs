//! The broker queues of one Apiary queue, all derived from the deployment's prefix
//! (`APIARY_QUEUE`) and the queue's name, so deployments sharing a broker stay apart. For the
//! `default` queue the names are those of the single queue of earlier versions, so raw
//! producers and jobs already waiting keep working:
//!
//! | | `default` | any other queue `<q>` |
//! |---|---|---|
//! | work queue (producers publish here) | `<prefix>` | `<prefix>:<q>` |
//! | delay tier of `<ms>` | `<prefix>.delay.<ms>` | `<prefix>:<q>:delay:<ms>` |
//! | dead letters | `<prefix>.dead` | `<prefix>:<q>:dead` |
//!
//! A queue name cannot hold `:`, so no queue's names can collide with another's.
//!
//! ## Shards
//!
//! A queue with `shards=N` (`APIARY_QUEUE_OPTIONS`, default 1) spreads its messages over N
//! work queues. Shard 0 keeps the names above, so a queue with one shard is exactly the
//! queue of earlier versions and raw producers publishing to `<work>` keep working. Shard
//! `k` (1 to N-1) has its own work queue and its own delay tiers:
//!
//! | | `default` | any other queue `<q>` |
//! |---|---|---|
//! | work queue of shard `k` | `<prefix>~<k>` | `<prefix>:<q>~<k>` |
//! | delay tier of shard `k` | `<prefix>~<k>.delay.<ms>` | `<prefix>:<q>~<k>:delay:<ms>` |
//!
//! A queue name cannot hold `~` either, and the `default` queue's names hold no `:`, so
//! within a deployment no shard's name is another queue's (across deployments, a prefix
//! chosen as another's `<prefix>~1` would collide, as one chosen as `<prefix>.dead` already
//! would). The dead-letter queue stays one per queue:
//! a dead letter waits for an operator, not a worker, and needs no spreading.
//!
//! - A job goes to shard `fnv1a64(key) % N`, where the key is its `concurrency_key`'s bytes
//!   when it has one (so one key's jobs all stay on one shard, behind one another), else its
//!   id's 16 bytes ([`shard_of`]). The hash is fixed, so every producer and worker agrees.
//! - Each shard has its own delay tiers, dead-lettering back into that shard's work queue,
//!   so a retry or a scheduled job comes back through the shard it was routed to. The
//!   alternative, tiers shared per queue dead-lettering through an exchange that routes by
//!   a shard header, would drop a message whose shard was removed meanwhile (nothing bound
//!   for it); a tier of its own has nowhere to go but its shard.
//! - Changing N never strands a message: a shard above N that still exists is consumed by
//!   workers too, and counted in the depths, until an operator deletes it. Every process
//!   records a queue's count in Postgres before declaring its shards
//!   ([`crate::store::shards`]), so the leftover shards are looked for only between the
//!   current count and the largest ever recorded
//!   ([`crate::broker::Publisher::leftover_shards`]), never by probing for shards that were
//!   never made. A message drained from it is routed by the current N when
//!   it has to wait again. Shards are never deleted by Apiary: a removed shard's tiers may
//!   still hold messages bound for its work queue.
//! - Quorum shards 1 to N-1 are declared with `x-queue-leader-locator: balanced` (RabbitMQ
//!   3.10 and later; `client-local` is the default, which would put every shard's leader on
//!   the node the declaring worker happens to be connected to). Shard 0 is declared as
//!   before: adding an argument to an existing queue would make RabbitMQ refuse its
//!   declaration (406).
//!
//! - Every queue is durable, never exclusive or auto-delete, and of the type
//!   `APIARY_QUEUE_TYPE` names ([`QueueType`]), given as `x-queue-type`.
//! - A classic work queue is declared with `x-max-priority` ([`MAX_PRIORITY`]): RabbitMQ
//!   delivers higher priorities first. A work queue declared by an older version without it is
//!   used as it is (priorities are then ignored for it; the worker logs it and `apiary doctor`
//!   warns).
//! - A quorum work queue has no priorities: RabbitMQ 3.x refuses `x-max-priority` on a quorum
//!   queue (406 PRECONDITION_FAILED, "invalid arg 'x-max-priority'"), so it is declared
//!   without, jobs are delivered in arrival order whatever their priority, and the worker says
//!   so once when it starts. Instead it gets `x-delivery-limit` ([`DELIVERY_LIMIT`]), a second
//!   poison guard beside the claim's attempt count: a message returned to the queue that many
//!   times (say, because it kills every worker that takes it before its claim) is
//!   dead-lettered by the broker into the dead-letter queue rather than delivered again.
//!   Delay tiers dead-letter `at-least-once` (with `x-overflow: reject-publish`, which that
//!   needs), so a message due again is never dropped between a tier and the work queue.
//! - A queue's type cannot change once it exists: declaring it with the other type is refused
//!   (406), which [`declare`] reports as [`BrokerError::QueueTypeMismatch`], naming the queue,
//!   its type and `APIARY_QUEUE_TYPE`. `apiary migrate-queues --to quorum` (module
//!   [`migrate`](super::migrate)) moves a deployment's queues from one type to the other.
//! - Delay tiers each have a fixed message TTL and dead-letter expired messages back into the
//!   work queue, so a wait is durable in the broker and never in a worker's memory. Fixed
//!   per-queue TTLs keep expiry in arrival order, and tiers keep a long wait from blocking a
//!   short one behind it. A message keeps its priority through them.
//! - Dead letters carry the reason in the `x-apiary-reason` header.

use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};

use super::{BrokerError, Context};

/// Delay tiers in milliseconds, finest first. A wait uses the longest tier that does not
/// overshoot it, then another, until it is due.
pub const DELAY_TIERS_MS: [u64; 7] = [100, 1_000, 5_000, 25_000, 120_000, 600_000, 3_600_000];

/// The highest message priority a work queue is declared with (`x-max-priority`): jobs carry
/// 0 to 9.
pub const MAX_PRIORITY: u8 = crate::job::MAX_PRIORITY;

/// A quorum work queue's `x-delivery-limit`: deliveries of one message before the broker
/// dead-letters it. As high as a job's most attempts ([`crate::job::MAX_ATTEMPTS_LIMIT`]),
/// because every return counts, not only crashes: a drain hands its prefetched messages back,
/// a rate-limited queue hands back what it may not start yet, a Postgres outage hands back
/// what cannot be claimed. A job's own attempts stay guarded by the claim; this only stops a
/// message that never gets that far from circling for ever.
pub const DELIVERY_LIMIT: i64 = crate::job::MAX_ATTEMPTS_LIMIT as i64;

/// The most shards one queue may have (`shards=`). With the suffix `~63` a broker name
/// stays within RabbitMQ's 255 bytes (see [`crate::config::MAX_PREFIX_BYTES`]).
pub const MAX_SHARDS: u16 = 64;

/// The kind of RabbitMQ queue a deployment's queues are (`APIARY_QUEUE_TYPE`).
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum QueueType {
    /// Classic queues: priorities honoured. The default.
    #[default]
    Classic,
    /// Quorum queues: replicated by Raft across the cluster's nodes, so a queue survives the
    /// loss of a minority of them; no priorities on RabbitMQ 3.x.
    Quorum,
}

impl QueueType {
    /// The name RabbitMQ and `APIARY_QUEUE_TYPE` use: `classic` or `quorum`.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }

    /// Parses `classic` or `quorum`.
    pub fn parse(s: &str) -> Option<QueueType> {
        match s.trim() {
            "classic" => Some(QueueType::Classic),
            "quorum" => Some(QueueType::Quorum),
            _ => None,
        }
    }

    /// The `x-queue-type` argument.
    fn arg(self) -> AMQPValue {
        AMQPValue::LongString(self.as_str().into())
    }
}

impl std::fmt::Display for QueueType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The broker names of one Apiary queue of one deployment.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueNames {
    /// The Apiary queue's name (`default`, `emails`, ...).
    pub queue: String,
    /// The work queue.
    pub work: String,
    /// The dead-letter queue.
    pub dead: String,
    /// What a delay tier's name starts with; the tier's milliseconds follow.
    delay_prefix: String,
    /// How many work queues the queue is spread over (`shards=`, at least 1). Shard 0 is
    /// [`QueueNames::work`].
    pub shards: u16,
}

impl QueueNames {
    /// The names of the `default` queue of the deployment whose prefix is `prefix`: the
    /// names of earlier versions' single queue.
    pub fn new(prefix: &str) -> Self {
        QueueNames::for_queue(prefix, crate::job::DEFAULT_QUEUE)
    }

    /// The names of `queue` in the deployment whose prefix is `prefix`.
    pub fn for_queue(prefix: &str, queue: &str) -> Self {
        if queue == crate::job::DEFAULT_QUEUE {
            QueueNames {
                queue: queue.to_string(),
                work: prefix.to_string(),
                dead: format!("{prefix}.dead"),
                delay_prefix: format!("{prefix}.delay."),
                shards: 1,
            }
        } else {
            QueueNames {
                queue: queue.to_string(),
                work: format!("{prefix}:{queue}"),
                dead: format!("{prefix}:{queue}:dead"),
                delay_prefix: format!("{prefix}:{queue}:delay:"),
                shards: 1,
            }
        }
    }

    /// These names spread over `shards` work queues (at least 1, at most [`MAX_SHARDS`]).
    pub fn with_shards(mut self, shards: u16) -> Self {
        self.shards = shards.clamp(1, MAX_SHARDS);
        self
    }

    /// The names of `queue` in `prefix`'s deployment with one shard, shared.
    pub fn shared(prefix: &str, queue: &str) -> std::sync::Arc<QueueNames> {
        QueueNames::shared_sharded(prefix, queue, 1)
    }

    /// The names of `queue` in `prefix`'s deployment over `shards` work queues, shared: every
    /// message carries its queue's names, and one copy per queue serves them all.
    pub fn shared_sharded(prefix: &str, queue: &str, shards: u16) -> std::sync::Arc<QueueNames> {
        use std::collections::HashMap;
        use std::sync::{Arc, Mutex, OnceLock};
        // By prefix, then queue: a lookup borrows both names and allocates nothing, which
        // matters on the publish path, where every message asks.
        type Cache = Mutex<HashMap<String, HashMap<String, Arc<QueueNames>>>>;
        static CACHE: OnceLock<Cache> = OnceLock::new();
        // Bounded: queue names come from producers, so an endless variety must not grow it.
        const MAX: usize = 4096;
        let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        let fresh = || Arc::new(QueueNames::for_queue(prefix, queue).with_shards(shards));
        let Ok(mut map) = cache.lock() else {
            return fresh();
        };
        // A different shard count replaces the cached copy: the last configuration wins.
        if let Some(n) = map.get(prefix).and_then(|q| q.get(queue))
            && n.shards == shards.clamp(1, MAX_SHARDS)
        {
            return n.clone();
        }
        if map.values().map(HashMap::len).sum::<usize>() >= MAX {
            map.clear();
        }
        let n = fresh();
        map.entry(prefix.to_string())
            .or_default()
            .insert(queue.to_string(), n.clone());
        n
    }

    /// Shard 0's delay queue of a tier.
    pub fn delay(&self, tier_ms: u64) -> String {
        self.shard_delay(0, tier_ms)
    }

    /// The work queue of shard `k`: [`QueueNames::work`] for shard 0, `<work>~<k>` for the
    /// others (see the module docs). `k` may be above [`QueueNames::shards`]: a shard left
    /// over from a larger count.
    pub fn shard_work(&self, k: u16) -> String {
        if k == 0 {
            self.work.clone()
        } else {
            format!("{}~{k}", self.work)
        }
    }

    /// Shard `k`'s delay queue of a tier.
    pub fn shard_delay(&self, k: u16, tier_ms: u64) -> String {
        if k == 0 {
            format!("{}{tier_ms}", self.delay_prefix)
        } else if self.queue == crate::job::DEFAULT_QUEUE {
            format!("{}~{k}.delay.{tier_ms}", self.work)
        } else {
            format!("{}~{k}:delay:{tier_ms}", self.work)
        }
    }

    /// Every shard's work queue, shard 0 first.
    pub fn work_queues(&self) -> Vec<String> {
        (0..self.shards).map(|k| self.shard_work(k)).collect()
    }

    /// Every queue of shard `k`: its work queue, then its delay tiers, finest first.
    pub fn shard_queues(&self, k: u16) -> Vec<String> {
        let mut names = vec![self.shard_work(k)];
        names.extend(DELAY_TIERS_MS.iter().map(|t| self.shard_delay(k, *t)));
        names
    }

    /// Every queue name, for declaring and deleting: shard 0's work queue, the dead-letter
    /// queue, shard 0's tiers, then the other shards' queues.
    pub fn all(&self) -> Vec<String> {
        let mut names = vec![self.work.clone(), self.dead.clone()];
        names.extend(DELAY_TIERS_MS.iter().map(|t| self.delay(*t)));
        for k in 1..self.shards {
            names.extend(self.shard_queues(k));
        }
        names
    }

    /// The shard a job goes to: see [`shard_of`].
    pub fn shard_for(&self, job: &crate::wire::WireJob) -> u16 {
        shard_of(job.id, job.concurrency_key.as_deref(), self.shards)
    }

    /// Shard 0's next hop: see [`QueueNames::next_hop_in`].
    pub fn next_hop(&self, remaining_ms: i64) -> String {
        self.next_hop_in(0, remaining_ms)
    }

    /// Where a message of shard `k` due in `remaining_ms` goes next: the shard's longest
    /// tier that does not overshoot, or its work queue when the wait is shorter than the
    /// finest tier.
    pub fn next_hop_in(&self, k: u16, remaining_ms: i64) -> String {
        match tier_for(remaining_ms) {
            Some(tier) => self.shard_delay(k, tier),
            None => self.shard_work(k),
        }
    }
}

/// The shard of `shards` a job goes to: FNV-1a (64 bits) of its concurrency key's UTF-8
/// bytes when it has one, so every job of a key lands on the same shard, else of its id's 16
/// bytes, modulo `shards`. Stable across versions and processes: producers and workers with
/// the same `shards=` agree without talking, and a producer in another language can do the
/// same arithmetic.
pub fn shard_of(id: crate::job::JobId, concurrency_key: Option<&str>, shards: u16) -> u16 {
    if shards <= 1 {
        return 0;
    }
    let hash = match concurrency_key {
        Some(key) => fnv1a64(key.as_bytes()),
        None => fnv1a64(id.as_bytes()),
    };
    // The remainder is below `shards`, a u16.
    (hash % u64::from(shards)) as u16
}

/// FNV-1a, 64 bits: tiny, fixed, and well spread for short keys.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Shard counts by queue (`shards=` of `APIARY_QUEUE_OPTIONS`); a queue not named has one.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shards(pub std::collections::HashMap<String, u16>);

impl Shards {
    /// How many shards `queue` has.
    pub fn of(&self, queue: &str) -> u16 {
        self.0.get(queue).copied().unwrap_or(1).clamp(1, MAX_SHARDS)
    }
}

/// The longest tier not longer than `remaining_ms`.
pub fn tier_for(remaining_ms: i64) -> Option<u64> {
    let remaining = u64::try_from(remaining_ms).ok()?;
    DELAY_TIERS_MS
        .iter()
        .rev()
        .copied()
        .find(|t| *t <= remaining)
}

/// One queue as Apiary declares it: durable, with these arguments.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone)]
pub struct QueueSpec {
    /// Its name.
    pub name: String,
    /// Its arguments (the work queue's priority levels, a delay tier's TTL and dead-letter
    /// target; none for the dead-letter queue).
    pub args: FieldTable,
    /// What we are doing when declaring it, for errors.
    pub declaring: &'static str,
}

/// Every queue of a deployment with the arguments it is declared with as `kind`: the work
/// queue, the dead-letter queue, then the delay tiers, finest first; then each further
/// shard's work queue and tiers.
pub fn specs(names: &QueueNames, kind: QueueType) -> Vec<QueueSpec> {
    let mut dead = FieldTable::default();
    dead.insert("x-queue-type".into(), kind.arg());
    let mut out = vec![
        QueueSpec {
            name: names.work.clone(),
            args: work_args(names, kind),
            declaring: "declaring the work queue",
        },
        QueueSpec {
            name: names.dead.clone(),
            // No delivery limit here even for quorum: a dead-letter sweep requeues the
            // letters it keeps, and a limit would drop them after enough sweeps.
            args: dead,
            declaring: "declaring the dead-letter queue",
        },
    ];
    out.extend(tier_specs(names, 0, kind));
    for k in 1..names.shards {
        out.push(QueueSpec {
            name: names.shard_work(k),
            args: shard_work_args(names, k, kind),
            declaring: "declaring a shard's work queue",
        });
        out.extend(tier_specs(names, k, kind));
    }
    out
}

/// The specs of shard `k`'s delay tiers, finest first: each dead-letters into the shard's
/// own work queue.
fn tier_specs(names: &QueueNames, k: u16, kind: QueueType) -> Vec<QueueSpec> {
    let mut out = Vec::with_capacity(DELAY_TIERS_MS.len());
    for tier in DELAY_TIERS_MS {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), kind.arg());
        if kind == QueueType::Quorum {
            // At-most-once (the default) may drop a message whose move to the work queue
            // fails; at-least-once retries it, and RabbitMQ requires reject-publish for it.
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
            if k > 0 {
                balance_leaders(&mut args);
            }
        }
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(tier as i64));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(names.shard_work(k).as_str().into()),
        );
        out.push(QueueSpec {
            name: names.shard_delay(k, tier),
            args,
            declaring: "declaring a delay queue",
        });
    }
    out
}

/// Asks RabbitMQ to place a new quorum queue's leader on the node with the fewest leaders
/// (`balanced`, RabbitMQ 3.10 and later), so a queue's shards spread over the cluster. Only
/// for queues earlier versions never declared: an existing queue declared with an argument
/// it lacks is refused.
fn balance_leaders(args: &mut FieldTable) {
    args.insert(
        "x-queue-leader-locator".into(),
        AMQPValue::LongString("balanced".into()),
    );
}

/// The arguments of shard `k`'s work queue: shard 0's are [`work_args`]; a further quorum
/// shard also asks for a balanced leader.
pub fn shard_work_args(names: &QueueNames, k: u16, kind: QueueType) -> FieldTable {
    let mut args = work_args(names, kind);
    if k > 0 && kind == QueueType::Quorum {
        balance_leaders(&mut args);
    }
    args
}

/// The options every queue is declared with.
pub fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// The work queue's arguments: for a classic queue, priority levels 0 to [`MAX_PRIORITY`];
/// for a quorum queue, the [`DELIVERY_LIMIT`], past which the broker moves a message to the
/// dead-letter queue (rather than dropping it, as it would without a dead-letter target).
pub fn work_args(names: &QueueNames, kind: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), kind.arg());
    match kind {
        QueueType::Classic => {
            args.insert(
                "x-max-priority".into(),
                AMQPValue::ShortShortUInt(MAX_PRIORITY),
            );
        }
        QueueType::Quorum => {
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(DELIVERY_LIMIT),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString("".into()),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(names.dead.as_str().into()),
            );
        }
    }
    args
}

/// The arguments of a classic work queue declared by a version before priorities: the
/// queue type alone.
pub fn work_args_without_priorities() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), QueueType::Classic.arg());
    args
}

/// How a work queue turned out when declared.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    /// With priority levels.
    WithPriorities,
    /// It already existed without them (declared by a version before queues had
    /// priorities): it is used as it is, and priorities are ignored for it.
    WithoutPriorities,
    /// A quorum queue: no priorities on RabbitMQ 3.x, by design (see the module docs).
    Quorum,
}

/// Declares every queue of `names`, durable, as `kind`. Idempotent: declaring an existing
/// queue with the same arguments is a no-op, so `migrate`, workers and producers may all call
/// it.
///
/// A work queue that already exists with other arguments makes RabbitMQ refuse the
/// declaration and close the channel (406 PRECONDITION_FAILED; a queue's arguments cannot be
/// changed). That is found out on a throwaway channel of `conn` first, so `channel` stays open
/// when the answer is only that a classic queue has no priority levels. A queue of the other
/// type is [`BrokerError::QueueTypeMismatch`].
pub async fn declare(
    conn: &lapin::Connection,
    channel: &Channel,
    names: &QueueNames,
    kind: QueueType,
) -> Result<Declared, BrokerError> {
    let mut without = std::collections::HashSet::new();
    let mut declared = None;
    for k in 0..names.shards {
        let d = declare_work(conn, names, k, kind).await?;
        if d == Declared::WithoutPriorities {
            without.insert(names.shard_work(k));
        }
        // Shard 0 answers for the queue: further shards are always new.
        declared.get_or_insert(d);
    }
    for spec in specs(names, kind) {
        let args = if without.contains(&spec.name) {
            work_args_without_priorities()
        } else {
            spec.args
        };
        let result = channel
            .queue_declare(spec.name.as_str().into(), durable(), args)
            .await;
        if let Err(e) = result {
            return Err(mismatch_or(conn, names, &spec.name, kind, e, spec.declaring).await);
        }
    }
    Ok(declared.unwrap_or(Declared::WithPriorities))
}

/// Declares shard `k`'s work queue on a channel of its own, falling back to a classic queue
/// as it exists when RabbitMQ refuses its priority levels.
async fn declare_work(
    conn: &lapin::Connection,
    names: &QueueNames,
    k: u16,
    kind: QueueType,
) -> Result<Declared, BrokerError> {
    let work = names.shard_work(k);
    let probe = conn
        .create_channel()
        .await
        .context("opening a channel to declare a work queue")?;
    let result = probe
        .queue_declare(
            work.as_str().into(),
            durable(),
            shard_work_args(names, k, kind),
        )
        .await;
    let e = match result {
        Ok(_) => {
            let _ = probe.close(200, "declared".into()).await;
            return Ok(match kind {
                QueueType::Classic => Declared::WithPriorities,
                QueueType::Quorum => Declared::Quorum,
            });
        }
        Err(e) if is_precondition_failed(&e) => e,
        Err(e) => return Err(e).context("declaring the work queue"),
    };
    match mismatch_or(conn, names, &work, kind, e, "declaring the work queue").await {
        mismatch @ BrokerError::QueueTypeMismatch { .. } => Err(mismatch),
        _ if kind == QueueType::Classic => {
            tracing::warn!(
                queue = %work,
                "the work queue exists without priority levels (declared by an earlier Apiary); using it as it is, so priorities are ignored for it"
            );
            Ok(Declared::WithoutPriorities)
        }
        other => Err(other),
    }
}

/// Whether `queue` exists, by a passive declare on `channel`, which the broker closes when
/// the answer is no.
pub async fn exists(channel: &Channel, queue: &str) -> bool {
    let passive = QueueDeclareOptions {
        passive: true,
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .is_ok()
}

/// The type `queue` (one of `names`) exists with, found by declaring it as Apiary declares
/// each type, each on a throwaway channel (a refusal closes it): the one accepted is its type.
/// `None` if it matches neither, or cannot be asked.
pub async fn probe_type(
    conn: &lapin::Connection,
    names: &QueueNames,
    queue: &str,
) -> Option<QueueType> {
    for kind in [QueueType::Classic, QueueType::Quorum] {
        let mut candidates: Vec<FieldTable> = specs(names, kind)
            .into_iter()
            .filter(|s| s.name == queue)
            .map(|s| s.args)
            .collect();
        if kind == QueueType::Classic && names.work_queues().iter().any(|w| w == queue) {
            candidates.push(work_args_without_priorities());
        }
        for args in candidates {
            let ch = conn.create_channel().await.ok()?;
            if ch
                .queue_declare(queue.into(), durable(), args)
                .await
                .is_ok()
            {
                let _ = ch.close(200, "probed".into()).await;
                return Some(kind);
            }
        }
    }
    None
}

/// The type a refused declaration says the queue has, when the refusal names
/// `x-queue-type`: RabbitMQ 3.10 answers `inequivalent arg 'x-queue-type' for queue 'q' in
/// vhost '/': received 'quorum' but current is 'classic'`. It names only the first argument
/// that differs, which is often another one: [`probe_type`] asks the broker instead.
pub fn existing_type(e: &lapin::Error) -> Option<String> {
    let lapin::ErrorKind::ProtocolError(amqp) = e.kind() else {
        return None;
    };
    let text = amqp.get_message().as_str();
    if amqp.get_id() != 406 || !text.contains("'x-queue-type'") {
        return None;
    }
    let current = text.rsplit("current is ").next().unwrap_or("");
    let current = current.strip_prefix("the value ").unwrap_or(current);
    Some(
        current
            .strip_prefix('\'')
            .and_then(|v| v.split('\'').next())
            .unwrap_or("classic")
            .to_string(),
    )
}

/// `e`, a refused declaration of `queue`, as [`BrokerError::QueueTypeMismatch`] if the queue
/// exists with another type than `kind`, else with `context`.
async fn mismatch_or(
    conn: &lapin::Connection,
    names: &QueueNames,
    queue: &str,
    kind: QueueType,
    e: lapin::Error,
    context: &'static str,
) -> BrokerError {
    let existing = if is_precondition_failed(&e) {
        match probe_type(conn, names, queue).await {
            Some(t) => Some(t.as_str().to_string()),
            None => existing_type(&e),
        }
    } else {
        None
    };
    match existing {
        Some(existing) if existing != kind.as_str() => BrokerError::QueueTypeMismatch {
            queue: queue.to_string(),
            existing,
            wanted: kind,
        },
        _ => BrokerError::Amqp { context, source: e },
    }
}

/// Whether RabbitMQ refused a declaration because the queue exists with other arguments.
pub fn is_precondition_failed(e: &lapin::Error) -> bool {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => amqp.get_id() == 406,
        _ => false,
    }
}

/// Whether `e` is the broker saying a queue does not exist (404 NOT_FOUND, as a passive
/// declare of a missing queue answers). The broker closes the channel with it.
pub fn is_not_found(e: &lapin::Error) -> bool {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => amqp.get_id() == 404,
        _ => false,
    }
}

/// Messages ready in each of a deployment's queues, as the broker counts them.
///
/// See the crate's [guarantees](crate#guarantees).
#[cfg_attr(feature = "api", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueDepths {
    /// Ready in the work queue.
    pub ready: u32,
    /// Consumers on the work queue.
    pub consumers: u32,
    /// Waiting in the delay tiers (scheduled jobs and retries).
    pub delayed: u32,
    /// In the dead-letter queue.
    pub dead: u32,
}

impl QueueDepths {
    /// Adds another queue's depths to these.
    pub fn add(&mut self, other: &QueueDepths) {
        self.ready += other.ready;
        self.consumers += other.consumers;
        self.delayed += other.delayed;
        self.dead += other.dead;
    }
}

/// Reads the depths of every shard of `names`, and of the `leftover` shards above them,
/// added up, with passive declares (which also fail if a queue is missing).
pub async fn depths(channel: &Channel, names: &QueueNames) -> Result<QueueDepths, BrokerError> {
    depths_with(channel, names, &[]).await
}

/// [`depths`], counting the `leftover` shards
/// ([`crate::broker::Publisher::leftover_shards`]) too.
pub async fn depths_with(
    channel: &Channel,
    names: &QueueNames,
    leftover: &[u16],
) -> Result<QueueDepths, BrokerError> {
    let passive = QueueDeclareOptions {
        passive: true,
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let count = |q: String| async move {
        channel
            .queue_declare(q.as_str().into(), passive, FieldTable::default())
            .await
            .context("reading a queue's depth")
    };
    let mut d = QueueDepths {
        dead: count(names.dead.clone()).await?.message_count(),
        ..QueueDepths::default()
    };
    for k in (0..names.shards).chain(leftover.iter().copied()) {
        let work = count(names.shard_work(k)).await?;
        d.ready += work.message_count();
        d.consumers += work.consumer_count();
        for tier in DELAY_TIERS_MS {
            d.delayed += count(names.shard_delay(k, tier)).await?.message_count();
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_never_overshoot() {
        assert_eq!(tier_for(50), None);
        assert_eq!(tier_for(100), Some(100));
        assert_eq!(tier_for(999), Some(100));
        assert_eq!(tier_for(1_000), Some(1_000));
        assert_eq!(tier_for(4 * 3_600_000), Some(3_600_000));
        assert_eq!(tier_for(-5), None);
    }

    #[test]
    fn each_type_declares_its_own_arguments() {
        let n = QueueNames::new("q1");
        let has = |args: &FieldTable, key: &str| args.inner().contains_key(key);
        for kind in [QueueType::Classic, QueueType::Quorum] {
            for spec in specs(&n, kind) {
                assert_eq!(
                    spec.args.inner().get("x-queue-type"),
                    Some(&AMQPValue::LongString(kind.as_str().into())),
                    "{}",
                    spec.name
                );
            }
        }
        let classic = work_args(&n, QueueType::Classic);
        assert!(has(&classic, "x-max-priority"));
        assert!(!has(&classic, "x-delivery-limit"));
        let quorum = work_args(&n, QueueType::Quorum);
        assert!(!has(&quorum, "x-max-priority"), "RabbitMQ 3.x refuses it");
        assert_eq!(
            quorum.inner().get("x-delivery-limit"),
            Some(&AMQPValue::LongLongInt(DELIVERY_LIMIT))
        );
        assert_eq!(
            quorum.inner().get("x-dead-letter-routing-key"),
            Some(&AMQPValue::LongString("q1.dead".into()))
        );
        let tiers = specs(&n, QueueType::Quorum);
        let tier = tiers
            .iter()
            .find(|s| s.name == n.delay(100))
            .expect("a tier");
        assert!(has(&tier.args, "x-dead-letter-strategy"));
        let dead = tiers.iter().find(|s| s.name == n.dead).expect("dead");
        assert!(
            !has(&dead.args, "x-delivery-limit"),
            "sweeps requeue dead letters"
        );
        assert_eq!(QueueType::parse("quorum"), Some(QueueType::Quorum));
        assert_eq!(QueueType::parse("stream"), None);
    }

    #[test]
    fn shards_have_names_of_their_own() {
        let d = QueueNames::new("p").with_shards(3);
        assert_eq!(d.work_queues(), ["p", "p~1", "p~2"]);
        assert_eq!(d.shard_delay(2, 100), "p~2.delay.100");
        assert_eq!(d.next_hop_in(1, 30_000), "p~1.delay.25000");
        assert_eq!(d.next_hop_in(1, 10), "p~1");
        assert_eq!(d.delay(100), "p.delay.100", "shard 0 keeps the old names");
        let n = QueueNames::for_queue("p", "emails").with_shards(2);
        assert_eq!(n.work_queues(), ["p:emails", "p:emails~1"]);
        assert_eq!(n.shard_delay(1, 100), "p:emails~1:delay:100");
        assert_eq!(n.all().len(), 2 * (1 + DELAY_TIERS_MS.len()) + 1);
        let all = n.all();
        let unique: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(unique.len(), all.len());
        // Every tier of a shard dead-letters into that shard.
        for spec in specs(&n, QueueType::Quorum) {
            if let Some(AMQPValue::LongString(to)) =
                spec.args.inner().get("x-dead-letter-routing-key")
                && spec.name.contains(":delay:")
            {
                let shard = if spec.name.contains("~1") { 1 } else { 0 };
                assert_eq!(to.to_string(), n.shard_work(shard), "{}", spec.name);
            }
            let balanced = spec.args.inner().contains_key("x-queue-leader-locator");
            assert_eq!(balanced, spec.name.contains("~1"), "{}", spec.name);
        }
        assert_eq!(QueueNames::new("p").with_shards(0).shards, 1);
        assert_eq!(QueueNames::new("p").with_shards(999).shards, MAX_SHARDS);
    }

    #[test]
    fn a_key_stays_on_one_shard_and_ids_spread() {
        let ids: Vec<crate::job::JobId> = (0..400).map(|_| uuid::Uuid::new_v4()).collect();
        let keyed: std::collections::HashSet<u16> = ids
            .iter()
            .map(|id| shard_of(*id, Some("acct-7"), 4))
            .collect();
        assert_eq!(keyed.len(), 1);
        let spread: std::collections::HashSet<u16> =
            ids.iter().map(|id| shard_of(*id, None, 4)).collect();
        assert_eq!(spread.len(), 4);
        assert!(ids.iter().all(|id| shard_of(*id, None, 1) == 0));
        // Fixed: FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c.
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn names_derive_from_the_queue() {
        let n = QueueNames::new("q1");
        assert_eq!(n.dead, "q1.dead");
        assert_eq!(n.next_hop(30_000), "q1.delay.25000");
        assert_eq!(n.next_hop(10), "q1");
        assert_eq!(n.all().len(), 2 + DELAY_TIERS_MS.len());
    }
}
