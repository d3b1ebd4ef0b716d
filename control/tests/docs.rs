//! The docs name only flags and metrics that exist, and every metric is documented.
//!
//! - Every `--flag` in `README.md`, `BENCHMARKS.md` and `docs/**/*.md` is in the `--help` of one
//!   of the workspace's binaries (each subcommand's included) or of `scripts/tune-host.sh` or
//!   `scripts/make-certs.sh`, or is another tool's, listed here with that tool. A flag renamed or
//!   removed in the code while the docs still name it fails.
//! - Every `rtprelay_*`/`rtpecho_*` metric the docs name is one the relay, the echo or control
//!   exposes (a histogram's `_bucket`/`_sum`/`_count` series included, a `prefix_*` pattern
//!   matching at least one), and every metric they expose is named in the docs. The exposed names
//!   come from the binaries' own code: the relay's and the echo's rendering of their
//!   `/metrics`, and control's registry (a labelled metric is listed before it has a value).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Flags of other programs the docs quote, with the program.
const OTHER_TOOLS: [(&str, &str); 10] = [
    ("--bench", "cargo"),
    ("--release", "cargo"),
    ("--test", "cargo"),
    ("--nocapture", "cargo test (libtest)"),
    ("--build", "docker-compose up"),
    ("--now", "systemctl enable"),
    ("--table", "rtpengine"),
    ("--tool", "valgrind"),
    ("--time-stamp-precision", "tcpdump"),
    ("--dump-dom", "chromium"),
];

/// The `--flags` in `text` (a word starting with two dashes and a letter).
fn flags(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i + 2 < b.len() {
        let starts = b[i] == b'-'
            && b[i + 1] == b'-'
            && b[i + 2].is_ascii_lowercase()
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'-'));
        if starts {
            let end = (i + 2..b.len())
                .find(|&j| !(b[j].is_ascii_lowercase() || b[j].is_ascii_digit() || b[j] == b'-'))
                .unwrap_or(b.len());
            out.insert(text[i..end].trim_end_matches('-').to_owned());
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

fn help(program: &Path, args: &[&str]) -> String {
    let out = testkit::output(
        std::process::Command::new(program).args(args).arg("--help"),
        Duration::from_secs(30),
        None,
    )
    .unwrap();
    assert!(
        out.status.success(),
        "{} {args:?} --help failed",
        program.display()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn docs(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![root.join("README.md"), root.join("BENCHMARKS.md")];
    let mut dirs = vec![root.join("docs")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "md") {
                files.push(p);
            }
        }
    }
    files
}

#[test]
fn every_flag_the_docs_name_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut known = BTreeSet::new();
    for (bin, subcommands) in [
        ("relay", &[][..]),
        ("control", &[]),
        ("echo", &[]),
        ("loadgen", &["rtp", "blast", "ari", "report", "burn"]),
        ("sim-asterisk", &[]),
        ("bench", &["compare", "floor"]),
    ] {
        let program = testkit::bin(bin);
        known.extend(flags(&help(&program, &[])));
        for s in subcommands {
            known.extend(flags(&help(&program, &[s])));
        }
    }
    // The scripts print their header as their help.
    for script in ["scripts/tune-host.sh", "scripts/make-certs.sh"] {
        known.extend(flags(&help(&root.join(script), &[])));
    }
    // The subcommands' help was read (flags only they have are there).
    assert!(
        known.contains("--bridge-delay") && known.contains("--callers"),
        "{known:?}"
    );
    let mut unknown = Vec::new();
    for file in docs(&root) {
        let text = std::fs::read_to_string(&file).unwrap();
        for f in flags(&text) {
            if !known.contains(&f) && !OTHER_TOOLS.iter().any(|(o, _)| *o == f) {
                unknown.push(format!("{}: {f}", file.display()));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "flags the docs name that no binary has (rename them in the docs, or list another tool's \
         in OTHER_TOOLS): {unknown:?}"
    );
}

#[test]
fn the_flag_reader_finds_flags_and_only_flags() {
    let f = flags("run `relay --echo-leg shared --cores 0,1` (not a--b, not ---x), then --x9.");
    assert_eq!(
        f.into_iter().collect::<Vec<_>>(),
        ["--cores", "--echo-leg", "--x9"]
    );
}

/// The metric names (`rtprelay_…`, `rtpecho_…`) in `text`, each with whether it ends in `*`
/// (a pattern: `rtprelay_shard_*`).
fn metric_names(text: &str) -> BTreeSet<(String, bool)> {
    let mut out = BTreeSet::new();
    for prefix in ["rtprelay_", "rtpecho_"] {
        let mut from = 0;
        while let Some(at) = text[from..].find(prefix).map(|i| from + i) {
            let b = text.as_bytes();
            let word_start = at == 0 || !(b[at - 1].is_ascii_alphanumeric() || b[at - 1] == b'_');
            let end = (at..b.len())
                .find(|&j| !(b[j].is_ascii_lowercase() || b[j].is_ascii_digit() || b[j] == b'_'))
                .unwrap_or(b.len());
            if word_start {
                let pattern = b.get(end) == Some(&b'*');
                out.insert((text[at..end].trim_end_matches('_').to_owned(), pattern));
            }
            from = end.max(at + 1);
        }
    }
    out
}

/// The families in a Prometheus text exposition (`# TYPE name kind`).
fn exposed(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_metric_the_docs_name_exists_and_every_metric_is_documented() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut metrics = exposed(&relay::metrics::render(&[Arc::new(
        relay::snapshot::Snapshot::default(),
    )]));
    let relay_count = metrics.len();
    metrics.extend(exposed(&echo::SharedCounts::default().render()));
    let echo_count = metrics.len() - relay_count;
    metrics.extend(control::metrics::Metrics::new().names().iter().cloned());
    // Each source gave its families (the reader reads the formats it is given).
    assert!(relay_count >= 30 && echo_count >= 10, "{metrics:?}");
    assert!(
        metrics.contains("rtprelay_rtt_seconds")
            && metrics.contains("rtpecho_received_total")
            && metrics.contains("rtprelay_control_ari_request_seconds"),
        "{metrics:?}"
    );
    let mut documented = BTreeSet::new();
    let mut unknown = Vec::new();
    for file in docs(&root) {
        let text = std::fs::read_to_string(&file).unwrap();
        for (name, pattern) in metric_names(&text) {
            let known = if pattern {
                metrics.iter().any(|m| m.starts_with(&name))
            } else {
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| metrics.contains(*f)))
                    .unwrap_or(&name);
                documented.insert(family.to_owned());
                metrics.contains(family)
            };
            if !known {
                unknown.push(format!(
                    "{}: {name}{}",
                    file.display(),
                    if pattern { "*" } else { "" }
                ));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics the docs name that no binary exposes: {unknown:?}"
    );
    let undocumented: Vec<_> = metrics.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "metrics a binary exposes that the docs do not name: {undocumented:?}"
    );
}

#[test]
fn the_metric_reader_finds_names_and_patterns() {
    let m = metric_names(
        "`rtprelay_rtt_seconds_bucket{le=\"0.01\"}`, the `rtprelay_shard_*` series, \
         xrtprelay_no, rtpecho_sent_total.",
    );
    assert_eq!(
        m.into_iter().collect::<Vec<_>>(),
        [
            ("rtpecho_sent_total".to_owned(), false),
            ("rtprelay_rtt_seconds_bucket".to_owned(), false),
            ("rtprelay_shard".to_owned(), true),
        ]
    );
}
