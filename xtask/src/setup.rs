//! Checks for the tools Moat needs and installs what is missing (Debian packages with apt-get,
//! the Rust target with rustup, and for fuzzing the nightly toolchain and cargo-fuzz), saying
//! what it does; prints the exact command when it cannot. The only module that installs
//! anything: `run`, `test`, `bench` and `fuzz` call it.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::{run_status, Result};

/// Something the build or the runner needs, how to tell it is there, and the Debian package
/// that provides it.
struct Need {
    what: &'static str,
    found: Found,
    package: &'static str,
}

/// How [`ensure`] tells a [`Need`] is there.
enum Found {
    /// One of these commands is on `PATH`.
    Command(&'static [&'static str]),
    /// This file exists.
    File(&'static str),
}

impl Need {
    const fn new(what: &'static str, found: Found, package: &'static str) -> Self {
        Need {
            what,
            found,
            package,
        }
    }

    fn present(&self) -> bool {
        match self.found {
            Found::Command(cmds) => cmds.iter().any(|c| on_path(c)),
            Found::File(path) => Path::new(path).exists(),
        }
    }
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
}

/// OVMF firmware image used for UEFI boots.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";

/// The plugin of Bochs's `term` display library (package `bochs-term`).
const BOCHS_TERM_PLUGIN: &str = "/usr/lib/x86_64-linux-gnu/bochs/plugins/libbx_term_gui.so";

