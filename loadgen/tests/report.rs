//! `loadgen report` looked at in a real browser: headless Chromium (Debian's `chromium`, which
//! scripts/test.sh installs) loads the HTML from a file, its DOM must hold every chart and table,
//! and its screenshot must not be blank. Skips loudly where Chromium is not installed.

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
    let html = dir.join("report.html");
    let out = testkit::output(
        Command::new(env!("CARGO_BIN_EXE_loadgen"))
            .args(["report", "--calls"])
            .arg(&calls)
            .arg("--out")
            .arg(&html),
        Duration::from_secs(60),
        None,
    )
    .unwrap();
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
    for id in ["summary", "rtt-cdf", "rtt-time", "mos-histogram", "worst"] {
        assert!(
            dom.contains(&format!("id=\"{id}\"")),
            "{id} missing from the DOM"
        );
    }
    assert_eq!(dom.matches("<svg").count(), 3, "three charts");
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
            "--window-size=1200,2400",
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
    assert!((info.width, info.height) == (1200, 2400), "{info:?}");
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
