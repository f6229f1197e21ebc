//! `cargo xtask`: Moat's build, ISO, QEMU runner, test harness and benchmarks.
//!
//! ```text
//! cargo xtask build [--selftest]                 build the kernel (x86_64-unknown-none)
//! cargo xtask iso [--selftest] [-- CMDLINE]      build and make a GRUB ISO (BIOS + UEFI)
//! cargo xtask run [--uefi] [--smp N] [--gdb] [-- CMDLINE]
//!                                                boot Moat in QEMU (q35 + intel-iommu + edu)
//! cargo xtask test [PATTERN] [--no-host] [--no-qemu] [-j N]
//!                                                host tests + QEMU scenarios; ends "N passed, N failed"
//! cargo xtask bench iova|dma [--quick]           IOVA allocator against peers; PV DMA per policy
//! cargo xtask fuzz [--time S] [TARGET]           fuzz every target (or one) S seconds each
//!                                                (default 60; nightly + cargo-fuzz installed)
//! cargo xtask setup                              install what is missing, nothing else
//! ```

mod bench_dma;
mod fuzz;
mod qemu;
mod setup;
mod test;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use moat_scenarios::{Exit, Firmware};

/// Errors carry a message for the user.
pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs a command, failing on a non-zero status.
pub fn run_status(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed with {status}").into())
    }
}

/// Which kernel flavour to build.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// The normal kernel.
    Release,
    /// With test hooks (`selftest=`), used by the scenarios.
    Selftest,
}

/// Builds bare-metal binary `bin` of `package` (release, x86_64-unknown-none, with `features`)
/// and copies it to `target/xtask/<out>` (so the two kernel flavours do not overwrite each
/// other). Returns the copy's path.
fn build_bare(
    what: &str,
    package: &str,
    bin: &str,
    features: &[&str],
    profile: &str,
    out: &str,
) -> Result<PathBuf> {
    let root = root();
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(&root).args([
        "build",
        "--quiet",
        "--profile",
        profile,
        "-p",
        package,
        "--target",
        "x86_64-unknown-none",
    ]);
    for f in features {
        cmd.args(["--features", f]);
    }
    eprintln!("xtask: building {what}");
    run_status(&mut cmd)?;
    let built = root
        .join("target/x86_64-unknown-none")
        .join(profile)
        .join(bin);
    let out_dir = root.join("target/xtask");
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join(out);
    std::fs::copy(&built, &out).map_err(|e| format!("{}: {e}", built.display()))?;
    Ok(out)
}

/// Cargo profile of the kernel the scenarios run: `release` with overflow checks (see the
/// workspace Cargo.toml), so an arithmetic overflow a guest can reach panics in the tests
/// instead of wrapping silently. The `overflow` scenario checks that it does.
pub const SCENARIO_PROFILE: &str = "scenario";

/// Builds the kernel and returns the path of a private copy of the ELF.
pub fn build_kernel(flavour: Flavour) -> Result<PathBuf> {
    match flavour {
        Flavour::Selftest => build_bare(
            "the kernel (selftest, overflow checks)",
            "moat-kernel",
            "moat",
            &["selftest"],
            SCENARIO_PROFILE,
            "moat-selftest.elf",
        ),
        Flavour::Release => build_bare(
            "the kernel (release)",
            "moat-kernel",
            "moat",
            &[],
            "release",
            "moat.elf",
        ),
    }
}

/// Makes a GRUB rescue ISO (BIOS and UEFI) booting `kernel` with `cmdline`, named `name`.
pub fn make_iso(kernel: &Path, cmdline: &str, name: &str) -> Result<PathBuf> {
    make_iso_with_modules(kernel, cmdline, &[], name)
}

/// Builds the test guest (`tests/guest`) and returns the path of a private copy of its ELF.
pub fn build_test_guest() -> Result<PathBuf> {
    build_bare(
        "the test guest",
        "moat-test-guest",
        "moat-test-guest",
        &[],
        "release",
        moat_scenarios::TEST_GUEST,
    )
}

