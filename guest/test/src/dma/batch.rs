//! `dma-batch=N`: N maps and N unmaps in one MULTICALL each; the invalidations the policy promises.

use super::*;

/// `dma-batch=N`: N maps in one MULTICALL, then N unmaps in one MULTICALL; checks the
/// invalidations per batch the policy promises.
pub fn batch(n: u64) -> Outcome {
    let mut d = driver()?;
    let policy = d.info().policy;
    let cap = d
        .attach_batch(BatchArea {
            gpa: gpa(1),
            pages: 2,
        })
        .map_err(|_| "BATCH_REGISTER failed")?;
    let n = n.min(cap as u64).max(1);
    let before = d.stats(false).map_err(|_| "STATS failed")?;
    let base = 32u64 << 20;
    let mut iovas = [0u64; 256];
    let first = core::cell::Cell::new(None);
    {
        let mut record = |c: moat_pvdma::Completion| {
            if let (Request::Map { .. }, Ok(iova), Some(f)) = (c.request, c.result, first.get())
                && let Some(slot) = iovas.get_mut((c.ticket.0 - f) as usize)
            {
                *slot = iova;
            }
        };
        for i in 0..n {
            let t = d
                .queue_map(
                    base + i * PAGE as u64,
                    PAGE as u64,
                    DmaFlags::READ_WRITE,
                    &mut record,
                )
                .map_err(|_| "queue MAP failed")?;
            if first.get().is_none() {
                first.set(Some(t.0));
            }
        }
    }
    let f0 = first.get().unwrap_or(0);
    let r1 = d
        .flush(&mut |c| {
            if let (Request::Map { .. }, Ok(iova)) = (c.request, c.result)
                && let Some(slot) = iovas.get_mut((c.ticket.0 - f0) as usize)
            {
                *slot = iova;
            }
        })
        .map_err(|_| "MULTICALL (maps) failed")?;
    // Maps need a flush of their own only where the unit caches not-present entries
    // (caching mode) or needs write-buffer flushing: one per map there, none elsewhere.
    let mid = d.stats(false).map_err(|_| "STATS failed")?;
    let map_waits = mid.waits - before.waits;
    for &iova in iovas.iter().take(n as usize) {
        d.queue_unmap(iova, PAGE as u64, &mut |_| {})
            .map_err(|_| "queue UNMAP failed")?;
    }
    let r2 = d
        .flush(&mut |_| {})
        .map_err(|_| "MULTICALL (unmaps) failed")?;
    let _ = d.sync_iotlb();
    let after = d.stats(false).map_err(|_| "STATS failed")?;
    let inv = after.invalidations - before.invalidations;
    let waits = after.waits - mid.waits;
    println!(
        "dma-batch: policy {} batch {n}: maps {} ok in {} multicall(s), unmaps {} ok in {} multicall(s); {inv} invalidation(s), {waits} wait(s) for the unmaps, {map_waits} for the maps; live mappings {}",
        policy_name(policy),
        r1.ok,
        r1.multicalls,
        r2.ok,
        r2.multicalls,
        after.live_mappings
    );
    if r1.ok as u64 != n || r2.ok as u64 != n || after.live_mappings != 0 {
        return Err("batch did not complete");
    }
    let want_waits = match policy {
        Policy::Strict => n,
        Policy::Batched => r2.multicalls as u64,
        Policy::Deferred => n.div_ceil(d.info().deferred_max_entries.max(1) as u64) + 1,
        Policy::Passthrough => 0,
    };
    let maps_ok = map_waits == 0 || (policy != Policy::Passthrough && map_waits == n);
    if !maps_ok {
        println!("dma-batch: expected 0 map waits, or {n} under caching mode");
        return Err("wrong number of invalidation waits for the maps");
    }
    if (policy == Policy::Deferred && waits > want_waits)
        || (policy != Policy::Deferred && waits != want_waits)
    {
        println!("dma-batch: expected {want_waits} wait(s)");
        return Err("wrong number of invalidation waits for the policy");
    }
    d.detach_batch().map_err(|_| "unregister failed")?;
    Ok(())
}
