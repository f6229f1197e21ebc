//! `cargo xtask bench nvme`: end-to-end NVMe reads per protection policy. QEMU's `nvme`
//! device (behind intel-iommu) on a sparse image under `target/bench/`, assigned to the test
//! guest, which reads through one queue pair per vCPU (`nvme-bench`: random 4 KiB at queue
//! depth 1 and 32, sequential 64 KiB at queue depth 32) with every data buffer mapped per
//! I/O through the PV DMA hypercalls (passthrough: IOVA = GPA, no calls). One QEMU run per
//! policy and vCPU count (1, 2). Emulated (QEMU TCG) figures: the ratios are the result.

use moat_scenarios::Machine;
use serde::{Deserialize, Serialize};

use crate::bench_row::{
    emulated, env_policies, env_rounds, extra_qemu_args, median, median_runs, parse_fields,
    run_guest, write_json, Phases,
};
use crate::{build_kernel, root, setup, Flavour, Result};

/// One measured cell: a row of the printed table and an element of `target/bench/nvme.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Row {
    pub(crate) policy: String,
    pub(crate) workload: String,
    pub(crate) qd: u64,
    pub(crate) vcpus: u64,
    pub(crate) iops: f64,
    /// IOPS / passthrough IOPS for the same workload, depth and vCPUs.
    #[serde(default)]
    pub(crate) ratio: f64,
    pub(crate) invalidations_per_io: f64,
    pub(crate) exits_per_io: f64,
    pub(crate) waits_per_io: f64,
    pub(crate) ns_per_io: f64,
    /// I/Os per poll cycle (one call per cycle; none under passthrough).
    #[serde(default)]
    pub(crate) ios_per_cycle: f64,
    /// Share of the vCPUs' time from reaping to the end of a cycle (the call, the
    /// submission, the reports); the rest is waiting for completions.
    #[serde(default)]
    pub(crate) call_share: f64,
    /// IOPS of every run of this cell (the row is the run with the median IOPS).
    #[serde(default)]
    pub(crate) iops_runs: Vec<f64>,
    /// Per round, this cell's IOPS over passthrough's in the same round (runs next to each
    /// other, so a busy spell of the host hits both): steadier than `ratio` on a loaded host.
    #[serde(default)]
    pub(crate) paired_ratios: Vec<f64>,
    /// The median of `paired_ratios`.
    #[serde(default)]
    pub(crate) paired_ratio: f64,
    /// The round the run belongs to (1-based).
    #[serde(default)]
    pub(crate) round: u32,
    /// The hypervisor's cycles per I/O by phase (from the same flat line, nested in JSON).
    #[serde(skip_deserializing)]
    pub(crate) phases: Phases,
    #[serde(skip_deserializing, default = "emulated")]
    pub(crate) emulated: String,
}

/// A guest line `... nvme-bench policy=.. workload=.. qd=.. vcpus=.. ios=.. iops=.. ...` as a
/// [`Row`] (keys neither the row nor its phases want, such as `ios`, are ignored).
fn parse(line: &str) -> Option<Row> {
    let (mut row, phases): (Row, Phases) = parse_fields(line, "nvme-bench")?;
    row.phases = phases;
    Some(row)
}

/// Policies measured, passthrough first (the baseline).
pub(crate) const POLICIES: [&str; 4] = ["passthrough", "strict", "batched", "deferred"];
/// Rows each run prints (the guest's workloads).
const WORKLOADS: usize = 3;