/// As [`make_iso`], plus boot modules: each `(file, cmdline)` becomes
/// `module2 /boot/<file name> <cmdline>` (files are copied once into `/boot`).
pub fn make_iso_with_modules(
    kernel: &Path,
    cmdline: &str,
    modules: &[(PathBuf, String)],
    name: &str,
) -> Result<PathBuf> {
    let base = root().join("target/xtask/iso");
    let dir = base.join(name);
    let grub = dir.join("boot/grub");
    std::fs::create_dir_all(&grub)?;
    std::fs::copy(kernel, dir.join("boot/moat.elf"))?;
    let mut module_lines = String::new();
    for (file, args) in modules {
        let file_name = file
            .file_name()
            .ok_or_else(|| format!("module {} has no file name", file.display()))?
            .to_string_lossy()
            .into_owned();
        std::fs::copy(file, dir.join("boot").join(&file_name))
            .map_err(|e| format!("{}: {e}", file.display()))?;
        module_lines.push_str(&format!("  module2 /boot/{file_name} {args}\n"));
    }
    std::fs::write(
        grub.join("grub.cfg"),
        format!(
            "set timeout=0\nset default=0\nserial --unit=0 --speed=115200\n\
             terminal_input serial console\nterminal_output serial console\n\
             menuentry \"Moat\" {{\n  multiboot2 /boot/moat.elf {cmdline}\n{module_lines}  boot\n}}\n"
        ),
    )?;
    let iso = base.join(format!("{name}.iso"));
    let out = Command::new("grub-mkrescue")
        .arg("-o")
        .arg(&iso)
        .arg(&dir)
        .output()
        .map_err(|e| format!("cannot run grub-mkrescue: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "grub-mkrescue failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(iso)
}

struct Args {
    rest: Vec<String>,
    cmdline: Vec<String>,
}

impl Args {
    fn parse(args: Vec<String>) -> Args {
        let (rest, cmdline) = match args.iter().position(|a| a == "--") {
            Some(i) => (args[..i].to_vec(), args[i + 1..].to_vec()),
            None => (args, vec![]),
        };
        Args { rest, cmdline }
    }

    fn flag(&mut self, name: &str) -> bool {
        match self.rest.iter().position(|a| a == name) {
            Some(i) => {
                self.rest.remove(i);
                true
            }
            None => false,
        }
    }

    fn value(&mut self, names: &[&str]) -> Result<Option<String>> {
        match self.rest.iter().position(|a| names.contains(&a.as_str())) {
            Some(i) if i + 1 < self.rest.len() => {
                let v = self.rest.remove(i + 1);
                self.rest.remove(i);
                Ok(Some(v))
            }
            Some(_) => Err(format!("{} needs a value", names[0]).into()),
            None => Ok(None),
        }
    }

    fn finish(self) -> Result<Vec<String>> {
        if let Some(bad) = self.rest.iter().find(|a| a.starts_with('-')) {
            return Err(format!("unknown option {bad}\n\n{USAGE}").into());
        }
        Ok(self.rest)
    }
}

const USAGE: &str = "usage:
  cargo xtask build [--selftest]
  cargo xtask iso [--selftest] [-- CMDLINE]
  cargo xtask run [--uefi] [--smp N] [--gdb] [--timeout SECS] [-- CMDLINE]
  cargo xtask test [PATTERN] [--no-host] [--no-qemu] [-j N]
  cargo xtask bench iova|dma [--quick]
  cargo xtask fuzz [--time SECS] [TARGET]
  cargo xtask setup";

fn main() -> ExitCode {
    let mut argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.is_empty() {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    let cmd = argv.remove(0);
    let args = Args::parse(argv);
    let r = match cmd.as_str() {
        "build" => cmd_build(args),
        "iso" => cmd_iso(args),
        "run" => cmd_run(args),
        "test" => test::cmd_test(args.rest, args.cmdline),
        "bench" => cmd_bench(args),
        "fuzz" => cmd_fuzz(args),
        "setup" => setup::ensure(),
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command `{other}`\n\n{USAGE}").into()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn cmd_build(mut a: Args) -> Result<()> {
    let flavour = if a.flag("--selftest") {
        Flavour::Selftest
    } else {
        Flavour::Release
    };
    a.finish()?;
    setup::ensure()?;
    let k = build_kernel(flavour)?;
    println!("{}", k.display());
    Ok(())
}

fn cmd_iso(mut a: Args) -> Result<()> {
    let flavour = if a.flag("--selftest") {
        Flavour::Selftest
    } else {
        Flavour::Release
    };
    let cmdline = a.cmdline.join(" ");
    a.finish()?;
    setup::ensure()?;
    let k = build_kernel(flavour)?;
    let iso = make_iso(&k, &cmdline, "moat")?;
    println!("{}", iso.display());
    Ok(())
}

fn cmd_run(mut a: Args) -> Result<()> {
    let uefi = a.flag("--uefi");
    let gdb = a.flag("--gdb");
    let smp: u32 = match a.value(&["--smp"])? {
        Some(v) => v
            .parse()
            .map_err(|_| format!("--smp wants a number, got `{v}`"))?,
        None => 2,
    };
    if !(1..=64).contains(&smp) {
        return Err(format!("--smp {smp}: between 1 and 64").into());
    }
    let timeout: u64 = match a.value(&["--timeout"])? {
        Some(v) => v
            .parse()
            .map_err(|_| format!("--timeout wants seconds, got `{v}`"))?,
        None => 120,
    };
    let user_cmdline = a.cmdline.join(" ");
    a.finish()?;
    setup::ensure()?;
    let kernel = build_kernel(Flavour::Release)?;
    let mut demo = moat_scenarios::demo(if uefi { Firmware::Uefi } else { Firmware::Bios }, smp);
    if !user_cmdline.is_empty() {
        demo.cmdline = format!("{} {user_cmdline}", demo.cmdline);
    }
    let modules = module_files(&demo.modules)?;
    let iso = make_iso_with_modules(&kernel, &demo.cmdline, &modules, "run")?;
    let mut args = demo
        .machine
        .qemu_args(&iso.to_string_lossy(), setup::OVMF_CODE);
    let limit = if gdb {
        args.extend(["-s".to_string(), "-S".to_string()]);
        eprintln!(
            "xtask: QEMU waits for a debugger on localhost:1234:\n    gdb {} -ex 'target remote :1234'",
            kernel.display()
        );
        Duration::from_secs(24 * 3600)
    } else {
        Duration::from_secs(timeout)
    };
    eprintln!("xtask: qemu-system-x86_64 {}", args.join(" "));
    let log = root().join("target/xtask/run.log");
    let r = qemu::run(&args, &log, true, limit)?;
    eprintln!(
        "xtask: QEMU ended: {} after {:.1}s (serial log: {})",
        r.exit,
        r.elapsed.as_secs_f64(),
        log.display()
    );
    if r.exit != Exit::Success {
        if !r.stderr.trim().is_empty() {
            eprintln!("xtask: QEMU stderr:\n{}", r.stderr.trim_end());
        }
        return Err(format!("the run did not succeed: {}", r.exit).into());
    }
    (demo.check)(&r.serial).map_err(|e| format!("the demo did not show what it should: {e}"))?;
    Ok(())
}

/// Resolves a scenario's boot modules to files, building the test guest if one is used.
pub fn module_files(modules: &[moat_scenarios::BootModule]) -> Result<Vec<(PathBuf, String)>> {
    let mut guest = None;
    let mut out = Vec::new();
    for m in modules {
        if m.file != moat_scenarios::TEST_GUEST {
            return Err(format!("unknown boot module file `{}`", m.file).into());
        }
        if guest.is_none() {
            guest = Some(build_test_guest()?);
        }
        out.push((guest.clone().unwrap_or_default(), m.cmdline.clone()));
    }
    Ok(out)
}

fn cmd_fuzz(mut a: Args) -> Result<()> {
    let secs = match a.value(&["--time"])? {
        Some(v) => Some(
            v.parse::<u64>()
                .ok()
                .filter(|&s| s > 0)
                .ok_or_else(|| format!("--time wants seconds (> 0), got `{v}`"))?,
        ),
        None => None,
    };
    let rest = a.finish()?;
    fuzz::cmd_fuzz(rest, secs)
}

fn cmd_bench(mut a: Args) -> Result<()> {
    let quick = a.flag("--quick");
    let rest = a.finish()?;
    match rest.first().map(String::as_str) {
        Some("iova") => {
            let json = root().join("target/bench/iova.json");
            let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            cmd.current_dir(root()).args([
                "run",
                "--quiet",
                "--release",
                "-p",
                "moat-iova-bench",
                "--",
            ]);
            if quick {
                cmd.arg("--quick");
            }
            cmd.arg("--json").arg(&json);
            run_status(&mut cmd)?;
            eprintln!("xtask: wrote {}", json.display());
            Ok(())
        }
        Some("dma") => bench_dma::run(quick),
        _ => Err(format!("bench what? `iova` or `dma`\n\n{USAGE}").into()),
    }
}
