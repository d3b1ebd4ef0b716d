//! The call path against recording fakes of ARI and the relay, on tokio's paused clock: the
//! retries, the externalMedia StasisStart timeout and every teardown run in milliseconds, and
//! their delays are asserted in virtual time. The fakes share one log of the requests made, so a
//! test asserts their order across ARI and the relay, and that whatever a call created is gone.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::ops::RangeInclusive;

use super::*;

const CALLER: &str = "1732179600.42";
const EM: &str = "rtprelay-em-1732179600.42";
const BRIDGE: &str = "rtprelay-br-1732179600.42";
/// Where the fake Asterisk sends an externalMedia channel's RTP from.
const ASTERISK_RTP: &str = "127.0.0.1:18074";
/// The ports the harness's pool holds by default.
const PORTS: RangeInclusive<u16> = 21_000..=21_003;

/// A request one of the fakes received.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    Answer(String),
    Variable(String),
    ExternalMedia { id: String, host: String },
    CreateBridge(String),
    AddToBridge(String, Vec<String>),
    Hangup(String),
    DestroyBridge(String),
    ListChannels,
    ListBridges,
    RelayAdd { id: String, port: u16 },
    RelayUpdate { id: String, asterisk: SocketAddr },
    RelayRemove(String),
    RelayAbandon(String),
}

impl Op {
    /// The kind of request, which replies and latencies are scripted by.
    const fn kind(&self) -> &'static str {
        match self {
            Self::Answer(_) => "answer",
            Self::Variable(_) => "variable",
            Self::ExternalMedia { .. } => "external_media",
            Self::CreateBridge(_) => "create_bridge",
            Self::AddToBridge(..) => "add_to_bridge",
            Self::Hangup(_) => "hangup",
            Self::DestroyBridge(_) => "destroy_bridge",
            Self::ListChannels => "channels",
            Self::ListBridges => "bridges",
            Self::RelayAdd { .. } => "relay_add",
            Self::RelayUpdate { .. } => "relay_update",
            Self::RelayRemove(_) => "relay_remove",
            Self::RelayAbandon(_) => "relay_abandon",
        }
    }
}

impl Op {
    /// The channel, bridge or relay channel the request is about (a bridge's, for addChannel).
    fn target(&self) -> Option<&str> {
        match self {
            Self::Answer(id)
            | Self::Variable(id)
            | Self::ExternalMedia { id, .. }
            | Self::CreateBridge(id)
            | Self::AddToBridge(id, _)
            | Self::Hangup(id)
            | Self::DestroyBridge(id)
            | Self::RelayAdd { id, .. }
            | Self::RelayUpdate { id, .. }
            | Self::RelayRemove(id)
            | Self::RelayAbandon(id) => Some(id),
            Self::ListChannels | Self::ListBridges => None,
        }
    }
}

/// What a fake answers to one request.
#[derive(Clone, Copy, Debug)]
enum Reply {
    /// Success.
    Ok,
    /// ARI answers with this HTTP status; the relay refuses.
    Status(u16),
    /// The relay pool has no relay with room.
    NoRelay,
}

/// What both fakes share: what they will answer, and what they were asked, when.
#[derive(Debug)]
struct Fakes {
    /// Virtual time zero.
    start: tokio::time::Instant,
    /// Replies to come, by request kind; a kind with none left succeeds.
    replies: Mutex<HashMap<&'static str, VecDeque<Reply>>>,
    /// How long a kind of request takes before its reply (none: no time).
    latency: Mutex<HashMap<&'static str, Duration>>,
    /// Every request, as it was made, with its virtual time.
    log: watch::Sender<Vec<(Duration, Op)>>,
    /// The address the relay's `add` says Asterisk must send to (a relay on another host), or
    /// none (control's `--bind-ip`).
    relay_ip: Mutex<Option<IpAddr>>,
    /// Relay channels whose relay the test has declared lost.
    lost: watch::Sender<Vec<String>>,
}

impl Fakes {
    /// The next `n` requests of `kind` get `reply`.
    fn script(&self, kind: &'static str, n: usize, reply: Reply) {
        lock(&self.replies)
            .entry(kind)
            .or_default()
            .extend(std::iter::repeat_n(reply, n));
    }

    /// Requests of `kind` take `d`.
    fn delay(&self, kind: &'static str, d: Duration) {
        lock(&self.latency).insert(kind, d);
    }

    async fn request(&self, op: Op) -> Reply {
        let kind = op.kind();
        let reply = lock(&self.replies)
            .get_mut(kind)
            .and_then(VecDeque::pop_front)
            .unwrap_or(Reply::Ok);
        let latency = lock(&self.latency).get(kind).copied();
        let at = self.start.elapsed();
        self.log.send_modify(|log| log.push((at, op)));
        if let Some(d) = latency {
            tokio::time::sleep(d).await;
        }
        reply
    }

