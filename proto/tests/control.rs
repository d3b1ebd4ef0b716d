//! The control protocol: every request round-trips, every bad line gets the right error code,
//! overlong lines are refused without being buffered, and the handshake comes first.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)] // test values come from small, known ranges

use relay_proto::control::{
    decode_request, AddChannel, ChannelInfo, Frame, Hello, LineDecoder, RemoveChannel, SessionItem,
    StatsQuery, UpdateChannel, PROTOCOL_VERSION,
};
use relay_proto::stats::PerDirection;
use relay_proto::{
    ChannelId, Command, ControlSession, ErrorCode, ErrorReply, Format, Reply, Request, Response,
};

fn id(s: &str) -> ChannelId {
    ChannelId::try_from(s).unwrap()
}

fn code(line: &str) -> ErrorCode {
    decode_request(line.as_bytes()).expect_err(line).error.code
}

#[test]
fn every_command_round_trips() {
    let commands = [
        Command::Hello(Hello {
            version: 1,
            client: Some("control 0.1".into()),
        }),
        Command::Add(AddChannel {
            channel: id("1700000000.42"),
            port: 21_000,
            asterisk: Some("10.0.0.5:18000".parse().unwrap()),
            echo: Some("[::1]:4000".parse().unwrap()),
            format: Format::Alaw,
        }),
        Command::Add(AddChannel {
            channel: id("b"),
            port: 0,
            asterisk: None,
            echo: None,
            format: Format::Ulaw,
        }),
        Command::Update(UpdateChannel {
            channel: id("b"),
            asterisk: "127.0.0.1:9".parse().unwrap(),
        }),
        Command::Remove(RemoveChannel { channel: id("b") }),
        Command::List,
        Command::Stats(StatsQuery { channel: None }),
        Command::Stats(StatsQuery {
            channel: Some(id("b")),
        }),
        Command::Drain,
        Command::Interim,
    ];
    for (i, command) in commands.into_iter().enumerate() {
        let req = Request {
            id: (i % 2 == 0).then_some(i as u64),
            command,
        };
        let line = req.encode();
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        assert_eq!(
            decode_request(line.trim_end().as_bytes()),
            Ok(req),
            "{line}"
        );
    }
}

