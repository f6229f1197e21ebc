//! `cargo xtask`: Moat's build, ISO, QEMU runner, test harness and benchmarks.
//!
//! ```text
//! cargo xtask build [--selftest]                 build the kernel (x86_64-unknown-none)
//! cargo xtask iso [--selftest] [-- CMDLINE]      build and make a GRUB ISO (BIOS + UEFI)
//! cargo xtask run [--uefi|--bochs] [--smp N] [--gdb] [--timeout SECS] [-- CMDLINE]
//!                                                boot Moat in QEMU (q35 + intel-iommu + edu),
//!                                                or in Bochs (Intel CPU with VMX)
//! cargo xtask test [PATTERN] [--matrix] [--no-host] [--no-qemu] [-j N]
//!                                                host tests, fmt + clippy, QEMU scenarios;
//!                                                ends "N passed, N failed"
//! cargo xtask bench iova|dma|nvme [--quick]      IOVA allocator against peers; PV DMA per policy; NVMe per policy
//!                  [--vcpus 1,2]                 (dma: on 1 and 2 vCPUs of one guest at once)
//!                  [--icount]                    (dma, nvme: instructions as time, load-independent)
//! cargo xtask bench plot                          redraw the SVGs from target/bench/*.json
//! cargo xtask fuzz [--time SECS] [TARGET]        fuzz every target (or one) SECS seconds each
//!                                                (default 60; nightly + cargo-fuzz installed)
//! cargo xtask setup                              install what is missing, nothing else
//! ```
//!
//! The command line is `cli.rs` (`cargo xtask --help`, `cargo xtask <command> --help`).
#![forbid(unsafe_code)]

mod bench_dma;
mod bench_nvme;
mod bench_row;
mod bochs;
mod cli;
mod fuzz;
mod plots;
mod qemu;
mod setup;
mod test;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use clap::Parser as _;
use moat_scenarios::{Exit, Firmware};

use cli::{Bench, Cmd, RunArgs};

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

/// Builds the test guest (`guest/test`) and returns the path of a private copy of its ELF.
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
            "set timeout=0\nset default=0\ninsmod all_video\nset gfxpayload=1024x768x32,800x600x32,auto\nserial --unit=0 --speed=115200\n\
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

fn main() -> ExitCode {
    // Bad arguments: clap prints the error and the usage and exits with status 2.
    let cli = cli::Cli::parse();
    let r = match cli.cmd {
        Cmd::Build { selftest } => cmd_build(selftest),
        Cmd::Iso { selftest, cmdline } => cmd_iso(selftest, &cmdline),
        Cmd::Run(a) => cmd_run(a),
        Cmd::Test(a) => test::cmd_test(a),
        Cmd::Bench {
            what,
            quick,
            vcpus,
            icount,
        } => cmd_bench(what, quick, &vcpus, icount),
        Cmd::Fuzz { time, target } => fuzz::cmd_fuzz(target.as_deref(), time),
        Cmd::Setup => setup::ensure(),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn flavour(selftest: bool) -> Flavour {
    if selftest {
        Flavour::Selftest
    } else {
        Flavour::Release
    }
}

fn cmd_build(selftest: bool) -> Result<()> {
    setup::ensure()?;
    let k = build_kernel(flavour(selftest))?;
    println!("{}", k.display());
    Ok(())
}

fn cmd_iso(selftest: bool, cmdline: &[String]) -> Result<()> {
    setup::ensure()?;
    let k = build_kernel(flavour(selftest))?;
    let iso = make_iso(&k, &cmdline.join(" "), "moat")?;
    println!("{}", iso.display());
    Ok(())
}

fn cmd_run(a: RunArgs) -> Result<()> {
    let RunArgs {
        uefi,
        bochs,
        smp,
        gdb,
        timeout,
        cmdline,
    } = a;
    let user_cmdline = cmdline.join(" ");
    setup::ensure()?;
    let kernel = build_kernel(Flavour::Release)?;
    let mut demo = if bochs {
        moat_scenarios::bochs::demo(smp)
    } else {
        moat_scenarios::demo(if uefi { Firmware::Uefi } else { Firmware::Bios }, smp)
    };
    if !user_cmdline.is_empty() {
        demo.cmdline = format!("{} {user_cmdline}", demo.cmdline);
    }
    let modules = module_files(&demo.modules)?;
    let iso = make_iso_with_modules(&kernel, &demo.cmdline, &modules, "run")?;
    if let Some(machine) = &demo.bochs {
        let dir = root().join("target/xtask/bochs-run");
        let log = root().join("target/xtask/run.log");
        eprintln!(
            "xtask: bochs -q -f {}/bochsrc (files in {})",
            dir.display(),
            dir.display()
        );
        let r = bochs::run(
            machine,
            &iso,
            &dir,
            &log,
            true,
            Duration::from_secs(timeout),
        )?;
        return demo_outcome("Bochs", "Bochs log", &r, &log, &demo);
    }
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
    demo_outcome("QEMU", "QEMU stderr", &r, &log, &demo)
}

/// Says how the demo's run on `emulator` ended and checks what it printed: an error if it
/// did not succeed (with the emulator's own output, `stderr_name`) or did not show what the
/// demo must.
fn demo_outcome(
    emulator: &str,
    stderr_name: &str,
    r: &qemu::RunResult,
    log: &Path,
    demo: &moat_scenarios::Scenario,
) -> Result<()> {
    eprintln!(
        "xtask: {emulator} ended: {} after {:.1}s (serial log: {})",
        r.exit,
        r.elapsed.as_secs_f64(),
        log.display()
    );
    if r.exit != Exit::Success {
        if !r.stderr.trim().is_empty() {
            eprintln!("xtask: {stderr_name}:\n{}", r.stderr.trim_end());
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

fn cmd_bench(what: Bench, quick: bool, vcpus: &[u32], icount: bool) -> Result<()> {
    if icount && !matches!(what, Bench::Dma | Bench::Nvme) {
        return Err("--icount is for `bench dma` and `bench nvme` only".into());
    }
    eprintln!(
        "xtask: benchmark built with rustc {}",
        setup::rustc_version().unwrap_or_else(|| "(unknown)".into())
    );
    match what {
        Bench::Iova => {
            // The IOVA benchmark is a host program (`bench/iova`); it writes the JSON.
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
        Bench::Dma => bench_dma::run(quick, vcpus, icount),
        Bench::Nvme => bench_nvme::run(quick, icount),
        Bench::Plot => plots::redraw(),
    }
}
