//! `interim` and `remove` give a channel's figures in mergeable form, on both backends: the
//! counters as `stats` has them and the round trips as a histogram that reads back to the same
//! count and percentiles; a later `interim` covers more, and `remove`'s figures cover it all.

#![allow(clippy::cast_possible_truncation)] // common's small known test values

mod common;

use common::{rtp, OneChannel};
use relay_proto::{Command, Response};

fn interim(one: &mut OneChannel) -> relay_proto::figures::ChannelFigures {
    match one.ctl.request(Command::Interim).unwrap() {
        Response::Interim { mut channels } => {
            assert_eq!(channels.len(), 1, "{channels:?}");
            channels.pop().unwrap()
        }
        r => panic!("{r:?}"),
    }
}

fn figures_follow_the_channel(backend: &str) {
    if !common::available(backend) {
        return;
    }
    let mut one = OneChannel::start(backend, &[]);
    for seq in 0..20 {
        one.round_trip(&rtp(seq, 7));
    }
    // Transmit stamps settle round trips as they are read (the tokio backend reads them when
    // the socket is next ready): wait until every round trip is timed.
    let stats = testkit::wait_for(
        "20 round trips timed",
        std::time::Duration::from_secs(5),
        || {
            let s = one.ctl.channel_stats("c1");
            (s.rtt.count >= 20).then_some(s)
        },
    );
    let first = interim(&mut one);
    assert_eq!(first.channel.as_str(), "c1");
    assert_eq!(first.traffic, stats.traffic);
    assert_eq!(first.round_trip.sent, stats.round_trip.sent);
    let rtt = first.rtt_histogram().unwrap();
    assert_eq!(rtt.len(), stats.rtt.count, "{backend}");
    assert_eq!(rtt.summary().p50_ns, stats.rtt.p50_ns, "{backend}");
    for seq in 20..30 {
        one.round_trip(&rtp(seq, 7));
    }
    let second = interim(&mut one);
    assert!(second.age_ns > first.age_ns);
    assert_eq!(second.traffic.to_echo.packets, 30);
    let removed = one
        .ctl
        .request(Command::Remove(relay_proto::control::RemoveChannel {
            channel: relay_proto::ChannelId::try_from("c1").unwrap(),
        }))
        .unwrap();
    let Response::Removed {
        stats,
        figures: Some(figures),
    } = removed
    else {
        panic!("{removed:?}")
    };
    assert_eq!(figures.traffic, stats.traffic);
    assert_eq!(figures.rtt_histogram().unwrap().len(), stats.rtt.count);
    assert_eq!(figures.age_ns, stats.age_ns);
    // Nothing open: an empty list.
    assert!(matches!(
        one.ctl.request(Command::Interim).unwrap(),
        Response::Interim { channels } if channels.is_empty()
    ));
}

#[test]
fn figures_follow_the_channel_uring() {
    figures_follow_the_channel("uring");
}

#[test]
fn figures_follow_the_channel_tokio() {
    figures_follow_the_channel("tokio");
}
