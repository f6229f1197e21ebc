//! `cargo xtask bench dma`: the paravirtual DMA software path, one QEMU run per policy and
//! round (five interleaved rounds; each cell reports its median run and its paired ratio to
//! passthrough of the same round). The test guest (`dma-bench`) maps and unmaps real guest pages through the hypercalls for batch
//! sizes 1, 8, 64, 256 and buffers of 4 KiB and 64 KiB, and reports per operation: time,
//! cycles, invalidations, waits, VM exits and the hypervisor's per-phase cycles. Emulated
//! (QEMU TCG) figures: the ratios between rows are the result, not the absolute times.
//!
//! `--vcpus 1,2`: the same cells on 1 and on 2 vCPUs of one guest at once (QEMU `-smp N`
//! with multi-threaded TCG, every vCPU mapping and unmapping its own buffers); each row says
//! how many vCPUs ran it and the guest's throughput (`ops_per_s`, all vCPUs together).

use moat_scenarios::Machine;
use serde::{Deserialize, Serialize};

use crate::bench_row::{
    emulated, env_policies, env_rounds, extra_qemu_args, median, median_runs, parse_fields,
    run_guest, write_json, Phases,
};
use crate::{build_kernel, root, setup, Flavour, Result};

/// One measured cell: a row of the printed table and an element of `target/bench/dma.json`.
/// Read from the guest's `dma-bench key=value ...` line by field name (see [`parse`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Row {
    policy: String,
    /// vCPUs running the cell at once (the guest line's `vcpus`; 1 when absent).
    #[serde(default = "one")]
    vcpus: u64,
    batch: u64,
    bytes: u64,
    ns_per_op: f64,
    cycles_per_op: f64,
    invalidations_per_op: f64,
    waits_per_op: f64,
    exits_per_op: f64,
    /// Map+unmap operations per second of emulated time, all vCPUs together (the guest
    /// line's `ops_per_s`; from `ns_per_op` when absent).
    #[serde(default)]
    ops_per_s: f64,
    /// Filled from the same flat line (second pass of [`parse`]), nested in the JSON.
    #[serde(skip_deserializing)]
    phases: Phases,
    /// The round the run belongs to (1-based).
    #[serde(skip_deserializing)]
    round: u32,
    /// Every round's cycles per operation of this cell (the row is the median run's).
    #[serde(skip_deserializing)]
    cycles_runs: Vec<f64>,
    /// Per round, this cell's cycles per operation over passthrough's in the same round, vCPU
    /// count, batch and size (runs next to each other in time, so they see the same host).
    #[serde(skip_deserializing)]
    paired_ratios: Vec<f64>,
    /// The median of `paired_ratios`.
    #[serde(skip_deserializing)]
    paired_ratio: f64,
    #[serde(skip_deserializing, default = "emulated")]
    emulated: String,
}

fn one() -> u64 {
    1
}

/// A guest line `... dma-bench policy=strict batch=8 bytes=4096 ops=.. ns_per_op=.. ...` as a
/// [`Row`], filled with its phases by field name (see [`parse_fields`]).
fn parse(line: &str) -> Option<Row> {
    let (mut row, phases): (Row, Phases) = parse_fields(line, "dma-bench")?;
    row.phases = phases;
    if row.ops_per_s == 0.0 && row.ns_per_op > 0.0 {
        row.ops_per_s = 1e9 / row.ns_per_op;
    }
    Some(row)
}

/// QEMU's arguments for `vcpus` vCPUs: `-smp vcpus`, and multi-threaded TCG (one host
/// thread per vCPU) instead of the default accelerator options.
/// With `icount`, single-threaded TCG with instructions as time (`-icount shift=0`).
fn machine_args(iso: &str, vcpus: u32, icount: bool) -> Vec<String> {
    let m = Machine {
        smp: vcpus.max(Machine::default().smp),
        ..Machine::default()
    };
    let mut args = m.qemu_args(iso, setup::OVMF_CODE);
    if let Some(i) = args.iter().position(|a| a == "-accel")
        && let Some(a) = args.get_mut(i + 1)
    {
        *a = if icount { "tcg" } else { "tcg,thread=multi" }.into();
    }
    if icount {
        args.extend(["-icount".into(), "shift=0".into()]);
    }
    args.extend(extra_qemu_args());
    args
}

/// The guest's cells: buffer sizes and batch sizes.
const BYTES: [u64; 2] = [4096, 65536];
const BATCHES: [u64; 4] = [1, 8, 64, 256];

