//! The queues, all derived from one name so deployments sharing a broker stay apart:
//!
//! - `<queue>`: the work queue; producers publish here through the default exchange.
//! - `<queue>.delay.<ms>`: delay tiers. Each has a fixed message TTL and dead-letters expired
//!   messages back into the work queue, so a wait is durable in the broker and never in a
//!   worker's memory. Fixed per-queue TTLs keep expiry in arrival order, and tiers keep a long
//!   wait from blocking a short one behind it.
//! - `<queue>.dead`: dead letters, with the reason in the `x-apiary-reason` header.

use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};

use super::{BrokerError, Context};

/// Delay tiers in milliseconds, finest first. A wait uses the longest tier that does not
/// overshoot it, then another, until it is due.
pub const DELAY_TIERS_MS: [u64; 7] = [100, 1_000, 5_000, 25_000, 120_000, 600_000, 3_600_000];

/// The broker names of one deployment.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueNames {
    /// The work queue.
    pub work: String,
    /// The dead-letter queue.
    pub dead: String,
}

impl QueueNames {
    /// The names derived from the work queue's name.
    pub fn new(queue: &str) -> Self {
        QueueNames {
            work: queue.to_string(),
            dead: format!("{queue}.dead"),
        }
    }

    /// The delay queue of a tier.
    pub fn delay(&self, tier_ms: u64) -> String {
        format!("{}.delay.{tier_ms}", self.work)
    }

    /// Every queue name, for declaring and deleting.
    pub fn all(&self) -> Vec<String> {
        let mut names = vec![self.work.clone(), self.dead.clone()];
        names.extend(DELAY_TIERS_MS.iter().map(|t| self.delay(*t)));
        names
    }

    /// Where a message due in `remaining_ms` goes next: the longest tier that does not
    /// overshoot, or the work queue when the wait is shorter than the finest tier.
    pub fn next_hop(&self, remaining_ms: i64) -> String {
        match tier_for(remaining_ms) {
            Some(tier) => self.delay(tier),
            None => self.work.clone(),
        }
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
    /// Its arguments (a delay tier's TTL and dead-letter target; none for the others).
    pub args: FieldTable,
    /// What we are doing when declaring it, for errors.
    pub declaring: &'static str,
}

/// Every queue of a deployment with the arguments it is declared with: the work queue, the
/// dead-letter queue, then the delay tiers, finest first.
pub fn specs(names: &QueueNames) -> Vec<QueueSpec> {
    let mut out = vec![
        QueueSpec {
            name: names.work.clone(),
            args: FieldTable::default(),
            declaring: "declaring the work queue",
        },
        QueueSpec {
            name: names.dead.clone(),
            args: FieldTable::default(),
            declaring: "declaring the dead-letter queue",
        },
    ];
    for tier in DELAY_TIERS_MS {
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(tier as i64));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(names.work.as_str().into()),
        );
        out.push(QueueSpec {
            name: names.delay(tier),
            args,
            declaring: "declaring a delay queue",
        });
    }
    out
}

/// The options every queue is declared with.
pub fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Declares every queue, durable. Idempotent: declaring an existing queue with the same
/// arguments is a no-op, so `migrate`, workers and producers may all call it.
pub async fn declare(channel: &Channel, names: &QueueNames) -> Result<(), BrokerError> {
    for spec in specs(names) {
        channel
            .queue_declare(spec.name.as_str().into(), durable(), spec.args)
            .await
            .context(spec.declaring)?;
    }
    Ok(())
}

/// Messages ready in each of a deployment's queues, as the broker counts them.
///
/// See the crate's [guarantees](crate#guarantees).
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

/// Reads the depths with passive declares (which also fail if a queue is missing).
pub async fn depths(channel: &Channel, names: &QueueNames) -> Result<QueueDepths, BrokerError> {
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
    let work = count(names.work.clone()).await?;
    let mut d = QueueDepths {
        ready: work.message_count(),
        consumers: work.consumer_count(),
        ..QueueDepths::default()
    };
    d.dead = count(names.dead.clone()).await?.message_count();
    for tier in DELAY_TIERS_MS {
        d.delayed += count(names.delay(tier)).await?.message_count();
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
    fn names_derive_from_the_queue() {
        let n = QueueNames::new("q1");
        assert_eq!(n.dead, "q1.dead");
        assert_eq!(n.next_hop(30_000), "q1.delay.25000");
        assert_eq!(n.next_hop(10), "q1");
        assert_eq!(n.all().len(), 2 + DELAY_TIERS_MS.len());
    }
}
