//! The relay state machine's rules: where each datagram goes, what is dropped and why, what each
//! command does, and what the timer closes.
//!
//! - Source rules: latching, strict mode, drop reasons, RTCP forwarded unmeasured, an SSRC change;
//!   every command; idle expiry; config validation.
//! - Kernel times: T0 is the send's transmit stamp whether the stamp comes before or after the
//!   echo; missing, stale and impossible times are counted and never recorded; a stamp for a closed
//!   channel is kept off the next channel in its slot; a GSO send's datagrams share its stamp; the
//!   estimate's deferred path is kept for `--timestamps user`.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)] // test values come from small, known ranges

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{open, rtp, MS};
use relay_proto::control::{AddChannel, RemoveChannel, StatsQuery, UpdateChannel};
use relay_proto::stats::CloseReason;
use relay_proto::{
    ChannelId, Command, CommandOutcome, Direction, DropReason, ErrorCode, Event, Format, MonoTime,
    Relay, RelayConfig, Response, SendTimes, SocketId, Verdict,
};

const ECHO: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::new(127, 0, 0, 1),
    4000,
));

fn ast() -> SocketAddr {
    "127.0.0.2:5000".parse().unwrap()
}

fn id(s: &str) -> ChannelId {
    ChannelId::try_from(s).unwrap()
}

fn add(channel: &str, asterisk: Option<SocketAddr>) -> AddChannel {
    AddChannel {
        channel: id(channel),
        port: 21_000,
        asterisk,
        echo: None,
        format: Format::Ulaw,
    }
}

fn t(ms: u64) -> MonoTime {
    MonoTime::from_nanos(ms * MS)
}

fn reply(o: CommandOutcome) -> Result<Response, relay_proto::ErrorReply> {
    match o {
        CommandOutcome::Reply(r) => r,
        other => panic!("expected a plain reply, got {other:?}"),
    }
}

fn err_code(o: CommandOutcome) -> ErrorCode {
    reply(o).expect_err("expected an error").code
}

fn forward(to: SocketAddr, direction: Direction) -> Verdict {
    Verdict::Forward { to, direction }
}

#[test]
fn forwards_both_ways_and_drops_strangers() {
    let mut r = Relay::new(RelayConfig::default()).unwrap();
    let s = open(&mut r, t(0), add("a", Some(ast())));
    let p = rtp(1, 160, 7);
    assert_eq!(
        r.handle_datagram(t(1), s, ast(), &p),
        forward(ECHO, Direction::ToEcho)
    );
    assert_eq!(
        r.handle_datagram(t(2), s, ECHO, &p),
        forward(ast(), Direction::ToAsterisk)
    );
    let stranger: SocketAddr = "127.0.0.9:5000".parse().unwrap();
    assert_eq!(
        r.handle_datagram(t(3), s, stranger, &p),
        Verdict::Drop(DropReason::UnknownSource)
    );
    // Forwarding carries on after the stranger.
    assert_eq!(
        r.handle_datagram(t(4), s, ast(), &rtp(2, 320, 7)),
        forward(ECHO, Direction::ToEcho)
    );
    let st = r.channel_stats(t(5), &id("a")).unwrap();
    assert_eq!(st.drops.get(DropReason::UnknownSource), 1);
    assert_eq!(st.traffic.to_echo.packets, 2);
    assert_eq!(st.traffic.to_asterisk.packets, 1);
    assert_eq!(st.round_trip.matched, 1);
    assert_eq!(st.rtt.count, 1);
    // T1 − T0 = 1 ms, within the per-channel histogram's 1 % precision.
    assert!(st.rtt.min_ns <= MS && MS <= st.rtt.max_ns && st.rtt.max_ns - st.rtt.min_ns < MS / 100);
}

#[test]
fn malformed_packets_are_dropped_and_counted_by_reason() {
    let mut r = Relay::new(RelayConfig::default()).unwrap();
    let s = open(&mut r, t(0), add("a", Some(ast())));
    let mut v1 = rtp(1, 160, 7);
    v1[0] = 0x40;
    let mut csrc = rtp(1, 160, 7);
    csrc.truncate(14);
    csrc[0] |= 0x0f;
    let cases: [(&[u8], DropReason); 4] = [
        (&[0x80, 0, 0], DropReason::TooShort),
        (&v1, DropReason::BadVersion),
        (&csrc, DropReason::CsrcOverrun),
        (&[0x80, 200, 0, 9, 0, 0, 0, 0], DropReason::RtcpLength),
    ];
    for (bytes, reason) in cases {
        assert_eq!(
            r.handle_datagram(t(1), s, ast(), bytes),
            Verdict::Drop(reason)
        );
        assert_eq!(
            r.handle_datagram(t(1), s, ECHO, bytes),
            Verdict::Drop(reason)
        );
    }
    let g = r.global_stats();
    for (_, reason) in cases {
        assert_eq!(g.drops.get(reason), 2, "{reason:?}");
    }
    assert_eq!(g.traffic.to_echo.packets + g.traffic.to_asterisk.packets, 0);
    // Datagrams on a socket with no channel.
    assert_eq!(
        r.handle_datagram(t(1), SocketId(99), ast(), &rtp(1, 1, 1)),
        Verdict::Drop(DropReason::NoChannel)
    );
    assert_eq!(r.global_stats().drops.get(DropReason::NoChannel), 1);
    // Drops the backend detects itself are counted the same way.
    r.count_drop(DropReason::NoChannel);
    assert_eq!(r.global_stats().drops.get(DropReason::NoChannel), 2);
}