/// The cells a run measures: every one, or those `MOAT_BENCH_BYTES` / `MOAT_BENCH_BATCH`
/// name (a development knob, e.g. for an instruction profile of one cell).
struct Cells {
    bytes: Option<u64>,
    batch: Option<u64>,
}

impl Cells {
    fn from_env() -> Result<Cells> {
        let pick = |k: &str, all: &[u64]| -> Result<Option<u64>> {
            match std::env::var(k).ok().filter(|v| !v.is_empty()) {
                None => Ok(None),
                Some(v) => match v.parse::<u64>() {
                    Ok(x) if all.contains(&x) => Ok(Some(x)),
                    _ => Err(format!("{k}: `{v}` is not one of {all:?}").into()),
                },
            }
        };
        Ok(Cells {
            bytes: pick("MOAT_BENCH_BYTES", &BYTES)?,
            batch: pick("MOAT_BENCH_BATCH", &BATCHES)?,
        })
    }

    /// Rows a run prints.
    fn count(&self) -> usize {
        let n = |x: Option<u64>, all: usize| if x.is_some() { 1 } else { all };
        n(self.bytes, BYTES.len()) * n(self.batch, BATCHES.len())
    }

    /// The guest's words selecting them (none for every cell).
    fn words(&self) -> String {
        let mut w = String::new();
        if let Some(b) = self.bytes {
            w += &format!("dma-bench-bytes={b} ");
        }
        if let Some(n) = self.batch {
            w += &format!("dma-bench-batch={n} ");
        }
        w
    }
}

/// Runs the benchmark on each vCPU count of `vcpus`; `quick` uses fewer operations per cell.
/// With `icount`, instructions as emulated time (see [`machine_args`]).
pub fn run(quick: bool, vcpus: &[u32], icount: bool) -> Result<()> {
    setup::ensure()?;
    let kernel = build_kernel(Flavour::Release)?;
    let ops = if quick { 64 } else { 512 };
    let policies = env_policies(&["passthrough", "strict", "batched", "deferred"])?;
    let cells = Cells::from_env()?;
    // Rounds interleave the runs, so that a busy spell of the host hits every policy alike;
    // each cell reports its median run.
    let rounds = env_rounds(if quick { 1 } else { 5 })?;
    let mut rows = Vec::new();
    for round in 1..=rounds {
        for &n in vcpus {
            for policy in policies.iter().map(String::as_str) {
                // 16 MiB of buffers per vCPU from 32 MiB.
                let mem = 32 + 16 * n.max(2);
                let cmdline = format!(
                "exit=qemu log=info guest=name=g0,mem={mem}M,cpus={n},dev=00:05.0,policy={policy}"
            );
                let name = format!("bench-dma-{policy}-{n}vcpu");
                eprintln!(
                "xtask: bench dma: round {round}/{rounds}: policy {policy}, {n} vCPU(s) ({ops} operations per cell and vCPU)"
            );
                let found = run_guest(
                    &kernel,
                    &cmdline,
                    format!("g0 {}dma-bench={ops}", cells.words()),
                    &name,
                    |iso| machine_args(iso, n, icount),
                    parse,
                    |found| {
                        found.len() == cells.count() && found.iter().all(|f| f.vcpus == n as u64)
                    },
                )
                .map_err(|e| format!("bench dma: policy {policy}, {n} vCPU(s): {e}"))?;
                rows.extend(found.into_iter().map(|r| Row { round, ..r }));
            }
        }
    }
    let rows = aggregate(&rows);
    if icount {
        println!("-icount shift=0: instructions as emulated time (TSC cycles ~ guest and hypervisor instructions), single-threaded TCG: path lengths, independent of host load; the vCPU scaling below means nothing under it");
    }
    print_table(&rows);
    write_json(&rows, &root().join("target/bench/dma.json"))?;
    crate::plots::dma(&root().join("target/bench/dma.json"))?;
    check_targets(&rows);
    Ok(())
}

type Key = (String, u64, u64, u64);

fn key(r: &Row) -> Key {
    (r.policy.clone(), r.vcpus, r.batch, r.bytes)
}

/// One row per cell (first-seen order): the run with the median cycles per operation, with
/// every round's figure and the paired ratios to passthrough of the same round.
fn aggregate(rows: &[Row]) -> Vec<Row> {
    let paired = |r: &Row| -> Option<f64> {
        let base = rows.iter().find(|b| {
            b.policy == "passthrough"
                && b.round == r.round
                && (b.vcpus, b.batch, b.bytes) == (r.vcpus, r.batch, r.bytes)
        })?;
        Some(r.cycles_per_op / base.cycles_per_op)
    };
    median_runs(rows, key, |r| r.cycles_per_op)
        .into_iter()
        .map(|(m, all)| {
            let ratios: Vec<f64> = rows
                .iter()
                .filter(|r| key(r) == key(&m))
                .filter_map(paired)
                .collect();
            Row {
                cycles_runs: all,
                paired_ratio: median(&ratios),
                paired_ratios: ratios,
                ..m
            }
        })
        .collect()
}

