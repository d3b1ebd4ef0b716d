//! The probe header: what lets one packet be timed on both sides of Asterisk.
//!
//! `loadgen ari --callers rtp` is a caller whose every RTP payload starts with this header. The
//! relay recognises a channel that carries it (after [`RECOGNISE_AFTER`] valid headers in a row
//! from Asterisk) and, on each probe's way back toward Asterisk, writes two of its own kernel
//! times into it: when the probe arrived from Asterisk, and when its echo came back. loadgen, which
//! keeps its own kernel transmit and receive stamps, then splits each probe's round trip into
//! Asterisk in, the relay's loop and Asterisk out, exactly and per packet.
//!
//! Layout, at the start of the RTP payload, every field big-endian (48 bytes; the rest of the
//! payload is the sender's and is never touched):
//!
//! | offset | size | field | written by |
//! |---|---|---|---|
//! | 0 | 8 | magic `RTPRPROB` | sender |
//! | 8 | 4 | call index | sender |
//! | 12 | 4 | probe sequence (0, 1, 2 … per call) | sender |
//! | 16 | 8 | send time: the sender's `CLOCK_REALTIME` read just before the send, ns since the Unix epoch | sender |
//! | 24 | 4 | check: CRC-32 (IEEE) of bytes 0..24 | sender |
//! | 28 | 8 | relay arrival: the relay's kernel receive stamp of the probe from Asterisk, ns `CLOCK_REALTIME` (0: not written) | relay |
//! | 36 | 8 | relay return: the relay's kernel receive stamp of the probe's echo, ns `CLOCK_REALTIME` (0: not written) | relay |
//! | 44 | 4 | relay check: CRC-32 of bytes 0..44 (0: not written) | relay |
//!
//! The send time is a user-space reading, taken before the packet is handed to the kernel: the
//! sender's exact send time is its kernel transmit stamp, known only after the send, which the
//! sender keeps itself. The relay uses the send time only for its own approximate view of
//! Asterisk in. All times are of one host's clock: across hosts they compare only as well as the
//! clocks are synchronised.
//!
//! A payload is a probe only when the magic and the check both hold, so arbitrary audio passes
//! for one with a probability of about 2⁻⁹⁶; the relay further waits for several in a row. Every
//! function here is pure, bounds-checked and never panics (fuzzed by `fuzz/fuzz_targets/probe.rs`).

/// The first eight bytes of a probe's payload.
pub const MAGIC: [u8; 8] = *b"RTPRPROB";
/// Length of the header.
pub const LEN: usize = 48;
/// Consecutive valid probe headers from Asterisk after which the relay takes a channel as
/// carrying probes and starts writing into them.
pub const RECOGNISE_AFTER: u32 = 3;

const CALL: usize = 8;
const SEQ: usize = 12;
const SENT: usize = 16;
const CHECK: usize = 24;
const ARRIVAL: usize = 28;
const RETURN: usize = 36;
const RELAY_CHECK: usize = 44;
/// The bytes the relay writes (its two times and their check); nothing outside them changes.
pub const RELAY_FIELDS: std::ops::Range<usize> = ARRIVAL..LEN;

/// What the sender writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    /// The call it belongs to (the sender's numbering).
    pub call: u32,
    /// Its place in the call's probes, from 0.
    pub seq: u32,
    /// The sender's `CLOCK_REALTIME` just before the send, ns since the Unix epoch.
    pub sent_ns: u64,
}

/// What the relay writes: two kernel receive stamps of its host, ns `CLOCK_REALTIME`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayTimes {
    /// The probe's arrival from Asterisk.
    pub arrival_ns: u64,
    /// Its echo's arrival back at the relay.
    pub returned_ns: u64,
}

/// Why a payload is not a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// Shorter than [`LEN`].
    #[error("payload shorter than a probe header")]
    Short,
    /// It does not start with [`MAGIC`].
    #[error("no probe magic")]
    NoMagic,
    /// The magic is there, the check does not hold.
    #[error("probe check does not hold")]
    BadCheck,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

fn put(b: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(s) = b.get_mut(at..at + bytes.len()) {
        s.copy_from_slice(bytes);
    }
}

/// Whether `payload` starts with the magic: the cheap test before [`parse`].
#[must_use]
pub fn has_magic(payload: &[u8]) -> bool {
    payload.get(..MAGIC.len()) == Some(&MAGIC[..])
}

/// Writes a new probe header at the start of `payload`, the relay's fields zeroed.
///
/// # Errors
/// [`ProbeError::Short`]: `payload` is shorter than [`LEN`] (nothing is written).
pub fn write(payload: &mut [u8], probe: Probe) -> Result<(), ProbeError> {
    let Some(h) = payload.get_mut(..LEN) else {
        return Err(ProbeError::Short);
    };
    put(h, 0, &MAGIC);
    put(h, CALL, &probe.call.to_be_bytes());
    put(h, SEQ, &probe.seq.to_be_bytes());
    put(h, SENT, &probe.sent_ns.to_be_bytes());
    let check = crc32fast::hash(h.get(..CHECK).unwrap_or_default());
    put(h, CHECK, &check.to_be_bytes());
    put(h, ARRIVAL, &[0; LEN - ARRIVAL]);
    Ok(())
}

