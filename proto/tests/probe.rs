//! The relay's side of the probe header (`relay_proto::probe`): when a channel is taken as carrying
//! probes, what it counts, and exactly what it writes into a probe's echo on its way back to
//! Asterisk, and into nothing else.
//!
//! - Recognition after three valid headers in a row (not two), reset by audio, by a broken header
//!   or by another call's probe.
//! - A channel without probes: its returns untouched, byte for byte.
//! - The written times exact, and nothing outside the relay's fields changed.
//! - `received` exact when probes were lost before the relay.
//! - No write into a headerless, broken, unseen or repeated probe.
//!
//! The header's parse and writes are pure, and also fuzzed (`fuzz/`, target `probe`).
#![allow(clippy::cast_possible_truncation)] // test values come from small, known ranges

mod common;

use std::net::SocketAddr;

use common::{open, rtp, MS};
use relay_proto::control::{AddChannel, RemoveChannel};
use relay_proto::probe::{self, Probe, RelayTimes, RECOGNISE_AFTER, RELAY_FIELDS};
use relay_proto::relay::PROBE_SLOTS;
use relay_proto::rtp::RtpHeader;
use relay_proto::{
    ChannelId, ChannelStats, Command, CommandOutcome, Direction, Format, MonoTime, ProbeStats,
    Relay, RelayConfig, Response, SendTimes, SocketId, Ssrc, Verdict,
};

const ECHO: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::new(127, 0, 0, 1),
    4000,
));

/// `CLOCK_REALTIME` − monotonic, as a backend would set it: the wall clock reads
/// 2025-12-01T00:00:00Z when the monotonic clock reads 0.
const OFFSET: i64 = 1_764_547_200_000_000_000;

/// The sender's send time of a probe that leaves `ago_ns` before the relay's arrival `at`.
fn sent_before(at: MonoTime, ago_ns: u64) -> u64 {
    wall(at) - ago_ns
}

fn wall(at: MonoTime) -> u64 {
    at.as_nanos() + OFFSET as u64
}

fn ast() -> SocketAddr {
    "127.0.0.2:5000".parse().unwrap()
}

fn ms(n: u64) -> MonoTime {
    MonoTime::from_nanos(n * MS)
}

fn relay() -> Relay {
    let mut r = Relay::new(RelayConfig {
        // Sends are taken to leave when submitted: nothing waits for a transmit stamp.
        send_times: SendTimes::Estimated,
        ..RelayConfig::default()
    })
    .unwrap();
    r.set_wall_offset(Some(OFFSET));
    r
}

fn channel(relay: &mut Relay, name: &str) -> SocketId {
    open(
        relay,
        MonoTime::ZERO,
        AddChannel {
            channel: ChannelId::try_from(name).unwrap(),
            port: 21_000,
            asterisk: Some(ast()),
            echo: None,
            format: Format::Ulaw,
        },
    )
}

/// A 172-byte ulaw RTP packet (RTP sequence `rtp_seq`) whose payload starts with probe `p`, the
/// rest of it silence.
fn probe_packet(rtp_seq: u16, p: Probe) -> Vec<u8> {
    let mut b = rtp(rtp_seq, 160 * u32::from(rtp_seq), 7);
    probe::write(&mut b[12..], p).unwrap();
    b
}

fn p(call: u32, seq: u32, sent_ns: u64) -> Probe {
    Probe { call, seq, sent_ns }
}

/// Hands `bytes` to the relay as arriving at `at` from `from`; returns them as the relay would
/// send them on.
fn through(
    relay: &mut Relay,
    at: MonoTime,
    s: SocketId,
    from: SocketAddr,
    bytes: &[u8],
) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let v = relay.handle_received(at, at, s, from, &mut b);
    let direction = if from == ECHO {
        Direction::ToAsterisk
    } else {
        Direction::ToEcho
    };
    assert!(
        matches!(v, Verdict::Forward { direction: d, .. } if d == direction),
        "{v:?}"
    );
    relay.submitted(at);
    b
}

