//! One page-table engine for every translation structure Moat builds.
//!
//! [`PageTable<F>`] maps, unmaps, translates and walks radix page tables whose entry format is
//! a [`Format`]: [`format::VtdSecondLevel`] (VT-d DMA remapping), [`format::Npt`] (AMD nested
//! paging), [`format::Ept`] (Intel EPT) and [`format::X86`] (the CPU's own 4-level tables).
//! The table pages live in a [`TableMemory`]; what an unmap or a release unlinks goes to a
//! [`Sink`] (for VT-d the domain's gather), to be freed only after the hardware's caches were
//! invalidated.
//! Table pages and leaf targets are host-physical addresses, [`PhysAddr`] (defined in
//! `moat-frames`, re-exported here with [`PAGE_SIZE`]); input addresses (IOVA, guest-physical,
//! virtual) stay `u64`.
//!
//! Invariants kept by the engine:
//! - a table page is unlinked only by an unmap whose range covers the table's whole span (then
//!   every address of the span was mapped and is pending in the sink, so no map can link a
//!   fresh table into the same slot before the invalidation), or by
//!   [`PageTable::release_empty_tables`] (teardown / quiesced); a table emptied by a smaller
//!   unmap, or left empty by a failed map, stays linked and is reused;
//! - a superpage is written only where the address and the physical address are aligned to it,
//!   the range covers it, the format and the configuration allow it, and no table is linked
//!   in its slot (the pages then go into that table, one level down);
//! - [`PageTable::map`] and [`PageTable::unmap`] are all-or-nothing: a failing map clears the
//!   leaves it wrote, keeps the tables it linked and reports the cleared range to the sink as
//!   an invalidation; unmap validates the whole range before it changes anything;
//! - a new table is linked with a compare-and-swap on the parent entry: maps of disjoint
//!   ranges may run concurrently, and the loser of a race frees its (never linked) page;
//! - with non-coherent walks (`coherent == false`) every written entry's cache line is flushed
//!   after the write, and every new table page before it is linked.
//!
//! # Walkers: one walk per batch
//!
//! A caller whose [`Sink`] carries a [`Walker`] keeps the table its last map or unmap wrote a
//! leaf in across calls: the next map or unmap in that table's span writes (or checks and
//! clears) its leaves there without walking from the root. The tree counts its unlinks (a
//! generation, bumped before every unlinking store); a walker's table is used only while the
//! generation is the one read before the walk that found it. That is sound under the
//! engine's contract that concurrent callers map and unmap disjoint ranges they own (for
//! VT-d, IOVA ranges from the allocator, which hands each range to one owner at a time):
//! - a table is unlinked only by an unmap covering its whole span (or a quiesced
//!   [`PageTable::release_empty_tables`]), so while a caller owns an address of the span
//!   nobody unlinks it;
//! - an unlink that happened before the caller came to own the address it maps or unmaps now
//!   happened before that ownership was handed over (the unlinker owned the address when it
//!   unlinked), so the caller's load of the generation sees its bump: the cached table is
//!   dropped and the tree walked again.
//!
//! The walker also keeps the bytes its maps and unmaps changed, added to the tree's shared
//! count ([`PageTable::mapped_bytes`]) when it walks again or on [`PageTable::settle`]
//! instead of on every call (one shared atomic less per operation).
//!
//! # Soundness
//!
//! The crate has no `unsafe`: every entry access goes through [`TableMemory`], whose
//! implementations must be sound for any argument (they touch only frames they handed out and
//! did not take back, and panic otherwise). A corrupted entry can therefore mislead the engine
//! into a panic or a wrong translation, never into undefined behaviour of the CPU.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(any(test, feature = "std"))]
extern crate std;

pub mod format;
#[cfg(any(test, feature = "proptest"))]
pub mod ops;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use core::marker::PhantomData;
use core::ops::Range;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

pub use format::Format;
use format::{is_leaf, ADDR_MASK, PS};

/// The host-physical address type (defined in `moat-frames`, the one for all of Moat): table
/// pages, and what leaves translate to.
pub use moat_frames::PhysAddr;
/// Size of a table page and of the smallest page: the one hardware page size of `moat-frames`.
pub use moat_frames::PAGE_SIZE;

/// The table an entry that is present and not a leaf points to.
const fn next_table(e: u64) -> PhysAddr {
    PhysAddr::new(e & ADDR_MASK)
}

/// Memory holding page-table pages.
///
/// The engine reads and writes entries only through these methods, at 8-byte aligned
/// addresses inside table pages it obtained from [`TableMemory::alloc_table`] and has not
/// given back (to [`TableMemory::free_table`], or to a [`Sink`] whose owner frees it later).
///
/// **Contract for implementations** (what makes the boundary sound): every method must be
/// sound for *any* argument. An implementation hands out frames that no Rust reference points
/// to and that nothing else uses until they are freed, and it checks that each access lies in
/// such a live frame (panicking otherwise), so that a bug or a corrupted entry in a safe
/// caller cannot read or write arbitrary memory. The methods take `&self`: entries are
/// accessed atomically, so maps of disjoint ranges may run on several CPUs.
pub trait TableMemory {
    /// Allocates a zero-filled, 4 KiB-aligned table page; `None` when out of memory.
    fn alloc_table(&self) -> Option<PhysAddr>;
    /// Gives back a page from `alloc_table` (no hardware can reach it any more).
    fn free_table(&self, table: PhysAddr);
    /// Atomic 64-bit load of the entry at `entry`.
    fn load_entry(&self, entry: PhysAddr) -> u64;
    /// Atomic 64-bit store to the entry at `entry`.
    fn store_entry(&self, entry: PhysAddr, value: u64);
    /// Atomic compare-and-swap of the entry at `entry`: `Ok(current)` when it held `current`
    /// and now holds `new`, `Err(actual)` otherwise.
    fn cas_entry(&self, entry: PhysAddr, current: u64, new: u64) -> Result<u64, u64>;
    /// Writes back the cache lines of `[addr, addr + len)` so a non-snooping walker sees the
    /// writes (only called when the table is configured non-coherent).
    fn flush_entries(&self, addr: PhysAddr, len: usize);
    /// The 512 entries of the table page at `table`, lent for a run of accesses checked once
    /// (a batch's leaves in one table), under the same contract as the single-entry methods
    /// (only a page from `alloc_table` not given back; checked, panicking otherwise).
    /// `None` (the default): the engine uses the single-entry methods.
    fn table(&self, table: PhysAddr) -> Option<&[AtomicU64; 512]> {
        let _ = table;
        None
    }
}

