//! The call lifecycle: what control does between a caller's StasisStart and its end.
//!
//! Each call is one task that owns everything the call acquires (port, relay channel,
//! externalMedia channel, bridge) and records each acquisition before making it, so whatever step
//! fails, or whenever the caller leaves, the same teardown releases exactly what exists. Events
//! only flip a call's flags (`ended`, externalMedia in Stasis) through watch channels; the task
//! acts on them. Calls share no lock across an await: the registry and the pool are short
//! critical sections, ARI requests run concurrently on reqwest's pool, relay requests are
//! pipelined on one connection, so 200 StasisStarts at once set up in parallel.
//!
//! Names control chooses: the externalMedia channel is `rtprelay-em-<caller id>` (also the relay
//! channel's id) and the bridge `rtprelay-br-<caller id>`, so reconciliation can recognise
//! control's own leftovers after a restart or a missed event.
//!
//! A bridged call outlives its relay: when the relay holding it is lost (down for longer than
//! `--relay-grace`), the call moves to another ([`Controller`]'s `move_call`): a channel there on
//! the same port, a new externalMedia channel `rtprelay-em-<caller id>-m<n>` added to the bridge,
//! the old one hung up. The call record merges what every relay measured.
//!
//! The controller reaches Asterisk and the relay through two traits, [`AriOps`] and
//! [`RelayOps`], implemented by [`Ari`] and [`RelayPool`] (the defaults of its type parameters),
//! so the call path's retries, timeouts and teardowns are unit-tested against recording fakes on
//! tokio's paused clock.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use relay_proto::{ChannelId, ChannelStats};
use tokio::sync::watch;

use crate::ari::{Channel, Event, EXTERNAL_MEDIA_PREFIX};
pub use crate::call_log::EndedBy;
use crate::call_log::{rfc3339, CallLog, CallRecord, RelayFigures};
use crate::config::{Config, MediaFormat};
use crate::metrics::{Metrics, Outcome, Stage};
use crate::pool::PortPool;
use crate::relay_link::{RelayError, Removed};
use crate::relays::{Placed, RelayPool};
use crate::rest::{Ari, Bridge, RestError};
use relay_proto::figures::ChannelFigures;

/// The ARI requests the controller makes; [`Ari`] sends them to Asterisk. Each method is the
/// `Ari` method of the same name (see it for the request and its errors).
pub trait AriOps: fmt::Debug + Send + Sync + 'static {
    /// Answers a channel.
    fn answer(&self, channel: &str) -> impl Future<Output = Result<(), RestError>> + Send;
    /// Hangs a channel up; `Ok(false)` when it was already gone.
    fn hangup(&self, channel: &str) -> impl Future<Output = Result<bool, RestError>> + Send;
    /// Creates the externalMedia channel `channel_id`, sending RTP to `external_host`.
    fn external_media(
        &self,
        channel_id: &str,
        external_host: &str,
        format: &str,
    ) -> impl Future<Output = Result<Channel, RestError>> + Send;
    /// Creates a mixing bridge.
    fn create_bridge(&self, id: &str) -> impl Future<Output = Result<(), RestError>> + Send;
    /// Adds channels to a bridge (422: one is not in Stasis yet).
    fn add_to_bridge(
        &self,
        bridge: &str,
        channels: &[&str],
    ) -> impl Future<Output = Result<(), RestError>> + Send;
    /// Destroys a bridge; `Ok(false)` when it was already gone.
    fn destroy_bridge(&self, id: &str) -> impl Future<Output = Result<bool, RestError>> + Send;
    /// Reads a channel variable (or function).
    fn variable(
        &self,
        channel: &str,
        name: &str,
    ) -> impl Future<Output = Result<String, RestError>> + Send;
    /// Lists the channels.
    fn channels(&self) -> impl Future<Output = Result<Vec<Channel>, RestError>> + Send;
    /// Lists the bridges.
    fn bridges(&self) -> impl Future<Output = Result<Vec<Bridge>, RestError>> + Send;
}

impl AriOps for Ari {
    fn answer(&self, channel: &str) -> impl Future<Output = Result<(), RestError>> + Send {
        Self::answer(self, channel)
    }
    fn hangup(&self, channel: &str) -> impl Future<Output = Result<bool, RestError>> + Send {
        Self::hangup(self, channel)
    }
    fn external_media(
        &self,
        channel_id: &str,
        external_host: &str,
        format: &str,
    ) -> impl Future<Output = Result<Channel, RestError>> + Send {
        Self::external_media(self, channel_id, external_host, format)
    }
    fn create_bridge(&self, id: &str) -> impl Future<Output = Result<(), RestError>> + Send {
        Self::create_bridge(self, id)
    }
    fn add_to_bridge(
        &self,
        bridge: &str,
        channels: &[&str],
    ) -> impl Future<Output = Result<(), RestError>> + Send {
        Self::add_to_bridge(self, bridge, channels)
    }
    fn destroy_bridge(&self, id: &str) -> impl Future<Output = Result<bool, RestError>> + Send {
        Self::destroy_bridge(self, id)
    }
    fn variable(
        &self,
        channel: &str,
        name: &str,
    ) -> impl Future<Output = Result<String, RestError>> + Send {
        Self::variable(self, channel, name)
    }
    fn channels(&self) -> impl Future<Output = Result<Vec<Channel>, RestError>> + Send {
        Self::channels(self)
    }
    fn bridges(&self) -> impl Future<Output = Result<Vec<Bridge>, RestError>> + Send {
        Self::bridges(self)
    }
}

