//! The relays control places calls on: one or more [`RelayLink`]s (a Unix socket on this host,
//! or TLS to relays on other hosts), and which one holds each call's channel.
//!
//! A new call's channel goes to the connected relay with the most free capacity (its `hello`
//! capacity less the channels control holds there; ties: the first listed). Its externalMedia
//! channel then sends to that relay's advertised address (`hello`'s `advertise`); a relay on
//! this host's Unix socket keeps control's `--bind-ip`, as with one relay. `update` and `remove`
//! go to the relay that took the channel. With no relay connected or none with room, `add`
//! fails with [`RelayError::NoRelay`].
//!
//! Ports are unique across the pool (control's one port pool), so a port names one call
//! whichever relay carries it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use relay_proto::figures::ChannelFigures;
use relay_proto::{ChannelId, Format};

use crate::metrics::Metrics;
use crate::relay_link::{Endpoint, RelayError, RelayLink, Removed};

/// Where a channel was placed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    /// The address its externalMedia channel must send to, when it is not control's
    /// `--bind-ip` (a relay on another host).
    pub ip: Option<IpAddr>,
    /// The relay, as the call record names it: its id, or its URL before it said hello.
    pub relay: String,
}

/// One relay of the pool.
#[derive(Debug)]
struct Member {
    /// Its link.
    link: RelayLink,
    /// Its name in metrics and logs: the URL it is reached at.
    name: String,
}

/// The pool (cheap to share behind an `Arc`; the controller holds one).
#[derive(Debug)]
pub struct RelayPool {
    /// The relays, in the order given.
    members: Vec<Member>,
    /// Which member holds each channel, and how many each holds: placed before the relay's
    /// reply, so that calls setting up at once spread too.
    placed: Mutex<Placement>,
    /// Per-relay gauges.
    metrics: Arc<Metrics>,
    /// How long a relay may be disconnected before its calls move (`--relay-grace`).
    grace: Duration,
}

/// One relay as `/stats` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RelayStatus {
    /// Where it is reached.
    pub relay: String,
    /// Its id, from its last `hello`.
    pub relay_id: Option<String>,
    /// Whether it is connected now.
    pub connected: bool,
    /// Channels control holds on it.
    pub calls: usize,
    /// The most it holds, from its last `hello`.
    pub capacity: Option<u32>,
}

/// Channels by relay.
#[derive(Debug, Default)]
struct Placement {
    /// The member holding each channel.
    by_channel: HashMap<ChannelId, usize>,
    /// Channels per member.
    counts: Vec<usize>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl RelayPool {
    /// Starts a link to each endpoint.
    #[must_use]
    pub fn spawn(
        endpoints: Vec<Endpoint>,
        grace: Duration,
        interim: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let placed = Placement {
            counts: vec![0; endpoints.len()],
            ..Placement::default()
        };
        let members = endpoints
            .into_iter()
            .map(|e| {
                let name = e.to_string();
                Member {
                    link: RelayLink::spawn(e, interim, Arc::clone(&metrics)),
                    name,
                }
            })
            .collect();
        Self {
            members,
            placed: Mutex::new(placed),
            metrics,
            grace,
        }
    }

    /// Places channel `id` on the connected relay with room and the most free capacity (ties:
    /// the first listed); its index.
    fn place(&self, id: &ChannelId) -> Option<usize> {
        let mut placed = lock(&self.placed);
        let i = self
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.link.is_connected())
            .filter_map(|(i, m)| {
                let capacity = m
                    .link
                    .identity()
                    .map_or(u64::MAX, |id| u64::from(id.capacity));
                let held = placed.counts.get(i).copied().unwrap_or(0) as u64;
                let free = capacity.saturating_sub(held);
                (free > 0).then_some((i, free))
            })
            .max_by_key(|&(i, free)| (free, std::cmp::Reverse(i)))
            .map(|(i, _)| i)?;
        placed.by_channel.insert(id.clone(), i);
        if let Some(n) = placed.counts.get_mut(i) {
            *n += 1;
        }
        drop(placed);
        self.count(i);
        Some(i)
    }

    /// Forgets where `id` is; the member that held it.
    fn forget(&self, id: &ChannelId) -> Option<usize> {
        let mut placed = lock(&self.placed);
        let i = placed.by_channel.remove(id)?;
        if let Some(n) = placed.counts.get_mut(i) {
            *n = n.saturating_sub(1);
        }
        drop(placed);
        self.count(i);
        Some(i)
    }

