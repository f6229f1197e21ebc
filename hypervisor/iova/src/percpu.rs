//! The per-CPU layer: a loaded and a previous magazine per size class.

use core::mem::{replace, swap, ManuallyDrop};

use crate::backing::State;
use crate::magazine::MagRef;
use crate::sync::Ordering;
use crate::{check_range, Error, Iova, IovaAllocator, NUM_CLASSES};

struct ClassCache<'a> {
    loaded: MagRef<'a>,
    prev: MagRef<'a>,
}

/// One CPU's handle on an [`IovaAllocator`]: its private magazines.
///
/// Obtained with [`IovaAllocator::claim`]; at most one exists per CPU index, and every
/// operation takes `&mut self`, so the magazines are only ever touched by their owner and the
/// hit path needs neither locks nor atomic instructions. In the hypervisor each physical CPU
/// keeps its handle in its per-CPU area and uses it with interrupts off; on the host, one handle
/// per thread. Dropping the handle returns every cached IOVA to the backing allocator and
/// releases the claim.
pub struct PerCpu<'a> {
    alloc: &'a IovaAllocator,
    cpu: usize,
    base: u64,
    end: u64,
    strict: bool,
    seen_gen: u64,
    exchanges: u32,
    classes: ManuallyDrop<[ClassCache<'a>; NUM_CLASSES]>,
}

impl core::fmt::Debug for PerCpu<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PerCpu")
            .field("cpu", &self.cpu)
            .finish_non_exhaustive()
    }
}

/// An empty magazine for a new CPU: from the empty stack, or else a full one emptied.
fn take_empty(alloc: &IovaAllocator) -> Option<MagRef<'_>> {
    if let Some(m) = alloc.depot.pop_empty() {
        return Some(m);
    }
    (0..NUM_CLASSES as u8).find_map(|order| {
        let mut m = alloc.depot.pop_full(order as usize)?;
        alloc.flush_magazine(order, &mut m);
        Some(m)
    })
}

fn take_pair(alloc: &IovaAllocator) -> Option<ClassCache<'_>> {
    let loaded = take_empty(alloc)?;
    match take_empty(alloc) {
        Some(prev) => Some(ClassCache { loaded, prev }),
        None => {
            alloc.depot.push_empty(loaded);
            None
        }
    }
}

impl<'a> PerCpu<'a> {
    pub(crate) fn new(alloc: &'a IovaAllocator, cpu: usize) -> Result<Self, Error> {
        let slot = alloc.cpus.get(cpu).ok_or(Error::CpuOutOfRange)?;
        if slot
            .claimed
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(Error::CpuInUse);
        }
        let mut caches: [Option<ClassCache<'a>>; NUM_CLASSES] =
            core::array::from_fn(|_| take_pair(alloc));
        if caches.iter().any(Option::is_none) {
            // The pool is sized for every CPU, so this is unreachable; undo and report it.
            for c in caches.iter_mut().filter_map(Option::take) {
                alloc.depot.push_empty(c.loaded);
                alloc.depot.push_empty(c.prev);
            }
            slot.claimed.store(false, Ordering::Release);
            return Err(Error::Inconsistent);
        }
        let [Some(c0), Some(c1), Some(c2), Some(c3), Some(c4), Some(c5), Some(c6), Some(c7), Some(c8), Some(c9)] =
            caches
        else {
            slot.claimed.store(false, Ordering::Release);
            return Err(Error::Inconsistent);
        };
        let seen_gen = alloc.drain_gen.load(Ordering::Acquire);
        slot.ack.store(seen_gen, Ordering::Release);
        Ok(Self {
            alloc,
            cpu,
            base: alloc.base,
            end: alloc.end,
            strict: alloc.strict,
            seen_gen,
            exchanges: 0,
            classes: ManuallyDrop::new([c0, c1, c2, c3, c4, c5, c6, c7, c8, c9]),
        })
    }

    /// The CPU index this handle was claimed for.
    pub fn cpu(&self) -> usize {
        self.cpu
    }