/// Runs the benchmark; `quick` reads fewer blocks per cell and runs each cell once. With
/// `icount`, QEMU runs single-threaded TCG with instructions as time (`-icount shift=0`): the
/// figures are then guest and hypervisor path lengths (the device's own latency is emulated
/// time too), independent of the host's load, and the vCPUs of a guest take turns.
pub fn run(quick: bool, icount: bool) -> Result<()> {
    setup::ensure()?;
    let kernel = build_kernel(Flavour::Release)?;
    let (ios, rounds) = if quick { (256, 1) } else { (2000, 5) };
    let knobs = Knobs::from_env(rounds, ios)?;
    let ios = knobs.ios;
    let image = root().join("target/bench/nvme.img");
    std::fs::create_dir_all(image.parent().unwrap())?;
    let mut rows = Vec::new();
    // Rounds interleave the policies, so that a busy spell of the host hits them alike; each
    // cell reports its median run.
    let rounds = knobs.rounds;
    for round in 1..=rounds {
        for &vcpus in &knobs.vcpus {
            for policy in knobs.policies.iter().map(String::as_str) {
                // A fresh sparse image (reads as zeros): the data does not matter, the DMA does.
                std::fs::File::create(&image)?.set_len(64 << 20)?;
                let cmdline = format!(
                    "exit=qemu log=info guest=name=g0,mem=64M,cpus={vcpus},dev={},policy={policy}",
                    moat_scenarios::nvme::NVME_BDF
                );
                let name = format!("bench-nvme-{policy}-{vcpus}");
                let (dev, extra) = moat_scenarios::nvme::nvme_device(&image.to_string_lossy());
                let machine = Machine {
                    devices: vec![dev],
                    extra,
                    ..Machine::default()
                };
                eprintln!("xtask: bench nvme: round {round}/{rounds}: policy {policy}, {vcpus} vCPU(s) ({ios} reads per vCPU at qd 1, {} at qd 32)", ios * 8);
                let found = run_guest(
                    &kernel,
                    &cmdline,
                    format!("g0 {}nvme-bench={ios}", knobs.burst_word()),
                    &name,
                    |iso| {
                        let mut args = machine.qemu_args(iso, setup::OVMF_CODE);
                        if icount {
                            args.extend(["-icount".into(), "shift=0".into()]);
                        }
                        args.extend(extra_qemu_args());
                        args
                    },
                    parse,
                    |found| found.len() == WORKLOADS,
                )
                .map_err(|e| format!("bench nvme: policy {policy}, {vcpus} vCPU(s): {e}"))?;
                rows.extend(found.into_iter().map(|r| Row { round, ..r }));
            }
        }
    }
    let _ = std::fs::remove_file(&image);
    let paired = paired_ratios(&rows);
    let mut rows = medians(rows);
    fill_ratios(&mut rows);
    for r in &mut rows {
        if let Some((_, v)) = paired.iter().find(|(k, _)| *k == key(r)) {
            r.paired_ratios = v.clone();
            r.paired_ratio = median(v);
        }
    }
    if icount {
        println!("-icount shift=0: instructions as emulated time (path lengths, independent of host load; the vCPUs of a guest take turns)");
    }
    print_table(&rows);
    let json = root().join("target/bench/nvme.json");
    write_json(&rows, &json)?;
    crate::plots::nvme(&rows, &json.with_extension("svg"))?;
    check_targets(&rows);
    Ok(())
}

/// Development knobs for A/B runs of a few cells, from the environment (the defaults are
/// the full benchmark): `MOAT_BENCH_ROUNDS` (rounds), `MOAT_BENCH_POLICIES` (e.g.
/// `passthrough,batched`; passthrough is needed for the ratios), `MOAT_BENCH_VCPUS` (e.g.
/// `1`), `MOAT_BENCH_NVME_IOS` (reads per vCPU at qd 1, 8x that at qd 32; more for longer, steadier
/// windows on a loaded host), `MOAT_BENCH_NVME_BURST` (`MAX` or `MIN,MAX`: the guest's `nvme-burst-min=MIN
/// nvme-burst=MAX`, completions a cycle waits for and takes at most).
struct Knobs {
    rounds: u32,
    ios: u64,
    policies: Vec<String>,
    vcpus: Vec<u64>,
    burst: Option<String>,
}

