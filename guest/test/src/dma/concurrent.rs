//! `dma-concurrent=N`: 2 vCPUs map and unmap at full speed (single calls and MULTICALLs,
//! half of each vCPU's mappings unmapped by the other vCPU), with checkers:
//! - no IOVA is live twice: every page of every IOVA MAP returns is claimed in a table shared
//!   by the vCPUs (a claim of a page that is live is a duplicate);
//! - the hypervisor's own accounting is exact: at sync points (both vCPUs quiescent) STATS'
//!   live mappings and pinned pages equal what the vCPUs hold;
//! - no page is reachable after its UNMAP returned (strict, batched): vCPU 0 maps a page, lets
//!   edu read it through the IOVA (the translation is now cached), clears the page, unmaps
//!   it (a single UNMAP, or inside a MULTICALL), and then has edu write its buffer to the old
//!   IOVA: the page must stay zero. The other vCPU keeps mapping and unmapping meanwhile.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::SeqCst};

use super::*;

const VCPUS: usize = 2;
/// Pages each vCPU maps from (one 4 KiB mapping each).
const POOL: usize = 64;
/// Mappings handed to a vCPU to unmap, at most.
const INBOX: usize = 32;
/// IOVA pages tracked: the first 64 MiB of the window (an IOVA beyond fails the test; the
/// guest holds a few hundred at once and the allocator hands out low IOVAs).
const IOVA_PAGES: usize = 1 << 14;
/// Rounds between accounting checks, and between probes.
const CHECK_EVERY: u64 = 8;
const PROBE_EVERY: u64 = 4;

/// Per IOVA page: 0 free, LIVE mapped, UNMAPPING while its UNMAP is in progress.
static OWNER: [AtomicU8; IOVA_PAGES] = [const { AtomicU8::new(0) }; IOVA_PAGES];
const LIVE: u8 = 1;
const UNMAPPING: u8 = 0x80;
/// Per vCPU and pool page: mapped (by it), until someone's UNMAP of it returned.
static IN_USE: [[AtomicBool; POOL]; VCPUS] =
    [const { [const { AtomicBool::new(false) }; POOL] }; VCPUS];
/// Mappings handed to each vCPU: `iova | (owner << 40) | ((page + 1) << 48)`, 0 = empty.
static INBOXES: [[AtomicU64; INBOX]; VCPUS] =
    [const { [const { AtomicU64::new(0) }; INBOX] }; VCPUS];
static HELD_MAPS: AtomicU64 = AtomicU64::new(0);
static DUPS: AtomicU64 = AtomicU64::new(0);
static OPS: AtomicU64 = AtomicU64::new(0);
static CROSS: AtomicU64 = AtomicU64::new(0);
static CHECKS: AtomicU64 = AtomicU64::new(0);
static MISMATCH: AtomicU64 = AtomicU64::new(0);
static PROBES: AtomicU64 = AtomicU64::new(0);
static REACHABLE: AtomicU64 = AtomicU64::new(0);
static CREW: Crew = Crew::new();
/// Sync points: reached (own work done, filling), arrived (quiescent), checked (by vCPU 0).
static REACHED: [AtomicU64; VCPUS] = [const { AtomicU64::new(0) }; VCPUS];
static ARRIVED: [AtomicU64; VCPUS] = [const { AtomicU64::new(0) }; VCPUS];
static CHECKED: AtomicU64 = AtomicU64::new(0);

/// Batch areas (2 pages: 169 entries) and discovery scratch pages, one per vCPU (the guest
/// image must stay below 2 MiB, see `dma-bad`).
static mut AREAS: [PageArray<2>; VCPUS] = [const { PageArray([[0; PAGE]; 2]) }; VCPUS];
static mut SCRATCH: [PageArray<1>; VCPUS] = [const { PageArray([[0; PAGE]; 1]) }; VCPUS];
/// The probe's page.
static mut PROBE: PageArray<1> = PageArray([[0; PAGE]; 1]);

type Drv = PvDma<Native>;

fn pool_gpa(v: usize, page: usize) -> u64 {
    (40u64 << 20) + ((v * POOL + page) * PAGE) as u64
}

fn slot(iova: u64) -> Option<&'static AtomicU8> {
    OWNER.get((iova / PAGE as u64) as usize)
}

/// Waits for `cond` (about 60 s at most, or until a worker failed).
fn wait(khz: u64, cond: impl FnMut() -> bool) -> Outcome {
    CREW.wait_until(khz, cond, "another dma-concurrent worker failed")
}

