//! Paravirtual DMA tests: the guest maps its own pages through `moat-pvdma` and drives the
//! assigned edu device's DMA engine through the IOVAs it gets back, then checks in its own
//! memory what the device could and could not reach.

use moat_abi::dma::{DmaFlags, Entry, Policy, Request, BATCH_HEADER_SIZE};
use moat_abi::zerocopy::little_endian::U64;
use moat_abi::{Args, Call, FromBytes, FromZeros, IntoBytes, Status};
use moat_pvdma::{BatchArea, Error, GuestBuffer, Hypervisor, Native, PvDma};

use crate::abi::BootInfo;
use crate::{pci, println, Outcome};

pub(crate) const PAGE: usize = 4096;
/// Bytes per edu DMA (QEMU refuses a range that ends exactly at the end of edu's buffer).
pub(crate) const LEN: u64 = 2048;

#[repr(C, align(4096))]
struct Pages([[u8; PAGE]; 8]);

/// Pages the tests use: 0 scratch, 1-2 batch area, 3 source, 4 destination, 5 spare.
static mut PAGES: Pages = Pages([[0; PAGE]; 8]);

pub(crate) fn page(i: usize) -> &'static mut [u8; PAGE] {
    // SAFETY: single-threaded test code on vCPU 0; each test takes the pages it uses, and
    // the hypervisor or device only touches them while the test waits for it.
    unsafe { &mut (*core::ptr::addr_of_mut!(PAGES)).0[i] }
}

pub(crate) fn gpa(i: usize) -> u64 {
    page(i).as_ptr() as u64
}

pub(crate) fn pattern(i: usize, seed: u8) -> u8 {
    (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8
}

pub(crate) fn fill(i: usize, seed: u8) {
    for (k, b) in page(i).iter_mut().enumerate() {
        *b = pattern(k, seed);
    }
}

pub(crate) fn holds(i: usize, seed: u8) -> bool {
    page(i)[..LEN as usize]
        .iter()
        .enumerate()
        .all(|(k, &b)| b == pattern(k, seed))
}

pub(crate) fn zero(i: usize) -> bool {
    page(i)[..LEN as usize].iter().all(|&b| b == 0)
}

/// The edu device through its BAR.
pub(crate) struct Edu(u64);

impl Edu {
    /// The first edu device the guest sees, with memory decode and bus mastering on.
    pub(crate) fn find() -> Option<Edu> {
        let mut found = None;
        pci::scan(|f| {
            if f.vendor == 0x1234 && f.device == 0x11e8 && found.is_none() {
                found = Some(f);
            }
        });
        let f = found?;
        // Memory decode and bus mastering.
        let cmd = pci::read32(f.bus, f.dev, f.func, 0x04) as u16;
        pci::write16(f.bus, f.dev, f.func, 0x04, cmd | 0x6);
        Some(Edu(u64::from(
            pci::read32(f.bus, f.dev, f.func, 0x10) & !0xf,
        )))
    }

    fn reg(&self, off: u64) -> *mut u64 {
        (self.0 + off) as *mut u64
    }

    /// Starts one DMA of LEN bytes and returns at once: `to_ram` = device buffer -> `iova`,
    /// else `iova` -> device buffer. edu runs it on a timer about 100 ms later.
    pub(crate) fn start(&self, iova: u64, to_ram: bool) {
        // SAFETY: edu's BAR is mapped into this guest (identity, uncached); these are its
        // 64-bit DMA registers; the device-side range [0x40000, 0x40800) is inside its buffer.
        unsafe {
            let (src, dst) = if to_ram {
                (0x40000, iova)
            } else {
                (iova, 0x40000)
            };
            core::ptr::write_volatile(self.reg(0x80), src);
            core::ptr::write_volatile(self.reg(0x88), dst);
            core::ptr::write_volatile(self.reg(0x90), LEN);
            core::ptr::write_volatile(self.reg(0x98), 1 | if to_ram { 2 } else { 0 });
        }
    }

    /// Whether the DMA started last is still running.
    pub(crate) fn busy(&self) -> bool {
        // SAFETY: as in `start`: edu's DMA command register.
        unsafe { core::ptr::read_volatile(self.reg(0x98)) & 1 != 0 }
    }

    /// Waits for the running DMA to finish; false if it never does.
    pub(crate) fn wait(&self) -> bool {
        for _ in 0..2_000_000_000u64 {
            if !self.busy() {
                return true;
            }
            core::hint::spin_loop();
        }
        false
    }

    /// One DMA of LEN bytes, waited for: `to_ram` = device buffer -> `iova`, else `iova` ->
    /// device.
    pub(crate) fn dma(&self, iova: u64, to_ram: bool) -> bool {
        self.start(iova, to_ram);
        self.wait()
    }
}

pub(crate) fn driver() -> Result<PvDma<Native>, &'static str> {
    // SAFETY: a Moat guest at CPL 0 with all memory identity mapped; the scratch page is
    // only used by the driver.
    let hv = unsafe { Native::new() };
    PvDma::probe(
        hv,
        GuestBuffer {
            gpa: gpa(0),
            len: PAGE as u64,
        },
    )
    .map_err(|e| {
        println!("dma: discovery failed: {e:?}");
        "PV DMA discovery failed"
    })
}

