//! Lock-free per-CPU magazine IOVA allocator.
//!
//! Moat hands out I/O virtual addresses (IOVAs) for every DMA mapping a guest asks for, so the
//! allocator is on the map/unmap path of every I/O. It follows the magazine design of Bonwick &
//! Adams (2001) as applied to IOVAs by Linux's `iova.c` rcache and by Peleg et al. (ATC'15), in
//! three layers:
//!
//! 1. **Per-CPU magazines** ([`PerCpu`]): for each size class (orders 0 to
//!    [`MAX_CACHED_ORDER`], 1 page to 2 MiB) a *loaded* and a *previous* magazine of cached
//!    IOVAs. Alloc pops, free pushes; neither takes a lock or executes an atomic instruction.
//!    A `PerCpu` is obtained once per CPU with [`IovaAllocator::claim`] and used through
//!    `&mut self`, so two users of one CPU's cache cannot exist.
//! 2. **Depot**: per size class a lock-free stack of full magazines, and one stack of empty
//!    magazines, with an ABA tag in the 64-bit head (see [`stack`]). All magazines come from a
//!    pool allocated at construction, so no path after [`IovaAllocator::new`] allocates memory.
//!    The depot trims itself toward `depot_target` (default: the CPU count) full magazines per
//!    class, one magazine every [`TRIM_EVERY`] exchanges (see [`IovaAllocator::trim`]); when
//!    the pool has no empty magazine left, a CPU empties its full one into the backing
//!    allocator instead.
//! 3. **Backing allocator** (behind a spin lock, taken only on a miss): an AVL tree of free
//!    ranges with an exact "largest aligned fit" augmentation, so allocation and free are
//!    O(log n) in the number of ranges and never walk ranges linearly, plus a fixed-size hash
//!    registry of allocated ranges (order and state) that checks every free in O(1).
//!
//! IOVAs are page frame numbers (pfns) inside the domain window `[base, limit)`. Every range is
//! `2^order` pages aligned to its own size. Requests above [`MAX_CACHED_ORDER`] go straight to
//! the backing allocator. Allocation is lowest-address first, and every allocation honours a
//! caller limit (a device's DMA mask, see [`limit_for_dma_mask`]).
//!
//! # Exhaustion
//! When the backing allocator has no fitting range the allocating CPU (1) drains the depot of
//! every size class into the backing allocator, (2) empties its own magazines, then (3) bumps a
//! drain generation counter and waits a bounded number of spins for the other claimed CPUs to
//! acknowledge it. A CPU notices a new generation on its own slow path or when it calls
//! [`PerCpu::poll`] (the hypervisor calls it on hypercall entry and in its idle loop); it then
//! empties its magazines into the backing allocator itself. No CPU ever touches another CPU's
//! magazines and no remote lock exists. If the retry still fails the caller gets
//! [`Error::NoSpace`]. Nothing on any path panics.
//!
//! # Misuse detection
//! Every free is checked for order, alignment and window. With strict checking
//! ([`Config::strict`], on by default in debug builds) every allocated range also carries a
//! state (handed out / cached) in the backing allocator's registry, and every alloc and
//! free verifies and updates it: a double free, a free of something not allocated, or a free with
//! the wrong size is returned as an error and changes nothing. Without strict checking (release
//! default, to keep the hit path at a few nanoseconds) the hit path also rejects an immediate
//! double free (the IOVA on top of a magazine), and every IOVA that reaches the backing allocator
//! is checked against the registry there; a bad one is dropped and counted in
//! [`Stats::late_misuse`] instead of corrupting the free tree.
//!
//! # The invalidation rule
//! **An IOVA given to [`PerCpu::free`] (or [`IovaAllocator::free_uncached`]) may be handed out
//! again immediately.** The caller must therefore free an IOVA only after the IOTLB
//! invalidation that covers its unmapping has *completed* (the invalidation wait descriptor has
//! signalled). The allocator keeps no pending list: the caller holds unmapped-but-not-yet-
//! invalidated IOVAs (in Moat, the DMA service's per-domain flush queue for the `deferred`
//! policy, or the batch being unmapped for `strict` and `batched`).
#![no_std]
#![warn(missing_docs)]

