//! Stateful fuzzing of `moat-dma`'s [`DmaState`]: one guest, several vCPUs (each its own
//! [`IovaSource`] handle on a shared allocator with per-vCPU magazines, like the kernel's
//! per-CPU caches), arbitrary interleavings of map / unmap / begin_batch / end_batch / sync /
//! tick / teardown with arbitrary arguments (good and bad), device accesses in between, and
//! injectable failures (flush, map, unmap), against a model IOMMU whose device keeps using the
//! translations it has cached until an invalidation covers them.
//!
//! The model is small on purpose (a 64-page IOVA window, 256 guest pages, fixed arrays and
//! bit masks) so one execution does no allocation apart from `DmaState`'s own.
//!
//! Checked after every step (a failed check panics, which libFuzzer reports as a crash):
//! - **no IOVA held twice**: the allocator never hands out a page it has handed out and not
//!   got back, the domain never maps over a present entry, live mappings are disjoint in IOVA
//!   and in guest pages, and a MAP that succeeds never overlaps one that is live or pending;
//! - **nothing released before its invalidation**: an IOVA page returned to the allocator
//!   (free list or a vCPU's magazine) has no page-table entry and no translation in the
//!   device-side cache, checked when it is freed and after every step; a cached translation
//!   of a live page is that page's current one (never a previous mapping's);
//! - **a failed call changes nothing**: a MAP or UNMAP that fails leaves the page tables, the
//!   live mappings and (unless it flushed deferred work first) the pending unmaps as they
//!   were; argument errors get the status the ABI gives them; a SYNC / END_BATCH whose flush
//!   fails keeps every pending unmap held;
//! - **counters add up**: `counts()` equals this harness's own bookkeeping (live mappings,
//!   pending unmaps, pinned and IOVA pages = the allocator's held pages, table pages) and
//!   `stats()` equals the calls it saw succeed and fail and the flushes the IOMMU performed;
//! - **strict means strict**: after an UNMAP returns OK under `Strict` (or `Batched` outside a
//!   batch), and after END_BATCH / SYNC / TEARDOWN return OK, nothing is pending;
//! - at the end, with failures switched off, TEARDOWN succeeds and everything is returned;
//! - no panic inside `moat-dma` for any input.

use std::cell::{Cell, RefCell};
use std::ops::Range;

use arbitrary::{Arbitrary, Unstructured};
use moat_dma::{
    Access, Clock, Counts, DmaState, Error, GuestRam, Iommu, IovaSource, Limits, Mapping, Policy,
    PAGE_SIZE,
};

/// First IOVA of the window the allocator hands out.
pub const WINDOW_BASE: u64 = 0x10_0000;
/// Pages in the IOVA window (one bit each in a `u64`).
pub const WINDOW_PAGES: usize = 64;
/// Guest RAM pages.
pub const RAM_PAGES: u64 = 256;
/// Host-physical address of guest page 0.
pub const HOST_BASE: u64 = 0x4000_0000;
/// A guest page that may never be mapped (stands for the MSI window).
pub const FORBIDDEN_PAGE: u64 = 0xF0;
/// vCPUs, each with its own allocator handle.
pub const VCPUS: usize = 3;
/// Ranges one vCPU's magazine caches before returning the oldest to the shared pool.
const MAG: usize = 4;
/// Pages covered by one (toy) page-table page.
const GROUP: usize = 8;

fn page_of(iova: u64) -> Option<usize> {
    let off = iova.checked_sub(WINDOW_BASE)?;
    let p = off / PAGE_SIZE;
    (off % PAGE_SIZE == 0 && p < WINDOW_PAGES as u64).then_some(p as usize)
}

fn mask(first: usize, pages: u64) -> u64 {
    assert!(pages >= 1 && first as u64 + pages <= WINDOW_PAGES as u64);
    let m = if pages == 64 {
        u64::MAX
    } else {
        (1u64 << pages) - 1
    };
    m << first
}

fn bits(m: u64) -> impl Iterator<Item = usize> {
    (0..WINDOW_PAGES).filter(move |&p| m & (1 << p) != 0)
}

/// The hardware and the allocator, shared by the domain and the vCPUs' allocator handles
/// (so a free can check the device-side cache).
pub struct Hw {
    /// Page-table entries: host-physical address per IOVA page.
    pte: [Option<u64>; WINDOW_PAGES],
    /// The device-side translation cache (IOTLB): filled by device accesses, emptied only by
    /// a successful flush of the pages pending invalidation.
    cache: [Option<u64>; WINDOW_PAGES],
    /// Unmaps whose PTEs are cleared and whose invalidation has not completed.
    unflushed: [(u8, u8); WINDOW_PAGES],
    n_unflushed: usize,
    unflushed_mask: u64,
    /// The next this many flushes fail.
    fail_flushes: u32,
    /// A flush failed and none succeeded since (the deferred bounds may be overrun until
    /// the next call retries).
    flush_owed: bool,
    /// The time (ns) of each unflushed unmap, in `unflushed` order.
    unflushed_at: [u64; WINDOW_PAGES],
    /// Now, in ns (the clock the service sees).
    now: u64,
    /// The next map fails (before writing anything).
    fail_map: bool,
    /// The next unmap fails (before clearing anything).
    fail_unmap: bool,
    /// Flushes that succeeded, and the invalidation requests they reported.
    flushes_ok: u64,
    invalidations: u64,
    /// Allocator: pages handed out and not returned.
    held: u64,
    /// Allocator: length in pages of the allocation starting at each page (0: none).
    alloc_len: [u8; WINDOW_PAGES],
    /// Allocator: pages in the shared pool.
    pool: u64,
    /// Allocator: each vCPU's cached ranges `(first page, pages)`, oldest first.
    mags: [[(u8, u8); MAG]; VCPUS],
    mag_n: [usize; VCPUS],
}