    async fn ari(&self, op: Op) -> Result<(), RestError> {
        let op_name = op.kind();
        match self.request(op).await {
            Reply::Ok => Ok(()),
            Reply::Status(status) => Err(RestError::Status {
                op: op_name,
                status,
                message: "scripted".into(),
            }),
            Reply::NoRelay => unreachable!("a relay reply scripted for ARI"),
        }
    }

    async fn relay(&self, op: Op) -> Result<(), RelayError> {
        let command = op.kind();
        match self.request(op).await {
            Reply::Ok => Ok(()),
            Reply::Status(_) => Err(RelayError::Refused {
                command,
                message: "scripted".into(),
            }),
            Reply::NoRelay => Err(RelayError::NoRelay),
        }
    }
}

/// ARI as the controller sees it, answering from the script.
#[derive(Debug)]
struct FakeAri(Arc<Fakes>);

impl AriOps for FakeAri {
    async fn answer(&self, channel: &str) -> Result<(), RestError> {
        self.0.ari(Op::Answer(channel.into())).await
    }

    async fn hangup(&self, channel: &str) -> Result<bool, RestError> {
        self.0.ari(Op::Hangup(channel.into())).await.map(|()| true)
    }

    async fn external_media(
        &self,
        channel_id: &str,
        external_host: &str,
        _format: &str,
    ) -> Result<Channel, RestError> {
        let op = Op::ExternalMedia {
            id: channel_id.into(),
            host: external_host.into(),
        };
        self.0.ari(op).await?;
        let (ip, port) = ASTERISK_RTP.split_once(':').unwrap_or_default();
        Ok(Channel {
            id: channel_id.into(),
            name: format!("UnicastRTP/{external_host}-00000001"),
            state: "Down".into(),
            channelvars: Some(HashMap::from([
                ("UNICASTRTP_LOCAL_ADDRESS".into(), ip.into()),
                ("UNICASTRTP_LOCAL_PORT".into(), port.into()),
            ])),
            dialplan: None,
        })
    }

    async fn create_bridge(&self, id: &str) -> Result<(), RestError> {
        self.0.ari(Op::CreateBridge(id.into())).await
    }

    async fn add_to_bridge(&self, bridge: &str, channels: &[&str]) -> Result<(), RestError> {
        let channels = channels.iter().map(|&c| c.to_owned()).collect();
        self.0.ari(Op::AddToBridge(bridge.into(), channels)).await
    }

    async fn destroy_bridge(&self, id: &str) -> Result<bool, RestError> {
        self.0
            .ari(Op::DestroyBridge(id.into()))
            .await
            .map(|()| true)
    }

    async fn variable(&self, channel: &str, _name: &str) -> Result<String, RestError> {
        self.0.ari(Op::Variable(channel.into())).await?;
        Ok("(ulaw)".into())
    }

    async fn channels(&self) -> Result<Vec<Channel>, RestError> {
        self.0.ari(Op::ListChannels).await.map(|()| Vec::new())
    }

    async fn bridges(&self) -> Result<Vec<Bridge>, RestError> {
        self.0.ari(Op::ListBridges).await.map(|()| Vec::new())
    }
}

/// The relay as the controller sees it, answering from the script.
#[derive(Debug)]
struct FakeRelay(Arc<Fakes>);

impl RelayOps for FakeRelay {
    async fn add(
        &self,
        id: &ChannelId,
        port: u16,
        _echo: SocketAddr,
        _format: relay_proto::Format,
    ) -> Result<Placed, RelayError> {
        let op = Op::RelayAdd {
            id: id.as_str().into(),
            port,
        };
        self.0.relay(op).await?;
        let ip = *lock(&self.0.relay_ip);
        Ok(Placed {
            ip,
            relay: ip.map_or_else(|| "local".into(), |ip| format!("relay-{ip}")),
        })
    }

    async fn update(&self, id: &ChannelId, asterisk: SocketAddr) -> Result<(), RelayError> {
        let op = Op::RelayUpdate {
            id: id.as_str().into(),
            asterisk,
        };
        self.0.relay(op).await
    }

    async fn remove(&self, id: &ChannelId) -> Result<Removed, RelayError> {
        self.0.relay(Op::RelayRemove(id.as_str().into())).await?;
        let stats = fake_stats(id);
        let mut figures =
            ChannelFigures::new(&stats, &relay_proto::stats::LatencyHistogram::<u64>::new(2));
        figures.traffic.to_echo.packets = 5;
        Ok(Removed {
            stats,
            figures: vec![figures],
        })
    }

    async fn lost(&self, id: &ChannelId) {
        let mut lost = self.0.lost.subscribe();
        let _ = lost.wait_for(|l| l.iter().any(|x| x == id.as_str())).await;
    }

    fn abandon(&self, id: &ChannelId) -> Vec<ChannelFigures> {
        let at = self.0.start.elapsed();
        self.0
            .log
            .send_modify(|log| log.push((at, Op::RelayAbandon(id.as_str().into()))));
        // The lost relay's last interim: 3 packets each way, covering 1 s.
        let mut stats = fake_stats(id);
        stats.traffic.to_echo.packets = 3;
        stats.age_ns = 1_000_000_000;
        vec![ChannelFigures::new(
            &stats,
            &relay_proto::stats::LatencyHistogram::<u64>::new(2),
        )]
    }
}