extern crate alloc;

mod backing;
mod magazine;
mod percpu;
mod registry;
pub mod stack;
mod sync;

pub use magazine::MAG_SIZE;
pub use percpu::PerCpu;

use backing::{Backing, State};
use magazine::{Depot, MagRef};
use sync::{AtomicBool, AtomicU64, Ordering, SpinLock};

/// Number of cached size classes (orders `0..NUM_CLASSES`).
pub const NUM_CLASSES: usize = 10;
/// Largest order served from the magazines (2^9 pages = 2 MiB with 4 KiB pages).
pub const MAX_CACHED_ORDER: u8 = NUM_CLASSES as u8 - 1;
/// Page size the pfns refer to.
pub const PAGE_SHIFT: u32 = 12;
/// Highest window limit accepted (pfn), the whole 64-bit address space.
pub const MAX_PFN: u64 = 1 << (64 - PAGE_SHIFT);
/// A CPU trims the depot (see [`IovaAllocator::trim`]) once per this many depot exchanges.
pub const TRIM_EVERY: u32 = 64;
/// Most CPUs one allocator serves.
pub const MAX_CPUS: usize = 4096;

/// Errors of the allocator. None of them leaves the allocator in a changed state unless stated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Error {
    /// No free range of that order below the limit, after draining every cache.
    NoSpace,
    /// The order is 64 or more.
    InvalidOrder,
    /// The IOVA to free lies (partly) outside the window.
    OutOfWindow,
    /// The IOVA to free is not aligned to its size.
    Misaligned,
    /// No range starting at this IOVA is allocated.
    NotAllocated,
    /// A range starts at this IOVA but has another size.
    WrongSize {
        /// Order the range was allocated with.
        allocated_order: u8,
    },
    /// The range was already freed (it sits in a cache).
    DoubleFree,
    /// The CPU index is not below the configured CPU count.
    CpuOutOfRange,
    /// That CPU's handle is already claimed.
    CpuInUse,
    /// The configuration is invalid (empty window, no CPU, too many ranges, ...).
    InvalidConfig,
    /// Construction could not allocate its pools.
    OutOfMemory,
    /// Internal bookkeeping disagreed (a bug, or memory corruption); nothing was changed.
    Inconsistent,
    /// A range to reserve holds allocated (handed out or cached) pages.
    InUse,
    /// The IOVA to free lies (partly) in a reserved range: it was never handed out.
    Reserved,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::NoSpace => f.write_str("no IOVA space left below the limit"),
            Error::InvalidOrder => f.write_str("order too large"),
            Error::OutOfWindow => f.write_str("IOVA outside the allocator window"),
            Error::Misaligned => f.write_str("IOVA not aligned to its size"),
            Error::NotAllocated => f.write_str("IOVA not allocated"),
            Error::WrongSize { allocated_order } => {
                write!(
                    f,
                    "IOVA freed with the wrong size (allocated with order {allocated_order})"
                )
            }
            Error::DoubleFree => f.write_str("IOVA freed twice"),
            Error::CpuOutOfRange => f.write_str("CPU index out of range"),
            Error::CpuInUse => f.write_str("per-CPU handle already claimed"),
            Error::InvalidConfig => f.write_str("invalid allocator configuration"),
            Error::OutOfMemory => f.write_str("out of memory building the allocator"),
            Error::Inconsistent => f.write_str("allocator bookkeeping inconsistent"),
            Error::InUse => f.write_str("range to reserve is (partly) allocated"),
            Error::Reserved => f.write_str("IOVA inside a reserved range"),
        }
    }
}

