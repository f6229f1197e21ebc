//! PV DMA tests about what a device can reach and when: the MSI window of a 32-bit device
//! (`dma-msi`), the stale window after UNMAP measured with real edu DMA (`dma-stale`), and a
//! DMA left running when the guest stops (`dma-stop`).

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};

use moat_abi::dma::{DmaFlags, Entry, Policy, RegionKind, BATCH_HEADER_SIZE};
use moat_abi::{Call, IntoBytes, Status};
use moat_pvdma::{BatchArea, GuestBuffer, Native, PvDma};

use crate::abi::{rdtsc, BootInfo};
use crate::dma::{driver, gpa, holds, page, policy_name, raw, Edu, PAGE};
use crate::{println, Outcome};

/// The x86 MSI window as the ABI names it (`RegionKind::Msi`).
const MSI_START: u64 = 0xfee0_0000;
const MSI_END: u64 = 0xfef0_0000;

/// `dma-msi` (a guest whose device has a 32-bit DMA mask, so the MSI window lies inside its
/// IOVA space): QUERY lists the MSI window as a reserved region; UNMAP of an IOVA in it, or
/// of a range reaching into it, is PERM; MAP never hands out an IOVA in a reserved region.
pub fn msi() -> Outcome {
    let mut d = driver()?;
    let info = *d.info();
    let width = info.limits.iova_width;
    println!(
        "dma-msi: policy {} IOVA width {width}, {} reserved region(s) reported, {} kept",
        policy_name(info.policy),
        info.regions_total,
        info.regions().len()
    );
    let mut msi_listed = false;
    for r in info.regions() {
        let kind = RegionKind::from_raw(r.kind.get());
        let (start, end) = (r.start.get(), r.start.get().saturating_add(r.length.get()));
        println!("dma-msi: region [{start:#x}, {end:#x}) kind {kind:?}");
        msi_listed |= kind == Some(RegionKind::Msi) && start <= MSI_START && end >= MSI_END;
    }
    let mut failures = 0u32;
    if width < 32 {
        println!("dma-msi: IOVA width {width} < 32: the MSI window is not inside it WRONG");
        failures += 1;
    }
    println!(
        "dma-msi: QUERY lists the MSI window [{MSI_START:#x}, {MSI_END:#x}): {msi_listed} {}",
        if msi_listed { "ok" } else { "WRONG" }
    );
    failures += !msi_listed as u32;
    for (what, iova, len) in [
        ("first page of the MSI window", MSI_START, 0x1000),
        ("last page of the MSI window", MSI_END - 0x1000, 0x1000),
        (
            "range reaching into the MSI window",
            MSI_START - 0x1000,
            0x2000,
        ),
    ] {
        let (st, _) = raw(Call::DmaUnmap, [iova, len, 0, 0, 0, 0]);
        let ok = st == Some(Status::Perm);
        println!(
            "dma-msi: UNMAP {what} ({iova:#x} + {len:#x}): {st:?} (want Some(Perm)) {}",
            if ok { "ok" } else { "WRONG" }
        );
        failures += !ok as u32;
    }
    let iova = d
        .map(gpa(3), PAGE as u64, DmaFlags::READ_WRITE)
        .map_err(|_| "MAP failed")?;
    let inside = info.regions().iter().any(|r| {
        let (start, len) = (r.start.get(), r.length.get());
        iova < start.saturating_add(len) && start < iova + PAGE as u64
    }) || (iova < MSI_END && MSI_START < iova + PAGE as u64);
    let ok = !inside && (width >= 64 || iova + PAGE as u64 <= 1u64 << width);
    println!(
        "dma-msi: MAP returned IOVA {iova:#x}: outside every reserved region and inside the width: {ok} {}",
        if ok { "ok" } else { "WRONG" }
    );
    failures += !ok as u32;
    d.unmap(iova, PAGE as u64).map_err(|_| "UNMAP failed")?;
    let s = d.stats(false).map_err(|_| "STATS failed")?;
    if s.live_mappings != 0 {
        failures += 1;
    }
    if failures == 0 {
        Ok(())
    } else {
        Err("the MSI window is not reported or not protected")
    }
}