#[test]
fn rtcp_is_forwarded_but_not_measured() {
    let mut r = Relay::new(RelayConfig::default()).unwrap();
    let s = open(&mut r, t(0), add("a", Some(ast())));
    let rr = [0x80, 201, 0, 1, 0, 0, 0, 42];
    assert_eq!(
        r.handle_datagram(t(1), s, ast(), &rr),
        forward(ECHO, Direction::ToEcho)
    );
    assert_eq!(
        r.handle_datagram(t(2), s, ECHO, &rr),
        forward(ast(), Direction::ToAsterisk)
    );
    let st = r.channel_stats(t(3), &id("a")).unwrap();
    assert_eq!(st.traffic.to_echo.rtcp, 1);
    assert_eq!(st.round_trip.sent, 0);
    assert_eq!(st.round_trip.unmatched, 0);
    assert_eq!(st.streams.to_echo.expected, 0);
}

#[test]
fn latches_asterisk_from_the_first_valid_packet_unless_strict() {
    let mut r = Relay::new(RelayConfig::default()).unwrap();
    let s = open(&mut r, t(0), add("a", None));
    // An echo with nowhere to go yet.
    assert_eq!(
        r.handle_datagram(t(1), s, ECHO, &rtp(1, 160, 7)),
        Verdict::Drop(DropReason::NoAsteriskAddress)
    );
    // Garbage from a would-be Asterisk does not latch.
    assert_eq!(
        r.handle_datagram(t(1), s, ast(), &[0x80, 0, 3]),
        Verdict::Drop(DropReason::TooShort)
    );
    assert_eq!(
        r.handle_datagram(t(2), s, ast(), &rtp(1, 160, 7)),
        forward(ECHO, Direction::ToEcho)
    );
    let other: SocketAddr = "127.0.0.3:5000".parse().unwrap();
    assert_eq!(
        r.handle_datagram(t(3), s, other, &rtp(2, 320, 7)),
        Verdict::Drop(DropReason::UnknownSource),
        "latched: another source is a stranger"
    );
    let st = r.channel_stats(t(4), &id("a")).unwrap();
    assert!(st.latched);
    assert_eq!(st.asterisk, Some(ast()));

    // update replaces a latched address.
    let o = r.handle_command(
        t(5),
        Command::Update(UpdateChannel {
            channel: id("a"),
            asterisk: other,
        }),
    );
    assert!(matches!(reply(o), Ok(Response::Updated { .. })));
    assert_eq!(
        r.handle_datagram(t(6), s, other, &rtp(3, 480, 7)),
        forward(ECHO, Direction::ToEcho)
    );
    assert!(!r.channel_stats(t(7), &id("a")).unwrap().latched);

    let mut strict = Relay::new(RelayConfig {
        strict_source: true,
        ..RelayConfig::default()
    })
    .unwrap();
    let s = open(&mut strict, t(0), add("a", None));
    assert_eq!(
        strict.handle_datagram(t(1), s, ast(), &rtp(1, 160, 7)),
        Verdict::Drop(DropReason::UnknownSource)
    );
}

#[test]
fn ssrc_change_starts_a_new_source_and_keeps_the_counts() {
    let mut r = Relay::new(RelayConfig {
        min_sequential: 1,
        ..RelayConfig::default()
    })
    .unwrap();
    let s = open(&mut r, t(0), add("a", Some(ast())));
    for k in 0..10u16 {
        let _ = r.handle_datagram(
            t(u64::from(k) * 20),
            s,
            ast(),
            &rtp(k, 160 * u32::from(k), 1),
        );
    }
    // Asterisk changes SSRC and sequence (a re-bridge); one packet of the old stream was lost.
    for k in 0..10u16 {
        let seq = if k == 5 { continue } else { 30_000 + k };
        let _ = r.handle_datagram(
            t(200 + u64::from(k) * 20),
            s,
            ast(),
            &rtp(seq, 9_999 + 160 * u32::from(k), 2),
        );
        let v = r.handle_datagram(
            t(201 + u64::from(k) * 20),
            s,
            ECHO,
            &rtp(seq, 9_999 + 160 * u32::from(k), 2),
        );
        assert_eq!(v, forward(ast(), Direction::ToAsterisk));
    }
    let st = r.channel_stats(t(500), &id("a")).unwrap();
    let fwd = st.streams.to_echo;
    assert_eq!(fwd.ssrc_changes, 1);
    assert_eq!((fwd.expected, fwd.received, fwd.lost), (20, 19, 1));
    assert_eq!(st.round_trip.matched, 9, "the new SSRC is measured");
}