/// The relay requests the controller makes; [`RelayPool`] places them on its relays. Each
/// method is the `RelayPool` method of the same name.
pub trait RelayOps: fmt::Debug + Send + Sync + 'static {
    /// Opens a relay channel on `port` forwarding to `echo`; the address Asterisk must send to
    /// when it is not control's `--bind-ip` (a relay on another host).
    fn add(
        &self,
        id: &ChannelId,
        port: u16,
        echo: SocketAddr,
        format: relay_proto::Format,
    ) -> impl Future<Output = Result<Placed, RelayError>> + Send;
    /// Tells the relay where Asterisk sends the channel's RTP from.
    fn update(
        &self,
        id: &ChannelId,
        asterisk: SocketAddr,
    ) -> impl Future<Output = Result<(), RelayError>> + Send;
    /// Closes a relay channel, returning its final statistics (and their mergeable form).
    fn remove(&self, id: &ChannelId) -> impl Future<Output = Result<Removed, RelayError>> + Send;
    /// Resolves once the relay holding channel `id` is lost: its connection down and not back
    /// within the grace period (`--relay-grace`). Pending for as long as it stays, or when no
    /// relay holds the channel.
    fn lost(&self, id: &ChannelId) -> impl Future<Output = ()> + Send;
    /// Forgets channel `id` without a word to its relay (which is lost): a relay that comes
    /// back is not asked to re-add it, and removes it as a leftover. Returns the channel's
    /// latest interim figures, what is left of its measurement.
    fn abandon(&self, id: &ChannelId) -> Vec<ChannelFigures>;
}

impl RelayOps for RelayPool {
    fn add(
        &self,
        id: &ChannelId,
        port: u16,
        echo: SocketAddr,
        format: relay_proto::Format,
    ) -> impl Future<Output = Result<Placed, RelayError>> + Send {
        Self::add(self, id, port, echo, format)
    }
    fn update(
        &self,
        id: &ChannelId,
        asterisk: SocketAddr,
    ) -> impl Future<Output = Result<(), RelayError>> + Send {
        Self::update(self, id, asterisk)
    }
    fn remove(&self, id: &ChannelId) -> impl Future<Output = Result<Removed, RelayError>> + Send {
        Self::remove(self, id)
    }
    fn lost(&self, id: &ChannelId) -> impl Future<Output = ()> + Send {
        RelayPool::lost(self, id)
    }
    fn abandon(&self, id: &ChannelId) -> Vec<ChannelFigures> {
        RelayPool::abandon(self, id)
    }
}

/// Prefix of the bridges control creates.
pub const BRIDGE_PREFIX: &str = "rtprelay-br-";
/// Answer attempts on 404 "Channel not found" (the channel can be announced before it is ready).
const ANSWER_ATTEMPTS: u32 = 5;
/// addChannel attempts on 422 "Channel not in Stasis application".
const BRIDGE_ATTEMPTS: u32 = 5;
/// Longest wait for the externalMedia channel's StasisStart.
const STASIS_WAIT: Duration = Duration::from_secs(5);

/// One call's shared flags.
#[derive(Debug)]
pub struct Call {
    /// The caller channel.
    pub caller: String,
    /// The externalMedia channel (and relay channel) id.
    pub em: String,
    /// The bridge id.
    pub bridge: String,
    /// Set when either channel has left Stasis (or control is stopping).
    ended: watch::Sender<bool>,
    /// How many of the call's externalMedia channels (by generation, [`Call::ems`]) have had
    /// their StasisStart: generation `g` is in Stasis once this is above `g`.
    em_ready: watch::Sender<u32>,
    /// Its externalMedia channels, in order: `em` first, then one per move to another relay
    /// (`<em>-m1`, `<em>-m2`, …). The last one carries the call's media.
    ems: Mutex<Vec<String>>,
    /// The caller is gone (no hang-up needed).
    caller_gone: std::sync::atomic::AtomicBool,
    /// The externalMedia channel is gone.
    em_gone: std::sync::atomic::AtomicBool,
    /// When the caller's StasisStart arrived.
    created: Instant,
    /// The caller channel's name.
    pub name: String,
    /// Wall-clock times for the call record: StasisStart, bridged.
    started_at: std::time::SystemTime,
    /// When both channels were bridged.
    bridged_at: Mutex<Option<std::time::SystemTime>>,
    /// Who ended the call and why, as first learnt (the cause may come later, with
    /// ChannelDestroyed).
    end_info: Mutex<EndInfo>,
}

