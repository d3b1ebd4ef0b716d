//! The coordinator: the control thread's side of the shards, which makes them one relay.
//!
//! A shard ([`crate::shard`]) is one thread on one core with everything the packet path touches:
//! its own ring (or tokio runtime), provided buffers, channel sockets and `relay-proto`
//! [`Relay`]. Shards share nothing on the packet path, so they scale with cores; what makes them
//! one relay lives on the control thread, here:
//!
//! - [`Placement`] puts each new channel on the shard with the fewest channels (ties: the lowest
//!   index) and remembers which shard holds which channel. It counts a channel from the moment
//!   its `add` is placed, so concurrent adds spread too, and forgets it when `remove` succeeds,
//!   when the `add` fails, or when the shard reports that it closed the channel for idleness.
//! - [`Coordinator`] executes a control command against the shards: `add` on the placed shard (the
//!   reply names it), `remove`, `update` and a channel's `stats` on its owner, `list`, `drain` and
//!   the global `stats` on every shard, merged (histograms merged before their percentiles are
//!   read, [`relay_proto::merge_global`]). The relay-wide `--max-channels` is checked here; each
//!   shard's core holds its even share.
//!
//! The control protocol is unchanged but for the `shard` field of replies.
//!
//! [`Relay`]: relay_proto::Relay

use std::collections::HashMap;
use std::sync::Mutex;

use relay_proto::control::{ChannelInfo, RelayIdentity};
use relay_proto::{ChannelId, ChannelStats, Command, ErrorCode, ErrorReply, GlobalStats, Response};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::counters::BackendCounters;
use crate::shard::{ShardDoc, ShardHandle, ShardRequest, ShardStats, Stopped};

/// Which shard holds which channel, and how many each holds.
#[derive(Debug)]
pub struct Placement {
    /// The owner of every channel placed and not yet forgotten.
    owner: HashMap<ChannelId, u32>,
    /// Channels per shard (placed ones included).
    load: Vec<u32>,
    /// The relay-wide limit.
    max_channels: u32,
}

impl Placement {
    /// No channels over `shards` shards, at most `max_channels` in all.
    #[must_use]
    pub fn new(shards: usize, max_channels: u32) -> Self {
        Self {
            owner: HashMap::new(),
            load: vec![0; shards.max(1)],
            max_channels,
        }
    }

    /// Places a new channel: the shard with the fewest channels, the lowest index among equals.
    ///
    /// # Errors
    /// `duplicate_channel` when the id is placed already; `limit` at `--max-channels`.
    pub fn place(&mut self, id: &ChannelId) -> Result<u32, ErrorReply> {
        if self.owner.contains_key(id) {
            return Err(ErrorReply::duplicate_channel(id));
        }
        let total: u32 = self.load.iter().sum();
        if total >= self.max_channels {
            return Err(ErrorReply::new(
                ErrorCode::Limit,
                format!("{} channels open, the maximum", self.max_channels),
            ));
        }
        let (shard, n) = self
            .load
            .iter_mut()
            .enumerate()
            .min_by_key(|(i, n)| (**n, *i))
            .unwrap_or_else(|| unreachable!("at least one shard"));
        *n += 1;
        let shard = u32::try_from(shard).unwrap_or(u32::MAX);
        self.owner.insert(id.clone(), shard);
        Ok(shard)
    }

    /// Forgets `id` if `shard` holds it (its `add` failed, it was removed, or it closed idle).
    pub fn forget(&mut self, shard: u32, id: &ChannelId) {
        if self.owner.get(id) == Some(&shard) {
            self.owner.remove(id);
            if let Some(n) = self.load.get_mut(shard as usize) {
                *n = n.saturating_sub(1);
            }
        }
    }

    /// The shard holding `id`.
    #[must_use]
    pub fn owner(&self, id: &ChannelId) -> Option<u32> {
        self.owner.get(id).copied()
    }

    /// Channels per shard.
    #[must_use]
    pub fn load(&self) -> &[u32] {
        &self.load
    }
}