impl Hw {
    fn new() -> Self {
        Hw {
            pte: [None; WINDOW_PAGES],
            cache: [None; WINDOW_PAGES],
            unflushed: [(0, 0); WINDOW_PAGES],
            n_unflushed: 0,
            unflushed_mask: 0,
            fail_flushes: 0,
            flush_owed: false,
            unflushed_at: [0; WINDOW_PAGES],
            now: 0,
            fail_map: false,
            fail_unmap: false,
            flushes_ok: 0,
            invalidations: 0,
            held: 0,
            alloc_len: [0; WINDOW_PAGES],
            pool: u64::MAX,
            mags: [[(0, 0); MAG]; VCPUS],
            mag_n: [0; VCPUS],
        }
    }

    /// A device access to IOVA page `p`: its cached translation, else a table walk that
    /// fills the cache.
    fn device(&mut self, p: usize) -> Option<u64> {
        if let Some(h) = self.cache[p] {
            return Some(h);
        }
        let h = self.pte[p]?;
        self.cache[p] = Some(h);
        Some(h)
    }

    fn table_pages(&self) -> usize {
        1 + self
            .pte
            .chunks(GROUP)
            .filter(|g| g.iter().any(Option::is_some))
            .count()
    }

    fn mag_mask(&self) -> u64 {
        let mut m = 0;
        for (cpu, mag) in self.mags.iter().enumerate() {
            for &(first, pages) in &mag[..self.mag_n[cpu]] {
                let r = mask(first as usize, pages as u64);
                assert_eq!(m & r, 0, "a range cached twice in the magazines");
                m |= r;
            }
        }
        m
    }

    fn alloc(&mut self, cpu: usize, pages: u64) -> Option<u64> {
        if pages == 0 || pages > WINDOW_PAGES as u64 {
            return None;
        }
        // This vCPU's magazine first (cross-vCPU reuse: ranges freed here may have been
        // allocated on another vCPU).
        let n = self.mag_n[cpu];
        let first = match self.mags[cpu][..n]
            .iter()
            .position(|&(_, p)| p as u64 == pages)
        {
            Some(i) => {
                let (first, _) = self.mags[cpu][i];
                self.mags[cpu].copy_within(i + 1..n, i);
                self.mag_n[cpu] -= 1;
                first as usize
            }
            None => match self.pool_fit(pages) {
                Some(f) => f,
                None => {
                    // Give this vCPU's magazine back to the pool and try once more (the
                    // other vCPUs' magazines stay where they are).
                    for i in 0..self.mag_n[cpu] {
                        let (f, p) = self.mags[cpu][i];
                        self.pool |= mask(f as usize, p as u64);
                    }
                    self.mag_n[cpu] = 0;
                    self.pool_fit(pages)?
                }
            },
        };
        let m = mask(first, pages);
        assert_eq!(self.held & m, 0, "allocator: IOVA handed out twice");
        self.pool &= !m;
        self.held |= m;
        self.alloc_len[first] = pages as u8;
        Some(WINDOW_BASE + first as u64 * PAGE_SIZE)
    }

    fn pool_fit(&self, pages: u64) -> Option<usize> {
        (0..=WINDOW_PAGES - pages as usize).find(|&f| {
            let m = mask(f, pages);
            self.pool & m == m
        })
    }

    fn free(&mut self, cpu: usize, iova: u64, pages: u64) {
        let first =
            page_of(iova).unwrap_or_else(|| panic!("free of {iova:#x}: not an IOVA of the window"));
        assert_eq!(
            self.alloc_len[first] as u64, pages,
            "free of {iova:#x} ({pages} pages): not an allocation of that size (double free?)"
        );
        let m = mask(first, pages);
        assert_eq!(self.held & m, m, "free of {iova:#x}: pages not held");
        for p in bits(m) {
            assert!(
                self.pte[p].is_none(),
                "IOVA {:#x} released while its page-table entry is present",
                WINDOW_BASE + p as u64 * PAGE_SIZE
            );
            assert!(
                self.cache[p].is_none(),
                "IOVA {:#x} released while the device still has it cached (released before its invalidation)",
                WINDOW_BASE + p as u64 * PAGE_SIZE
            );
        }
        self.held &= !m;
        self.alloc_len[first] = 0;
        if self.mag_n[cpu] == MAG {
            let (f, p) = self.mags[cpu][0];
            self.pool |= mask(f as usize, p as u64);
            self.mags[cpu].copy_within(1.., 0);
            self.mag_n[cpu] -= 1;
        }
        self.mags[cpu][self.mag_n[cpu]] = (first as u8, pages as u8);
        self.mag_n[cpu] += 1;
    }
}

