//! `dma-bench`: map/unmap cost per policy and batch size (read by `cargo xtask bench dma`),
//! on every vCPU of the guest at once (`cargo xtask bench dma --vcpus 1,2`).

use core::sync::atomic::{AtomicU64, Ordering::SeqCst};

use moat_abi::dma::Stats;

use super::*;

/// Most vCPUs that take part.
const MAX_VCPUS: usize = 4;

/// The benchmark's batch areas, one per vCPU (4 pages: 340 entries, room for the largest
/// batch; the guest image must stay below 2 MiB, see `dma-bad`).
static mut BENCH_BATCH: [PageArray<4>; MAX_VCPUS] =
    [const { PageArray([[0; PAGE]; 4]) }; MAX_VCPUS];
/// Discovery scratch pages, one per vCPU.
static mut BENCH_SCRATCH: [PageArray<1>; MAX_VCPUS] =
    [const { PageArray([[0; PAGE]; 1]) }; MAX_VCPUS];

/// The cell barrier: vCPUs arrived at the current phase.
static ARRIVED: AtomicU64 = AtomicU64::new(0);
/// The benchmark's workers.
static CREW: Crew = Crew::new();
/// The last cell vCPU 0 ended (cells count from 1): the others stop at their next round.
static STOP: AtomicU64 = AtomicU64::new(0);
/// Operations of the current cell, all vCPUs.
static CELL_OPS: AtomicU64 = AtomicU64::new(0);
/// The cells to run (`dma-bench-bytes=`, `dma-bench-batch=`): buffer size and batch packed as
/// `bytes << 16 | batch`, 0 in either part: every one.
static CELL_FILTER: AtomicU64 = AtomicU64::new(0);

/// Runs only the cells of buffer size `bytes` and batch `batch` (each `None` or 0: all).
pub fn select_bench_cell(bytes: Option<u64>, batch: Option<u64>) {
    let (bytes, batch) = (bytes.unwrap_or(0), batch.unwrap_or(0).min(0xffff));
    CELL_FILTER.store(bytes << 16 | batch, SeqCst);
}

/// Whether the cell of `bytes` and `batch` runs.
fn selected(bytes: u64, batch: u64) -> bool {
    let f = CELL_FILTER.load(SeqCst);
    let (b, n) = (f >> 16, f & 0xffff);
    (b == 0 || b == bytes) && (n == 0 || n == batch)
}

/// Waits until all `n` vCPUs reached barrier `k` (counted from 1), or a worker failed.
fn barrier(n: u64, k: u64) -> Outcome {
    ARRIVED.fetch_add(1, SeqCst);
    while ARRIVED.load(SeqCst) < n * k {
        if CREW.failed() {
            return Err("another dma-bench worker failed");
        }
        core::hint::spin_loop();
    }
    Ok(())
}

/// Guest-physical base of vCPU `v`'s buffers: 16 MiB each from 32 MiB.
fn buffers(v: usize) -> u64 {
    (32u64 << 20) + ((v as u64) << 24)
}

/// `dma-bench`: cost per map+unmap operation of real mappings under the guest's policy, for
/// batch sizes 1 (single hypercalls), 8, 64, 256 and buffers of 4 KiB and 64 KiB, every
/// vCPU running the same cell at once (each with its own driver, batch area and buffers).
/// A cell runs at least `ops_per_cell` operations on vCPU 0 and at least `ops_per_cell / 2`
/// ms (so that a cell is long against the host's scheduling of the vCPU threads); the
/// other vCPUs run until vCPU 0 ends it.
/// One line per cell, `dma-bench policy=.. vcpus=.. batch=.. bytes=.. ops=.. ops_per_s=..
/// ns_per_op=.. cycles_per_op=.. invalidations_per_op=.. waits_per_op=.. exits_per_op=..
/// validate=.. iova_alloc=.. pte_write=.. invalidate=.. iova_free=..` (ops: all vCPUs';
/// time per op: wall time / ops; phases in hypervisor cycles per operation, all vCPUs).
/// Emulated time (QEMU TCG).
pub fn bench(info: &BootInfo, ops_per_cell: u64) -> Outcome {
    let n = (info.vcpus.get() as usize).clamp(1, MAX_VCPUS);
    // `bench_worker` does not count vCPU 0: it counts itself here, after its last cell.
    let mine = bench_worker(info, 0, ops_per_cell);
    CREW.finish();
    CREW.join(mine, n as u64, None, "a dma-bench worker failed")?;
    let mut d = driver()?;
    let s = d.stats(false).map_err(|_| "STATS failed")?;
    if s.live_mappings != 0 {
        return Err("mappings left after the benchmark");
    }
    Ok(())
}