/// A relay channel's statistics with nothing measured.
fn fake_stats(id: &ChannelId) -> ChannelStats {
    ChannelStats {
        echo: SocketAddr::from(([127, 0, 0, 1], 4000)),
        ..ChannelStats::empty(id.clone())
    }
}

/// A controller on the fakes: externalMedia in ulaw, its call records kept in memory.
struct Harness {
    ctl: Arc<Controller<FakeAri, FakeRelay>>,
    fakes: Arc<Fakes>,
    metrics: Arc<Metrics>,
    log: CallLog,
    ports: usize,
}

fn harness(ports: RangeInclusive<u16>) -> Harness {
    let cfg = Config {
        ari_url: "http://127.0.0.1:8088".into(),
        ari_user: "asterisk".into(),
        ari_pass: "secret".parse().unwrap_or_else(|e| match e {}),
        app_name: "rtp-relay".into(),
        bind_ip: [127, 0, 0, 1].into(),
        port_range: ports.clone(),
        echo: SocketAddr::from(([127, 0, 0, 1], 4000)),
        format: MediaFormat::Fixed(relay_proto::Format::Ulaw),
        media_fallback: relay_proto::Format::Ulaw,
        summary_interval: None,
        relays: vec![crate::relay_link::Endpoint::Unix(
            "/nonexistent/relay.sock".into(),
        )],
        relay_grace: Duration::from_millis(500),
        interim: Duration::from_secs(2),
        metrics: SocketAddr::from(([127, 0, 0, 1], 0)),
        call_log: None,
    };
    let fakes = Arc::new(Fakes {
        start: tokio::time::Instant::now(),
        replies: Mutex::default(),
        latency: Mutex::default(),
        log: watch::Sender::new(Vec::new()),
        relay_ip: Mutex::default(),
        lost: watch::Sender::new(Vec::new()),
    });
    let metrics = Arc::new(Metrics::new());
    let log = CallLog::in_memory();
    let ctl = Controller::new(
        cfg,
        FakeAri(Arc::clone(&fakes)),
        FakeRelay(Arc::clone(&fakes)),
        Arc::clone(&metrics),
        Some(log.clone()),
    );
    Harness {
        ctl,
        fakes,
        metrics,
        log,
        ports: ports.count(),
    }
}

fn channel(id: &str, name: &str) -> Channel {
    Channel {
        id: id.into(),
        name: name.into(),
        state: "Up".into(),
        channelvars: None,
        dialplan: None,
    }
}

fn em_of(caller: &str) -> String {
    format!("{EXTERNAL_MEDIA_PREFIX}{caller}")
}

/// The set-up requests of the call `caller`, in order, when every one succeeds at once with the
/// pool's first port (21000); a test takes as many as were made.
fn setup_ops(caller: &str, port: u16) -> Vec<Op> {
    let (em, bridge) = (em_of(caller), format!("{BRIDGE_PREFIX}{caller}"));
    vec![
        Op::Answer(caller.into()),
        Op::RelayAdd {
            id: em.clone(),
            port,
        },
        Op::ExternalMedia {
            id: em.clone(),
            host: format!("127.0.0.1:{port}"),
        },
        Op::RelayUpdate {
            id: em.clone(),
            asterisk: ASTERISK_RTP.parse().unwrap(),
        },
        Op::CreateBridge(bridge.clone()),
        Op::AddToBridge(bridge, vec![caller.into(), em]),
    ]
}

fn first_setup_ops(n: usize) -> Vec<Op> {
    setup_ops(CALLER, 21_000).into_iter().take(n).collect()
}

impl Harness {
    fn caller_arrives(&self, id: &str) {
        self.ctl.handle_event(Event::StasisStart {
            channel: channel(id, "PJSIP/load-00000001"),
            args: Vec::new(),
        });
    }

    /// The externalMedia channel of `caller` enters Stasis.
    fn em_arrives(&self, caller: &str) {
        self.ctl.handle_event(Event::StasisStart {
            channel: channel(&em_of(caller), "UnicastRTP/127.0.0.1:21000-00000001"),
            args: Vec::new(),
        });
    }

    /// The externalMedia channel `id` enters Stasis, or leaves it.
    fn em_event(&self, id: &str, enters: bool) {
        let channel = channel(id, "UnicastRTP/10.0.0.22:21000-00000002");
        self.ctl.handle_event(if enters {
            Event::StasisStart {
                channel,
                args: Vec::new(),
            }
        } else {
            Event::StasisEnd { channel }
        });
    }

    /// The relay holding relay channel `id` is lost.
    fn relay_lost(&self, id: &str) {
        self.fakes.lost.send_modify(|l| l.push(id.to_owned()));
    }

    fn caller_leaves(&self, id: &str) {
        self.ctl.handle_event(Event::StasisEnd {
            channel: channel(id, "PJSIP/load-00000001"),
        });
    }