/// The IOMMU's pending set: the pages unmapped since the last successful flush.
#[derive(Default, Debug)]
pub struct Pending(u64);

/// The guest's domain on the model IOMMU.
pub struct Dom<'a>(&'a RefCell<Hw>);

impl Iommu for Dom<'_> {
    type Pending = Pending;

    fn map(&mut self, iova: u64, hpa: u64, len: u64, _a: Access) -> Result<(), Error> {
        let mut hw = self.0.borrow_mut();
        if std::mem::take(&mut hw.fail_map) {
            return Err(Error::Nomem);
        }
        #[cfg(feature = "cm-map-flush")]
        let cm_flush_fails = {
            // The kernel's VtdDomain under caching mode (or RWBF): the entries are written,
            // then a flush makes them usable; when that flush fails the call returns BUSY
            // with the entries in place.
            let f = hw.fail_flushes > 0;
            if f {
                hw.fail_flushes -= 1;
            }
            f
        };
        let first = page_of(iova).unwrap_or_else(|| panic!("map at {iova:#x}: outside the window"));
        assert!(
            len > 0 && len.is_multiple_of(PAGE_SIZE),
            "map of {len:#x} bytes"
        );
        let m = mask(first, len / PAGE_SIZE);
        assert_eq!(
            hw.held & m,
            m,
            "map at {iova:#x}: IOVA not held from the allocator"
        );
        for p in bits(m) {
            assert!(
                hw.pte[p].is_none(),
                "map over a present entry at page {p} (IOVA held twice)"
            );
        }
        for (i, p) in bits(m).enumerate() {
            hw.pte[p] = Some(hpa + i as u64 * PAGE_SIZE);
        }
        #[cfg(feature = "cm-map-flush")]
        if cm_flush_fails {
            return Err(Error::Busy);
        }
        Ok(())
    }

    fn unmap(&mut self, iova: u64, len: u64, pending: &mut Pending) -> Result<(), Error> {
        let mut hw = self.0.borrow_mut();
        if std::mem::take(&mut hw.fail_unmap) {
            return Err(Error::Busy);
        }
        let first =
            page_of(iova).unwrap_or_else(|| panic!("unmap at {iova:#x}: outside the window"));
        assert!(
            len > 0 && len.is_multiple_of(PAGE_SIZE),
            "unmap of {len:#x} bytes"
        );
        let pages = len / PAGE_SIZE;
        let m = mask(first, pages);
        for p in bits(m) {
            assert!(
                hw.pte[p].is_some(),
                "unmap of page {p}, which is not mapped"
            );
        }
        assert_eq!(pending.0, hw.unflushed_mask, "the pending set lost unmaps");
        for p in bits(m) {
            hw.pte[p] = None;
        }
        pending.0 |= m;
        let n = hw.n_unflushed;
        hw.unflushed[n] = (first as u8, pages as u8);
        hw.unflushed_at[n] = hw.now;
        hw.n_unflushed += 1;
        hw.unflushed_mask |= m;
        Ok(())
    }

    fn flush(&mut self, pending: &mut Pending) -> Result<u32, Error> {
        let mut hw = self.0.borrow_mut();
        assert_eq!(pending.0, hw.unflushed_mask, "the pending set lost unmaps");
        if hw.fail_flushes > 0 {
            hw.fail_flushes -= 1;
            hw.flush_owed = true;
            return Err(Error::Busy);
        }
        hw.flush_owed = false;
        for p in bits(pending.0) {
            hw.cache[p] = None;
        }
        let n = u32::from(pending.0 != 0);
        pending.0 = 0;
        hw.unflushed_mask = 0;
        hw.n_unflushed = 0;
        hw.flushes_ok += 1;
        hw.invalidations += u64::from(n);
        Ok(n)
    }

    fn table_pages(&self) -> usize {
        self.0.borrow().table_pages()
    }
}

/// One vCPU's allocator handle.
pub struct Handle<'a> {
    hw: &'a RefCell<Hw>,
    cpu: usize,
}

impl IovaSource for Handle<'_> {
    fn alloc(&mut self, pages: u64) -> Option<u64> {
        self.hw.borrow_mut().alloc(self.cpu, pages)
    }
    fn free(&mut self, iova: u64, pages: u64) {
        self.hw.borrow_mut().free(self.cpu, iova, pages)
    }
}

struct Ram;

