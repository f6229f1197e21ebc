//! The command line (clap derive): one variant per subcommand, each with its own `--help`.

use clap::{Args, Parser, Subcommand};

/// Moat's build, ISO, QEMU runner, test harness and benchmarks.
///
/// `run`, `test`, `bench` and `fuzz` install what is missing (Debian packages with apt-get when
/// run as root, the Rust target, the fuzzing tools), saying what they do; `setup` does only that.
#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    arg_required_else_help = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Build the kernel (x86_64-unknown-none) -> target/xtask/moat.elf
    Build {
        /// The kernel with test hooks and overflow checks, as the scenarios run it
        /// (-> target/xtask/moat-selftest.elf)
        #[arg(long)]
        selftest: bool,
    },
    /// Build the kernel and make a GRUB rescue ISO (BIOS + UEFI) -> target/xtask/iso/moat.iso
    Iso {
        /// The kernel with test hooks and overflow checks
        #[arg(long)]
        selftest: bool,
        /// The kernel command line
        #[arg(last = true, value_name = "CMDLINE")]
        cmdline: Vec<String>,
    },
    /// Boot Moat in QEMU (q35 + intel-iommu + edu) with the demo guest; exit 0 when the demo is done
    Run(RunArgs),
    /// Host tests, fmt and clippy checks, and the QEMU scenarios; ends with "N passed, N failed"
    Test(TestArgs),
    /// Benchmarks: the IOVA allocator against its peers, or paravirtual DMA per policy
    Bench {
        #[command(subcommand)]
        what: Bench,
        /// Fewer operations (a quick look, not a figure)
        #[arg(long, global = true)]
        quick: bool,
        /// vCPU counts to run the DMA benchmark on, one guest each (e.g. `1,2`)
        #[arg(long, global = true, value_delimiter = ',', default_value = "1",
              value_parser = clap::value_parser!(u32).range(1..=4))]
        vcpus: Vec<u32>,
        /// DMA and NVMe benchmarks only: instructions as time (QEMU `-icount shift=0`,
        /// single-threaded TCG), so the figures are path lengths that host load does not change;
        /// the vCPUs of a guest then take turns, so its vCPU scaling means nothing
        #[arg(long, global = true)]
        icount: bool,
    },
    /// Fuzz every cargo-fuzz target (or one) for SECS seconds each (nightly + cargo-fuzz,
    /// installed when missing)
    Fuzz {
        /// Seconds per target
        #[arg(long, value_name = "SECS", default_value_t = 60,
              value_parser = clap::value_parser!(u64).range(1..))]
        time: u64,
        /// Only this target (decode, codecs, dma_state)
        #[arg(value_name = "TARGET")]
        target: Option<String>,
    },
    /// Install what is missing (Debian packages, the Rust target), nothing else
    Setup,
}

/// `cargo xtask run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Boot with OVMF (UEFI) instead of SeaBIOS
    #[arg(long, conflicts_with = "bochs")]
    pub uefi: bool,
    /// Boot under Bochs instead (an Intel CPU with VMX; no IOMMU, no edu device)
    #[arg(long, conflicts_with = "gdb")]
    pub bochs: bool,
    /// Number of CPUs
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub smp: u32,
    /// Make QEMU wait for a debugger on localhost:1234
    #[arg(long)]
    pub gdb: bool,
    /// Stop QEMU after SECS seconds (not with --gdb)
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub timeout: u64,
    /// Appended to the hypervisor's command line
    #[arg(last = true, value_name = "CMDLINE")]
    pub cmdline: Vec<String>,
}

/// `cargo xtask test`.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// Run only the QEMU scenarios whose name contains PATTERN (no host tests)
    #[arg(value_name = "PATTERN")]
    pub pattern: Option<String>,
    /// Also rerun the guest, VT-d and DMA scenarios on the second machine (OVMF, 4 CPUs, EPYC,
    /// aw-bits=48, caching-mode=on)
    #[arg(long)]
    pub matrix: bool,
    /// Skip the host tests, the loom models and the fmt and clippy checks
    #[arg(long)]
    pub no_host: bool,
    /// Skip the QEMU scenarios
    #[arg(long)]
    pub no_qemu: bool,
    /// Scenarios run at a time [default: the number of cores]
    #[arg(short = 'j', long = "jobs", value_name = "N")]
    pub jobs: Option<usize>,
}