    /// Waits (up to a virtual minute) until `op` has been requested.
    async fn requested(&self, op: &Op) {
        let mut log = self.fakes.log.subscribe();
        let seen = log.wait_for(|log| log.iter().any(|(_, o)| o == op));
        tokio::time::timeout(Duration::from_secs(60), seen)
            .await
            .unwrap_or_else(|_| panic!("{op:?} never requested: {:?}", self.ops()))
            .unwrap_or_else(|_| unreachable!("the harness holds the sender"));
    }

    /// Waits (up to a virtual minute) until every call task has finished.
    async fn finished(&self) {
        self.ctl.tasks.close();
        if tokio::time::timeout(Duration::from_secs(60), self.ctl.tasks.wait())
            .await
            .is_err()
        {
            panic!("calls still running after a minute: {:?}", self.ops());
        }
        self.ctl.tasks.reopen();
    }

    fn timed_ops(&self) -> Vec<(Duration, Op)> {
        self.fakes.log.borrow().clone()
    }

    fn ops(&self) -> Vec<Op> {
        self.timed_ops().into_iter().map(|(_, op)| op).collect()
    }

    /// The requests concerning `caller` (its channel, its externalMedia channel, its bridge).
    fn ops_of(&self, caller: &str) -> Vec<Op> {
        let ids = [
            caller.to_owned(),
            em_of(caller),
            format!("{BRIDGE_PREFIX}{caller}"),
        ];
        self.ops()
            .into_iter()
            .filter(|op| op.target().is_some_and(|t| ids.iter().any(|id| id == t)))
            .collect()
    }

    /// The virtual times at which `op` was requested.
    fn times(&self, op: &Op) -> Vec<Duration> {
        self.timed_ops()
            .into_iter()
            .filter(|(_, o)| o == op)
            .map(|(t, _)| t)
            .collect()
    }

    fn record(&self, caller: &str) -> serde_json::Value {
        let json = self
            .log
            .record(caller)
            .unwrap_or_else(|| panic!("no call record for {caller}"));
        serde_json::from_str(&json).unwrap()
    }

    fn outcomes(&self, outcome: &str) -> u64 {
        self.metrics.calls.with_label_values(&[outcome]).get()
    }

    fn failures(&self, stage: &str) -> u64 {
        self.metrics
            .setup_failures
            .with_label_values(&[stage])
            .get()
    }

    /// Nothing is left: no call, every port free, every relay channel removed, every bridge
    /// destroyed, every externalMedia channel hung up (unless `em_left`, it left on its own).
    fn assert_released(&self, em_left: bool) {
        assert_eq!(self.ctl.active(), 0, "calls left");
        assert_eq!(self.metrics.calls_active.get(), 0);
        let (free, in_use, _) = self.ctl.ports();
        assert_eq!((free, in_use), (self.ports, 0), "ports not returned");
        assert_eq!(self.metrics.ports_in_use.get(), 0);
        let ops = self.ops();
        let after = |made: usize, undo: &Op| ops.iter().skip(made).any(|o| o == undo);
        for (i, op) in ops.iter().enumerate() {
            let undo = match op {
                // A channel on a lost relay is abandoned, not removed.
                Op::RelayAdd { id, .. } if after(i, &Op::RelayAbandon(id.clone())) => continue,
                Op::RelayAdd { id, .. } => Op::RelayRemove(id.clone()),
                Op::CreateBridge(id) => Op::DestroyBridge(id.clone()),
                Op::ExternalMedia { id, .. } if !em_left => Op::Hangup(id.clone()),
                _ => continue,
            };
            assert!(after(i, &undo), "{op:?} not undone: {ops:?}");
        }
    }
}

/// The call's teardown requests after a failure, given what it had created by then.
fn teardown_ops(relay: bool, em: bool, bridge: bool, caller_gone: bool) -> Vec<Op> {
    let mut ops = Vec::new();
    if !caller_gone {
        ops.push(Op::Hangup(CALLER.into()));
    }
    if em {
        ops.push(Op::Hangup(EM.into()));
    }
    if bridge {
        ops.push(Op::DestroyBridge(BRIDGE.into()));
    }
    if relay {
        ops.push(Op::RelayRemove(EM.into()));
    }
    ops
}

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[tokio::test(start_paused = true)]
async fn a_call_is_bridged_then_torn_down_in_order_when_the_caller_hangs_up() {
    let h = harness(PORTS);
    h.caller_arrives(CALLER);
    h.requested(&Op::CreateBridge(BRIDGE.into())).await;
    h.em_arrives(CALLER);
    let add = first_setup_ops(6).pop().unwrap();
    h.requested(&add).await;
    tokio::task::yield_now().await;
    assert_eq!(h.ops(), first_setup_ops(6));
    assert_eq!(h.ctl.active(), 1);
    assert_eq!(h.ctl.ports(), (h.ports - 1, 1, 0));
    assert_eq!(h.metrics.calls_bridged.get(), 1);

    h.caller_leaves(CALLER);
    h.finished().await;
    let mut want = first_setup_ops(6);
    want.extend(teardown_ops(true, true, true, true));
    assert_eq!(h.ops(), want, "no hang-up of a caller that is gone");
    assert_eq!(h.outcomes("completed"), 1);
    let r = h.record(CALLER);
    assert_eq!(r["ended_by"], "caller");
    assert_eq!(r["relay_port"], 21_000);
    assert!(r["bridged"].is_string(), "{r}");
    assert!(
        r["relay"].is_object(),
        "the relay's final figures are kept: {r}"
    );
    assert!(r["failure_stage"].is_null(), "{r}");
    h.assert_released(false);
}