#[test]
fn commands_add_update_list_stats_remove_drain() {
    let mut r = Relay::new(RelayConfig {
        max_channels: 2,
        ..RelayConfig::default()
    })
    .unwrap();
    let a = open(&mut r, t(0), add("a", None));
    assert_eq!(
        err_code(r.handle_command(t(0), Command::Add(add("a", None)))),
        ErrorCode::DuplicateChannel
    );
    let b = open(&mut r, t(0), add("b", None));
    assert_ne!(a, b);
    assert_eq!(
        err_code(r.handle_command(t(0), Command::Add(add("c", None)))),
        ErrorCode::Limit
    );

    let bad_echo = AddChannel {
        echo: Some("0.0.0.0:4000".parse().unwrap()),
        ..add("z", None)
    };
    assert_eq!(
        err_code(r.handle_command(t(0), Command::Add(bad_echo))),
        ErrorCode::BadRequest
    );
    assert_eq!(
        err_code(r.handle_command(
            t(0),
            Command::Update(UpdateChannel {
                channel: id("a"),
                asterisk: ECHO
            })
        )),
        ErrorCode::BadRequest,
        "asterisk and echo on one address"
    );
    assert_eq!(
        err_code(r.handle_command(
            t(0),
            Command::Update(UpdateChannel {
                channel: id("x"),
                asterisk: ast()
            })
        )),
        ErrorCode::UnknownChannel
    );

    let Ok(Response::Channels { channels }) = reply(r.handle_command(t(0), Command::List)) else {
        panic!("list")
    };
    assert_eq!(
        channels
            .iter()
            .map(|c| c.channel.as_str())
            .collect::<Vec<_>>(),
        ["a", "b"]
    );

    let q = |c: Option<&str>| Command::Stats(StatsQuery { channel: c.map(id) });
    assert!(matches!(
        reply(r.handle_command(t(0), q(None))),
        Ok(Response::Global { .. })
    ));
    assert!(matches!(
        reply(r.handle_command(t(0), q(Some("b")))),
        Ok(Response::Channel { .. })
    ));
    assert_eq!(
        err_code(r.handle_command(t(0), q(Some("x")))),
        ErrorCode::UnknownChannel
    );

    let _ = r.handle_datagram(t(1), a, ast(), &rtp(1, 160, 1));
    match r.handle_command(t(2), Command::Remove(RemoveChannel { channel: id("a") })) {
        CommandOutcome::Close {
            socket,
            reply: Ok(Response::Removed { stats, .. }),
        } => {
            assert_eq!(socket, a);
            assert_eq!(stats.traffic.to_echo.packets, 1);
            assert_eq!(
                stats.round_trip.timeouts, 1,
                "the unanswered packet times out at removal"
            );
        }
        other => panic!("remove: {other:?}"),
    }
    assert_eq!(
        r.handle_datagram(t(3), a, ast(), &rtp(2, 320, 1)),
        Verdict::Drop(DropReason::NoChannel)
    );
    assert_eq!(
        err_code(r.handle_command(t(3), Command::Remove(RemoveChannel { channel: id("a") }))),
        ErrorCode::UnknownChannel
    );

    // The slot is free again; then drain refuses new channels.
    let _ = open(&mut r, t(4), add("c", None));
    let Ok(Response::Draining { active }) = reply(r.handle_command(t(5), Command::Drain)) else {
        panic!("drain")
    };
    assert_eq!(active, 2);
    assert_eq!(
        err_code(r.handle_command(t(5), Command::Add(add("d", None)))),
        ErrorCode::Draining
    );
    let g = r.global_stats();
    assert!(g.draining);
    assert_eq!(
        (g.channels, g.channels_opened, g.channels_removed),
        (2, 3, 1)
    );
}

#[test]
fn a_failed_bind_gives_the_slot_back() {
    let mut r = Relay::new(RelayConfig {
        max_channels: 1,
        ..RelayConfig::default()
    })
    .unwrap();
    let CommandOutcome::Open(p) = r.handle_command(t(0), Command::Add(add("a", None))) else {
        panic!("open")
    };
    let e = relay_proto::ErrorReply::new(ErrorCode::PortInUse, "port 21000 in use");
    assert_eq!(r.complete_open(t(0), p, Err(e.clone())), Err(e));
    assert_eq!(r.channel_count(), 0);
    let _ = open(&mut r, t(0), add("a", None));
    assert_eq!(r.channel_count(), 1);
}

#[test]
fn idle_channels_close_and_are_reported() {
    let config = RelayConfig {
        idle_timeout: Duration::from_secs(60),
        ..RelayConfig::default()
    };
    let mut r = Relay::new(config).unwrap();
    assert_eq!(r.poll_timeout(), None, "no channels, no timer");
    let quiet = open(&mut r, t(0), add("quiet", None));
    let busy = open(&mut r, t(0), add("busy", Some(ast())));
    let mut now = t(0);
    let mut events = Vec::new();
    // Drive the timer for 61 s; "busy" sends a packet every second.
    while now < t(61_000) {
        now = r.poll_timeout().expect("timer armed");
        if now.as_nanos() % (1_000 * MS) == 0 {
            let _ = r.handle_datagram(now, busy, ast(), &rtp(1, 160, 3));
        }
        r.handle_timeout(now);
        events.extend(std::iter::from_fn(|| r.poll_event()));
    }
    assert_eq!(events.len(), 1, "{events:?}");
    let Event::ChannelClosed {
        socket,
        reason,
        stats,
    } = &events[0];
    assert_eq!((*socket, *reason), (quiet, CloseReason::Idle));
    assert_eq!(stats.channel.as_str(), "quiet");
    assert!(stats.idle_ns >= 60_000 * MS);
    assert_eq!(r.channel_count(), 1);
    assert_eq!(r.global_stats().channels_idle, 1);
}

#[test]
fn bad_configs_are_refused() {
    let bad = [
        RelayConfig {
            max_channels: 0,
            ..RelayConfig::default()
        },
        RelayConfig {
            t0_slots: 1000,
            ..RelayConfig::default()
        },
        RelayConfig {
            echo_timeout: Duration::ZERO,
            ..RelayConfig::default()
        },
        RelayConfig {
            default_echo: "127.0.0.1:0".parse().unwrap(),
            ..RelayConfig::default()
        },
    ];
    for c in bad {
        assert!(Relay::new(c.clone()).is_err(), "{c:?}");
    }
}

/// Estimated send times (`--timestamps user`, the way before kernel transmit stamps, kept for
/// comparison): T0 and the end of a forward come from the submitting call's clock reads.
fn estimated() -> RelayConfig {
    RelayConfig {
        send_times: SendTimes::Estimated,
        ..RelayConfig::default()
    }
}

/// Handles one datagram with kernel send times; returns the id its send must carry.
fn received(
    relay: &mut Relay,
    arrival: MonoTime,
    socket: SocketId,
    from: SocketAddr,
    bytes: &[u8],
) -> u32 {
    let v = relay.handle_received(arrival, arrival, socket, from, &mut bytes.to_vec());
    assert!(matches!(v, Verdict::Forward { .. }), "{v:?}");
    relay
        .send_id()
        .expect("a forwarded datagram has a stamp id")
}