impl<M: TableMemory + ?Sized> TableMemory for &M {
    fn alloc_table(&self) -> Option<PhysAddr> {
        (**self).alloc_table()
    }
    fn free_table(&self, table: PhysAddr) {
        (**self).free_table(table)
    }
    fn load_entry(&self, entry: PhysAddr) -> u64 {
        (**self).load_entry(entry)
    }
    fn store_entry(&self, entry: PhysAddr, value: u64) {
        (**self).store_entry(entry, value)
    }
    fn cas_entry(&self, entry: PhysAddr, current: u64, new: u64) -> Result<u64, u64> {
        (**self).cas_entry(entry, current, new)
    }
    fn flush_entries(&self, addr: PhysAddr, len: usize) {
        (**self).flush_entries(addr, len)
    }
    fn table(&self, table: PhysAddr) -> Option<&[AtomicU64; 512]> {
        (**self).table(table)
    }
}

/// The entries of one table page, through [`TableMemory::table`] when the memory lends them
/// (checked once), else entry by entry.
struct Entries<'a, M: TableMemory> {
    mem: &'a M,
    table: PhysAddr,
    lent: Option<&'a [AtomicU64; 512]>,
}

impl<'a, M: TableMemory> Entries<'a, M> {
    #[inline(always)]
    fn new(mem: &'a M, table: PhysAddr) -> Self {
        Self {
            mem,
            table,
            lent: mem.table(table),
        }
    }

    #[inline(always)]
    fn load(&self, i: u64) -> u64 {
        match self.lent {
            Some(e) => e[(i & 511) as usize].load(Ordering::Acquire),
            None => self.mem.load_entry(self.table.entry(i)),
        }
    }

    #[inline(always)]
    fn store(&self, i: u64, value: u64) {
        match self.lent {
            Some(e) => e[(i & 511) as usize].store(value, Ordering::Release),
            None => self.mem.store_entry(self.table.entry(i), value),
        }
    }

    /// Writes `leaf(k)` into slot `first + k` for each slot of `[first, stop)` (indices in
    /// the table, `stop <= 512`) in order, stopping at the first slot whose entry is
    /// `present`; returns how many were written.
    #[inline(always)]
    fn fill_free(
        &self,
        (first, stop): (u64, u64),
        present: impl Fn(u64) -> bool,
        leaf: impl Fn(u64) -> u64,
    ) -> u64 {
        if let Some(e) = self.lent {
            // One bounds check for the run, then two slots per round (half the loop's
            // overhead; the second slot is read before the first is written: both are the
            // caller's), in order.
            let run = &e[first as usize..stop as usize];
            let mut pairs = run.chunks_exact(2);
            let mut k = 0;
            for p in &mut pairs {
                let (a, b) = (p[0].load(Ordering::Acquire), p[1].load(Ordering::Acquire));
                if present(a) {
                    return k;
                }
                p[0].store(leaf(k), Ordering::Release);
                if present(b) {
                    return k + 1;
                }
                p[1].store(leaf(k + 1), Ordering::Release);
                k += 2;
            }
            if let [slot] = pairs.remainder() {
                if present(slot.load(Ordering::Acquire)) {
                    return k;
                }
                slot.store(leaf(k), Ordering::Release);
                k += 1;
            }
            return k;
        }
        let mut i = first;
        while i < stop && !present(self.load(i)) {
            self.store(i, leaf(i - first));
            i += 1;
        }
        i - first
    }

    /// Whether the entry of every slot of `[first, stop)` is `present`.
    #[inline(always)]
    fn all(&self, (first, stop): (u64, u64), present: impl Fn(u64) -> bool) -> bool {
        match self.lent {
            Some(e) => e[first as usize..stop as usize]
                .iter()
                .all(|slot| present(slot.load(Ordering::Acquire))),
            None => (first..stop).all(|i| present(self.load(i))),
        }
    }

    /// Stores `value` into every slot of `[first, stop)`.
    #[inline(always)]
    fn set(&self, (first, stop): (u64, u64), value: u64) {
        match self.lent {
            Some(e) => {
                // Two slots per round, as in `fill_free`; an odd one first.
                let run = &e[first as usize..stop as usize];
                let (odd, pairs) = run.split_at(run.len() % 2);
                for slot in odd {
                    slot.store(value, Ordering::Release);
                }
                for p in pairs.chunks_exact(2) {
                    p[0].store(value, Ordering::Release);
                    p[1].store(value, Ordering::Release);
                }
            }
            None => {
                for i in first..stop {
                    self.store(i, value);
                }
            }
        }
    }
}

