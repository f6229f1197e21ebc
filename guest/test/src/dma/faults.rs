//! `dma-faults`: a blocked DMA arrives in the guest's fault ring.

use super::*;

/// `dma-faults`: a DMA the IOMMU blocks arrives in the guest's fault ring with the right
/// IOVA, source id, direction and reason.
pub fn faults() -> Outcome {
    let mut d = driver()?;
    let cap = d
        .attach_fault_ring(moat_pvdma::FaultRingArea {
            gpa: gpa(6),
            pages: 1,
            vector: 0,
        })
        .map_err(|_| "FAULT_RING_REGISTER failed")?;
    let mut sid = 0u16;
    pci::scan(|f| {
        if f.vendor == 0x1234 && f.device == 0x11e8 && sid == 0 {
            sid = u16::from(f.bus) << 8 | u16::from(f.dev) << 3 | u16::from(f.func);
        }
    });
    let edu = Edu::find().ok_or("no edu device")?;
    let iova = d
        .map(gpa(4), PAGE as u64, DmaFlags::WRITE)
        .map_err(|_| "MAP failed")?;
    d.unmap(iova, PAGE as u64).map_err(|_| "UNMAP failed")?;
    let _ = edu.dma(iova, true);
    // Any exit lets the hypervisor deliver; STATS is one.
    let _ = d.stats(false);
    let mut got = None;
    let mut n = 0;
    let poll = d
        .poll_faults(&mut |r| {
            n += 1;
            if got.is_none() && r.iova == iova {
                got = Some(r);
            }
        })
        .map_err(|_| "fault ring poll failed")?;
    let (st, _) = raw(
        Call::DmaMap,
        [gpa(6), 4096, DmaFlags::READ.bits() as u64, 0, 0, 0],
    );
    // A batch area may not overlap the fault ring.
    let (overlap, _) = raw(Call::DmaBatchRegister, [gpa(6), 1, 0, 0, 0, 0]);
    println!("dma-faults: batch area over the fault ring: {overlap:?}");
    match got {
        Some(r) => println!(
            "dma-faults: ring of {cap} records: {n} record(s), first for IOVA {:#x}: source {:#06x} (edu {sid:#06x}) direction {} reason {} seq {}; dropped {}; MAP of the ring page: {st:?}",
            r.iova, r.source_id, r.direction, r.reason, r.seq, poll.dropped
        ),
        None => println!("dma-faults: no record for IOVA {iova:#x} ({n} record(s) in the ring)"),
    }
    d.detach_fault_ring().map_err(|_| "unregister failed")?;
    let r = got.ok_or("the blocked DMA was not delivered to the fault ring")?;
    if r.source_id != sid
        || r.direction != moat_abi::dma::Direction::Write as u8
        || r.reason == 0
        || st != Some(Status::Perm)
        || overlap != Some(Status::Exist)
    {
        return Err("fault record fields wrong");
    }
    Ok(())
}