fn stats(relay: &Relay, name: &str) -> ChannelStats {
    relay
        .channel_stats(ms(100_000), &ChannelId::try_from(name).unwrap())
        .unwrap()
}

fn probe_stats(relay: &Relay, name: &str) -> ProbeStats {
    stats(relay, name).probe.expect("the channel saw probes")
}

/// The bytes of `after` that differ from `before`.
fn changed(before: &[u8], after: &[u8]) -> Vec<usize> {
    assert_eq!(before.len(), after.len());
    (0..before.len())
        .filter(|&i| before[i] != after[i])
        .collect()
}

/// Sends probe `seq` of call 1 at `at` ms and its echo 1 ms later; returns the echo as it leaves
/// toward Asterisk, and what the echo sent.
fn probe_round_trip(relay: &mut Relay, s: SocketId, seq: u32, at: u64) -> (Vec<u8>, Vec<u8>) {
    let arrival = ms(at);
    let sent = probe_packet(seq as u16, p(1, seq, sent_before(arrival, 700_000)));
    let to_echo = through(relay, arrival, s, ast(), &sent);
    assert_eq!(to_echo, sent, "nothing is written on the way to the echo");
    let back = through(relay, ms(at + 1), s, ECHO, &to_echo);
    (back, to_echo)
}

#[test]
fn a_channel_is_recognised_after_three_valid_headers_in_a_row_not_two() {
    assert_eq!(RECOGNISE_AFTER, 3);
    let mut r = relay();
    let s = channel(&mut r, "a");
    for seq in 0..2 {
        let (back, echoed) = probe_round_trip(&mut r, s, seq, 20 * u64::from(seq) + 100);
        assert_eq!(back, echoed, "probe {seq}: not written before recognition");
        assert!(!probe_stats(&r, "a").recognised, "after {} probes", seq + 1);
    }
    let (back, echoed) = probe_round_trip(&mut r, s, 2, 140);
    let ps = probe_stats(&r, "a");
    assert!(ps.recognised, "the third in a row recognises the channel");
    assert_ne!(back, echoed, "and the third probe is written");
    assert_eq!(
        probe::relay_times(&back[12..]),
        Some(RelayTimes {
            arrival_ns: wall(ms(140)),
            returned_ns: wall(ms(141)),
        })
    );
    assert_eq!(
        (ps.received, ps.returned, ps.written),
        (3, 3, 1),
        "counted from the first probe"
    );
    assert_eq!(r.global_stats().probe.channels, 1);
}

#[test]
fn a_non_probe_payload_or_another_call_resets_the_run() {
    let mut r = relay();
    let s = channel(&mut r, "a");
    let mut seq = 0u16;
    let mut send = |r: &mut Relay, bytes: Vec<u8>| {
        seq += 1;
        let _ = through(r, ms(20 * u64::from(seq)), s, ast(), &bytes);
    };
    // Two probes, audio, two probes: never three in a row.
    send(&mut r, probe_packet(1, p(1, 0, 1)));
    send(&mut r, probe_packet(2, p(1, 1, 1)));
    send(&mut r, rtp(3, 480, 7));
    send(&mut r, probe_packet(4, p(1, 2, 1)));
    send(&mut r, probe_packet(5, p(1, 3, 1)));
    // A header with the magic but a broken check breaks it too.
    let mut bad = probe_packet(6, p(1, 4, 1));
    bad[12 + 20] ^= 1;
    send(&mut r, bad);
    send(&mut r, probe_packet(7, p(1, 5, 1)));
    send(&mut r, probe_packet(8, p(1, 6, 1)));
    // Another call's probe starts a run of its own.
    send(&mut r, probe_packet(9, p(2, 7, 1)));
    send(&mut r, probe_packet(10, p(1, 8, 1)));
    send(&mut r, probe_packet(11, p(1, 9, 1)));
    let ps = probe_stats(&r, "a");
    assert!(!ps.recognised, "{ps:?}");
    assert_eq!(
        ps.received, 9,
        "every valid probe counts, recognised or not"
    );
    send(&mut r, probe_packet(12, p(1, 10, 1)));
    assert!(probe_stats(&r, "a").recognised);
    // Once recognised, audio does not undo it.
    send(&mut r, rtp(13, 2080, 7));
    assert!(probe_stats(&r, "a").recognised);
}