/// Loads edu's device buffer with pattern `seed` (page 3 mapped for the device to read,
/// one RAM -> device DMA, unmapped again).
pub(crate) fn load_pattern(d: &mut PvDma<Native>, edu: &Edu, seed: u8) -> Outcome {
    fill(3, seed);
    let src = d
        .map(gpa(3), PAGE as u64, DmaFlags::READ)
        .map_err(|_| "MAP of the source failed")?;
    if !edu.dma(src, false) {
        return Err("edu DMA did not finish");
    }
    d.unmap(src, PAGE as u64).map_err(|_| "UNMAP failed")?;
    Ok(())
}

pub(crate) fn policy_name(p: Policy) -> &'static str {
    match p {
        Policy::Passthrough => "passthrough",
        Policy::Strict => "strict",
        Policy::Batched => "batched",
        Policy::Deferred => "deferred",
    }
}

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
    fill(3, 7);
    page(4).fill(0);
    let ia = d
        .map(gpa(3), PAGE as u64, DmaFlags::READ)
        .map_err(|_| "MAP of the source failed")?;
    let ib = d
        .map(gpa(4), PAGE as u64, DmaFlags::WRITE)
        .map_err(|_| "MAP of the destination failed")?;
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
            if let (Request::Map { .. }, Ok(iova), Some(f)) = (c.request, c.result, first.get()) {
                if let Some(slot) = iovas.get_mut((c.ticket.0 - f) as usize) {
                    *slot = iova;
                }
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
            if let (Request::Map { .. }, Ok(iova)) = (c.request, c.result) {
                if let Some(slot) = iovas.get_mut((c.ticket.0 - f0) as usize) {
                    *slot = iova;
                }
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

pub(crate) fn raw(call: Call, a: [u64; 6]) -> (Option<Status>, [u64; 3]) {
    // SAFETY: as in `driver`.
    let mut hv = unsafe { Native::new() };
    let r = hv.hypercall(call, Args(a));
    (r.status(), r.values)
}

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

extern "C" {
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

#[repr(C, align(4096))]
struct BatchPages([[u8; PAGE]; 8]);

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

pub(crate) fn delay_ms(boot: &BootInfo, ms: u64) {
    let t0 = crate::abi::rdtsc();
    while crate::abi::rdtsc() - t0 < ms * boot.tsc_khz.get() {
        core::hint::spin_loop();
    }
}

/// Pages `dma-hold` maps (pages 3..8 of this guest's test pages).
const HOLD_PAGES: usize = 5;

/// `dma-hold=MS` (two-guest scenario, the victim): maps pages 3..8 for DMA, holds them MS
/// milliseconds while the other guest's device tries their IOVAs, then checks they are intact.
pub fn hold(boot: &BootInfo, ms: u64) -> Outcome {
    let mut d = driver()?;
    let mut iovas = [0u64; HOLD_PAGES];
    for (k, iova) in iovas.iter_mut().enumerate() {
        fill(3 + k, 0xA0 + k as u8);
        *iova = d
            .map(gpa(3 + k), PAGE as u64, DmaFlags::READ_WRITE)
            .map_err(|_| "MAP failed")?;
    }
    let mut list = [0u8; 128];
    let mut w = Cursor(&mut list, 0);
    for iova in iovas {
        let _ = core::fmt::Write::write_fmt(&mut w, format_args!(" {iova:#x}"));
    }
    let n = w.1;
    println!(
        "dma-hold: pages mapped at IOVAs{}; holding {ms} ms",
        core::str::from_utf8(&list[..n]).unwrap_or("?")
    );
    delay_ms(boot, ms);
    let intact = (0..HOLD_PAGES).all(|k| holds(3 + k, 0xA0 + k as u8));
    for iova in iovas {
        d.unmap(iova, PAGE as u64).map_err(|_| "UNMAP failed")?;
    }
    println!(
        "dma-hold: after {ms} ms the pages are {}",
        if intact { "intact" } else { "MODIFIED" }
    );
    if intact {
        Ok(())
    } else {
        Err("another guest's device wrote into this guest's mapped pages")
    }
}

/// A `fmt::Write` into a byte buffer (drops what does not fit).
struct Cursor<'a>(&'a mut [u8], usize);

impl core::fmt::Write for Cursor<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.0.len() - self.1);
        self.0[self.1..self.1 + n].copy_from_slice(&s.as_bytes()[..n]);
        self.1 += n;
        Ok(())
    }
}