/// One shard as the control thread sees it.
#[derive(Clone, Debug)]
pub struct ShardInfo {
    /// Its queue.
    pub handle: ShardHandle,
    /// The core it is pinned to, if any.
    pub core: Option<usize>,
}

/// The control thread's view of every shard: routes commands, merges statistics.
#[derive(Debug)]
pub struct Coordinator {
    /// The shards, by index.
    shards: Vec<ShardInfo>,
    /// Placement, and the shards' reports of channels they closed on their own (read before
    /// every decision, so a closed channel's id is free again at once). Taken only by control
    /// requests on the control thread, never by a shard.
    state: Mutex<(Placement, mpsc::UnboundedReceiver<(u32, ChannelId)>)>,
    /// Which backend runs (for `/stats`).
    backend: &'static str,
    /// Who the relay is, as `hello` replies say.
    identity: Option<RelayIdentity>,
}

/// The data plane's answer never came.
fn stopped() -> ErrorReply {
    ErrorReply::new(ErrorCode::Internal, "the data plane has stopped")
}

impl Coordinator {
    /// A router over `shards`, with the relay-wide limit `max_channels`; `closed` is where
    /// shards report channels they closed.
    #[must_use]
    pub fn new(
        shards: Vec<ShardInfo>,
        max_channels: u32,
        closed: mpsc::UnboundedReceiver<(u32, ChannelId)>,
        backend: &'static str,
    ) -> Self {
        let placement = Placement::new(shards.len(), max_channels);
        Self {
            shards,
            state: Mutex::new((placement, closed)),
            backend,
            identity: None,
        }
    }