/// Set while vCPU 1 should run MULTICALL storms (`dma-stale`).
static STORM: AtomicBool = AtomicBool::new(false);
/// Set when `dma-stale` is over: vCPU 1 stops.
static STALE_END: AtomicBool = AtomicBool::new(false);
/// Set by vCPU 1 when it has left the storm loop.
static STORM_EXITED: AtomicBool = AtomicBool::new(false);
/// MULTICALLs vCPU 1 ran.
static STORM_CALLS: AtomicU64 = AtomicU64::new(0);
/// Set if vCPU 1's storm failed.
static STORM_FAILED: AtomicBool = AtomicBool::new(false);

#[repr(C, align(4096))]
struct Area([[u8; PAGE]; 8]);
/// vCPU 0's batch area for the long MULTICALL.
static mut STALE_BATCH: Area = Area([[0; PAGE]; 8]);
/// vCPU 1's pages: 0 scratch, 1-2 batch area.
static mut STORM_PAGES: Area = Area([[0; PAGE]; 8]);

/// Entries after the UNMAP in a long MULTICALL: half UNMAPs of pages mapped before the
/// trial, half MAPs of others.
const LONG_HALF: usize = 100;
/// Guest-physical pages the long MULTICALL and the storm map (inside 64 MiB).
const LONG_GPA: u64 = 40 << 20;
const STORM_GPA: u64 = 44 << 20;
/// Trials of each kind (plain UNMAP, entry 0 of a long MULTICALL, UNMAP during storms).
const TRIALS_PER_KIND: u64 = 12;

/// vCPU 1 of `dma-stale`: while [`STORM`] is set, MULTICALLs of 64 MAPs then 64 UNMAPs of its
/// own pages, back to back.
pub fn stale_storm() {
    let base = core::ptr::addr_of!(STORM_PAGES) as u64;
    // SAFETY: as in `dma::driver`; the scratch page is vCPU 1's own.
    let hv = unsafe { Native::new() };
    let Ok(mut d) = PvDma::probe(
        hv,
        GuestBuffer {
            gpa: base,
            len: PAGE as u64,
        },
    ) else {
        STORM_FAILED.store(true, SeqCst);
        STORM_EXITED.store(true, SeqCst);
        return;
    };
    if d.attach_batch(BatchArea {
        gpa: base + PAGE as u64,
        pages: 2,
    })
    .is_err()
    {
        STORM_FAILED.store(true, SeqCst);
        STORM_EXITED.store(true, SeqCst);
        return;
    }
    let mut iovas = [0u64; 64];
    while !STALE_END.load(SeqCst) {
        if !STORM.load(SeqCst) {
            core::hint::spin_loop();
            continue;
        }
        let mut bad = false;
        for i in 0..64u64 {
            let r = d.queue_map(
                STORM_GPA + i * PAGE as u64,
                PAGE as u64,
                DmaFlags::READ,
                &mut |_| bad = true,
            );
            bad |= r.is_err();
        }
        let mut k = 0;
        bad |= d
            .flush(&mut |c| match c.result {
                Ok(iova) => {
                    if let Some(s) = iovas.get_mut(k) {
                        *s = iova;
                    }
                    k += 1;
                }
                Err(_) => bad = true,
            })
            .is_err();
        for &iova in iovas.iter().take(k) {
            bad |= d
                .queue_unmap(iova, PAGE as u64, &mut |_| bad = true)
                .is_err();
        }
        bad |= d.flush(&mut |c| bad |= c.result.is_err()).is_err();
        STORM_CALLS.fetch_add(2, SeqCst);
        if bad {
            STORM_FAILED.store(true, SeqCst);
            break;
        }
    }
    let _ = d.sync_iotlb();
    let _ = d.detach_batch();
    STORM_EXITED.store(true, SeqCst);
}

fn stale_entry(i: usize) -> *mut u8 {
    (core::ptr::addr_of_mut!(STALE_BATCH) as *mut u8).wrapping_add(BATCH_HEADER_SIZE + i * 48)
}