/// `dma-foreign=MS` (two-guest scenario, the attacker): after MS ms, programs its own edu to
/// write to IOVAs the other guest holds (the three after its own two mappings; the scenario
/// checks the other guest holds each), and to map memory outside its own RAM.
pub fn foreign(boot: &BootInfo, ms: u64) -> Outcome {
    let mut d = driver()?;
    let edu = Edu::find().ok_or("no edu device")?;
    delay_ms(boot, ms);
    fill(3, 0x5A);
    page(4).fill(0);
    let src = d
        .map(gpa(3), PAGE as u64, DmaFlags::READ)
        .map_err(|_| "MAP failed")?;
    let own = d
        .map(gpa(4), PAGE as u64, DmaFlags::WRITE)
        .map_err(|_| "MAP failed")?;
    let loaded = edu.dma(src, false);
    // Its own mapping at the same IOVA values the other guest uses reaches its own page only.
    let mine = edu.dma(own, true) && holds(4, 0x5A);
    // IOVAs only the other guest has mapped: nothing in this guest's domain. Each DMA must
    // fault on its own.
    let mut faulted = [0u64; 3];
    for (k, n) in faulted.iter_mut().enumerate() {
        let iova = own + (k as u64 + 1) * PAGE as u64;
        let before = d.stats(false).map_err(|_| "STATS failed")?.faults.get();
        let _ = edu.dma(iova, true);
        // The fault reaches the counters through the hypervisor's fault handling: give it
        // up to 100 ms.
        for _ in 0..100 {
            *n = d.stats(false).map_err(|_| "STATS failed")?.faults.get() - before;
            if *n > 0 {
                break;
            }
            delay_ms(boot, 1);
        }
        println!("dma-foreign: write to IOVA {iova:#x}: {n} fault(s) in this guest's domain");
    }
    // The other guest's RAM is not this guest's RAM: beyond the end of its own.
    let (st, _) = raw(
        Call::DmaMap,
        [
            boot.mem_size.get(),
            4096,
            DmaFlags::READ_WRITE.bits() as u64,
            0,
            0,
            0,
        ],
    );
    println!(
        "dma-foreign: own IOVA {own:#x} reached its own page: {}; MAP of GPA {:#x} (past its RAM): {st:?}",
        loaded && mine,
        boot.mem_size.get()
    );
    d.unmap(src, PAGE as u64).map_err(|_| "UNMAP failed")?;
    d.unmap(own, PAGE as u64).map_err(|_| "UNMAP failed")?;
    if !(loaded && mine) || faulted.contains(&0) || st != Some(Status::Fault) {
        return Err("isolation between guests not shown");
    }
    Ok(())
}

/// `dma-smp` hand-over slots: vCPU v publishes the IOVAs it mapped in `SMP_SLOTS[v]`; vCPU
/// v+1 (mod n) unmaps them. A slot holds the IOVA from MAP's return until the UNMAP of it has
/// returned (then 0); bit 0 set means "UNMAP in progress" (the hypervisor may or may not have
/// released it yet).
static SMP_SLOTS: [[core::sync::atomic::AtomicU64; 4]; 4] =
    [const { [const { core::sync::atomic::AtomicU64::new(0) }; 4] }; 4];