    /// The same, saying it is `identity` in `hello` replies.
    #[must_use]
    pub fn with_identity(mut self, identity: RelayIdentity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Who the relay is.
    #[must_use]
    pub const fn identity(&self) -> Option<&RelayIdentity> {
        self.identity.as_ref()
    }

    /// Number of shards.
    #[must_use]
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Whether there are none (never, for a running relay).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// Runs `f` on the placement, after taking in the shards' reports of closed channels.
    fn placement<T>(&self, f: impl FnOnce(&mut Placement) -> T) -> T {
        let mut guard = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (placement, closed) = &mut *guard;
        while let Ok((shard, id)) = closed.try_recv() {
            placement.forget(shard, &id);
        }
        f(placement)
    }

    /// Channels per shard, as placement counts them.
    #[must_use]
    pub fn load(&self) -> Vec<u32> {
        self.placement(|p| p.load().to_vec())
    }

    fn shard(&self, i: u32) -> Result<&ShardInfo, ErrorReply> {
        self.shards
            .get(i as usize)
            .ok_or_else(|| ErrorReply::new(ErrorCode::Internal, "no such shard"))
    }

    /// Sends `command` to shard `i` and waits for its reply.
    async fn on(&self, i: u32, command: Command) -> Result<Response, ErrorReply> {
        self.shard(i)?.handle.command(command).await
    }

    /// Asks every shard with `msg` (built per shard) and collects the answers in shard order.
    async fn all<T>(
        &self,
        msg: impl Fn(oneshot::Sender<T>) -> ShardRequest,
    ) -> Result<Vec<T>, Stopped> {
        let mut waiting = Vec::with_capacity(self.shards.len());
        for s in &self.shards {
            let (tx, rx) = oneshot::channel();
            s.handle.send(msg(tx))?;
            waiting.push(rx);
        }
        let mut out = Vec::with_capacity(waiting.len());
        for rx in waiting {
            out.push(rx.await.map_err(|_| Stopped)?);
        }
        Ok(out)
    }

    /// Sends `command` to every shard, in order, collecting the replies.
    async fn broadcast(&self, command: &Command) -> Result<Vec<Response>, ErrorReply> {
        let replies = self
            .all(|reply| ShardRequest::Command {
                command: command.clone(),
                reply,
            })
            .await
            .map_err(|_| stopped())?;
        replies.into_iter().collect()
    }

    /// Executes one control command against the shards.
    pub async fn command(&self, command: Command) -> Result<Response, ErrorReply> {
        match command {
            Command::Hello(_) => Ok(relay_proto::control::hello_response(self.identity.as_ref())),
            Command::Add(add) => {
                let id = add.channel.clone();
                let shard = self.placement(|p| p.place(&id))?;
                let reply = self.on(shard, Command::Add(add)).await;
                if reply.is_err() {
                    self.placement(|p| p.forget(shard, &id));
                }
                reply
            }
            Command::Remove(r) => {
                let id = r.channel.clone();
                let shard = self
                    .placement(|p| p.owner(&id))
                    .ok_or_else(|| ErrorReply::unknown_channel(&id))?;
                let reply = self.on(shard, Command::Remove(r)).await;
                if matches!(reply, Ok(Response::Removed { .. }))
                    || matches!(&reply, Err(e) if e.code == ErrorCode::UnknownChannel)
                {
                    self.placement(|p| p.forget(shard, &id));
                }
                reply
            }
            Command::Update(u) => {
                let shard = self
                    .placement(|p| p.owner(&u.channel))
                    .ok_or_else(|| ErrorReply::unknown_channel(&u.channel))?;
                self.on(shard, Command::Update(u)).await
            }
            Command::Stats(q) => match q.channel.clone() {
                Some(id) => {
                    let shard = self
                        .placement(|p| p.owner(&id))
                        .ok_or_else(|| ErrorReply::unknown_channel(&id))?;
                    self.on(shard, Command::Stats(q)).await
                }
                None if self.shards.len() == 1 => self.on(0, Command::Stats(q)).await,
                None => Ok(Response::Global {
                    stats: Box::new(self.global().await.map_err(|_| stopped())?),
                }),
            },
            Command::List => {
                let mut channels: Vec<ChannelInfo> = Vec::new();
                for r in self.broadcast(&Command::List).await? {
                    if let Response::Channels { channels: c } = r {
                        channels.extend(c);
                    }
                }
                channels.sort_by(|a, b| a.channel.cmp(&b.channel));
                Ok(Response::Channels { channels })
            }
            Command::Interim => {
                let mut channels = Vec::new();
                for r in self.broadcast(&Command::Interim).await? {
                    if let Response::Interim { channels: c } = r {
                        channels.extend(c);
                    }
                }
                Ok(Response::Interim { channels })
            }
            Command::Drain => {
                let mut active = 0u32;
                for r in self.broadcast(&Command::Drain).await? {
                    if let Response::Draining { active: n } = r {
                        active = active.saturating_add(n);
                    }
                }
                Ok(Response::Draining { active })
            }
        }
    }

    /// Relay-wide statistics: every shard's, merged.
    ///
    /// # Errors
    /// A shard has stopped.
    pub async fn global(&self) -> Result<GlobalStats, Stopped> {
        let docs = self.all(|reply| ShardRequest::Snapshot { reply }).await?;
        Ok(merge(docs.iter().map(|d| &d.global)))
    }

    /// The `/stats` document.
    ///
    /// # Errors
    /// A shard has stopped.
    pub async fn stats_doc(&self) -> Result<StatsDoc, Stopped> {
        let docs = self.all(|reply| ShardRequest::Snapshot { reply }).await?;
        Ok(StatsDoc::new(self.backend, &self.shards, docs))
    }

    /// Stops every shard; their final statistics, merged. Shards already gone are left out.
    pub async fn shutdown(&self) -> GlobalStats {
        let mut waiting = Vec::new();
        for s in &self.shards {
            let (reply, rx) = oneshot::channel();
            if s.handle.send(ShardRequest::Shutdown { reply }).is_ok() {
                waiting.push(rx);
            }
        }
        let mut finals: Vec<ShardStats> = Vec::new();
        for rx in waiting {
            if let Ok(f) = rx.await {
                finals.push(f);
            }
        }
        merge(finals.iter())
    }
}

/// Several shards' statistics as one relay's.
fn merge<'a>(parts: impl Iterator<Item = &'a ShardStats>) -> GlobalStats {
    relay_proto::merge_global(parts.map(|p| (&p.stats, &*p.hist))).0
}