impl Knobs {
    fn from_env(rounds: u32, ios: u64) -> Result<Knobs> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let list =
            |v: String| -> Vec<String> { v.split(',').map(|s| s.trim().to_string()).collect() };
        let num = |k: &str, v: &str| -> Result<u64> {
            v.parse::<u64>()
                .map_err(|_| format!("{k}: `{v}` is not a number").into())
        };
        let policies = env_policies(&POLICIES)?;
        let vcpus = match var("MOAT_BENCH_VCPUS") {
            Some(v) => list(v)
                .iter()
                .map(|x| num("MOAT_BENCH_VCPUS", x))
                .collect::<Result<Vec<_>>>()?,
            None => vec![1, 2],
        };
        let rounds = env_rounds(rounds)?;
        let ios = match var("MOAT_BENCH_NVME_IOS") {
            Some(v) => num("MOAT_BENCH_NVME_IOS", &v)?.clamp(32, u64::from(u32::MAX) / 8),
            None => ios,
        };
        let burst = match var("MOAT_BENCH_NVME_BURST") {
            None => None,
            Some(v) => {
                let k: Vec<u64> = list(v)
                    .iter()
                    .map(|x| num("MOAT_BENCH_NVME_BURST", x))
                    .collect::<Result<_>>()?;
                Some(match k[..] {
                    [max] => format!("nvme-burst={max} "),
                    [min, max] => format!("nvme-burst-min={min} nvme-burst={max} "),
                    _ => return Err("MOAT_BENCH_NVME_BURST: MAX or MIN,MAX".into()),
                })
            }
        };
        Ok(Knobs {
            rounds,
            ios,
            policies,
            vcpus,
            burst,
        })
    }

    /// The guest's `nvme-burst...` words when a burst was asked for.
    fn burst_word(&self) -> String {
        self.burst.clone().unwrap_or_default()
    }
}

type Key = (String, String, u64, u64);

/// A row's cell: (policy, workload, depth, vCPUs).
fn key(r: &Row) -> Key {
    (r.policy.clone(), r.workload.clone(), r.qd, r.vcpus)
}

/// Per cell, its IOPS over passthrough's of the same round, workload, depth and vCPUs, one
/// per round.
fn paired_ratios(rows: &[Row]) -> Vec<(Key, Vec<f64>)> {
    let mut out: Vec<(Key, Vec<f64>)> = Vec::new();
    for r in rows {
        let Some(base) = rows.iter().find(|b| {
            b.policy == "passthrough"
                && b.round == r.round
                && (&b.workload, b.qd, b.vcpus) == (&r.workload, r.qd, r.vcpus)
        }) else {
            continue;
        };
        let x = r.iops / base.iops;
        match out.iter_mut().find(|(k, _)| *k == key(r)) {
            Some((_, v)) => v.push(x),
            None => out.push((key(r), vec![x])),
        }
    }
    out
}

/// One row per cell (policy, workload, depth, vCPUs), in first-seen order: the run with the
/// median IOPS, with every run's IOPS in `iops_runs`.
fn medians(rows: Vec<Row>) -> Vec<Row> {
    median_runs(&rows, key, |r| r.iops)
        .into_iter()
        .map(|(m, all)| Row {
            iops_runs: all,
            ..m
        })
        .collect()
}

/// Each row's IOPS over passthrough's for the same workload, depth and vCPUs.
fn fill_ratios(rows: &mut [Row]) {
    let base: Vec<(String, u64, u64, f64)> = rows
        .iter()
        .filter(|r| r.policy == "passthrough")
        .map(|r| (r.workload.clone(), r.qd, r.vcpus, r.iops))
        .collect();
    for r in rows.iter_mut() {
        r.ratio = base
            .iter()
            .find(|b| b.0 == r.workload && b.1 == r.qd && b.2 == r.vcpus)
            .map_or(f64::NAN, |b| r.iops / b.3);
    }
}

fn print_table(rows: &[Row]) {
    println!("NVMe reads per policy (QEMU TCG, emulated; IOPS over all vCPUs, median run; ratio = IOPS / passthrough IOPS at the same workload, depth and vCPUs; paired = median over rounds of IOPS / passthrough IOPS of the same round; io/cyc = I/Os per poll cycle (one call each); call = share of the vCPUs' time from reaping to the cycle's end, the rest waits for completions; hypervisor phases in cycles per I/O; runs = every run's IOPS)");
    println!(
        "{:<12} {:<8} {:>3} {:>5} {:>8} {:>6} {:>6} {:>8} {:>6} {:>5} {:>8} {:>8} {:>8} {:>7} {:>8} {:>10} {:>7} {:>7} {:>9}  runs",
        "policy", "workload", "qd", "vcpus", "IOPS", "ratio", "paired", "us/io", "io/cyc", "call", "inv/io", "waits/io", "exits/io", "exit", "validate", "iova_alloc", "pte", "inval", "iova_free"
    );
    for r in rows {
        let [exit, validate, iova_alloc, pte, inval, iova_free] = r.phases.values();
        println!(
            "{:<12} {:<8} {:>3} {:>5} {:>8.0} {:>5.2}x {:>5.2}x {:>8.1} {:>6.1} {:>5.2} {:>8.3} {:>8.3} {:>8.3} {exit:>7.0} {validate:>8.0} {iova_alloc:>10.0} {pte:>7.0} {inval:>7.0} {iova_free:>9.0}  {}",
            r.policy,
            r.workload,
            r.qd,
            r.vcpus,
            r.iops,
            r.ratio,
            r.paired_ratio,
            r.ns_per_io / 1000.0,
            r.ios_per_cycle,
            r.call_share,
            r.invalidations_per_io,
            r.waits_per_io,
            r.exits_per_io,
            joined(&r.iops_runs, 0),
        );
    }
}