fn put_entry(i: usize, e: Entry) {
    // SAFETY: vCPU 0's own batch area; the hypervisor reads it only during a MULTICALL.
    unsafe { core::ptr::copy_nonoverlapping(e.as_bytes().as_ptr(), stale_entry(i), 48) };
}

fn get_entry(i: usize) -> Entry {
    let mut b = [0u8; 48];
    // SAFETY: as in `put_entry`.
    unsafe { core::ptr::copy_nonoverlapping(stale_entry(i), b.as_mut_ptr(), 48) };
    moat_abi::zerocopy::transmute!(b)
}

/// Runs the batch of `count` entries from entry 0 to the end; `first` runs right after the
/// return of the first call (the one that ran entry 0).
fn multicall(count: usize, mut first: impl FnMut()) -> Result<(), &'static str> {
    let hdr = moat_abi::dma::BatchHeader::new(count as u32);
    let hdr = hdr.as_bytes();
    let area = core::ptr::addr_of_mut!(STALE_BATCH) as *mut u8;
    // SAFETY: as in `put_entry`.
    unsafe { core::ptr::copy_nonoverlapping(hdr.as_ptr(), area, BATCH_HEADER_SIZE) };
    let mut cursor = 0u64;
    for call in 0..10 * count {
        let (_, v) = raw(Call::DmaMulticall, [cursor, 0, 0, 0, 0, 0]);
        if call == 0 {
            first();
        }
        match v[2] & 0xff {
            0 => return Ok(()),
            2 => cursor = v[0],
            _ => return Err("an entry of the long MULTICALL failed"),
        }
    }
    Err("the long MULTICALL never finished")
}

/// What one kind of trial saw.
#[derive(Default, Clone, Copy)]
struct Tally {
    unmaps: u64,
    /// DMAs still pending when the UNMAP returned whose bytes landed (stale translations).
    stale: u64,
    /// DMAs still pending when the UNMAP returned that were blocked.
    blocked: u64,
    /// DMAs already done when the UNMAP returned (they may have run during the call).
    early: u64,
    /// Worst time from the UNMAP's return to a landed write's completion, in TSC cycles.
    worst: u64,
}

/// `dma-stale=T`: measures the stale window after UNMAP with real edu DMA. Calibrates edu's
/// DMA latency L, then for T trials of each kind (plain UNMAP; entry 0 of a long MULTICALL;
/// plain UNMAP while vCPU 1 runs MULTICALL storms) starts a device->RAM DMA to a mapped
/// IOVA, UNMAPs it L - d later (d from 0 to twice the deferred bound), notes whether edu
/// still had the DMA pending right after the UNMAP returned, waits for edu, and records
/// whether the bytes landed and how long after the UNMAP's return. PASS under `deferred` iff
/// every write still pending at the return that landed completed within the bound, and some
/// did land (so the test can see stale translations); under `strict`/`batched` iff none
/// pending at the return landed.
pub fn stale(boot: &BootInfo, trials: u64) -> Outcome {
    let r = stale_run(boot, trials.max(TRIALS_PER_KIND));
    STORM.store(false, SeqCst);
    STALE_END.store(true, SeqCst);
    r
}