impl GuestRam for Ram {
    fn size(&self) -> u64 {
        RAM_PAGES * PAGE_SIZE
    }
    fn host_base(&self) -> u64 {
        HOST_BASE
    }
    fn forbidden(&self, gpa: Range<u64>) -> bool {
        let f = FORBIDDEN_PAGE * PAGE_SIZE;
        gpa.start < f + PAGE_SIZE && gpa.end > f
    }
}

struct Clk(Cell<u64>);

impl Clock for Clk {
    fn cycles(&self) -> u64 {
        self.0.get()
    }
    fn now_ns(&self) -> u64 {
        self.0.get()
    }
}

/// The policy and limits of a run.
#[derive(Arbitrary, Debug)]
pub struct Setup {
    policy: u8,
    max_mappings: u8,
    max_mapped_pages: u8,
    max_table_pages: u8,
    max_pages_per_map: u8,
    deferred_entries: u8,
    deferred_ns: u16,
}

/// A guest address: mostly small page numbers (so calls meet), sometimes anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    Page(u8),
    Raw(u64),
}

/// A length: mostly a few pages, sometimes anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Len {
    Pages(u8),
    Raw(u64),
}

impl Len {
    fn bytes(self) -> u64 {
        match self {
            Len::Pages(p) => u64::from(p % 20) * PAGE_SIZE,
            Len::Raw(r) => r,
        }
    }
}

/// What an UNMAP names.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Target {
    /// A live mapping, exactly.
    Live(u8),
    /// A live mapping's IOVA with another length.
    LiveLen(u8, Len),
    /// A page inside a live mapping.
    Inside(u8, u8),
    /// A page of the IOVA window (live, pending, free or cached).
    Window(u8, Len),
    /// Anything.
    Raw(u64, u64),
}

/// One step.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Op {
    Map {
        vcpu: u8,
        gpa: Addr,
        len: Len,
        access: u8,
    },
    Unmap {
        vcpu: u8,
        target: Target,
    },
    BeginBatch,
    EndBatch {
        vcpu: u8,
    },
    Sync {
        vcpu: u8,
    },
    Tick {
        vcpu: u8,
        ns: u16,
    },
    Teardown {
        vcpu: u8,
    },
    /// The device accesses an IOVA page of the window.
    Touch {
        page: u8,
    },
    /// The next `n % 4` flushes fail.
    FailFlushes {
        n: u8,
    },
    /// The next map fails before writing anything.
    FailMap,
    /// The next unmap fails before clearing anything.
    FailUnmap,
}

/// A live mapping as this harness recorded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Live {
    iova: u64,
    pages: u64,
    gpa: u64,
    access: Access,
}

/// The calls seen, for the counters.
#[derive(Default, Debug)]
struct Seen {
    maps: u64,
    unmaps: u64,
    errors: u64,
}

struct World<'a> {
    policy: Policy,
    limits: Limits,
    st: DmaState<Pending>,
    hw: &'a RefCell<Hw>,
    dom: Dom<'a>,
    cpus: [Handle<'a>; VCPUS],
    clk: Clk,
    live: Vec<Live>,
    seen: Seen,
    in_batch: bool,
}

fn access_of(a: u8) -> Access {
    Access {
        read: a & 1 != 0,
        write: a & 2 != 0,
    }
}

/// The status a guest range `[gpa, gpa + len)` gets if it is malformed, outside the guest's
/// RAM or touches a forbidden page.
fn range_error(gpa: u64, len: u64) -> Option<Error> {
    if len == 0 || !len.is_multiple_of(PAGE_SIZE) || !gpa.is_multiple_of(PAGE_SIZE) {
        return Some(Error::Inval);
    }
    let Some(end) = gpa.checked_add(len) else {
        return Some(Error::Range);
    };
    if end > RAM_PAGES * PAGE_SIZE {
        return Some(Error::Fault);
    }
    if Ram.forbidden(gpa..end) {
        return Some(Error::Perm);
    }
    None
}

impl<'a> World<'a> {
    /// The status the ABI gives a MAP whose arguments are wrong, if they are.
    fn map_arg_error(&self, gpa: u64, len: u64, a: Access) -> Option<Error> {
        if !a.read && !a.write {
            return Some(Error::Inval);
        }
        if let Some(e) = range_error(gpa, len) {
            return Some(e);
        }
        if len / PAGE_SIZE > self.limits.max_pages_per_map {
            return Some(Error::Range);
        }
        None
    }

    fn gpa_overlaps(&self, gpa: u64, len: u64) -> bool {
        self.live
            .iter()
            .any(|m| m.gpa < gpa + len && gpa < m.gpa + m.pages * PAGE_SIZE)
    }

    fn counts(&self) -> Counts {
        self.st.counts(&self.dom)
    }