/// Last vCPU that was handed each IOVA page (index (iova - 1 MiB) / 4 KiB), + 1; 0 = never.
static SMP_LAST: [core::sync::atomic::AtomicU8; 4096] =
    [const { core::sync::atomic::AtomicU8::new(0) }; 4096];
const SMP_UNMAPPING: u64 = 1;
static SMP_DONE: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
static SMP_DUPS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
static SMP_OPS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
/// MAPs that returned an IOVA another vCPU was handed before (reuse across vCPUs).
static SMP_CROSS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
static SMP_FAILED: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

#[repr(C, align(4096))]
struct Scratch([[u8; PAGE]; 4]);
static mut SMP_SCRATCH: Scratch = Scratch([[0; PAGE]; 4]);

/// Waits until `cond` holds, another worker failed, or about 60 s passed.
fn smp_wait(tsc_khz: u64, mut cond: impl FnMut() -> bool) -> Result<(), &'static str> {
    let t0 = crate::abi::rdtsc();
    while !cond() {
        if SMP_FAILED.load(core::sync::atomic::Ordering::SeqCst) {
            return Err("another dma-smp worker failed");
        }
        if crate::abi::rdtsc() - t0 > 60_000 * tsc_khz {
            return Err("timed out waiting for another vCPU");
        }
        core::hint::spin_loop();
    }
    Ok(())
}

/// One vCPU's part of `dma-smp=N` on `vcpus` vCPUs: N rounds of mapping 4 pages and handing
/// the IOVAs to the next vCPU, which unmaps them, so every IOVA is freed on another vCPU
/// than the one it was allocated on (and the allocator's per-vCPU caches move IOVAs between
/// vCPUs). After each MAP: no slot may hold the same IOVA unless that slot's UNMAP is in
/// progress (a definite double hand-out). Returns the duplicates seen.
pub fn smp_worker(
    vcpu: usize,
    vcpus: usize,
    rounds: u64,
    tsc_khz: u64,
) -> Result<u64, &'static str> {
    let r = smp_work(vcpu, vcpus, rounds, tsc_khz);
    if r.is_err() {
        SMP_FAILED.store(true, core::sync::atomic::Ordering::SeqCst);
    }
    SMP_DONE.fetch_add(1, core::sync::atomic::Ordering::SeqCst);
    r
}

fn smp_work(vcpu: usize, vcpus: usize, rounds: u64, tsc_khz: u64) -> Result<u64, &'static str> {
    use core::sync::atomic::Ordering::SeqCst;
    let n = vcpus.clamp(1, 4);
    let v = vcpu % n;
    let prev = (v + n - 1) % n;
    let scratch = core::ptr::addr_of!(SMP_SCRATCH) as u64 + (v * PAGE) as u64;
    // SAFETY: as in `driver`; each vCPU has its own scratch page.
    let hv = unsafe { Native::new() };
    let mut d = PvDma::probe(
        hv,
        GuestBuffer {
            gpa: scratch,
            len: PAGE as u64,
        },
    )
    .map_err(|_| "discovery failed")?;
    // 8 pages per vCPU: the 4 it maps now and the 4 still waiting to be unmapped.
    let base = (48u64 << 20) + (v as u64) * (64 << 10);
    let mut dups = 0;
    for r in 0..rounds {
        let half = (r & 1) * 4;
        for (k, slot) in SMP_SLOTS[v].iter().enumerate() {
            // The next vCPU has unmapped what this slot held last round.
            smp_wait(tsc_khz, || slot.load(SeqCst) == 0)?;
            let iova = d
                .map(
                    base + (half + k as u64) * PAGE as u64,
                    PAGE as u64,
                    DmaFlags::READ_WRITE,
                )
                .map_err(|_| "MAP failed")?;
            for slots in SMP_SLOTS.iter() {
                if slots.iter().any(|s| s.load(SeqCst) == iova) {
                    dups += 1;
                }
            }
            if let Some(last) = iova
                .checked_sub(1 << 20)
                .and_then(|o| SMP_LAST.get((o / PAGE as u64) as usize))
            {
                let before = last.swap(v as u8 + 1, SeqCst);
                if before != 0 && before != v as u8 + 1 {
                    SMP_CROSS.fetch_add(1, SeqCst);
                }
            }
            slot.store(iova, SeqCst);
        }
        // Unmap what the previous vCPU handed over this round.
        for slot in SMP_SLOTS[prev].iter() {
            let mut iova = 0;
            smp_wait(tsc_khz, || {
                iova = slot.load(SeqCst);
                iova != 0 && iova & SMP_UNMAPPING == 0
            })?;
            slot.store(iova | SMP_UNMAPPING, SeqCst);
            let r = d.unmap(iova, PAGE as u64);
            // Only now is the IOVA free: clear the slot after UNMAP returned.
            slot.store(0, SeqCst);
            r.map_err(|_| "UNMAP failed")?;
        }
        SMP_OPS.fetch_add(4, SeqCst);
    }
    SMP_DUPS.fetch_add(dups, SeqCst);
    Ok(dups)
}

