//! Stateful fuzzing of `moat-dma`'s [`DmaState`]: one guest, several vCPUs (each its own
//! [`IovaSource`] handle on a shared allocator with per-vCPU magazines, like the kernel's
//! per-CPU caches), arbitrary interleavings of map / unmap / begin_batch / end_batch / sync /
//! tick / teardown / reset_stats / note_error with arbitrary arguments (good and bad), device
//! accesses in between, and injectable failures, against a model IOMMU whose device keeps
//! using the translations it has cached until an invalidation covers them.
//!
//! The input's [`Setup`] picks the policy, the limits (`slack_ns < deferred_ns`) and whether
//! the IOMMU needs a flush after every map (caching mode / RWBF: [`Iommu::map_needs_flush`];
//! then a device racing the map may cache the new entries). Injected failures: the next
//! `n` flushes fail; the next map writes some of its entries, then fails and rolls them back
//! into the pending set (a racing device may have cached them), as the VT-d driver does when
//! it runs out of table pages half-way; the next unmap fails before clearing anything.
//!
//! The model is small on purpose (a 64-page IOVA window, 256 guest pages, fixed arrays and
//! bit masks) so one execution allocates little apart from `DmaState`'s own.
//!
//! Checked after every step (a failed check panics, which libFuzzer reports as a crash):
//! - **no IOVA held twice**: the allocator never hands out a page it has handed out and not
//!   got back, the domain never maps over a present entry, live mappings are disjoint in IOVA
//!   and in guest pages, and a MAP that succeeds never overlaps one that is live or waiting;
//! - **nothing released before its invalidation**: an IOVA page returned to the allocator
//!   (free list or a vCPU's magazine) has no page-table entry and no translation in the
//!   device-side cache, checked when it is freed and after every step; a cached translation
//!   of a live page is that page's current one (never a previous mapping's); the allocator's
//!   held pages are exactly live | waiting, where waiting = the unmaps and the rolled-back
//!   failed maps since the last successful flush, as the model IOMMU saw them (and
//!   `waiting()`, `counts().pending` / `rolled_back` / `pinned_pages` / `iova_pages`,
//!   `gpa_busy` must agree);
//! - **a failed call changes nothing visible**: a MAP or UNMAP that fails leaves the page
//!   tables and the live mappings as they were, and what waited waits still (unless a flush
//!   completed); the one thing a failed MAP may add is its own rolled-back range, IOVA held;
//!   a caching-mode MAP whose flush fails returns BUSY with its entries cleared into the
//!   pending set and its IOVA held; argument errors get the status the ABI gives them; a
//!   SYNC / END_BATCH whose flush fails keeps everything held;
//! - **Unsynced only where it may be**: an UNMAP returns `Unmapped::Unsynced` only under
//!   `Strict` or `Batched` outside a batch, only after an injected flush failure, and it took
//!   effect (mapping gone, entries cleared and pending, IOVA held, guest pages busy); `Done`
//!   there means nothing waits;
//! - **the deferred bounds** (every policy `Deferred` input): after every step, inside
//!   batches too, unless a flush failed and none succeeded since, fewer ranges wait than
//!   `deferred_entries` and the oldest is younger than `deferred_ns - slack_ns` at the last
//!   check (the service checks at the start of every call and in `tick`; time advances only
//!   in the Tick step, which calls `tick`, so the last check is "now");
//!   `deferred_deadline()` is the oldest's time + `deferred_ns`;
//! - **counters add up**: `counts()` equals this harness's own bookkeeping and `stats()` the
//!   calls it saw succeed and fail, the flushes the IOMMU completed and failed, the
//!   invalidations and completion waits they reported (after `reset_stats` from zero);
//! - **strict means strict**: after END_BATCH (`Strict`, `Batched`), SYNC and TEARDOWN return
//!   OK nothing waits and no new mapping is unflushed; a caching-mode MAP returns OK only
//!   after a flush completed (or when its flush and its undo both failed);
//! - at the end, with failures switched off, TEARDOWN succeeds and everything is returned;
//! - no panic inside `moat-dma` for any input.

use std::cell::RefCell;

use arbitrary::{Arbitrary, Unstructured};
use moat_dma::{
    Access, Counts, DmaState, Error, GuestRam, Iommu, IovaSource, Limits, Mapping, Policy,
    Unmapped, PAGE_SIZE,
};

#[path = "../../tests/support/mod.rs"]
mod support;
use support::{FlatRam, SetClock};

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