    fn map(&mut self, vcpu: usize, gpa: u64, len: u64, a: Access) {
        let arg_err = self.map_arg_error(gpa, len, a);
        let overlap = arg_err.is_none() && self.gpa_overlaps(gpa, len);
        let injected = self.hw.borrow().fail_map;
        let before = Before::take(self);
        let r = self.st.map(
            &mut self.dom,
            &mut self.cpus[vcpu],
            &Ram,
            &self.clk,
            gpa,
            len,
            a,
        );
        match r {
            Ok(iova) => {
                assert_eq!(
                    arg_err, None,
                    "MAP {gpa:#x}+{len:#x} accepted bad arguments"
                );
                assert!(!overlap, "MAP {gpa:#x}+{len:#x}: guest pages mapped twice");
                self.seen.maps += 1;
                if self.policy == Policy::Passthrough {
                    assert_eq!(iova, gpa, "passthrough: IOVA = guest-physical address");
                    return;
                }
                let pages = len / PAGE_SIZE;
                let first = page_of(iova).expect("an IOVA of the window");
                let m = mask(first, pages);
                let hw = self.hw.borrow();
                assert_eq!(
                    before.live_mask & m,
                    0,
                    "MAP returned IOVA {iova:#x}, which is live (held twice)"
                );
                assert_eq!(hw.unflushed_mask & m, 0, "MAP returned a pending IOVA");
                drop(hw);
                let got = self.st.mapping(iova);
                assert_eq!(
                    got,
                    Some(Mapping {
                        iova,
                        pages,
                        gpa,
                        access: a
                    })
                );
                self.live.push(Live {
                    iova,
                    pages,
                    gpa,
                    access: a,
                });
            }
            Err(e) => {
                self.seen.errors += 1;
                if let Some(want) = arg_err {
                    assert_eq!(e, want, "MAP {gpa:#x}+{len:#x} {a:?}");
                } else if overlap {
                    assert!(
                        matches!(e, Error::Exist | Error::Nomem),
                        "overlapping MAP got {e:?}"
                    );
                } else if self.policy != Policy::Passthrough {
                    assert!(
                        e == Error::Nomem,
                        "valid MAP {gpa:#x}+{len:#x} failed with {e:?} (injected: {injected})"
                    );
                } else {
                    panic!("passthrough MAP of valid arguments failed with {e:?}");
                }
                before.unchanged_by_failure(self, "MAP");
            }
        }
    }

    fn unmap(&mut self, vcpu: usize, iova: u64, len: u64) {
        let exact = self
            .live
            .iter()
            .position(|m| m.iova == iova && m.pages * PAGE_SIZE == len);
        let before = Before::take(self);
        let r = self.st.unmap(
            &mut self.dom,
            &mut self.cpus[vcpu],
            &Ram,
            &self.clk,
            iova,
            len,
        );
        if self.policy == Policy::Passthrough {
            let ok = range_error(iova, len).is_none();
            match r {
                Ok(()) => {
                    assert!(
                        ok,
                        "passthrough UNMAP {iova:#x}+{len:#x} accepted bad arguments"
                    );
                    self.seen.unmaps += 1;
                }
                Err(_) => {
                    assert!(!ok, "passthrough UNMAP of good arguments failed");
                    self.seen.errors += 1;
                }
            }
            return;
        }
        let gone = exact.is_some() && self.st.mapping(iova).is_none();
        match (r, gone) {
            (Ok(()), true) | (Err(Error::Busy), true) => {
                let i = exact.unwrap();
                let m = self.live.swap_remove(i);
                self.seen.unmaps += 1;
                let hw = self.hw.borrow();
                let first = page_of(m.iova).unwrap();
                for p in bits(mask(first, m.pages)) {
                    assert!(
                        hw.pte[p].is_none(),
                        "UNMAP returned with page {p} still mapped"
                    );
                }
                let sync = match self.policy {
                    Policy::Strict => true,
                    Policy::Batched => !self.in_batch,
                    _ => false,
                };
                if r.is_ok() && sync {
                    assert_eq!(
                        hw.n_unflushed, 0,
                        "{:?}: UNMAP returned OK with invalidations owed",
                        self.policy
                    );
                }
                if r.is_err() {
                    assert_ne!(hw.n_unflushed, 0, "UNMAP said BUSY but nothing is owed");
                }
            }
            (Ok(()), false) => panic!(
                "UNMAP {iova:#x}+{len:#x} returned OK but {} (exact live mapping: {exact:?})",
                if exact.is_some() {
                    "the mapping is still live"
                } else {
                    "it named no live mapping"
                }
            ),
            (Err(e), _) => {
                self.seen.errors += 1;
                if exact.is_some() {
                    assert!(
                        e == Error::Busy && before.fail_unmap,
                        "UNMAP of a live mapping failed with {e:?} without an injected failure"
                    );
                } else {
                    assert!(
                        matches!(e, Error::Inval | Error::Noent),
                        "UNMAP {iova:#x}+{len:#x} of no live mapping: {e:?}"
                    );
                    if len == 0 || !len.is_multiple_of(PAGE_SIZE) || !iova.is_multiple_of(PAGE_SIZE)
                    {
                        assert_eq!(e, Error::Inval);
                    }
                }
                before.unchanged_by_failure(self, "UNMAP");
            }
        }
    }