/// `dma-smp=N` on vCPU 0: runs its own worker, waits for the others, reports.
pub fn smp(boot: &BootInfo, rounds: u64) -> Outcome {
    use core::sync::atomic::Ordering::SeqCst;
    let vcpus = u64::from(boot.vcpus.get()).min(4);
    let mine = smp_worker(0, vcpus as usize, rounds, boot.tsc_khz.get());
    let t0 = crate::abi::rdtsc();
    while SMP_DONE.load(SeqCst) < vcpus {
        if crate::abi::rdtsc() - t0 > 120_000 * boot.tsc_khz.get() {
            return Err("the other vCPUs did not finish");
        }
        core::hint::spin_loop();
    }
    mine?;
    if SMP_FAILED.load(SeqCst) {
        return Err("a dma-smp worker failed");
    }
    let mut d = driver()?;
    let s = d.stats(false).map_err(|_| "STATS failed")?;
    let held = SMP_SLOTS
        .iter()
        .flatten()
        .filter(|s| s.load(SeqCst) != 0)
        .count();
    println!(
        "dma-smp: {vcpus} vCPUs, {} map+unmap operations (each IOVA unmapped by the next vCPU), IOVAs reused across vCPUs: {}, IOVA held by two vCPUs at once: {} time(s); slots still held: {held}; live mappings after: {}",
        SMP_OPS.load(SeqCst),
        SMP_CROSS.load(SeqCst),
        SMP_DUPS.load(SeqCst),
        s.live_mappings
    );
    if SMP_DUPS.load(SeqCst) != 0 || s.live_mappings != 0 || held != 0 {
        return Err("an IOVA was handed out twice or mappings were left");
    }
    if vcpus > 1 && SMP_CROSS.load(SeqCst) == 0 {
        return Err("no IOVA moved between vCPUs: the workload did not force reuse");
    }
    Ok(())
}

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

static RACE_GO: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
static RACE_STOP: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
static RACE_WRITES: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
/// Odd while vCPU 0 is inside a MULTICALL over the race batch (bumped before and after).
static RACE_SEQ: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
/// Rewrites vCPU 1 made entirely inside one MULTICALL (SEQ odd and unchanged around it).
static RACE_OVERLAP: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
/// First GPA of the in-guest pages and of the out-of-guest range (set before RACE_GO).
static RACE_IN: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
static RACE_OUT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
/// Entries in the race batch.
const RACE_N: usize = 32;
/// Most MULTICALL rounds `dma-race` runs to see rewrites during a call, OK and FAULT entries.
const RACE_ROUNDS: usize = 6;
static mut RACE_BATCH: BatchPages = BatchPages([[0; PAGE]; 8]);

fn race_entry(i: usize) -> *mut u8 {
    (core::ptr::addr_of_mut!(RACE_BATCH) as *mut u8).wrapping_add(BATCH_HEADER_SIZE + i * 48)
}

