//! A shard: one thread on one core with everything the packet path touches (its own ring or
//! tokio runtime, channel sockets and core [`Relay`]). This module holds what a shard's loop runs
//! on ([`Shard`], handed over in a [`ShardStart`]), what the coordinator sends it
//! ([`ShardRequest`], through a [`ShardHandle`]) and what it answers ([`ShardStats`],
//! [`ShardDoc`]), whichever backend drives it.

use std::sync::Arc;

use relay_io::ring::EventFd;
use relay_proto::stats::GlobalHistograms;
use relay_proto::{
    ChannelId, ChannelStats, Command, ErrorCode, ErrorReply, GlobalStats, MonoTime, Relay, Response,
};
use tokio::sync::{mpsc, oneshot};

use crate::config::{Backend, RingConfig};
use crate::counters::BackendCounters;
use crate::snapshot::Publisher;
use crate::sockets::{BindConfig, SocketTable};

/// What a shard's thread runs: everything it needs, handed over at its start.
#[derive(Debug)]
pub struct ShardStart {
    /// Its index.
    pub index: u32,
    /// The core to pin it to.
    pub core: Option<usize>,
    /// Which backend drives it.
    pub backend: Backend,
    /// io_uring sizes.
    pub ring: RingConfig,
    /// The loop's state.
    pub shard: Shard,
    /// Where it says it is ready (with the ring's waker) or why it cannot start.
    pub ready: ReadyTx,
}

/// Where a starting shard says it is ready (with its ring's waker, io_uring only) or why it
/// cannot start.
pub type ReadyTx = std::sync::mpsc::Sender<Result<Option<Arc<EventFd>>, String>>;

/// A shard's thread body: [`crate::shard_main`], or a stand-in in tests of the relay's handling of a
/// failing shard.
pub type ShardBody = fn(ShardStart) -> std::io::Result<GlobalStats>;

/// A request from the control thread to the data plane.
#[derive(Debug)]
pub enum ShardRequest {
    /// Execute a control command and send back its reply.
    Command {
        /// The command.
        command: Command,
        /// Where the reply goes.
        reply: oneshot::Sender<Result<Response, ErrorReply>>,
    },
    /// Send back this shard's global and per-channel statistics (for `/stats`), and for the
    /// relay-wide `stats`, its histograms.
    Snapshot {
        /// Where the statistics go.
        reply: oneshot::Sender<ShardDoc>,
    },
    /// Stop: reply with the final statistics.
    Shutdown {
        /// Where the final statistics go.
        reply: oneshot::Sender<ShardStats>,
    },
}

/// One shard's statistics with the histograms behind their percentiles, so that several shards'
/// can be merged exactly ([`relay_proto::merge_global`]).
#[derive(Debug)]
pub struct ShardStats {
    /// The shard's global statistics.
    pub stats: GlobalStats,
    /// Its global histograms.
    pub hist: Box<GlobalHistograms>,
}

/// What one shard reports for `/stats`.
#[derive(Debug)]
pub struct ShardDoc {
    /// Its global statistics and histograms.
    pub global: ShardStats,
    /// Its backend's counters.
    pub counters: BackendCounters,
    /// Its open channels.
    pub channels: Vec<ChannelStats>,
}

/// Where a shard reports the channels it closed on its own (idle), so the control thread's
/// placement forgets them: (shard, channel).
pub type ClosedTx = mpsc::UnboundedSender<(u32, ChannelId)>;

/// Everything one shard's loop runs on, whichever backend drives it.
#[derive(Debug)]
pub struct Shard {
    /// The core, with this shard's slice of the channel limit.
    pub relay: Relay,
    /// Control requests for this shard.
    pub rx: mpsc::UnboundedReceiver<ShardRequest>,
    /// Publishes this shard's metrics snapshot.
    pub publisher: Publisher,
    /// Where channel sockets bind.
    pub bind: BindConfig,
    /// Channels closed for idleness go here.
    pub closed: ClosedTx,
}

/// How the control thread reaches the data plane: a lock-free queue, plus an eventfd for the
/// io_uring backend, which sleeps in `io_uring_enter` rather than in tokio.
#[derive(Clone, Debug)]
pub struct ShardHandle {
    /// The queue.
    tx: mpsc::UnboundedSender<ShardRequest>,
    /// Wakes the ring after a message is queued.
    waker: Option<Arc<EventFd>>,
}

impl ShardHandle {
    /// A handle over `tx`, waking `waker` (if any) after each message.
    #[must_use]
    pub fn new(tx: mpsc::UnboundedSender<ShardRequest>, waker: Option<Arc<EventFd>>) -> Self {
        Self { tx, waker }
    }

    /// Queues a message.
    ///
    /// # Errors
    /// The data plane has stopped.
    pub fn send(&self, msg: ShardRequest) -> Result<(), Stopped> {
        self.tx.send(msg).map_err(|_| Stopped)?;
        if let Some(w) = &self.waker {
            w.notify();
        }
        Ok(())
    }

    /// Executes a command on the data plane and waits for its reply.
    pub async fn command(&self, command: Command) -> Result<Response, ErrorReply> {
        let (reply, rx) = oneshot::channel();
        let stopped = || ErrorReply::new(ErrorCode::Internal, "the data plane has stopped");
        self.send(ShardRequest::Command { command, reply })
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

/// The data plane is gone.
#[derive(Debug, thiserror::Error)]
#[error("the data plane has stopped")]
pub struct Stopped;

/// Closes the sockets of channels the core closed on its own (idle), logging their statistics
/// and telling the control thread's placement.
pub fn close_expired(relay: &mut Relay, table: &mut impl SocketTable, closed: &ClosedTx) {
    while let Some(relay_proto::Event::ChannelClosed {
        socket,
        reason,
        stats,
    }) = relay.poll_event()
    {
        table.close(socket);
        let _ = closed.send((relay.config().shard, stats.channel.clone()));
        tracing::info!(
            channel = %stats.channel,
            shard = relay.config().shard,
            reason = reason.as_str(),
            rtt_p50_us = stats.rtt.p50_ns / 1_000,
            lost = stats.streams.to_asterisk.lost,
            "channel closed"
        );
    }
}

/// This shard's final or current statistics, with its histograms.
#[must_use]
pub fn shard_stats(relay: &Relay) -> ShardStats {
    ShardStats {
        stats: relay.global_stats(),
        hist: Box::new(relay.histograms().clone()),
    }
}

/// This shard's part of the `/stats` document.
#[must_use]
pub fn shard_doc(relay: &Relay, counters: &BackendCounters, now: MonoTime) -> ShardDoc {
    ShardDoc {
        global: shard_stats(relay),
        counters: counters.clone(),
        channels: relay.all_channel_stats(now),
    }
}
