//! `cargo xtask fuzz [--time S] [TARGET]`: the fuzzing campaign.
//!
//! Every target lives in a fuzz workspace of its own (not a member of the main workspace,
//! because cargo-fuzz needs nightly; the main build stays on the pinned stable). The nightly
//! toolchain and cargo-fuzz are installed when missing, saying what is done. Each target runs
//! for `S` seconds (libFuzzer's `-max_total_time`), after its checked-in regression inputs
//! have been replayed; then one line per target gives executions, coverage (`cov:` and `ft:`
//! of libFuzzer's last stats line) and crashes, and a last line the totals. Any crash makes
//! the command fail.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::setup::nightly_cargo;
use crate::{root, run_status, setup, Result};

/// A fuzz workspace (relative to the repository root) and its targets.
struct Workspace {
    /// The crate that cargo-fuzz runs from (the fuzz workspace is its `fuzz/` folder).
    dir: &'static str,
    targets: &'static [&'static str],
}

const WORKSPACES: &[Workspace] = &[
    Workspace {
        dir: "hypervisor/abi",
        targets: &["decode", "codecs"],
    },
    Workspace {
        dir: "hypervisor/dma",
        targets: &["dma_state"],
    },
];

/// libFuzzer options of one target: `dma_state` runs a whole call sequence per input, so its
/// inputs are kept to 1 KiB (a few hundred calls; the 64-page model is full long before)
/// to keep well above 1e6 executions in 300 s on a loaded 2-core machine.
fn target_args(target: &str) -> &'static [&'static str] {
    match target {
        "dma_state" => &["-max_len=1024"],
        _ => &[],
    }
}

/// What one target's run showed.
struct Outcome {
    name: String,
    execs: u64,
    cov: Option<u64>,
    ft: Option<u64>,
    crashes: u64,
    artifacts: Vec<PathBuf>,
}