/// MAP returned `iova`: claim it. A page whose UNMAP is still in progress on the other vCPU
/// (the hypervisor released it before that call returned) is waited for; a live one is a
/// duplicate.
fn claim(khz: u64, iova: u64) -> Outcome {
    let s = slot(iova).ok_or("IOVA beyond the device's window")?;
    loop {
        match s.compare_exchange(0, LIVE, SeqCst, SeqCst) {
            Ok(_) => break,
            Err(UNMAPPING) => wait(khz, || s.load(SeqCst) != UNMAPPING)?,
            Err(_) => {
                DUPS.fetch_add(1, SeqCst);
                break;
            }
        }
    }
    HELD_MAPS.fetch_add(1, SeqCst);
    OPS.fetch_add(1, SeqCst);
    Ok(())
}

fn unmapping(iova: u64) {
    if let Some(s) = slot(iova) {
        s.store(UNMAPPING, SeqCst);
    }
}

/// UNMAP of `iova` returned.
fn released_iova(iova: u64) {
    if let Some(s) = slot(iova) {
        s.store(0, SeqCst);
    }
    HELD_MAPS.fetch_sub(1, SeqCst);
}

/// UNMAP of `iova`, a mapping of pool page `page` of vCPU `owner`, returned.
fn released(iova: u64, owner: usize, page: usize) {
    released_iova(iova);
    IN_USE[owner][page].store(false, SeqCst);
}

/// UNMAPs the one-page mappings at `iovas`, in this order, in one MULTICALL: `call_failed`
/// if the call fails, `entry_failed` if one of its UNMAPs does.
fn unmap_in_one_multicall(
    d: &mut Drv,
    iovas: impl Iterator<Item = u64>,
    call_failed: &'static str,
    entry_failed: &'static str,
) -> Outcome {
    let mut bad = false;
    for iova in iovas {
        d.queue_unmap(iova, PAGE as u64, &mut |_| bad = true)
            .map_err(|_| "queue UNMAP failed")?;
    }
    d.flush(&mut |c| bad |= c.result.is_err())
        .map_err(|_| call_failed)?;
    if bad {
        return Err(entry_failed);
    }
    Ok(())
}

/// Unmaps `list` (`(iova, owner, page)`): one UNMAP each, or one MULTICALL.
fn unmap_all(d: &mut Drv, list: &[(u64, usize, usize)], batch: bool) -> Outcome {
    for &(iova, _, _) in list {
        unmapping(iova);
    }
    if batch {
        let iovas = list.iter().map(|&(iova, _, _)| iova);
        unmap_in_one_multicall(
            d,
            iovas,
            "MULTICALL (unmaps) failed",
            "an UNMAP in a MULTICALL failed",
        )?;
    } else {
        for &(iova, _, _) in list {
            d.unmap(iova, PAGE as u64).map_err(|_| "UNMAP failed")?;
        }
    }
    for &(iova, owner, page) in list {
        released(iova, owner, page);
    }
    Ok(())
}

/// Maps the free pool pages of vCPU `v` among `pages` (one MAP each, or one MULTICALL);
/// returns `(iova, v, page)` of each.
fn map_pages(
    d: &mut Drv,
    khz: u64,
    v: usize,
    pages: &[usize],
    batch: bool,
    out: &mut [(u64, usize, usize)],
) -> Result<usize, &'static str> {
    let mut n = 0;
    let mut want = [0usize; 16];
    for &p in pages {
        if n < want.len() && !IN_USE[v][p].swap(true, SeqCst) {
            want[n] = p;
            n += 1;
        }
    }
    if batch {
        let mut bad = false;
        let mut got = [0u64; 16];
        let mut k = 0;
        for &p in &want[..n] {
            d.queue_map(
                pool_gpa(v, p),
                PAGE as u64,
                DmaFlags::READ_WRITE,
                &mut |_| bad = true,
            )
            .map_err(|_| "queue MAP failed")?;
        }
        d.flush(&mut |c| match c.result {
            Ok(iova) if k < got.len() => {
                got[k] = iova;
                k += 1;
            }
            _ => bad = true,
        })
        .map_err(|_| "MULTICALL (maps) failed")?;
        if bad || k != n {
            return Err("a MAP in a MULTICALL failed");
        }
        for i in 0..n {
            claim(khz, got[i])?;
            out[i] = (got[i], v, want[i]);
        }
    } else {
        for i in 0..n {
            let iova = d
                .map(pool_gpa(v, want[i]), PAGE as u64, DmaFlags::READ_WRITE)
                .map_err(|_| "MAP failed")?;
            claim(khz, iova)?;
            out[i] = (iova, v, want[i]);
        }
    }
    Ok(n)
}

/// Unmaps what the other vCPU handed to `v`.
fn drain_inbox(d: &mut Drv, v: usize, batch: bool) -> Outcome {
    let mut list = [(0u64, 0usize, 0usize); INBOX];
    let mut n = 0;
    for s in INBOXES[v].iter() {
        let x = s.swap(0, SeqCst);
        if x != 0 {
            list[n] = (
                x & ((1 << 40) - 1),
                ((x >> 40) & 0xff) as usize,
                ((x >> 48) - 1) as usize,
            );
            n += 1;
        }
    }
    CROSS.fetch_add(n as u64, SeqCst);
    unmap_all(d, &list[..n], batch)
}

