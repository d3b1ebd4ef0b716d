//! `sim-asterisk` as `loadgen ari --callers rtp` meets it. A Local pair
//! `Local/<control's app>@stasis/n` originated into loadgen's own application: its `;2` half
//! enters control's application through the dialplan (native format ulaw), its `;1` half is
//! Down, refused by a bridge (422) and enters loadgen's application only after control answers
//! `;2`; hanging up `;1` ends both halves (StasisEnd, then ChannelDestroyed, in each
//! application) and leaves nothing behind. The two bridges forward payloads byte for byte, in
//! order, each side under the header of the externalMedia channel that sent to it; non-RTP is
//! counted malformed, RTP from elsewhere a strict-RTP drop, and frames with control's
//! externalMedia channel gone unrouted (in the report and its printed text). `--bridge-delay`
//! is paid twice each way, `--bridge-jitter` never reorders, `--bridge-loss` is counted exactly
//! on the side of the relay it happened on. The simulator's own callers send a fixed non-silent
//! payload and count returns whose payload changed; a Local pair into an application nobody
//! serves is refused (400), and bad `--bridge-*` values exit 2 naming the flag.
//!
//! The test is both applications: a minimal ARI client (reqwest, tokio-tungstenite) plays
//! control (answers `;2`, an externalMedia channel toward a UDP socket of the test that echoes,
//! "the relay", and a bridge) and loadgen (on `;1`'s StasisStart, an externalMedia channel toward
//! another UDP socket, "loadgen", and a bridge), then sends numbered RTP frames and reads what
//! comes back. The simulator runs as a process (`--calls 0`), interrupted for its report.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use relay_proto::rtp::{parse_rtp, RtpHeader, Ssrc};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

mod common;
use common::{Sim, PASS, USER};

const CONTROL_APP: &str = "rtp-relay";
const LOADGEN_APP: &str = "rtp-relay-loadgen";
/// How long any one step may take.
const STEP: Duration = Duration::from_secs(5);
/// The SSRC of the frames the test sends as loadgen.
const LOADGEN_SSRC: u32 = 0x10ad_9e11;

/// The simulator's forwarding threads.
fn forwarders(sim: &Sim) -> usize {
    sim.threads()
        .iter()
        .filter(|n| n.starts_with("rtp-fwd-"))
        .count()
}

/// A blocking ARI client over a runtime of its own.
struct Ari {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    addr: String,
}

impl Ari {
    fn new(addr: &str) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self {
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap(),
            http: reqwest::Client::new(),
            addr: addr.to_owned(),
        }
    }

    /// One request; (status, JSON body or null).
    fn call(&self, method: reqwest::Method, path: &str) -> (u16, Value) {
        self.rt.block_on(async {
            let r = self
                .http
                .request(method, format!("http://{}/ari{path}", self.addr))
                .basic_auth(USER, Some(PASS))
                .timeout(STEP)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            (status, serde_json::from_str(&text).unwrap_or(Value::Null))
        })
    }

    fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path)
    }

    fn post(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::POST, path)
    }

    fn delete(&self, path: &str) -> u16 {
        self.call(reqwest::Method::DELETE, path).0
    }

    /// Application `app`'s events, from now on.
    fn events(&self, app: &str) -> Events {
        let url = format!(
            "ws://{}/ari/events?app={app}&api_key={USER}:{PASS}",
            self.addr
        );
        let (ws, _) = self
            .rt
            .block_on(tokio_tungstenite::connect_async(url.as_str()))
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let task = self.rt.spawn(async move {
            let mut ws = ws;
            while let Some(Ok(msg)) = ws.next().await {
                if let Message::Text(t) = msg {
                    let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                    if tx.send((Instant::now(), v)).is_err() {
                        break;
                    }
                }
            }
        });
        Events {
            rx,
            seen: Vec::new(),
            task,
        }
    }

    /// Creates an externalMedia channel `id` in `app` toward `host`; where it takes RTP.
    fn external_media(&self, app: &str, id: &str, host: SocketAddr) -> SocketAddr {
        let (s, v) = self.post(&format!(
            "/channels/externalMedia?app={app}&channelId={id}&external_host={host}&format=ulaw\
             &encapsulation=rtp&transport=udp&connection_type=client&direction=both"
        ));
        assert_eq!(s, 200, "{v}");
        let vars = &v["channelvars"];
        format!(
            "{}:{}",
            vars["UNICASTRTP_LOCAL_ADDRESS"].as_str().unwrap(),
            vars["UNICASTRTP_LOCAL_PORT"].as_str().unwrap()
        )
        .parse()
        .unwrap()
    }

    /// A mixing bridge `id` with `channels`, retried while the externalMedia channel is not in
    /// Stasis yet (422).
    fn bridge(&self, id: &str, channels: &str) {
        let (s, v) = self.post(&format!("/bridges?type=mixing&bridgeId={id}"));
        assert_eq!(s, 200, "{v}");
        testkit::wait_for("the channels to join the bridge", STEP, || {
            let (s, v) = self.post(&format!("/bridges/{id}/addChannel?channel={channels}"));
            assert!(s == 204 || s == 422, "{s} {v}");
            (s == 204).then_some(())
        });
    }
}

