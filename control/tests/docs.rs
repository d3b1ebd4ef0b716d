//! The docs name only flags that exist: every `--flag` in `README.md`, `BENCHMARKS.md` and
//! `docs/**/*.md` is in the `--help` of one of the workspace's binaries (each subcommand's
//! included) or of `scripts/tune-host.sh`, or is another tool's, listed here with that tool. A
//! flag renamed or removed in the code while the docs still name it fails this test.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
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
    // The script prints its header as its help.
    known.extend(flags(&help(&root.join("scripts/tune-host.sh"), &[])));
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