/// How a call ended.
#[derive(Clone, Debug, Default)]
pub struct EndInfo {
    /// Who, once known.
    pub by: Option<EndedBy>,
    /// The hang-up cause, from ChannelDestroyed.
    pub cause: Option<u32>,
    /// Its text.
    pub cause_txt: Option<String>,
}

impl Call {
    fn new(caller: &str, name: &str) -> Self {
        Self {
            name: name.to_owned(),
            started_at: std::time::SystemTime::now(),
            bridged_at: Mutex::new(None),
            end_info: Mutex::new(EndInfo::default()),
            caller: caller.to_owned(),
            em: format!("{EXTERNAL_MEDIA_PREFIX}{caller}"),
            bridge: format!("{BRIDGE_PREFIX}{caller}"),
            ended: watch::Sender::new(false),
            em_ready: watch::Sender::new(0),
            ems: Mutex::new(vec![format!("{EXTERNAL_MEDIA_PREFIX}{caller}")]),
            caller_gone: false.into(),
            em_gone: false.into(),
            created: Instant::now(),
        }
    }

    /// Ends the call (idempotent).
    pub fn end(&self) {
        self.ended.send_replace(true);
    }

    /// Ends the call, recording who did if nobody has yet.
    pub fn ended_by(&self, by: EndedBy) {
        lock(&self.end_info).by.get_or_insert(by);
        self.end();
    }

    fn is_ended(&self) -> bool {
        *self.ended.borrow()
    }

    /// The externalMedia channel carrying the call's media now.
    fn current_em(&self) -> String {
        lock(&self.ems)
            .last()
            .cloned()
            .unwrap_or_else(|| self.em.clone())
    }

    /// The generation of the call's externalMedia channel `id`, if it is one.
    fn generation(&self, id: &str) -> Option<u32> {
        let ems = lock(&self.ems);
        ems.iter()
            .position(|e| e == id)
            .and_then(|g| u32::try_from(g).ok())
    }

    /// Marks externalMedia channel `id` in Stasis.
    fn em_in_stasis(&self, id: &str) {
        if let Some(g) = self.generation(id) {
            self.em_ready.send_modify(|r| *r = (*r).max(g + 1));
        }
    }
}

/// The calls in progress, by caller id and by externalMedia id.
#[derive(Debug, Default)]
struct Registry {
    by_caller: HashMap<String, Arc<Call>>,
    by_em: HashMap<String, Arc<Call>>,
}

/// What a call holds, recorded before each acquisition.
#[derive(Debug, Default)]
struct Held {
    port: Option<u16>,
    format: Option<relay_proto::Format>,
    /// The relay channel carrying the call now.
    relay: Option<ChannelId>,
    /// Its externalMedia channels that may exist (created, or being created), to hang up.
    ems: Vec<String>,
    bridge: bool,
    /// The relays that carried the call, in order (their ids).
    relays: Vec<String>,
    /// When its first relay channel was opened: the measured span starts there.
    relay_since: Option<Instant>,
    /// The figures of its relay channels that have closed (removed, or abandoned with a lost
    /// relay: their latest interim figures), in order.
    figures: Vec<ChannelFigures>,
}

/// What the relays measured of a call, every relay that carried it merged.
#[derive(Debug, Default)]
struct Measured {
    /// The merged statistics (the last channel's where there is nothing to merge).
    stats: Option<ChannelStats>,
    /// The relays that carried it, in order.
    relays: Vec<String>,
    /// Time since its first relay channel opened that no relay's figures cover.
    unmeasured_ms: Option<f64>,
}

/// Merges the figures of every relay channel the call had (`held.figures`) into one set of
/// statistics, the final ones of its last channel (`last`) giving what figures do not carry;
/// and how much of the call no figures cover: from its first relay channel's opening to now,
/// less the span each channel's figures cover (a lost relay's end after its last interim, the
/// grace and the move).
fn measured(call: &Call, held: &Held, last: Option<ChannelStats>) -> Measured {
    let mut merged: Option<ChannelFigures> = None;
    for f in &held.figures {
        match merged.as_mut() {
            None => merged = Some(f.clone()),
            Some(m) => {
                if let Err(e) = m.merge(f) {
                    tracing::warn!(caller = %call.caller, "cannot merge a relay's figures: {e}");
                }
            }
        }
    }
    let covered_ns = match &merged {
        Some(m) => m.age_ns,
        None => last.as_ref().map_or(0, |s| s.age_ns),
    };
    let stats = match merged {
        Some(m) => match m.stats(last.as_ref()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(caller = %call.caller, "cannot read a relay's figures: {e}");
                last
            }
        },
        None => last,
    };
    let unmeasured_ms = held.relay_since.map(|since| {
        let span = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        span.saturating_sub(covered_ns) as f64 / 1e6
    });
    Measured {
        stats,
        relays: held.relays.clone(),
        unmeasured_ms,
    }
}

