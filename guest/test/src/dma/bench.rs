//! `dma-bench`: map/unmap cost per policy and batch size (read by `cargo xtask bench dma`).

use super::*;

/// The benchmark's batch area (8 pages: 681 entries).
static mut BENCH_BATCH: BatchPages = BatchPages([[0; PAGE]; 8]);

/// `dma-bench`: cost per map+unmap operation of real mappings under the guest's policy, for
/// batch sizes 1 (single hypercalls), 8, 64, 256 and buffers of 4 KiB and 64 KiB. One line
/// per cell, `dma-bench policy=.. batch=.. bytes=.. ops=.. ns_per_op=.. cycles_per_op=..
/// invalidations_per_op=.. waits_per_op=.. exits_per_op=.. validate=.. iova_alloc=..
/// pte_write=.. invalidate=.. iova_free=..` (phases in hypervisor cycles per operation).
/// Emulated time (QEMU TCG).
pub fn bench(info: &BootInfo, ops_per_cell: u64) -> Outcome {
    let mut d = driver()?;
    let policy = d.info().policy;
    let area = core::ptr::addr_of!(BENCH_BATCH) as u64;
    let cap = d
        .attach_batch(BatchArea {
            gpa: area,
            pages: 8,
        })
        .map_err(|_| "BATCH_REGISTER failed")?;
    let base = 32u64 << 20;
    let khz = info.tsc_khz.get().max(1);
    for bytes in [4096u64, 65536] {
        for batch in [1u64, 8, 64, 256] {
            let batch = batch.min(cap as u64);
            let rounds = (ops_per_cell / batch).max(1);
            let ops = rounds * batch;
            let mut iovas = [0u64; 256];
            // One unmeasured round first: the emulator translates each code path on its
            // first run, which would otherwise be charged to whichever cell runs it first.
            let mut s0 = d.stats(false).map_err(|_| "STATS failed")?;
            let mut t0 = crate::abi::rdtsc();
            for round in 0..=rounds {
                if round == 1 {
                    s0 = d.stats(false).map_err(|_| "STATS failed")?;
                    t0 = crate::abi::rdtsc();
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
            let t1 = crate::abi::rdtsc();
            let s1 = d.stats(false).map_err(|_| "STATS failed")?;
            let per = |a: U64, b: U64| (b.get() - a.get()) as f64 / ops as f64;
            let cycles = (t1 - t0) as f64 / ops as f64;
            println!(
                "dma-bench policy={} batch={batch} bytes={bytes} ops={ops} ns_per_op={:.0} cycles_per_op={:.0} invalidations_per_op={:.4} waits_per_op={:.4} exits_per_op={:.4} exit={:.0} validate={:.0} iova_alloc={:.0} pte_write={:.0} invalidate={:.0} iova_free={:.0}",
                policy_name(policy),
                cycles * 1_000_000.0 / khz as f64,
                cycles,
                per(s0.invalidations, s1.invalidations),
                per(s0.waits, s1.waits),
                // The closing STATS call counts itself.
                (s1.exits.get() - s0.exits.get() - 1) as f64 / ops as f64,
                per(s0.cycles_exit, s1.cycles_exit),
                per(s0.cycles_validate, s1.cycles_validate),
                per(s0.cycles_iova_alloc, s1.cycles_iova_alloc),
                per(s0.cycles_pte_write, s1.cycles_pte_write),
                per(s0.cycles_invalidate, s1.cycles_invalidate),
                per(s0.cycles_iova_free, s1.cycles_iova_free),
            );
        }
    }
    let _ = d.sync_iotlb();
    d.detach_batch().map_err(|_| "unregister failed")?;
    let s = d.stats(false).map_err(|_| "STATS failed")?;
    if s.live_mappings != 0 {
        return Err("mappings left after the benchmark");
    }
    Ok(())
}