/// Kernel send times: T0 and the end of a forward are the send's transmit stamp, whether it
/// comes before the echo or after it; the same round trip either way.
#[test]
fn the_transmit_stamp_is_t0_whether_it_comes_before_or_after_the_echo() {
    let us = |n: u64| MonoTime::from_nanos(n * 1_000);
    let mut relay = Relay::new(RelayConfig::default()).unwrap();
    let s = open(&mut relay, t(0), add("a", Some(ast())));
    for k in 0..10u16 {
        let base = 20_000 * u64::from(k) + 1_000_000;
        let p = rtp(k, 160 * u32::from(k), 7);
        // Arrives at base, handled 30 µs later, leaves (its stamp) 50 µs after arrival.
        let v = relay.handle_received(us(base), us(base + 30), s, ast(), &mut p.clone());
        assert_eq!(v, forward(ECHO, Direction::ToEcho));
        let out = relay.send_id().unwrap();
        assert_eq!(relay.unsubmitted(), 0, "nothing estimated");
        let back = base + 50 + 2_000;
        if k % 2 == 0 {
            relay.tx_stamped(out, Some(us(base + 50)));
        }
        let v = relay.handle_received(us(back), us(back + 40), s, ECHO, &mut p.clone());
        assert_eq!(v, forward(ast(), Direction::ToAsterisk));
        let ret = relay.send_id().unwrap();
        if k % 2 == 1 {
            // The echo came back before the stamp of its packet's send: settled by the stamp.
            assert_eq!(relay.global_stats().round_trip.matched, u64::from(k));
            relay.tx_stamped(out, Some(us(base + 50)));
        }
        relay.tx_stamped(ret, Some(us(back + 60)));
    }
    let g = relay.global_stats();
    assert_eq!((g.rtt.count, g.rtt.mean_ns), (10, 2_000_000), "{:?}", g.rtt);
    assert_eq!(g.forward.to_echo.mean_ns, 50_000, "{:?}", g.forward);
    assert_eq!(g.forward.to_asterisk.mean_ns, 60_000, "{:?}", g.forward);
    assert_eq!(g.receive_delay.to_echo.mean_ns, 30_000);
    assert_eq!(g.round_trip.matched, 10);
    assert_eq!(g.timestamps.kernel, 20);
    assert_eq!(g.timestamps.missing.total(), 0);
    let c = relay.channel_stats(us(2_000_000), &id("a")).unwrap();
    assert_eq!(
        c.timestamps.kernel, 20,
        "each channel says how many were timed"
    );
}

/// Nothing made up: a stamp that never comes, a round trip or forward time that would not be
/// positive, are counted, never recorded; a stamp no send waits for is stale.
#[test]
fn missing_and_impossible_times_are_counted_not_recorded() {
    let us = |n: u64| MonoTime::from_nanos(n * 1_000);
    let mut relay = Relay::new(RelayConfig::default()).unwrap();
    let s = open(&mut relay, t(0), add("a", Some(ast())));
    // 1: its stamp never comes; its echo does.
    let one = received(&mut relay, us(1_000), s, ast(), &rtp(1, 160, 7));
    let _ = received(&mut relay, us(3_000), s, ECHO, &rtp(1, 160, 7));
    // 2: stamped after its echo came back (a clock gone wrong): not positive.
    let two = received(&mut relay, us(1_020), s, ast(), &rtp(2, 320, 7));
    let _ = received(&mut relay, us(3_020), s, ECHO, &rtp(2, 320, 7));
    relay.tx_stamped(two, Some(us(3_020)));
    // 3: stamped before it arrived: the forward time is not positive; the round trip is fine.
    let three = received(&mut relay, us(1_040), s, ast(), &rtp(3, 480, 7));
    relay.tx_stamped(three, Some(us(1_040)));
    let _ = received(&mut relay, us(3_040), s, ECHO, &rtp(3, 480, 7));
    // 4: a stamp that cannot be converted (a step of the wall clock).
    let four = received(&mut relay, us(1_060), s, ast(), &rtp(4, 640, 7));
    relay.tx_stamped(four, None);
    // Ids nobody waits for: out of range, or settled already.
    relay.tx_stamped(u32::MAX - 7, Some(us(5_000)));
    relay.tx_stamped(three, Some(us(5_000)));
    // The echo timeout (2 s) passes: the stamp of 1, and of the returns, are given up on.
    relay.handle_timeout(us(3_000_000));
    relay.tx_stamped(one, Some(us(1_050)));
    let g = relay.global_stats();
    let c = relay.channel_stats(us(3_000_000), &id("a")).unwrap();
    for (who, ts) in [("relay", g.timestamps), ("channel", c.timestamps)] {
        // Returns of 1, 2, 3 never stamped: 3 no_stamp with 1's own.
        assert_eq!(ts.missing.no_stamp, 4, "{who}: {ts:?}");
        assert_eq!(ts.missing.rtt_not_positive, 1, "{who}: {ts:?}");
        assert_eq!(ts.missing.forward_not_positive, 1, "{who}: {ts:?}");
        assert_eq!(ts.missing.clock_step, 1, "{who}: {ts:?}");
        assert_eq!(ts.kernel, 2, "{who}: {ts:?}");
    }
    assert_eq!(g.timestamps.stale, 3, "{:?}", g.timestamps);
    // One round trip measured (3: 2 ms), two back but unmeasured (1, 2), one lost (4).
    assert_eq!(g.rtt.count, 1, "{:?}", g.rtt);
    assert!(g.rtt.min_ns.abs_diff(2_000_000) <= 2_048, "{:?}", g.rtt);
    assert_eq!(g.round_trip.matched, 1);
    assert_eq!(g.round_trip.unmeasured, 2);
    assert_eq!(g.round_trip.timeouts, 1);
    assert_eq!(
        g.forward.to_echo.count, 1,
        "only 2's forward time was positive"
    );
    assert!(g.forward.to_echo.min_ns.abs_diff(2_000_000) <= 2_048);
}