/// Why set-up (or a move to another relay) stopped.
#[derive(Debug)]
enum SetupError {
    /// The call ended during set-up.
    Ended,
    /// A stage failed.
    Failed(Stage, String),
    /// No relay was connected with room (the call's relay was lost, or none took it).
    NoRelay(String),
}

/// Control's call handling, reaching Asterisk through `A` and the relay through `R`.
#[derive(Debug)]
pub struct Controller<A = Ari, R = RelayPool> {
    cfg: Config,
    ari: A,
    relay: R,
    pool: Mutex<PortPool>,
    registry: Mutex<Registry>,
    metrics: Arc<Metrics>,
    tasks: tokio_util::task::TaskTracker,
    call_log: Option<CallLog>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<A: AriOps, R: RelayOps> Controller<A, R> {
    /// A controller for `cfg`, using the given links.
    #[must_use]
    pub fn new(
        cfg: Config,
        ari: A,
        relay: R,
        metrics: Arc<Metrics>,
        call_log: Option<CallLog>,
    ) -> Arc<Self> {
        let pool = PortPool::new(cfg.port_range.clone());
        metrics
            .ports_free
            .set(i64::try_from(pool.free()).unwrap_or(i64::MAX));
        Arc::new(Self {
            cfg,
            ari,
            relay,
            pool: Mutex::new(pool),
            registry: Mutex::new(Registry::default()),
            metrics,
            tasks: tokio_util::task::TaskTracker::new(),
            call_log,
        })
    }

    /// The relay link.
    #[must_use]
    pub const fn relay(&self) -> &R {
        &self.relay
    }

    /// Calls in progress.
    #[must_use]
    pub fn active(&self) -> usize {
        lock(&self.registry).by_caller.len()
    }

    /// (free, in use, refused for exhaustion) ports.
    #[must_use]
    pub fn ports(&self) -> (usize, usize, u64) {
        let p = lock(&self.pool);
        (p.free(), p.in_use(), p.exhausted())
    }

    fn pool_gauges(&self, p: &PortPool) {
        self.metrics
            .ports_free
            .set(i64::try_from(p.free()).unwrap_or(i64::MAX));
        self.metrics
            .ports_in_use
            .set(i64::try_from(p.in_use()).unwrap_or(i64::MAX));
    }

    /// Acts on one ARI event.
    pub fn handle_event(self: &Arc<Self>, event: Event) {
        match event {
            Event::StasisStart { channel, .. } => {
                self.metrics
                    .events
                    .with_label_values(&["StasisStart"])
                    .inc();
                self.stasis_start(&channel);
            }
            Event::StasisEnd { channel } => {
                self.metrics.events.with_label_values(&["StasisEnd"]).inc();
                self.channel_gone(&channel.id);
            }
            Event::ChannelDestroyed {
                channel,
                cause,
                cause_txt,
            } => {
                self.metrics
                    .events
                    .with_label_values(&["ChannelDestroyed"])
                    .inc();
                self.channel_gone(&channel.id);
                // The cause of the call's end: its caller's or its current externalMedia
                // channel's, not that of a channel retired by a move to another relay.
                let call = self
                    .call_of(&channel.id)
                    .filter(|c| c.caller == channel.id || c.current_em() == channel.id);
                if let Some(call) = call {
                    let mut end = lock(&call.end_info);
                    if end.cause.is_none() {
                        end.cause = cause;
                        end.cause_txt = cause_txt;
                    }
                }
            }
            Event::Other => {
                self.metrics.events.with_label_values(&["other"]).inc();
            }
        }
    }

    fn stasis_start(self: &Arc<Self>, channel: &Channel) {
        if channel.is_ours() {
            let call = lock(&self.registry).by_em.get(&channel.id).cloned();
            match call {
                Some(call) => {
                    call.em_in_stasis(&channel.id);
                }
                None => {
                    // A leftover of an earlier run (or of a call already torn down): hang it up.
                    let this = Arc::clone(self);
                    let id = channel.id.clone();
                    self.tasks.spawn(async move {
                        let _ = this.ari.hangup(&id).await;
                        this.metrics
                            .reconciled
                            .with_label_values(&["channel"])
                            .inc();
                    });
                }
            }
            return;
        }
        let call = {
            let mut r = lock(&self.registry);
            if r.by_caller.contains_key(&channel.id) {
                return; // a repeat (after a reconnection): already handled
            }
            let call = Arc::new(Call::new(&channel.id, &channel.name));
            r.by_caller.insert(call.caller.clone(), Arc::clone(&call));
            r.by_em.insert(call.em.clone(), Arc::clone(&call));
            call
        };
        self.metrics.calls_active.inc();
        let this = Arc::clone(self);
        self.tasks.spawn(async move { this.run_call(call).await });
    }

    fn channel_gone(&self, id: &str) {
        let r = lock(&self.registry);
        if let Some(call) = r.by_caller.get(id) {
            call.caller_gone
                .store(true, std::sync::atomic::Ordering::Relaxed);
            call.ended_by(EndedBy::Caller);
        } else if let Some(call) = r.by_em.get(id) {
            // A channel retired by a move to another relay leaves without ending the call.
            if call.current_em() == id {
                call.em_gone
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                call.ended_by(EndedBy::ExternalMedia);
            }
        }
    }

    /// The call a channel (caller or externalMedia) belongs to.
    fn call_of(&self, id: &str) -> Option<Arc<Call>> {
        let r = lock(&self.registry);
        r.by_caller.get(id).or_else(|| r.by_em.get(id)).cloned()
    }

    async fn run_call(self: Arc<Self>, call: Arc<Call>) {
        let started = Instant::now();
        let mut held = Held::default();
        let mut failure: Option<(Stage, String)> = None;
        let mut setup_ms = None;
        let outcome = match self.setup(&call, &mut held).await {
            Ok(()) => {
                self.metrics.setup_done(started.elapsed());
                setup_ms = Some(started.elapsed().as_secs_f64() * 1e3);
                *lock(&call.bridged_at) = Some(std::time::SystemTime::now());
                tracing::info!(
                    caller = %call.caller,
                    port = held.port.unwrap_or(0),
                    setup_ms = started.elapsed().as_secs_f64() * 1e3,
                    "call bridged"
                );
                match self.carry(&call, &mut held).await {
                    Ok(()) => Outcome::Completed,
                    Err(e) => self.failed(&call, e, &mut failure),
                }
            }
            Err(SetupError::Ended) => {
                tracing::info!(caller = %call.caller, "call ended during set-up");
                Outcome::Abandoned
            }
            Err(e) => self.failed(&call, e, &mut failure),
        };
        let port = held.port;
        let format = held.format.map(|f| f.as_str().to_owned());
        let measured = self.teardown(&call, held).await;
        if let Some(log) = &self.call_log {
            let end = lock(&call.end_info).clone();
            let record = CallRecord {
                caller_id: call.caller.clone(),
                caller_name: call.name.clone(),
                external_media_id: call.em.clone(),
                relay_port: port,
                format,
                started: rfc3339(call.started_at),
                bridged: lock(&call.bridged_at).map(rfc3339),
                ended: rfc3339(std::time::SystemTime::now()),
                ended_by: end.by.unwrap_or(EndedBy::Control),
                hangup_cause: end.cause,
                hangup_cause_txt: end.cause_txt,
                failure_stage: failure.as_ref().map(|(s, _)| s.label()),
                failure: failure.map(|(_, why)| why),
                setup_ms,
                relay: measured.stats.as_ref().map(RelayFigures::from),
                relays: measured.relays,
                unmeasured_ms: measured.unmeasured_ms,
            };
            log.append(&record, &self.metrics).await;
        }
        self.metrics
            .calls
            .with_label_values(&[outcome.label()])
            .inc();
        {
            let mut r = lock(&self.registry);
            r.by_caller.remove(&call.caller);
            for em in lock(&call.ems).iter() {
                r.by_em.remove(em);
            }
        }
        self.metrics.calls_active.dec();
    }

    /// The outcome of a call whose set-up or move stopped on `e`; counts the failure, ends the
    /// call, and records the stage and why in `failure`.
    fn failed(&self, call: &Call, e: SetupError, failure: &mut Option<(Stage, String)>) -> Outcome {
        let (stage, why, outcome) = match e {
            SetupError::Ended => {
                tracing::info!(caller = %call.caller, "call ended during set-up");
                return Outcome::Abandoned;
            }
            SetupError::NoRelay(why) => {
                tracing::warn!(caller = %call.caller, "no relay with room: hanging up ({why})");
                (Stage::Relay, why, Outcome::NoRelay)
            }
            SetupError::Failed(Stage::Port, why) => {
                self.metrics.ports_exhausted.inc();
                tracing::warn!(caller = %call.caller, "no relay port free: hanging up ({why})");
                (Stage::Port, why, Outcome::NoPort)
            }
            SetupError::Failed(stage, why) => {
                tracing::warn!(caller = %call.caller, stage = stage.label(), "call set-up failed: {why}");
                (stage, why, Outcome::Failed)
            }
        };
        self.metrics
            .setup_failures
            .with_label_values(&[stage.label()])
            .inc();
        call.ended_by(EndedBy::Control);
        *failure = Some((stage, why));
        outcome
    }

    /// Carries a bridged call until it ends, moving it to another relay each time its relay is
    /// lost ([`RelayOps::lost`]).
    async fn carry(&self, call: &Call, held: &mut Held) -> Result<(), SetupError> {
        let mut ended = call.ended.subscribe();
        loop {
            let Some(id) = held.relay.clone() else {
                let _ = ended.wait_for(|e| *e).await;
                return Ok(());
            };
            let lost = tokio::select! {
                _ = ended.wait_for(|e| *e) => false,
                () = self.relay.lost(&id) => true,
            };
            if !lost {
                return Ok(());
            }
            let started = Instant::now();
            self.move_call(call, held).await?;
            self.metrics.calls_moved.inc();
            tracing::info!(
                caller = %call.caller,
                from = %id,
                to = %call.current_em(),
                move_ms = started.elapsed().as_secs_f64() * 1e3,
                "call moved to another relay"
            );
        }
    }

    /// Moves a bridged call whose relay is lost to another: a channel on the relay with the
    /// most free capacity (on the same port: ports are unique across the pool), a new
    /// externalMedia channel toward it, added to the call's bridge, then the old externalMedia
    /// channel hung up. The old relay channel is abandoned, not removed: its relay is gone.
    async fn move_call(&self, call: &Call, held: &mut Held) -> Result<(), SetupError> {
        let fail = |stage| move |e: &dyn fmt::Display| SetupError::Failed(stage, e.to_string());
        let (Some(port), Some(format)) = (held.port, held.format) else {
            return Err(SetupError::Failed(Stage::Relay, "no port held".into()));
        };
        let old_em = call.current_em();
        if let Some(old) = held.relay.take() {
            held.figures.extend(self.relay.abandon(&old));
        }
        let (new_em, generation) = {
            let mut ems = lock(&call.ems);
            let g = u32::try_from(ems.len()).unwrap_or(u32::MAX);
            let id = format!("{}-m{g}", call.em);
            ems.push(id.clone());
            (id, g)
        };
        // Its StasisStart finds the call by it.
        let this_call = self.call_of(&call.caller).ok_or(SetupError::Ended)?;
        lock(&self.registry).by_em.insert(new_em.clone(), this_call);
        Self::check(call)?;
        let id = ChannelId::try_from(new_em.as_str()).map_err(|e| fail(Stage::Relay)(&e))?;
        held.relay = Some(id.clone());
        let relay_ip = match self.relay.add(&id, port, self.cfg.echo, format).await {
            Ok(p) => {
                held.relays.push(p.relay);
                p.ip
            }
            Err(RelayError::NoRelay) => {
                held.relay = None;
                return Err(SetupError::NoRelay(format!(
                    "the relay of {old_em} was lost and no other has room"
                )));
            }
            Err(e) => return Err(fail(Stage::Relay)(&e)),
        };
        Self::check(call)?;
        held.ems.push(new_em.clone());
        self.open_external_media(call, &new_em, &id, relay_ip, port, format)
            .await?;
        self.join_bridge(call, &new_em, generation, &[&new_em])
            .await?;
        // The old channel leaves; its StasisEnd does not end the call (it is not current).
        held.ems.retain(|e| *e != old_em);
        if let Err(e) = self.ari.hangup(&old_em).await {
            tracing::warn!(caller = %call.caller, "cannot hang up {old_em} after the move: {e}");
        }
        Self::check(call)
    }

    /// Creates externalMedia channel `em` toward the relay that holds relay channel `id`
    /// (`ip`: its address, or control's `--bind-ip`) and tells the relay where Asterisk sends
    /// from.
    async fn open_external_media(
        &self,
        call: &Call,
        em: &str,
        id: &ChannelId,
        ip: Option<std::net::IpAddr>,
        port: u16,
        format: relay_proto::Format,
    ) -> Result<(), SetupError> {
        let fail = |stage| move |e: &dyn fmt::Display| SetupError::Failed(stage, e.to_string());
        let host = SocketAddr::new(ip.unwrap_or(self.cfg.bind_ip), port).to_string();
        let channel = self
            .ari
            .external_media(em, &host, format.as_str())
            .await
            .map_err(|e| fail(Stage::ExternalMedia)(&e))?;
        let source = channel
            .rtp_source()
            .map_err(|e| fail(Stage::ExternalMedia)(&e))?;
        self.relay
            .update(id, source)
            .await
            .map_err(|e| fail(Stage::Relay)(&e))?;
        Self::check(call)
    }

    /// Waits for externalMedia channel `em` (the call's `generation`-th) to enter Stasis (its
    /// StasisStart may come before or after its POST replied), then adds `members` to the
    /// call's bridge, retrying while Asterisk answers 422.
    async fn join_bridge(
        &self,
        call: &Call,
        em: &str,
        generation: u32,
        members: &[&str],
    ) -> Result<(), SetupError> {
        let mut ready = call.em_ready.subscribe();
        let mut ended = call.ended.subscribe();
        tokio::select! {
            r = tokio::time::timeout(STASIS_WAIT, ready.wait_for(|r| *r > generation)) => {
                if r.is_err() {
                    return Err(SetupError::Failed(Stage::ExternalMedia, format!("no StasisStart for {em} within {STASIS_WAIT:?}")));
                }
            }
            _ = ended.wait_for(|e| *e) => return Err(SetupError::Ended),
        }
        let mut attempt = 0;
        loop {
            Self::check(call)?;
            attempt += 1;
            match self.ari.add_to_bridge(&call.bridge, members).await {
                Ok(()) => return Ok(()),
                Err(e) if e.status() == Some(422) && attempt < BRIDGE_ATTEMPTS => {
                    tokio::time::sleep(Duration::from_millis(10 << attempt)).await;
                }
                Err(e) => return Err(SetupError::Failed(Stage::Bridge, e.to_string())),
            }
        }
    }

    fn check(call: &Call) -> Result<(), SetupError> {
        if call.is_ended() {
            Err(SetupError::Ended)
        } else {
            Ok(())
        }
    }

    async fn setup(&self, call: &Call, held: &mut Held) -> Result<(), SetupError> {
        let fail = |stage| move |e: &dyn fmt::Display| SetupError::Failed(stage, e.to_string());

        // Answer, retrying while Asterisk says the channel is not found yet.
        let mut attempt = 0;
        loop {
            Self::check(call)?;
            attempt += 1;
            match self.ari.answer(&call.caller).await {
                Ok(()) => break,
                Err(e) if e.status() == Some(404) && attempt < ANSWER_ATTEMPTS => {
                    tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
                }
                Err(e) => return Err(fail(Stage::Answer)(&e)),
            }
        }
        Self::check(call)?;

        let port = {
            let mut p = lock(&self.pool);
            let port = p.take();
            self.pool_gauges(&p);
            port
        };
        let port = port.ok_or_else(|| {
            SetupError::Failed(Stage::Port, format!("all {} ports in use", self.ports().1))
        })?;
        held.port = Some(port);

        let format = self.media_format(call).await;
        held.format = Some(format);
        Self::check(call)?;

        let id = ChannelId::try_from(call.em.as_str()).map_err(|e| fail(Stage::Relay)(&e))?;
        held.relay = Some(id.clone());
        let placed = match self.relay.add(&id, port, self.cfg.echo, format).await {
            Ok(p) => p,
            Err(RelayError::NoRelay) => {
                return Err(SetupError::NoRelay(RelayError::NoRelay.to_string()))
            }
            Err(e) => return Err(fail(Stage::Relay)(&e)),
        };
        held.relays.push(placed.relay);
        held.relay_since.get_or_insert_with(Instant::now);
        Self::check(call)?;

        held.ems.push(call.em.clone());
        self.open_external_media(call, &call.em, &id, placed.ip, port, format)
            .await?;

        held.bridge = true;
        self.ari
            .create_bridge(&call.bridge)
            .await
            .map_err(|e| fail(Stage::Bridge)(&e))?;

        self.join_bridge(call, &call.em, 0, &[&call.caller, &call.em])
            .await?;
        Self::check(call)
    }

    /// The externalMedia channel's format: fixed, or (`auto`) the caller's native format where
    /// the relay measures it, so that Asterisk transcodes nothing; otherwise the fallback, and
    /// the call is counted and logged, because it measures Asterisk's transcoder too.
    async fn media_format(&self, call: &Call) -> relay_proto::Format {
        let MediaFormat::Fixed(f) = self.cfg.format else {
            let native = self
                .ari
                .variable(&call.caller, "CHANNEL(audionativeformat)")
                .await;
            let (picked, native) = match native {
                Ok(v) => (crate::config::pick_native(&v), v),
                Err(e) => (None, format!("unknown: {e}")),
            };
            if let Some(f) = picked {
                return f;
            }
            let fallback = self.cfg.media_fallback;
            let label = native
                .trim_start_matches('(')
                .trim_end_matches(')')
                .split([':', ' '])
                .next()
                .unwrap_or("unknown")
                .to_owned();
            self.metrics
                .transcoded
                .with_label_values(&[if label.is_empty() { "unknown" } else { &label }])
                .inc();
            tracing::info!(
                caller = %call.caller,
                native = %native,
                "the caller's native format is none the relay measures: externalMedia in {fallback}, \
                 so Asterisk transcodes this call (rtprelay_control_transcoded_calls_total)"
            );
            return fallback;
        };
        f
    }

    /// Releases everything `held` records: hangs up whichever channel is still there, destroys
    /// the bridge, removes the relay channel (logging its final statistics, which it returns),
    /// returns the port.
    async fn teardown(&self, call: &Call, mut held: Held) -> Measured {
        use std::sync::atomic::Ordering::Relaxed;
        let log = |what: &str, e: &RestError| {
            tracing::warn!(caller = %call.caller, "teardown: cannot {what}: {e}");
        };
        if !call.caller_gone.load(Relaxed) {
            if let Err(e) = self.ari.hangup(&call.caller).await {
                log("hang up the caller", &e);
            }
        }
        let current = call.current_em();
        for em in &held.ems {
            if *em == current && call.em_gone.load(Relaxed) {
                continue;
            }
            if let Err(e) = self.ari.hangup(em).await {
                log("hang up the externalMedia channel", &e);
            }
        }
        if held.bridge {
            if let Err(e) = self.ari.destroy_bridge(&call.bridge).await {
                log("destroy the bridge", &e);
            }
        }
        let mut stats = None;
        if let Some(id) = &held.relay {
            match self.relay.remove(id).await {
                Ok(Removed { stats: s, figures }) => {
                    held.figures.extend(figures);
                    tracing::info!(
                    caller = %call.caller,
                    to_echo = s.traffic.to_echo.packets,
                    to_asterisk = s.traffic.to_asterisk.packets,
                    rtt_p50_us = s.rtt.p50_ns / 1_000,
                    rtt_p99_us = s.rtt.p99_ns / 1_000,
                    lost = s.streams.to_asterisk.lost,
                    echo_timeouts = s.round_trip.timeouts,
                    mos = s.score.mos,
                    "call ended: relay channel statistics"
                    );
                    stats = Some(s);
                }
                Err(e) => tracing::warn!(caller = %call.caller, "teardown: relay remove: {e}"),
            }
        }
        if let Some(port) = held.port {
            let mut p = lock(&self.pool);
            if let Err(e) = p.give_back(port) {
                tracing::error!("port pool: {e}");
            }
            self.pool_gauges(&p);
        }
        measured(call, &held, stats)
    }

    /// Cleans up after a (re)connection: calls whose channels no longer exist end; control's
    /// externalMedia channels and bridges that no call owns are hung up and destroyed.
    ///
    /// # Errors
    /// ARI could not list channels or bridges.
    pub async fn reconcile(self: &Arc<Self>) -> Result<(), RestError> {
        use std::sync::atomic::Ordering::Relaxed;
        // Only calls that existed before the listing can be judged by it.
        let listed_at = Instant::now();
        let channels = self.ari.channels().await?;
        let bridges = self.ari.bridges().await?;
        let present: HashSet<&str> = channels.iter().map(|c| c.id.as_str()).collect();
        let mut ended = 0usize;
        let (stale_channels, stale_bridges) = {
            let r = lock(&self.registry);
            for call in r.by_caller.values() {
                if call.created < listed_at && !present.contains(call.caller.as_str()) {
                    call.caller_gone.store(true, Relaxed);
                    call.ended_by(EndedBy::Asterisk);
                    ended += 1;
                    self.metrics.reconciled.with_label_values(&["call"]).inc();
                }
            }
            for c in &channels {
                if let Some(call) = r.by_em.get(&c.id) {
                    // Its StasisStart may have been missed while disconnected.
                    call.em_in_stasis(&c.id);
                }
            }
            let stale_channels: Vec<String> = channels
                .iter()
                .filter(|c| c.id.starts_with(EXTERNAL_MEDIA_PREFIX) && !r.by_em.contains_key(&c.id))
                .map(|c| c.id.clone())
                .collect();
            let stale_bridges: Vec<String> = bridges
                .iter()
                .filter(|b| {
                    b.id.strip_prefix(BRIDGE_PREFIX)
                        .is_some_and(|caller| !r.by_caller.contains_key(caller))
                })
                .map(|b| b.id.clone())
                .collect();
            (stale_channels, stale_bridges)
        };
        // Callers that entered the application while the WebSocket was down: their StasisStart
        // was lost, so start them now.
        let mut adopted = 0usize;
        for c in &channels {
            if !c.is_ours() && c.in_stasis(&self.cfg.app_name) {
                let known = lock(&self.registry).by_caller.contains_key(&c.id);
                self.stasis_start(c);
                adopted += usize::from(!known);
            }
        }
        let (mut hung_up, mut destroyed) = (0usize, 0usize);
        for id in &stale_channels {
            if self.ari.hangup(id).await? {
                hung_up += 1;
                self.metrics
                    .reconciled
                    .with_label_values(&["channel"])
                    .inc();
            }
        }
        for id in &stale_bridges {
            if self.ari.destroy_bridge(id).await? {
                destroyed += 1;
                self.metrics.reconciled.with_label_values(&["bridge"]).inc();
            }
        }
        tracing::info!(
            channels = channels.len(),
            bridges = bridges.len(),
            calls_ended = ended,
            callers_adopted = adopted,
            leftover_channels_hung_up = hung_up,
            leftover_bridges_destroyed = destroyed,
            "reconciled with Asterisk"
        );
        Ok(())
    }

    /// Ends every call and waits (up to `deadline`) for their teardowns.
    pub async fn shutdown(&self, deadline: Duration) {
        for call in lock(&self.registry).by_caller.values() {
            call.ended_by(EndedBy::Control);
        }
        self.tasks.close();
        if tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some calls were still tearing down at exit");
        }
    }
}

#[cfg(test)]
mod tests;
