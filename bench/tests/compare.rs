//! A short run of `bench compare` (a few seconds, 10 channels), so the harness cannot rot: every
//! target is started, driven and measured, the JSON and the chart are written, and where
//! rtpengine is not installed its row says so instead of failing.

use serde_json::Value;

#[test]
fn a_short_comparison_measures_every_target_and_writes_json_and_a_chart() {
    if !testkit::uring_available() {
        return;
    }
    let out = std::env::temp_dir().join(format!("bench-compare-smoke-{}", std::process::id()));
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_bench"))
        .args([
            "compare",
            "--channels",
            "10",
            "--duration",
            "1s",
            "--warmup",
            "300ms",
        ])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "bench compare failed");
    assert!(stdout.contains("vs uring"), "the table is printed");
    let r: Value =
        serde_json::from_slice(&std::fs::read(out.join("compare.json")).unwrap()).unwrap();
    let points = r["points"].as_array().unwrap();
    let names: Vec<&str> = points
        .iter()
        .map(|p| p["target"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["uring", "tokio", "floor", "rtpengine"]);
    for p in points {
        if let Some(why) = p["skipped"].as_str() {
            assert_eq!(
                p["target"], "rtpengine",
                "only rtpengine may be skipped: {p}"
            );
            assert!(why.contains("not installed"), "{why}");
            continue;
        }
        // 10 channels, 50 packets/s each way, 1 s measured: about 1,000 crossings.
        let packets = p["packets"].as_u64().unwrap();
        assert!((800..=1_200).contains(&packets), "{p}");
        assert!(p["cpu_ns_per_packet"].as_f64().unwrap() > 0.0, "{p}");
        assert_eq!(p["lost"], 0, "{p}");
        assert!(p["added_p50_us"].as_f64().is_some(), "{p}");
    }
    assert!(
        points[0]["enters_per_packet"]
            .as_f64()
            .is_some_and(|e| e > 0.0),
        "the relay's io_uring_enter count is read"
    );
    let svg = std::fs::read_to_string(out.join("compare.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "an SVG chart"
    );
    assert!(
        svg.contains("uring") && svg.contains("floor"),
        "with a line per target"
    );
    let _ = std::fs::remove_dir_all(&out);
}
