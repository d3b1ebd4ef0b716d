//! The operations files, checked the way their own tools check them: the alert rules with `promtool
//! check rules` and `promtool test rules`, the Prometheus config with `promtool check config`, the
//! compose file with `docker-compose config -q` (and the services it must have), and the JSON files
//! parsed and checked for what they must contain: the seccomp profile (io_uring allowed, default
//! deny, dangerous calls absent) and the Grafana dashboard (its panels and datasource).
//! `tune-host.sh --dry-run` changes nothing and a bad flag exits 2; the systemd units have what the
//! relay, control and echo need. A missing tool is a loud SKIPPED line (scripts/test.sh installs
//! them on Debian).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        eprintln!("SKIPPED ({name} is not installed; scripts/test.sh installs it on Debian)");
    }
    found
}

fn run(program: &Path, args: &[&str], dir: &Path) -> String {
    let out = testkit::output(
        Command::new(program).args(args).current_dir(dir),
        std::time::Duration::from_secs(120),
        None,
    )
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{} {args:?} failed:\n{text}",
        program.display()
    );
    text
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let dir = root().join("docker/prometheus");
    let checked = run(&promtool, &["check", "rules", "alerts.yml"], &dir);
    assert!(checked.contains("SUCCESS: 7 rules found"), "{checked}");
    let tested = run(&promtool, &["test", "rules", "alerts_test.yml"], &dir);
    assert!(tested.contains("SUCCESS"), "{tested}");
    run(
        &promtool,
        &["check", "config", "--syntax-only", "prometheus.yml"],
        &dir,
    );
}

#[test]
fn the_compose_file_is_valid() {
    let Some(compose) = tool("docker-compose") else {
        return;
    };
    run(
        &compose,
        &["-f", "docker/docker-compose.yml", "config", "-q"],
        &root(),
    );
    let services = run(
        &compose,
        &["-f", "docker/docker-compose.yml", "config", "--services"],
        &root(),
    );
    for s in [
        "asterisk",
        "relay",
        "control",
        "echo",
        "prometheus",
        "grafana",
    ] {
        assert!(
            services.lines().any(|l| l == s),
            "service {s} missing: {services}"
        );
    }
    let text = run(
        &compose,
        &["-f", "docker/docker-compose.yml", "config"],
        &root(),
    );
    assert!(
        text.contains("seccomp"),
        "the relay runs under its seccomp profile"
    );
    assert!(
        text.contains("cpuset: '1'") || text.contains("cpuset: \"1\""),
        "the relay is pinned:\n{text}"
    );
}

#[test]
fn the_seccomp_profile_allows_io_uring_and_denies_by_default() {
    let text = std::fs::read_to_string(root().join("docker/relay-seccomp.json")).unwrap();
    let p: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(p["defaultAction"], "SCMP_ACT_ERRNO");
    let allowed: Vec<&str> = p["syscalls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "SCMP_ACT_ALLOW")
        .flat_map(|r| {
            r["names"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_str)
        })
        .collect();
    for s in [
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "socket",
        "bind",
        "sched_setaffinity",
        "eventfd2",
        "epoll_wait",
        "accept4",
    ] {
        assert!(allowed.contains(&s), "{s} is not allowed");
    }
    for s in ["ptrace", "mount", "bpf", "kexec_load", "init_module"] {
        assert!(!allowed.contains(&s), "{s} must stay denied");
    }
}

#[test]
fn the_dashboard_has_every_panel_on_the_provisioned_datasource() {
    let d: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("docker/grafana/dashboards/rtp-relay.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(d["uid"], "rtp-relay");
    let provisioned = std::fs::read_to_string(
        root().join("docker/grafana/provisioning/datasources/prometheus.yml"),
    )
    .unwrap();
    assert!(provisioned.contains("uid: prometheus"));
    let panels = d["panels"].as_array().unwrap();
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for wanted in [
        "RTT p50 / p95 / p99",
        "RTT heatmap",
        "Loss, late and duplicate",
        "Echo timeouts",
        "Active channels and calls",
        "Forwarded packets/s",
        "batch size",
        "Drops by reason",
        "Call set-up latency",
        "failures by stage",
        "Port pool",
        "Call MOS p50 / p10",
        "Calls below MOS 3.6 per minute",
        "Shards (relay --cores)",
        "Channels per shard",
        "Packets/s per shard",
        "Shard CPU",
        "CPU per packet and batch size per shard",
        "Probe legs p50 / p99: relay loop and Asterisk in",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "no panel {wanted:?} in {titles:?}"
        );
    }
    assert!(panels.iter().any(|p| p["type"] == "heatmap"));
    for p in panels {
        if p["type"] == "row" {
            continue; // a heading, no query
        }
        assert_eq!(p["datasource"]["uid"], "prometheus", "{}", p["title"]);
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.is_empty()),
                "{}",
                p["title"]
            );
        }
    }
}

#[test]
fn tune_host_dry_run_prints_the_plan_and_changes_nothing() {
    let before = std::fs::read_to_string("/proc/sys/net/core/rmem_max").unwrap_or_default();
    let out = testkit::output(
        Command::new(root().join("scripts/tune-host.sh")).args(["--dry-run", "--core", "1"]),
        std::time::Duration::from_secs(120),
        None,
    )
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for s in [
        "net.core.rmem_max",
        "nofile",
        "isolcpus=1",
        "smp_affinity",
        "dry run: nothing changed",
    ] {
        assert!(text.contains(s), "{s} missing:\n{text}");
    }
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/core/rmem_max").unwrap_or_default(),
        before
    );
    let bad = testkit::output(
        Command::new(root().join("scripts/tune-host.sh")).arg("--bogus"),
        std::time::Duration::from_secs(120),
        None,
    )
    .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--bogus"));
}

#[test]
fn the_systemd_units_pin_the_relay_and_start_each_binary() {
    let dir = root().join("scripts/systemd");
    let relay = std::fs::read_to_string(dir.join("rtp-relay.service")).unwrap();
    assert!(relay.contains("CPUAffinity="));
    assert!(relay.contains("ExecStart=/usr/local/bin/relay "));
    assert!(relay.contains("LimitNOFILE="));
    for (unit, bin) in [
        ("rtp-relay-control.service", "control"),
        ("rtp-relay-echo.service", "echo"),
    ] {
        let text = std::fs::read_to_string(dir.join(unit)).unwrap();
        assert!(
            text.contains(&format!("ExecStart=/usr/local/bin/{bin}")),
            "{unit}"
        );
        assert!(text.contains("[Install]"), "{unit}");
    }
}