/// A stamp for a packet whose channel has closed since is timed relay-wide only, and is not
/// charged to the channel that took its slot.
#[test]
fn a_stamp_for_a_closed_channel_does_not_touch_the_next_one_in_its_slot() {
    let us = |n: u64| MonoTime::from_nanos(n * 1_000);
    let mut relay = Relay::new(RelayConfig::default()).unwrap();
    let a = open(&mut relay, t(0), add("a", Some(ast())));
    let old = received(&mut relay, us(100), a, ast(), &rtp(1, 160, 7));
    let _ = relay.handle_command(us(150), Command::Remove(RemoveChannel { channel: id("a") }));
    let b = open(&mut relay, us(160), add("b", Some(ast())));
    assert_eq!(a, b, "the slot is reused");
    // b sends the same SSRC and sequence: the old stamp must not become its T0.
    let new = received(&mut relay, us(200), b, ast(), &rtp(1, 160, 7));
    relay.tx_stamped(old, Some(us(120)));
    relay.tx_stamped(new, Some(us(250)));
    let _ = received(&mut relay, us(1_250), b, ECHO, &rtp(1, 160, 7));
    let c = relay.channel_stats(us(2_000), &id("b")).unwrap();
    assert_eq!(c.timestamps.kernel, 1, "{:?}", c.timestamps);
    assert_eq!((c.rtt.count, c.rtt.mean_ns), (1, 1_000_000), "{:?}", c.rtt);
    let g = relay.global_stats();
    assert_eq!(g.timestamps.kernel, 2);
    assert_eq!(
        g.forward.to_echo.count, 2,
        "the closed channel's forward is still true"
    );
}

/// A GSO send's datagrams share its one stamp: the send carries the first one's id.
#[test]
fn the_datagrams_of_a_gathered_send_share_its_stamp() {
    let us = |n: u64| MonoTime::from_nanos(n * 1_000);
    let mut relay = Relay::new(RelayConfig::default()).unwrap();
    let s = open(&mut relay, t(0), add("a", Some(ast())));
    let mut own = Vec::new();
    for k in 0..5u16 {
        let id = received(
            &mut relay,
            us(100 + u64::from(k)),
            s,
            ast(),
            &rtp(k, 160 * u32::from(k), 7),
        );
        if k % 2 == 1 || k == 4 {
            relay.gathered_last(0);
            assert_eq!(relay.send_id(), None, "it leaves with the batch");
        } else {
            own.push(id);
        }
    }
    let batch = relay.batch_queued(0).expect("the batch's stamp id");
    assert_eq!(relay.batch_queued(0), None, "taken once");
    relay.tx_stamped(own[0], Some(us(200)));
    relay.tx_stamped(own[1], Some(us(210)));
    relay.tx_stamped(batch, Some(us(220)));
    let mut ret = Vec::new();
    for k in 0..5u16 {
        ret.push(received(
            &mut relay,
            us(2_220),
            s,
            ECHO,
            &rtp(k, 160 * u32::from(k), 7),
        ));
    }
    for id in ret {
        relay.tx_stamped(id, Some(us(2_230)));
    }
    let g = relay.global_stats();
    // RTTs 2.02 (0), 2.0 (1, 3, 4: the batch), 2.01 (2) ms.
    assert_eq!((g.rtt.count, g.rtt.mean_ns), (5, 2_006_000), "{:?}", g.rtt);
    assert_eq!(g.timestamps.kernel, 10);
    assert_eq!(g.timestamps.missing.total(), 0);
    // A refused send leaves nothing waiting and nothing missing.
    let failed = received(&mut relay, us(3_000), s, ast(), &rtp(9, 9 * 160, 7));
    assert_eq!(relay.send_failed(failed), Some((s, Direction::ToEcho)));
    relay.handle_timeout(us(10_000_000));
    assert_eq!(relay.global_stats().timestamps.missing.total(), 0);
}

/// The deferred path a backend with estimated send times takes: arrival, handling and
/// submission are three different moments, and each figure uses the right one.
#[test]
fn kernel_arrival_and_send_submission_define_rtt_forward_and_receive_delay() {
    let us = |n: u64| MonoTime::from_nanos(n * 1_000);
    let mut relay = Relay::new(estimated()).unwrap();
    let s = open(&mut relay, t(0), add("a", Some(ast())));
    for k in 0..10u16 {
        let base = 20_000 * u64::from(k) + 1_000_000;
        // Arrives from Asterisk at base, handled 30 µs later (the wake-up), submitted 50 µs
        // after arrival (the rest of the batch).
        let v = relay.handle_received(
            us(base),
            us(base + 30),
            s,
            ast(),
            &mut rtp(k, 160 * u32::from(k), 7),
        );
        assert_eq!(v, forward(ECHO, Direction::ToEcho));
        assert_eq!(relay.unsubmitted(), 1);
        relay.submitted(us(base + 50));
        assert_eq!(relay.unsubmitted(), 0);
        // The echo's copy reaches the socket 2 ms after the send was submitted, and is handled
        // 40 µs later, submitted toward Asterisk 60 µs after its arrival.
        let back = base + 50 + 2_000;
        let v = relay.handle_received(
            us(back),
            us(back + 40),
            s,
            ECHO,
            &mut rtp(k, 160 * u32::from(k), 7),
        );
        assert_eq!(v, forward(ast(), Direction::ToAsterisk));
        relay.submitted(us(back + 60));
    }
    let g = relay.global_stats();
    // RTT = T1 (kernel arrival of the echo) − T0 (submission of the send): exactly 2 ms, not
    // the 2.05 ms from arrival nor the 2.01 ms between the two handlings.
    // (The mean is exact; percentiles carry the histogram's 3 significant digits.)
    assert_eq!((g.rtt.count, g.rtt.mean_ns), (10, 2_000_000), "{:?}", g.rtt);
    assert!(g.rtt.p50_ns.abs_diff(2_000_000) <= 2_000, "{:?}", g.rtt);
    assert_eq!(g.forward.to_echo.mean_ns, 50_000, "{:?}", g.forward);
    assert_eq!(g.forward.to_asterisk.mean_ns, 60_000, "{:?}", g.forward);
    assert_eq!(
        g.receive_delay.to_echo.mean_ns, 30_000,
        "{:?}",
        g.receive_delay
    );
    assert_eq!(
        g.receive_delay.to_asterisk.mean_ns, 40_000,
        "{:?}",
        g.receive_delay
    );
    assert_eq!(g.round_trip.matched, 10);
}

