//! `sim-asterisk`'s ARI on its own, against what Asterisk 22 answers: 401 without credentials
//! or with wrong ones, basic and `api_key` accepted; 404 "Channel not found" (answer, variable);
//! a Local channel's native format slin192 when originated without `formats`, what was asked
//! for with it; 404 "variable was not found" and 400 without `variable`; the externalMedia
//! reply's `UNICASTRTP_LOCAL_ADDRESS` and `UNICASTRTP_LOCAL_PORT` channel variables; 400 for an
//! unknown channel in addChannel, 422 "Channel not in Stasis application" until the
//! externalMedia channel's StasisStart (`--stasis-delay`), then 204 and both in the bridge; and
//! 404 for a channel hung up twice.

use std::time::Duration;

use serde_json::Value;

mod common;
use common::{request, Sim, BASIC, PASS, USER};

#[test]
fn the_simulator_answers_like_asterisk() {
    let sim = Sim::start("ari", &["--serve-for", "20s", "--stasis-delay", "400ms"]);
    let addr = sim.addr.clone();
    let basic = BASIC;
    let key = format!("api_key={USER}:{PASS}");

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
