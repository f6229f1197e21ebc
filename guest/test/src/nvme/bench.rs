//! `nvme-bench=N`: reads through every vCPU's queue pair at once, N per vCPU per workload
//! (random 4 KiB at queue depth 1 and 32, sequential 64 KiB at queue depth 32), with the
//! hypervisor's counters and phase cycles per I/O. One line per workload, read by `cargo
//! xtask bench nvme`. Emulated time (QEMU TCG).

use moat_abi::zerocopy::little_endian::U64;
use moat_nvme::{Done, Request, MAX_DEPTH};

use super::{data, setup, Worker};
use crate::abi::BootInfo;
use crate::dma::PhaseCycles;
use crate::{println, Outcome};

/// The workloads: (name, bytes per read, queue depth, sequential).
const WORKLOADS: [(&str, u64, u64, bool); 3] = [
    ("rand4k", 4096, 1, false),
    ("rand4k", 4096, 32, false),
    ("seq64k", 65536, 32, true),
];

fn arg(ios: u64, bytes: u64, qd: u64, seq: bool) -> u64 {
    ios << 32 | (bytes / 4096) << 16 | (seq as u64) << 8 | qd
}

/// The per-vCPU job: keeps `qd` reads outstanding until `ios` completed; `out` = [reads
/// completed, reads failed].
pub(crate) fn job(w: Worker<'_>, arg: u64, out: &mut [u64; 4]) -> Outcome {
    let Worker { v, p, m, q } = w;
    let ios = arg >> 32;
    let bytes = ((arg >> 16) & 0xffff) * 4096;
    let seq = (arg >> 8) & 1 != 0;
    let qd = ((arg & 0xff) as usize).clamp(1, MAX_DEPTH);
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
    let mut reqs = [Request {
        write: false,
        lba: 0,
        gpa: 0,
        len: bytes,
        tag: 0,
    }; MAX_DEPTH];
    let first = (qd as u64).min(ios);
    for (k, r) in reqs.iter_mut().enumerate().take(first as usize) {
        r.lba = lba();
        r.gpa = buf(k as u64);
        r.tag = k as u64;
    }
    let fail = |e: moat_nvme::Error| {
        println!("nvme-bench: vcpu {v}: {e}");
        "NVMe I/O failed"
    };
    q.submit(p, m, &reqs[..first as usize]).map_err(fail)?;
    let (mut submitted, mut completed, mut failed) = (first, 0u64, 0u64);
    while completed < ios {
        let mut free = [0u64; MAX_DEPTH];
        let mut n = 0;
        q.wait(p, m, &mut |d: Done| {
            failed += d.result.is_err() as u64;
            free[n] = d.tag;
            n += 1;
        })
        .map_err(fail)?;
        completed += n as u64;
        let more = (n as u64).min(ios - submitted) as usize;
        for (r, &tag) in reqs.iter_mut().zip(free.iter()).take(more) {
            r.lba = lba();
            r.gpa = buf(tag);
            r.tag = tag;
        }
        if more != 0 {
            q.submit(p, m, &reqs[..more]).map_err(fail)?;
            submitted += more as u64;
        }
    }
    out[0] = completed;
    out[1] = failed;
    if failed != 0 {
        return Err("an NVMe read failed");
    }
    Ok(())
}

/// `nvme-bench=N`: every workload on every vCPU at once, N reads per vCPU each, after one
/// unmeasured round (the emulator translates each code path on first use).
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
        let (outs, cycles) = s.run(info, 2, arg(ios, bytes, qd, seq))?;
        let s1 = s.m.pvdma().stats(false).map_err(|_| "STATS failed")?;
        let done: u64 = outs.iter().take(s.vcpus).map(|o| o[0]).sum();
        let n = done.max(1) as f64;
        let per = |a: U64, b: U64| (b.get() - a.get()) as f64 / n;
        let secs = cycles as f64 / (khz as f64 * 1000.0);
        println!(
            "nvme-bench policy={policy} workload={name} qd={qd} vcpus={} ios={done} iops={:.0} ns_per_io={:.0} invalidations_per_io={:.4} waits_per_io={:.4} exits_per_io={:.4} {}",
            s.vcpus,
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