/// A range whose IOVA the service must hold until the pending invalidation completes, as
/// the model IOMMU saw it happen: an unmap, or the rollback of a failed map (entries written
/// and cleared again, or none written).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wait {
    first: u8,
    pages: u8,
    gpa: u64,
    since: u64,
    unmap: bool,
}

impl Wait {
    fn mask(&self) -> u64 {
        mask(self.first as usize, self.pages as u64)
    }
}

/// The hardware and the allocator, shared by the domain and the vCPUs' allocator handles
/// (so a free can check the device-side cache).
pub struct Hw {
    /// Page-table entries: host-physical address per IOVA page.
    pte: [Option<u64>; WINDOW_PAGES],
    /// The device-side translation cache (IOTLB): filled by device accesses (and, for
    /// entries a map writes under caching mode or before failing, by a device racing the
    /// write), emptied only by a successful flush of the pages pending invalidation.
    cache: [Option<u64>; WINDOW_PAGES],
    /// Pages whose entries were cleared (unmap, or a map's rollback) and whose invalidation
    /// has not completed: the pending set must equal it.
    inv: u64,
    /// Ranges whose IOVA must stay held until the next successful flush, oldest first.
    waits: [Wait; WINDOW_PAGES],
    n_waits: usize,
    /// Caching mode / RWBF: a new mapping needs a flush before the device may use it.
    map_needs_flush: bool,
    /// Pages mapped under `map_needs_flush` and not flushed since.
    fresh: u64,
    /// A `DmaState::map` call is running (an unmap inside it is the undo of a map whose
    /// flush failed: a rollback, not an unmap).
    in_map: bool,
    /// The next this many flushes fail.
    fail_flushes: u32,
    /// A flush failed and none succeeded since (the deferred bounds may be overrun until
    /// the next flush).
    flush_owed: bool,
    /// Now, in ns (the clock the service sees).
    now: u64,
    /// The next map fails after writing `n % pages` of its pages (then rolls them back).
    fail_map: Option<u8>,
    /// The unmap after the next `n` fails (before clearing anything).
    fail_unmap: Option<u8>,
    /// Flushes that succeeded, the invalidation requests they reported, those that
    /// reported at least one (completion waits), and flushes that failed.
    flushes_ok: u64,
    invalidations: u64,
    waits_ok: u64,
    flush_fails: u64,
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
    fn new(map_needs_flush: bool) -> Self {
        Hw {
            pte: [None; WINDOW_PAGES],
            cache: [None; WINDOW_PAGES],
            inv: 0,
            waits: [Wait::default(); WINDOW_PAGES],
            n_waits: 0,
            map_needs_flush,
            fresh: 0,
            in_map: false,
            fail_flushes: 0,
            flush_owed: false,
            now: 0,
            fail_map: None,
            fail_unmap: None,
            flushes_ok: 0,
            invalidations: 0,
            waits_ok: 0,
            flush_fails: 0,
            held: 0,
            alloc_len: [0; WINDOW_PAGES],
            pool: u64::MAX,
            mags: [[(0, 0); MAG]; VCPUS],
            mag_n: [0; VCPUS],
        }
    }

    fn waits(&self) -> &[Wait] {
        &self.waits[..self.n_waits]
    }

    fn wait_mask(&self) -> u64 {
        self.waits().iter().fold(0, |m, w| m | w.mask())
    }

    fn push_wait(&mut self, first: usize, pages: u64, gpa: u64, unmap: bool) {
        assert!(
            self.n_waits < WINDOW_PAGES,
            "more waiting ranges than IOVA pages"
        );
        let w = Wait {
            first: first as u8,
            pages: pages as u8,
            gpa,
            since: self.now,
            unmap,
        };
        assert_eq!(
            self.wait_mask() & w.mask(),
            0,
            "an IOVA waits for its invalidation twice (held twice)"
        );
        self.waits[self.n_waits] = w;
        self.n_waits += 1;
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

/// The IOMMU's pending set: the pages whose entries were cleared since the last successful
/// flush.
#[derive(Default, Debug)]
pub struct Pending(u64);

/// The guest's domain on the model IOMMU.
pub struct Dom<'a>(&'a RefCell<Hw>);

impl Iommu for Dom<'_> {
    type Pending = Pending;

