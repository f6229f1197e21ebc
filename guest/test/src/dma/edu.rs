//! `dma-edu`: map, DMA both ways through edu, unmap, and what the device can still reach.

use super::*;

/// `dma-edu`: map, DMA both ways, unmap, and check what the device can still reach.
pub fn edu(boot: &BootInfo) -> Outcome {
    let mut d = driver()?;
    let info = *d.info();
    let policy = info.policy;
    println!(
        "dma-edu: policy {} iova width {} max batch {} features {:#x}",
        policy_name(policy),
        info.limits.iova_width,
        info.limits.max_batch,
        info.features.0
    );
    let edu = Edu::find().ok_or("no edu device")?;
    let (ia, ib) = map_source_and_destination(&mut d, 7)?;
    let ok = edu.dma(ia, false) && edu.dma(ib, true);
    println!(
        "dma-edu: source {:#x} -> IOVA {ia:#x}, destination {:#x} -> IOVA {ib:#x}; round trip {}",
        gpa(3),
        gpa(4),
        if ok && holds(4, 7) {
            "delivered the bytes"
        } else {
            "FAILED"
        }
    );
    if !(ok && holds(4, 7)) {
        return Err("DMA through the PV mappings did not deliver the bytes");
    }
    d.unmap(ib, PAGE as u64).map_err(|_| "UNMAP failed")?;
    page(4).fill(0);
    let _ = edu.dma(ib, true);
    let landed = !zero(4);
    let expect_landed = matches!(policy, Policy::Passthrough);
    println!(
        "dma-edu: DMA to IOVA {ib:#x} right after UNMAP returned: {} (policy {}: {})",
        if landed { "landed" } else { "blocked" },
        policy_name(policy),
        match policy {
            Policy::Passthrough => "memory stays reachable",
            Policy::Deferred => "may land until the queue is flushed",
            _ => "must be blocked",
        }
    );
    if policy != Policy::Deferred && landed != expect_landed {
        return Err("the device reached (or missed) an unmapped IOVA against the policy");
    }
    if policy == Policy::Deferred {
        // Wait out the bound without a single exit (no hypercall, no port I/O): only the
        // hypervisor's own timer can enforce it.
        let bound = u64::from(info.deferred_max_us);
        let t0 = crate::abi::rdtsc();
        while crate::abi::rdtsc() - t0 < (bound + 5_000) * boot.tsc_khz.get() / 1000 {
            core::hint::spin_loop();
        }
        page(4).fill(0);
        let _ = edu.dma(ib, true);
        let blocked = zero(4);
        println!(
            "dma-edu: {} us after UNMAP (bound {bound} us, no exits in between) the DMA is {}",
            bound + 5_000,
            if blocked { "blocked" } else { "landed" }
        );
        if !blocked {
            return Err("deferred: DMA still landed after the time bound");
        }
    }
    d.unmap(ia, PAGE as u64)
        .map_err(|_| "UNMAP of the source failed")?;
    let _ = d.sync_iotlb();
    let s = d.stats(false).map_err(|_| "STATS failed")?;
    println!(
        "dma-edu: stats: {} maps, {} unmaps, {} invalidations, {} waits, {} faults, live mappings {}, live pages {}, pending {}",
        s.maps, s.unmaps, s.invalidations, s.waits, s.faults, s.live_mappings, s.live_pages, s.pending_invalidations
    );
    if s.live_mappings != 0 || s.live_pages != 0 || s.pending_invalidations != 0 {
        return Err("mappings left after unmapping everything");
    }
    if policy != Policy::Passthrough && s.faults == 0 {
        return Err("the blocked DMA left no fault");
    }
    Ok(())
}