    fn apply(&mut self, op: Op) {
        let v = |x: u8| x as usize % VCPUS;
        match op {
            Op::Map {
                vcpu,
                gpa,
                len,
                access,
            } => {
                let gpa = match gpa {
                    Addr::Page(p) => u64::from(p) * PAGE_SIZE,
                    Addr::Raw(r) => r,
                };
                self.map(v(vcpu), gpa, len.bytes(), access_of(access));
            }
            Op::Unmap { vcpu, target } => {
                let pick = |i: u8| -> Option<Live> {
                    (!self.live.is_empty()).then(|| self.live[i as usize % self.live.len()])
                };
                let (iova, len) = match target {
                    Target::Live(i) => match pick(i) {
                        Some(m) => (m.iova, m.pages * PAGE_SIZE),
                        None => return,
                    },
                    Target::LiveLen(i, l) => match pick(i) {
                        Some(m) => (m.iova, l.bytes()),
                        None => return,
                    },
                    Target::Inside(i, off) => match pick(i) {
                        Some(m) => (m.iova + u64::from(off) % m.pages * PAGE_SIZE, PAGE_SIZE),
                        None => return,
                    },
                    Target::Window(p, l) => (
                        WINDOW_BASE + u64::from(p) % WINDOW_PAGES as u64 * PAGE_SIZE,
                        l.bytes(),
                    ),
                    Target::Raw(i, l) => (i, l),
                };
                self.unmap(v(vcpu), iova, len);
            }
            Op::BeginBatch => {
                self.st.begin_batch();
                self.in_batch = true;
            }
            Op::EndBatch { vcpu } => {
                let before = Before::take(self);
                let r = self
                    .st
                    .end_batch(&mut self.dom, &mut self.cpus[v(vcpu)], &self.clk);
                self.in_batch = false;
                match r {
                    Ok(()) if self.policy == Policy::Batched => {
                        assert_eq!(
                            self.hw.borrow().n_unflushed,
                            0,
                            "END_BATCH OK with invalidations owed"
                        )
                    }
                    Ok(()) => {}
                    Err(e) => {
                        assert_eq!(e, Error::Busy);
                        assert!(
                            before.fail_flushes > 0,
                            "END_BATCH failed without a flush failure"
                        );
                        before.flush_failed(self, "END_BATCH");
                    }
                }
            }
            Op::Sync { vcpu } => {
                let before = Before::take(self);
                let r = self
                    .st
                    .sync(&mut self.dom, &mut self.cpus[v(vcpu)], &self.clk);
                match r {
                    Ok(()) => assert_eq!(
                        self.hw.borrow().n_unflushed,
                        0,
                        "SYNC OK with invalidations owed"
                    ),
                    Err(e) => {
                        assert_eq!(e, Error::Busy);
                        assert!(
                            before.fail_flushes > 0,
                            "SYNC failed without a flush failure"
                        );
                        before.flush_failed(self, "SYNC");
                    }
                }
            }
            Op::Tick { vcpu, ns } => {
                self.clk.0.set(self.clk.0.get() + u64::from(ns));
                self.hw.borrow_mut().now = self.clk.0.get();
                self.st
                    .tick(&mut self.dom, &mut self.cpus[v(vcpu)], &self.clk);
            }
            Op::Teardown { vcpu } => self.teardown(v(vcpu)),
            Op::Touch { page } => {
                let p = page as usize % WINDOW_PAGES;
                self.hw.borrow_mut().device(p);
            }
            Op::FailFlushes { n } => self.hw.borrow_mut().fail_flushes = u32::from(n % 4),
            Op::FailMap => self.hw.borrow_mut().fail_map = true,
            Op::FailUnmap => self.hw.borrow_mut().fail_unmap = true,
        }
    }

    fn teardown(&mut self, vcpu: usize) {
        let r = self
            .st
            .teardown(&mut self.dom, &mut self.cpus[vcpu], &self.clk);
        self.in_batch = false;
        // Whatever teardown removed is no longer live (it may stop half-way on a failure).
        let st = &self.st;
        let removed = self
            .live
            .iter()
            .filter(|m| st.mapping(m.iova).is_none())
            .count();
        self.live.retain(|m| st.mapping(m.iova).is_some());
        match r {
            Ok(()) => {
                let c = self.counts();
                assert_eq!(
                    (c.mappings, c.pending, c.pinned_pages, c.iova_pages),
                    (0, 0, 0, 0),
                    "TEARDOWN OK left something held ({removed} removed)"
                );
                let hw = self.hw.borrow();
                assert!(
                    hw.pte.iter().all(Option::is_none),
                    "TEARDOWN OK left page-table entries"
                );
                assert!(
                    hw.cache.iter().all(Option::is_none),
                    "TEARDOWN OK left cached translations"
                );
                assert_eq!(hw.held, 0, "TEARDOWN OK left IOVAs held");
            }
            Err(e) => assert_eq!(e, Error::Busy, "TEARDOWN failed with {e:?}"),
        }
    }