    fn map(
        &mut self,
        iova: u64,
        hpa: moat_dma::PhysAddr,
        len: u64,
        _a: Access,
        pending: &mut Pending,
    ) -> Result<(), Error> {
        let hpa = hpa.as_u64();
        let mut hw = self.0.borrow_mut();
        assert_eq!(pending.0, hw.inv, "the pending set lost cleared entries");
        let first = page_of(iova).unwrap_or_else(|| panic!("map at {iova:#x}: outside the window"));
        assert!(
            len > 0 && len.is_multiple_of(PAGE_SIZE),
            "map of {len:#x} bytes"
        );
        let pages = len / PAGE_SIZE;
        let m = mask(first, pages);
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
        let gpa = hpa.wrapping_sub(HOST_BASE);
        if let Some(n) = hw.fail_map.take() {
            // Like the VT-d driver running out of table pages half-way: some entries are
            // written (and a racing device may cache them), then cleared again into the
            // pending set. The service must hold the IOVA until that is flushed.
            let k = u64::from(n) % pages;
            let written = if k == 0 { 0 } else { mask(first, k) };
            for (i, p) in bits(m).enumerate() {
                if written & (1 << p) != 0 {
                    hw.pte[p] = Some(hpa + i as u64 * PAGE_SIZE);
                    hw.device(p);
                    hw.pte[p] = None;
                }
            }
            hw.inv |= written;
            pending.0 |= written;
            hw.push_wait(first, pages, gpa, false);
            return Err(Error::Nomem);
        }
        for (i, p) in bits(m).enumerate() {
            hw.pte[p] = Some(hpa + i as u64 * PAGE_SIZE);
        }
        if hw.map_needs_flush {
            // Caching mode: the entries are not usable before the flush, but a device
            // racing the write may cache them (the worst case for an undo).
            hw.fresh |= m;
            for p in bits(m) {
                hw.device(p);
            }
        }
        Ok(())
    }

    fn map_needs_flush(&self) -> bool {
        self.0.borrow().map_needs_flush
    }