/// One application's events as they came.
struct Events {
    rx: mpsc::Receiver<(Instant, Value)>,
    seen: Vec<(Instant, Value)>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Events {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Events {
    /// The first event (from the start) matching `f`, waiting for it.
    fn wait(&mut self, what: &str, f: impl Fn(&Value) -> bool) -> (Instant, Value) {
        let end = Instant::now() + STEP;
        loop {
            if let Some(e) = self.seen.iter().find(|(_, v)| f(v)) {
                return e.clone();
            }
            let left = end.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(e) => self.seen.push(e),
                Err(_) => panic!("timed out waiting for {what}; events: {:?}", self.seen),
            }
        }
    }

    /// Every event so far.
    fn so_far(&mut self) -> Vec<Value> {
        while let Ok(e) = self.rx.try_recv() {
            self.seen.push(e);
        }
        self.seen.iter().map(|(_, v)| v.clone()).collect()
    }
}

fn is(ev: &Value, kind: &str, id: &str) -> bool {
    ev["type"] == kind && ev["channel"]["id"] == id
}

/// Frame `i`'s payload: its number, then bytes that differ from frame to frame.
fn payload(i: u32) -> [u8; 160] {
    let mut p = [0u8; 160];
    p[..4].copy_from_slice(&i.to_be_bytes());
    for (k, b) in p[4..].iter_mut().enumerate() {
        *b = u8::try_from((u64::from(i) * 31 + k as u64 * 7 + 0x5a) % 256).unwrap();
    }
    p
}

/// A frame as a socket of the test got it.
#[derive(Clone, Copy, Debug)]
struct Got {
    /// Read at.
    at: Instant,
    /// Sent on (the echo's send), for the relay's socket.
    echoed: Option<Instant>,
    index: u32,
    ssrc: u32,
    seq: u16,
    ts: u32,
    marker: bool,
    pt: u8,
    /// The payload is frame `index`'s, byte for byte.
    intact: bool,
}

impl Got {
    fn read(bytes: &[u8], at: Instant) -> Self {
        let p = parse_rtp(bytes).unwrap();
        let index = u32::from_be_bytes(p.payload[..4].try_into().unwrap());
        Self {
            at,
            echoed: None,
            index,
            ssrc: p.ssrc.0,
            seq: p.sequence,
            ts: p.timestamp,
            marker: p.marker,
            pt: p.payload_type,
            intact: p.payload == payload(index),
        }
    }
}

/// A thread reading `sock` (frames from `from` only), echoing each back when `echo`.
struct Reader {
    got: Arc<Mutex<Vec<Got>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reader {
    fn start(sock: UdpSocket, from: SocketAddr, echo: bool) -> Self {
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, s) = (Arc::clone(&got), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, src)) = testkit::recv(&sock, &mut buf) else {
                    continue;
                };
                let at = Instant::now();
                assert_eq!(src, from, "a frame from elsewhere");
                let mut frame = Got::read(&buf[..n], at);
                if echo {
                    frame.echoed = Some(Instant::now());
                    sock.send_to(&buf[..n], src).unwrap();
                }
                g.lock().unwrap().push(frame);
            }
        });
        Self {
            got,
            stop,
            thread: Some(thread),
        }
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    fn has(&self, index: u32) -> bool {
        self.got.lock().unwrap().iter().any(|g| g.index == index)
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One call, set up as control and loadgen set it up.
struct Call {
    near: &'static str,
    far: &'static str,
    control_em: &'static str,
    control_bridge: &'static str,
    loadgen_em: &'static str,
    loadgen_bridge: &'static str,
    /// Where loadgen's externalMedia channel takes RTP.
    to_loadgen_em: SocketAddr,
    /// Where control's externalMedia channel takes RTP.
    to_control_em: SocketAddr,
}

impl Call {
    /// Originates the Local pair and sets up both sides; checks the events and channels on the
    /// way: `;2` into control's application, `;1` into loadgen's only after `;2` is answered.
    fn set_up(
        ari: &Ari,
        control: &mut Events,
        loadgen: &mut Events,
        relay: SocketAddr,
        loadgen_rtp: SocketAddr,
    ) -> Self {
        let c = Self {
            near: "lg-1",
            far: "lg-1-far",
            control_em: "rtprelay-em-lg-1-far",
            control_bridge: "rtprelay-br-lg-1-far",
            loadgen_em: "lg-1-em",
            loadgen_bridge: "lg-1-br",
            to_loadgen_em: "0.0.0.0:0".parse().unwrap(),
            to_control_em: "0.0.0.0:0".parse().unwrap(),
        };
        let (s, near) = ari.post(&format!(
            "/channels?endpoint=Local/{CONTROL_APP}@stasis/n&app={LOADGEN_APP}&formats=ulaw\
             &channelId={}&otherChannelId={}",
            c.near, c.far
        ));
        assert_eq!(s, 200, "{near}");
        // The reply: `;1`, not answered, not in Stasis yet.
        assert_eq!(near["id"], c.near, "{near}");
        assert_eq!(near["state"], "Down", "{near}");
        let name = near["name"].as_str().unwrap();
        let base = name.strip_suffix(";1").unwrap();
        assert!(base.starts_with("Local/rtp-relay@stasis-"), "{name}");
        assert_eq!(
            near["dialplan"]["app_data"], LOADGEN_APP,
            "{}",
            near["dialplan"]
        );
        // `;2` enters control's application through the dialplan.
        let (_, start) = control.wait("the ;2 half's StasisStart", |e| is(e, "StasisStart", c.far));
        let far = &start["channel"];
        assert_eq!(far["name"], format!("{base};2"), "{far}");
        assert_eq!(far["state"], "Ring", "{far}");
        for (k, v) in [
            ("context", "stasis"),
            ("exten", CONTROL_APP),
            ("app_name", "Stasis"),
            ("app_data", CONTROL_APP),
        ] {
            assert_eq!(far["dialplan"][k], v, "{far}");
        }
        let native = ari.get(&format!(
            "/channels/{}/variable?variable=CHANNEL(audionativeformat)",
            c.far
        ));
        assert_eq!(native.1["value"], "(ulaw)", "{native:?}");
        // Until `;2` is answered, `;1` is Down and not in any application.
        let (s, v) = ari.get(&format!("/channels/{}", c.near));
        assert_eq!((s, v["state"].as_str()), (200, Some("Down")), "{v}");
        assert_eq!(ari.post("/bridges?bridgeId=early").0, 200);
        let (s, v) = ari.post(&format!("/bridges/early/addChannel?channel={}", c.near));
        assert_eq!(s, 422, "`;1` is not in Stasis before `;2` is answered: {v}");
        assert_eq!(ari.delete("/bridges/early"), 204);
        assert!(
            !loadgen.so_far().iter().any(|e| e["type"] == "StasisStart"),
            "{:?}",
            loadgen.seen
        );
        // Control answers `;2`: `;1` enters loadgen's application, both Up.
        let answering = Instant::now();
        assert_eq!(ari.post(&format!("/channels/{}/answer", c.far)).0, 204);
        let (at, start) = loadgen.wait("the ;1 half's StasisStart", |e| {
            is(e, "StasisStart", c.near)
        });
        assert!(at > answering);
        assert_eq!(start["channel"]["state"], "Up", "{start}");
        assert_eq!(ari.get(&format!("/channels/{}", c.far)).1["state"], "Up");
        // Control's side: externalMedia toward the relay, bridged with `;2`.
        let to_control_em = ari.external_media(CONTROL_APP, c.control_em, relay);
        ari.bridge(c.control_bridge, &format!("{},{}", c.far, c.control_em));
        // loadgen's side: externalMedia toward loadgen's socket, bridged with `;1`.
        let to_loadgen_em = ari.external_media(LOADGEN_APP, c.loadgen_em, loadgen_rtp);
        ari.bridge(c.loadgen_bridge, &format!("{},{}", c.near, c.loadgen_em));
        Self {
            to_loadgen_em,
            to_control_em,
            ..c
        }
    }
}

/// The test's two ends of a call: "the relay" (echoes) and "loadgen" (sends, reads).
struct Ends {
    loadgen: UdpSocket,
    relay: Reader,
    back: Reader,
    /// Frames sent so far, by index: when.
    sent: Vec<Instant>,
}

impl Ends {
    /// Sends frame `i` (the next one) to loadgen's externalMedia channel.
    fn send(&mut self, to: SocketAddr) {
        let i = u32::try_from(self.sent.len()).unwrap();
        let mut packet = [0u8; 172];
        RtpHeader {
            marker: i == 0,
            payload_type: 0,
            sequence: u16::try_from(i % 65_536).unwrap(),
            timestamp: 160 * (i + 1),
            ssrc: Ssrc(LOADGEN_SSRC),
        }
        .write(&mut packet)
        .unwrap();
        packet[12..].copy_from_slice(&payload(i));
        self.sent.push(Instant::now());
        self.loadgen.send_to(&packet, to).unwrap();
    }

    /// Sends `n` frames `pace` apart, then frames one at a time until one comes back: paths
    /// keep their order, so every frame before it has then been forwarded or dropped, both
    /// ways.
    fn play(&mut self, to: SocketAddr, n: usize, pace: Duration) {
        for _ in 0..n {
            self.send(to);
            std::thread::sleep(pace);
        }
        let end = Instant::now() + STEP;
        loop {
            self.send(to);
            let last = u32::try_from(self.sent.len() - 1).unwrap();
            let wait = Instant::now() + Duration::from_millis(200);
            while Instant::now() < wait && !self.back.has(last) {
                std::thread::sleep(Duration::from_millis(1));
            }
            if self.back.has(last) {
                return;
            }
            assert!(Instant::now() < end, "no frame came back");
        }
    }
}

/// Checks that `got` carries one sender's own header: one SSRC (returned), not `not`'s;
/// sequence numbers +1 and timestamps +160 a frame from 160; marker on the first only;
/// payload type 0.
fn own_headers(got: &[Got], not: &[u32]) -> u32 {
    let first = got[0];
    assert!(!not.contains(&first.ssrc), "{first:?}");
    assert_eq!(first.ts, 160, "{first:?}");
    for (k, g) in got.iter().enumerate() {
        let k32 = u32::try_from(k).unwrap();
        assert_eq!(g.ssrc, first.ssrc, "{g:?}");
        assert_eq!(
            g.seq,
            first.seq.wrapping_add(u16::try_from(k % 65_536).unwrap()),
            "{g:?}"
        );
        assert_eq!(g.ts, 160 + 160 * k32, "{g:?}");
        assert_eq!(g.marker, k == 0, "{g:?}");
        assert_eq!(g.pt, 0, "{g:?}");
        assert!(g.intact, "payload changed: {g:?}");
    }
    first.ssrc
}

/// Strictly increasing frame numbers: nothing reordered, nothing twice.
fn in_order(got: &[Got]) {
    for w in got.windows(2) {
        assert!(w[0].index < w[1].index, "{:?} then {:?}", w[0], w[1]);
    }
}

/// Hangs up `;1` as loadgen does: both halves end, each with StasisEnd then ChannelDestroyed in
/// its own application. Then both sides tear down what they made, and nothing is left.
fn hang_up(ari: &Ari, call: &Call, control: &mut Events, loadgen: &mut Events) {
    assert_eq!(ari.delete(&format!("/channels/{}", call.near)), 204);
    for (events, id) in [(loadgen, call.near), (control, call.far)] {
        let (end, _) = events.wait("StasisEnd", |e| is(e, "StasisEnd", id));
        let (destroyed, _) = events.wait("ChannelDestroyed", |e| is(e, "ChannelDestroyed", id));
        assert!(end <= destroyed);
    }
    assert_eq!(ari.get(&format!("/channels/{}", call.far)).0, 404);
    assert_eq!(ari.delete(&format!("/channels/{}", call.far)), 404);
    for path in [
        format!("/channels/{}", call.control_em),
        format!("/bridges/{}", call.control_bridge),
        format!("/channels/{}", call.loadgen_em),
        format!("/bridges/{}", call.loadgen_bridge),
    ] {
        let s = ari.delete(&path);
        assert!(s == 204 || s == 404, "{path}: {s}");
    }
    assert_eq!(ari.get("/channels").1, Value::Array(Vec::new()));
    assert_eq!(ari.get("/bridges").1, Value::Array(Vec::new()));
}

/// What one call through a simulator gave.
struct Outcome {
    /// Frames sent, by index: when.
    sent: Vec<Instant>,
    /// What "the relay" got (and echoed).
    relay: Vec<Got>,
    /// What came back to "loadgen".
    back: Vec<Got>,
    /// The simulator's report.
    report: Value,
    /// ... as it printed it.
    text: String,
}

/// Starts a simulator with `args`, sets a call up, plays `n` frames `pace` apart, runs `then`
/// (more frames, a hang-up of something), hangs up `;1` and tears down; what each side got and
/// the report.
fn one_call(
    name: &str,
    args: &[&str],
    n: usize,
    pace: Duration,
    then: impl FnOnce(&Ari, &Call, &mut Ends),
) -> Outcome {
    let sim = Sim::start(name, args);
    let ari = Ari::new(&sim.addr);
    let mut control = ari.events(CONTROL_APP);
    let mut loadgen_ev = ari.events(LOADGEN_APP);
    let relay = UdpSocket::bind("127.0.0.1:0").unwrap();
    let loadgen = UdpSocket::bind("127.0.0.1:0").unwrap();
    let call = Call::set_up(
        &ari,
        &mut control,
        &mut loadgen_ev,
        relay.local_addr().unwrap(),
        loadgen.local_addr().unwrap(),
    );
    // One thread per forwarding channel (a new thread names itself once it runs: waited for).
    testkit::wait_for("two forwarding threads", STEP, || {
        (forwarders(&sim) == 2).then_some(())
    });
    let mut ends = Ends {
        relay: Reader::start(relay, call.to_control_em, true),
        back: Reader::start(loadgen.try_clone().unwrap(), call.to_loadgen_em, false),
        loadgen,
        sent: Vec::new(),
    };
    ends.play(call.to_loadgen_em, n, pace);
    then(&ari, &call, &mut ends);
    hang_up(&ari, &call, &mut control, &mut loadgen_ev);
    testkit::wait_for("the forwarding threads to end", STEP, || {
        (forwarders(&sim) == 0).then_some(())
    });
    let out = Outcome {
        sent: std::mem::take(&mut ends.sent),
        relay: ends.relay.got(),
        back: ends.back.got(),
        report: Value::Null,
        text: String::new(),
    };
    drop(ends);
    let (report, text) = sim.interrupt(STEP);
    Outcome {
        report,
        text,
        ..out
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// The report's count `side.what`.
fn count(r: &Value, side: &str, what: &str) -> u64 {
    u(&r["bridges"][side][what])
}

#[test]
fn a_local_pair_enters_both_applications_and_its_bridges_pass_payloads_byte_for_byte() {
    const FRAMES: usize = 100;
    const UNROUTED: usize = 7;
    let stray = UdpSocket::bind("127.0.0.1:0").unwrap();
    let o = one_call(
        "transparent",
        &[],
        FRAMES,
        Duration::from_millis(2),
        |ari, call, ends| {
            // Not RTP, and RTP from elsewhere (strict RTP): neither forwarded.
            ends.loadgen
                .send_to(b"not rtp", call.to_loadgen_em)
                .unwrap();
            stray.send_to(&[0x80; 172], call.to_loadgen_em).unwrap();
            // Control's externalMedia channel gone, `;2` is alone in its bridge: loadgen's frames
            // have no way to the relay.
            assert_eq!(ari.delete(&format!("/channels/{}", call.control_em)), 204);
            for _ in 0..UNROUTED {
                ends.send(call.to_loadgen_em);
            }
        },
    );
    let total = o.sent.len();
    assert!(total > FRAMES + UNROUTED, "{total}");
    // Every frame until the first to come back got through, both ways, in order, byte for byte.
    let through = total - UNROUTED;
    assert_eq!(o.relay.len(), through);
    assert_eq!(o.back.len(), through);
    in_order(&o.relay);
    in_order(&o.back);
    for (k, (g, b)) in o.relay.iter().zip(&o.back).enumerate() {
        assert_eq!(g.index as usize, k);
        assert_eq!(b.index as usize, k);
    }
    // Each side sees the header of the externalMedia channel that sent to it.
    let control_ssrc = own_headers(&o.relay, &[LOADGEN_SSRC]);
    own_headers(&o.back, &[LOADGEN_SSRC, control_ssrc]);
    let r = &o.report;
    let through = u64::try_from(through).unwrap();
    assert_eq!(
        (
            count(r, "toward_relay", "forwarded"),
            count(r, "toward_relay", "dropped"),
            count(r, "toward_relay", "unrouted"),
        ),
        (through, 0, u64::try_from(UNROUTED).unwrap()),
        "{}",
        r["bridges"]
    );
    assert_eq!(
        (
            count(r, "toward_caller", "forwarded"),
            count(r, "toward_caller", "dropped"),
            count(r, "toward_caller", "unrouted"),
        ),
        (through, 0, 0),
        "{}",
        r["bridges"]
    );
    let b = &r["bridges"];
    // Two bridges each way for what got through; an unrouted frame crossed loadgen's bridge
    // before it found control's empty (or none, read after the hang-up).
    let traversals = u(&b["traversals"]);
    let unrouted = u64::try_from(UNROUTED).unwrap();
    assert!(
        (4 * through..=4 * through + unrouted).contains(&traversals),
        "{b}"
    );
    assert_eq!(u(&b["strict_rtp_drops"]), 1, "{b}");
    assert_eq!(u(&b["malformed"]), 1, "{b}");
    assert_eq!(u(&b["local_pairs"]), 1, "{b}");
    eprintln!("{}", o.text);
    for line in [
        "Local pairs: 1;",
        &format!("toward the relay: forwarded {through}, dropped 0, unrouted {UNROUTED}"),
        &format!("toward the caller: forwarded {through}, dropped 0, unrouted 0"),
    ] {
        assert!(o.text.contains(line), "{line:?} in {}", o.text);
    }
    // Local pairs are not the simulator's callers.
    assert_eq!(r["per_call"], Value::Array(Vec::new()), "{r}");
    assert_eq!((u(&r["channels_left"]), u(&r["bridges_left"])), (0, 0));
}

/// One-way times, ns: loadgen's send to the relay's read, and the relay's echo to loadgen's read.
fn one_way(o: &Outcome) -> (Vec<u64>, Vec<u64>) {
    let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap();
    let to_relay = o
        .relay
        .iter()
        .map(|g| ns(g.at - o.sent[g.index as usize]))
        .collect();
    let echoed: HashMap<u32, Instant> = o
        .relay
        .iter()
        .map(|g| (g.index, g.echoed.unwrap()))
        .collect();
    let back = o.back.iter().map(|b| ns(b.at - echoed[&b.index])).collect();
    (to_relay, back)
}

fn p50(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

#[test]
fn a_bridge_delay_is_paid_at_each_of_the_two_bridges_each_way() {
    const FRAMES: usize = 100;
    let pace = Duration::from_millis(3);
    let none = one_call("no-delay", &[], FRAMES, pace, |_, _, _| {});
    let delayed = one_call(
        "delay",
        &["--bridge-delay", "5ms"],
        FRAMES,
        pace,
        |_, _, _| {},
    );
    assert_eq!(delayed.report["bridges"]["delay_ns"], 5_000_000);
    for o in [&none, &delayed] {
        assert_eq!(o.relay.len(), o.sent.len());
        assert_eq!(o.back.len(), o.sent.len());
        in_order(&o.relay);
        in_order(&o.back);
        own_headers(&o.relay, &[LOADGEN_SSRC]);
    }
    let (base_in, base_out) = one_way(&none);
    let (in_, out) = one_way(&delayed);
    #[allow(clippy::cast_precision_loss)] // ms
    let grew = |a: Vec<u64>, b: Vec<u64>| (p50(b) as f64 - p50(a) as f64) / 1e6;
    let (to_relay, to_caller) = (grew(base_in, in_), grew(base_out, out));
    eprintln!("p50 one-way growth: toward the relay {to_relay:.3} ms, back {to_caller:.3} ms");
    for g in [to_relay, to_caller] {
        assert!((g - 10.0).abs() <= 1.0, "grew by {g} ms for 2 x 5 ms");
    }
}

#[test]
fn bridge_jitter_never_reorders_a_path() {
    const FRAMES: usize = 200;
    // Frames 1 ms apart, each traversal up to 4 ms late: without FIFO paths, many would
    // overtake each other.
    let pace = Duration::from_millis(1);
    let none = one_call("no-jitter", &[], FRAMES, pace, |_, _, _| {});
    let o = one_call(
        "jitter",
        &["--bridge-jitter", "4ms"],
        FRAMES,
        pace,
        |_, _, _| {},
    );
    assert_eq!(o.report["bridges"]["jitter_ns"], 4_000_000);
    assert_eq!(o.relay.len(), o.sent.len());
    assert_eq!(o.back.len(), o.sent.len());
    in_order(&o.relay);
    in_order(&o.back);
    let control_ssrc = own_headers(&o.relay, &[LOADGEN_SSRC]);
    own_headers(&o.back, &[LOADGEN_SSRC, control_ssrc]);
    let ((base_in, base_out), (in_, out)) = (one_way(&none), one_way(&o));
    #[allow(clippy::cast_precision_loss)] // ms
    let grew = |a: Vec<u64>, b: Vec<u64>| (p50(b) as f64 - p50(a) as f64) / 1e6;
    for g in [grew(base_in, in_), grew(base_out, out)] {
        // Two traversals of [0, 4) ms each, held back behind earlier frames: within (0, 8] ms.
        assert!((0.5..=9.0).contains(&g), "grew by {g} ms");
    }
}

#[test]
fn bridge_loss_is_counted_exactly_on_the_side_of_the_relay_it_happened_on() {
    const FRAMES: usize = 400;
    let o = one_call(
        "loss",
        &["--bridge-loss", "0.2", "--seed", "11"],
        FRAMES,
        Duration::from_micros(500),
        |_, _, _| {},
    );
    in_order(&o.relay);
    in_order(&o.back);
    // Headers stay each sender's own, its sequence unbroken: the losses are before it.
    let control_ssrc = own_headers(&o.relay, &[LOADGEN_SSRC]);
    own_headers(&o.back, &[LOADGEN_SSRC, control_ssrc]);
    let (sent, relay, back) = (
        u64::try_from(o.sent.len()).unwrap(),
        u64::try_from(o.relay.len()).unwrap(),
        u64::try_from(o.back.len()).unwrap(),
    );
    let r = &o.report;
    eprintln!(
        "sent {sent}, at the relay {relay}, back {back}: {}",
        r["bridges"]
    );
    assert_eq!(
        count(r, "toward_relay", "dropped"),
        sent - relay,
        "{}",
        r["bridges"]
    );
    assert_eq!(
        count(r, "toward_caller", "dropped"),
        relay - back,
        "{}",
        r["bridges"]
    );
    assert_eq!(count(r, "toward_relay", "forwarded"), relay);
    assert_eq!(count(r, "toward_caller", "forwarded"), back);
    assert_eq!(count(r, "toward_relay", "unrouted"), 0);
    assert_eq!(count(r, "toward_caller", "unrouted"), 0);
    // Two traversals, each dropping a fifth: about 36 % lost each way.
    assert!((sent - relay) * 100 > 20 * sent && (sent - relay) * 100 < 52 * sent);
    assert!((relay - back) * 100 > 20 * relay && (relay - back) * 100 < 52 * relay);
}

#[test]
fn the_simulators_own_callers_count_returns_whose_payload_changed() {
    let sim = Sim::start("payload", &[]);
    let ari = Ari::new(&sim.addr);
    let relay = UdpSocket::bind("127.0.0.1:0").unwrap();
    relay
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let (s, v) = ari.post(&format!(
        "/channels?endpoint=Local/s@load&app={CONTROL_APP}&channelId=tone-1&formats=ulaw"
    ));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["dialplan"]["context"], "load", "{v}");
    let to_em = ari.external_media(CONTROL_APP, "tone-1-em", relay.local_addr().unwrap());
    ari.bridge("tone-1-br", "tone-1,tone-1-em");
    // Echo 40 packets, every other one with a byte of its payload changed.
    let mut buf = [0u8; 2048];
    let (mut echoed, mut changed) = (0u64, 0u64);
    let mut first: Option<Vec<u8>> = None;
    testkit::wait_for("40 packets of the tone", STEP, || {
        if let Ok((n, from)) = testkit::recv(&relay, &mut buf) {
            assert_eq!(from, to_em);
            assert_eq!(n, 172);
            let p = buf[12..n].to_vec();
            // The same fixed payload every time, and not ulaw's all-0xff silence.
            assert!(p.iter().any(|&b| b != 0xff), "{p:?}");
            assert_eq!(first.get_or_insert_with(|| p.clone()), &p);
            if echoed % 2 == 1 {
                buf[12 + usize::try_from(echoed % 160).unwrap()] ^= 0x5a;
                changed += 1;
            }
            relay.send_to(&buf[..n], from).unwrap();
            echoed += 1;
        }
        (echoed == 40).then_some(())
    });
    // The externalMedia channel's hang-up stops its tone and waits for the last returns.
    assert_eq!(ari.delete("/channels/tone-1-em"), 204);
    assert_eq!(ari.delete("/channels/tone-1"), 204);
    assert_eq!(ari.delete("/bridges/tone-1-br"), 204);
    let r = sim.interrupt(STEP).0;
    let calls = r["per_call"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{r}");
    assert_eq!(u(&calls[0]["received"]), echoed, "{}", calls[0]);
    assert_eq!(u(&calls[0]["payload_changed"]), changed, "{}", calls[0]);
    assert_eq!(u(&r["payload_changed"]), changed, "{r}");
    assert_eq!(u(&r["bridges"]["local_pairs"]), 0);
}

#[test]
fn a_local_pair_into_an_application_nobody_serves_is_refused_and_bad_flags_are_named() {
    let sim = Sim::start("refused", &[]);
    let ari = Ari::new(&sim.addr);
    let (s, v) = ari.post(&format!(
        "/channels?endpoint=Local/nobody@stasis/n&app={LOADGEN_APP}&formats=ulaw&channelId=x"
    ));
    assert_eq!(s, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("nobody"), "{v}");
    assert_eq!(ari.get("/channels").1, Value::Array(Vec::new()));
    let r = sim.interrupt(STEP).0;
    assert_eq!(u(&r["bridges"]["local_pairs"]), 0);
    for (flag, value) in [
        ("--bridge-loss", "1.5"),
        ("--bridge-loss", "-0.1"),
        ("--bridge-loss", "NaN"),
        ("--bridge-delay", "soon"),
        ("--bridge-jitter", "-1ms"),
    ] {
        let out = testkit::output(
            std::process::Command::new(env!("CARGO_BIN_EXE_sim-asterisk")).args([
                "--calls",
                "0",
                "--listen",
                "127.0.0.1:0",
                &format!("{flag}={value}"),
            ]),
            STEP,
            None,
        )
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {err}");
        assert!(err.contains(flag), "{flag} {value}: {err}");
    }
}