#[test]
fn a_batch_submitted_together_shares_its_submission_time_and_survives_a_removal() {
    let us = |n: u64| MonoTime::from_nanos(n * 1_000);
    let mut relay = Relay::new(estimated()).unwrap();
    let a = open(&mut relay, t(0), add("a", Some(ast())));
    let b = open(&mut relay, t(0), add("b", Some(ast())));
    // Three packets in one batch, one a duplicate (it keeps the first copy's T0).
    let _ = relay.handle_received(us(100), us(200), a, ast(), &mut rtp(1, 160, 7));
    let _ = relay.handle_received(us(110), us(200), a, ast(), &mut rtp(1, 160, 7));
    let _ = relay.handle_received(us(120), us(200), b, ast(), &mut rtp(1, 160, 8));
    assert_eq!(relay.unsubmitted(), 3);
    // Channel b goes away before the batch is submitted: nothing breaks, nothing is stamped.
    let _ = relay.handle_command(us(250), Command::Remove(RemoveChannel { channel: id("b") }));
    relay.submitted(us(300));
    let _ = relay.handle_received(us(1_300), us(1_310), a, ECHO, &mut rtp(1, 160, 7));
    let s = relay.channel_stats(us(2_000), &id("a")).unwrap();
    assert_eq!(s.round_trip.matched, 1);
    // T0 is the submission (300 µs), not either copy's arrival.
    assert_eq!(s.rtt.mean_ns, 1_000_000, "{:?}", s.rtt);
}

#[test]
fn sends_submitted_by_one_call_leave_one_after_another() {
    let us = |n: u64| MonoTime::from_nanos(n * 1_000);
    let mut relay = Relay::new(estimated()).unwrap();
    let s = open(&mut relay, t(0), add("a", Some(ast())));
    // Four packets of one batch, all arrived at 100 µs, sent by one call from 200 to 240 µs:
    // each takes 10 µs of it and leaves a quarter into its share, at 202.5, 212.5, 222.5, 232.5.
    for k in 0..4u16 {
        let _ = relay.handle_received(
            us(100),
            us(150),
            s,
            ast(),
            &mut rtp(k, 160 * u32::from(k), 7),
        );
    }
    relay.submitted_between(us(200), us(240));
    for k in 0..4u16 {
        let _ = relay.handle_received(
            us(2_300),
            us(2_300),
            s,
            ECHO,
            &mut rtp(k, 160 * u32::from(k), 7),
        );
    }
    relay.submitted(us(2_300));
    let g = relay.global_stats();
    // Forward times 102.5, 112.5, 122.5, 132.5 µs; RTTs 2.0975 … 2.0675 ms: exact means.
    assert_eq!(
        g.forward.to_echo.mean_ns, 117_500,
        "{:?}",
        g.forward.to_echo
    );
    assert_eq!(g.rtt.mean_ns, 2_082_500, "{:?}", g.rtt);
    assert_eq!((g.rtt.count, g.forward.to_echo.count), (4, 4));
}

/// A shared echo leg gathers echo-bound datagrams into one GSO send queued after the others: the
/// send's place in the queue, not the datagrams' order of arrival, says when they left, and all of
/// them left together (one packet on the wire).
#[test]
fn datagrams_of_one_gathered_send_leave_together_at_its_place_in_the_queue() {
    let us = |n: u64| MonoTime::from_nanos(n * 1_000);
    let mut relay = Relay::new(estimated()).unwrap();
    let s = open(&mut relay, t(0), add("a", Some(ast())));
    // Arrived at 100 µs: 0 and 2 get sends of their own, 1, 3 and 4 are gathered into batch 0,
    // which is queued last. Three sends, submitted by one call from 200 to 248 µs, each leaving
    // a quarter into its 16 µs: 0 at 204, 2 at 220, the batch (1, 3, 4) at 236.
    for k in 0..5u16 {
        let _ = relay.handle_received(
            us(100),
            us(150),
            s,
            ast(),
            &mut rtp(k, 160 * u32::from(k), 7),
        );
        if k % 2 == 1 || k == 4 {
            relay.gathered_last(0);
        }
    }
    relay.batch_queued(0);
    relay.submitted_between(us(200), us(248));
    assert_eq!(relay.unsubmitted(), 0);
    for k in 0..5u16 {
        let _ = relay.handle_received(
            us(2_300),
            us(2_300),
            s,
            ECHO,
            &mut rtp(k, 160 * u32::from(k), 7),
        );
    }
    relay.submitted(us(2_300));
    let g = relay.global_stats();
    // Forward 104, 136, 120, 136, 136 µs; RTTs 2.096, 2.064, 2.08, 2.064, 2.064 ms.
    assert_eq!(
        g.forward.to_echo.mean_ns, 126_400,
        "{:?}",
        g.forward.to_echo
    );
    assert_eq!(g.rtt.mean_ns, 2_073_600, "{:?}", g.rtt);
    assert_eq!(g.rtt.count, 5);
}