/// An allocated IOVA range: `2^order` pages starting at page frame `pfn`, aligned to its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Iova {
    pfn: u64,
    order: u8,
}

impl Iova {
    /// Rebuilds an IOVA from raw parts (for instance from a guest's unmap request); the free
    /// path validates it.
    pub const fn new(pfn: u64, order: u8) -> Self {
        Self { pfn, order }
    }

    /// First page frame number.
    pub const fn pfn(self) -> u64 {
        self.pfn
    }

    /// Size class: the range has `2^order` pages.
    pub const fn order(self) -> u8 {
        self.order
    }

    /// Number of pages (saturating for orders of 64 and more).
    pub const fn pages(self) -> u64 {
        if self.order >= 64 {
            u64::MAX
        } else {
            1 << self.order
        }
    }

    /// First byte address (`pfn << PAGE_SHIFT`), if it fits in 64 bits.
    pub const fn addr(self) -> Option<u64> {
        if self.pfn >= MAX_PFN {
            None
        } else {
            Some(self.pfn << PAGE_SHIFT)
        }
    }
}

/// The smallest order whose size holds `pages` pages (`None` for 0 pages or more than 2^63).
pub const fn order_for_pages(pages: u64) -> Option<u8> {
    if pages == 0 || pages > 1 << 63 {
        None
    } else {
        Some((64 - (pages - 1).leading_zeros()) as u8)
    }
}

/// The exclusive pfn limit for a device DMA mask (e.g. `0x0fff_ffff` gives 65536: 256 MiB).
pub const fn limit_for_dma_mask(mask: u64) -> u64 {
    (mask >> PAGE_SHIFT) + (mask & 0xfff == 0xfff) as u64
}

/// Construction parameters of an [`IovaAllocator`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// First pfn of the window.
    pub base: u64,
    /// End of the window (exclusive pfn), at most [`MAX_PFN`].
    pub limit: u64,
    /// Number of per-CPU handles (physical CPUs, or host threads).
    pub cpus: usize,
    /// Most ranges allocated at once (handed out or cached); sizes the backing node arena
    /// (about 100 bytes per range: a free-tree node and two to four registry slots).
    pub max_ranges: usize,
    /// Full per-operation misuse checking (see the crate documentation).
    pub strict: bool,
    /// Full magazines per size class the depot trims itself toward (gradually: see
    /// [`IovaAllocator::trim`]).
    pub depot_target: usize,
    /// Magazines in the pool beyond the two per CPU and class: how many full magazines the
    /// depot can hold in all (more absorb longer alloc-here/free-there pipelines).
    pub depot_magazines: usize,
    /// How long an exhausted CPU waits for the others to drain (spin-loop iterations).
    pub drain_spins: u32,
}

impl Config {
    /// A configuration for the window `[base, limit)` shared by `cpus` CPUs, with defaults:
    /// 65536 ranges, strict checking in debug builds only, a depot target of `cpus`.
    pub const fn new(base: u64, limit: u64, cpus: usize) -> Self {
        Self {
            base,
            limit,
            cpus,
            max_ranges: 1 << 16,
            strict: cfg!(debug_assertions),
            depot_target: cpus,
            depot_magazines: 4 * cpus + 8,
            drain_spins: 1 << 14,
        }
    }

    /// Sets [`Config::max_ranges`].
    pub const fn with_max_ranges(mut self, max_ranges: usize) -> Self {
        self.max_ranges = max_ranges;
        self
    }

    /// Sets [`Config::strict`].
    pub const fn with_strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// Sets [`Config::depot_target`].
    pub const fn with_depot_target(mut self, depot_target: usize) -> Self {
        self.depot_target = depot_target;
        self
    }

    /// Sets [`Config::depot_magazines`].
    pub const fn with_depot_magazines(mut self, depot_magazines: usize) -> Self {
        self.depot_magazines = depot_magazines;
        self
    }