/// `v` as `a/b/c` with `digits` decimals.
fn joined(v: &[f64], digits: usize) -> String {
    v.iter()
        .map(|x| format!("{x:.digits$}"))
        .collect::<Vec<_>>()
        .join("/")
}

fn check_targets(rows: &[Row]) {
    for r in rows
        .iter()
        .filter(|r| r.policy == "batched" && r.workload == "rand4k" && r.qd == 32)
    {
        println!(
            "target: batched / passthrough IOPS, 4 KiB random reads at qd 32, {} vCPU(s) = {:.3} of the medians, {:.3} paired (per round: {}) (target >= 0.9: {})",
            r.vcpus,
            r.ratio,
            r.paired_ratio,
            joined(&r.paired_ratios, 2),
            if r.ratio >= 0.9 { "met" } else { "MISSED" }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "[g0] nvme-bench policy=batched workload=rand4k qd=32 vcpus=2 burst=16..32 ios=4000 ios_per_cycle=16.00 call_share=0.250 \
        iops=25000 ns_per_io=40000 invalidations_per_io=0.0400 waits_per_io=0.0400 \
        exits_per_io=0.0800 exit=20 validate=300 iova_alloc=100 pte_write=900 invalidate=400 iova_free=80";

    #[test]
    fn parses_the_guest_line() {
        let r = parse(LINE).unwrap();
        assert_eq!(
            (r.policy.as_str(), r.workload.as_str(), r.qd, r.vcpus),
            ("batched", "rand4k", 32, 2)
        );
        assert_eq!((r.iops, r.exits_per_io), (25000.0, 0.08));
        assert_eq!(r.phases.pte_write, 900.0);
        assert!(parse("nvme-bench policy=strict workload=rand4k").is_none());
    }

    #[test]
    fn json_rows_have_the_issue_fields_and_ratios() {
        let mut rows = vec![
            parse(LINE).unwrap(),
            parse(
                &LINE
                    .replace("batched", "passthrough")
                    .replace("25000", "20000"),
            )
            .unwrap(),
        ];
        fill_ratios(&mut rows);
        assert_eq!(rows[0].ratio, 1.25);
        assert_eq!(rows[1].ratio, 1.0);
        let v = serde_json::to_value(&rows[0]).unwrap();
        for k in [
            "policy",
            "workload",
            "qd",
            "vcpus",
            "iops",
            "ratio",
            "invalidations_per_io",
            "exits_per_io",
            "phases",
            "emulated",
        ] {
            assert!(v.get(k).is_some(), "{k} missing");
        }
        assert_eq!(v["emulated"], "QEMU TCG");
    }

    #[test]
    fn paired_ratios_compare_runs_of_the_same_round() {
        let row = |policy: &str, iops: &str, round: u32| Row {
            round,
            ..parse(&LINE.replace("batched", policy).replace("25000", iops)).unwrap()
        };
        let rows = vec![
            row("passthrough", "100", 1),
            row("batched", "90", 1),
            row("passthrough", "400", 2),
            row("batched", "200", 2),
        ];
        let p = paired_ratios(&rows);
        let b = p.iter().find(|(k, _)| k.0 == "batched").unwrap();
        assert_eq!(b.1, vec![0.9, 0.5]);
        assert_eq!(median(&b.1), 0.7);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }

    #[test]
    fn a_cell_reports_its_median_run() {
        let runs: Vec<Row> = ["300", "100", "200"]
            .iter()
            .map(|i| parse(&LINE.replace("25000", i)).unwrap())
            .collect();
        let m = medians(runs);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].iops, 200.0);
        assert_eq!(m[0].iops_runs, vec![300.0, 100.0, 200.0]);
    }
}
