//! `loadgen report` looked at in a real browser: headless Chromium (Debian's `chromium`, which
//! scripts/test.sh installs) loads the HTML from a file, its DOM must hold every chart and table,
//! and its screenshot must not be blank. Skips loudly where Chromium is not installed. The
//! command line's `--run` (given twice, one of each kind; a file of neither kind refused) is
//! tested without a browser.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// A call record like control writes, with `mos` and `p50` (µs) varied.
fn record(i: usize, mos: f64, p50: f64) -> String {
    serde_json::json!({
        "caller_id": format!("c{i}"), "caller_name": format!("PJSIP/load-{i:08x}"),
        "external_media_id": format!("rtprelay-em-c{i}"), "relay_port": 21000 + i, "format": "ulaw",
        "started": "2026-12-01T10:00:00.000000Z", "bridged": "2026-12-01T10:00:00.004000Z",
        "ended": format!("2026-12-01T10:00:{:02}.000000Z", 30 + i % 25), "ended_by": "caller",
        "hangup_cause": 16, "hangup_cause_txt": "Normal Clearing", "failure_stage": null, "failure": null,
        "setup_ms": 4.0,
        "relay": {"packets_to_echo": 1500, "packets_to_asterisk": 1500 - i % 4, "bytes_to_echo": 258_000,
                  "bytes_to_asterisk": 258_000, "lost_to_echo": 0, "lost_to_asterisk": i % 4, "duplicates": 0,
                  "reordered": 0, "late": 0, "echo_timeouts": i % 4, "rtt_count": 1500, "rtt_p50_us": p50,
                  "rtt_p95_us": p50 * 1.5, "rtt_p99_us": p50 * 3.0, "rtt_max_us": p50 * 6.0, "rtt_mean_us": p50,
                  "jitter_us": 12.0, "r_factor": 92.0 - i as f64, "mos": mos}
    })
    .to_string()
}

/// `loadgen ari --callers rtp --json` of a 3 s run (field names as `loadgen ari` writes them).
fn ari_run() -> String {
    let leg = |count: u64, p50: f64| {
        let cdf: Vec<[f64; 2]> = (0..=20)
            .map(|i| {
                let q = f64::from(i) / 20.0;
                [p50 * (0.5 + 3.5 * q * q), q]
            })
            .collect();
        serde_json::json!({"count": count, "mean_us": p50 * 1.1, "p50_us": p50,
                           "p95_us": p50 * 1.5, "p99_us": p50 * 2.0, "p999_us": p50 * 3.0,
                           "max_us": p50 * 4.0, "cdf": cdf})
    };
    let windows: Vec<serde_json::Value> = (0..3)
        .map(|t| {
            let f = 1.0 + f64::from(t) * 0.05;
            serde_json::json!({"t_s": t, "sent": 1000, "returned": 995 + t, "p50_us": 1293.0 * f,
                               "p99_us": 2477.0 * f, "max_us": 3100.0 * f,
                               "asterisk_in_p50_us": 534.0 * f, "relay_p50_us": 332.0 * f,
                               "asterisk_out_p50_us": 509.0 * f})
        })
        .collect();
    serde_json::json!({
        "callers": "rtp", "calls": 20, "hold_s": 3.0, "originated": 20, "failed": 0,
        "first_error": null, "hung_up": 20, "played": 20, "leftovers": [],
        "through_asterisk": {"total": leg(2990, 1293.0), "asterisk_in": leg(2950, 534.0),
                             "relay": leg(2950, 332.0), "asterisk_out": leg(2950, 509.0),
                             "unsplit": 40, "negative_legs": 0, "untimed": 0},
        "lost": {"sent": 3000, "returned": 2990, "total": 10, "before_relay": 4,
                 "after_relay": 6, "calls_unsplit": 0},
        "timeseries": windows, "clocks": "kernel stamps of one CLOCK_REALTIME",
        "relay": null, "control": null
    })
    .to_string()
}

/// sim-asterisk's `--json` report, the keys `loadgen report` reads.
fn sim_run() -> String {
    serde_json::json!({"calls": 20, "answered": 20, "bridged": 20, "transcoding_calls": 0,
                       "sent": 3000, "received": 2990, "lost": 10, "loss_ratio": 0.0033,
                       "rtt": {"p50_ns": 1_293_000, "p99_ns": 2_477_000}, "per_call": []})
    .to_string()
}

/// `loadgen report` with `args`.
fn report(args: &[&std::ffi::OsStr]) -> std::process::Output {
    testkit::output(
        Command::new(env!("CARGO_BIN_EXE_loadgen"))
            .arg("report")
            .args(args),
        Duration::from_secs(60),
        None,
    )
    .unwrap()
}

