//! [`DmaState`]: one guest's DMA mappings and the rules that govern them.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::backend::{Access, Clock, GuestRam, Iommu, IovaSource};
use crate::Error;

/// The page size of every mapping.
pub const PAGE_SIZE: u64 = 4096;

/// How a guest's DMA is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Guest RAM direct-mapped at boot (IOVA = guest-physical address): isolation between
    /// guests only. MAP/UNMAP only check their arguments.
    Passthrough,
    /// Every unmap is invalidated, and waited for, before it returns.
    Strict,
    /// Strict at batch granularity: the unmaps of one batch share one invalidation and one
    /// wait, done before the batch call returns.
    Batched,
    /// Unmaps are queued; the queue is flushed when it holds `deferred_entries` unmaps or its
    /// oldest entry is `deferred_ns` old (checked on every call and by [`DmaState::tick`]).
    Deferred,
}

/// Per-guest quotas and the deferred bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most live mappings.
    pub max_mappings: usize,
    /// Most pages in live mappings.
    pub max_mapped_pages: u64,
    /// Most page-table pages of the guest's domain.
    pub max_table_pages: usize,
    /// Most pages in one mapping.
    pub max_pages_per_map: u64,
    /// Deferred: flush when this many unmaps wait.
    pub deferred_entries: usize,
    /// Deferred: flush when the oldest waiting unmap is this old (ns).
    pub deferred_ns: u64,
}

impl Limits {
    /// Defaults: 65536 mappings, 1 GiB mapped, 1024 table pages, 2 MiB per mapping, deferred
    /// flush after 256 unmaps or 10 ms.
    pub const DEFAULT: Limits = Limits {
        max_mappings: 65536,
        max_mapped_pages: 1 << 18,
        max_table_pages: 1024,
        max_pages_per_map: 512,
        deferred_entries: 256,
        deferred_ns: 10_000_000,
    };
}

/// A live mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// First IOVA.
    pub iova: u64,
    /// Pages.
    pub pages: u64,
    /// First guest-physical address.
    pub gpa: u64,
    /// Device rights.
    pub access: Access,
}

impl Mapping {
    fn gpa_end(&self) -> u64 {
        self.gpa + self.pages * PAGE_SIZE
    }
}

/// Phases whose cycles are accounted here (exit/entry and copy+validate are measured by the
/// hypercall layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Taking an IOVA from the allocator.
    IovaAlloc = 0,
    /// Writing (or clearing) page-table entries.
    PteWrite = 1,
    /// Invalidating and waiting for completion.
    InvalidateWait = 2,
    /// Returning IOVAs after an invalidation.
    IovaFree = 3,
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Successful maps.
    pub maps: u64,
    /// Successful unmaps.
    pub unmaps: u64,
    /// Flushes (each one invalidation round followed by one wait).
    pub flushes: u64,
    /// Invalidation requests issued by those flushes.
    pub invalidations: u64,
    /// Flushes triggered by the deferred bounds.
    pub deferred_flushes: u64,
    /// Failed calls.
    pub errors: u64,
    /// Cycles per [`Phase`].
    pub cycles: [u64; 4],
}

/// What is held right now (for leak checks: everything returns to zero after teardown).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Live mappings.
    pub mappings: usize,
    /// Unmaps waiting for their invalidation.
    pub pending: usize,
    /// Guest pages pinned for DMA (live and pending mappings).
    pub pinned_pages: u64,
    /// IOVA pages held (live and pending).
    pub iova_pages: u64,
    /// Page-table pages of the domain.
    pub table_pages: usize,
}

/// One guest's DMA state.
pub struct DmaState<P> {
    policy: Policy,
    limits: Limits,
    live: BTreeMap<u64, Mapping>,
    by_gpa: BTreeMap<u64, u64>,
    mapped_pages: u64,
    pending: P,
    waiting: Vec<(Mapping, u64)>,
    in_batch: bool,
    stats: Stats,
}