#[tokio::test(start_paused = true)]
async fn a_relay_on_another_host_gets_the_external_media_sent_to_its_advertised_address() {
    let h = harness(PORTS);
    *lock(&h.fakes.relay_ip) = Some([10, 0, 0, 21].into());
    h.caller_arrives(CALLER);
    h.requested(&Op::CreateBridge(BRIDGE.into())).await;
    let em = h
        .ops()
        .into_iter()
        .find(|o| matches!(o, Op::ExternalMedia { .. }))
        .unwrap();
    assert_eq!(
        em,
        Op::ExternalMedia {
            id: em_of(CALLER),
            host: "10.0.0.21:21000".into(),
        },
        "not control's --bind-ip (127.0.0.1)"
    );
    h.caller_leaves(CALLER);
    h.finished().await;
    h.assert_released(false);
}

#[tokio::test(start_paused = true)]
async fn answer_retries_404_after_40_80_160_320_ms_then_gives_up_at_the_fifth() {
    let h = harness(PORTS);
    h.fakes.script("answer", 5, Reply::Status(404));
    h.caller_arrives(CALLER);
    h.finished().await;
    let answer = Op::Answer(CALLER.into());
    assert_eq!(
        h.times(&answer),
        [ms(0), ms(40), ms(120), ms(280), ms(600)],
        "5 attempts, 20 << attempt ms apart"
    );
    assert_eq!(
        h.timed_ops().last(),
        Some(&(ms(600), Op::Hangup(CALLER.into()))),
        "the caller is hung up as soon as the fifth 404 comes"
    );
    assert_eq!(h.ops().len(), 6, "nothing but answers and the hang-up");
    assert_eq!(h.failures("answer"), 1);
    assert_eq!(h.outcomes("failed"), 1);
    let r = h.record(CALLER);
    assert_eq!(r["failure_stage"], "answer");
    assert!(r["failure"].as_str().unwrap().contains("HTTP 404"), "{r}");
    assert!(r["relay_port"].is_null(), "no port was taken: {r}");
    h.assert_released(false);
}

#[tokio::test(start_paused = true)]
async fn answer_succeeding_at_the_fifth_attempt_sets_the_call_up() {
    let h = harness(PORTS);
    h.fakes.script("answer", 4, Reply::Status(404));
    h.caller_arrives(CALLER);
    h.requested(&Op::CreateBridge(BRIDGE.into())).await;
    h.em_arrives(CALLER);
    h.requested(&first_setup_ops(6).pop().unwrap()).await;
    assert_eq!(
        h.times(&Op::Answer(CALLER.into())),
        [ms(0), ms(40), ms(120), ms(280), ms(600)]
    );
    let relay_add = first_setup_ops(2).pop().unwrap();
    assert_eq!(h.times(&relay_add), [ms(600)], "set-up goes on at once");
    tokio::task::yield_now().await;
    assert_eq!(h.metrics.calls_bridged.get(), 1);
    assert_eq!(h.failures("answer"), 0);
    h.caller_leaves(CALLER);
    h.finished().await;
    assert_eq!(h.outcomes("completed"), 1);
    h.assert_released(false);
}

#[tokio::test(start_paused = true)]
async fn add_channel_retries_422_after_20_40_80_160_ms_then_gives_up_at_the_fifth() {
    let h = harness(PORTS);
    h.fakes.script("add_to_bridge", 5, Reply::Status(422));
    h.caller_arrives(CALLER);
    h.requested(&Op::CreateBridge(BRIDGE.into())).await;
    h.em_arrives(CALLER);
    h.finished().await;
    let add = first_setup_ops(6).pop().unwrap();
    assert_eq!(
        h.times(&add),
        [ms(0), ms(20), ms(60), ms(140), ms(300)],
        "5 attempts, 10 << attempt ms apart"
    );
    let mut want = first_setup_ops(5);
    want.extend(std::iter::repeat_n(add, 5));
    want.extend(teardown_ops(true, true, true, false));
    assert_eq!(h.ops(), want);
    assert!(
        h.timed_ops().iter().skip(10).all(|(t, _)| *t == ms(300)),
        "teardown at once after the fifth 422: {:?}",
        h.timed_ops()
    );
    assert_eq!(h.failures("bridge"), 1);
    assert_eq!(h.outcomes("failed"), 1);
    assert_eq!(h.metrics.calls_bridged.get(), 0);
    let r = h.record(CALLER);
    assert_eq!(r["failure_stage"], "bridge");
    assert!(r["failure"].as_str().unwrap().contains("HTTP 422"), "{r}");
    h.assert_released(false);
}

