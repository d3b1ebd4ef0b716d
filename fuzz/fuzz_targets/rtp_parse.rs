//! The RTP/RTCP parser must accept or refuse any bytes without panicking, and an accepted
//! packet's parts must account for every byte of the datagram.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::rtp::{parse, Packet};

fuzz_target!(|data: &[u8]| {
    if let Ok(Packet::Rtp(p)) = parse(data) {
        let ext = p.extension.map_or(0, |e| 4 + e.data.len());
        assert_eq!(
            12 + 4 * p.csrc_count() + ext + p.payload.len() + usize::from(p.padding),
            data.len()
        );
    }
});