/// One round of vCPU `v`: map 8 pages, unmap 4, hand 4 to the other vCPU, unmap what it
/// handed over. Single calls on even rounds, MULTICALLs on odd ones.
fn round(d: &mut Drv, khz: u64, v: usize, r: u64) -> Outcome {
    let batch = r % 2 == 1;
    let first = ((r * 8) % POOL as u64) as usize;
    let pages: [usize; 8] = core::array::from_fn(|i| (first + i) % POOL);
    let mut got = [(0u64, 0usize, 0usize); 16];
    let n = map_pages(d, khz, v, &pages, batch, &mut got)?;
    let keep = n / 2;
    let mut mine = [(0u64, 0usize, 0usize); 16];
    let mut m = 0;
    for (i, &g) in got[..n].iter().enumerate() {
        let other = (v + 1) % VCPUS;
        let packed = g.0 | ((g.1 as u64) << 40) | ((g.2 as u64 + 1) << 48);
        let handed = i >= keep
            && INBOXES[other]
                .iter()
                .any(|s| s.compare_exchange(0, packed, SeqCst, SeqCst).is_ok());
        if !handed {
            mine[m] = g;
            m += 1;
        }
    }
    unmap_all(d, &mine[..m], batch)?;
    drain_inbox(d, v, !batch)
}

/// A sync point: both vCPUs quiescent, vCPU 0 compares the hypervisor's accounting with what
/// the vCPUs hold. A vCPU that is early keeps mapping and unmapping its own pages.
fn sync_point(d: &mut Drv, khz: u64, v: usize, k: u64) -> Outcome {
    REACHED[v].store(k, SeqCst);
    let mut r = 0;
    while REACHED.iter().any(|x| x.load(SeqCst) < k) {
        if CREW.failed() {
            return Err("another dma-concurrent worker failed");
        }
        let mut got = [(0u64, 0usize, 0usize); 16];
        let page = (r % POOL as u64) as usize;
        let n = map_pages(d, khz, v, &[page], false, &mut got)?;
        unmap_all(d, &got[..n], false)?;
        r += 1;
    }
    ARRIVED[v].store(k, SeqCst);
    wait(khz, || ARRIVED.iter().all(|x| x.load(SeqCst) >= k))?;
    if v == 0 {
        let s = d.stats(false).map_err(|_| "STATS failed")?;
        let held = HELD_MAPS.load(SeqCst);
        if s.live_mappings.get() != held
            || s.live_pages.get() != held
            || s.pending_invalidations.get() != 0
        {
            println!(
                "dma-concurrent: accounting MISMATCH at sync point {k}: hypervisor {} live mapping(s), {} pinned page(s), {} pending; vCPUs hold {held}",
                s.live_mappings.get(),
                s.live_pages.get(),
                s.pending_invalidations.get()
            );
            MISMATCH.fetch_add(1, SeqCst);
        } else {
            CHECKS.fetch_add(1, SeqCst);
        }
        CHECKED.store(k, SeqCst);
    }
    wait(khz, || CHECKED.load(SeqCst) >= k)
}

/// The probe (vCPU 0): is a page reachable through its IOVA after UNMAP returned?
fn probe(d: &mut Drv, khz: u64, edu: &Edu, n: u64) -> Outcome {
    // SAFETY: the probe's page is only touched by vCPU 0 and, through the IOVA, by edu
    // while this function waits for it.
    let x = unsafe { &mut (*core::ptr::addr_of_mut!(PROBE)).0[0] };
    for (k, b) in x.iter_mut().enumerate() {
        *b = pattern(k, n as u8 | 1);
    }
    let gpa = x.as_ptr() as u64;
    let iova = d
        .map(gpa, PAGE as u64, DmaFlags::READ_WRITE)
        .map_err(|_| "probe MAP failed")?;
    claim(khz, iova)?;
    // The device reads the page: its translation is cached now.
    if !edu.dma(iova, false) {
        return Err("edu DMA did not finish");
    }
    x.fill(0);
    unmapping(iova);
    if n % 2 == 1 && d.capacity() > 0 {
        // Inside a MULTICALL with other unmaps (batched: the batch's one invalidation).
        let mut got = [(0u64, 0usize, 0usize); 16];
        let page = (n as usize * 2) % POOL;
        let m = map_pages(d, khz, 0, &[page, (page + 1) % POOL], false, &mut got)?;
        for &(i, _, _) in &got[..m] {
            unmapping(i);
        }
        // The probe's UNMAP between the others (when its pages were free to map).
        let (before, after) = got[..m].split_at(m.min(1));
        let iovas = before
            .iter()
            .map(|&(i, _, _)| i)
            .chain([iova])
            .chain(after.iter().map(|&(i, _, _)| i));
        unmap_in_one_multicall(
            d,
            iovas,
            "MULTICALL (probe unmaps) failed",
            "a probe UNMAP in a MULTICALL failed",
        )?;
        for &(i, o, p) in &got[..m] {
            released(i, o, p);
        }
    } else {
        d.unmap(iova, PAGE as u64)
            .map_err(|_| "probe UNMAP failed")?;
    }
    released_iova(iova);
    // UNMAP returned: the device writes its buffer (the page's old contents) to the IOVA.
    if !edu.dma(iova, true) {
        return Err("edu DMA did not finish");
    }
    PROBES.fetch_add(1, SeqCst);
    if x[..LEN as usize].iter().any(|&b| b != 0) {
        println!("dma-concurrent: probe {n}: edu REACHED the page through IOVA {iova:#x} after its UNMAP returned");
        REACHABLE.fetch_add(1, SeqCst);
    }
    Ok(())
}