/// The sender's fields of the probe header at the start of `payload`.
///
/// # Errors
/// It is too short, has no magic, or its check does not hold.
pub fn parse(payload: &[u8]) -> Result<Probe, ProbeError> {
    let h = payload.get(..LEN).ok_or(ProbeError::Short)?;
    if !has_magic(h) {
        return Err(ProbeError::NoMagic);
    }
    if crc32fast::hash(h.get(..CHECK).unwrap_or_default()) != u32_at(h, CHECK) {
        return Err(ProbeError::BadCheck);
    }
    Ok(Probe {
        call: u32_at(h, CALL),
        seq: u32_at(h, SEQ),
        sent_ns: u64_at(h, SENT),
    })
}

/// Writes the relay's two times into the probe header at the start of `payload`, and its check;
/// nothing else changes. Returns the probe's fields.
///
/// # Errors
/// `payload` holds no valid probe header: it is left untouched.
pub fn write_relay_times(payload: &mut [u8], times: RelayTimes) -> Result<Probe, ProbeError> {
    let probe = parse(payload)?;
    let Some(h) = payload.get_mut(..LEN) else {
        return Err(ProbeError::Short);
    };
    put(h, ARRIVAL, &times.arrival_ns.to_be_bytes());
    put(h, RETURN, &times.returned_ns.to_be_bytes());
    let check = crc32fast::hash(h.get(..RELAY_CHECK).unwrap_or_default());
    put(h, RELAY_CHECK, &check.to_be_bytes());
    Ok(probe)
}

/// The relay's times in the probe header at the start of `payload`: `None` when the header is
/// not valid, the relay has not written them (both zero), or their check does not hold.
#[must_use]
pub fn relay_times(payload: &[u8]) -> Option<RelayTimes> {
    parse(payload).ok()?;
    let h = payload.get(..LEN)?;
    let times = RelayTimes {
        arrival_ns: u64_at(h, ARRIVAL),
        returned_ns: u64_at(h, RETURN),
    };
    if times.arrival_ns == 0 && times.returned_ns == 0 {
        return None;
    }
    (crc32fast::hash(h.get(..RELAY_CHECK)?) == u32_at(h, RELAY_CHECK)).then_some(times)
}

/// The probe header: written and parsed back, its layout, the rest of the payload untouched; the
/// relay's times written only into a probe (not into audio, not without a valid check, not into a
/// short payload) and never over the sender's fields; any flipped bit caught.
#[cfg(test)]
mod tests {
    use super::*;

    const P: Probe = Probe {
        call: 7,
        seq: 0x0102_0304,
        sent_ns: 1_764_000_000_123_456_789,
    };

    #[test]
    fn round_trip_and_layout() {
        let mut b = [0xffu8; 160];
        write(&mut b, P).unwrap();
        assert_eq!(&b[..8], b"RTPRPROB");
        assert_eq!(&b[8..12], &[0, 0, 0, 7]);
        assert_eq!(&b[12..16], &[1, 2, 3, 4]);
        assert_eq!(parse(&b), Ok(P));
        assert!(b[LEN..].iter().all(|&x| x == 0xff), "the rest untouched");
        assert_eq!(relay_times(&b), None, "not written yet");
        let t = RelayTimes {
            arrival_ns: 11,
            returned_ns: 22,
        };
        let before = b;
        assert_eq!(write_relay_times(&mut b, t), Ok(P));
        assert_eq!(relay_times(&b), Some(t));
        assert_eq!(parse(&b), Ok(P), "the sender's fields still hold");
        let changed: Vec<usize> = (0..b.len()).filter(|&i| b[i] != before[i]).collect();
        assert!(
            changed.iter().all(|&i| (ARRIVAL..LEN).contains(&i)),
            "{changed:?}"
        );
    }

    #[test]
    fn no_header_no_write() {
        // Audio that is no probe: never written into.
        let mut b = [0x55u8; 160];
        let before = b;
        let t = RelayTimes {
            arrival_ns: 1,
            returned_ns: 2,
        };
        assert_eq!(write_relay_times(&mut b, t), Err(ProbeError::NoMagic));
        assert_eq!(b, before);
        // The magic without a valid check.
        b[..8].copy_from_slice(&MAGIC);
        let before = b;
        assert_eq!(write_relay_times(&mut b, t), Err(ProbeError::BadCheck));
        assert_eq!(b, before);
        // Too short.
        let mut short = [0u8; LEN - 1];
        assert_eq!(write(&mut short, P), Err(ProbeError::Short));
        assert_eq!(parse(&short), Err(ProbeError::Short));
        assert_eq!(write_relay_times(&mut short, t), Err(ProbeError::Short));
    }

    #[test]
    fn any_flipped_bit_is_caught() {
        let mut b = [0u8; LEN];
        write(&mut b, P).unwrap();
        write_relay_times(
            &mut b,
            RelayTimes {
                arrival_ns: 5,
                returned_ns: 9,
            },
        )
        .unwrap();
        for i in 0..LEN * 8 {
            let mut c = b;
            c[i / 8] ^= 1 << (i % 8);
            let sender = i / 8 < ARRIVAL;
            assert!(
                !(parse(&c).is_ok() && relay_times(&c).is_some()),
                "bit {i} flipped went unnoticed"
            );
            if !sender {
                assert_eq!(parse(&c), Ok(P), "bit {i}: the sender's part is intact");
            }
        }
    }
}
