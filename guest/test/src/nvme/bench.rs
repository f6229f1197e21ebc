//! `nvme-bench=N`: reads through every vCPU's queue pair at once, per vCPU N at queue depth 1
//! and [`DEEP_FACTOR`] x N at depth 32 (random 4 KiB at queue depth 1 and 32, sequential
//! 64 KiB at queue depth 32; the deep workloads run faster, so longer for as steady a
//! figure), with the
//! hypervisor's counters and phase cycles per I/O. One line per workload, read by `cargo
//! xtask bench nvme`. Emulated time (QEMU TCG).

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use moat_abi::zerocopy::little_endian::U64;
use moat_nvme::{Done, Request, Staged, MAX_DEPTH};

use super::{data, setup, Worker, OUTS};
use crate::abi::BootInfo;
use crate::dma::PhaseCycles;
use crate::{println, Outcome};

/// The workloads: (name, bytes per read, queue depth, sequential).
const WORKLOADS: [(&str, u64, u64, bool); 3] = [
    ("rand4k", 4096, 1, false),
    ("rand4k", 4096, 32, false),
    ("seq64k", 65536, 32, true),
];

/// A cycle's burst: it waits for `MIN` completions (fewer only while the queue drains) and
/// takes at most `MAX` of them, packed as `MIN | MAX << 8`; 0 for either: the default.
static BURST: AtomicU64 = AtomicU64::new(0);

/// The default burst at depth `qd`: wait for half the queue, take what has completed. Each
/// cycle then amortizes its one exit and one invalidation wait over at least `qd / 2` I/Os
/// (reaping whatever has completed makes many small cycles when the controller is fast).
fn default_burst(qd: usize) -> (usize, usize) {
    ((qd / 2).max(1), qd)
}

/// The (min, max) burst of a job's parameter at depth `qd`.
fn burst_of(arg: u64, qd: usize) -> (usize, usize) {
    match (((arg >> 16) & 0xff) as usize, ((arg >> 24) & 0xff) as usize) {
        (0, 0) => default_burst(qd),
        (0, max) => (default_burst(qd).0.min(max), max),
        (min, 0) => (min, default_burst(qd).1),
        b => b,
    }
}

/// `nvme-burst=MAX` / `nvme-burst-min=MIN`: later `nvme-bench` cycles take at most MAX
/// completions (1..=32) and wait for MIN of them; without a number, the default.
pub fn set_burst(max: Option<u64>, min: Option<u64>) -> Outcome {
    let b = BURST.load(Relaxed);
    let (mut lo, mut hi) = (b & 0xff, b >> 8);
    if max.is_none() && min.is_none() {
        (lo, hi) = (0, 0);
    }
    if let Some(k) = max {
        hi = k;
    }
    if let Some(k) = min {
        lo = k;
    }
    if lo > MAX_DEPTH as u64 || hi > MAX_DEPTH as u64 {
        return Err("nvme-burst: sizes must be 1..=32 (0: the default)");
    }
    BURST.store(lo | hi << 8, Relaxed);
    println!(
        "nvme-burst: wait for {lo}, take at most {hi} (0: the default, half and all of the depth)"
    );
    Ok(())
}

/// A job's parameter: reads per vCPU, bytes per read, depth, sequential, and the burst.
fn arg(ios: u64, bytes: u64, qd: u64, seq: bool) -> u64 {
    let b = BURST.load(Relaxed);
    ios << 32 | (b >> 8) << 24 | (b & 0xff) << 16 | (bytes / 4096) << 8 | (seq as u64) << 7 | qd
}