#[test]
fn a_channel_without_probes_comes_back_byte_for_byte_and_has_no_probe_figures() {
    let mut r = relay();
    let s = channel(&mut r, "audio");
    for k in 0..50u16 {
        let mut audio = rtp(k, 160 * u32::from(k), 9);
        // Payloads that look like the start of a header: the magic with a bad check, then the
        // magic alone in a short payload.
        if k % 5 == 0 {
            audio[12..20].copy_from_slice(&probe::MAGIC);
        }
        let audio = if k % 7 == 0 {
            audio[..30].to_vec()
        } else {
            audio
        };
        let at = 20 * u64::from(k) + 100;
        assert_eq!(through(&mut r, ms(at), s, ast(), &audio), audio);
        assert_eq!(through(&mut r, ms(at + 1), s, ECHO, &audio), audio);
    }
    let st = stats(&r, "audio");
    assert_eq!(st.probe, None);
    let json = serde_json::to_string(&st).unwrap();
    assert!(!json.contains("probe"), "left out of the JSON: {json}");
    assert_eq!(r.global_stats().probe, relay_proto::ProbeTotals::default());
}

#[test]
fn the_return_gets_exactly_the_two_arrivals_on_the_wall_clock_and_nothing_else_changes() {
    let mut r = relay();
    let s = channel(&mut r, "a");
    for seq in 0..3 {
        let _ = probe_round_trip(&mut r, s, seq, 20 * u64::from(seq) + 100);
    }
    // Probe 3 arrives at 200.000123 ms (its sender sent it 1.5 ms before by its clock); its echo
    // comes back 345.678 µs later.
    let arrival = MonoTime::from_nanos(200 * MS + 123);
    let back_at = MonoTime::from_nanos(arrival.as_nanos() + 345_678);
    let sent = probe_packet(3, p(1, 3, sent_before(arrival, 1_500_000)));
    let to_echo = through(&mut r, arrival, s, ast(), &sent);
    let back = through(&mut r, back_at, s, ECHO, &to_echo);
    let times = probe::relay_times(&back[12..]).unwrap();
    assert_eq!(times.arrival_ns, 200 * MS + 123 + OFFSET as u64);
    assert_eq!(times.returned_ns - times.arrival_ns, 345_678);
    assert_eq!(
        probe::parse(&back[12..]),
        probe::parse(&sent[12..]),
        "the sender's fields"
    );
    let only = RELAY_FIELDS.start + 12..RELAY_FIELDS.end + 12;
    let diff = changed(&to_echo, &back);
    assert!(!diff.is_empty());
    assert!(diff.iter().all(|i| only.contains(i)), "{diff:?}");
    let ps = probe_stats(&r, "a");
    assert_eq!((ps.written, ps.relay_loop.count), (2, 2));
    // Probe 2's loop was 1 ms, this one's 345.678 µs: the mean is exact (a running sum).
    assert_eq!(ps.relay_loop.mean_ns, (1_000_000 + 345_678) / 2);
    // Approximate Asterisk in, from recognition on: 700 µs (probe 2) and 1.5 ms (probe 3).
    assert_eq!(ps.asterisk_in.count, 2);
    assert_eq!(ps.asterisk_in.mean_ns, (700_000 + 1_500_000) / 2);
    let g = r.global_stats().probe;
    assert_eq!((g.relay_loop.count, g.relay_loop.mean_ns), (2, 672_839));
    assert_eq!(g.asterisk_in.count, 2);
}

