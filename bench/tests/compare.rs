//! Short runs of `bench compare` (a few seconds, 10 channels), so the harness cannot rot: every
//! target is started, driven and measured, the table, the JSON and the chart are written, and where
//! rtpengine is not installed its row says so instead of failing; a target that fails (a relay
//! refusing its flags) becomes a `failed:` cell while the others are measured; SIGINT mid-run keeps
//! the points measured so far, marks the run interrupted and leaves no child process alive.

use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

/// One comparison at a time: they share the cores and fixed ports (the floor's, rtpengine's).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `bench compare ARGS --out OUT`, run to its end (5 minutes at most).
fn compare(args: &[&str], out: &std::path::Path) -> std::process::Output {
    testkit::output(
        Command::new(env!("CARGO_BIN_EXE_bench"))
            .arg("compare")
            .args(args)
            .arg("--out")
            .arg(out),
        Duration::from_secs(300),
        None,
    )
    .unwrap()
}

fn read_json(path: &std::path::Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

#[test]
fn a_short_comparison_measures_every_target_and_writes_json_and_a_chart() {
    if !testkit::uring_available() {
        return;
    }
    let _serial = serial();
    let out = std::env::temp_dir().join(format!("bench-compare-smoke-{}", std::process::id()));
    let run = compare(
        &[
            "--targets",
            "uring,sharded,shared,tokio,floor,rtpengine",
            "--channels",
            "10",
            "--duration",
            "1s",
            "--warmup",
            "300ms",
        ],
        &out,
    );
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
    assert_eq!(
        names,
        ["uring", "sharded", "shared", "tokio", "floor", "rtpengine"]
    );
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
        assert!(p.get("error").is_none(), "{p}");
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

#[test]
fn a_target_that_fails_becomes_a_failed_cell_and_the_run_goes_on() {
    if !testkit::uring_available() {
        return;
    }
    let _serial = serial();
    let out = std::env::temp_dir().join(format!("bench-compare-fail-{}", std::process::id()));
    // The relay refuses the flag and exits: both relay targets fail, the floor is measured.
    let run = compare(
        &[
            "--targets",
            "uring,floor,tokio",
            "--channels",
            "10",
            "--duration",
            "1s",
            "--warmup",
            "300ms",
            "--relay-arg=--no-such-flag",
        ],
        &out,
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert_eq!(
        run.status.code(),
        Some(1),
        "failed points make a failed run"
    );
    assert!(stderr.contains("2 point(s) failed"), "{stderr}");
    let cell = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("uring"))
        .expect("a uring row");
    assert!(cell.contains("failed:"), "{cell}");
    let r = read_json(&out.join("compare.json")).expect("the JSON is written");
    let points = r["points"].as_array().unwrap();
    let by = |t: &str| points.iter().find(|p| p["target"] == t).unwrap().clone();
    for t in ["uring", "tokio"] {
        let e = by(t)["error"].as_str().unwrap_or_default().to_owned();
        assert!(e.contains("relay"), "{t}: {e}");
    }
    let floor = by("floor");
    assert!(floor.get("error").is_none(), "{floor}");
    assert!(floor["packets"].as_u64().unwrap() > 0, "{floor}");
    assert_eq!(r["interrupted"], false);
    let svg = std::fs::read_to_string(out.join("compare.svg")).unwrap();
    assert!(svg.contains("floor"), "the chart has the measured target");
    let _ = std::fs::remove_dir_all(&out);
}

/// The processes `pid` has started that are still its children.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Whether `pid` is alive (a zombie is not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

#[test]
fn ctrl_c_keeps_what_was_measured_and_leaves_no_child_behind() {
    if !testkit::uring_available() {
        return;
    }
    let _serial = serial();
    let out = std::env::temp_dir().join(format!("bench-compare-int-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let mut bench = testkit::Proc(
        Command::new(env!("CARGO_BIN_EXE_bench"))
            .args(["compare", "--targets", "floor", "--channels", "10,20,30"])
            .args(["--duration", "2s", "--warmup", "300ms"])
            .arg("--out")
            .arg(&out)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let json = out.join("compare.json");
    testkit::wait_for("the first point", Duration::from_secs(120), || {
        read_json(&json).filter(|r| r["points"].as_array().is_some_and(|p| !p.is_empty()))
    });
    // The second point is under way: the echo, the floor and loadgen are running.
    let kids = testkit::wait_for(
        "the second point's processes",
        Duration::from_secs(30),
        || {
            let k = children(bench.pid());
            (k.len() >= 2).then_some(k)
        },
    );
    let status = Command::new("kill")
        .args(["-INT", &bench.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = testkit::wait_for("bench to stop", Duration::from_secs(20), || {
        bench.0.try_wait().unwrap()
    });
    assert_eq!(exit.code(), Some(1), "an interrupted run is not a success");
    let mut table = String::new();
    std::io::Read::read_to_string(bench.0.stdout.as_mut().unwrap(), &mut table).unwrap();
    assert!(table.contains("interrupted"), "{table}");
    assert!(table.contains("10 channels"), "{table}");
    let r = read_json(&json).unwrap();
    assert_eq!(r["interrupted"], true, "{r}");
    let points = r["points"].as_array().unwrap();
    assert!(
        points[0]["packets"].as_u64().is_some_and(|p| p > 0),
        "the first point is kept: {r}"
    );
    assert!(
        !points.iter().any(|p| p["channels"] == 30),
        "nothing after the stop: {r}"
    );
    assert!(out.join("compare.svg").exists());
    for k in kids {
        assert!(!alive(k), "child {k} outlived bench");
    }
    let _ = std::fs::remove_dir_all(&out);
}