/// The per-vCPU job: keeps `qd` reads outstanding until `ios` completed; `out` = [reads
/// completed, reads failed].
pub(crate) fn job(w: Worker<'_>, arg: u64, out: &mut [u64; OUTS]) -> Outcome {
    let Worker { v, p, m, q } = w;
    let ios = arg >> 32;
    let bytes = ((arg >> 8) & 0xff) * 4096;
    let seq = (arg >> 7) & 1 != 0;
    let qd = ((arg & 0x3f) as usize).clamp(1, MAX_DEPTH);
    let (min, max) = burst_of(arg, qd);
    let ns = q.namespace();
    let bs = u64::from(ns.block_size);
    let span = bytes / bs;
    // Sequential: each vCPU streams through its own quarter of the disk.
    let region = ns.blocks / 4 / span * span;
    let mut next_seq = v as u64 * region;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (v as u64 + 1).wrapping_mul(0xd1b5_4a32_d192_ed03);
    let mut lba = || {
        if seq {
            let l = next_seq;
            next_seq += span;
            if next_seq >= (v as u64 + 1) * region {
                next_seq = v as u64 * region;
            }
            l
        } else {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % (ns.blocks / span) * span
        }
    };
    let buf = |k: u64| data(v) + k * 65536;
    // Buffers (by index; a request's tag is its buffer's index) not in use: `qd` for the
    // commands outstanding and `qd` for the burst mapped ahead.
    let mut free = [0u64; 2 * MAX_DEPTH];
    let mut nfree = 2 * qd;
    for (k, f) in free.iter_mut().enumerate().take(nfree) {
        *f = k as u64;
    }
    let fail = |e: moat_nvme::Error| {
        println!("nvme-bench: vcpu {v}: {e}");
        "NVMe I/O failed"
    };
    let (mut submitted, mut completed, mut failed) = (0u64, 0u64, 0u64);
    // Every cycle (`IoQueue::wait_pipelined`): wait for `min` completions (fewer only while
    // the queue drains), take at most `max`, submit the burst the previous cycle mapped
    // (refilling the queue to `qd`), and make one call that unmaps the completed buffers and
    // maps the next burst: the controller works on the new burst during the call.
    // Where the vCPU's time goes: TSC from `refill` (the completions are reaped, the burst
    // submitted, the call comes next) to the cycle's end, summed: the call and the reports.
    let (mut cycles, mut in_call) = (0u64, 0u64);
    // The burst mapped ahead (empty again once every read was submitted).
    let mut staged = Staged::empty();
    while completed < ios {
        let mut reaped_at = 0;
        let mut refill = |tags: &[u64], reqs: &mut [Request]| {
            reaped_at = crate::abi::rdtsc();
            for &t in tags {
                free[nfree] = t;
                nfree += 1;
            }
            completed += tags.len() as u64;
            let k = nfree.min(reqs.len()).min((ios - submitted) as usize);
            for r in reqs.iter_mut().take(k) {
                nfree -= 1;
                *r = Request {
                    write: false,
                    lba: lba(),
                    gpa: buf(free[nfree]),
                    len: bytes,
                    tag: free[nfree],
                };
            }
            submitted += k as u64;
            k
        };
        q.wait_pipelined(
            p,
            m,
            &mut staged,
            qd,
            (min, max),
            &mut refill,
            &mut |d: Done| {
                if let Err(e) = d.result {
                    if failed == 0 {
                        println!("nvme-bench: vcpu {v}: read {} failed: {e}", d.tag);
                    }
                    failed += 1;
                }
            },
        )
        .map_err(fail)?;
        in_call += crate::abi::rdtsc().saturating_sub(reaped_at);
        cycles += 1;
    }
    out[0] = completed;
    out[1] = failed;
    out[4] = cycles;
    out[5] = in_call;
    if failed != 0 {
        return Err("an NVMe read failed");
    }
    Ok(())
}

/// Reads at queue depth 32 per read at depth 1.
const DEEP_FACTOR: u64 = 8;

/// `nvme-bench=N`: every workload on every vCPU at once, N reads per vCPU at depth 1 and
/// [`DEEP_FACTOR`] x N at depth 32, each after one unmeasured round (the emulator translates each code path on first use).
pub fn bench(info: &BootInfo, ios: u64) -> Outcome {
    let mut s = setup(info)?;
    let r = measure(info, &mut s, ios.max(32));
    let td = s.teardown();
    r.and(td)
}

fn measure(info: &BootInfo, s: &mut super::Setup, ios: u64) -> Outcome {
    let policy = crate::dma::policy_name(s.m.pvdma().info().policy);
    let khz = info.tsc_khz.get().max(1);
    for (name, bytes, qd, seq) in WORKLOADS {
        s.run(info, 2, arg(ios.min(64), bytes, qd, seq))?;
        let s0 = s.m.pvdma().stats(false).map_err(|_| "STATS failed")?;
        let a = arg(if qd > 1 { ios * DEEP_FACTOR } else { ios }, bytes, qd, seq);
        let (outs, cycles) = s.run(info, 2, a)?;
        let s1 = s.m.pvdma().stats(false).map_err(|_| "STATS failed")?;
        let done: u64 = outs.iter().take(s.vcpus).map(|o| o[0]).sum();
        let polls: u64 = outs.iter().take(s.vcpus).map(|o| o[4]).sum();
        let in_call: u64 = outs.iter().take(s.vcpus).map(|o| o[5]).sum();
        let n = done.max(1) as f64;
        let per = |a: U64, b: U64| (b.get() - a.get()) as f64 / n;
        let secs = cycles as f64 / (khz as f64 * 1000.0);
        println!(
            "nvme-bench policy={policy} workload={name} qd={qd} vcpus={} burst={}..{} ios={done} ios_per_cycle={:.2} call_share={:.3} iops={:.0} ns_per_io={:.0} invalidations_per_io={:.4} waits_per_io={:.4} exits_per_io={:.4} {}",
            s.vcpus,
            burst_of(a, qd as usize).0.min(qd as usize),
            burst_of(a, qd as usize).1,
            done as f64 / polls.max(1) as f64,
            // Of every vCPU's time in the job (the run's cycles on each vCPU).
            in_call as f64 / (cycles as f64 * s.vcpus as f64),
            n / secs,
            secs * 1e9 / n,
            per(s0.invalidations, s1.invalidations),
            per(s0.waits, s1.waits),
            // The closing STATS call counts itself.
            (s1.exits.get() - s0.exits.get() - 1) as f64 / n,
            PhaseCycles(&s0, &s1, n),
        );
    }
    Ok(())
}