#[test]
fn the_header_is_found_after_csrcs_an_extension_and_before_padding() {
    let mut r = relay();
    let s = channel(&mut r, "a");
    // V=2, P, X, CC=2; two CSRCs; a one-word extension; a probe header and 8 bytes of payload;
    // 4 bytes of padding.
    let packet = |seq: u16, pr: Probe| {
        let mut b = vec![0u8; 12];
        RtpHeader {
            marker: false,
            payload_type: 0,
            sequence: seq,
            timestamp: 160 * u32::from(seq),
            ssrc: Ssrc(7),
        }
        .write(&mut b)
        .unwrap();
        b[0] |= 0x20 | 0x10 | 2;
        b.extend_from_slice(&[1, 1, 1, 1, 2, 2, 2, 2]);
        b.extend_from_slice(&[0xbe, 0xde, 0, 1, 9, 9, 9, 9]);
        let at = b.len();
        b.resize(at + probe::LEN + 8, 0x55);
        probe::write(&mut b[at..], pr).unwrap();
        b.extend_from_slice(&[0, 0, 0, 4]);
        (b, at)
    };
    for seq in 0..4u32 {
        let (sent, at) = packet(seq as u16, p(3, seq, sent_before(ms(100), 1)));
        let arrival = ms(100 + 20 * u64::from(seq));
        let to_echo = through(&mut r, arrival, s, ast(), &sent);
        let back = through(&mut r, ms(101 + 20 * u64::from(seq)), s, ECHO, &to_echo);
        if seq < 2 {
            assert_eq!(back, sent);
            continue;
        }
        let diff = changed(&sent, &back);
        let only = at + RELAY_FIELDS.start..at + RELAY_FIELDS.end;
        assert!(
            !diff.is_empty() && diff.iter().all(|i| only.contains(i)),
            "{diff:?}"
        );
        assert_eq!(
            probe::relay_times(&back[at..]).map(|t| t.returned_ns - t.arrival_ns),
            Some(MS)
        );
    }
}

#[test]
fn received_counts_exactly_what_reached_the_relay() {
    let mut r = relay();
    let s = channel(&mut r, "a");
    // The sender sends 500 probes; the way in loses every seventh (before the relay) and
    // duplicates every 50th; the echo loses every 11th.
    let mut reached = 0;
    for seq in 0..500u32 {
        if seq % 7 == 3 {
            continue;
        }
        reached += 1;
        let at = ms(100 + 20 * u64::from(seq));
        let sent = probe_packet(seq as u16, p(1, seq, sent_before(at, 1)));
        let echoed = through(&mut r, at, s, ast(), &sent);
        if seq % 50 == 0 {
            let _ = through(&mut r, at, s, ast(), &sent);
        }
        if seq % 11 != 5 {
            let _ = through(&mut r, ms(101 + 20 * u64::from(seq)), s, ECHO, &echoed);
        }
    }
    let back = (0..500u32).filter(|s| s % 7 != 3 && s % 11 != 5).count() as u64;
    let ps = probe_stats(&r, "a");
    assert_eq!(
        ps.received, reached,
        "sent − received = lost before the relay"
    );
    assert_eq!(ps.returned, back);
    // The first two (before recognition) are not written.
    assert_eq!(ps.written, back - 2);
    assert_eq!(ps.relay_loop.count, back - 2);
    let Ok(Response::Removed { stats, .. }) = remove(&mut r, "a") else {
        panic!("removed")
    };
    assert_eq!(stats.probe.unwrap().received, reached);
    let g = r.global_stats().probe;
    assert_eq!((g.channels, g.recognised, g.received), (0, 1, reached));
}