fn print_table(rows: &[Row]) {
    let cycles = |vcpus: u64, policy: &str, bytes: u64, batch: u64| {
        rows.iter()
            .find(|r| {
                r.vcpus == vcpus && r.policy == policy && r.bytes == bytes && r.batch == batch
            })
            .map_or(f64::NAN, |r| r.cycles_per_op)
    };
    println!("PV DMA map+unmap per operation (QEMU TCG, emulated; each cell the run with the median cycles/op over the rounds; vcpus = vCPUs of the guest running the cell at once, ops/s = all of them together, ns/op and cycles/op = wall time / all ops; hypervisor phases in cycles per op; vs pass = cycles / passthrough at the same vCPUs, batch and size; paired = median over rounds of cycles / passthrough's of the same round; vs strict1 = cycles / strict at batch 1)");
    println!(
        "{:<12} {:>5} {:>5} {:>6} {:>10} {:>10} {:>11} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8} {:>8} {:>9} {:>8} {:>7} {:>10}",
        "policy", "vcpus", "batch", "bytes", "ops/s", "ns/op", "cycles/op", "inv/op", "waits/op", "exits/op", "exit", "validate", "iova_alloc", "pte", "inval", "iova_free", "vs pass", "paired", "vs strict1"
    );
    for r in rows {
        let [exit, validate, iova_alloc, pte, inval, iova_free] = r.phases.values();
        println!(
            "{:<12} {:>5} {:>5} {:>6} {:>10.0} {:>10.0} {:>11.0} {:>8.3} {:>8.3} {:>8.3} {exit:>8.0} {validate:>9.0} {iova_alloc:>9.0} {pte:>8.0} {inval:>8.0} {iova_free:>9.0} {:>7.2}x {:>6.2}x {:>9.3}x",
            r.policy,
            r.vcpus,
            r.batch,
            r.bytes,
            r.ops_per_s,
            r.ns_per_op,
            r.cycles_per_op,
            r.invalidations_per_op,
            r.waits_per_op,
            r.exits_per_op,
            r.cycles_per_op / cycles(r.vcpus, "passthrough", r.bytes, r.batch),
            r.paired_ratio,
            r.cycles_per_op / cycles(r.vcpus, "strict", r.bytes, 1),
        );
    }
}

