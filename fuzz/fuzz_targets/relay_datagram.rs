//! The relay state machine must survive any datagram from any of a channel's peers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::control::AddChannel;
use relay_proto::{ChannelId, Command, CommandOutcome, Format, MonoTime, Relay, RelayConfig};

fuzz_target!(|data: &[u8]| {
    // One channel slot keeps each run cheap; the packet path is the same for any size.
    let config = RelayConfig { max_channels: 1, ..RelayConfig::default() };
    let mut relay = Relay::new(config).expect("valid config");
    let asterisk = "127.0.0.2:5000".parse().expect("address");
    let echo = relay.config().default_echo;
    let add = AddChannel {
        channel: ChannelId::try_from("fuzz").expect("id"),
        port: 0,
        asterisk: Some(asterisk),
        echo: None,
        format: Format::Ulaw,
    };
    let CommandOutcome::Open(pending) = relay.handle_command(MonoTime::ZERO, Command::Add(add)) else {
        return;
    };
    let socket = pending.socket();
    let _ = relay.complete_open(MonoTime::ZERO, pending, Ok(20_000));
    // Split the input into datagrams at 0xfe bytes and alternate their source.
    for (i, d) in data.split(|&b| b == 0xfe).enumerate() {
        let from = if i % 2 == 0 { asterisk } else { echo };
        let now = MonoTime::from_nanos(i as u64 * 20_000_000);
        let _ = relay.handle_datagram(now, socket, from, d);
        relay.handle_timeout(now);
    }
    let _ = relay.global_stats();
});