const NEEDS: &[Need] = &[
    Need::new(
        "qemu-system-x86_64",
        Found::Command(&["qemu-system-x86_64"]),
        "qemu-system-x86",
    ),
    Need::new(
        "grub-mkrescue",
        Found::Command(&["grub-mkrescue"]),
        "grub-common",
    ),
    Need::new(
        "GRUB BIOS modules",
        Found::File("/usr/lib/grub/i386-pc/multiboot2.mod"),
        "grub-pc-bin",
    ),
    Need::new(
        "GRUB UEFI modules",
        Found::File("/usr/lib/grub/x86_64-efi/multiboot2.mod"),
        "grub-efi-amd64-bin",
    ),
    Need::new("xorriso", Found::Command(&["xorriso"]), "xorriso"),
    Need::new("mformat (mtools)", Found::Command(&["mformat"]), "mtools"),
    Need::new("OVMF firmware", Found::File(OVMF_CODE), "ovmf"),
    Need::new(
        "bochs (an emulated Intel CPU with VMX, for the bochs-* scenarios)",
        Found::Command(&["bochs"]),
        "bochs",
    ),
    Need::new(
        "the Bochs BIOS",
        Found::File(moat_scenarios::bochs::BOCHS_BIOS),
        "bochsbios",
    ),
    Need::new(
        "the Bochs VGA BIOS",
        Found::File(moat_scenarios::bochs::BOCHS_VGABIOS),
        "vgabios",
    ),
    Need::new(
        "Bochs's term display (it has no headless one)",
        Found::File(BOCHS_TERM_PLUGIN),
        "bochs-term",
    ),
    // libFuzzer (C++) is built by the fuzz workspaces, whose regression replays
    // `cargo xtask test` runs on stable.
    Need::new(
        "a C++ compiler (g++)",
        Found::Command(&["g++", "c++"]),
        "g++",
    ),
];

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Makes sure every Debian package and the Rust target are there.
pub fn ensure() -> Result<()> {
    let missing: Vec<&Need> = NEEDS.iter().filter(|n| !n.present()).collect();
    if !missing.is_empty() {
        let mut pkgs: Vec<&str> = missing.iter().map(|n| n.package).collect();
        pkgs.dedup();
        let what: Vec<&str> = missing.iter().map(|n| n.what).collect();
        let cmd = format!(
            "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y {}",
            pkgs.join(" ")
        );
        if !is_root() || !on_path("apt-get") {
            return Err(format!(
                "missing: {}. Install them with:\n    sudo sh -c '{cmd}'",
                what.join(", ")
            )
            .into());
        }
        eprintln!(
            "xtask: missing {}; installing Debian packages: {}",
            what.join(", "),
            pkgs.join(" ")
        );
        eprintln!("xtask: running: {cmd}");
        run_status(
            Command::new("apt-get")
                .args(["update", "-q"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .map_err(|e| format!("apt-get update failed ({e}); run by hand: {cmd}"))?;
        run_status(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&pkgs)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .map_err(|e| format!("apt-get install failed ({e}); run by hand: {cmd}"))?;
        let still: Vec<&str> = NEEDS
            .iter()
            .filter(|n| !n.present())
            .map(|n| n.what)
            .collect();
        if !still.is_empty() {
            return Err(format!("still missing after install: {}", still.join(", ")).into());
        }
    }
    check_rustc();
    ensure_rust_target()
}

/// The compiler version the workspace pins (`[workspace.metadata.moat] rustc` in Cargo.toml).
fn pinned_rustc() -> Option<String> {
    let manifest = std::fs::read_to_string(crate::root().join("Cargo.toml")).ok()?;
    let section = manifest.split("[workspace.metadata.moat]").nth(1)?;
    let line = section
        .lines()
        .find(|l| l.trim_start().starts_with("rustc"))?;
    Some(line.split('"').nth(1)?.to_string())
}

/// The version of the compiler cargo runs (`rustc 1.95.0 (...)` -> `1.95.0`).
pub fn rustc_version() -> Option<String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.split_whitespace().nth(1)?.to_string())
}

/// Says when the compiler is not the pinned one: builds still work (the code needs 1.88), but
/// benchmark figures are only comparable with the README's when built by the same compiler.
fn check_rustc() {
    let (Some(pinned), Some(have)) = (pinned_rustc(), rustc_version()) else {
        return;
    };
    if pinned != have {
        eprintln!(
            "xtask: note: rustc {have} is not the pinned {pinned} (Cargo.toml \
             [workspace.metadata.moat]); everything builds, but benchmark figures are only \
             comparable with the README's when made with {pinned}: \
             `rustup toolchain install {pinned}` and `cargo +{pinned} xtask ...`"
        );
    }
}

fn ensure_rust_target() -> Result<()> {
    const TARGET: &str = "x86_64-unknown-none";
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    let Ok(out) = out else {
        // No rustup: trust the toolchain (the build will say if the target is missing).
        return Ok(());
    };
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == TARGET)
    {
        return Ok(());
    }
    eprintln!("xtask: installing the Rust target: rustup target add {TARGET}");
    run_status(Command::new("rustup").args(["target", "add", TARGET]))
        .map_err(|e| format!("rustup target add {TARGET} failed ({e}); run it by hand").into())
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// `cargo +nightly` without the toolchain variables xtask itself was started with (they name
/// the pinned stable toolchain and would override `+nightly`).
pub fn nightly_cargo() -> Command {
    let mut c = Command::new("cargo");
    c.arg("+nightly");
    for v in [
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
    ] {
        c.env_remove(v);
    }
    c
}

fn has_nightly() -> bool {
    Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("nightly"))
        })
        .unwrap_or(false)
}

fn has_cargo_fuzz() -> bool {
    nightly_cargo()
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Installs what `cargo xtask fuzz` needs when missing (the nightly toolchain, used for
/// fuzzing only, and cargo-fuzz), saying so.
pub fn ensure_fuzz_tools() -> Result<()> {
    if !has_nightly() {
        let cmd = "rustup toolchain install nightly --profile minimal";
        eprintln!(
            "xtask: the nightly toolchain is missing (used for fuzzing only); running: {cmd}"
        );
        run_status(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .map_err(|e| format!("{e}; run by hand: {cmd}"))?;
    }
    if !has_cargo_fuzz() {
        let cmd = "cargo install cargo-fuzz --locked";
        eprintln!("xtask: cargo-fuzz is missing; running: {cmd}");
        run_status(Command::new(cargo()).current_dir(crate::root()).args([
            "install",
            "cargo-fuzz",
            "--locked",
        ]))
        .map_err(|e| format!("{e}; run by hand: {cmd}"))?;
        if !has_cargo_fuzz() {
            return Err(
                "cargo-fuzz still does not run after installing it (is ~/.cargo/bin on PATH?)"
                    .into(),
            );
        }
    }
    Ok(())
}