    /// Sets [`Config::drain_spins`].
    pub const fn with_drain_spins(mut self, drain_spins: u32) -> Self {
        self.drain_spins = drain_spins;
        self
    }

    fn magazines(&self) -> Option<usize> {
        // Two per CPU and class, plus one per CPU and class in flight during an exchange, plus
        // the depot's share.
        self.cpus
            .checked_mul(3 * NUM_CLASSES)?
            .checked_add(self.depot_magazines)
            .filter(|&n| n < u32::MAX as usize)
    }
}

/// A snapshot of the allocator's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Pages in the window.
    pub window_pages: u64,
    /// Pages free in the backing allocator.
    pub free_pages: u64,
    /// Free ranges (after coalescing) in the backing allocator.
    pub free_ranges: u64,
    /// Ranges allocated from the backing allocator (handed out or cached).
    pub allocated_ranges: u64,
    /// Pages handed out to callers (with strict checking; otherwise this includes cached ones).
    pub live_pages: u64,
    /// Pages sitting in magazines (tracked only with strict checking).
    pub cached_pages: u64,
    /// Full magazines in the depot per size class (racy snapshot).
    pub depot_full: [usize; NUM_CLASSES],
    /// Bad IOVAs caught when they reached the backing allocator from a magazine (release-mode
    /// misuse that the hit path could not see); each was dropped.
    pub late_misuse: u64,
    /// Pages reserved (never handed out; see [`IovaAllocator::reserve`]).
    pub reserved_pages: u64,
}

/// One CPU's slot in the allocator: claim flag and drain acknowledgement.
#[derive(Debug)]
struct CpuSlot {
    claimed: AtomicBool,
    ack: AtomicU64,
}

/// An IOVA allocator for one domain's window, shared by all CPUs (`Sync`).
#[derive(Debug)]
pub struct IovaAllocator {
    base: u64,
    end: u64,
    strict: bool,
    drain_spins: u32,
    depot: Depot,
    backing: SpinLock<Backing>,
    cpus: alloc::boxed::Box<[CpuSlot]>,
    drain_gen: AtomicU64,
    late_misuse: AtomicU64,
    /// Copy of the backing allocator's reserved ranges, read without its lock by the free
    /// hit path (only [`IovaAllocator::reserve`], which takes `&mut self`, changes it).
    reserved: alloc::vec::Vec<(u64, u64)>,
}

impl IovaAllocator {
    /// Builds an allocator (allocates the magazine pool and the backing node arena; this is the
    /// only place the crate allocates memory).
    pub fn new(config: Config) -> Result<Self, Error> {
        if config.base >= config.limit
            || config.limit > MAX_PFN
            || config.cpus == 0
            || config.cpus > MAX_CPUS
            || config.max_ranges == 0
        {
            return Err(Error::InvalidConfig);
        }
        let magazines = config.magazines().ok_or(Error::InvalidConfig)?;
        let depot = Depot::new(magazines, config.depot_target)?;
        let backing = Backing::new(config.base, config.limit, config.max_ranges)?;
        let mut cpus = alloc::vec::Vec::new();
        cpus.try_reserve_exact(config.cpus)
            .map_err(|_| Error::OutOfMemory)?;
        cpus.extend((0..config.cpus).map(|_| CpuSlot {
            claimed: AtomicBool::new(false),
            ack: AtomicU64::new(0),
        }));
        Ok(Self {
            base: config.base,
            end: config.limit,
            strict: config.strict,
            drain_spins: config.drain_spins,
            depot,
            backing: SpinLock::new(backing),
            cpus: cpus.into_boxed_slice(),
            drain_gen: AtomicU64::new(0),
            late_misuse: AtomicU64::new(0),
            reserved: alloc::vec::Vec::new(),
        })
    }