    fn member_of(&self, id: &ChannelId) -> Option<&Member> {
        let i = lock(&self.placed).by_channel.get(id).copied();
        i.and_then(|i| self.members.get(i))
    }

    /// Updates member `i`'s call gauge.
    fn count(&self, i: usize) {
        let n = lock(&self.placed).counts.get(i).copied();
        let (Some(m), Some(n)) = (self.members.get(i), n) else {
            return;
        };
        self.metrics
            .relay_calls
            .with_label_values(&[m.name.as_str()])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Opens a channel for a call on the relay [`place`](Self::place) picks; the address its
    /// externalMedia channel must send to, when it is not control's `--bind-ip`.
    ///
    /// # Errors
    /// [`RelayError::NoRelay`], or the chosen relay's error.
    pub async fn add(
        &self,
        id: &ChannelId,
        port: u16,
        echo: SocketAddr,
        format: Format,
    ) -> Result<Placed, RelayError> {
        let i = self.place(id).ok_or(RelayError::NoRelay)?;
        let Some(m) = self.members.get(i) else {
            return Err(RelayError::NoRelay);
        };
        if let Err(e) = m.link.add(id, port, echo, format).await {
            self.forget(id);
            return Err(e);
        }
        let identity = m.link.identity();
        Ok(Placed {
            ip: match m.link.endpoint() {
                Endpoint::Unix(_) => None,
                Endpoint::Tls { .. } => identity.as_ref().map(|i| i.advertise),
            },
            relay: identity.map_or_else(|| m.name.clone(), |i| i.relay_id),
        })
    }

    /// Tells the relay holding the channel where Asterisk sends its RTP from.
    ///
    /// # Errors
    /// See [`RelayError`]; `Disconnected` for a channel no relay holds.
    pub async fn update(&self, id: &ChannelId, asterisk: SocketAddr) -> Result<(), RelayError> {
        let m = self.member_of(id).ok_or(RelayError::Disconnected)?;
        m.link.update(id, asterisk).await
    }

    /// Closes the channel on the relay holding it.
    ///
    /// # Errors
    /// See [`RelayError`]; `Disconnected` for a channel no relay holds.
    pub async fn remove(&self, id: &ChannelId) -> Result<Removed, RelayError> {
        let m = self
            .forget(id)
            .and_then(|i| self.members.get(i))
            .ok_or(RelayError::Disconnected)?;
        m.link.remove(id).await
    }

    /// Resolves once the relay holding `id` is lost (disconnected for longer than the grace
    /// period); pending while it stays, or when no relay holds the channel.
    pub async fn lost(&self, id: &ChannelId) {
        match self.member_of(id) {
            Some(m) => m.link.lost(self.grace).await,
            None => std::future::pending().await,
        }
    }

    /// Forgets `id`, on the pool and on its relay's link, without telling the relay; what its
    /// relay measured of it (its latest interim figures).
    pub fn abandon(&self, id: &ChannelId) -> Vec<ChannelFigures> {
        self.forget(id)
            .and_then(|i| self.members.get(i))
            .map(|m| m.link.forget(id))
            .unwrap_or_default()
    }

    /// Waits until at least one relay is connected, for at most `deadline`; whether one is.
    pub async fn wait_connected(&self, deadline: Duration) -> bool {
        if self.members.is_empty() {
            return false;
        }
        let any = futures_util::future::select_all(
            self.members.iter().map(|m| Box::pin(m.link.connected())),
        );
        tokio::time::timeout(deadline, any).await.is_ok()
    }

    /// Every relay's state.
    #[must_use]
    pub fn status(&self) -> Vec<RelayStatus> {
        self.members
            .iter()
            .map(|m| {
                let identity = m.link.identity();
                RelayStatus {
                    relay: m.name.clone(),
                    relay_id: identity.as_ref().map(|i| i.relay_id.clone()),
                    connected: m.link.is_connected(),
                    calls: m.link.len(),
                    capacity: identity.map(|i| i.capacity),
                }
            })
            .collect()
    }

    /// Channels held, over every relay.
    #[must_use]
    pub fn len(&self) -> usize {
        self.members.iter().map(|m| m.link.len()).sum()
    }

    /// Whether no relay holds a channel of control's.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The relays' global statistics, the first connected relay's (for the summary log).
    ///
    /// # Errors
    /// No relay answered.
    pub async fn global(&self) -> Result<relay_proto::GlobalStats, RelayError> {
        let mut last = RelayError::NoRelay;
        for m in &self.members {
            match m.link.global().await {
                Ok(g) => return Ok(g),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}