#[test]
fn a_gathered_send_not_queued_yet_waits_for_the_submission_that_carries_it() {
    let us = |n: u64| MonoTime::from_nanos(n * 1_000);
    let mut relay = Relay::new(estimated()).unwrap();
    let s = open(&mut relay, t(0), add("a", Some(ast())));
    let _ = relay.handle_received(us(100), us(100), s, ast(), &mut rtp(1, 160, 7));
    relay.gathered_last(3);
    let _ = relay.handle_received(us(100), us(100), s, ast(), &mut rtp(2, 320, 7));
    // The queue fills and is submitted while batch 3 is still gathering: only datagram 2 left.
    relay.submitted_between(us(200), us(210));
    assert_eq!(relay.unsubmitted(), 1);
    relay.batch_queued(3);
    relay.submitted_between(us(400), us(410));
    assert_eq!(relay.unsubmitted(), 0);
    for k in 1..3u16 {
        let _ = relay.handle_received(
            us(2_400),
            us(2_400),
            s,
            ECHO,
            &mut rtp(k, 160 * u32::from(k), 7),
        );
    }
    relay.submitted(us(2_400));
    let st = relay.channel_stats(us(3_000), &id("a")).unwrap();
    // RTTs 2.1975 ms (datagram 2, sent at 202.5 µs) and 1.9975 ms (datagram 1, sent with batch 3
    // at 402.5 µs). (Min and max carry the histogram's precision.)
    assert_eq!(
        (st.rtt.count, st.rtt.mean_ns),
        (2, 2_097_500),
        "{:?}",
        st.rtt
    );
    assert!(st.rtt.min_ns.abs_diff(1_997_500) <= 20_000, "{:?}", st.rtt);
    assert!(st.rtt.max_ns.abs_diff(2_197_500) <= 20_000, "{:?}", st.rtt);
}

#[test]
fn a_channel_is_scored_at_its_close() {
    let mut relay = Relay::new(RelayConfig::default()).unwrap();
    let s = open(&mut relay, t(0), add("a", Some(ast())));
    // 100 packets 20 ms apart, each echoed 40 ms later (RTT 40 ms, no jitter), 2 never echoed.
    for k in 0..100u16 {
        let at = 1_000 + 20 * u64::from(k);
        let _ = relay.handle_datagram(t(at), s, ast(), &rtp(k, 160 * u32::from(k), 7));
        if k % 50 != 49 {
            let _ = relay.handle_datagram(t(at + 40), s, ECHO, &rtp(k, 160 * u32::from(k), 7));
        }
    }
    let stats = match relay.handle_command(
        t(10_000),
        Command::Remove(RemoveChannel { channel: id("a") }),
    ) {
        CommandOutcome::Close {
            reply: Ok(Response::Removed { stats, .. }),
            ..
        } => stats,
        other => panic!("{other:?}"),
    };
    // Le = 20 + 0 + 10 ms: R = 93.2 − 0.75 − 2.5 × 2 % = 87.45.
    assert!(
        (stats.score.r_factor - 87.45).abs() < 0.01,
        "{:?}",
        stats.score
    );
    assert!((stats.score.mos - relay_proto::score::mos(87.45)).abs() < 1e-9);
    let h = &relay.histograms().calls;
    assert_eq!(h.count, 1);
    assert_eq!(h.mos[h.mos.len() - 1], 1);
}

#[test]
fn shards_merge_into_the_statistics_of_every_packet() {
    // Shard a: 3 calls through a 1 ms echo; shard b: 1 call through a 9 ms echo.
    let run = |calls: usize, delay_ms: u64, seed: u64| {
        let faults = common::EchoFaults {
            delay: Duration::from_millis(delay_ms),
            ..common::EchoFaults::default()
        };
        let mut sim = common::Sim::new(RelayConfig::default(), faults, seed);
        for i in 0..calls {
            let _ = sim.add_call(200, 100 * i as u16, i as u64 * MS, true);
        }
        sim.run();
        sim.relay
    };
    let (a, b) = (run(3, 1, 1), run(1, 9, 2));
    let (sa, sb) = (a.global_stats(), b.global_stats());
    let (m, hist) = relay_proto::merge_global([(&sa, a.histograms()), (&sb, b.histograms())]);
    assert_eq!(m.channels, 4);
    assert_eq!(m.channels_opened, 4);
    assert_eq!(m.traffic.to_echo.packets, 800);
    assert_eq!(
        m.round_trip.matched,
        sa.round_trip.matched + sb.round_trip.matched
    );
    assert_eq!(m.rtt.count, 800);
    assert_eq!(hist.rtt.len(), 800);
    // Percentiles of every packet: three quarters took ~1 ms, so the median is ~1 ms (a mean of
    // the shards' medians would say 5 ms); the p99 is the slow shard's ~9 ms.
    let ms = |ns: u64| ns as f64 / 1e6;
    assert!((ms(m.rtt.p50_ns) - 1.0).abs() < 0.01, "{:?}", m.rtt);
    assert!((ms(m.rtt.p99_ns) - 9.0).abs() < 0.01, "{:?}", m.rtt);
    assert_eq!(m.rtt.max_ns, sa.rtt.max_ns.max(sb.rtt.max_ns));
    let mean = (sa.rtt.mean_ns * 600 + sb.rtt.mean_ns * 200) / 800;
    assert!(
        m.rtt.mean_ns.abs_diff(mean) <= 1,
        "{} vs {mean}",
        m.rtt.mean_ns
    );
    // One shard merged alone is itself.
    let (one, _) = relay_proto::merge_global([(&sa, a.histograms())]);
    assert_eq!(one, sa);
}