    /// Reserves the pages `[base_pfn, end_pfn)`: they are never handed out (e.g. the MSI
    /// window 0xFEE00000-0xFEFFFFFF and RMRRs when they lie inside the window), and a free of
    /// an IOVA touching them is refused with [`Error::Reserved`]. Only the part inside the
    /// window counts; reserving pages already reserved is allowed. Must be called before the
    /// allocator is shared (it takes `&mut self`), typically right after [`Self::new`]. Each
    /// disjoint reserved range counts as one of [`Config::max_ranges`].
    ///
    /// Errors, changing nothing: [`Error::InUse`] if a page of the range is allocated,
    /// [`Error::NoSpace`] if the range capacity is exhausted, [`Error::OutOfMemory`].
    pub fn reserve(&mut self, base_pfn: u64, end_pfn: u64) -> Result<(), Error> {
        let (s, e) = (base_pfn.max(self.base), end_pfn.min(self.end));
        if s >= e {
            return Ok(());
        }
        let mut copy = alloc::vec::Vec::new();
        let reserved = self.backing.with(|b| -> Result<(), Error> {
            copy.try_reserve_exact(b.reserved().len() + 1)
                .map_err(|_| Error::OutOfMemory)?;
            b.reserve(s, e)?;
            copy.extend_from_slice(b.reserved());
            Ok(())
        });
        reserved?;
        self.reserved = copy;
        Ok(())
    }

    /// The reserved ranges (pfns, `[start, end)`, sorted, disjoint).
    pub fn reserved(&self) -> &[(u64, u64)] {
        &self.reserved
    }

    /// Whether `iova` touches a reserved range.
    #[inline(always)]
    fn in_reserved(&self, iova: Iova) -> bool {
        let end = iova.pfn.saturating_add(iova.pages());
        self.reserved.iter().any(|&(a, b)| iova.pfn < b && end > a)
    }

    /// The window `[base, limit)` in pfns.
    pub fn window(&self) -> (u64, u64) {
        (self.base, self.end)
    }

    /// Whether strict misuse checking is on.
    pub fn strict(&self) -> bool {
        self.strict
    }