    /// The invariants that hold between any two steps.
    fn check(&self) {
        let hw = self.hw.borrow();
        let c = self.counts();
        let s = self.st.stats();
        assert_eq!(s.maps, self.seen.maps, "stats.maps");
        assert_eq!(s.unmaps, self.seen.unmaps, "stats.unmaps");
        assert_eq!(s.errors, self.seen.errors, "stats.errors");
        assert_eq!(
            s.flushes, hw.flushes_ok,
            "stats.flushes = flushes the IOMMU completed"
        );
        assert_eq!(s.invalidations, hw.invalidations, "stats.invalidations");
        // The allocator: held, pool and magazines partition the window.
        let mags = hw.mag_mask();
        assert_eq!(hw.held & hw.pool, 0, "a held page is in the pool");
        assert_eq!(hw.held & mags, 0, "a held page is in a magazine");
        assert_eq!(hw.pool & mags, 0, "a page both in the pool and a magazine");
        assert_eq!(
            hw.held | hw.pool | mags,
            u64::MAX,
            "a page lost by the allocator"
        );
        assert_eq!(c.table_pages, hw.table_pages(), "counts.table_pages");
        if self.policy == Policy::Passthrough {
            assert_eq!(
                (c.mappings, c.pending, c.pinned_pages, c.iova_pages),
                (0, 0, 0, 0)
            );
            assert_eq!(hw.held, 0);
            return;
        }
        // Live mappings: disjoint in IOVA and in guest pages, each as recorded, in the tables.
        let mut live_mask = 0u64;
        let mut live_pages = 0u64;
        for (i, m) in self.live.iter().enumerate() {
            let first = page_of(m.iova).expect("live IOVA in the window");
            let mm = mask(first, m.pages);
            assert_eq!(live_mask & mm, 0, "two live mappings share an IOVA page");
            live_mask |= mm;
            live_pages += m.pages;
            for o in &self.live[..i] {
                assert!(
                    o.gpa + o.pages * PAGE_SIZE <= m.gpa || m.gpa + m.pages * PAGE_SIZE <= o.gpa,
                    "two live mappings share a guest page"
                );
            }
            assert_eq!(
                self.st.mapping(m.iova),
                Some(Mapping {
                    iova: m.iova,
                    pages: m.pages,
                    gpa: m.gpa,
                    access: m.access
                })
            );
            assert!(self.st.gpa_mapped(m.gpa, m.gpa + PAGE_SIZE));
            for (k, p) in bits(mm).enumerate() {
                assert_eq!(
                    hw.pte[p],
                    Some(HOST_BASE + m.gpa + k as u64 * PAGE_SIZE),
                    "live mapping {:#x}: wrong page-table entry",
                    m.iova
                );
            }
        }
        assert_eq!(
            live_mask & hw.unflushed_mask,
            0,
            "a live page is also pending"
        );
        #[cfg(feature = "deferred-bound")]
        if self.policy == Policy::Deferred && !hw.flush_owed {
            // The deferred bounds: after any call, fewer unmaps wait than the entry bound, and
            // (outside a batch) none is `deferred_ns` old.
            assert!(
                hw.n_unflushed < self.limits.deferred_entries,
                "{} unmaps wait, the bound is {}",
                hw.n_unflushed,
                self.limits.deferred_entries
            );
            if hw.n_unflushed > 0 && !self.in_batch {
                let age = hw.now - hw.unflushed_at[0];
                assert!(
                    age < self.limits.deferred_ns,
                    "a deferred unmap waits {age} ns, the bound is {} ns",
                    self.limits.deferred_ns
                );
            }
        }
        let pend_pages = u64::from(hw.unflushed_mask.count_ones());
        assert_eq!(c.mappings, self.live.len(), "counts.mappings");
        assert_eq!(
            c.pending, hw.n_unflushed,
            "counts.pending = unmaps not yet invalidated"
        );
        assert_eq!(
            c.pinned_pages,
            live_pages + pend_pages,
            "counts.pinned_pages"
        );
        assert_eq!(c.iova_pages, live_pages + pend_pages, "counts.iova_pages");
        // Held IOVAs are exactly the live and the pending ones: none leaked, none released
        // early.
        assert_eq!(
            hw.held,
            live_mask | hw.unflushed_mask,
            "allocator's held pages != live + pending"
        );
        for p in 0..WINDOW_PAGES {
            let bit = 1u64 << p;
            if hw.held & bit == 0 {
                assert!(
                    hw.pte[p].is_none(),
                    "free IOVA page {p} has a page-table entry"
                );
                assert!(
                    hw.cache[p].is_none(),
                    "free IOVA page {p} is still cached by the device (released before its invalidation)"
                );
            }
            if let Some(h) = hw.cache[p] {
                if live_mask & bit != 0 {
                    assert_eq!(
                        Some(h),
                        hw.pte[p],
                        "the device reaches live IOVA page {p} through a previous mapping's translation"
                    );
                } else {
                    assert!(
                        hw.unflushed_mask & bit != 0,
                        "cached page {p} neither live nor pending"
                    );
                }
            }
            if hw.pte[p].is_some() {
                assert!(live_mask & bit != 0, "page {p} mapped but not live");
            }
        }
    }
}