/// Where unmap and release put what must outlive the next invalidation.
pub trait Sink {
    /// A table page was unlinked: free it only after the invalidation covering it completed.
    fn table_unlinked(&mut self, table: PhysAddr);
    /// Translations of `range` changed without being reported as unmapped (a failed map's
    /// cleared leaves, the span of a released table): invalidate them.
    fn invalidate(&mut self, range: Range<u64>);
    /// The caller's [`Walker`], if it keeps one (see the crate docs); none by default.
    fn walker(&mut self) -> Option<&mut Walker> {
        None
    }
}

/// One caller's cache of the leaf table its last map or unmap used, and of the bytes it
/// mapped and unmapped since it last settled them (see "Walkers" in the crate docs). Use one
/// walker per caller and tree.
#[derive(Clone, Copy, Debug, Default)]
pub struct Walker {
    /// The table of the last leaf written or checked (kept when `level` is not 0).
    table: PhysAddr,
    /// Its level; 0: no table kept.
    level: u8,
    /// The base of its span.
    base: u64,
    /// The tree's unlink generation read before the walk that found `last`.
    generation: u64,
    /// Bytes mapped minus bytes unmapped, not yet added to the tree's count.
    mapped: i64,
}

impl Walker {
    /// Forgets the cached table (it is found again by the next walk).
    pub fn forget(&mut self) {
        self.level = 0;
    }
}

/// A sink that only collects unlinked tables, for users that invalidate everything anyway.
#[derive(Debug, Default)]
pub struct NoSink;

impl Sink for NoSink {
    fn table_unlinked(&mut self, _: PhysAddr) {}
    fn invalidate(&mut self, _: Range<u64>) {}
}

/// Errors of the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Address or length not page aligned, or zero length.
    Misaligned,
    /// The range leaves the address space or the physical address width.
    OutOfRange,
    /// The attributes grant no access (or an invalid combination).
    NoAccess,
    /// No memory for a table page.
    NoMemory,
    /// Part of the range is already mapped (the page containing `va`).
    AlreadyMapped {
        /// Base of the mapped page met.
        va: u64,
    },
    /// `va` is not mapped.
    NotMapped {
        /// The unmapped address.
        va: u64,
    },
    /// The range covers only part of a superpage.
    PartialSuperpage {
        /// Base of the superpage.
        va: u64,
        /// Its size.
        size: u64,
    },
}

/// The shape and options of one table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Number of levels (3, 4 or 5).
    pub levels: u8,
    /// Input addresses must be below `1 << va_bits`.
    pub va_bits: u32,
    /// Physical addresses must be below `1 << pa_bits`.
    pub pa_bits: u32,
    /// Bit `n`: leaves allowed at level `n` (intersected with the format's).
    pub superpages: u8,
    /// Walks snoop the CPU caches; when false every table write is flushed.
    pub coherent: bool,
}

/// The result of a lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation<A> {
    /// The physical address the input address translates to.
    pub phys: PhysAddr,
    /// The leaf's attributes.
    pub attr: A,
    /// Size of the page holding the address.
    pub page_size: u64,
}

/// Bit shift of the span of one entry at `level`.
pub const fn level_shift(level: u8) -> u32 {
    12 + 9 * (level as u32 - 1)
}

/// Bytes mapped by one entry at `level`.
pub const fn level_size(level: u8) -> u64 {
    1u64 << level_shift(level)
}

/// Base of the span of the table at `level` holding `va`.
const fn span_base(va: u64, level: u8) -> u64 {
    let span = level_shift(level) + 9;
    if span >= 64 {
        0
    } else {
        va & !((1u64 << span) - 1)
    }
}

/// Whether `va` lies in the span of the table at `level` whose span starts at `base`.
const fn in_span(va: u64, level: u8, base: u64) -> bool {
    span_base(va, level) == base
}

const fn index(va: u64, level: u8) -> u64 {
    (va >> level_shift(level)) & 0x1ff
}

/// Consecutive entries written and not yet flushed (non-coherent walks): flushed as one
/// range when the next write does not extend it, and by [`Run::flush`].
#[derive(Default)]
struct Run {
    /// First and last entry.
    slots: Option<(PhysAddr, PhysAddr)>,
}

impl Run {
    fn add<M: TableMemory>(&mut self, mem: &M, slot: PhysAddr) {
        if let Some((first, last)) = self.slots.as_mut()
            && slot.as_u64() == last.as_u64() + 8
            && slot.as_u64() & !(PAGE_SIZE - 1) == first.as_u64() & !(PAGE_SIZE - 1)
        {
            *last = slot;
            return;
        }
        self.flush(mem);
        self.slots = Some((slot, slot));
    }

    fn flush<M: TableMemory>(&mut self, mem: &M) {
        if let Some((first, last)) = self.slots.take() {
            mem.flush_entries(first, (last.as_u64() - first.as_u64() + 8) as usize);
        }
    }
}

/// One tree of page tables in format `F`.
#[derive(Debug)]
pub struct PageTable<F: Format> {
    root: PhysAddr,
    cfg: Config,
    table_pages: AtomicUsize,
    mapped_bytes: AtomicU64,
    /// Bumped before every store that unlinks a table (see "Walkers" in the crate docs).
    unlinks: AtomicU64,
    _format: PhantomData<fn() -> F>,
}

impl<F: Format> PageTable<F> {
    /// Allocates an empty root table.
    pub fn new<M: TableMemory>(mem: &M, cfg: Config) -> Result<Self, Error> {
        let root = mem.alloc_table().ok_or(Error::NoMemory)?;
        if !cfg.coherent {
            mem.flush_entries(root, PAGE_SIZE as usize);
        }
        Ok(Self {
            root,
            cfg,
            table_pages: AtomicUsize::new(1),
            mapped_bytes: AtomicU64::new(0),
            unlinks: AtomicU64::new(0),
            _format: PhantomData,
        })
    }

