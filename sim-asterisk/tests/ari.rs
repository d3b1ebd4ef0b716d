//! `loadgen sim-asterisk` on its own, against what Asterisk 22 answers: authentication (basic and
//! api_key, 401 otherwise), 404 "Channel not found", 422 "Channel not in Stasis application" for
//! an externalMedia channel that has not entered Stasis yet, 400 for an unknown channel in
//! addChannel, and the externalMedia reply's channel variables.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

/// One HTTP/1.0 request; (status, body).
fn request(addr: &str, method: &str, path: &str, auth: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = auth.map_or(String::new(), |a| format!("Authorization: Basic {a}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let status = reply.split(' ').nth(1).unwrap().parse().unwrap();
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn the_simulator_answers_like_asterisk() {
    let (_sim, addr) = testkit::start(
        "loadgen",
        &[
            "sim-asterisk",
            "--listen",
            "127.0.0.1:0",
            "--ari-user",
            "asterisk",
            "--ari-pass",
            "secret",
            "--calls",
            "0",
            "--serve-for",
            "20s",
            "--stasis-delay",
            "400ms",
        ],
        "sim-asterisk ready",
        "listen",
    );
    let basic = "YXN0ZXJpc2s6c2VjcmV0"; // asterisk:secret
    let key = "api_key=asterisk:secret";

    assert_eq!(request(&addr, "GET", "/ari/channels", None).0, 401);
    assert_eq!(
        request(&addr, "GET", "/ari/channels", Some("YXN0ZXJpc2s6d3Jvbmc=")).0,
        401
    );
    assert_eq!(request(&addr, "GET", "/ari/channels", Some(basic)).0, 200);
    assert_eq!(
        request(&addr, "GET", &format!("/ari/channels?{key}"), None).0,
        200
    );

    let (status, body) = request(&addr, "POST", "/ari/channels/nope/answer", Some(basic));
    assert_eq!(status, 404);
    assert!(body.contains("Channel not found"), "{body}");

    let (status, body) = request(
        &addr,
        "POST",
        &format!("/ari/channels?endpoint=Local/s@load&app=rtp-relay&channelId=caller-1&{key}"),
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        request(&addr, "POST", "/ari/channels/caller-1/answer", Some(basic)).0,
        204
    );
    // A Local channel originated without `formats` is slin192 natively (Asterisk 22); with
    // `formats` it is what was asked for.
    let native = |id: &str| {
        request(
            &addr,
            "GET",
            &format!("/ari/channels/{id}/variable?variable=CHANNEL(audionativeformat)"),
            Some(basic),
        )
    };
    let (status, body) = native("caller-1");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["value"],
        "(slin192)"
    );
    let (status, body) = request(
        &addr,
        "POST",
        &format!("/ari/channels?endpoint=Local/s@load&app=rtp-relay&channelId=caller-2&formats=ulaw,alaw&{key}"),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let (_, body) = native("caller-2");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["value"],
        "(ulaw|alaw)"
    );
    let (status, body) = native("nope");
    assert_eq!(
        (status, body.contains("Channel not found")),
        (404, true),
        "{body}"
    );
    let (status, body) = request(
        &addr,
        "GET",
        "/ari/channels/caller-1/variable?variable=NO_SUCH_VARIABLE",
        Some(basic),
    );
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("variable was not found"), "{body}");
    assert_eq!(
        request(&addr, "GET", "/ari/channels/caller-1/variable", Some(basic)).0,
        400
    );

    let (status, body) = request(
        &addr,
        "POST",
        "/ari/channels/externalMedia?app=rtp-relay&channelId=em-1&external_host=127.0.0.1:9&format=ulaw&encapsulation=rtp&transport=udp&connection_type=client&direction=both",
        Some(basic),
    );
    assert_eq!(status, 200, "{body}");
    let em: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(em["channelvars"]["UNICASTRTP_LOCAL_ADDRESS"], "127.0.0.1");
    assert!(
        em["channelvars"]["UNICASTRTP_LOCAL_PORT"]
            .as_str()
            .unwrap()
            .parse::<u16>()
            .unwrap()
            > 0
    );

    assert_eq!(
        request(
            &addr,
            "POST",
            "/ari/bridges?type=mixing&bridgeId=b-1",
            Some(basic)
        )
        .0,
        200
    );
    let (status, body) = request(
        &addr,
        "POST",
        "/ari/bridges/b-1/addChannel?channel=caller-1,nope",
        Some(basic),
    );
    assert_eq!(status, 400, "{body}");
    // The externalMedia channel enters Stasis 400 ms after the request: until then, 422.
    let (status, body) = request(
        &addr,
        "POST",
        "/ari/bridges/b-1/addChannel?channel=caller-1,em-1",
        Some(basic),
    );
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("Channel not in Stasis application"), "{body}");
    testkit::wait_for(
        "the externalMedia channel to enter Stasis",
        Duration::from_secs(5),
        || {
            let (s, _) = request(
                &addr,
                "POST",
                "/ari/bridges/b-1/addChannel?channel=caller-1,em-1",
                Some(basic),
            );
            (s == 204).then_some(())
        },
    );
    let (_, bridges) = request(&addr, "GET", "/ari/bridges", Some(basic));
    let bridges: Value = serde_json::from_str(&bridges).unwrap();
    assert_eq!(
        bridges[0]["channels"].as_array().unwrap().len(),
        2,
        "{bridges}"
    );

    assert_eq!(
        request(&addr, "DELETE", "/ari/bridges/b-1", Some(basic)).0,
        204
    );
    assert_eq!(
        request(&addr, "DELETE", "/ari/channels/em-1", Some(basic)).0,
        204
    );
    assert_eq!(
        request(&addr, "DELETE", "/ari/channels/em-1", Some(basic)).0,
        404
    );
}
