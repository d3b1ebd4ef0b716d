//! The probe header's parse and writes must accept or refuse any bytes without panicking; the
//! relay's write changes nothing outside its own fields and never touches a payload without a
//! valid header; what is written reads back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::probe::{self, RelayTimes, RELAY_FIELDS, LEN};

fuzz_target!(|data: &[u8]| {
    let (times, payload) = data.split_at(data.len().min(16));
    let mut t = [0u8; 16];
    t[..times.len()].copy_from_slice(times);
    let times = RelayTimes {
        arrival_ns: u64::from_be_bytes(t[..8].try_into().unwrap_or_default()),
        returned_ns: u64::from_be_bytes(t[8..].try_into().unwrap_or_default()),
    };
    let parsed = probe::parse(payload);
    let _ = probe::relay_times(payload);
    let mut out = payload.to_vec();
    let written = probe::write_relay_times(&mut out, times);
    assert_eq!(written, parsed);
    match written {
        Err(_) => assert_eq!(out, payload, "no valid header: untouched"),
        Ok(p) => {
            for (i, (a, b)) in out.iter().zip(payload).enumerate() {
                assert!(a == b || RELAY_FIELDS.contains(&i), "byte {i} changed");
            }
            assert_eq!(out.len(), payload.len());
            assert_eq!(probe::parse(&out), Ok(p));
            if times.arrival_ns != 0 || times.returned_ns != 0 {
                assert_eq!(probe::relay_times(&out), Some(times));
            }
        }
    }
    // A fresh header reads back.
    if let Ok(p) = parsed {
        let mut fresh = vec![0u8; payload.len().max(LEN)];
        assert!(probe::write(&mut fresh, p).is_ok());
        assert_eq!(probe::parse(&fresh), Ok(p));
    }
});