/// vCPU 1 of `dma-race`: rewrites the `gpa` of vCPU 0's MAP entries, flipping each between
/// its own page inside the guest and a page outside the guest (both otherwise valid MAPs),
/// until told to stop, and counts the rewrites that happened entirely during one MULTICALL.
/// A hypervisor that validated one read of `gpa` and mapped another would map memory
/// outside the guest for an entry it reports OK: vCPU 0 sees that with a DMA through it.
pub fn race_scribbler() {
    use core::sync::atomic::Ordering::SeqCst;
    while !RACE_GO.load(SeqCst) {
        core::hint::spin_loop();
    }
    let (inside, outside) = (RACE_IN.load(SeqCst), RACE_OUT.load(SeqCst));
    let mut k = 0u64;
    while !RACE_STOP.load(SeqCst) {
        let i = (k as usize * 7) % RACE_N;
        let out = (k / RACE_N as u64) & 1 == 0;
        let gpa = if out { outside } else { inside } + (i * PAGE) as u64;
        let before = RACE_SEQ.load(SeqCst);
        // SAFETY: the entry is in this guest's memory; the write races with the hypervisor's
        // reads on purpose (that is the test); no Rust reference to it exists. An aligned
        // 8-byte store: the hypervisor sees the old or the new GPA, never a mix.
        unsafe { core::ptr::write_volatile(race_entry(i).add(8) as *mut u64, gpa) };
        if before & 1 == 1 && RACE_SEQ.load(SeqCst) == before {
            RACE_OVERLAP.fetch_add(1, SeqCst);
        }
        k += 1;
    }
    RACE_WRITES.store(k, SeqCst);
}