fn remove(r: &mut Relay, name: &str) -> Result<Response, relay_proto::ErrorReply> {
    match r.handle_command(
        ms(100_000),
        Command::Remove(RemoveChannel {
            channel: ChannelId::try_from(name).unwrap(),
        }),
    ) {
        CommandOutcome::Close { reply, .. } => reply,
        other => panic!("{other:?}"),
    }
}

#[test]
fn on_a_probe_channel_only_a_valid_header_whose_arrival_is_known_is_written() {
    let mut r = relay();
    let s = channel(&mut r, "a");
    for seq in 0..3 {
        let _ = probe_round_trip(&mut r, s, seq, 20 * u64::from(seq) + 100);
    }
    // Probe 3 reaches the relay; before its own echo, the echo sends back: audio, probe 3 with a
    // broken check, probe 3 without its magic, a probe the relay never saw, another call's
    // probe 3, and a payload too short for a header. All go back as they came.
    let sent = probe_packet(3, p(1, 3, sent_before(ms(200), 1)));
    let _ = through(&mut r, ms(200), s, ast(), &sent);
    let at = |k: u64| ms(200 + k);
    let audio = rtp(50, 8000, 7);
    assert_eq!(through(&mut r, at(1), s, ECHO, &audio), audio);
    let mut broken = sent.clone();
    broken[12 + 20] ^= 0x80; // the send time: the sender's check fails
    assert_eq!(through(&mut r, at(2), s, ECHO, &broken), broken);
    let mut no_magic = sent.clone();
    no_magic[12] ^= 1;
    assert_eq!(through(&mut r, at(3), s, ECHO, &no_magic), no_magic);
    let unseen = probe_packet(52, p(1, 40, 1));
    assert_eq!(through(&mut r, at(4), s, ECHO, &unseen), unseen);
    let other_call = probe_packet(53, p(9, 3, sent_before(ms(200), 1)));
    assert_eq!(through(&mut r, at(5), s, ECHO, &other_call), other_call);
    let mut short = sent.clone();
    short.truncate(12 + probe::LEN - 1);
    assert_eq!(through(&mut r, at(6), s, ECHO, &short), short);
    // Its own echo is written; a second echo of it is not (each probe is measured once).
    let back = through(&mut r, at(7), s, ECHO, &sent);
    assert_eq!(
        probe::relay_times(&back[12..]).map(|t| t.returned_ns - t.arrival_ns),
        Some(7 * MS)
    );
    assert_eq!(through(&mut r, at(8), s, ECHO, &sent), sent);
    let ps = probe_stats(&r, "a");
    assert_eq!(ps.written, 2, "probes 2 and 3, once each");
    assert_eq!(
        ps.returned,
        3 + 4,
        "valid headers back: 3 round trips, unseen, other call, probe 3 twice"
    );
}

#[test]
fn the_arrival_ring_wraps_with_the_probe_sequence() {
    let mut r = relay();
    let s = channel(&mut r, "a");
    let n = 3 * PROBE_SLOTS as u32 + 17;
    for seq in 0..n {
        let (back, _) = probe_round_trip(&mut r, s, seq, 20 * u64::from(seq) + 100);
        if seq >= 2 {
            let t = probe::relay_times(&back[12..]).unwrap_or_else(|| panic!("probe {seq}"));
            assert_eq!(t.arrival_ns, wall(ms(20 * u64::from(seq) + 100)), "{seq}");
        }
    }
    let ps = probe_stats(&r, "a");
    assert_eq!((ps.received, ps.written), (u64::from(n), u64::from(n) - 2));
    // An echo a whole ring late finds its slot taken by the probe 1024 after it: not written.
    let late = 5 * PROBE_SLOTS as u32;
    let arrival = ms(1_000_000);
    let sent = probe_packet(1, p(1, late, sent_before(arrival, 1)));
    let _ = through(&mut r, arrival, s, ast(), &sent);
    let newer = probe_packet(2, p(1, late + PROBE_SLOTS as u32, sent_before(arrival, 1)));
    let _ = through(&mut r, ms(1_000_020), s, ast(), &newer);
    assert_eq!(through(&mut r, ms(1_000_030), s, ECHO, &sent), sent);
    assert!(probe::relay_times(&through(&mut r, ms(1_000_031), s, ECHO, &newer)[12..]).is_some());
}