/// vCPU `v`'s part of `dma-bench` (vCPU 0 measures and prints).
pub fn bench_worker(info: &BootInfo, v: usize, ops_per_cell: u64) -> Outcome {
    if v >= MAX_VCPUS {
        // Not taking part (the barrier counts the first MAX_VCPUS).
        return Ok(());
    }
    let r = CREW.note(bench_cells(info, v, ops_per_cell));
    if v != 0 {
        CREW.finish();
    }
    r
}

fn bench_cells(info: &BootInfo, v: usize, ops_per_cell: u64) -> Outcome {
    let n = (info.vcpus.get() as u64).clamp(1, MAX_VCPUS as u64);
    // Each vCPU has its own scratch page.
    let mut d = driver_at(core::ptr::addr_of!(BENCH_SCRATCH) as u64 + (v * PAGE) as u64)?;
    let policy = d.info().policy;
    let area =
        core::ptr::addr_of!(BENCH_BATCH) as u64 + (v * core::mem::size_of::<PageArray<4>>()) as u64;
    let cap = d
        .attach_batch(BatchArea {
            gpa: area,
            pages: 4,
        })
        .map_err(|_| "BATCH_REGISTER failed")?;
    let base = buffers(v);
    let khz = info.tsc_khz.get().max(1);
    let mut phase = 0;
    let mut cell = 0;
    let min_cycles = ops_per_cell / 2 * khz;
    for bytes in [4096u64, 65536] {
        for batch in [1u64, 8, 64, 256] {
            cell += 1;
            if !selected(bytes, batch) {
                continue;
            }
            let batch = batch.min(cap as u64);
            let rounds = (ops_per_cell / batch).max(1);
            let mut iovas = [0u64; 256];
            let mut s0 = None;
            let mut t0 = 0;
            let mut done = 0u64;
            // One unmeasured round first: the emulator translates each code path on its
            // first run, which would otherwise be charged to whichever cell runs it first.
            for round in 0.. {
                if round > 1 {
                    done += batch;
                    if v == 0 && round > rounds && crate::abi::rdtsc() - t0 >= min_cycles {
                        STOP.store(cell, SeqCst);
                    }
                    if STOP.load(SeqCst) >= cell {
                        break;
                    }
                }
                if round == 1 {
                    // Every vCPU warmed up; vCPU 0 reads the counters; all start together.
                    phase += 1;
                    barrier(n, phase)?;
                    if v == 0 {
                        s0 = Some(d.stats(false).map_err(|_| "STATS failed")?);
                        t0 = crate::abi::rdtsc();
                    }
                    phase += 1;
                    barrier(n, phase)?;
                }
                if batch == 1 {
                    let iova = d
                        .map(base, bytes, DmaFlags::READ_WRITE)
                        .map_err(|_| "MAP failed")?;
                    d.unmap(iova, bytes).map_err(|_| "UNMAP failed")?;
                    continue;
                }
                let mut bad = false;
                let first = core::cell::Cell::new(u64::MAX);
                for i in 0..batch {
                    let t = d
                        .queue_map(base + i * bytes, bytes, DmaFlags::READ_WRITE, &mut |_| {
                            bad = true
                        })
                        .map_err(|_| "queue MAP failed")?;
                    if first.get() == u64::MAX {
                        first.set(t.0);
                    }
                }
                let f0 = first.get();
                d.flush(&mut |c| match (c.request, c.result) {
                    (Request::Map { .. }, Ok(iova)) => {
                        if let Some(s) = iovas.get_mut((c.ticket.0 - f0) as usize) {
                            *s = iova;
                        }
                    }
                    _ => bad = true,
                })
                .map_err(|_| "MULTICALL (maps) failed")?;
                for &iova in iovas.iter().take(batch as usize) {
                    d.queue_unmap(iova, bytes, &mut |_| bad = true)
                        .map_err(|_| "queue UNMAP failed")?;
                }
                d.flush(&mut |c| bad |= c.result.is_err())
                    .map_err(|_| "MULTICALL (unmaps) failed")?;
                if bad {
                    return Err("a batched map or unmap failed");
                }
            }
            // Every vCPU finished the cell.
            CELL_OPS.fetch_add(done, SeqCst);
            phase += 1;
            barrier(n, phase)?;
            if v != 0 {
                continue;
            }
            let t1 = crate::abi::rdtsc();
            let s1 = d.stats(false).map_err(|_| "STATS failed")?;
            let s0 = s0.ok_or("no counters at the start of the cell")?;
            // Read before the next cell's first barrier, which every vCPU passes only
            // after vCPU 0 (so nobody adds to it meanwhile).
            let all = CELL_OPS.swap(0, SeqCst).max(1);
            let per = |a: U64, b: U64| (b.get() - a.get()) as f64 / all as f64;
            let cycles = (t1 - t0) as f64 / all as f64;
            let ns = cycles * 1_000_000.0 / khz as f64;
            println!(
                "dma-bench policy={} vcpus={n} batch={batch} bytes={bytes} ops={all} ops_per_s={:.0} ns_per_op={:.0} cycles_per_op={:.0} invalidations_per_op={:.4} waits_per_op={:.4} exits_per_op={:.4} {}",
                policy_name(policy),
                1e9 / ns,
                ns,
                cycles,
                per(s0.invalidations, s1.invalidations),
                per(s0.waits, s1.waits),
                // The closing STATS call counts itself.
                (s1.exits.get() - s0.exits.get() - 1) as f64 / all as f64,
                PhaseCycles(&s0, &s1, all as f64),
            );
        }
    }
    let _ = d.sync_iotlb();
    d.detach_batch().map_err(|_| "unregister failed")?;
    Ok(())
}

/// The hypervisor's cycles per operation by phase between two STATS readings, over `ops`
/// operations, as the benchmark lines print them (`exit=.. validate=.. iova_alloc=..
/// pte_write=.. invalidate=.. iova_free=..`, which `cargo xtask bench` reads).
pub(crate) struct PhaseCycles<'a>(pub &'a Stats, pub &'a Stats, pub f64);

impl core::fmt::Display for PhaseCycles<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let (s0, s1) = (self.0, self.1);
        let per = |a: U64, b: U64| (b.get() - a.get()) as f64 / self.2;
        let phases = [
            ("exit", per(s0.cycles_exit, s1.cycles_exit)),
            ("validate", per(s0.cycles_validate, s1.cycles_validate)),
            (
                "iova_alloc",
                per(s0.cycles_iova_alloc, s1.cycles_iova_alloc),
            ),
            ("pte_write", per(s0.cycles_pte_write, s1.cycles_pte_write)),
            (
                "invalidate",
                per(s0.cycles_invalidate, s1.cycles_invalidate),
            ),
            ("iova_free", per(s0.cycles_iova_free, s1.cycles_iova_free)),
        ];
        for (i, (name, v)) in phases.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{name}={v:.0}")?;
        }
        Ok(())
    }
}
