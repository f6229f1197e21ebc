//! `cargo xtask test`: every host test (workspace `cargo test`, the loom models), the `cargo fmt
//! --check` and `cargo clippy -D warnings` checks (one test each) and every QEMU scenario, in
//! parallel up to the core count, ending with one line `N passed, N failed`.
//! `--matrix` adds the guest, VT-d and DMA scenarios again on the second machine (OVMF, 4
//! CPUs, EPYC, aw-bits=48, caching-mode=on; names end in `@matrix`).

use std::collections::VecDeque;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use moat_scenarios::Scenario;

use crate::cli::TestArgs;
use crate::{
    bochs, build_kernel, build_test_guest, make_iso_with_modules, qemu, root, setup, Flavour,
    Result,
};

#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
    failures: Vec<String>,
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// Sums libtest's `test result:` lines; a suite that did not build or run counts as failed.
fn run_libtest(label: &str, mut cmd: Command, tally: &mut Tally) {
    eprintln!("xtask: {label}: {cmd:?}");
    let start = Instant::now();
    let out = match cmd.stdin(Stdio::null()).output() {
        Ok(o) => o,
        Err(e) => {
            tally.failed += 1;
            tally
                .failures
                .push(format!("{label}: cannot run cargo: {e}"));
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let (mut p, mut f) = (0, 0);
    for line in stdout.lines() {
        if let Some(rest) = line.strip_prefix("test result: ") {
            // "ok. 5 passed; 0 failed; 0 ignored; ..."
            for part in rest.split(';') {
                let words: Vec<&str> = part.split_whitespace().collect();
                let n = |w: &[&str]| w.iter().find_map(|x| x.parse::<usize>().ok()).unwrap_or(0);
                if part.contains(" passed") {
                    p += n(&words);
                } else if part.contains(" failed") {
                    f += n(&words);
                }
            }
        }
    }
    let failed_lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("test ") && l.ends_with("FAILED"))
        .collect();
    tally.passed += p;
    tally.failed += f;
    if !out.status.success() && f == 0 {
        tally.failed += 1;
        tally.failures.push(format!(
            "{label}: cargo exited with {} before reporting failures",
            out.status
        ));
        eprintln!("{stderr}");
    }
    if f > 0 {
        for l in &failed_lines {
            tally.failures.push(format!("{label}: {l}"));
        }
        eprintln!("{stdout}");
        eprintln!("{}", tail(&stderr, 40));
    }
    eprintln!(
        "xtask: {label}: {p} passed, {f} failed ({:.1}s)",
        start.elapsed().as_secs_f64()
    );
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The crates that build only for x86_64-unknown-none: left out of the host's tests and
/// host clippy, linted for their own target.
const BARE_METAL: [&str; 2] = ["moat-kernel", "moat-test-guest"];

/// `flag crate` for each of [`BARE_METAL`] (`--exclude` or `-p`).
fn each_bare_metal(flag: &'static str) -> impl Iterator<Item = &'static str> {
    BARE_METAL.into_iter().flat_map(move |c| [flag, c])
}

fn host_tests(tally: &mut Tally) {
    let mut t = cargo();
    t.args(["test", "--no-fail-fast", "--workspace"])
        .args(each_bare_metal("--exclude"));
    run_libtest("host tests", t, tally);
    if root().join("hypervisor/iova/tests/loom.rs").exists() {
        run_libtest("loom models", loom("moat-iova", &["--test", "loom"]), tally);
    }
    // moat-dma's: the shards' shared accounting (guest-page claims, quota reservations).
    run_libtest(
        "moat-dma loom models",
        loom("moat-dma", &["--lib", "loom"]),
        tally,
    );
    // The fuzz targets' regression inputs (every crash a fuzz campaign found), replayed on
    // stable; the fuzz workspaces are not members of the main workspace (cargo fuzz needs
    // nightly to fuzz, not to replay).
    for ws in ["hypervisor/dma/fuzz"] {
        if root().join(ws).join("tests").exists() {
            let mut f = cargo();
            f.current_dir(root().join(ws))
                .args(["test", "--no-fail-fast"]);
            run_libtest(&format!("fuzz regressions ({ws})"), f, tally);
        }
    }
}

/// `cargo test` of `package`'s loom models `which` (release, `--cfg loom`, in their own
/// target directory so that the normal builds are not redone).
fn loom(package: &str, which: &[&str]) -> Command {
    let mut l = cargo();
    l.args(["test", "--no-fail-fast", "-p", package, "--release"])
        .args(which)
        .env("RUSTFLAGS", "--cfg loom")
        .env("CARGO_TARGET_DIR", root().join("target/loom"));
    l
}

/// Runs a check that passes or fails as a whole (one test in the tally); on failure, the
/// tool's own output is shown.
fn run_check(label: &str, mut cmd: Command, tally: &mut Tally) {
    eprintln!("xtask: {label}: {cmd:?}");
    let start = Instant::now();
    match cmd.stdin(Stdio::null()).output() {
        Ok(out) if out.status.success() => {
            tally.passed += 1;
            eprintln!(
                "xtask: {label}: passed ({:.1}s)",
                start.elapsed().as_secs_f64()
            );
        }
        Ok(out) => {
            tally.failed += 1;
            tally
                .failures
                .push(format!("{label}: failed with {}", out.status));
            eprintln!("xtask: {label}: FAILED with {}", out.status);
            eprint!("{}", String::from_utf8_lossy(&out.stdout));
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
        }
        Err(e) => {
            tally.failed += 1;
            tally
                .failures
                .push(format!("{label}: cannot run {cmd:?}: {e}"));
        }
    }
}

/// `cargo fmt --check` and `cargo clippy -D warnings`: the host crates with every target, and
/// the two bare-metal crates (they only build for x86_64-unknown-none) for their target.
fn lint_checks(tally: &mut Tally) {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--check"]);
    run_check("cargo fmt", fmt, tally);
    let mut host = cargo();
    host.args(["clippy", "--quiet", "--workspace"])
        .args(each_bare_metal("--exclude"))
        .args(["--all-targets", "--", "-D", "warnings"]);
    run_check("cargo clippy (host crates)", host, tally);
    let mut bare = cargo();
    bare.args(["clippy", "--quiet"])
        .args(each_bare_metal("-p"))
        .args([
            "--target",
            "x86_64-unknown-none",
            "--release",
            "--",
            "-D",
            "warnings",
        ]);
    run_check("cargo clippy (kernel, test guest)", bare, tally);
}

fn run_scenario(
    s: &Scenario,
    kernel: &Path,
    guest: Option<&Path>,
) -> std::result::Result<Duration, String> {
    let dir = root().join("target/xtask/scenarios").join(&s.name);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut machine = s.machine.clone();
    for (name, bytes) in &s.files {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(|e| format!("{}: {e}", p.display()))?;
        for a in &mut machine.extra {
            *a = a.replace(&format!("@FILE:{name}"), &p.to_string_lossy());
        }
    }
    for (name, bytes) in &s.disks {
        let p = dir.join(name);
        // A fresh sparse image each run: it reads as zeros and costs no disk space.
        let f = std::fs::File::create(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        f.set_len(*bytes)
            .map_err(|e| format!("{}: {e}", p.display()))?;
        for a in &mut machine.extra {
            *a = a.replace(&format!("@FILE:{name}"), &p.to_string_lossy());
        }
    }
    let derived;
    let wanted = match &s.prepare {
        Some(prepare) => {
            // First boot: the same machine with no guests; the hypervisor reports what it
            // discovered, and the scenario derives its modules from that.
            let iso = make_iso_with_modules(
                kernel,
                moat_scenarios::BASE_CMDLINE,
                &[],
                &format!("scenario-{}-prepare", s.name),
            )
            .map_err(|e| e.to_string())?;
            let args = machine.qemu_args(&iso.to_string_lossy(), setup::OVMF_CODE);
            let log = root()
                .join("target/xtask/logs")
                .join(format!("{}.prepare.log", s.name));
            let r = qemu::run(&args, &log, false, Duration::from_secs(s.timeout_secs))
                .map_err(|e| e.to_string())?;
            if r.exit != moat_scenarios::Exit::Success {
                return Err(format!(
                    "the discovery boot ended with {} (log: {})",
                    r.exit,
                    log.display()
                ));
            }
            derived = prepare(&r.serial)
                .map_err(|e| format!("discovery boot: {e} (log: {})", log.display()))?;
            &derived
        }
        None => &s.modules,
    };
    let modules: Vec<(std::path::PathBuf, String)> = wanted
        .iter()
        .map(|m| match guest {
            Some(g) if m.file == moat_scenarios::TEST_GUEST => {
                Ok((g.to_path_buf(), m.cmdline.clone()))
            }
            _ => Err(format!("boot module `{}` was not built", m.file)),
        })
        .collect::<std::result::Result<_, _>>()?;
    let iso = make_iso_with_modules(
        kernel,
        &s.cmdline,
        &modules,
        &format!("scenario-{}", s.name),
    )
    .map_err(|e| e.to_string())?;
    let log = root()
        .join("target/xtask/logs")
        .join(format!("{}.log", s.name));
    let limit = Duration::from_secs(s.timeout_secs);
    let r = match &s.bochs {
        Some(bochs_machine) => bochs::run(bochs_machine, &iso, &dir, &log, false, limit),
        None => {
            let args = machine.qemu_args(&iso.to_string_lossy(), setup::OVMF_CODE);
            qemu::run(&args, &log, false, limit)
        }
    }
    .map_err(|e| e.to_string())?;
    let verdict = if r.exit != s.expect {
        Err(format!("expected {:?}, got {}", s.expect, r.exit))
    } else {
        (s.check)(&r.serial)
    };
    verdict.map(|()| r.elapsed).map_err(|e| {
        let mut msg = format!(
            "{e}\n  log: {}\n  --- serial tail ---\n{}",
            log.display(),
            indent(&tail(&r.serial, 25))
        );
        if r.exit != s.expect && !r.stderr.trim().is_empty() {
            msg.push_str(&format!(
                "\n  --- {} stderr tail ---\n{}",
                if s.bochs.is_some() {
                    "Bochs log"
                } else {
                    "QEMU"
                },
                indent(&tail(&r.stderr, 10))
            ));
        }
        msg
    })
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("  | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn scenarios(pattern: Option<&str>, matrix: bool, jobs: usize, tally: &mut Tally) -> Result<()> {
    let real_dmar_path = root().join("drivers/dmar/tests/data/qemu-7.2-q35-dmar.bin");
    let real_dmar =
        std::fs::read(&real_dmar_path).map_err(|e| format!("{}: {e}", real_dmar_path.display()))?;
    let mut all = moat_scenarios::all(&real_dmar);
    if matrix {
        all.extend(moat_scenarios::matrix());
    }
    // The longest first, so the slowest runs do not end up last on one core.
    all.sort_by_key(|s| std::cmp::Reverse(s.timeout_secs));
    let all: Vec<Scenario> = all
        .into_iter()
        .filter(|s| pattern.is_none_or(|p| s.name.contains(p)))
        .collect();
    if all.is_empty() {
        return Ok(());
    }
    let kernel = build_kernel(Flavour::Selftest)?;
    let guest = if all
        .iter()
        .any(|s| !s.modules.is_empty() || s.prepare.is_some())
    {
        Some(build_test_guest()?)
    } else {
        None
    };
    std::fs::create_dir_all(root().join("target/xtask/logs"))?;
    let on_bochs = all.iter().filter(|s| s.bochs.is_some()).count();
    eprintln!(
        "xtask: {} scenarios ({} QEMU, {on_bochs} Bochs), {} at a time",
        all.len(),
        all.len() - on_bochs,
        jobs
    );
    let queue = Mutex::new(all.into_iter().collect::<VecDeque<_>>());
    let results = Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for _ in 0..jobs {
            sc.spawn(|| loop {
                let Some(s) = queue.lock().unwrap().pop_front() else {
                    break;
                };
                let r = run_scenario(&s, &kernel, guest.as_deref());
                match &r {
                    Ok(t) => eprintln!("PASS {} ({:.1}s): {}", s.name, t.as_secs_f64(), s.about),
                    Err(e) => eprintln!("FAIL {}: {}\n  {e}", s.name, s.about),
                }
                results.lock().unwrap().push((s.name.clone(), r));
            });
        }
    });
    for (name, r) in results.into_inner().unwrap() {
        match r {
            Ok(_) => tally.passed += 1,
            Err(e) => {
                tally.failed += 1;
                tally.failures.push(format!(
                    "scenario {name}: {}",
                    e.lines().next().unwrap_or("")
                ));
            }
        }
    }
    Ok(())
}

/// Entry of `cargo xtask test`.
pub fn cmd_test(a: TestArgs) -> Result<()> {
    let TestArgs {
        pattern,
        matrix,
        no_host,
        no_qemu,
        jobs,
    } = a;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let jobs = jobs.unwrap_or(cores);
    let start = Instant::now();
    setup::ensure()?;
    let mut tally = Tally::default();
    if !no_host && pattern.is_none() {
        host_tests(&mut tally);
        lint_checks(&mut tally);
    }
    if !no_qemu && let Err(e) = scenarios(pattern.as_deref(), matrix, jobs.max(1), &mut tally) {
        tally.failed += 1;
        tally.failures.push(format!("scenarios could not run: {e}"));
    }
    if !tally.failures.is_empty() {
        eprintln!("\nfailures:");
        for f in &tally.failures {
            eprintln!("  {f}");
        }
    }
    eprintln!("xtask: total time {:.1}s", start.elapsed().as_secs_f64());
    println!("{} passed, {} failed", tally.passed, tally.failed);
    if tally.failed > 0 {
        Err(format!("{} failed", tally.failed).into())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn a_check_counts_as_one_test() {
        let mut t = Tally::default();
        run_check("ok", sh("exit 0"), &mut t);
        run_check("bad", sh("echo diff; exit 1"), &mut t);
        run_check("missing", Command::new("/nonexistent/tool"), &mut t);
        assert_eq!((t.passed, t.failed), (1, 2));
        assert!(t.failures[0].starts_with("bad: failed with"));
        assert!(t.failures[1].starts_with("missing: cannot run"));
    }
}