/// What `cargo xtask bench` measures.
#[derive(Debug, Subcommand, PartialEq, Eq, Clone, Copy)]
pub enum Bench {
    /// The IOVA allocator against its peers (-> target/bench/iova.json)
    Iova,
    /// The paravirtual DMA path, one QEMU run per policy (-> target/bench/dma.json)
    Dma,
    /// NVMe reads per policy and vCPU count (-> target/bench/nvme.json and nvme.svg)
    Nvme,
    /// Redraw the SVG plots from the JSON files in target/bench (dma, nvme)
    Plot,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(line: &str) -> Result<Cmd, clap::Error> {
        Cli::try_parse_from(std::iter::once("xtask").chain(line.split_whitespace())).map(|c| c.cmd)
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_flags() {
        let Ok(Cmd::Test(t)) = parse("test --matrix") else {
            panic!()
        };
        assert!(t.matrix && !t.no_host && !t.no_qemu && t.pattern.is_none() && t.jobs.is_none());
        let Ok(Cmd::Test(t)) = parse("test boot --no-host -j 3") else {
            panic!()
        };
        assert_eq!(
            (t.pattern.as_deref(), t.no_host, t.jobs),
            (Some("boot"), true, Some(3))
        );
        let Ok(Cmd::Test(t)) = parse("test --no-qemu --jobs 1") else {
            panic!()
        };
        assert_eq!((t.no_qemu, t.jobs), (true, Some(1)));
        assert!(parse("test --bogus").is_err());
        assert!(parse("test -j").is_err());
        assert!(parse("test -j x").is_err());
        assert!(parse("test a b").is_err());
    }

    #[test]
    fn run_flags() {
        let Ok(Cmd::Run(r)) = parse("run") else {
            panic!()
        };
        assert_eq!((r.uefi, r.smp, r.gdb, r.timeout), (false, 2, false, 120));
        assert!(!r.bochs);
        let Ok(Cmd::Run(r)) = parse("run --bochs --smp 1") else {
            panic!()
        };
        assert!(r.bochs && r.smp == 1);
        assert!(parse("run --bochs --uefi").is_err());
        assert!(parse("run --bochs --gdb").is_err());
        assert!(r.cmdline.is_empty());
        let Ok(Cmd::Run(r)) = parse("run --uefi --smp 4 --gdb --timeout 9 -- log=debug x=1") else {
            panic!()
        };
        assert_eq!((r.uefi, r.smp, r.gdb, r.timeout), (true, 4, true, 9));
        assert_eq!(r.cmdline, ["log=debug", "x=1"]);
        assert!(parse("run --smp 0").is_err());
        assert!(parse("run --smp 65").is_err());
        assert!(parse("run log=debug").is_err());
    }

    #[test]
    fn build_iso_bench_fuzz() {
        assert!(matches!(parse("build"), Ok(Cmd::Build { selftest: false })));
        assert!(matches!(
            parse("build --selftest"),
            Ok(Cmd::Build { selftest: true })
        ));
        let Ok(Cmd::Iso { selftest, cmdline }) = parse("iso --selftest -- a b") else {
            panic!()
        };
        assert!(selftest);
        assert_eq!(cmdline, ["a", "b"]);
        for (line, what, q) in [
            ("bench dma", Bench::Dma, false),
            ("bench iova --quick", Bench::Iova, true),
            ("bench --quick dma", Bench::Dma, true),
            ("bench nvme", Bench::Nvme, false),
        ] {
            let Ok(Cmd::Bench { what: w, quick, .. }) = parse(line) else {
                panic!("{line}")
            };
            assert_eq!((w, quick), (what, q), "{line}");
        }
        let Ok(Cmd::Bench { vcpus, .. }) = parse("bench dma --vcpus 1,2") else {
            panic!("--vcpus")
        };
        assert_eq!(vcpus, [1, 2]);
        let Ok(Cmd::Bench { vcpus, .. }) = parse("bench dma") else {
            panic!("default vcpus")
        };
        assert_eq!(vcpus, [1]);
        assert!(parse("bench dma --vcpus 0").is_err());
        let Ok(Cmd::Bench { icount, .. }) = parse("bench dma --icount") else {
            panic!("--icount")
        };
        assert!(icount);
        assert!(parse("bench").is_err());
        assert!(parse("bench gpu").is_err());
        let Ok(Cmd::Fuzz { time, target }) = parse("fuzz") else {
            panic!()
        };
        assert_eq!((time, target), (60, None));
        let Ok(Cmd::Fuzz { time, target }) = parse("fuzz --time 5 decode") else {
            panic!()
        };
        assert_eq!((time, target.as_deref()), (5, Some("decode")));
        assert!(parse("fuzz --time 0").is_err());
        assert!(parse("fuzz a b").is_err());
        assert!(matches!(parse("setup"), Ok(Cmd::Setup)));
        assert!(parse("").is_err());
        assert!(parse("frobnicate").is_err());
    }
}