/// One vCPU's part of `dma-concurrent=N` (`N` rounds).
pub fn concurrent_worker(info: &BootInfo, v: usize, rounds: u64) -> Outcome {
    if v >= VCPUS {
        return Ok(());
    }
    let r = CREW.note(work(info, v, rounds));
    CREW.finish();
    r
}

fn work(info: &BootInfo, v: usize, rounds: u64) -> Outcome {
    let khz = info.tsc_khz.get().max(1);
    let size = core::mem::size_of::<PageArray<2>>();
    // Each vCPU has its own scratch page and batch area.
    let mut d = driver_at(core::ptr::addr_of!(SCRATCH) as u64 + (v * PAGE) as u64)?;
    d.attach_batch(BatchArea {
        gpa: core::ptr::addr_of!(AREAS) as u64 + (v * size) as u64,
        pages: 2,
    })
    .map_err(|_| "BATCH_REGISTER failed")?;
    let edu = if v == 0 { Edu::find() } else { None };
    if v == 0 && edu.is_none() {
        return Err("no edu device");
    }
    let mut k = 0;
    for r in 0..rounds {
        round(&mut d, khz, v, r)?;
        if let Some(e) = &edu
            && r % PROBE_EVERY == 0
        {
            probe(&mut d, khz, e, r / PROBE_EVERY)?;
        }
        if r % CHECK_EVERY == CHECK_EVERY - 1 {
            k += 1;
            sync_point(&mut d, khz, v, k)?;
        }
    }
    // Nobody hands anything over any more: unmap what is left, and check once more.
    k += 1;
    sync_point(&mut d, khz, v, k)?;
    drain_inbox(&mut d, v, false)?;
    k += 1;
    sync_point(&mut d, khz, v, k)?;
    d.detach_batch().map_err(|_| "unregister failed")?;
    Ok(())
}

/// `dma-concurrent=N` on vCPU 0: its worker, then the verdict.
pub fn concurrent(info: &BootInfo, rounds: u64) -> Outcome {
    if info.vcpus.get() < 2 {
        return Err("dma-concurrent needs 2 vCPUs");
    }
    let mine = concurrent_worker(info, 0, rounds);
    let khz = info.tsc_khz.get().max(1);
    wait(khz, || CREW.done() >= VCPUS as u64).or_else(|e| {
        if mine.is_err() {
            Ok(())
        } else {
            Err(e)
        }
    })?;
    mine?;
    if CREW.failed() {
        return Err("a dma-concurrent worker failed");
    }
    let mut d = driver()?;
    let s = d.stats(false).map_err(|_| "STATS failed")?;
    let policy = policy_name(d.info().policy);
    println!(
        "dma-concurrent: policy {policy}, {VCPUS} vCPUs, {} map+unmap operations ({} unmapped on the other vCPU), {} accounting check(s) exact, {} mismatch(es), IOVA live twice: {} time(s), probes after UNMAP returned: {}, reachable: {}; live mappings after: {}",
        OPS.load(SeqCst),
        CROSS.load(SeqCst),
        CHECKS.load(SeqCst),
        MISMATCH.load(SeqCst),
        DUPS.load(SeqCst),
        PROBES.load(SeqCst),
        REACHABLE.load(SeqCst),
        s.live_mappings.get()
    );
    if DUPS.load(SeqCst) != 0 || MISMATCH.load(SeqCst) != 0 || s.live_mappings.get() != 0 {
        return Err("an IOVA was live twice, or the accounting was off");
    }
    if REACHABLE.load(SeqCst) != 0 {
        return Err("a page was reachable after its UNMAP returned");
    }
    Ok(())
}