#[tokio::test(start_paused = true)]
async fn add_channel_succeeding_at_the_fifth_attempt_bridges_the_call() {
    let h = harness(PORTS);
    h.fakes.script("add_to_bridge", 4, Reply::Status(422));
    h.caller_arrives(CALLER);
    h.requested(&Op::CreateBridge(BRIDGE.into())).await;
    h.em_arrives(CALLER);
    tokio::time::sleep(ms(1_000)).await;
    let add = first_setup_ops(6).pop().unwrap();
    assert_eq!(h.times(&add), [ms(0), ms(20), ms(60), ms(140), ms(300)]);
    assert_eq!(h.metrics.calls_bridged.get(), 1);
    assert_eq!(h.ctl.active(), 1, "the bridged call stays until it ends");
    h.caller_leaves(CALLER);
    h.finished().await;
    assert_eq!(h.outcomes("completed"), 1);
    assert!(h.record(CALLER)["bridged"].is_string());
    h.assert_released(false);
}

#[tokio::test(start_paused = true)]
async fn no_stasis_start_for_the_external_media_channel_fails_the_call_after_5_s() {
    let h = harness(PORTS);
    h.caller_arrives(CALLER);
    tokio::time::sleep_until(h.fakes.start + ms(4_999)).await;
    assert_eq!(h.ops(), first_setup_ops(5), "still waiting at 4.999 s");
    assert_eq!(h.ctl.active(), 1);
    h.finished().await;
    let mut want = first_setup_ops(5);
    want.extend(teardown_ops(true, true, true, false));
    assert_eq!(h.ops(), want);
    let teardown: Vec<Duration> = h.timed_ops().iter().skip(5).map(|(t, _)| *t).collect();
    assert_eq!(teardown, [ms(5_000); 4], "torn down at 5 s exactly");
    assert_eq!(h.failures("external_media"), 1);
    assert_eq!(h.outcomes("failed"), 1);
    let r = h.record(CALLER);
    assert_eq!(r["failure_stage"], "external_media");
    assert!(
        r["failure"].as_str().unwrap().contains("no StasisStart"),
        "{r}"
    );
    assert_eq!(r["ended_by"], "control");
    h.assert_released(false);
}

#[tokio::test(start_paused = true)]
async fn a_stasis_start_before_the_external_media_reply_is_not_missed() {
    let h = harness(PORTS);
    h.fakes.delay("external_media", ms(50));
    h.caller_arrives(CALLER);
    h.requested(&first_setup_ops(3).pop().unwrap()).await;
    h.em_arrives(CALLER);
    h.requested(&first_setup_ops(6).pop().unwrap()).await;
    assert_eq!(h.ops(), first_setup_ops(6));
    assert_eq!(h.timed_ops().last().map(|(t, _)| *t), Some(ms(50)));
    h.caller_leaves(CALLER);
    h.finished().await;
    assert_eq!(h.outcomes("completed"), 1);
    h.assert_released(false);
}

/// Each stage's failure releases exactly what the call had acquired, in the teardown's order
/// (caller, externalMedia channel, bridge, relay channel, port).
#[tokio::test(start_paused = true)]
async fn a_failure_at_each_stage_releases_exactly_what_was_acquired() {
    struct Case {
        /// The request that fails.
        fails: &'static str,
        /// The failure's stage label.
        stage: &'static str,
        /// Set-up requests made, the failed one included.
        made: usize,
        /// Whether the externalMedia channel enters Stasis (once the bridge exists).
        em_starts: bool,
        /// What the teardown undoes: relay channel, externalMedia channel, bridge.
        undo: (bool, bool, bool),
    }
    let cases = [
        Case {
            fails: "answer",
            stage: "answer",
            made: 1,
            em_starts: false,
            undo: (false, false, false),
        },
        Case {
            fails: "relay_add",
            stage: "relay",
            made: 2,
            em_starts: false,
            undo: (true, false, false),
        },
        Case {
            fails: "external_media",
            stage: "external_media",
            made: 3,
            em_starts: false,
            undo: (true, true, false),
        },
        Case {
            fails: "relay_update",
            stage: "relay",
            made: 4,
            em_starts: false,
            undo: (true, true, false),
        },
        Case {
            fails: "create_bridge",
            stage: "bridge",
            made: 5,
            em_starts: false,
            undo: (true, true, true),
        },
        Case {
            fails: "add_to_bridge",
            stage: "bridge",
            made: 6,
            em_starts: true,
            undo: (true, true, true),
        },
    ];
    for case in cases {
        let h = harness(PORTS);
        h.fakes.script(case.fails, 1, Reply::Status(500));
        h.caller_arrives(CALLER);
        if case.em_starts {
            h.requested(&Op::CreateBridge(BRIDGE.into())).await;
            h.em_arrives(CALLER);
        }
        h.finished().await;
        let (relay, em, bridge) = case.undo;
        let mut want = first_setup_ops(case.made);
        want.extend(teardown_ops(relay, em, bridge, false));
        assert_eq!(h.ops(), want, "{} failing", case.fails);
        assert!(
            h.timed_ops().iter().all(|(t, _)| t.is_zero()),
            "{} failing: no wait, no retry",
            case.fails
        );
        assert_eq!(h.failures(case.stage), 1, "{} failing", case.fails);
        assert_eq!(h.outcomes("failed"), 1, "{} failing", case.fails);
        let r = h.record(CALLER);
        assert_eq!(r["failure_stage"], case.stage, "{} failing", case.fails);
        assert_eq!(r["ended_by"], "control");
        let port = (case.made > 1).then_some(21_000);
        assert_eq!(r["relay_port"].as_u64(), port, "{r}");
        h.assert_released(false);
    }
}