fn stale_run(boot: &BootInfo, per_kind: u64) -> Outcome {
    let mut d = driver()?;
    let info = *d.info();
    let policy = info.policy;
    let khz = boot.tsc_khz.get().max(1);
    let us = |cycles: u64| cycles * 1000 / khz;
    let bound_us = u64::from(info.deferred_max_us);
    // Delays step over twice the bound (a 10 ms bound where there is none).
    let span_us = 2 * if bound_us > 0 { bound_us } else { 10_000 };
    let edu = Edu::find().ok_or("no edu device")?;
    // edu's buffer holds a known pattern; every DMA below writes it.
    crate::dma::load_pattern(&mut d, &edu, 0x9e)?;
    // Calibrate: the shortest of three device->RAM DMAs, start to observed completion.
    let mut lat = u64::MAX;
    for _ in 0..3 {
        let iova = d
            .map(gpa(4), PAGE as u64, DmaFlags::WRITE)
            .map_err(|_| "MAP failed")?;
        let t0 = rdtsc();
        edu.start(iova, true);
        if !edu.wait() {
            return Err("edu DMA did not finish");
        }
        lat = lat.min(rdtsc() - t0);
        d.unmap(iova, PAGE as u64).map_err(|_| "UNMAP failed")?;
    }
    let _ = d.sync_iotlb();
    println!(
        "dma-stale: policy {} bound {bound_us} us, edu DMA latency {} us; {per_kind} trials of each kind, UNMAP 0..{span_us} us before the DMA fires",
        policy_name(policy),
        us(lat)
    );
    let area = core::ptr::addr_of!(STALE_BATCH) as u64;
    let (st, _) = raw(Call::DmaBatchRegister, [area, 8, 0, 0, 0, 0]);
    if st != Some(Status::Ok) {
        return Err("BATCH_REGISTER failed");
    }
    let mut tally = [Tally::default(); 3];
    let mut failed = None;
    for t in 0..3 * per_kind {
        let kind = (t % 3) as usize;
        let step = t / 3;
        // Denser near 0, where the writes that land are.
        let last = (per_kind - 1).max(1);
        let d_us = step * step * span_us / (last * last);
        page(4).fill(0);
        let iova = match d.map(gpa(4), PAGE as u64, DmaFlags::WRITE) {
            Ok(i) => i,
            Err(_) => {
                failed = Some("MAP of the target failed");
                break;
            }
        };
        if kind == 1 {
            // Entry 0 UNMAPs the target; then UNMAPs of pages mapped now and MAPs of others.
            put_entry(0, Entry::unmap(iova, PAGE as u64));
            for j in 0..LONG_HALF {
                let g = LONG_GPA + (j * PAGE) as u64;
                let Ok(pre) = d.map(g, PAGE as u64, DmaFlags::READ) else {
                    failed = Some("MAP before the long MULTICALL failed");
                    break;
                };
                put_entry(1 + j, Entry::unmap(pre, PAGE as u64));
                let other = LONG_GPA + ((LONG_HALF + j) * PAGE) as u64;
                put_entry(
                    1 + LONG_HALF + j,
                    Entry::map(other, PAGE as u64, DmaFlags::READ),
                );
            }
            if failed.is_some() {
                break;
            }
        }
        if kind == 2 {
            STORM.store(true, SeqCst);
            let calls = STORM_CALLS.load(SeqCst);
            // Let the storm get going.
            while STORM_CALLS.load(SeqCst) < calls + 2 && !STORM_FAILED.load(SeqCst) {
                core::hint::spin_loop();
            }
        }
        // Warm the IOMMU's IOTLB with one DMA through the IOVA (a stale translation can only
        // come from a cached one), timing it: the next DMA fires about as long after its
        // start.
        let w0 = rdtsc();
        edu.start(iova, true);
        if !edu.wait() {
            failed = Some("edu DMA did not finish");
            break;
        }
        let lat = rdtsc() - w0;
        let wait = lat.saturating_sub(d_us * khz / 1000);
        page(4).fill(0);
        let t0 = rdtsc();
        edu.start(iova, true);
        while rdtsc() - t0 < wait {
            core::hint::spin_loop();
        }
        // The first thing after the UNMAP returns: the time and whether edu has run the
        // DMA yet (edu clears the bit after its write, under QEMU's lock, so a DMA still
        // pending here writes after the UNMAP returned).
        let mut pending = false;
        let mut after = || {
            pending = edu.busy();
        };
        // The UNMAP happens after this instant and before `returned`: the window measured
        // from here is never shorter than the true one (the bound is kept only if this is
        // within it).
        let called = rdtsc();
        let r = if kind == 1 {
            multicall(1 + 2 * LONG_HALF, &mut after)
        } else {
            let r = d.unmap(iova, PAGE as u64);
            after();
            r.map_err(|_| "UNMAP failed")
        };
        if let Err(e) = r {
            failed = Some(e);
            break;
        }
        // Poll without a single exit: only edu's register (QEMU MMIO, no hypervisor exit).
        let mut done = rdtsc();
        while edu.busy() {
            done = rdtsc();
        }
        STORM.store(false, SeqCst);
        let landed = holds(4, 0x9e);
        let k = &mut tally[kind];
        k.unmaps += 1;
        match (pending, landed) {
            (true, true) => {
                k.stale += 1;
                k.worst = k.worst.max(done.saturating_sub(called));
            }
            (true, false) => k.blocked += 1,
            (false, _) => k.early += 1,
        }
        if kind == 1 {
            // Clean up the MAPs of the long MULTICALL.
            for j in 0..LONG_HALF {
                let e = get_entry(1 + LONG_HALF + j);
                put_entry(j, Entry::unmap(e.iova.get(), PAGE as u64));
            }
            if let Err(e) = multicall(LONG_HALF, || {}) {
                failed = Some(e);
                break;
            }
        }
    }
    STORM.store(false, SeqCst);
    let _ = d.sync_iotlb();
    let _ = raw(Call::DmaBatchRegister, [0, 0, 0, 0, 0, 0]);
    if let Some(e) = failed {
        return Err(e);
    }
    for (name, k) in [
        "plain UNMAP",
        "entry 0 of a long MULTICALL",
        "UNMAP during MULTICALL storms on vCPU 1",
    ]
    .iter()
    .zip(tally.iter())
    {
        println!(
            "dma-stale: {name}: {} unmaps; DMA pending at the return: {} landed (worst {} us after the UNMAP call was made), {} blocked; {} done by the return",
            k.unmaps,
            k.stale,
            us(k.worst),
            k.blocked,
            k.early
        );
    }
    let n: u64 = tally.iter().map(|k| k.unmaps).sum();
    let landed: u64 = tally.iter().map(|k| k.stale).sum();
    let worst = us(tally.iter().map(|k| k.worst).max().unwrap_or(0));
    println!(
        "dma-stale: {n} unmaps, {landed} landed, worst stale window {worst} us (bound {bound_us} us); vCPU 1 ran {} MULTICALLs",
        STORM_CALLS.load(SeqCst)
    );
    // vCPU 1's mappings count too: let it finish its last storm first.
    STALE_END.store(true, SeqCst);
    let t0 = rdtsc();
    while !STORM_EXITED.load(SeqCst) && rdtsc() - t0 < 10_000 * khz {
        core::hint::spin_loop();
    }
    let s = d.stats(false).map_err(|_| "STATS failed")?;
    println!(
        "dma-stale: live mappings after: {}, vCPU 1 done: {}",
        s.live_mappings,
        STORM_EXITED.load(SeqCst)
    );
    if s.live_mappings != 0 {
        return Err("mappings left");
    }
    if STORM_FAILED.load(SeqCst) || STORM_CALLS.load(SeqCst) == 0 {
        return Err("vCPU 1's MULTICALL storm did not run");
    }
    match policy {
        Policy::Deferred => {
            if landed == 0 {
                return Err("no write landed after UNMAP: the test cannot see stale translations");
            }
            if tally.iter().any(|k| us(k.worst) > bound_us) {
                return Err("a device write landed later than the deferred bound after UNMAP");
            }
        }
        Policy::Strict | Policy::Batched => {
            if landed != 0 {
                return Err("a device write landed after UNMAP returned");
            }
        }
        Policy::Passthrough => return Err("dma-stale needs a remapping policy"),
    }
    Ok(())
}

/// `dma-stop`: starts an edu DMA (device -> RAM) into this guest's own memory and stops at
/// once, long before edu runs it (~100 ms later). The hypervisor must have blocked the
/// device by then.
pub fn stop() -> Outcome {
    let mut d = driver()?;
    let edu = Edu::find().ok_or("no edu device")?;
    page(4).fill(0);
    let iova = d
        .map(gpa(4), PAGE as u64, DmaFlags::WRITE)
        .map_err(|_| "MAP failed")?;
    edu.start(iova, true);
    println!(
        "dma-stop: DMA to IOVA {iova:#x} (GPA {:#x}) started; stopping the guest before it runs",
        gpa(4)
    );
    crate::abi::exit(0)
}