/// One shard in the `/stats` document.
#[derive(Debug, Serialize)]
pub struct ShardSummary {
    /// Its index.
    pub shard: u32,
    /// The core it is pinned to.
    pub core: Option<usize>,
    /// Its global statistics.
    pub global: GlobalStats,
    /// Its backend's counters.
    pub backend_counters: BackendCounters,
}

/// The `/stats` document: the relay as a whole, each shard, every open channel.
#[derive(Debug, Serialize)]
pub struct StatsDoc {
    /// Which backend runs.
    pub backend: &'static str,
    /// Relay-wide statistics (every shard's, merged).
    pub global: GlobalStats,
    /// Relay-wide backend counters (summed).
    pub backend_counters: BackendCounters,
    /// Each shard's summary.
    pub shards: Vec<ShardSummary>,
    /// Every open channel, ordered by id (`shard` says where each one is).
    pub channels: Vec<ChannelStats>,
}

impl StatsDoc {
    fn new(backend: &'static str, shards: &[ShardInfo], docs: Vec<ShardDoc>) -> Self {
        let global = merge(docs.iter().map(|d| &d.global));
        let mut backend_counters = BackendCounters::default();
        let mut channels = Vec::new();
        let mut summaries = Vec::with_capacity(docs.len());
        for (i, d) in docs.into_iter().enumerate() {
            backend_counters.accumulate(&d.counters);
            channels.extend(d.channels);
            summaries.push(ShardSummary {
                shard: u32::try_from(i).unwrap_or(u32::MAX),
                core: shards.get(i).and_then(|s| s.core),
                global: d.global.stats,
                backend_counters: d.counters,
            });
        }
        channels.sort_by(|a, b| a.channel.cmp(&b.channel));
        Self {
            backend,
            global,
            backend_counters,
            shards: summaries,
            channels,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ChannelId {
        ChannelId::try_from(s).unwrap()
    }

    #[test]
    fn placement_takes_the_least_loaded_shard_lowest_index_first() {
        let mut p = Placement::new(3, 100);
        let placed: Vec<u32> = (0..7)
            .map(|i| p.place(&id(&format!("c{i}"))).unwrap())
            .collect();
        assert_eq!(placed, [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(p.load(), [3, 2, 2]);
        // Emptying shard 2 sends the next adds there until it catches up.
        p.forget(2, &id("c2"));
        p.forget(2, &id("c5"));
        assert_eq!(p.load(), [3, 2, 0]);
        assert_eq!(p.place(&id("n1")).unwrap(), 2);
        assert_eq!(p.place(&id("n2")).unwrap(), 2);
        assert_eq!(p.place(&id("n3")).unwrap(), 1, "tie 2/2: the lower index");
        assert_eq!(p.owner(&id("n1")), Some(2));
        assert_eq!(p.owner(&id("c2")), None);
    }

    #[test]
    fn placement_refuses_duplicates_and_the_relay_wide_limit() {
        let mut p = Placement::new(2, 3);
        p.place(&id("a")).unwrap();
        let e = p.place(&id("a")).unwrap_err();
        assert_eq!(e.code, ErrorCode::DuplicateChannel);
        p.place(&id("b")).unwrap();
        p.place(&id("c")).unwrap();
        let e = p.place(&id("d")).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (ErrorCode::Limit, "3 channels open, the maximum")
        );
        // Forgetting on the wrong shard changes nothing; on the owner it frees a place.
        p.forget(1, &id("a"));
        assert_eq!(p.load(), [2, 1]);
        p.forget(0, &id("a"));
        assert_eq!(p.load(), [1, 1]);
        assert_eq!(p.place(&id("d")).unwrap(), 0);
    }
}