#[test]
fn asterisk_in_is_recorded_only_when_positive_and_counted_otherwise() {
    let mut r = relay();
    let s = channel(&mut r, "a");
    for seq in 0..3 {
        let _ = probe_round_trip(&mut r, s, seq, 20 * u64::from(seq) + 100);
    }
    // The sender's clock 2 ms ahead of the relay's: its send time after the relay's arrival.
    for seq in 3..6u32 {
        let at = ms(200 + 20 * u64::from(seq));
        let ahead = probe_packet(seq as u16, p(1, seq, wall(at) + 2 * MS));
        let _ = through(&mut r, at, s, ast(), &ahead);
    }
    let equal = probe_packet(6, p(1, 6, wall(ms(400))));
    let _ = through(&mut r, ms(400), s, ast(), &equal);
    let ps = probe_stats(&r, "a");
    assert_eq!(ps.asterisk_in.count, 1, "probe 2, from recognition on");
    assert_eq!(ps.asterisk_in_negative, 4);
    assert_eq!(r.global_stats().probe.asterisk_in_negative, 4);
}

#[test]
fn without_a_wall_offset_nothing_is_written_but_the_loop_is_measured() {
    let mut r = relay();
    r.set_wall_offset(None);
    let s = channel(&mut r, "a");
    for seq in 0..5 {
        let (back, echoed) = probe_round_trip(&mut r, s, seq, 20 * u64::from(seq) + 100);
        assert_eq!(back, echoed);
    }
    let ps = probe_stats(&r, "a");
    assert!(ps.recognised);
    assert_eq!(
        (ps.written, ps.relay_loop.count, ps.asterisk_in.count),
        (0, 3, 0)
    );
    assert_eq!(ps.relay_loop.mean_ns, MS);
}

#[test]
fn handle_datagram_measures_probes_but_never_writes() {
    let mut r = relay();
    let s = channel(&mut r, "a");
    for seq in 0..5u32 {
        let at = ms(100 + 20 * u64::from(seq));
        let sent = probe_packet(seq as u16, p(1, seq, sent_before(at, 1)));
        let _ = r.handle_datagram(at, s, ast(), &sent);
        let _ = r.handle_datagram(ms(101 + 20 * u64::from(seq)), s, ECHO, &sent);
    }
    let ps = probe_stats(&r, "a");
    assert_eq!(
        (
            ps.recognised,
            ps.received,
            ps.returned,
            ps.written,
            ps.relay_loop.count
        ),
        (true, 5, 5, 0, 3)
    );
}

#[test]
fn a_copy_of_a_probe_before_recognition_counts_once_even_after_a_reset() {
    let mut r = relay();
    let s = channel(&mut r, "copies");
    let audio = rtp(1, 160, 7);
    // Probe 0, audio (a reset of the run), then probe 0 again and probe 1: not recognised yet,
    // and probe 0 counted once.
    through(
        &mut r,
        ms(0),
        s,
        ast(),
        &probe_packet(1, p(3, 0, sent_before(ms(0), 1))),
    );
    through(&mut r, ms(20), s, ast(), &audio);
    through(
        &mut r,
        ms(21),
        s,
        ast(),
        &probe_packet(1, p(3, 0, sent_before(ms(21), 1))),
    );
    through(
        &mut r,
        ms(40),
        s,
        ast(),
        &probe_packet(2, p(3, 1, sent_before(ms(40), 1))),
    );
    let st = probe_stats(&r, "copies");
    assert_eq!(st.received, 2, "{st:?}");
    assert!(!st.recognised);
}
