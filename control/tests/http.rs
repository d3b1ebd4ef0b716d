//! Every binary's HTTP endpoint (relay, control, echo) as a hostile client meets it: 100
//! connections trickling a request one byte a second do not hold up a Prometheus scrape, are all
//! cut off by the read timeout, and anything but GET (a POST) is refused.

use std::time::{Duration, Instant};

use testkit::{http_get, start, wait_for, Proc, SlowClients};

/// The three binaries, each with its metrics endpoint on a free port: (name, process, address).
fn endpoints(tag: &str) -> Vec<(&'static str, Proc, String)> {
    let ctl = std::env::temp_dir().join(format!("http-test-{}-{tag}.sock", std::process::id()));
    let _ = std::fs::remove_file(&ctl);
    let (relay, url) = start(
        "relay",
        &[
            "--backend",
            "tokio",
            "--ctl",
            ctl.to_str().unwrap(),
            "--metrics",
            "127.0.0.1:0",
        ],
        "relay ready",
        "metrics",
    );
    let relay_addr = url
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_owned();
    // Control serves its endpoint whether or not Asterisk (here: nobody) answers.
    let (control, control_addr) = start(
        "control",
        &[
            "--ari-url",
            "http://127.0.0.1:9/ari",
            "--ari-pass",
            "x",
            "--relay-socket",
            ctl.to_str().unwrap(),
            "--metrics",
            "127.0.0.1:0",
        ],
        "control ready",
        "metrics",
    );
    let mut all = vec![
        ("relay", relay, relay_addr),
        ("control", control, control_addr),
    ];
    if testkit::uring_available() {
        let (echo, _, log) = testkit::start_logged(
            "echo",
            &["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"],
            "echo ready",
            "listen",
        );
        let metrics = log
            .lock()
            .unwrap()
            .iter()
            .find_map(|l| l.split("metrics=http://").nth(1).map(str::to_owned))
            .expect("echo logs its metrics address")
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        all.push(("echo", echo, metrics));
    }
    all
}

#[test]
fn slow_clients_neither_hold_up_a_scrape_nor_stay_connected() {
    let endpoints = endpoints("slow");
    let slow: Vec<SlowClients> = endpoints
        .iter()
        .map(|(_, _, addr)| SlowClients::open(addr, 100))
        .collect();
    // While all 100 hang on to each endpoint, a scrape answers at once.
    for _ in 0..3 {
        for (name, _, addr) in &endpoints {
            let t = Instant::now();
            let (status, body) = http_get(addr, "/metrics").unwrap();
            let took = t.elapsed();
            assert_eq!(status, 200, "{name}");
            assert!(body.contains("# TYPE"), "{name}: Prometheus text");
            assert!(
                took < Duration::from_secs(1),
                "{name}: a scrape took {took:?} beside 100 slow clients"
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    for ((name, _, _), s) in endpoints.iter().zip(&slow) {
        assert_eq!(
            s.closed(),
            0,
            "{name}: the slow clients are still connected"
        );
    }
    // The read timeout (5 s for a request's head) cuts every one of them off.
    for ((name, _, _), s) in endpoints.iter().zip(&slow) {
        wait_for(
            &format!("{name} to close 100 slow connections"),
            Duration::from_secs(15),
            || (s.closed() == 100).then_some(()),
        );
    }
}

#[test]
fn only_get_is_served() {
    use std::io::{Read, Write};
    for (name, _proc, addr) in &endpoints("get") {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "POST /metrics HTTP/1.0\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.0 405"), "{name}: {reply}");
        let (status, body) = http_get(addr, "/nowhere").unwrap();
        assert_eq!(status, 404, "{name}");
        assert!(body.contains("/metrics"), "{name}: names the paths: {body}");
        assert_eq!(http_get(addr, "/metrics").unwrap().0, 200, "{name}");
    }
}