#[test]
fn wire_format_is_as_documented() {
    let req = decode_request(
        br#"{"id":7,"cmd":"add","channel":"c1","port":21000,"asterisk":"127.0.0.1:5000"}"#,
    )
    .unwrap();
    assert_eq!(req.id, Some(7));
    let Command::Add(a) = req.command else {
        panic!("add")
    };
    assert_eq!(
        (a.channel.as_str(), a.port, a.format, a.echo),
        ("c1", 21_000, Format::Ulaw, None)
    );

    let ok = Reply {
        id: Some(7),
        outcome: Ok(Response::Added {
            channel: id("c1"),
            port: 21_000,
            socket: 3,
            shard: 1,
        }),
    };
    assert_eq!(
        ok.encode(),
        "{\"id\":7,\"ok\":true,\"result\":{\"type\":\"added\",\"channel\":\"c1\",\"port\":21000,\"socket\":3,\"shard\":1}}\n"
    );
    // A relay that predates shards sends no `shard`: its one shard is 0.
    assert!(matches!(
        Reply::decode(
            br#"{"id":1,"ok":true,"result":{"type":"added","channel":"c1","port":2,"socket":0}}"#
        )
        .unwrap()
        .outcome,
        Ok(Response::Added { shard: 0, .. })
    ));
    let err = Reply {
        id: None,
        outcome: Err(ErrorReply::new(ErrorCode::PortInUse, "busy")),
    };
    assert_eq!(
        err.encode(),
        "{\"ok\":false,\"error\":{\"code\":\"port_in_use\",\"message\":\"busy\"}}\n"
    );
    for r in [ok, err] {
        assert_eq!(Reply::decode(r.encode().as_bytes()).unwrap(), r);
    }
    let list = Reply {
        id: Some(1),
        outcome: Ok(Response::Channels {
            channels: vec![ChannelInfo {
                channel: id("x"),
                socket: 0,
                shard: 2,
                port: 1,
                asterisk: None,
                echo: "127.0.0.1:4000".parse().unwrap(),
                format: Format::Opus,
                traffic: PerDirection::default(),
            }],
        }),
    };
    assert_eq!(Reply::decode(list.encode().as_bytes()).unwrap(), list);
    assert!(
        Reply::decode(br#"{"ok":true}"#).is_err(),
        "ok without result"
    );
}

#[test]
fn bad_lines_get_precise_error_codes() {
    assert_eq!(code("{"), ErrorCode::BadJson);
    assert_eq!(code("\u{0}\u{ff}"), ErrorCode::BadJson);
    assert_eq!(code("[1,2]"), ErrorCode::BadRequest);
    assert_eq!(code(r#"{"id":1}"#), ErrorCode::BadRequest);
    assert_eq!(code(r#"{"cmd":7}"#), ErrorCode::BadRequest);
    assert_eq!(code(r#"{"id":-1,"cmd":"list"}"#), ErrorCode::BadRequest);
    assert_eq!(code(r#"{"cmd":"reboot"}"#), ErrorCode::UnknownCommand);
    assert_eq!(
        code(r#"{"cmd":"list","verbose":true}"#),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(r#"{"cmd":"add","channel":"a","port":70000}"#),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(r#"{"cmd":"add","channel":"a"}"#),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(r#"{"cmd":"add","channel":"a b","port":1}"#),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(r#"{"cmd":"add","channel":"","port":1}"#),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(r#"{"cmd":"add","channel":"a","port":1,"format":"speex"}"#),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(r#"{"cmd":"add","channel":"a","port":1,"asterisk":"nowhere"}"#),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(r#"{"cmd":"add","channel":"a","port":1,"colour":"red"}"#),
        ErrorCode::BadRequest
    );
    let long = format!(r#"{{"cmd":"remove","channel":"{}"}}"#, "x".repeat(129));
    assert_eq!(code(&long), ErrorCode::BadRequest);

    // The id survives into the error when it could be read.
    let e = decode_request(br#"{"id":9,"cmd":"nope"}"#).unwrap_err();
    assert_eq!(e.id, Some(9));
    let e = decode_request(br#"{"id":9,"cmd":"add","colour":1}"#).unwrap_err();
    assert_eq!(e.id, Some(9));
    assert!(
        e.error.message.contains("colour"),
        "names the field: {}",
        e.error.message
    );
}

#[test]
fn line_decoder_splits_bounds_and_recovers() {
    let mut d = LineDecoder::new(8);
    let mut out = Vec::new();
    d.push(b"abc\r\n\n12345678\n1234", &mut out);
    assert_eq!(
        out,
        [
            Frame::Line(b"abc".to_vec()),
            Frame::Line(b"12345678".to_vec())
        ]
    );
    out.clear();
    d.push(b"5", &mut out); // five bytes so far: fine
    d.push(b"6789", &mut out); // nine: may still be eight and a CR
    assert_eq!(out, []);
    d.push(b"0", &mut out); // ten, no newline yet: certainly over, reported now
    assert_eq!(out, [Frame::TooLong]);
    assert_eq!(d.buffered(), 0, "an overlong line is not buffered");
    out.clear();
    d.push(&[b'x'; 10_000], &mut out);
    d.push(b"yyy\nok\n", &mut out);
    assert_eq!(
        out,
        [Frame::Line(b"ok".to_vec())],
        "reported once, then skipped to the newline"
    );
    out.clear();
    d.push(b"12345678\r\n", &mut out);
    assert_eq!(
        out,
        [Frame::Line(b"12345678".to_vec())],
        "a CR does not count against the limit"
    );
}

#[test]
fn session_requires_hello_first_and_checks_the_version() {
    let mut s = ControlSession::new(1024);
    let mut out = Vec::new();
    s.push(b"{\"id\":1,\"cmd\":\"list\"}\n", &mut out);
    s.push(
        format!(
            "{{\"id\":2,\"cmd\":\"hello\",\"version\":{}}}\n",
            PROTOCOL_VERSION + 1
        )
        .as_bytes(),
        &mut out,
    );
    s.push(b"garbage\n", &mut out);
    s.push(
        format!("{{\"id\":3,\"cmd\":\"hello\",\"version\":{PROTOCOL_VERSION}}}\n").as_bytes(),
        &mut out,
    );
    s.push(b"{\"id\":4,\"cmd\":\"li", &mut out);
    s.push(b"st\"}\n", &mut out);
    s.push(&[b'{'; 2000], &mut out);
    s.push(b"\n{\"id\":5,\"cmd\":\"drain\"}\n", &mut out);
    let codes: Vec<_> = out
        .iter()
        .map(|i| match i {
            SessionItem::Reply(Reply {
                id,
                outcome: Err(e),
            }) => format!("{id:?} {}", e.code),
            SessionItem::Reply(Reply { id, outcome: Ok(_) }) => format!("{id:?} ok"),
            SessionItem::Execute(r) => format!("{:?} run {}", r.id, r.command.name()),
        })
        .collect();
    assert_eq!(
        codes,
        [
            "Some(1) handshake_required",
            "Some(2) version_mismatch",
            "None bad_json",
            "Some(3) ok",
            "Some(4) run list",
            "None line_too_long",
            "Some(5) run drain",
        ]
    );
    assert!(s.is_greeted());
}

#[test]
fn the_hello_reply_carries_the_relays_identity_and_reads_without_one() {
    use relay_proto::control::{hello_response, RelayIdentity};
    let identity = RelayIdentity {
        relay_id: "relay-a".into(),
        advertise: "10.0.0.21".parse().unwrap(),
        capacity: 4096,
    };
    let r = Reply {
        id: Some(1),
        outcome: Ok(hello_response(Some(&identity))),
    };
    let line = r.encode();
    assert!(
        line.contains(r#""relay_id":"relay-a","advertise":"10.0.0.21","capacity":4096"#),
        "{line}"
    );
    assert_eq!(Reply::decode(line.as_bytes()).unwrap(), r);
    // A reply without them (a core's own, or a relay that predates them) reads as no identity.
    let bare =
        br#"{"id":1,"ok":true,"result":{"type":"hello","version":1,"server":"rtp-relay 0.1.0"}}"#;
    assert!(matches!(
        Reply::decode(bare).unwrap().outcome,
        Ok(Response::Hello {
            identity: None,
            version: 1,
            ..
        })
    ));
    // A session with an identity answers hello with it.
    let mut s = ControlSession::new(1024).with_identity(identity.clone());
    let mut out = Vec::new();
    s.push(
        format!("{{\"cmd\":\"hello\",\"version\":{PROTOCOL_VERSION}}}\n").as_bytes(),
        &mut out,
    );
    let [SessionItem::Reply(Reply {
        outcome: Ok(Response::Hello {
            identity: Some(i), ..
        }),
        ..
    })] = out.as_slice()
    else {
        panic!("{out:?}")
    };
    assert_eq!(i, &identity);
}