    /// The allocator this handle belongs to.
    pub fn allocator(&self) -> &'a IovaAllocator {
        self.alloc
    }

    /// Allocates `2^order` pages, size-aligned, ending at or below `limit` (exclusive pfn; pass
    /// `u64::MAX` for "anywhere in the window", or [`crate::limit_for_dma_mask`]).
    ///
    /// Orders up to [`crate::MAX_CACHED_ORDER`] are served from this CPU's magazines when
    /// possible (no lock, no atomic); larger ones go to the backing allocator.
    #[inline(always)]
    pub fn alloc(&mut self, order: u8, limit: u64) -> Result<Iova, Error> {
        // The hit: the loaded magazine's top fits under the limit (no registry to update).
        if !self.strict
            && let Some(c) = self.classes.get_mut(order as usize)
            && let Some(pfn) = c.loaded.pop_top_below(limit.min(self.end), order)
        {
            return Ok(Iova { pfn, order });
        }
        self.alloc_cached(order, limit)
    }

    /// [`Self::alloc`] past the loaded magazine's top: a deeper entry under the limit, the
    /// previous magazine, the depot, the backing allocator; strict checking.
    #[inline(never)]
    fn alloc_cached(&mut self, order: u8, limit: u64) -> Result<Iova, Error> {
        let limit = if limit < self.end { limit } else { self.end };
        if let Some(c) = self.classes.get_mut(order as usize) {
            if let Some(max_start) = limit.checked_sub(1 << order) {
                if let Some(pfn) = c.loaded.pop_at_most(max_start) {
                    return self.hit(pfn, order);
                }
                if !c.prev.is_empty() {
                    swap(&mut c.loaded, &mut c.prev);
                    if let Some(pfn) = c.loaded.pop_at_most(max_start) {
                        return self.hit(pfn, order);
                    }
                }
            }
            return self.alloc_slow(order, limit);
        }
        self.alloc_backing(order, limit)
    }

    #[inline(always)]
    fn hit(&mut self, pfn: u64, order: u8) -> Result<Iova, Error> {
        if self.strict {
            return self.hit_strict(pfn, order);
        }
        Ok(Iova { pfn, order })
    }

    #[cold]
    fn hit_strict(&mut self, pfn: u64, order: u8) -> Result<Iova, Error> {
        match self
            .alloc
            .backing
            .with(|b| b.mark(pfn, order, State::Cached, State::Live))
        {
            Ok(()) => Ok(Iova { pfn, order }),
            Err(e) => {
                self.alloc.late_misuse.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Miss in both magazines: swap in a full magazine from the depot, or use the backing
    /// allocator.
    #[cold]
    #[inline(never)]
    fn alloc_slow(&mut self, order: u8, limit: u64) -> Result<Iova, Error> {
        let size = 1u64 << order;
        if limit < self.base.saturating_add(size) {
            return Err(Error::NoSpace);
        }
        let max_start = limit - size;
        self.poll();
        let depot = &self.alloc.depot;
        if let Some(c) = self.classes.get_mut(order as usize)
            && c.loaded.is_empty()
            && let Some(full) = depot.pop_full(order as usize)
        {
            let empty = replace(&mut c.loaded, full);
            depot.push_empty(empty);
            let got = c.loaded.pop_at_most(max_start);
            self.exchanged();
            if let Some(pfn) = got {
                return self.hit(pfn, order);
            }
        }
        self.alloc_backing(order, limit)
    }

    /// Allocation from the backing allocator, with the exhaustion procedure.
    #[cold]
    #[inline(never)]
    fn alloc_backing(&mut self, order: u8, limit: u64) -> Result<Iova, Error> {
        if order >= 64 {
            return Err(Error::InvalidOrder);
        }
        let alloc = self.alloc;
        let attempt = || {
            alloc
                .backing
                .with(|b| b.alloc(order, limit))
                .map(|pfn| Iova { pfn, order })
        };
        if let Ok(iova) = attempt() {
            return Ok(iova);
        }
        if limit < self.base.saturating_add(1 << order) {
            return Err(Error::NoSpace);
        }
        // 1. The depot, every size class.
        alloc.drain_depot();
        if let Ok(iova) = attempt() {
            return Ok(iova);
        }
        // 2. This CPU's own magazines.
        self.flush();
        if let Ok(iova) = attempt() {
            return Ok(iova);
        }
        // 3. The other CPUs, through the drain generation (no remote lock, no remote access).
        alloc.request_drain(Some(self.cpu), || self.poll());
        alloc.drain_depot();
        attempt()
    }

    /// Frees an IOVA. It may be handed out again at once, so it must only be freed after the
    /// IOTLB invalidation covering its unmapping has completed (see the crate documentation).
    ///
    /// Errors ([`Error::DoubleFree`], [`Error::NotAllocated`], [`Error::WrongSize`], ...) leave
    /// the allocator unchanged.
    #[inline]
    pub fn free(&mut self, iova: Iova) -> Result<(), Error> {
        check_range(self.base, self.end, iova)?;
        if self.alloc.in_reserved(iova) {
            return Err(Error::Reserved);
        }
        let Iova { pfn, order } = iova;
        if self.strict || order as usize >= NUM_CLASSES {
            return self.free_checked(pfn, order);
        }
        let Some(c) = self.classes.get_mut(order as usize) else {
            return Err(Error::InvalidOrder);
        };
        if c.loaded.top() == Some(pfn) {
            return Err(Error::DoubleFree);
        }
        if c.loaded.push(pfn) {
            return Ok(());
        }
        self.free_full(pfn, order)
    }

    /// Free with full checking: orders above the cached ones go to the backing allocator; with
    /// strict checking the range is marked cached in the registry first.
    #[cold]
    #[inline(never)]
    fn free_checked(&mut self, pfn: u64, order: u8) -> Result<(), Error> {
        if order as usize >= NUM_CLASSES {
            return self.alloc.backing.with(|b| b.free(pfn, order, State::Live));
        }
        self.alloc
            .backing
            .with(|b| b.mark(pfn, order, State::Live, State::Cached))?;
        let c = self
            .classes
            .get_mut(order as usize)
            .ok_or(Error::Inconsistent)?;
        if c.loaded.push(pfn) {
            return Ok(());
        }
        self.free_full(pfn, order)
    }

    /// The loaded magazine is full: swap in the previous one if it has room.
    #[inline]
    fn free_full(&mut self, pfn: u64, order: u8) -> Result<(), Error> {
        let c = self
            .classes
            .get_mut(order as usize)
            .ok_or(Error::Inconsistent)?;
        if !c.prev.is_full() {
            swap(&mut c.loaded, &mut c.prev);
            if c.loaded.push(pfn) {
                return Ok(());
            }
        }
        self.free_slow(pfn, order)
    }

    /// Both magazines full: trade the loaded one for an empty one from the depot, or empty it
    /// into the backing allocator if the depot has none.
    #[cold]
    #[inline(never)]
    fn free_slow(&mut self, pfn: u64, order: u8) -> Result<(), Error> {
        self.poll();
        let alloc = self.alloc;
        let c = self
            .classes
            .get_mut(order as usize)
            .ok_or(Error::Inconsistent)?;
        if c.loaded.push(pfn) {
            return Ok(());
        }
        let exchanged = match alloc.depot.pop_empty() {
            Some(empty) => {
                let full = replace(&mut c.loaded, empty);
                alloc.depot.push_full(order as usize, full);
                true
            }
            // The pool is exhausted (the depot holds all spare magazines): give this
            // magazine's IOVAs back to the backing allocator instead.
            None => {
                alloc.flush_magazine(order, &mut c.loaded);
                false
            }
        };
        let pushed = c.loaded.push(pfn);
        if exchanged {
            self.exchanged();
        }
        if pushed {
            Ok(())
        } else {
            Err(Error::Inconsistent)
        }
    }

    /// Counts a depot exchange and trims the depot every [`crate::TRIM_EVERY`] of them.
    #[inline]
    fn exchanged(&mut self) {
        self.exchanges = self.exchanges.wrapping_add(1);
        if self.exchanges.is_multiple_of(crate::TRIM_EVERY) {
            self.alloc.trim();
        }
    }

    /// Services a drain request from an exhausted CPU, if one is pending: empties this CPU's
    /// magazines into the backing allocator and acknowledges. Cheap (one load) otherwise; the
    /// hypervisor calls it on hypercall entry and when idle.
    #[inline]
    pub fn poll(&mut self) {
        let generation = self.alloc.drain_gen.load(Ordering::Acquire);
        if generation != self.seen_gen {
            self.flush();
            self.seen_gen = generation;
            if let Some(slot) = self.alloc.cpus.get(self.cpu) {
                slot.ack.store(generation, Ordering::Release);
            }
        }
    }

    /// Empties this CPU's magazines into the backing allocator.
    pub fn flush(&mut self) {
        let alloc = self.alloc;
        for (order, c) in self.classes.iter_mut().enumerate() {
            alloc.flush_magazine(order as u8, &mut c.loaded);
            alloc.flush_magazine(order as u8, &mut c.prev);
        }
    }

    /// IOVAs currently cached in this CPU's magazines.
    pub fn cached(&mut self) -> usize {
        self.classes
            .iter_mut()
            .map(|c| c.loaded.len() + c.prev.len())
            .sum()
    }
}

impl Drop for PerCpu<'_> {
    fn drop(&mut self) {
        self.flush();
        // SAFETY: `classes` is taken exactly once, here, and `self` is not used afterwards.
        let classes = unsafe { ManuallyDrop::take(&mut self.classes) };
        for c in classes {
            self.alloc.depot.push_empty(c.loaded);
            self.alloc.depot.push_empty(c.prev);
        }
        if let Some(slot) = self.alloc.cpus.get(self.cpu) {
            slot.claimed.store(false, Ordering::Release);
        }
    }
}
