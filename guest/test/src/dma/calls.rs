//! `dma-calls`: the PV DMA calls without a device to drive (a machine whose device no IOMMU
//! translates, e.g. Bochs): QUERY, MAP (the IOVA it returns is printed for the scenario to
//! compare with the partition's host address), UNMAP, and what must be refused.

use super::*;

/// `dma-calls`: QUERY, MAP, UNMAP and the refusals, printed for the scenario.
pub fn calls(boot: &BootInfo) -> Outcome {
    let mut d = driver()?;
    let info = *d.info();
    println!(
        "dma-calls: policy {} iova width {} features {:#x} (IOVA is GPA: {})",
        policy_name(info.policy),
        info.limits.iova_width,
        info.features.0,
        info.features.has(moat_abi::dma::Features::IOVA_IS_GPA)
    );
    let iova = d
        .map(gpa(3), PAGE as u64, DmaFlags::READ_WRITE)
        .map_err(|_| "MAP failed")?;
    println!(
        "dma-calls: MAP of GPA {:#x} returned IOVA {iova:#x}",
        gpa(3)
    );
    d.unmap(iova, PAGE as u64).map_err(|_| "UNMAP failed")?;
    println!("dma-calls: UNMAP of IOVA {iova:#x}: OK");
    // Past the end of the guest's memory: not the guest's to map.
    let mem = boot.mem_size.get();
    let (outside, _) = raw(Call::DmaMap, [mem, PAGE as u64, 3, 0, 0, 0]);
    // An IOVA no MAP returned (page 1 of the bus: never inside a partition).
    let (foreign, _) = raw(Call::DmaUnmap, [0x1000, PAGE as u64, 0, 0, 0, 0]);
    println!(
        "dma-calls: MAP past the guest's memory: {outside:?}; UNMAP of IOVA 0x1000: {foreign:?}"
    );
    if outside.is_none() || foreign.is_none() {
        return Err("a MAP outside the guest or an UNMAP of a foreign IOVA was accepted");
    }
    let s = d.stats(false).map_err(|_| "STATS failed")?;
    println!(
        "dma-calls: stats: {} maps, {} unmaps, {} errors",
        s.maps, s.unmaps, s.errors
    );
    Ok(())
}
