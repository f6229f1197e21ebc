//! `dma-bad`: the bad-input matrix: every row gets its exact status and changes nothing.

use super::*;

/// `dma-bad`: every row of the bad-input matrix gets its exact status and changes nothing.
pub fn bad(info: &BootInfo) -> Outcome {
    let mut d = driver()?;
    let mem = info.mem_size.get();
    let base = d.stats(false).map_err(|_| "STATS failed")?;
    let live = d
        .map(gpa(3), PAGE as u64, DmaFlags::READ)
        .map_err(|_| "MAP failed")?;
    let rw = DmaFlags::READ_WRITE.bits() as u64;
    let mut failures = 0;
    let rows: [(&str, Call, [u64; 6], Status); 19] = [
        (
            "unknown flag",
            Call::DmaMap,
            [gpa(5), 4096, 0x4, 0, 0, 0],
            Status::Inval,
        ),
        (
            "no rights",
            Call::DmaMap,
            [gpa(5), 4096, 0, 0, 0, 0],
            Status::Inval,
        ),
        (
            "zero length",
            Call::DmaMap,
            [gpa(5), 0, rw, 0, 0, 0],
            Status::Inval,
        ),
        (
            "unaligned gpa",
            Call::DmaMap,
            [gpa(5) + 8, 4096, rw, 0, 0, 0],
            Status::Inval,
        ),
        (
            "unaligned length",
            Call::DmaMap,
            [gpa(5), 4095, rw, 0, 0, 0],
            Status::Inval,
        ),
        (
            "overflowing length",
            Call::DmaMap,
            [gpa(5), !0xfff, rw, 0, 0, 0],
            Status::Range,
        ),
        (
            "huge length",
            Call::DmaMap,
            [gpa(5), 1 << 40, rw, 0, 0, 0],
            Status::Range,
        ),
        (
            "gpa outside the guest",
            Call::DmaMap,
            [mem, 4096, rw, 0, 0, 0],
            Status::Fault,
        ),
        (
            "straddling the end of RAM",
            Call::DmaMap,
            [mem - 4096, 8192, rw, 0, 0, 0],
            Status::Fault,
        ),
        (
            "overlap with a live mapping",
            Call::DmaMap,
            [gpa(3), 4096, rw, 0, 0, 0],
            Status::Exist,
        ),
        (
            "unmap never mapped",
            Call::DmaUnmap,
            [0x0f00_0000, 4096, 0, 0, 0, 0],
            Status::Noent,
        ),
        (
            "partial unmap",
            Call::DmaUnmap,
            [live, 8192, 0, 0, 0, 0],
            Status::Inval,
        ),
        (
            "unmap flags",
            Call::DmaUnmap,
            [live, 4096, 1, 0, 0, 0],
            Status::Inval,
        ),
        (
            // edu's 28-bit window: the MSI window is past the IOVA width (the PERM row runs
            // on a 32-bit device in `dma-msi`).
            "unmap at 0xfee00000 (past a 28-bit IOVA width)",
            Call::DmaUnmap,
            [0xfee0_0000, 4096, 0, 0, 0, 0],
            Status::Range,
        ),
        (
            "batch area outside the guest",
            Call::DmaBatchRegister,
            [mem, 1, 0, 0, 0, 0],
            Status::Fault,
        ),
        (
            "batch area too large",
            Call::DmaBatchRegister,
            [gpa(1), 1000, 0, 0, 0, 0],
            Status::Range,
        ),
        (
            // gpa + pages * 4096 overflows: a panic in an overflow-checked hypervisor.
            "batch area whose end overflows",
            Call::DmaBatchRegister,
            [0xffff_ffff_ffff_f000, 2, 0, 0, 0, 0],
            Status::Fault,
        ),
        (
            "fault ring whose end overflows",
            Call::DmaFaultRingRegister,
            [0xffff_ffff_ffff_f000, 2, 0, 0, 0, 0],
            Status::Fault,
        ),
        (
            "sync with an argument",
            Call::DmaSync,
            [1, 0, 0, 0, 0, 0],
            Status::Inval,
        ),
    ];
    if d.info().limits.iova_width > 28 {
        println!(
            "dma-bad: IOVA width {} (edu's is 28) WRONG",
            d.info().limits.iova_width
        );
        failures += 1;
    }
    let map_unmap_rows = rows
        .iter()
        .filter(|r| matches!(r.1, Call::DmaMap | Call::DmaUnmap))
        .count() as u64;
    for (what, call, args, want) in rows {
        let (got, _) = raw(call, args);
        let ok = got == Some(want);
        println!(
            "dma-bad: {what}: {:?} (want {:?}) {}",
            got,
            want,
            if ok { "ok" } else { "WRONG" }
        );
        if !ok {
            failures += 1;
        }
    }
    // MULTICALL rows: no batch area, then a header with a count beyond the capacity, an entry
    // with a reserved field set and an unknown op (each entry fails with its own status).
    let (st, v) = raw(Call::DmaMulticall, [0, 0, 0, 0, 0, 0]);
    let ok = st == Some(Status::Noent) && v[2] == 3;
    println!(
        "dma-bad: multicall without a batch area: {st:?} stop {} {}",
        v[2],
        if ok { "ok" } else { "WRONG" }
    );
    failures += !ok as u32;
    let cap = d
        .attach_batch(BatchArea {
            gpa: gpa(1),
            pages: 1,
        })
        .map_err(|_| "BATCH_REGISTER failed")?;
    let hdr = moat_abi::dma::BatchHeader::new;
    page(1)[..BATCH_HEADER_SIZE].copy_from_slice(hdr(cap + 1).as_bytes());
    let (st, v) = raw(Call::DmaMulticall, [0, 0, 0, 0, 0, 0]);
    let ok = st == Some(Status::Range) && v[2] == 3;
    println!(
        "dma-bad: batch count {} past capacity {cap}: {st:?} {}",
        cap + 1,
        if ok { "ok" } else { "WRONG" }
    );
    failures += !ok as u32;
    let mut e = Request::Map {
        gpa: gpa(5),
        length: 4096,
        flags: DmaFlags::READ,
    }
    .to_entry();
    e.reserved = 1.into();
    let mut u = Entry::unmap(live, 4096);
    u.op = 9.into();
    page(1)[..BATCH_HEADER_SIZE].copy_from_slice(hdr(2).as_bytes());
    page(1)[BATCH_HEADER_SIZE..BATCH_HEADER_SIZE + 48].copy_from_slice(e.as_bytes());
    page(1)[BATCH_HEADER_SIZE + 48..BATCH_HEADER_SIZE + 96].copy_from_slice(u.as_bytes());
    let (st, v) = raw(Call::DmaMulticall, [0, 0, 0, 0, 0, 0]);
    let e0 = Entry::read_from_bytes(&page(1)[BATCH_HEADER_SIZE..BATCH_HEADER_SIZE + 48])
        .unwrap_or_else(|_| Entry::new_zeroed());
    let ok = st == Some(Status::Inval)
        && v[0] == 0
        && v[2] == 1
        && e0.outcome_status() == Some(Status::Inval);
    println!(
        "dma-bad: entry with a reserved field set: {st:?} cursor {} stop {} entry status {:?} {}",
        v[0],
        v[2],
        e0.outcome_status(),
        if ok { "ok" } else { "WRONG" }
    );
    failures += !ok as u32;
    let (st, v) = raw(Call::DmaMulticall, [1, 0, 0, 0, 0, 0]);
    let ok = st == Some(Status::Inval) && v[0] == 1 && v[2] == 1;
    println!(
        "dma-bad: entry with an unknown op (resumed at cursor 1): {st:?} cursor {} stop {} {}",
        v[0],
        v[2],
        if ok { "ok" } else { "WRONG" }
    );
    failures += !ok as u32;
    let _ = d.detach_batch();
    // Mapping a page of the registered batch area is refused.
    let _ = d.attach_batch(BatchArea {
        gpa: gpa(1),
        pages: 1,
    });
    let (st, _) = raw(Call::DmaMap, [gpa(1), 4096, rw, 0, 0, 0]);
    let ok = st == Some(Status::Perm);
    println!(
        "dma-bad: map of the batch area: {st:?} {}",
        if ok { "ok" } else { "WRONG" }
    );
    failures += !ok as u32;
    let _ = d.detach_batch();
    // State unchanged: exactly the one live mapping.
    let s = d.stats(false).map_err(|_| "STATS failed")?;
    println!(
        "dma-bad: after {} refused calls: live mappings {} (1 expected), maps {} (+1), errors +{}",
        s.errors - base.errors,
        s.live_mappings,
        s.maps - base.maps,
        s.errors - base.errors
    );
    if s.live_mappings != 1 || s.maps - base.maps != 1 {
        failures += 1;
    }
    // Every refused MAP/UNMAP counts as an error, whichever layer refused it (the ABI's
    // decoding or the service).
    let ok = s.errors - base.errors >= map_unmap_rows;
    println!(
        "dma-bad: errors counted for the {map_unmap_rows} refused MAP/UNMAP rows: {} {}",
        s.errors - base.errors,
        if ok { "ok" } else { "WRONG" }
    );
    failures += !ok as u32;
    // A refused MULTICALL returns the cursor passed in, all 64 bits of it.
    let cursor = 0x1_0000_0005u64;
    let (st, v) = raw(Call::DmaMulticall, [cursor, 0, 0, 0, 0, 0]);
    let ok = st == Some(Status::Noent) && v[0] == cursor && v[2] == 3;
    println!(
        "dma-bad: refused MULTICALL with cursor {cursor:#x}: {st:?} RDX {:#x} stop {} {}",
        v[0],
        v[2],
        if ok { "ok" } else { "WRONG" }
    );
    failures += !ok as u32;
    // STATS RESET zeroes the counters (not the gauges), atomically with the read.
    let before = d.stats(true).map_err(|_| "STATS RESET failed")?;
    let after = d.stats(false).map_err(|_| "STATS failed")?;
    let ok = before.maps > 0
        && after.maps == 0
        && after.unmaps == 0
        && after.errors == 0
        && after.multicalls == 0
        && after.invalidations == 0
        && after.exits <= 1
        && after.live_mappings == 1;
    println!(
        "dma-bad: STATS RESET: maps {} -> {}, errors {} -> {}, exits {} -> {}, live mappings {} -> {} {}",
        before.maps,
        after.maps,
        before.errors,
        after.errors,
        before.exits,
        after.exits,
        before.live_mappings,
        after.live_mappings,
        if ok { "ok" } else { "WRONG" }
    );
    failures += !ok as u32;
    d.unmap(live, PAGE as u64).map_err(|_| "UNMAP failed")?;
    if d.unmap(live, PAGE as u64) != Err(Error::Status(moat_abi::Error::Noent)) {
        println!("dma-bad: double unmap: not NOENT WRONG");
        failures += 1;
    } else {
        println!("dma-bad: double unmap: NOENT ok");
    }
    failures += hypervisor_address_as_gpa(&mut d)?;
    if failures == 0 {
        Ok(())
    } else {
        Err("some bad inputs got the wrong status or changed state")
    }
}