    /// Physical address of the root table.
    pub fn root(&self) -> PhysAddr {
        self.root
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Bytes mapped by [`Self::map`] and not unmapped since, but for what walkers hold
    /// unsettled ([`Self::settle`]).
    pub fn mapped_bytes(&self) -> u64 {
        self.mapped_bytes.load(Ordering::Relaxed)
    }

    /// Adds what `walker` counted to [`Self::mapped_bytes`].
    pub fn settle(&self, walker: &mut Walker) {
        let d = core::mem::take(&mut walker.mapped);
        if d != 0 {
            self.mapped_bytes.fetch_add(d as u64, Ordering::Relaxed);
        }
    }

    /// The sink's walker's table if it is still valid (the generation it was found at is
    /// `generation`, read before this call walks); a walker about to walk again settles its
    /// count.
    #[inline(always)]
    fn cached<S: Sink>(&self, sink: &mut S, generation: u64) -> Option<(PhysAddr, u8, u64)> {
        let w = sink.walker()?;
        if w.generation == generation && w.level != 0 {
            return Some((w.table, w.level, w.base));
        }
        self.settle(w);
        None
    }

    /// After a successful map (`delta` > 0) or unmap: keeps `last`, found with the tree at
    /// `generation`, in the sink's walker, with the bytes; without a walker the bytes go to
    /// the shared count at once.
    #[inline(always)]
    fn keep<S: Sink>(
        &self,
        sink: &mut S,
        last: Option<(PhysAddr, u8, u64)>,
        generation: u64,
        delta: i64,
    ) {
        match sink.walker() {
            Some(w) => {
                (w.table, w.level, w.base) = last.unwrap_or((PhysAddr::new(0), 0, 0));
                w.generation = generation;
                w.mapped += delta;
            }
            None => {
                self.mapped_bytes.fetch_add(delta as u64, Ordering::Relaxed);
            }
        }
    }

    /// Marks the unlink of a table (before the store that unlinks it).
    fn unlinking(&self) {
        self.unlinks.fetch_add(1, Ordering::AcqRel);
    }

    /// Table pages linked into the tree (root included).
    pub fn table_pages(&self) -> usize {
        self.table_pages.load(Ordering::Relaxed)
    }

    #[inline(always)]
    fn check_range(&self, va: u64, len: u64) -> Result<u64, Error> {
        if len == 0 || !va.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Misaligned);
        }
        let end = va.checked_add(len).ok_or(Error::OutOfRange)?;
        if end > 1u64 << self.cfg.va_bits {
            return Err(Error::OutOfRange);
        }
        Ok(end)
    }

    #[inline(always)]
    fn check_phys(&self, phys: u64, len: u64) -> Result<(), Error> {
        if !phys.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Misaligned);
        }
        match phys.checked_add(len) {
            Some(end) if end <= 1u64 << self.cfg.pa_bits => Ok(()),
            _ => Err(Error::OutOfRange),
        }
    }

    fn write<M: TableMemory>(&self, mem: &M, slot: PhysAddr, value: u64) {
        mem.store_entry(slot, value);
        if !self.cfg.coherent {
            mem.flush_entries(slot, 8);
        }
    }

    fn superpage_ok(&self, level: u8) -> bool {
        level > 1 && level < 8 && (self.cfg.superpages & F::SUPERPAGE_LEVELS) & (1 << level) != 0
    }

    /// Largest leaf level usable at `va`/`phys` with `remaining` bytes left.
    fn leaf_level(&self, va: u64, phys: u64, remaining: u64) -> u8 {
        for lvl in (2..self.cfg.levels).rev() {
            let s = level_size(lvl);
            if self.superpage_ok(lvl)
                && va.is_multiple_of(s)
                && phys.is_multiple_of(s)
                && remaining >= s
            {
                return lvl;
            }
        }
        1
    }

    fn leaf_entry(phys: u64, attr: F::Attr, level: u8) -> u64 {
        let mut e = phys | F::leaf_bits(attr);
        if level > 1 {
            e |= PS;
        }
        e
    }

    /// Links a fresh table into `slot`, which held the not-present `seen`. Returns the table
    /// now linked there (ours, or the one a concurrent map linked first).
    fn install<M: TableMemory>(&self, mem: &M, slot: PhysAddr, seen: u64) -> Result<u64, Error> {
        let next = mem.alloc_table().ok_or(Error::NoMemory)?;
        if !self.cfg.coherent {
            mem.flush_entries(next, PAGE_SIZE as usize);
        }
        match mem.cas_entry(slot, seen, F::table_entry(next)) {
            Ok(_) => {
                if !self.cfg.coherent {
                    mem.flush_entries(slot, 8);
                }
                self.table_pages.fetch_add(1, Ordering::Relaxed);
                Ok(F::table_entry(next))
            }
            Err(actual) => {
                // Lost the race: the page was never visible to any walker.
                mem.free_table(next);
                Ok(actual)
            }
        }
    }

    /// Maps `[va, va + len)` to `[phys, phys + len)` with `attr`, using the largest pages the
    /// alignment, the format and the configuration allow. Refuses to replace a mapping.
    ///
    /// On error the mapping is unchanged: the leaves this call wrote are cleared again and
    /// reported to `sink` as an invalidation; the tables it linked stay (empty, reused later).
    #[inline(always)]
    pub fn map<M: TableMemory, S: Sink>(
        &self,
        mem: &M,
        va: u64,
        phys: PhysAddr,
        len: u64,
        attr: F::Attr,
        sink: &mut S,
    ) -> Result<(), Error> {
        let phys = phys.as_u64();
        let end = self.check_range(va, len)?;
        self.check_phys(phys, len)?;
        if !F::valid_attr(attr) {
            return Err(Error::NoAccess);
        }
        // The table that received the last leaf: consecutive pages in its span skip the walk
        // (and with a walker, the next call's pages too).
        let generation = self.unlinks.load(Ordering::Acquire);
        let last = self.cached(sink, generation);
        if let Some((t, 1, base)) = last
            && self.fill_leaves(mem, (t, base), va, phys, end, attr, sink)
        {
            self.keep(sink, last, generation, len as i64);
            return Ok(());
        }
        self.map_walk(mem, sink, (va, end, phys, attr), (last, generation))
    }

    /// The rest of [`Self::map`] when the walker's table does not take the whole range:
    /// page by page, walking where the cached table does not cover the page. Kept out of
    /// line so that the common case (the fast path above) needs no large frame.
    #[inline(never)]
    fn map_walk<M: TableMemory, S: Sink>(
        &self,
        mem: &M,
        sink: &mut S,
        (va, end, phys, attr): (u64, u64, u64, F::Attr),
        (mut last, generation): (Option<(PhysAddr, u8, u64)>, u64),
    ) -> Result<(), Error> {
        let len = end - va;
        let mut cur = va;
        // Leaves written there and not flushed yet (non-coherent walks): one run of
        // consecutive slots, flushed when the run breaks and before returning.
        let mut run = Run::default();
        while cur < end {
            // Past the first page of a level-1 table's span only 4 KiB leaves fit: the pages
            // up to the span's end go straight into that table while their slots are free (a
            // taken slot goes through the general step below).
            if let Some((t, 1, base)) = last
                && cur != base
                && in_span(cur, 1, base)
            {
                let stop = end.min(base + level_size(2));
                let leaves = Entries::new(mem, t);
                while cur < stop {
                    let i = index(cur, 1);
                    if F::is_present(leaves.load(i)) {
                        break;
                    }
                    leaves.store(i, Self::leaf_entry(phys + (cur - va), attr, 1));
                    if !self.cfg.coherent {
                        run.add(mem, t.entry(i));
                    }
                    cur += PAGE_SIZE;
                }
                if cur >= end {
                    break;
                }
            }
            let p = phys + (cur - va);
            let want = self.leaf_level(cur, p, end - cur);
            let r = match last {
                Some((t, lvl, base)) if lvl == want && in_span(cur, lvl, base) => {
                    let slot = t.entry(index(cur, lvl));
                    if F::is_present(mem.load_entry(slot)) {
                        // Mapped, or a kept table: the full walk decides.
                        self.map_one(mem, cur, p, want, attr)
                    } else {
                        mem.store_entry(slot, Self::leaf_entry(p, attr, lvl));
                        if !self.cfg.coherent {
                            run.add(mem, slot);
                        }
                        Ok((lvl, t))
                    }
                }
                _ => self.map_one(mem, cur, p, want, attr),
            };
            match r {
                Ok((level, t)) => {
                    last = Some((t, level, span_base(cur, level)));
                    cur += level_size(level);
                }
                Err(e) => {
                    run.flush(mem);
                    if cur > va {
                        self.clear_range(mem, self.root, self.cfg.levels, va, cur, false, sink);
                        sink.invalidate(va..cur);
                    }
                    if let Some(w) = sink.walker() {
                        w.forget();
                    }
                    return Err(e);
                }
            }
        }
        run.flush(mem);
        self.keep(sink, last, generation, len as i64);
        Ok(())
    }

    /// The slots `[first, stop)` of `[va, end)` in the level-1 table of span `base`, when the
    /// range lies in that span and is smaller than it (no superpage fits, and clearing it
    /// never empties the whole table); `None` otherwise.
    #[inline(always)]
    fn leaf_run(base: u64, va: u64, end: u64) -> Option<(u64, u64)> {
        let span = level_size(2);
        if !in_span(va, 1, base) || end > base + span || end - va >= span {
            return None;
        }
        Some((index(va, 1), index(end - 1, 1) + 1))
    }

    /// The common case of a map (one walk per batch): `[va, end)` lies in the span `base` of
    /// the level-1 table `t` (the caller's cached leaf table) and is smaller than that span
    /// (so no superpage fits). Its 4 KiB leaves are written there in one pass (flushed as one
    /// run for non-coherent walks) and true is returned. A slot found taken stops the pass:
    /// the leaves written so far are cleared again (and reported to `sink` for invalidation,
    /// as the general path does), and false lets the general path decide.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn fill_leaves<M: TableMemory, S: Sink>(
        &self,
        mem: &M,
        (t, base): (PhysAddr, u64),
        va: u64,
        phys: u64,
        end: u64,
        attr: F::Attr,
        sink: &mut S,
    ) -> bool {
        let Some((first, stop)) = Self::leaf_run(base, va, end) else {
            return false;
        };
        let leaves = Entries::new(mem, t);
        let i = first
            + leaves.fill_free((first, stop), F::is_present, |k| {
                Self::leaf_entry(phys + (k << 12), attr, 1)
            });
        if i < stop {
            leaves.set((first, i), 0);
        }
        if !self.cfg.coherent && i > first {
            mem.flush_entries(t.entry(first), ((i - first) * 8) as usize);
        }
        if i < stop {
            if i > first {
                sink.invalidate(va..va + ((i - first) << 12));
            }
            return false;
        }
        true
    }

    /// At `leaf_level`: whether the leaf goes in the slot holding `e`. Where a table is
    /// linked there instead, the leaf moves one level lower and the walk goes on.
    fn leaf_goes_here(e: u64, level: u8, leaf_level: &mut u8) -> bool {
        if level > 1 && F::is_present(e) && !is_leaf(e, level) {
            *leaf_level -= 1;
            false
        } else {
            true
        }
    }

    /// Maps one page of `leaf_level` (or smaller where a table is linked in its slot) at
    /// `va`; returns the level of the leaf written and the table holding it.
    fn map_one<M: TableMemory>(
        &self,
        mem: &M,
        va: u64,
        phys: u64,
        mut leaf_level: u8,
        attr: F::Attr,
    ) -> Result<(u8, PhysAddr), Error> {
        let mut table = self.root;
        let mut level = self.cfg.levels;
        loop {
            let slot = table.entry(index(va, level));
            let mut e = mem.load_entry(slot);
            if level == leaf_level && Self::leaf_goes_here(e, level, &mut leaf_level) {
                break;
            }
            if !F::is_present(e) {
                e = self.install(mem, slot, e)?;
            }
            if is_leaf(e, level) {
                let s = level_size(level);
                return Err(Error::AlreadyMapped { va: va & !(s - 1) });
            }
            table = next_table(e);
            level -= 1;
        }
        let slot = table.entry(index(va, level));
        if F::is_present(mem.load_entry(slot)) {
            return Err(Error::AlreadyMapped { va });
        }
        self.write(mem, slot, Self::leaf_entry(phys, attr, level));
        Ok((level, table))
    }

    /// Maps `[va, va + len)` to `[phys, phys + len)` with `attr` (or clears it with `None`),
    /// replacing whatever was mapped there: for address spaces that are rebuilt in place (the
    /// hypervisor's own). A superpage only partly covered is first split into pages of the
    /// next level with its attributes; where a table is linked, the pages go into it. Never
    /// unlinks a table. Not all-or-nothing: on `NoMemory` a prefix may have changed.
    pub fn remap<M: TableMemory>(
        &self,
        mem: &M,
        va: u64,
        phys: PhysAddr,
        len: u64,
        attr: Option<F::Attr>,
    ) -> Result<(), Error> {
        let phys = phys.as_u64();
        let end = self.check_range(va, len)?;
        if let Some(a) = attr {
            self.check_phys(phys, len)?;
            if !F::valid_attr(a) {
                return Err(Error::NoAccess);
            }
        }
        let mut cur = va;
        while cur < end {
            let p = phys + (cur - va);
            let want = match attr {
                Some(_) => self.leaf_level(cur, p, end - cur),
                None => 1,
            };
            cur = self.remap_one(mem, cur, p, end, want, attr)?;
        }
        Ok(())
    }

    /// One step of [`Self::remap`]; returns where the next step starts.
    fn remap_one<M: TableMemory>(
        &self,
        mem: &M,
        va: u64,
        phys: u64,
        end: u64,
        mut leaf_level: u8,
        attr: Option<F::Attr>,
    ) -> Result<u64, Error> {
        let mut table = self.root;
        let mut level = self.cfg.levels;
        loop {
            let slot = table.entry(index(va, level));
            let mut e = mem.load_entry(slot);
            let size = level_size(level);
            let base = va & !(size - 1);
            let covered = base == va && end - va >= size;
            if attr.is_none() {
                // Clearing: a leaf or nothing wholly covered is cleared / skipped here.
                if !F::is_present(e) {
                    return Ok((base + size).min(end));
                }
                if is_leaf(e, level) && covered {
                    self.write(mem, slot, 0);
                    return Ok(base + size);
                }
            } else if level == leaf_level && Self::leaf_goes_here(e, level, &mut leaf_level) {
                break;
            }
            if !F::is_present(e) {
                e = self.install(mem, slot, e)?;
            } else if is_leaf(e, level) {
                e = self.split(mem, slot, e, level)?;
            }
            table = next_table(e);
            level -= 1;
        }
        let slot = table.entry(index(va, level));
        if let Some(a) = attr {
            self.write(mem, slot, Self::leaf_entry(phys, a, level));
        }
        Ok(va + level_size(level))
    }

    /// Replaces the superpage `e` in `slot` (at `level`) by a table of next-level pages with
    /// the same attributes; returns the new table entry.
    fn split<M: TableMemory>(
        &self,
        mem: &M,
        slot: PhysAddr,
        e: u64,
        level: u8,
    ) -> Result<u64, Error> {
        let t = mem.alloc_table().ok_or(Error::NoMemory)?;
        let size = level_size(level);
        let base = e & ADDR_MASK & !(size - 1);
        let attr = F::leaf_attr(e);
        let sub = level_size(level - 1);
        for i in 0..512u64 {
            mem.store_entry(
                t.entry(i),
                Self::leaf_entry(base + i * sub, attr, level - 1),
            );
        }
        if !self.cfg.coherent {
            mem.flush_entries(t, PAGE_SIZE as usize);
        }
        let te = F::table_entry(t);
        match mem.cas_entry(slot, e, te) {
            Ok(_) => {
                if !self.cfg.coherent {
                    mem.flush_entries(slot, 8);
                }
                self.table_pages.fetch_add(1, Ordering::Relaxed);
                Ok(te)
            }
            Err(actual) => {
                mem.free_table(t);
                Ok(actual)
            }
        }
    }

    /// Unmaps `[va, va + len)`: the whole range must be mapped and every superpage it touches
    /// must lie inside it. On error nothing changed. Table pages whose whole span the range
    /// covers are unlinked into `sink`.
    #[inline(always)]
    pub fn unmap<M: TableMemory, S: Sink>(
        &self,
        mem: &M,
        va: u64,
        len: u64,
        sink: &mut S,
    ) -> Result<(), Error> {
        let end = self.check_range(va, len)?;
        let generation = self.unlinks.load(Ordering::Acquire);
        let last = self.cached(sink, generation);
        if let Some((t, 1, base)) = last
            && self.clear_leaves(mem, t, base, va, end)
        {
            self.keep(sink, last, generation, -(len as i64));
            return Ok(());
        }
        self.unmap_walk(mem, (va, end), sink, (last, generation))
    }

    /// The rest of [`Self::unmap`] when the walker's table does not hold the whole range:
    /// checks every page (walking where the cached table does not cover it), then clears.
    /// Kept out of line so that the common case needs no large frame.
    #[inline(never)]
    fn unmap_walk<M: TableMemory, S: Sink>(
        &self,
        mem: &M,
        (va, end): (u64, u64),
        sink: &mut S,
        (mut last, generation): (Option<(PhysAddr, u8, u64)>, u64),
    ) -> Result<(), Error> {
        let len = end - va;
        let mut cur = va;
        // Whether every leaf of the range lies in one level-1 table (then cleared there).
        let mut one_table: Option<PhysAddr> = None;
        let mut single = true;
        while cur < end {
            // Pages in a level-1 table's span: checked there, page after page.
            if let Some((t, 1, base)) = last
                && in_span(cur, 1, base)
            {
                single &= *one_table.get_or_insert(t) == t;
                let stop = end.min(base + level_size(2));
                let leaves = Entries::new(mem, t);
                while cur < stop {
                    if !F::is_present(leaves.load(index(cur, 1))) {
                        return Err(Error::NotMapped { va: cur });
                    }
                    cur += PAGE_SIZE;
                }
                continue;
            }
            let (e, level, table) = match last {
                Some((t, lvl, base)) if in_span(cur, lvl, base) => {
                    let e = mem.load_entry(t.entry(index(cur, lvl)));
                    if F::is_present(e) && !is_leaf(e, lvl) {
                        self.walk_table(mem, cur)
                    } else {
                        (e, lvl, t)
                    }
                }
                _ => self.walk_table(mem, cur),
            };
            last = Some((table, level, span_base(cur, level)));
            if !F::is_present(e) {
                return Err(Error::NotMapped { va: cur });
            }
            let s = level_size(level);
            let base = cur & !(s - 1);
            if base < va || base + s > end {
                return Err(Error::PartialSuperpage { va: base, size: s });
            }
            single &= level == 1 && *one_table.get_or_insert(table) == table;
            cur = base + s;
        }
        let span = level_size(2);
        match one_table {
            // Pages of one leaf table, not its whole span (which would unlink it): cleared
            // there, without walking from the root again.
            Some(t) if single && !(va.is_multiple_of(span) && len == span) => {
                let (first, last_idx) = (index(va, 1), index(end - 1, 1));
                Entries::new(mem, t).set((first, last_idx + 1), 0);
                if !self.cfg.coherent {
                    mem.flush_entries(t.entry(first), ((last_idx - first + 1) * 8) as usize);
                }
            }
            _ => self.clear_range(mem, self.root, self.cfg.levels, va, end, true, sink),
        }
        self.keep(sink, last, generation, -(len as i64));
        Ok(())
    }

    /// The common case of an unmap (one walk per batch): `[va, end)` lies in the span `base`
    /// of the level-1 table `t` (the caller's cached leaf table) without covering all of it
    /// (which would unlink the table), and every slot holds a leaf. Then they are cleared in
    /// one pass (flushed as one run for non-coherent walks) and true is returned; otherwise
    /// nothing is cleared and the general path decides.
    #[inline(always)]
    fn clear_leaves<M: TableMemory>(
        &self,
        mem: &M,
        t: PhysAddr,
        base: u64,
        va: u64,
        end: u64,
    ) -> bool {
        let Some((first, stop)) = Self::leaf_run(base, va, end) else {
            return false;
        };
        let leaves = Entries::new(mem, t);
        if !leaves.all((first, stop), F::is_present) {
            return false;
        }
        leaves.set((first, stop), 0);
        if !self.cfg.coherent {
            mem.flush_entries(t.entry(first), ((stop - first) * 8) as usize);
        }
        true
    }

    /// The entry mapping `va` and its level; a not-present entry comes with the level at
    /// which the walk stopped.
    pub fn walk<M: TableMemory>(&self, mem: &M, va: u64) -> (u64, u8) {
        self.walk_path(mem, va, |_, _| {})
    }

    /// The entry, its level and the table holding it.
    fn walk_table<M: TableMemory>(&self, mem: &M, va: u64) -> (u64, u8, PhysAddr) {
        let mut table = self.root;
        let mut level = self.cfg.levels;
        loop {
            let e = mem.load_entry(table.entry(index(va, level)));
            if !F::is_present(e) || is_leaf(e, level) {
                return (e, level, table);
            }
            table = next_table(e);
            level -= 1;
        }
    }

    /// As [`Self::walk`], calling `f(level, entry)` for every entry read, root first.
    pub fn walk_path<M: TableMemory>(
        &self,
        mem: &M,
        va: u64,
        mut f: impl FnMut(u8, u64),
    ) -> (u64, u8) {
        let mut table = self.root;
        let mut level = self.cfg.levels;
        loop {
            let e = mem.load_entry(table.entry(index(va, level)));
            f(level, e);
            if !F::is_present(e) || is_leaf(e, level) {
                return (e, level);
            }
            table = next_table(e);
            level -= 1;
        }
    }

    /// Looks `va` up as the hardware would.
    pub fn translate<M: TableMemory>(&self, mem: &M, va: u64) -> Option<Translation<F::Attr>> {
        if va >= 1u64 << self.cfg.va_bits {
            return None;
        }
        let (e, level) = self.walk(mem, va);
        if !F::is_present(e) {
            return None;
        }
        let s = level_size(level);
        Some(Translation {
            phys: PhysAddr::new((e & ADDR_MASK & !(s - 1)) | (va & (s - 1))),
            attr: F::leaf_attr(e),
            page_size: s,
        })
    }

    /// Calls `f(va, level, entry)` for every present entry, tables before their contents, in
    /// address order.
    pub fn visit<M: TableMemory>(&self, mem: &M, mut f: impl FnMut(u64, u8, u64)) {
        fn rec<F: Format, M: TableMemory>(
            mem: &M,
            table: PhysAddr,
            level: u8,
            base: u64,
            f: &mut impl FnMut(u64, u8, u64),
        ) {
            for i in 0..512u64 {
                let e = mem.load_entry(table.entry(i));
                if !F::is_present(e) {
                    continue;
                }
                let va = base + i * level_size(level);
                f(va, level, e);
                if !is_leaf(e, level) {
                    rec::<F, M>(mem, next_table(e), level - 1, va, f);
                }
            }
        }
        rec::<F, M>(mem, self.root, self.cfg.levels, 0, &mut f);
    }

    /// Clears every present entry in `[start, end)` of `table` (at `level`), recursing into
    /// child tables. Leaves must be fully covered (checked by the caller). With `unlink`, a
    /// child table whose whole span lies in the range is unlinked into `sink`; any other child
    /// stays linked, even when it becomes empty.
    #[allow(clippy::too_many_arguments)]
    fn clear_range<M: TableMemory, S: Sink>(
        &self,
        mem: &M,
        table: PhysAddr,
        level: u8,
        start: u64,
        end: u64,
        unlink: bool,
        sink: &mut S,
    ) {
        let size = level_size(level);
        let mut cur = start;
        let mut first_written: Option<u64> = None;
        let mut last_written = 0;
        while cur < end {
            let idx = index(cur, level);
            let slot = table.entry(idx);
            let entry_base = cur & !(size - 1);
            let entry_end = entry_base.saturating_add(size);
            let sub_end = end.min(entry_end);
            let e = mem.load_entry(slot);
            if F::is_present(e) {
                let clear = if is_leaf(e, level) {
                    true
                } else {
                    let child = next_table(e);
                    self.clear_range(mem, child, level - 1, cur, sub_end, unlink, sink);
                    let whole = unlink && cur == entry_base && sub_end == entry_end;
                    if whole {
                        self.unlinking();
                        sink.table_unlinked(child);
                        self.table_pages.fetch_sub(1, Ordering::Relaxed);
                    }
                    whole
                };
                if clear {
                    mem.store_entry(slot, 0);
                    first_written.get_or_insert(idx);
                    last_written = idx;
                }
            }
            cur = sub_end;
        }
        if let Some(first) = first_written
            && !self.cfg.coherent
        {
            mem.flush_entries(
                table.entry(first),
                ((last_written - first + 1) * 8) as usize,
            );
        }
    }

    fn table_empty<M: TableMemory>(mem: &M, table: PhysAddr) -> bool {
        (0..512).all(|i| !F::is_present(mem.load_entry(table.entry(i))))
    }

    /// Unlinks every table page without a present entry (a child's release may empty its
    /// parent) into `sink`, with its whole span as an invalidation. The root stays. Returns
    /// the number of pages unlinked. For teardown or a quiesced table: no map or unmap may
    /// run concurrently, and no map until the sink's invalidation completed (the caller
    /// guarantees it; a violation can mislink a table, never cause undefined behaviour).
    pub fn release_empty_tables<M: TableMemory, S: Sink>(&self, mem: &M, sink: &mut S) -> usize {
        fn release<F: Format, M: TableMemory, S: Sink>(
            pt: &PageTable<F>,
            mem: &M,
            table: PhysAddr,
            level: u8,
            base: u64,
            sink: &mut S,
        ) -> usize {
            if level == 1 {
                return 0;
            }
            let mut released = 0;
            let size = level_size(level);
            for i in 0..512u64 {
                let slot = table.entry(i);
                let e = mem.load_entry(slot);
                if !F::is_present(e) || is_leaf(e, level) {
                    continue;
                }
                let child = next_table(e);
                let start = base + i * size;
                released += release(pt, mem, child, level - 1, start, sink);
                if PageTable::<F>::table_empty(mem, child) {
                    pt.unlinking();
                    pt.write(mem, slot, 0);
                    sink.table_unlinked(child);
                    sink.invalidate(start..start + size);
                    pt.table_pages.fetch_sub(1, Ordering::Relaxed);
                    released += 1;
                }
            }
            released
        }
        release(self, mem, self.root, self.cfg.levels, 0, sink)
    }

    /// Frees every table page, root included. Only when no hardware can walk the tables any
    /// more.
    pub fn free_all<M: TableMemory>(self, mem: &M) {
        fn free_level<F: Format, M: TableMemory>(mem: &M, table: PhysAddr, level: u8) {
            if level > 1 {
                for i in 0..512 {
                    let e = mem.load_entry(table.entry(i));
                    if F::is_present(e) && !is_leaf(e, level) {
                        free_level::<F, M>(mem, next_table(e), level - 1);
                    }
                }
            }
            mem.free_table(table);
        }
        free_level::<F, M>(mem, self.root, self.cfg.levels);
    }
}

#[cfg(test)]
mod tests;
