//! `dma-demo` (the guest of `cargo xtask run`): maps a source and three destination buffers
//! with one MULTICALL, copies the source to each destination through edu's DMA engine by
//! their IOVAs, unmaps all four with one MULTICALL, and prints what the hypervisor counted
//! next to what each policy would have done.

use super::*;

/// `dma-demo`: the core of Moat's PV DMA in one screen.
pub fn demo() -> Outcome {
    let mut d = driver()?;
    let policy = d.info().policy;
    let edu = Edu::find().ok_or("no edu device")?;
    d.attach_batch(BatchArea {
        gpa: gpa(1),
        pages: 2,
    })
    .map_err(|_| "BATCH_REGISTER failed")?;
    fill(3, 42);
    for p in 4..7 {
        page(p).fill(0);
    }
    let s0 = d.stats(false).map_err(|_| "STATS failed")?;
    let mut iovas = [0u64; 4];
    let mut bad = false;
    for (p, flags) in [
        (3, DmaFlags::READ),
        (4, DmaFlags::WRITE),
        (5, DmaFlags::WRITE),
        (6, DmaFlags::WRITE),
    ] {
        d.queue_map(gpa(p), PAGE as u64, flags, &mut |_| bad = true)
            .map_err(|_| "queue MAP failed")?;
    }
    let mut k = 0;
    let maps = d
        .flush(&mut |c| {
            match c.result {
                Ok(iova) if k < 4 => iovas[k] = iova,
                _ => bad = true,
            }
            k += 1;
        })
        .map_err(|_| "MULTICALL (maps) failed")?;
    if bad {
        return Err("a MAP of the batch failed");
    }
    println!(
        "dma-demo: policy {}: mapped 4 buffers with {} MULTICALL(s): source {:#x} -> IOVA {:#x}, destinations {:#x} {:#x} {:#x} -> IOVAs {:#x} {:#x} {:#x}",
        policy_name(policy),
        maps.multicalls,
        gpa(3),
        iovas[0],
        gpa(4),
        gpa(5),
        gpa(6),
        iovas[1],
        iovas[2],
        iovas[3]
    );
    let mut ok = edu.dma(iovas[0], false);
    for &iova in &iovas[1..] {
        ok &= edu.dma(iova, true);
    }
    let copied = ok && (4..7).all(|p| holds(p, 42));
    println!(
        "dma-demo: edu DMA source -> device -> 3 destinations through the IOVAs: {}",
        if copied {
            "every destination holds the source's bytes"
        } else {
            "FAILED"
        }
    );
    let mid = d.stats(false).map_err(|_| "STATS failed")?;
    for &iova in &iovas {
        d.queue_unmap(iova, PAGE as u64, &mut |_| bad = true)
            .map_err(|_| "queue UNMAP failed")?;
    }
    let unmaps = d
        .flush(&mut |c| bad |= c.result.is_err())
        .map_err(|_| "MULTICALL (unmaps) failed")?;
    let s1 = d.stats(false).map_err(|_| "STATS failed")?;
    d.detach_batch().map_err(|_| "unregister failed")?;
    let inval = s1.invalidations.get() - mid.invalidations.get();
    let waits = s1.waits.get() - mid.waits.get();
    println!(
        "dma-demo: unmapped the 4 buffers with {} MULTICALL(s): {inval} IOTLB invalidation(s), {waits} wait(s); DMA hypercalls in all: {} (maps {}, unmaps {}); live mappings now {}",
        unmaps.multicalls,
        s1.exits.get() - s0.exits.get(),
        s1.maps.get() - s0.maps.get(),
        s1.unmaps.get() - s0.unmaps.get(),
        s1.live_mappings
    );
    println!("dma-demo: policy      | when a device can no longer use an unmapped buffer | invalidations for these 4 unmaps");
    for (p, when, cost) in [
        (
            Policy::Passthrough,
            "never (all guest RAM stays mapped, IOVA = GPA)",
            "0",
        ),
        (
            Policy::Strict,
            "when each UNMAP returns",
            "4 (one per UNMAP)",
        ),
        (
            Policy::Batched,
            "when the MULTICALL returns",
            "1 (one per batch)",
        ),
        (
            Policy::Deferred,
            "after the flush queue drains (<= 10 ms, 256 unmaps)",
            "0 now, 1 per queue flush",
        ),
    ] {
        let here = if p != policy {
            ""
        } else if inval == 1 {
            "  <- this guest: measured 1"
        } else {
            "  <- this guest (measured above)"
        };
        println!(
            "dma-demo: {:<11} | {:<50} | {cost}{here}",
            policy_name(p),
            when
        );
    }
    if bad || !copied {
        return Err("the demo's DMA did not deliver the bytes");
    }
    if policy == Policy::Batched && (inval != 1 || waits != 1) {
        return Err("batched: the unmap MULTICALL did not cost exactly one invalidation");
    }
    if s1.live_mappings.get() != 0 {
        return Err("mappings left after the demo");
    }
    Ok(())
}
