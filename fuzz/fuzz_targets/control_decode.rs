//! The control decoder and session must turn any byte stream into requests or error replies,
//! never a panic, and a decoded request must survive re-encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::control::{decode_request, SessionItem};
use relay_proto::ControlSession;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = decode_request(data) {
        let again = decode_request(req.encode().trim_end().as_bytes()).expect("re-encoded request decodes");
        assert_eq!(again, req);
    }
    let mut session = ControlSession::new(256);
    let mut out = Vec::new();
    // Feed in two pieces so partial lines are exercised too.
    let cut = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    session.push(&data[..cut], &mut out);
    session.push(&data[cut..], &mut out);
    for item in out {
        if let SessionItem::Reply(r) = item {
            assert!(r.encode().ends_with('\n'));
        }
    }
});