#[tokio::test(start_paused = true)]
async fn with_no_port_free_the_caller_is_hung_up_and_nothing_else_is_made() {
    let h = harness(21_000..=21_000);
    h.caller_arrives(CALLER);
    h.requested(&Op::CreateBridge(BRIDGE.into())).await;
    h.caller_arrives("second");
    h.requested(&Op::Hangup("second".into())).await;
    assert_eq!(
        h.ops_of("second"),
        [Op::Answer("second".into()), Op::Hangup("second".into())]
    );
    h.caller_leaves(CALLER);
    h.finished().await;
    assert_eq!(h.failures("port"), 1);
    assert_eq!(h.outcomes("no_port"), 1);
    assert_eq!(h.outcomes("abandoned"), 1, "the first call");
    assert_eq!(h.metrics.ports_exhausted.get(), 1);
    assert_eq!(h.ctl.ports().2, 1, "the pool counts the refusal");
    let r = h.record("second");
    assert_eq!(r["failure_stage"], "port");
    assert!(r["relay_port"].is_null(), "{r}");
    assert!(
        r["failure"]
            .as_str()
            .unwrap()
            .contains("all 1 ports in use"),
        "{r}"
    );
    h.assert_released(false);
}

/// A caller hanging up at any point of the set-up: the call stops at its next step and releases
/// what it holds; a caller already gone is not hung up.
#[tokio::test(start_paused = true)]
async fn a_caller_leaving_mid_setup_leaks_nothing() {
    struct Case {
        /// Where the caller is when it leaves.
        during: &'static str,
        /// Scripted before the call: a request kind that takes 10 ms, or one 404/422 reply.
        slow: Option<&'static str>,
        retry: Option<(&'static str, u16)>,
        /// The caller leaves once this many set-up requests were made.
        leave_after: usize,
        /// The set-up requests made in all.
        made: usize,
        em_starts: bool,
        /// What the teardown undoes: relay channel, externalMedia channel, bridge.
        undo: (bool, bool, bool),
    }
    let cases = [
        Case {
            during: "the wait between answer attempts",
            slow: None,
            retry: Some(("answer", 404)),
            leave_after: 1,
            made: 1,
            em_starts: false,
            undo: (false, false, false),
        },
        Case {
            during: "the relay's add",
            slow: Some("relay_add"),
            retry: None,
            leave_after: 2,
            made: 2,
            em_starts: false,
            undo: (true, false, false),
        },
        Case {
            during: "the externalMedia request",
            slow: Some("external_media"),
            retry: None,
            leave_after: 3,
            made: 4,
            em_starts: false,
            undo: (true, true, false),
        },
        Case {
            during: "the wait for the externalMedia StasisStart",
            slow: None,
            retry: None,
            leave_after: 5,
            made: 5,
            em_starts: false,
            undo: (true, true, true),
        },
        Case {
            during: "the wait between addChannel attempts",
            slow: None,
            retry: Some(("add_to_bridge", 422)),
            leave_after: 6,
            made: 6,
            em_starts: true,
            undo: (true, true, true),
        },
    ];
    for case in cases {
        let h = harness(PORTS);
        if let Some(kind) = case.slow {
            h.fakes.delay(kind, ms(10));
        }
        if let Some((kind, status)) = case.retry {
            h.fakes.script(kind, 1, Reply::Status(status));
        }
        h.caller_arrives(CALLER);
        if case.em_starts {
            h.requested(&Op::CreateBridge(BRIDGE.into())).await;
            h.em_arrives(CALLER);
        }
        h.requested(&first_setup_ops(case.leave_after).pop().unwrap())
            .await;
        h.caller_leaves(CALLER);
        h.finished().await;
        let (relay, em, bridge) = case.undo;
        let mut want = first_setup_ops(case.made);
        want.extend(teardown_ops(relay, em, bridge, true));
        assert_eq!(h.ops(), want, "leaving during {}", case.during);
        assert_eq!(h.outcomes("abandoned"), 1, "leaving during {}", case.during);
        assert_eq!(h.metrics.calls_bridged.get(), 0);
        let r = h.record(CALLER);
        assert_eq!(r["ended_by"], "caller", "leaving during {}", case.during);
        assert!(r["failure_stage"].is_null(), "{r}");
        h.assert_released(false);
    }
}

/// Sets a call up and waits until it is bridged.
async fn bridged(h: &Harness) {
    h.caller_arrives(CALLER);
    h.requested(&Op::CreateBridge(BRIDGE.into())).await;
    h.em_arrives(CALLER);
    h.requested(&first_setup_ops(6).pop().unwrap()).await;
    tokio::task::yield_now().await;
    assert_eq!(h.metrics.calls_bridged.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_call_whose_relay_is_lost_moves_to_another_and_survives_the_old_channels_end() {
    let h = harness(PORTS);
    bridged(&h).await;
    // The next relay is on another host.
    *lock(&h.fakes.relay_ip) = Some([10, 0, 0, 22].into());
    let moved = format!("{EM}-m1");
    h.relay_lost(EM);
    h.requested(&Op::ExternalMedia {
        id: moved.clone(),
        host: "10.0.0.22:21000".into(),
    })
    .await;
    h.em_event(&moved, true);
    h.requested(&Op::Hangup(EM.into())).await;
    // The old channel's StasisEnd does not end the call.
    h.em_event(EM, false);
    tokio::task::yield_now().await;
    assert_eq!(h.ctl.active(), 1, "the call goes on");
    let mut want = first_setup_ops(6);
    want.extend([
        Op::RelayAbandon(EM.into()),
        Op::RelayAdd {
            id: moved.clone(),
            port: 21_000,
        },
        Op::ExternalMedia {
            id: moved.clone(),
            host: "10.0.0.22:21000".into(),
        },
        Op::RelayUpdate {
            id: moved.clone(),
            asterisk: ASTERISK_RTP.parse().unwrap(),
        },
        Op::AddToBridge(BRIDGE.into(), vec![moved.clone()]),
        Op::Hangup(EM.into()),
    ]);
    assert_eq!(
        h.ops(),
        want,
        "same port, a new externalMedia channel, the old one last"
    );
    assert_eq!(h.metrics.calls_moved.get(), 1);
    // Lost again: it moves once more, to the next generation.
    let again = format!("{EM}-m2");
    h.relay_lost(&moved);
    h.requested(&Op::RelayAdd {
        id: again.clone(),
        port: 21_000,
    })
    .await;
    h.requested(&Op::ExternalMedia {
        id: again.clone(),
        host: "10.0.0.22:21000".into(),
    })
    .await;
    h.em_event(&again, true);
    h.requested(&Op::Hangup(moved.clone())).await;
    assert_eq!(h.metrics.calls_moved.get(), 2);
    // The caller leaves: the current channels are released.
    h.caller_leaves(CALLER);
    h.finished().await;
    let tail: Vec<Op> = h.ops().into_iter().rev().take(3).collect();
    assert_eq!(
        tail,
        [
            Op::RelayRemove(again.clone()),
            Op::DestroyBridge(BRIDGE.into()),
            Op::Hangup(again),
        ]
    );
    assert_eq!(h.outcomes("completed"), 1);
    let r = h.record(CALLER);
    assert_eq!(r["ended_by"], "caller");
    // Three relays carried it; the two lost ones' last interim figures (3 packets each) and
    // the last one's final figures (5) are merged.
    assert_eq!(
        r["relays"],
        serde_json::json!(["local", "relay-10.0.0.22", "relay-10.0.0.22"]),
        "{r}"
    );
    assert_eq!(r["relay"]["packets_to_echo"], 11, "{r}");
    assert!(r["unmeasured_ms"].as_f64().is_some(), "{r}");
    h.assert_released(false);
}

#[tokio::test(start_paused = true)]
async fn a_call_whose_relay_is_lost_with_no_other_room_ends_no_relay() {
    let h = harness(PORTS);
    bridged(&h).await;
    h.fakes.script("relay_add", 1, Reply::NoRelay);
    h.relay_lost(EM);
    h.finished().await;
    let mut want = first_setup_ops(6);
    want.extend([
        Op::RelayAbandon(EM.into()),
        Op::RelayAdd {
            id: format!("{EM}-m1"),
            port: 21_000,
        },
    ]);
    // The caller is hung up, the old externalMedia channel and the bridge released; nothing is
    // removed from a relay that is gone.
    want.extend(teardown_ops(false, true, true, false));
    assert_eq!(h.ops(), want);
    assert_eq!(h.outcomes("no_relay"), 1);
    assert_eq!(h.failures("relay"), 1);
    let r = h.record(CALLER);
    assert_eq!(r["failure_stage"], "relay", "{r}");
    assert!(
        r["failure"].as_str().unwrap().contains("no other has room"),
        "{r}"
    );
    assert_eq!(r["ended_by"], "control");
    // The refused add took nothing (no relay had room), so it has nothing to undo; the rest is
    // released: no call, every port back (the ops above show the hang-ups and the bridge).
    assert_eq!(h.ctl.active(), 0);
    assert_eq!(h.ctl.ports().1, 0, "the port is back");
}
