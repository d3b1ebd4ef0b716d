//! Property tests (proptest): the sequence tracker against a reference model across wrap, loss,
//! duplication and reordering, and totality of everything that reads peer bytes (the RTP parser,
//! the control decoder, the line splitter) on arbitrary bytes.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)] // test values come from small, known ranges

use std::collections::HashSet;

use proptest::prelude::*;
use relay_proto::control::{decode_request, Frame, LineDecoder, SessionItem};
use relay_proto::rtp::{parse, parse_rtp, Packet, RtpHeader};
use relay_proto::seq::SequenceTracker;
use relay_proto::{ControlSession, Ssrc};

/// A stream as the network delivers it: extended sequence numbers in arrival order, with
/// loss, duplication and bounded reordering applied to all but the first two packets (which
/// pass probation), and never a run of losses as long as MAX_DROPOUT.
fn arrivals() -> impl Strategy<Value = (u64, Vec<u64>)> {
    (
        prop_oneof![0u64..65_536, 65_000u64..65_536],
        2usize..1_500,
        0.0f64..0.3,
        0.0f64..0.1,
        0u64..40,
        any::<u64>(),
    )
        .prop_map(|(start, n, loss, dup, spread, seed)| {
            let mut rng = seed;
            let mut next = move || {
                rng = rng
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                rng >> 33
            };
            let unit = |x: u64| x as f64 / (1u64 << 31) as f64;
            let mut keyed: Vec<(u64, u64, u64)> = Vec::new(); // (sort key, tiebreak, ext seq)
            for i in 0..n as u64 {
                let ext = start + i;
                if i < 2 {
                    keyed.push((i, i, ext));
                    continue;
                }
                if unit(next()) < loss {
                    continue;
                }
                let key = 10
                    + i * 2
                    + if spread == 0 {
                        0
                    } else {
                        next() % (spread * 2)
                    };
                keyed.push((key, i, ext));
                if unit(next()) < dup {
                    let later = key
                        + if spread == 0 {
                            1
                        } else {
                            next() % (spread * 2) + 1
                        };
                    keyed.push((later, i, ext));
                }
            }
            keyed.sort_unstable();
            (start, keyed.into_iter().map(|(_, _, e)| e).collect())
        })
}

/// The reference: what an omniscient observer counts, given true extended sequence numbers.
#[derive(Debug, PartialEq, Eq)]
struct Counts {
    expected: u64,
    received: u64,
    lost: u64,
    duplicates: u64,
    reordered: u64,
}

fn model(start: u64, arrivals: &[u64]) -> Counts {
    let base = start + 1; // the first packet is spent on probation
    let mut seen = HashSet::new();
    let (mut max, mut duplicates, mut reordered) = (base, 0, 0);
    for &e in &arrivals[1..] {
        if !seen.insert(e) {
            duplicates += 1;
        } else if e < max {
            reordered += 1;
        }
        max = max.max(e);
    }
    let expected = max - base + 1;
    let received = seen.len() as u64;
    Counts {
        expected,
        received,
        lost: expected - received,
        duplicates,
        reordered,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn sequence_tracker_matches_the_reference((start, arrivals) in arrivals()) {
        let mut t = SequenceTracker::new(2);
        for &e in &arrivals {
            let _ = t.update((e & 0xffff) as u16);
        }
        let got = Counts {
            expected: t.expected(),
            received: t.received(),
            lost: t.lost(),
            duplicates: t.duplicates(),
            reordered: t.reordered(),
        };
        prop_assert_eq!(got, model(start, &arrivals));
        prop_assert_eq!(t.lost(), t.gaps() - t.reordered());
    }

    #[test]
    fn rtp_parser_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        match parse(&bytes) {
            Ok(Packet::Rtp(p)) => {
                // The views lie inside the datagram and account for every byte.
                let ext = p.extension.map_or(0, |e| 4 + e.data.len());
                prop_assert_eq!(
                    12 + 4 * p.csrc_count() + ext + p.payload.len() + usize::from(p.padding),
                    bytes.len()
                );
            }
            Ok(Packet::Rtcp(p)) => prop_assert!((200..=204).contains(&p.packet_type)),
            Err(_) => {}
        }
        let _ = parse_rtp(&bytes);
    }

    #[test]
    fn rtp_header_round_trips(
        marker: bool, pt in 0u8..128, sequence: u16, timestamp: u32, ssrc: u32,
        payload in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        // Payload types 72–76 with the marker set are RTCP's 200–204 (RFC 5761 §4).
        prop_assume!(!(marker && (72..=76).contains(&pt)));
        let h = RtpHeader { marker, payload_type: pt, sequence, timestamp, ssrc: Ssrc(ssrc) };
        let mut b = vec![0; 12];
        prop_assert_eq!(h.write(&mut b), Some(12));
        b.extend_from_slice(&payload);
        let Ok(Packet::Rtp(p)) = parse(&b) else { return Err(TestCaseError::fail("not RTP")) };
        prop_assert_eq!((p.marker, p.payload_type, p.sequence, p.timestamp, p.ssrc), (marker, pt, sequence, timestamp, Ssrc(ssrc)));
        prop_assert_eq!(p.payload, &payload[..]);
    }

    #[test]
    fn control_decoder_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = decode_request(&bytes);
        let mut s = ControlSession::new(64);
        let mut out = Vec::new();
        s.push(&bytes, &mut out);
        for item in out {
            if let SessionItem::Reply(r) = item {
                prop_assert!(r.encode().ends_with('\n'));
            }
        }
    }

    #[test]
    fn control_decoder_is_total_on_json_like_text(
        line in r#"\{("(id|cmd|channel|port|asterisk|echo|format|version)":(-?[0-9]{1,22}|"[a-z0-9.:\[\]]{0,20}"|null|true|\[\]|\{\}),?){0,6}\}"#
    ) {
        let _ = decode_request(line.as_bytes());
    }

    #[test]
    fn line_splitting_does_not_depend_on_how_reads_are_cut(
        lines in proptest::collection::vec("[a-z{}\":,\r]{0,40}", 0..20),
        cuts in proptest::collection::vec(0usize..1_000, 0..10),
    ) {
        let stream: Vec<u8> = lines.iter().flat_map(|l| l.bytes().chain([b'\n'])).collect();
        let mut whole = Vec::new();
        LineDecoder::new(32).push(&stream, &mut whole);
        let mut cut = cuts.iter().map(|c| c % (stream.len() + 1)).collect::<Vec<_>>();
        cut.sort_unstable();
        let mut pieces = Vec::new();
        let mut d = LineDecoder::new(32);
        let mut at = 0;
        for c in cut.into_iter().chain([stream.len()]) {
            d.push(&stream[at..c], &mut pieces);
            at = c;
        }
        prop_assert_eq!(&pieces, &whole);
        for f in &whole {
            if let Frame::Line(l) = f {
                prop_assert!(!l.is_empty() && l.len() <= 32);
            }
        }
    }
}