    /// Claims CPU `cpu`'s handle. At most one handle per CPU exists at a time; dropping it
    /// gives its cached IOVAs back and releases the claim.
    pub fn claim(&self, cpu: usize) -> Result<PerCpu<'_>, Error> {
        PerCpu::new(self, cpu)
    }

    /// Allocates through the backing allocator directly, bypassing the magazines (for callers
    /// without a CPU handle; exhaustion still drains the depot and asks the CPUs to drain).
    pub fn alloc_uncached(&self, order: u8, limit: u64) -> Result<Iova, Error> {
        if order >= 64 {
            return Err(Error::InvalidOrder);
        }
        let limit = limit.min(self.end);
        if let Ok(pfn) = self.backing.with(|b| b.alloc(order, limit)) {
            return Ok(Iova { pfn, order });
        }
        self.drain_depot();
        if let Ok(pfn) = self.backing.with(|b| b.alloc(order, limit)) {
            return Ok(Iova { pfn, order });
        }
        self.request_drain(None, || {});
        self.drain_depot();
        let pfn = self.backing.with(|b| b.alloc(order, limit))?;
        Ok(Iova { pfn, order })
    }

    /// Frees straight to the backing allocator (any order; always fully checked). The
    /// invalidation rule of the crate documentation applies.
    pub fn free_uncached(&self, iova: Iova) -> Result<(), Error> {
        self.check_range(iova)?;
        if self.in_reserved(iova) {
            return Err(Error::Reserved);
        }
        self.backing
            .with(|b| b.free(iova.pfn, iova.order, State::Live))
    }

    /// Cheap checks every free gets: order, alignment, window.
    #[inline(always)]
    fn check_range(&self, iova: Iova) -> Result<(), Error> {
        check_range(self.base, self.end, iova)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let c = self.backing.with(|b| b.counts());
        Stats {
            window_pages: self.end - self.base,
            free_pages: c.free_pages,
            free_ranges: c.free_ranges,
            allocated_ranges: c.allocated_ranges,
            live_pages: c.live_pages,
            cached_pages: c.cached_pages,
            depot_full: self.depot.full_counts(),
            late_misuse: self.late_misuse.load(Ordering::Relaxed),
            reserved_pages: self.reserved.iter().map(|&(a, b)| b - a).sum(),
        }
    }

    /// Checks every invariant of the backing allocator (O(n); for tests and diagnostics).
    pub fn verify(&self) -> Result<(), &'static str> {
        self.backing.with(|b| b.verify(self.base))
    }

    /// The state an IOVA in a magazine has in the backing allocator.
    #[inline(always)]
    fn cached_state(&self) -> State {
        if self.strict {
            State::Cached
        } else {
            State::Live
        }
    }

    /// Gives every IOVA in `mag` (of order `order`) back to the backing allocator.
    fn flush_magazine(&self, order: u8, mag: &mut MagRef<'_>) {
        if mag.is_empty() {
            return;
        }
        let state = self.cached_state();
        let mut bad = 0u64;
        self.backing.with(|b| {
            mag.drain(|pfn| {
                if b.free(pfn, order, state).is_err() {
                    bad += 1;
                }
            })
        });
        if bad != 0 {
            self.late_misuse.fetch_add(bad, Ordering::Relaxed);
        }
    }

    /// Trims the depot one step toward its target: every size class holding more than
    /// [`Config::depot_target`] full magazines gives one back to the backing allocator. The
    /// CPUs call this every [`TRIM_EVERY`] depot exchanges, so an idle surplus drains away
    /// gradually (like Linux's delayed depot work) while a busy alloc-here/free-there pipeline
    /// keeps the magazines it needs; the hypervisor may also call it from a timer. Returns the
    /// number of magazines trimmed.
    pub fn trim(&self) -> usize {
        let mut trimmed = 0;
        for (order, count) in self.depot.full_counts().into_iter().enumerate() {
            if count > self.depot.target()
                && let Some(mut m) = self.depot.pop_full(order)
            {
                self.flush_magazine(order as u8, &mut m);
                self.depot.push_empty(m);
                trimmed += 1;
            }
        }
        trimmed
    }

    /// Empties every full magazine of the depot into the backing allocator (the exhaustion path
    /// does this itself; also useful before tearing a domain down or to compact the window).
    pub fn drain_depot(&self) {
        for order in 0..NUM_CLASSES as u8 {
            while let Some(mut m) = self.depot.pop_full(order as usize) {
                self.flush_magazine(order, &mut m);
                self.depot.push_empty(m);
            }
        }
    }

    /// Asks every claimed CPU other than `me` to empty its magazines and waits (bounded) for
    /// their acknowledgements; `serve` runs while waiting so that the waiter answers requests
    /// from others. Returns the generation requested.
    fn request_drain(&self, me: Option<usize>, mut serve: impl FnMut()) -> u64 {
        let generation = self
            .drain_gen
            .fetch_add(1, Ordering::AcqRel)
            .wrapping_add(1);
        for _ in 0..self.drain_spins {
            let pending = self.cpus.iter().enumerate().any(|(i, s)| {
                Some(i) != me
                    && s.claimed.load(Ordering::Acquire)
                    && s.ack.load(Ordering::Acquire) < generation
            });
            if !pending {
                break;
            }
            serve();
            sync::spin_hint();
        }
        generation
    }
}

/// Cheap checks every free gets: order, alignment, window.
#[inline(always)]
fn check_range(base: u64, end: u64, iova: Iova) -> Result<(), Error> {
    if iova.order >= 64 {
        return Err(Error::InvalidOrder);
    }
    let size = 1u64 << iova.order;
    if iova.pfn & (size - 1) != 0 {
        return Err(Error::Misaligned);
    }
    if iova.pfn < base || iova.pfn > end.saturating_sub(size) || end - base < size {
        return Err(Error::OutOfWindow);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