/// The host-physical address the hypervisor is loaded at (`hypervisor/kernel/linker.ld`).
const HYPERVISOR_LOAD: u64 = 2 << 20;

unsafe extern "C" {
    /// End of this guest's image (`linker.ld`).
    static __image_end: u8;
}

/// A GPA numerically equal to the hypervisor's own host-physical load address names this
/// guest's page there, nothing else: MAP succeeds, and a DMA through the IOVA reads the
/// guest's bytes, not the hypervisor's code. Returns the number of failures.
fn hypervisor_address_as_gpa(d: &mut PvDma<Native>) -> Result<u32, &'static str> {
    let at = HYPERVISOR_LOAD;
    let end = core::ptr::addr_of!(__image_end) as u64;
    if end > at {
        println!("dma-bad: guest image ends at {end:#x}, past {at:#x} WRONG");
        return Ok(1);
    }
    let edu = Edu::find().ok_or("no edu device")?;
    // SAFETY: [at, at + PAGE) is guest RAM past this guest's image, used by nothing else.
    let theirs = unsafe { core::slice::from_raw_parts_mut(at as *mut u8, PAGE) };
    for (k, b) in theirs.iter_mut().enumerate() {
        *b = pattern(k, 0x77);
    }
    page(4).fill(0);
    let st = d.map(at, PAGE as u64, DmaFlags::READ);
    let dst = d
        .map(gpa(4), PAGE as u64, DmaFlags::WRITE)
        .map_err(|_| "MAP failed")?;
    let read_back = match st {
        Ok(iova) => {
            let ok = edu.dma(iova, false) && edu.dma(dst, true) && holds(4, 0x77);
            d.unmap(iova, PAGE as u64).map_err(|_| "UNMAP failed")?;
            ok
        }
        Err(_) => false,
    };
    d.unmap(dst, PAGE as u64).map_err(|_| "UNMAP failed")?;
    let ok = st.is_ok() && read_back;
    println!(
        "dma-bad: GPA {at:#x} (the hypervisor's host-physical load address): MAP {}, a DMA through it read the guest's own page: {read_back} {}",
        if st.is_ok() { "Ok" } else { "refused" },
        if ok { "ok" } else { "WRONG" }
    );
    Ok(!ok as u32)
}