#[test]
fn run_files_on_the_command_line_one_of_each_kind_and_nothing_else() {
    let dir = std::env::temp_dir().join(format!("loadgen-report-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let calls = dir.join("calls.jsonl");
    std::fs::write(&calls, record(0, 4.4, 50.0) + "\n").unwrap();
    let (ari, sim, bad, html) = (
        dir.join("ari.json"),
        dir.join("sim.json"),
        dir.join("bad.json"),
        dir.join("report.html"),
    );
    std::fs::write(&ari, ari_run()).unwrap();
    std::fs::write(&sim, sim_run()).unwrap();
    std::fs::write(&bad, "{\"hello\": \"world\"}").unwrap();
    let o = |s: &'static str| std::ffi::OsStr::new(s);
    let out = report(&[
        o("--calls"),
        calls.as_os_str(),
        o("--run"),
        ari.as_os_str(),
        o("--run"),
        sim.as_os_str(),
        o("--out"),
        html.as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("id=\"split-cdf\"") && page.contains("at Asterisk: sent"));
    std::fs::remove_file(&html).unwrap();
    for runs in [[&bad, &ari], [&sim, &sim]] {
        let out = report(&[
            o("--calls"),
            calls.as_os_str(),
            o("--run"),
            runs[0].as_os_str(),
            o("--run"),
            runs[1].as_os_str(),
            o("--out"),
            html.as_os_str(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "refused: {err}");
        assert!(
            err.contains("neither sim-asterisk's --json report")
                || err.contains("are both sim-asterisk's report"),
            "{err}"
        );
        assert!(!html.exists(), "nothing written");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

/// Runs headless Chromium on `url` with `args`; its standard output.
fn headless(browser: &str, args: &[&str], url: &str, profile: &Path) -> std::process::Output {
    let out = testkit::output(
        Command::new(browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--no-first-run",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args)
            .arg(url),
        Duration::from_secs(120),
        None,
    )
    .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn the_report_renders_in_a_real_browser_with_every_chart_and_table() {
    let Some(browser) = chromium() else {
        eprintln!("SKIPPED (no Chromium here; scripts/test.sh installs Debian's chromium)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("loadgen-report-browser-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let calls = dir.join("calls.jsonl");
    let lines: Vec<String> = (0..60)
        .map(|i| record(i, 4.41 - i as f64 * 0.02, 40.0 + (i * 7 % 50) as f64))
        .collect();
    std::fs::write(&calls, lines.join("\n") + "\n").unwrap();
    let (ari, sim) = (dir.join("ari.json"), dir.join("sim.json"));
    std::fs::write(&ari, ari_run()).unwrap();
    std::fs::write(&sim, sim_run()).unwrap();
    let html = dir.join("report.html");
    let out = report(&[
        "--calls".as_ref(),
        calls.as_os_str(),
        "--run".as_ref(),
        sim.as_os_str(),
        "--run".as_ref(),
        ari.as_os_str(),
        "--out".as_ref(),
        html.as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = format!("file://{}", html.display());
    let profile = dir.join("profile");

    // The DOM as the browser built it.
    let dom = headless(browser, &["--dump-dom"], &url, &profile);
    let dom = String::from_utf8_lossy(&dom.stdout);
    for id in [
        "summary",
        "split-cdf",
        "split-table",
        "split-loss",
        "rtt-cdf",
        "rtt-time",
        "loss-time",
        "mos-histogram",
        "worst",
    ] {
        assert!(
            dom.contains(&format!("id=\"{id}\"")),
            "{id} missing from the DOM"
        );
    }
    assert_eq!(
        dom.matches("<svg").count(),
        5,
        "five charts: the legs' CDF, the calls' RTT CDF, RTT and loss over run time, MOS"
    );
    for legend in [
        "Asterisk in",
        "relay loop",
        "Asterisk out",
        "relay loop p50",
    ] {
        assert!(
            dom.contains(&format!(">{legend}<")) || dom.contains(&format!(">\n{legend}\n<")),
            "legend {legend}"
        );
    }
    assert!(dom.contains("data-windows=\"run-time-1s\""));
    assert_eq!(
        dom.split("id=\"worst\"")
            .nth(1)
            .unwrap()
            .matches("<tr>")
            .count(),
        21,
        "a header and the 20 worst calls"
    );

    // What a person sees: the screenshot is a picture, not a blank page.
    let shot = dir.join("report.png");
    headless(
        browser,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1200,3600",
        ],
        &url,
        &profile,
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = &buf[..info.buffer_size()];
    let channels = info.color_type.samples();
    let pixels = px.len() / channels;
    let non_white = px
        .chunks(channels)
        .filter(|p| p.iter().take(3).any(|&c| c < 200))
        .count();
    let coloured = px
        .chunks(channels)
        .filter(|p| p.len() >= 3 && (i32::from(p[0]) - i32::from(p[2])).abs() > 80)
        .count();
    eprintln!(
        "screenshot {}x{}: {non_white} of {pixels} pixels not white, {coloured} coloured",
        info.width, info.height
    );
    assert!((info.width, info.height) == (1200, 3600), "{info:?}");
    assert!(
        non_white * 100 > pixels,
        "the page is not blank: {non_white} dark pixels"
    );
    assert!(
        coloured > 1_000,
        "the charts are drawn in colour: {coloured}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