    fn unmap(&mut self, iova: u64, len: u64, pending: &mut Pending) -> Result<(), Error> {
        let mut hw = self.0.borrow_mut();
        assert_eq!(pending.0, hw.inv, "the pending set lost cleared entries");
        match hw.fail_unmap {
            Some(0) => {
                hw.fail_unmap = None;
                return Err(Error::Busy);
            }
            Some(n) => hw.fail_unmap = Some(n - 1),
            None => {}
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
        let gpa = hw.pte[first].unwrap() - HOST_BASE;
        for p in bits(m) {
            hw.pte[p] = None;
        }
        hw.fresh &= !m;
        hw.inv |= m;
        pending.0 |= m;
        let unmap = !hw.in_map;
        hw.push_wait(first, pages, gpa, unmap);
        Ok(())
    }

    fn flush(&mut self, pending: &mut Pending) -> Result<u32, Error> {
        let mut hw = self.0.borrow_mut();
        assert_eq!(pending.0, hw.inv, "the pending set lost cleared entries");
        if hw.fail_flushes > 0 {
            hw.fail_flushes -= 1;
            hw.flush_owed = true;
            hw.flush_fails += 1;
            return Err(Error::Busy);
        }
        hw.flush_owed = false;
        for p in bits(pending.0) {
            hw.cache[p] = None;
        }
        // One range invalidation for what was cleared, one for new caching-mode entries.
        let n = u32::from(pending.0 != 0) + u32::from(hw.fresh != 0);
        pending.0 = 0;
        hw.inv = 0;
        hw.fresh = 0;
        hw.n_waits = 0;
        hw.flushes_ok += 1;
        hw.invalidations += u64::from(n);
        if n > 0 {
            hw.waits_ok += 1;
        }
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

/// The guest's RAM: [`RAM_PAGES`] pages at [`HOST_BASE`], [`FORBIDDEN_PAGE`] never mappable.
const RAM: FlatRam = FlatRam {
    size: RAM_PAGES * PAGE_SIZE,
    host_base: HOST_BASE,
    forbidden_page: Some(FORBIDDEN_PAGE * PAGE_SIZE),
};

/// The policy, limits and IOMMU of a run.
#[derive(Arbitrary, Debug, Clone, Copy, Default)]
pub struct Setup {
    pub policy: u8,
    pub max_mappings: u8,
    pub max_mapped_pages: u8,
    pub max_table_pages: u8,
    pub max_pages_per_map: u8,
    pub deferred_entries: u8,
    pub deferred_ns: u16,
    /// Caching mode / RWBF: [`Iommu::map_needs_flush`].
    pub map_needs_flush: bool,
    /// `Limits::slack_ns` (taken modulo `deferred_ns`).
    pub slack_ns: u16,
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
    /// The next map fails after writing `written % pages` of its pages (rolled back into
    /// the pending set, like the VT-d driver out of table pages half-way).
    FailMap {
        written: u8,
    },
    /// The unmap after the next `skip % 4` fails before clearing anything (a later one:
    /// e.g. half-way through a teardown).
    FailUnmap {
        skip: u8,
    },
    /// STATS with RESET.
    ResetStats,
    /// A MAP or UNMAP refused before it reached the service (`note_error`).
    NoteError,
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
    clk: SetClock,
    live: Vec<Live>,
    seen: Seen,
    in_batch: bool,
    /// OPEN FINDING (see the README): a TEARDOWN that failed half-way (an unmap after others
    /// succeeded) returns without checking the deferred entry bound, and no later call checks
    /// it before the next unmap or flush. Set by such a teardown; the entry bound is not
    /// asserted until nothing waits. The time bound is asserted regardless.
    entry_bound_excused: bool,
    excuse_failed_teardown: bool,
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
    if RAM.forbidden(gpa..end) {
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

    fn live_mask(&self) -> u64 {
        self.live
            .iter()
            .filter_map(|m| page_of(m.iova).map(|f| mask(f, m.pages)))
            .fold(0, |a, m| a | m)
    }

    fn map(&mut self, vcpu: usize, gpa: u64, len: u64, a: Access) {
        let arg_err = self.map_arg_error(gpa, len, a);
        let overlap = arg_err.is_none() && self.gpa_overlaps(gpa, len);
        let before = Before::take(self);
        self.hw.borrow_mut().in_map = true;
        let r = self.st.map(
            &mut self.dom,
            &mut self.cpus[vcpu],
            &RAM,
            &self.clk,
            gpa,
            len,
            a,
        );
        self.hw.borrow_mut().in_map = false;
        let map_failed_injected = before.fail_map.is_some() && self.hw.borrow().fail_map.is_none();
        match r {
            Ok(iova) => {
                assert_eq!(
                    arg_err, None,
                    "MAP {gpa:#x}+{len:#x} accepted bad arguments"
                );
                assert!(!overlap, "MAP {gpa:#x}+{len:#x}: guest pages mapped twice");
                assert!(
                    !map_failed_injected,
                    "MAP OK although the domain's map failed"
                );
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
                assert_eq!(hw.inv & m, 0, "MAP returned a pending IOVA");
                assert_eq!(hw.wait_mask() & m, 0, "MAP returned a waiting IOVA");
                if hw.fresh & m != 0 {
                    // Caching mode: only when the flush failed and so did the undo (the map
                    // took effect; the next flush must run).
                    assert!(
                        before.fail_flushes > 0
                            && before.fail_unmap == Some(0)
                            && hw.fail_unmap.is_none(),
                        "MAP OK under caching mode before the flush that makes it usable"
                    );
                }
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
                    assert!(
                        !map_failed_injected,
                        "MAP with bad arguments reached the domain"
                    );
                } else if overlap {
                    assert!(
                        matches!(e, Error::Exist | Error::Nomem),
                        "overlapping MAP got {e:?}"
                    );
                } else if self.policy == Policy::Passthrough {
                    panic!("passthrough MAP of valid arguments failed with {e:?}");
                } else if e == Error::Busy {
                    // Caching mode, and the flush after the map failed: the entries are
                    // cleared again into the pending set, the IOVA held until it is flushed.
                    assert!(
                        self.hw.borrow().map_needs_flush && before.fail_flushes > 0,
                        "MAP BUSY without caching mode and a failed flush"
                    );
                    let hw = self.hw.borrow();
                    assert!(hw.flush_owed, "MAP BUSY but the last flush succeeded");
                    let w = hw.waits().last().copied();
                    let w = w.filter(|w| {
                        !w.unmap && w.gpa == gpa && u64::from(w.pages) * PAGE_SIZE == len
                    });
                    let w = w.unwrap_or_else(|| panic!("MAP BUSY: no rolled-back range waits"));
                    assert_eq!(
                        hw.inv & w.mask(),
                        w.mask(),
                        "MAP BUSY: entries not cleared into the pending set"
                    );
                    assert_eq!(
                        hw.held & w.mask(),
                        w.mask(),
                        "MAP BUSY: IOVA released before the flush"
                    );
                } else {
                    assert_eq!(
                        e,
                        Error::Nomem,
                        "valid MAP {gpa:#x}+{len:#x} failed with {e:?} (injected: {map_failed_injected})"
                    );
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
            &RAM,
            &self.clk,
            iova,
            len,
        );
        if self.policy == Policy::Passthrough {
            let ok = range_error(iova, len).is_none();
            match r {
                Ok(u) => {
                    assert!(
                        ok,
                        "passthrough UNMAP {iova:#x}+{len:#x} accepted bad arguments"
                    );
                    assert_eq!(u, Unmapped::Done, "passthrough UNMAP unsynced");
                    self.seen.unmaps += 1;
                }
                Err(_) => {
                    assert!(!ok, "passthrough UNMAP of good arguments failed");
                    self.seen.errors += 1;
                }
            }
            return;
        }
        let sync = match self.policy {
            Policy::Strict => true,
            Policy::Batched => !self.in_batch,
            _ => false,
        };
        match r {
            Ok(u) => {
                let i = exact.unwrap_or_else(|| {
                    panic!("UNMAP {iova:#x}+{len:#x} returned {u:?} but it named no live mapping")
                });
                assert_eq!(
                    self.st.mapping(iova),
                    None,
                    "UNMAP returned {u:?} but the mapping is still live"
                );
                let m = self.live.swap_remove(i);
                self.seen.unmaps += 1;
                let hw = self.hw.borrow();
                let mm = mask(page_of(m.iova).unwrap(), m.pages);
                for p in bits(mm) {
                    assert!(
                        hw.pte[p].is_none(),
                        "UNMAP returned with page {p} still mapped"
                    );
                }
                match u {
                    Unmapped::Done if sync => assert_eq!(
                        hw.n_waits, 0,
                        "{:?}: UNMAP returned Done with invalidations owed",
                        self.policy
                    ),
                    Unmapped::Done => {}
                    Unmapped::Unsynced => {
                        assert!(
                            sync,
                            "{:?} (in batch: {}): UNMAP returned Unsynced",
                            self.policy, self.in_batch
                        );
                        assert!(
                            before.fail_flushes > 0 && hw.flush_owed,
                            "UNMAP Unsynced without a failed flush"
                        );
                        // It took effect: entries cleared into the pending set, the IOVA
                        // held and waiting for the next flush.
                        assert_eq!(hw.inv & mm, mm, "UNMAP Unsynced: entries not pending");
                        assert_eq!(hw.held & mm, mm, "UNMAP Unsynced: IOVA released");
                        assert!(
                            hw.waits().iter().any(|w| w.unmap && w.mask() == mm),
                            "UNMAP Unsynced: the unmap does not wait"
                        );
                        assert!(
                            self.st.gpa_busy(m.gpa, m.gpa + PAGE_SIZE),
                            "UNMAP Unsynced: its guest pages are not busy"
                        );
                    }
                }
            }
            Err(e) => {
                self.seen.errors += 1;
                if exact.is_some() {
                    assert!(
                        e == Error::Busy && before.fail_unmap == Some(0),
                        "UNMAP of a live mapping failed with {e:?} without an injected failure"
                    );
                    assert!(
                        self.st.mapping(iova).is_some(),
                        "a failed UNMAP removed the mapping"
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
                    Ok(()) if matches!(self.policy, Policy::Batched | Policy::Strict) => {
                        let hw = self.hw.borrow();
                        assert_eq!(hw.n_waits, 0, "END_BATCH OK with invalidations owed");
                        assert_eq!(hw.fresh, 0, "END_BATCH OK with a map unflushed");
                    }
                    Ok(()) => {}
                    Err(e) => {
                        assert_eq!(e, Error::Busy);
                        assert!(
                            matches!(self.policy, Policy::Batched | Policy::Strict),
                            "{:?}: END_BATCH failed",
                            self.policy
                        );
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
                    Ok(()) => {
                        let hw = self.hw.borrow();
                        assert_eq!(hw.n_waits, 0, "SYNC OK with invalidations owed");
                        assert_eq!(hw.fresh, 0, "SYNC OK with a map unflushed");
                    }
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
                self.clk.advance(u64::from(ns));
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
            Op::FailMap { written } => self.hw.borrow_mut().fail_map = Some(written),
            Op::FailUnmap { skip } => self.hw.borrow_mut().fail_unmap = Some(skip % 4),
            Op::ResetStats => {
                self.st.reset_stats();
                self.seen = Seen::default();
                let mut hw = self.hw.borrow_mut();
                hw.flushes_ok = 0;
                hw.invalidations = 0;
                hw.waits_ok = 0;
                hw.flush_fails = 0;
            }
            Op::NoteError => {
                self.st.note_error();
                self.seen.errors += 1;
            }
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
                    (
                        c.mappings,
                        c.pending,
                        c.rolled_back,
                        c.pinned_pages,
                        c.iova_pages
                    ),
                    (0, 0, 0, 0, 0),
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
                assert_eq!(hw.n_waits, 0, "TEARDOWN OK left ranges waiting");
            }
            Err(e) => {
                assert_eq!(e, Error::Busy, "TEARDOWN failed with {e:?}");
                self.entry_bound_excused = self.excuse_failed_teardown;
            }
        }
    }

    /// The invariants that hold between any two steps.
    fn check(&mut self) {
        if self.hw.borrow().n_waits == 0 {
            self.entry_bound_excused = false;
        }
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
        assert_eq!(
            s.waits, hw.waits_ok,
            "stats.waits = flushes that invalidated"
        );
        assert_eq!(s.flush_failures, hw.flush_fails, "stats.flush_failures");
        assert!(s.deferred_flushes <= s.flushes, "stats.deferred_flushes");
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
                (
                    c.mappings,
                    c.pending,
                    c.rolled_back,
                    c.pinned_pages,
                    c.iova_pages
                ),
                (0, 0, 0, 0, 0)
            );
            assert_eq!(hw.held, 0);
            assert_eq!(self.st.deferred_deadline(), None);
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
        assert_eq!(self.st.mappings().count(), self.live.len(), "mappings()");
        // The waiting ranges (unmaps and rolled-back maps) as the service reports them, in
        // the order the IOMMU saw them.
        let waits = hw.waits();
        let wait_mask = hw.wait_mask();
        assert!(
            self.st
                .waiting()
                .map(|m| (m.iova, m.pages, m.gpa))
                .eq(waits.iter().map(|w| (
                    WINDOW_BASE + u64::from(w.first) * PAGE_SIZE,
                    u64::from(w.pages),
                    w.gpa
                ))),
            "waiting() != the unmaps and rollbacks since the last flush"
        );
        assert_eq!(live_mask & wait_mask, 0, "a live page also waits");
        assert_eq!(
            hw.inv & !wait_mask,
            0,
            "a cleared entry's IOVA does not wait"
        );
        let n_unmaps = waits.iter().filter(|w| w.unmap).count();
        let wait_pages: u64 = waits.iter().map(|w| u64::from(w.pages)).sum();
        assert_eq!(c.mappings, self.live.len(), "counts.mappings");
        assert_eq!(
            c.pending, n_unmaps,
            "counts.pending = unmaps not yet invalidated"
        );
        assert_eq!(
            c.rolled_back,
            waits.len() - n_unmaps,
            "counts.rolled_back = failed maps not yet invalidated"
        );
        assert_eq!(
            c.pinned_pages,
            live_pages + wait_pages,
            "counts.pinned_pages"
        );
        assert_eq!(c.iova_pages, live_pages + wait_pages, "counts.iova_pages");
        // Held IOVAs are exactly the live, the pending and the rolled-back ones: none leaked,
        // none released early.
        assert_eq!(
            hw.held,
            live_mask | wait_mask,
            "allocator's held pages != live + pending + rolled back"
        );
        // gpa_busy: true on every live or waiting guest range, false on every gap between.
        let mut busy: Vec<(u64, u64)> = self
            .live
            .iter()
            .map(|m| (m.gpa, m.gpa + m.pages * PAGE_SIZE))
            .chain(
                waits
                    .iter()
                    .map(|w| (w.gpa, w.gpa + u64::from(w.pages) * PAGE_SIZE)),
            )
            .collect();
        busy.sort_unstable();
        let mut at = 0;
        for &(s, e) in &busy {
            assert!(self.st.gpa_busy(s, e), "gpa_busy false on {s:#x}..{e:#x}");
            if s > at {
                assert!(
                    !self.st.gpa_busy(at, s),
                    "gpa_busy true on free {at:#x}..{s:#x}"
                );
            }
            at = at.max(e);
        }
        let ram = RAM_PAGES * PAGE_SIZE;
        if at < ram {
            assert!(
                !self.st.gpa_busy(at, ram),
                "gpa_busy true on free {at:#x}..{ram:#x}"
            );
        }
        if self.policy == Policy::Deferred {
            assert_eq!(
                self.st.deferred_deadline(),
                waits.first().map(|w| w.since + self.limits.deferred_ns),
                "deferred_deadline()"
            );
            // The deferred bounds. Every call checks them at its start (and an unmap or a
            // failed map the entry bound at its end), inside batches too; time advances only
            // in Tick, which checks right after. So after any step, unless a flush failed
            // and none succeeded since: fewer ranges wait than the entry bound, and the
            // oldest is younger than `deferred_ns - slack_ns` now (now = the last check).
            if !hw.flush_owed {
                assert!(
                    waits.len() < self.limits.deferred_entries || self.entry_bound_excused,
                    "{} ranges wait, the entry bound is {}",
                    waits.len(),
                    self.limits.deferred_entries
                );
                if let Some(w) = waits.first() {
                    let age = hw.now - w.since;
                    assert!(
                        age + self.limits.slack_ns < self.limits.deferred_ns,
                        "a deferred unmap waits {age} ns at the last check, the bound is {} ns - {} ns slack",
                        self.limits.deferred_ns,
                        self.limits.slack_ns
                    );
                }
            }
        } else {
            assert_eq!(self.st.deferred_deadline(), None);
        }
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
                        hw.inv & bit != 0,
                        "cached page {p} neither live nor pending invalidation"
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
    inv: u64,
    waits: Vec<Wait>,
    wait_mask: u64,
    live_mask: u64,
    fail_unmap: Option<u8>,
    fail_map: Option<u8>,
    fail_flushes: u32,
}

impl Before {
    fn take(w: &World) -> Before {
        let hw = w.hw.borrow();
        Before {
            pte: hw.pte,
            counts: w.st.counts(&w.dom),
            held: hw.held,
            flushes_ok: hw.flushes_ok,
            inv: hw.inv,
            waits: hw.waits().to_vec(),
            wait_mask: hw.wait_mask(),
            live_mask: w.live_mask(),
            fail_unmap: hw.fail_unmap,
            fail_map: hw.fail_map,
            fail_flushes: hw.fail_flushes,
        }
    }

    /// A failed MAP or UNMAP: the page tables and the mappings are as before; deferred work
    /// may have been flushed (then everything that waited before is released). The one thing
    /// a failed MAP may leave is its own rolled-back range, waiting (IOVA held) for the next
    /// flush.
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
        assert_eq!(w.live_mask(), self.live_mask);
        assert_eq!(c.table_pages, self.counts.table_pages);
        // The ranges added by this call (after the last flush, if one succeeded).
        let new: &[Wait] = if hw.flushes_ok == self.flushes_ok {
            assert!(
                hw.waits().starts_with(&self.waits),
                "a failed {what} changed what waits"
            );
            assert_eq!(
                hw.inv & self.inv,
                self.inv,
                "a failed {what} lost pending entries"
            );
            &hw.waits()[self.waits.len()..]
        } else {
            hw.waits()
        };
        let new_mask = new.iter().fold(0, |m, x| m | x.mask());
        if what == "MAP" {
            assert!(
                new.len() <= 1 && new.iter().all(|x| !x.unmap),
                "a failed MAP added {new:?}"
            );
        } else {
            assert!(new.is_empty(), "a failed {what} added {new:?}");
        }
        let kept = if hw.flushes_ok == self.flushes_ok {
            self.held
        } else {
            self.held & !self.wait_mask
        };
        assert_eq!(
            hw.held,
            kept | new_mask,
            "a failed {what} changed the held IOVAs"
        );
        if hw.flushes_ok == self.flushes_ok && new.is_empty() {
            assert_eq!(c, self.counts, "a failed {what} changed the counts");
            assert_eq!(hw.inv, self.inv);
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
            hw.inv, self.inv,
            "{what} failed but changed the pending set"
        );
        assert!(
            hw.waits() == &self.waits[..],
            "{what} failed but changed what waits"
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
    let deferred_ns = 1 + u64::from(s.deferred_ns) % 2000;
    let limits = Limits {
        max_mappings: 1 + s.max_mappings as usize % 24,
        max_mapped_pages: 1 + u64::from(s.max_mapped_pages) % 80,
        max_table_pages: 1 + s.max_table_pages as usize % 16,
        max_pages_per_map: 1 + u64::from(s.max_pages_per_map) % 20,
        deferred_entries: 1 + s.deferred_entries as usize % 8,
        deferred_ns,
        slack_ns: u64::from(s.slack_ns) % deferred_ns,
    };
    (policy, limits)
}

/// Runs one input: a [`Setup`], then steps until the input is used up; then a teardown with
/// failures switched off must return everything.
pub fn run(data: &[u8]) {
    run_with(data, false)
}

/// [`run`], choosing whether a TEARDOWN that fails half-way may leave the deferred entry bound
/// overrun (`true`: the behaviour before the fix of the finding in `tests/regressions.rs`;
/// `run` asserts the bound).
pub fn run_with(data: &[u8], excuse_failed_teardown: bool) {
    let mut u = Unstructured::new(data);
    let Ok(setup) = Setup::arbitrary(&mut u) else {
        return;
    };
    let (policy, limits) = setup_of(&setup);
    let hw = RefCell::new(Hw::new(setup.map_needs_flush));
    let mut w = World {
        policy,
        limits,
        st: DmaState::new(policy, limits),
        hw: &hw,
        dom: Dom(&hw),
        cpus: [0, 1, 2].map(|cpu| Handle { hw: &hw, cpu }),
        clk: SetClock::default(),
        live: Vec::with_capacity(WINDOW_PAGES),
        seen: Seen::default(),
        in_batch: false,
        entry_bound_excused: false,
        excuse_failed_teardown,
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
        h.fail_map = None;
        h.fail_unmap = None;
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
    let mut s = format!(
        "{policy:?} map_needs_flush: {} {limits:?}\n",
        setup.map_needs_flush
    );
    while !u.is_empty() {
        let Ok(op) = Op::arbitrary(&mut u) else {
            break;
        };
        s.push_str(&format!("  {op:?}\n"));
    }
    s
}

/// The bytes `run` decodes into `setup` and `ops` (for writing regression inputs by hand).
pub fn encode(setup: &Setup, ops: &[Op]) -> Vec<u8> {
    /// A derived enum's variant `i` of `n`: a `u32` `x` with `(x * n) >> 32 == i`.
    fn tag(b: &mut Vec<u8>, i: u64, n: u64) {
        let x = (i << 32).div_ceil(n);
        assert_eq!((x * n) >> 32, i);
        b.extend_from_slice(&(x as u32).to_le_bytes());
    }
    fn addr(b: &mut Vec<u8>, a: Addr) {
        match a {
            Addr::Page(p) => {
                tag(b, 0, 2);
                b.push(p);
            }
            Addr::Raw(r) => {
                tag(b, 1, 2);
                b.extend_from_slice(&r.to_le_bytes());
            }
        }
    }
    fn len(b: &mut Vec<u8>, l: Len) {
        match l {
            Len::Pages(p) => {
                tag(b, 0, 2);
                b.push(p);
            }
            Len::Raw(r) => {
                tag(b, 1, 2);
                b.extend_from_slice(&r.to_le_bytes());
            }
        }
    }
    let s = setup;
    let mut b = vec![
        s.policy,
        s.max_mappings,
        s.max_mapped_pages,
        s.max_table_pages,
        s.max_pages_per_map,
        s.deferred_entries,
    ];
    b.extend_from_slice(&s.deferred_ns.to_le_bytes());
    b.push(u8::from(s.map_needs_flush));
    b.extend_from_slice(&s.slack_ns.to_le_bytes());
    const N: u64 = 13;
    for &op in ops {
        match op {
            Op::Map {
                vcpu,
                gpa,
                len: l,
                access,
            } => {
                tag(&mut b, 0, N);
                b.push(vcpu);
                addr(&mut b, gpa);
                len(&mut b, l);
                b.push(access);
            }
            Op::Unmap { vcpu, target } => {
                tag(&mut b, 1, N);
                b.push(vcpu);
                match target {
                    Target::Live(i) => {
                        tag(&mut b, 0, 5);
                        b.push(i);
                    }
                    Target::LiveLen(i, l) => {
                        tag(&mut b, 1, 5);
                        b.push(i);
                        len(&mut b, l);
                    }
                    Target::Inside(i, o) => {
                        tag(&mut b, 2, 5);
                        b.extend_from_slice(&[i, o]);
                    }
                    Target::Window(p, l) => {
                        tag(&mut b, 3, 5);
                        b.push(p);
                        len(&mut b, l);
                    }
                    Target::Raw(i, l) => {
                        tag(&mut b, 4, 5);
                        b.extend_from_slice(&i.to_le_bytes());
                        b.extend_from_slice(&l.to_le_bytes());
                    }
                }
            }
            Op::BeginBatch => tag(&mut b, 2, N),
            Op::EndBatch { vcpu } => {
                tag(&mut b, 3, N);
                b.push(vcpu);
            }
            Op::Sync { vcpu } => {
                tag(&mut b, 4, N);
                b.push(vcpu);
            }
            Op::Tick { vcpu, ns } => {
                tag(&mut b, 5, N);
                b.push(vcpu);
                b.extend_from_slice(&ns.to_le_bytes());
            }
            Op::Teardown { vcpu } => {
                tag(&mut b, 6, N);
                b.push(vcpu);
            }
            Op::Touch { page } => {
                tag(&mut b, 7, N);
                b.push(page);
            }
            Op::FailFlushes { n } => {
                tag(&mut b, 8, N);
                b.push(n);
            }
            Op::FailMap { written } => {
                tag(&mut b, 9, N);
                b.push(written);
            }
            Op::FailUnmap { skip } => {
                tag(&mut b, 10, N);
                b.push(skip);
            }
            Op::ResetStats => tag(&mut b, 11, N),
            Op::NoteError => tag(&mut b, 12, N),
        }
    }
    b
}