/// The `value` after `key` in a libFuzzer stats line (`cov: 123`).
fn field(line: &str, key: &str) -> Option<u64> {
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == key {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// Reads libFuzzer's output: the last stats line (`#N ... cov: C ft: F ...`) and the final
/// `stat::number_of_executed_units`.
fn parse(log: &str, o: &mut Outcome) {
    for line in log.lines() {
        if let Some(n) = line
            .strip_prefix("stat::number_of_executed_units:")
            .and_then(|v| v.trim().parse().ok())
        {
            o.execs = n;
        }
        if line.starts_with('#') && line.contains("cov:") {
            if let Some(n) = line[1..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|v| v.parse().ok())
            {
                o.execs = o.execs.max(n);
            }
            o.cov = field(line, "cov:").or(o.cov);
            o.ft = field(line, "ft:").or(o.ft);
        }
    }
}

fn artifacts(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        ["crash-", "leak-", "timeout-", "oom-"]
                            .iter()
                            .any(|k| n.starts_with(k))
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Builds `target` of the workspace in `dir` (release, debug assertions and overflow checks on,
/// no sanitizer: the code under test has no `unsafe`), replays the checked-in regression
/// inputs, then fuzzes for `secs` seconds.
fn run_target(dir: &Path, target: &str, secs: u64) -> Result<Outcome> {
    let fuzz = dir.join("fuzz");
    let corpus = fuzz.join("corpus").join(target);
    let regressions = fuzz.join("regressions").join(target);
    let art_dir = fuzz.join("artifacts").join(target);
    std::fs::create_dir_all(&corpus)?;
    std::fs::create_dir_all(&art_dir)?;
    let before = artifacts(&art_dir);
    let mut o = Outcome {
        name: target.to_string(),
        execs: 0,
        cov: None,
        ft: None,
        crashes: 0,
        artifacts: vec![],
    };
    let common = ["--sanitizer", "none", "--debug-assertions"];

    eprintln!("xtask: building fuzz target {target}");
    run_status(
        nightly_cargo()
            .current_dir(dir)
            .args(["fuzz", "build"])
            .args(common)
            .arg(target),
    )?;

    let mut args = vec![
        format!("-max_total_time={secs}"),
        "-print_final_stats=1".to_string(),
    ];
    args.extend(target_args(target).iter().map(|a| a.to_string()));
    eprintln!("xtask: fuzzing {target} for {secs} s");
    let out = nightly_cargo()
        .current_dir(dir)
        .args(["fuzz", "run"])
        .args(common)
        .arg(target)
        .arg(&corpus)
        // The checked-in regression inputs are a second corpus: run first (a regression
        // crashes at once), never written to (new inputs go to the first one).
        .args(regressions.is_dir().then_some(&regressions))
        .arg("--")
        .args(&args)
        .stdout(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo fuzz: {e}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    let log_file = root().join(format!("target/xtask/fuzz-{target}.log"));
    if let Some(p) = log_file.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(&log_file, log.as_bytes())?;
    parse(&log, &mut o);
    o.artifacts = artifacts(&art_dir)
        .into_iter()
        .filter(|a| !before.contains(a))
        .collect();
    o.crashes = o.artifacts.len() as u64;
    if !out.status.success() && o.crashes == 0 {
        // Failed without leaving an input: a build or harness failure, not a finding.
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "cargo fuzz run {target} failed with {} (log {}):\n{}",
            out.status,
            log_file.display(),
            tail.join("\n")
        )
        .into());
    }
    if o.crashes > 0 {
        let tail: Vec<&str> = log
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("stat::"))
            .rev()
            .take(40)
            .collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        eprintln!("{}", tail.join("\n"));
    }
    Ok(o)
}

fn show(v: Option<u64>) -> String {
    v.map_or("?".into(), |n| n.to_string())
}

/// The command.
pub fn cmd_fuzz(wanted: Option<&str>, secs: u64) -> Result<()> {
    let all: Vec<(&Workspace, &str)> = WORKSPACES
        .iter()
        .flat_map(|w| w.targets.iter().map(move |t| (w, *t)))
        .collect();
    let chosen: Vec<(&Workspace, &str)> = all
        .iter()
        .copied()
        .filter(|(_, t)| wanted.is_none_or(|w| w == *t))
        .collect();
    if chosen.is_empty() {
        let names: Vec<&str> = all.iter().map(|(_, t)| *t).collect();
        return Err(format!(
            "no fuzz target `{}`; there are: {}",
            wanted.unwrap_or(""),
            names.join(", ")
        )
        .into());
    }
    setup::ensure_fuzz_tools()?;
    let mut outcomes = Vec::new();
    for (w, t) in chosen {
        outcomes.push(run_target(&root().join(w.dir), t, secs)?);
    }
    println!();
    for o in &outcomes {
        println!(
            "fuzz {:<10} {:>11} executions  cov {:>5}  ft {:>6}  crashes {}",
            o.name,
            o.execs,
            show(o.cov),
            show(o.ft),
            o.crashes
        );
        for a in &o.artifacts {
            println!(
                "    crash input: {}  (replay: cd {} && cargo +nightly fuzz run --sanitizer none -a {} {})",
                a.display(),
                WORKSPACES
                    .iter()
                    .find(|w| w.targets.contains(&o.name.as_str()))
                    .map_or("", |w| w.dir),
                o.name,
                a.display()
            );
        }
    }
    let execs: u64 = outcomes.iter().map(|o| o.execs).sum();
    let crashes: u64 = outcomes.iter().map(|o| o.crashes).sum();
    println!(
        "fuzz: {} targets, {execs} executions, {crashes} crashes ({secs} s each)",
        outcomes.len()
    );
    if crashes > 0 {
        return Err(format!("{crashes} crash(es) found").into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libfuzzer_stats() {
        let log = "INFO: Seed: 1\n\
                   #2\tINITED cov: 10 ft: 11 corp: 1/1b exec/s: 0 rss: 30Mb\n\
                   #1048576\tpulse  cov: 120 ft: 300 corp: 40/2Kb lim: 4 exec/s: 1000 rss: 40Mb\n\
                   #1500000\tDONE   cov: 130 ft: 321 corp: 44/2Kb lim: 4 exec/s: 5000 rss: 41Mb\n\
                   Done 1500000 runs in 300 second(s)\n\
                   stat::number_of_executed_units: 1500001\n";
        let mut o = Outcome {
            name: "t".into(),
            execs: 0,
            cov: None,
            ft: None,
            crashes: 0,
            artifacts: vec![],
        };
        parse(log, &mut o);
        assert_eq!((o.execs, o.cov, o.ft), (1500001, Some(130), Some(321)));
    }
}