/// The shared echo leg's round trip of one packet through channel `socket`, as a backend does it:
/// forward, tag, (the echo reflects the bytes), untag, hand back as the channel's return.
fn shared_round_trip(
    r: &mut Relay,
    socket: SocketId,
    asterisk: SocketAddr,
    seq: u16,
    ssrc: u32,
    at: u64,
) -> (Vec<u8>, Option<Verdict>) {
    let mut p = rtp(seq, 160 * u32::from(seq), ssrc);
    assert_eq!(
        r.handle_datagram(t(at), socket, asterisk, &p),
        forward(ECHO, Direction::ToEcho)
    );
    assert!(r.tag_for_echo(socket, &mut p));
    let on_the_echo_leg = p.clone();
    let back = r.untag_from_echo(&mut p);
    let verdict = back.map(|s| {
        assert_eq!(s, socket, "the tag names the channel");
        r.handle_datagram(t(at + 3), s, ECHO, &p)
    });
    assert_eq!(
        p,
        rtp(seq, 160 * u32::from(seq), ssrc),
        "Asterisk's SSRC is back"
    );
    (on_the_echo_leg, verdict)
}

#[test]
fn on_the_shared_echo_leg_two_calls_with_one_ssrc_are_told_apart_by_their_tags() {
    let mut r = Relay::new(RelayConfig::default()).unwrap();
    let (a_addr, b_addr): (SocketAddr, SocketAddr) = (
        "127.0.0.2:5000".parse().unwrap(),
        "127.0.0.2:5002".parse().unwrap(),
    );
    let a = open(
        &mut r,
        t(0),
        AddChannel {
            port: 21_000,
            ..add("a", Some(a_addr))
        },
    );
    let b = open(
        &mut r,
        t(0),
        AddChannel {
            port: 21_002,
            ..add("b", Some(b_addr))
        },
    );
    let mut tags = Vec::new();
    for seq in 0..10 {
        for (s, addr) in [(a, a_addr), (b, b_addr)] {
            let (leg, v) = shared_round_trip(&mut r, s, addr, seq, 0x1234, 20 * u64::from(seq));
            assert_eq!(
                v,
                Some(forward(addr, Direction::ToAsterisk)),
                "back to its own Asterisk"
            );
            let tag = u32::from_be_bytes(leg[8..12].try_into().unwrap());
            assert_ne!(tag, 0x1234, "the echo never sees Asterisk's SSRC");
            tags.push((s, tag));
        }
    }
    let (ta, tb) = (tags[0].1, tags[1].1);
    assert_ne!(ta, tb, "one SSRC, two tags");
    assert!(
        tags.iter().all(|&(s, t)| t == if s == a { ta } else { tb }),
        "a tag per channel"
    );
    for name in ["a", "b"] {
        let s = r.channel_stats(t(500), &id(name)).unwrap();
        assert_eq!(
            (s.round_trip.matched, s.rtt.count),
            (10, 10),
            "{name} measured every packet"
        );
        assert_eq!(s.streams.to_asterisk.lost, 0);
        assert!(
            s.rtt.p50_ns.abs_diff(3 * MS) < 3 * MS / 100,
            "{name}: {:?}",
            s.rtt
        );
    }

    // RTCP's sender SSRC is tagged and restored the same way.
    let mut rtcp = vec![0x80, 201, 0, 1, 0, 0, 0x12, 0x34];
    assert!(matches!(
        r.handle_datagram(t(600), a, a_addr, &rtcp),
        Verdict::Forward { .. }
    ));
    assert!(r.tag_for_echo(a, &mut rtcp));
    assert_eq!(u32::from_be_bytes(rtcp[4..8].try_into().unwrap()), ta);
    assert_eq!(r.untag_from_echo(&mut rtcp), Some(a));
    assert_eq!(rtcp, [0x80, 201, 0, 1, 0, 0, 0x12, 0x34]);
}

#[test]
fn a_forged_or_stale_tag_is_dropped_and_counted() {
    let mut r = Relay::new(RelayConfig::default()).unwrap();
    let a = open(&mut r, t(0), add("a", Some(ast())));
    let (leg, _) = shared_round_trip(&mut r, a, ast(), 1, 7, 0);
    // Forged: a slot with no channel, and the right slot with another generation.
    for forged in [
        relay_proto::tag::make(99, 0),
        relay_proto::tag::make(a.0, 77),
    ] {
        let mut p = leg.clone();
        p[8..12].copy_from_slice(&forged.to_be_bytes());
        assert_eq!(r.untag_from_echo(&mut p), None);
    }
    // Stale: the channel closed and its slot went to a new channel; its old tag finds nothing.
    assert!(matches!(
        r.handle_command(t(10), Command::Remove(RemoveChannel { channel: id("a") })),
        CommandOutcome::Close { .. }
    ));
    let again = open(&mut r, t(20), add("again", Some(ast())));
    assert_eq!(again, a, "the slot is reused");
    let mut p = leg.clone();
    assert_eq!(r.untag_from_echo(&mut p), None, "the old generation's tag");
    assert_eq!(
        r.untag_from_echo(&mut [0x80, 0, 1][..].to_vec()),
        None,
        "too short"
    );
    // A good tag from anyone but the echo (the shared socket takes datagrams from anyone): it
    // finds its channel, whose source check then drops it; nothing goes to Asterisk.
    let (mut p, _) = shared_round_trip(&mut r, again, ast(), 2, 7, 30);
    assert_eq!(r.untag_from_echo(&mut p), Some(again));
    let stranger: SocketAddr = "127.0.0.9:4444".parse().unwrap();
    assert_eq!(
        r.handle_datagram(t(40), again, stranger, &p),
        Verdict::Drop(DropReason::UnknownSource)
    );
    let g = r.global_stats();
    assert_eq!(g.drops.get(DropReason::UnknownTag), 3);
    assert_eq!(g.drops.get(DropReason::TooShort), 1);
    assert_eq!(g.drops.get(DropReason::UnknownSource), 1);
}