impl<P: Default> DmaState<P> {
    /// An empty state.
    pub fn new(policy: Policy, limits: Limits) -> Self {
        Self {
            policy,
            limits,
            live: BTreeMap::new(),
            by_gpa: BTreeMap::new(),
            mapped_pages: 0,
            pending: P::default(),
            waiting: Vec::new(),
            in_batch: false,
            stats: Stats::default(),
        }
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// The limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Whether any page of guest-physical `[gpa, end)` is in a live mapping.
    pub fn gpa_mapped(&self, gpa: u64, end: u64) -> bool {
        match self.by_gpa.range(..end).next_back() {
            Some((_, iova)) => self.live[iova].gpa_end() > gpa,
            None => false,
        }
    }

    /// The live mapping starting at `iova`.
    pub fn mapping(&self, iova: u64) -> Option<Mapping> {
        self.live.get(&iova).copied()
    }

    /// What is held now.
    pub fn counts<D: Iommu<Pending = P>>(&self, dom: &D) -> Counts {
        let pend: u64 = self.waiting.iter().map(|(m, _)| m.pages).sum();
        Counts {
            mappings: self.live.len(),
            pending: self.waiting.len(),
            pinned_pages: self.mapped_pages + pend,
            iova_pages: self.mapped_pages + pend,
            table_pages: dom.table_pages(),
        }
    }

    fn account(&mut self, phase: Phase, t0: u64, clock: &impl Clock) {
        self.stats.cycles[phase as usize] += clock.cycles().wrapping_sub(t0);
    }

    fn fail<T>(&mut self, e: Error) -> Result<T, Error> {
        self.stats.errors += 1;
        Err(e)
    }

    fn check_range(&self, gpa: u64, len: u64, ram: &impl GuestRam) -> Result<u64, Error> {
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) || !gpa.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Inval);
        }
        let end = gpa.checked_add(len).ok_or(Error::Range)?;
        if end > ram.size() {
            return Err(Error::Fault);
        }
        if ram.forbidden(gpa..end) {
            return Err(Error::Perm);
        }
        Ok(len / PAGE_SIZE)
    }

    /// MAP: makes guest `[gpa, gpa + len)` reachable by the guest's devices with `access`;
    /// returns the IOVA.
    #[allow(clippy::too_many_arguments)]
    pub fn map<D, I, R, C>(
        &mut self,
        dom: &mut D,
        iovas: &mut I,
        ram: &R,
        clock: &C,
        gpa: u64,
        len: u64,
        access: Access,
    ) -> Result<u64, Error>
    where
        D: Iommu<Pending = P>,
        I: IovaSource,
        R: GuestRam,
        C: Clock,
    {
        self.expire_deferred(dom, iovas, clock);
        if !access.read && !access.write {
            return self.fail(Error::Inval);
        }
        let pages = match self.check_range(gpa, len, ram) {
            Ok(p) => p,
            Err(e) => return self.fail(e),
        };
        if pages > self.limits.max_pages_per_map {
            return self.fail(Error::Range);
        }
        if self.policy == Policy::Passthrough {
            self.stats.maps += 1;
            return Ok(gpa);
        }
        if self.live.len() >= self.limits.max_mappings
            || self.mapped_pages + pages > self.limits.max_mapped_pages
            // Worst case for new table pages: one per level below the root plus one leaf
            // table per 512 pages.
            || dom.table_pages() + 3 + pages.div_ceil(512) as usize > self.limits.max_table_pages
        {
            return self.fail(Error::Nomem);
        }
        if let Some((&s, &iova)) = self.by_gpa.range(..gpa + len).next_back() {
            let m = self.live[&iova];
            if s < gpa + len && m.gpa_end() > gpa {
                return self.fail(Error::Exist);
            }
        }
        let t0 = clock.cycles();
        let mut iova = iovas.alloc(pages);
        self.account(Phase::IovaAlloc, t0, clock);
        if iova.is_none() && !self.waiting.is_empty() {
            // IOVAs wait for an invalidation: flush now and try once more.
            if self.flush(dom, iovas, clock).is_ok() {
                let t0 = clock.cycles();
                iova = iovas.alloc(pages);
                self.account(Phase::IovaAlloc, t0, clock);
            }
        }
        let Some(iova) = iova else {
            return self.fail(Error::Nomem);
        };
        let t0 = clock.cycles();
        let r = dom.map(iova, ram.host_base() + gpa, len, access);
        self.account(Phase::PteWrite, t0, clock);
        if let Err(e) = r {
            iovas.free(iova, pages);
            return self.fail(e);
        }
        let m = Mapping {
            iova,
            pages,
            gpa,
            access,
        };
        self.live.insert(iova, m);
        self.by_gpa.insert(gpa, iova);
        self.mapped_pages += pages;
        self.stats.maps += 1;
        Ok(iova)
    }

    /// UNMAP: removes the mapping that starts at `iova` and is `len` bytes long. When it
    /// returns, the device can no longer use it under `Strict` (and `Batched` outside a
    /// batch); see the policy table for the others.
    ///
    /// `Busy` means the entries are cleared but the invalidation did not complete: the IOVA
    /// and pages stay held, and the next flush (any call, or SYNC) retries.
    pub fn unmap<D, I, R, C>(
        &mut self,
        dom: &mut D,
        iovas: &mut I,
        ram: &R,
        clock: &C,
        iova: u64,
        len: u64,
    ) -> Result<(), Error>
    where
        D: Iommu<Pending = P>,
        I: IovaSource,
        R: GuestRam,
        C: Clock,
    {
        self.expire_deferred(dom, iovas, clock);
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) || !iova.is_multiple_of(PAGE_SIZE) {
            return self.fail(Error::Inval);
        }
        if self.policy == Policy::Passthrough {
            if let Err(e) = self.check_range(iova, len, ram) {
                return self.fail(e);
            }
            self.stats.unmaps += 1;
            return Ok(());
        }
        let Some(m) = self.live.get(&iova).copied() else {
            return self.fail(Error::Noent);
        };
        if m.pages * PAGE_SIZE != len {
            return self.fail(Error::Inval);
        }
        let t0 = clock.cycles();
        let r = dom.unmap(iova, len, &mut self.pending);
        self.account(Phase::PteWrite, t0, clock);
        if let Err(e) = r {
            return self.fail(e);
        }
        self.live.remove(&iova);
        self.by_gpa.remove(&m.gpa);
        self.mapped_pages -= m.pages;
        self.waiting.push((m, clock.now_ns()));
        self.stats.unmaps += 1;
        let flush_now = match self.policy {
            Policy::Strict => true,
            Policy::Batched => !self.in_batch,
            Policy::Deferred => self.waiting.len() >= self.limits.deferred_entries,
            Policy::Passthrough => false,
        };
        if flush_now {
            if self.policy == Policy::Deferred {
                self.stats.deferred_flushes += 1;
            }
            return self.flush(dom, iovas, clock).map_err(|_| Error::Busy);
        }
        Ok(())
    }

    /// Starts a batch (a MULTICALL): under `Batched`, unmaps wait for [`Self::end_batch`].
    pub fn begin_batch(&mut self) {
        self.in_batch = true;
    }

    /// Ends a batch: under `Batched`, one flush for all of its unmaps.
    pub fn end_batch<D, I, C>(&mut self, dom: &mut D, iovas: &mut I, clock: &C) -> Result<(), Error>
    where
        D: Iommu<Pending = P>,
        I: IovaSource,
        C: Clock,
    {
        self.in_batch = false;
        if self.policy == Policy::Batched {
            self.flush(dom, iovas, clock).map_err(|_| Error::Busy)?;
        }
        Ok(())
    }

    /// SYNC: flushes everything waiting, whatever the policy.
    pub fn sync<D, I, C>(&mut self, dom: &mut D, iovas: &mut I, clock: &C) -> Result<(), Error>
    where
        D: Iommu<Pending = P>,
        I: IovaSource,
        C: Clock,
    {
        self.flush(dom, iovas, clock).map_err(|_| Error::Busy)
    }

    /// The deferred time bound: flushes when the oldest waiting unmap is too old. Called on
    /// every call and by the kernel on the guest's exits.
    pub fn tick<D, I, C>(&mut self, dom: &mut D, iovas: &mut I, clock: &C)
    where
        D: Iommu<Pending = P>,
        I: IovaSource,
        C: Clock,
    {
        self.expire_deferred(dom, iovas, clock);
    }

    fn expire_deferred<D, I, C>(&mut self, dom: &mut D, iovas: &mut I, clock: &C)
    where
        D: Iommu<Pending = P>,
        I: IovaSource,
        C: Clock,
    {
        if self.policy != Policy::Deferred || self.in_batch {
            return;
        }
        let Some(&(_, oldest)) = self.waiting.first() else {
            return;
        };
        if clock.now_ns().saturating_sub(oldest) >= self.limits.deferred_ns {
            self.stats.deferred_flushes += 1;
            let _ = self.flush(dom, iovas, clock);
        }
    }

    fn flush<D, I, C>(&mut self, dom: &mut D, iovas: &mut I, clock: &C) -> Result<(), Error>
    where
        D: Iommu<Pending = P>,
        I: IovaSource,
        C: Clock,
    {
        if self.waiting.is_empty() {
            return Ok(());
        }
        let t0 = clock.cycles();
        let r = dom.flush(&mut self.pending);
        self.account(Phase::InvalidateWait, t0, clock);
        let n = r?;
        self.stats.flushes += 1;
        self.stats.invalidations += n as u64;
        let t0 = clock.cycles();
        for (m, _) in core::mem::take(&mut self.waiting) {
            iovas.free(m.iova, m.pages);
        }
        self.account(Phase::IovaFree, t0, clock);
        Ok(())
    }

    /// Removes every mapping and flushes (guest shutdown). After `Ok`, [`Self::counts`] is
    /// zero apart from the domain's table pages.
    pub fn teardown<D, I, C>(&mut self, dom: &mut D, iovas: &mut I, clock: &C) -> Result<(), Error>
    where
        D: Iommu<Pending = P>,
        I: IovaSource,
        C: Clock,
    {
        self.in_batch = false;
        let all: Vec<Mapping> = self.live.values().copied().collect();
        for m in all {
            dom.unmap(m.iova, m.pages * PAGE_SIZE, &mut self.pending)?;
            self.live.remove(&m.iova);
            self.by_gpa.remove(&m.gpa);
            self.mapped_pages -= m.pages;
            self.waiting.push((m, clock.now_ns()));
        }
        self.flush(dom, iovas, clock).map_err(|_| Error::Busy)
    }
}