/// What a failing call must leave as it was.
struct Before {
    pte: [Option<u64>; WINDOW_PAGES],
    counts: Counts,
    held: u64,
    flushes_ok: u64,
    unflushed_mask: u64,
    live_mask: u64,
    fail_unmap: bool,
    fail_flushes: u32,
}

impl Before {
    fn take(w: &World) -> Before {
        let hw = w.hw.borrow();
        let mut live_mask = 0;
        for m in &w.live {
            if let Some(f) = page_of(m.iova) {
                live_mask |= mask(f, m.pages);
            }
        }
        Before {
            pte: hw.pte,
            counts: w.st.counts(&w.dom),
            held: hw.held,
            flushes_ok: hw.flushes_ok,
            unflushed_mask: hw.unflushed_mask,
            live_mask,
            fail_unmap: hw.fail_unmap,
            fail_flushes: hw.fail_flushes,
        }
    }

    /// A failed MAP or UNMAP: nothing changed, except that deferred work may have been
    /// flushed first (then everything pending before is released).
    fn unchanged_by_failure(&self, w: &World, what: &str) {
        let hw = w.hw.borrow();
        let c = w.st.counts(&w.dom);
        assert!(
            hw.pte == self.pte,
            "a failed {what} changed the page tables"
        );
        assert_eq!(
            c.mappings, self.counts.mappings,
            "a failed {what} changed the mappings"
        );
        assert_eq!(c.table_pages, self.counts.table_pages);
        if hw.flushes_ok == self.flushes_ok {
            assert_eq!(c, self.counts, "a failed {what} changed the counts");
            assert_eq!(hw.held, self.held, "a failed {what} changed the held IOVAs");
            assert_eq!(hw.unflushed_mask, self.unflushed_mask);
        } else {
            assert_eq!(hw.unflushed_mask, 0);
            assert_eq!(hw.held, self.held & !self.unflushed_mask);
        }
    }

    /// A flush that failed (SYNC, END_BATCH): everything pending stays held.
    fn flush_failed(&self, w: &World, what: &str) {
        let hw = w.hw.borrow();
        assert_eq!(
            hw.flushes_ok, self.flushes_ok,
            "{what} failed after a flush succeeded"
        );
        assert_eq!(
            hw.unflushed_mask, self.unflushed_mask,
            "{what} failed but changed the pending set"
        );
        assert_eq!(hw.held, self.held, "{what} failed but released IOVAs");
        assert!(hw.pte == self.pte);
        assert_eq!(
            w.st.counts(&w.dom),
            self.counts,
            "{what} failed but changed the counts"
        );
    }
}

fn setup_of(s: &Setup) -> (Policy, Limits) {
    let policy = [
        Policy::Strict,
        Policy::Batched,
        Policy::Deferred,
        Policy::Passthrough,
    ][s.policy as usize % 4];
    let limits = Limits {
        max_mappings: 1 + s.max_mappings as usize % 24,
        max_mapped_pages: 1 + u64::from(s.max_mapped_pages) % 80,
        max_table_pages: 1 + s.max_table_pages as usize % 16,
        max_pages_per_map: 1 + u64::from(s.max_pages_per_map) % 20,
        deferred_entries: 1 + s.deferred_entries as usize % 8,
        deferred_ns: 1 + u64::from(s.deferred_ns) % 2000,
    };
    (policy, limits)
}

/// Runs one input: a [`Setup`], then steps until the input is used up; then a teardown with
/// failures switched off must return everything.
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(setup) = Setup::arbitrary(&mut u) else {
        return;
    };
    let (policy, limits) = setup_of(&setup);
    let hw = RefCell::new(Hw::new());
    let mut w = World {
        policy,
        limits,
        st: DmaState::new(policy, limits),
        hw: &hw,
        dom: Dom(&hw),
        cpus: [0, 1, 2].map(|cpu| Handle { hw: &hw, cpu }),
        clk: Clk(Cell::new(0)),
        live: Vec::with_capacity(WINDOW_PAGES),
        seen: Seen::default(),
        in_batch: false,
    };
    while !u.is_empty() {
        let Ok(op) = Op::arbitrary(&mut u) else {
            break;
        };
        w.apply(op);
        w.check();
    }
    {
        let mut h = hw.borrow_mut();
        h.fail_flushes = 0;
        h.fail_map = false;
        h.fail_unmap = false;
    }
    w.teardown(0);
    w.check();
}

/// Decodes an input into its setup and steps (for reading a crash input).
pub fn describe(data: &[u8]) -> String {
    let mut u = Unstructured::new(data);
    let Ok(setup) = Setup::arbitrary(&mut u) else {
        return "(no setup)".into();
    };
    let (policy, limits) = setup_of(&setup);
    let mut s = format!("{policy:?} {limits:?}\n");
    while !u.is_empty() {
        let Ok(op) = Op::arbitrary(&mut u) else {
            break;
        };
        s.push_str(&format!("  {op:?}\n"));
    }
    s
}