/// `dma-race` on vCPU 0: MULTICALLs over MAP entries whose GPA vCPU 1 keeps flipping between
/// a page inside the guest and one outside. Every entry reported OK must map exactly its
/// in-guest page (an edu DMA through its IOVA lands there) and be one live mapping (UNMAP of
/// its IOVA succeeds once); every other entry must be FAULT and create nothing; rewrites
/// during a MULTICALL must have happened (else the test showed nothing).
pub fn race(boot: &BootInfo) -> Outcome {
    use core::sync::atomic::Ordering::SeqCst;
    let mut d = driver()?;
    let edu = Edu::find().ok_or("no edu device")?;
    let inside = 56u64 << 20;
    if inside + (RACE_N * PAGE) as u64 > boot.mem_size.get() {
        return Err("dma-race needs 64 MiB of guest memory");
    }
    // Outside the guest, but host RAM a double fetch could really map.
    let outside = boot.mem_size.get() + (1 << 20);
    RACE_IN.store(inside, SeqCst);
    RACE_OUT.store(outside, SeqCst);
    let in_page = |i: usize| (inside + (i * PAGE) as u64) as *mut u8;
    // edu's buffer gets a known pattern once; every DMA below writes it to one IOVA.
    load_pattern(&mut d, &edu, 0x3c)?;
    let area = core::ptr::addr_of!(RACE_BATCH) as u64;
    let (st, _) = raw(Call::DmaBatchRegister, [area, 2, 0, 0, 0, 0]);
    if st != Some(Status::Ok) {
        return Err("BATCH_REGISTER failed");
    }
    let hdr = moat_abi::dma::BatchHeader::new(RACE_N as u32);
    let hdr = hdr.as_bytes();
    // SAFETY: the area is this test's; vCPU 1 only starts writing after RACE_GO.
    unsafe {
        core::ptr::copy_nonoverlapping(hdr.as_ptr(), area as *mut u8, BATCH_HEADER_SIZE);
        for i in 0..RACE_N {
            let e = Entry::map(
                inside + (i * PAGE) as u64,
                PAGE as u64,
                DmaFlags::READ_WRITE,
            );
            core::ptr::copy_nonoverlapping(e.as_bytes().as_ptr(), race_entry(i), 48);
        }
    }
    RACE_GO.store(true, SeqCst);
    let (mut ok, mut fault, mut other, mut landed, mut unmapped, mut stray) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut rounds = 0;
    let mut counted_live = true;
    while rounds < RACE_ROUNDS {
        rounds += 1;
        for i in 0..RACE_N {
            // SAFETY: the in-guest pages lie inside this guest's identity-mapped RAM, unused
            // by anything else; nothing maps them for the device at this point.
            unsafe { core::ptr::write_bytes(in_page(i), 0, PAGE) };
            // Reset the output fields; vCPU 1 only ever writes `gpa`.
            // SAFETY: as in the scribbler: plain guest memory, no reference exists.
            unsafe {
                let e = race_entry(i);
                core::ptr::write_volatile(e.add(16) as *mut u64, 0);
                core::ptr::write_volatile(e.add(32) as *mut i64, moat_abi::dma::STATUS_PENDING);
                core::ptr::write_volatile(e.add(40) as *mut u64, 0);
            }
        }
        let mut cursor = 0u64;
        let mut calls = 0;
        RACE_SEQ.fetch_add(1, SeqCst);
        while cursor < RACE_N as u64 && calls < 10 * RACE_N {
            calls += 1;
            let (_, v) = raw(Call::DmaMulticall, [cursor, 0, 0, 0, 0, 0]);
            cursor = match v[2] & 0xff {
                0 => break,
                1 => v[0] + 1,
                2 => v[0],
                _ => {
                    RACE_SEQ.fetch_add(1, SeqCst);
                    return Err("MULTICALL rejected");
                }
            };
        }
        RACE_SEQ.fetch_add(1, SeqCst);
        let mut iovas = [0u64; RACE_N];
        let mut round_ok = 0;
        for (i, iova) in iovas.iter_mut().enumerate() {
            let mut b = [0u8; 48];
            // SAFETY: the output fields are only written by the hypervisor, which is done
            // with this batch; plain guest memory.
            unsafe { core::ptr::copy_nonoverlapping(race_entry(i), b.as_mut_ptr(), 48) };
            let e: Entry = moat_abi::zerocopy::transmute!(b);
            let (e_iova, e_done) = (e.iova.get(), e.done.get());
            match e.outcome_status() {
                Some(Status::Ok) if e_iova != 0 && e_done == PAGE as u64 => {
                    ok += 1;
                    round_ok += 1;
                    *iova = e_iova;
                }
                Some(Status::Fault) if e_iova == 0 && e_done == 0 => fault += 1,
                _ => other += 1,
            }
        }
        let live = d.stats(false).map_err(|_| "STATS failed")?.live_mappings;
        counted_live &= live == round_ok;
        for (i, &iova) in iovas.iter().enumerate() {
            if iova == 0 {
                continue;
            }
            if !edu.dma(iova, true) {
                return Err("edu DMA did not finish");
            }
            // SAFETY: as above; the device wrote it and is done.
            let page = unsafe { core::slice::from_raw_parts(in_page(i), LEN as usize) };
            if page.iter().enumerate().all(|(k, &b)| b == pattern(k, 0x3c)) {
                landed += 1;
            }
        }
        for (i, &iova) in iovas.iter().enumerate() {
            if iova != 0 {
                if d.unmap(iova, PAGE as u64).is_ok() {
                    unmapped += 1;
                }
            } else {
                // SAFETY: as above.
                let page = unsafe { core::slice::from_raw_parts(in_page(i), PAGE) };
                if page.iter().any(|&b| b != 0) {
                    stray += 1;
                }
            }
        }
        // Enough once rewrites happened during a call and both outcomes were seen.
        if ok > 0 && fault > 0 && RACE_OVERLAP.load(SeqCst) > 0 {
            break;
        }
    }
    RACE_STOP.store(true, SeqCst);
    let t0 = crate::abi::rdtsc();
    while RACE_WRITES.load(SeqCst) == 0 && crate::abi::rdtsc() - t0 < 10_000 * boot.tsc_khz.get() {
        core::hint::spin_loop();
    }
    let s = d.stats(false).map_err(|_| "STATS failed")?;
    let overlap = RACE_OVERLAP.load(SeqCst);
    println!(
        "dma-race: {rounds} round(s) of {RACE_N} MAP entries while vCPU 1 flipped their GPA inside/outside the guest: {} rewrites, {overlap} during a MULTICALL; {ok} OK (DMA through the IOVA reached the entry's own page: {landed}, unmapped once: {unmapped}, live mappings matched: {counted_live}), {fault} FAULT (their pages untouched: {}), {other} other; live mappings after: {}",
        RACE_WRITES.load(SeqCst),
        fault - stray.min(fault),
        s.live_mappings
    );
    let _ = raw(Call::DmaBatchRegister, [0, 0, 0, 0, 0, 0]);
    if overlap == 0 {
        return Err("no rewrite happened during a MULTICALL: the race was not exercised");
    }
    if ok == 0 || fault == 0 {
        return Err("the race produced no OK or no FAULT entry");
    }
    if ok + fault != (rounds * RACE_N) as u64
        || other != 0
        || landed != ok
        || unmapped != ok
        || stray != 0
        || !counted_live
        || s.live_mappings != 0
    {
        return Err("the hypervisor acted on entries inconsistently with what it reported");
    }
    Ok(())
}
