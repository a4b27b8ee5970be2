//! ④ Receiving deliveries, and acknowledging them in as few frames as possible.
//!
//! Every delivery is tracked from arrival to settlement by one [`Acks`] task per channel.
//! Settled deliveries below the oldest unsettled one are acknowledged with a single
//! multiple-ack; the rest one by one. Delivery tags belong to a channel, so when the channel
//! dies its `Acks` dies with it and late settlements are dropped: the broker has already
//! requeued those messages, and the claim keeps their second run from repeating an effect.

use std::collections::BTreeSet;

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::mpsc;

/// How a delivery is settled.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Done with it: remove it from the queue.
    Ack,
    /// Not done: put it back so another consumer takes it now.
    Requeue,
}

enum Cmd {
    Track(u64),
    Settle(u64, Settle),
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The handle through which a channel's deliveries are tracked and settled. Cheap to clone.
/// The consume loop tracks each delivery as it arrives; whoever finishes with it settles it.
///
/// See the crate's [guarantees](crate#guarantees).
#[derive(Clone)]
pub struct Acks {
    tx: mpsc::UnboundedSender<Cmd>,
}

impl Acks {
    /// Starts the settling task for `channel`. It ends when every handle is dropped.
    pub fn spawn(channel: Channel) -> (Acks, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(channel, rx));
        (Acks { tx }, task)
    }

    /// Records that `tag` arrived and is not settled yet.
    pub fn track(&self, tag: u64) {
        // The task outlives every handle, so a send fails only once the channel is gone.
        let _ = self.tx.send(Cmd::Track(tag));
    }

    /// Settles `tag`.
    pub fn settle(&self, tag: u64, how: Settle) {
        let _ = self.tx.send(Cmd::Settle(tag, how));
    }

    /// Returns once every settlement sent before it has been written to the channel.
    pub async fn flush(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Cmd::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

async fn run(channel: Channel, mut rx: mpsc::UnboundedReceiver<Cmd>) {
    let mut outstanding: BTreeSet<u64> = BTreeSet::new();
    let mut acks: Vec<u64> = Vec::new();
    let mut requeues: Vec<u64> = Vec::new();
    let mut broken = false;
    let mut flushed: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        // Take everything already queued, so one pass settles a whole burst.
        while let Some(cmd) = next {
            match cmd {
                Cmd::Track(tag) => {
                    outstanding.insert(tag);
                }
                Cmd::Settle(tag, how) => {
                    if outstanding.remove(&tag) {
                        match how {
                            Settle::Ack => acks.push(tag),
                            Settle::Requeue => requeues.push(tag),
                        }
                    }
                }
                Cmd::Flush(done) => flushed.push(done),
            }
            next = rx.try_recv().ok();
        }
        settle(
            &channel,
            &outstanding,
            &mut acks,
            &mut requeues,
            &mut broken,
        )
        .await;
        for done in flushed.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Writes one pass's settlements: requeues, then acks in as few frames as possible.
async fn settle(
    channel: &Channel,
    outstanding: &BTreeSet<u64>,
    acks: &mut Vec<u64>,
    requeues: &mut Vec<u64>,
    broken: &mut bool,
) {
    {
        if *broken {
            acks.clear();
            requeues.clear();
            return;
        }
        // Requeues first: a multiple-ack sent before them would cover and lose them.
        for tag in requeues.drain(..) {
            let opts = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            if let Err(e) = channel.basic_nack(tag, opts).await {
                *broken = true;
                tracing::debug!(error = %e, "cannot requeue: channel closed; the broker requeues it");
            }
        }
        if acks.is_empty() || *broken {
            acks.clear();
            return;
        }
        acks.sort_unstable();
        let floor = outstanding.first().copied().unwrap_or(u64::MAX);
        // Every tag below `floor` is settled, so one multiple-ack at the highest settled tag
        // below it acknowledges exactly this pass's acks there.
        let split = acks.partition_point(|t| *t < floor);
        let mut frames: Vec<(u64, bool)> = Vec::with_capacity(1 + acks.len() - split);
        if split > 0 {
            frames.push((acks[split - 1], split > 1));
        }
        frames.extend(acks[split..].iter().map(|t| (*t, false)));
        acks.clear();
        for (tag, multiple) in frames {
            if let Err(e) = channel.basic_ack(tag, BasicAckOptions { multiple }).await {
                *broken = true;
                tracing::debug!(error = %e, "cannot ack: channel closed; the broker requeues it");
                break;
            }
        }
    }
}