fn check_targets(rows: &[Row]) {
    let at = |vcpus: u64, p: &str, batch: u64, bytes: u64| {
        rows.iter()
            .find(|r| r.vcpus == vcpus && r.policy == p && r.batch == batch && r.bytes == bytes)
    };
    let first = rows.first().map_or(1, |r| r.vcpus);
    let get = |p: &str, batch: u64, bytes: u64| at(first, p, batch, bytes);
    for bytes in [4096, 65536] {
        if let (Some(b), Some(p)) = (get("batched", 64, bytes), get("passthrough", 64, bytes)) {
            let ratio = b.cycles_per_op / p.cycles_per_op;
            let rounds: Vec<String> = b.paired_ratios.iter().map(|x| format!("{x:.2}")).collect();
            println!(
                "target: batched@64 / passthrough@64 ({bytes} B, {first} vCPU) = {ratio:.2} of the medians, {:.2} paired (per round: {}) (target <= 1.50: {})",
                b.paired_ratio,
                rounds.join("/"),
                if ratio <= 1.5 { "met" } else { "MISSED" }
            );
        }
        if let (Some(one), Some(two)) = (at(1, "batched", 64, bytes), at(2, "batched", 64, bytes)) {
            let scaling = two.ops_per_s / one.ops_per_s;
            println!(
                "target: batched@64 ops/s, 2 vCPUs / 1 vCPU ({bytes} B) = {scaling:.2} ({:.0} / {:.0}; target >= 1.60: {})",
                two.ops_per_s,
                one.ops_per_s,
                if scaling >= 1.6 { "met" } else { "MISSED" }
            );
        }
    }
    for bytes in [4096, 65536] {
        if let (Some(b), Some(s), Some(b1)) = (
            get("batched", 64, bytes),
            get("strict", 1, bytes),
            get("batched", 1, bytes),
        ) {
            let ratio = b.cycles_per_op / s.cycles_per_op;
            // A single UNMAP under `batched` is a batch of one, i.e. strict: the same work as
            // strict@1, measured in the same QEMU run as batched@64 (no run-to-run noise).
            let same_run = b.cycles_per_op / b1.cycles_per_op;
            let per_batch_inv = b.invalidations_per_op * 64.0;
            let per_batch_wait = b.waits_per_op * 64.0;
            println!(
                "target: batched@64 / strict@1 ({bytes} B) = {ratio:.3} (same run, vs batched@1 = strict work: {same_run:.3}; target <= 0.100: {}); invalidations per batch {per_batch_inv:.2}, waits per batch {per_batch_wait:.2} (target 1 and 1: {})",
                if ratio <= 0.1 { "met" } else { "MISSED" },
                if (per_batch_inv - 1.0).abs() < 0.02 && (per_batch_wait - 1.0).abs() < 0.02 {
                    "met"
                } else {
                    "MISSED"
                }
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "[g0] dma-bench policy=batched batch=64 bytes=4096 ops=512 ns_per_op=9046 \
        cycles_per_op=24153 invalidations_per_op=0.0156 waits_per_op=0.0156 exits_per_op=0.0312 \
        exit=2 validate=312 iova_alloc=95 pte_write=116 invalidate=160 iova_free=93";

    #[test]
    fn parses_the_guest_line() {
        let r = parse(LINE).unwrap();
        assert_eq!((r.policy.as_str(), r.batch, r.bytes), ("batched", 64, 4096));
        assert_eq!((r.ns_per_op, r.cycles_per_op), (9046.0, 24153.0));
        assert_eq!(r.exits_per_op, 0.0312);
        assert_eq!(
            r.phases,
            Phases {
                exit: 2.0,
                validate: 312.0,
                iova_alloc: 95.0,
                pte_write: 116.0,
                invalidate: 160.0,
                iova_free: 93.0
            }
        );
        assert!(parse("dma-bench policy=strict batch=1 bytes=4096").is_none());
        assert!(parse("something else").is_none());
    }

    #[test]
    fn json_has_the_fields_readers_use() {
        let v = serde_json::to_value(parse(LINE).unwrap()).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut want = [
            "policy",
            "vcpus",
            "ops_per_s",
            "batch",
            "bytes",
            "ns_per_op",
            "cycles_per_op",
            "invalidations_per_op",
            "waits_per_op",
            "exits_per_op",
            "phases",
            "emulated",
            "round",
            "cycles_runs",
            "paired_ratios",
            "paired_ratio",
        ];
        want.sort();
        let mut keys = keys;
        keys.sort();
        assert_eq!(keys, want);
        let phases: Vec<&String> = v["phases"].as_object().unwrap().keys().collect();
        assert_eq!(phases.len(), 6);
        assert_eq!(v["phases"]["pte_write"], 116.0);
        assert_eq!(v["emulated"], "QEMU TCG");
        assert_eq!(v["batch"], 64);
    }

    /// Rounds: each cell is its median run, with every round's cycles; paired ratios compare
    /// runs of the same round only.
    #[test]
    fn a_cell_is_its_median_run_and_pairs_within_rounds() {
        let row = |policy: &str, round: u32, cycles: f64| Row {
            policy: policy.into(),
            round,
            cycles_per_op: cycles,
            ..parse(LINE).unwrap()
        };
        let rows = [
            row("passthrough", 1, 100.0),
            row("batched", 1, 150.0),
            row("passthrough", 2, 200.0),
            row("batched", 2, 260.0),
            row("passthrough", 3, 110.0),
            row("batched", 3, 120.0),
        ];
        let out = aggregate(&rows);
        assert_eq!(out.len(), 2);
        let (p, b) = (&out[0], &out[1]);
        assert_eq!((p.policy.as_str(), p.cycles_per_op), ("passthrough", 110.0));
        assert_eq!(
            (b.policy.as_str(), b.cycles_per_op, b.round),
            ("batched", 150.0, 1)
        );
        assert_eq!(b.cycles_runs, vec![150.0, 260.0, 120.0]);
        let want = [1.5, 1.3, 120.0 / 110.0];
        assert!(b
            .paired_ratios
            .iter()
            .zip(want)
            .all(|(x, w)| (x - w).abs() < 1e-9));
        assert!((b.paired_ratio - 1.3).abs() < 1e-9);
        assert_eq!(p.paired_ratio, 1.0);
    }
}
