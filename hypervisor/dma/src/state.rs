//! [`DmaState`]: one guest's DMA mappings and the rules that govern them.

use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::backend::{Access, Clock, GuestRam, Iommu, IovaSource};
use crate::live::LiveMap;
use crate::shared::Shared;
use crate::Error;

/// The page size of every mapping: the ABI's granule.
pub use moat_abi::dma::PAGE_SIZE;

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
    /// Deferred: the time bound (ns). The oldest waiting unmap's invalidation must have
    /// completed this long after the unmap (see [`DmaState::deferred_deadline`]).
    pub deferred_ns: u64,
    /// Deferred: how early the time bound is acted on (ns). A check (any call, or
    /// [`DmaState::tick`]) flushes once the oldest waiting unmap is `deferred_ns - slack_ns`
    /// old, so the bound holds as long as the caller checks at least once every
    /// `slack_ns - F`, where `F` is the longest flush (invalidation + wait). At least 0 and at
    /// most `deferred_ns`.
    pub slack_ns: u64,
}

impl Limits {
    /// Defaults: 65536 mappings, 1 GiB mapped, 1024 table pages, 2 MiB per mapping, deferred
    /// flush after 256 unmaps or 10 ms, acted on 3 ms early (the kernel's 1 ms timer plus
    /// exit latency and the flush itself fit in the slack).
    pub const DEFAULT: Limits = Limits {
        max_mappings: 65536,
        max_mapped_pages: 1 << 18,
        max_table_pages: 1024,
        max_pages_per_map: 512,
        deferred_entries: 256,
        deferred_ns: 10_000_000,
        slack_ns: 3_000_000,
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

/// Counters: they only grow, until [`DmaState::reset_stats`] zeroes them all. What is held
/// right now (the gauges) is in [`Counts`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Maps that returned `Ok`.
    pub maps: u64,
    /// Unmaps that returned `Ok` (including [`Unmapped::Unsynced`] ones: they took effect).
    pub unmaps: u64,
    /// Failed maps and unmaps: those refused here, plus those the caller refused before they
    /// reached the service (decoding, entry validation) and reported with
    /// [`DmaState::note_error`].
    pub errors: u64,
    /// Flushes that completed: the IOMMU confirmed everything pending, and what waited for
    /// it was released. Includes flushes that had nothing to invalidate (e.g. only a
    /// write-buffer flush for a new mapping).
    pub flushes: u64,
    /// Completion waits: completed flushes that issued at least one invalidation request and
    /// waited for its completion (with queued invalidation, one wait descriptor each).
    pub waits: u64,
    /// Flush attempts the IOMMU did not confirm in time (everything stayed held).
    pub flush_failures: u64,
    /// Invalidation requests issued by completed flushes.
    pub invalidations: u64,
    /// Completed flushes that the deferred bounds (entries or time) triggered.
    pub deferred_flushes: u64,
    /// The oldest unmap's age (ns) when a time-bound deferred flush completed, at most:
    /// how close the time bound came to being missed.
    pub deferred_max_age_ns: u64,
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
    /// Failed maps whose rolled-back entries wait for an invalidation: not mappings (the
    /// guest never got their IOVA), but their IOVA is held until the invalidation completes.
    pub rolled_back: usize,
    /// Guest pages a device may still reach (live mappings, pending unmaps, rolled-back maps).
    pub pinned_pages: u64,
    /// IOVA pages held (live, pending and rolled back).
    pub iova_pages: u64,
    /// Page-table pages of the domain.
    pub table_pages: usize,
}

/// What a successful UNMAP achieved.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmapped {
    /// It took effect, and so did the invalidation the policy requires before the call
    /// returns (`Strict`, `Batched` outside a batch), if any.
    Done,
    /// It took effect (the entries are cleared, the mapping is gone: a second unmap is
    /// `Noent`), but the invalidation the policy requires before the call returns was not
    /// confirmed by the IOMMU. The IOVA and the pages stay held; the next flush (any later
    /// call, [`DmaState::sync`], [`DmaState::end_batch`]) retries. The ABI reports this as
    /// BUSY for a single UNMAP and as the `unsynced` bit of a MULTICALL (the entry is OK).
    /// Only `Strict` and `Batched` outside a batch return it.
    Unsynced,
}

/// A range whose IOVA is held until the pending invalidation completes.
#[derive(Debug, Clone, Copy)]
struct Waiting {
    m: Mapping,
    /// When it started waiting ([`Clock::now_ns`]).
    since: u64,
    /// An unmap (else the rollback of a failed map).
    unmap: bool,
}

/// One guest's DMA state, or one vCPU's shard of it.
///
/// A guest with several vCPUs gives each vCPU its own shard ([`DmaState::with_shared`]): the
/// mappings that vCPU made, its pending set and its flush queue (its unmaps and its
/// deferred queue, as Linux's per-CPU flush queues), its counters; the shards share only
/// [`Shared`] (the quotas and the guest pages in live mappings, kept with atomics), so vCPUs
/// do not serialize. A mapping moves between shards with [`DmaState::take_mapping`] and
/// [`DmaState::adopt`] (an UNMAP on another vCPU than the MAP).
pub struct DmaState<P> {
    policy: Policy,
    limits: Limits,
    live: LiveMap,
    shared: Arc<Shared>,
    /// Pages of this shard's live mappings.
    mapped_pages: u64,
    pending: P,
    /// In the order they started waiting (so the first is the oldest).
    waiting: Vec<Waiting>,
    /// A map that needed a flush is live without it (the flush failed and so did its undo):
    /// the next flush must run even with nothing waiting.
    map_unflushed: bool,
    in_batch: bool,
    /// Quota this shard holds in [`Shared`] beyond its live mappings: (mappings, pages). Only
    /// inside a batch (see [`Self::reserve`]); returned at its end.
    credit: (usize, u64),
    stats: Stats,
}

/// Maps one quota reservation covers inside a batch (the first map of a batch, or one that
/// finds the credit spent, reserves for itself and the next `BATCH_CREDIT - 1` maps of its
/// size).
const BATCH_CREDIT: usize = 32;

impl<P: Default> DmaState<P> {
    /// Guest RAM a state made by [`Self::new`] can map: 4 GiB.
    pub const DEFAULT_RAM: u64 = 1 << 32;

    /// An empty state for a whole guest (one shard) of at most [`Self::DEFAULT_RAM`] of RAM.
    pub fn new(policy: Policy, limits: Limits) -> Self {
        Self::with_shared(
            policy,
            limits,
            Arc::new(Shared::new(Self::DEFAULT_RAM)),
            P::default(),
        )
    }

    /// An empty shard of a guest whose shards share `shared`, with its own (empty) pending
    /// set `pending` (e.g. one that knows the shard's invalidation status word).
    pub fn with_shared(policy: Policy, limits: Limits, shared: Arc<Shared>, pending: P) -> Self {
        Self {
            policy,
            limits,
            live: LiveMap::default(),
            shared,
            mapped_pages: 0,
            pending,
            waiting: Vec::new(),
            map_unflushed: false,
            in_batch: false,
            credit: (0, 0),
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

    /// Zeroes every counter of [`Stats`] (STATS with RESET: the counters, not the gauges of
    /// [`Counts`]).
    pub fn reset_stats(&mut self) {
        self.stats = Stats::default();
    }

    /// Counts a MAP or UNMAP the caller refused before it reached the service (decoding or
    /// entry validation), so that [`Stats::errors`] counts every failed MAP and UNMAP.
    pub fn note_error(&mut self) {
        self.stats.errors += 1;
    }

    /// The back end's pending set, for its own bookkeeping (e.g. what it releases once the
    /// guest is gone); what waits in it is the service's business.
    pub fn pending_mut(&mut self) -> &mut P {
        &mut self.pending
    }

    /// What the guest's shards share.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Whether any page of guest-physical `[gpa, end)` is in a live mapping (of any shard).
    pub fn gpa_mapped(&self, gpa: u64, end: u64) -> bool {
        self.shared.gpa_mapped(gpa, end)
    }

    /// Takes the live mapping that starts at `iova` out of this shard, unchanged (still
    /// mapped, still counted in [`Shared`]), for [`Self::adopt`] by another shard: an UNMAP
    /// on another vCPU than the MAP. `None` when this shard has no mapping there.
    pub fn take_mapping(&mut self, iova: u64) -> Option<Mapping> {
        let m = self.live.remove(iova)?;
        self.mapped_pages -= m.pages;
        Some(m)
    }

    /// Takes over a mapping another shard of the same guest gave up with
    /// [`Self::take_mapping`].
    pub fn adopt(&mut self, m: Mapping) {
        self.mapped_pages += m.pages;
        self.live.insert(m);
    }

    /// Whether a device may still reach any page of guest-physical `[gpa, end)`: a live
    /// mapping (of any shard), an unmap of this shard whose invalidation has not completed
    /// (deferred, or unconfirmed), or a failed map's rolled-back entries waiting for theirs.
    /// Registrations of guest pages (batch area, fault ring) must refuse such pages (asking
    /// every shard, with every shard held).
    pub fn gpa_busy(&self, gpa: u64, end: u64) -> bool {
        self.gpa_mapped(gpa, end)
            || self
                .waiting
                .iter()
                .any(|w| w.m.gpa < end && w.m.gpa_end() > gpa)
    }

    /// The live mapping starting at `iova`.
    pub fn mapping(&self, iova: u64) -> Option<Mapping> {
        self.live.get(iova).copied()
    }

    /// The live mappings, by IOVA (sorted on each call: for tests and reports, not the hot
    /// path).
    pub fn mappings(&self) -> impl Iterator<Item = Mapping> + '_ {
        let mut all: Vec<Mapping> = self.live.values().copied().collect();
        all.sort_unstable_by_key(|m| m.iova);
        all.into_iter()
    }

    /// The ranges whose IOVA is held until the pending invalidation completes (pending unmaps
    /// and rolled-back maps), oldest first.
    pub fn waiting(&self) -> impl Iterator<Item = Mapping> + '_ {
        self.waiting.iter().map(|w| w.m)
    }

    /// Under `Deferred`, when ([`Clock::now_ns`]) the oldest waiting unmap's invalidation must
    /// have completed: its unmap time plus `deferred_ns`. Checks flush from `slack_ns` before
    /// it, so a caller that checks ([`Self::tick`] or any call) at least every
    /// `slack_ns - F` (`F` the longest flush) keeps the bound. `None` when nothing waits or
    /// the policy has no time bound.
    pub fn deferred_deadline(&self) -> Option<u64> {
        if self.policy != Policy::Deferred {
            return None;
        }
        self.waiting
            .first()
            .map(|w| w.since.saturating_add(self.limits.deferred_ns))
    }

    /// What is held now.
    pub fn counts<D: Iommu<Pending = P>>(&self, dom: &D) -> Counts {
        let held: u64 = self.waiting.iter().map(|w| w.m.pages).sum();
        let pending = self.waiting.iter().filter(|w| w.unmap).count();
        Counts {
            mappings: self.live.len(),
            pending,
            rolled_back: self.waiting.len() - pending,
            pinned_pages: self.mapped_pages + held,
            iova_pages: self.mapped_pages + held,
            table_pages: dom.table_pages(),
        }
    }

    fn account(&mut self, phase: Phase, t0: u64, clock: &impl Clock) {
        self.account_until(phase, t0, clock.cycles());
    }

    /// Accounts `[t0, t1)` to `phase`: with `t1` the start of the next phase, one clock read
    /// ends one phase and starts the next.
    fn account_until(&mut self, phase: Phase, t0: u64, t1: u64) {
        self.stats.cycles[phase as usize] += t1.wrapping_sub(t0);
    }

    fn fail<T>(&mut self, e: Error) -> Result<T, Error> {
        self.stats.errors += 1;
        Err(e)
    }

    /// Whether the policy requires the invalidation of an unmap before the call returns.
    fn owes_flush(&self) -> bool {
        match self.policy {
            Policy::Strict => true,
            Policy::Batched => !self.in_batch,
            Policy::Deferred | Policy::Passthrough => false,
        }
    }

    fn hold(&mut self, m: Mapping, unmap: bool, clock: &impl Clock) {
        // Only the deferred time bound reads `since` (the clock costs a division per read).
        let since = if self.policy == Policy::Deferred {
            clock.now_ns()
        } else {
            0
        };
        self.waiting.push(Waiting { m, since, unmap });
    }

    /// Takes one mapping of `pages` pages from the guest-wide quotas: from this shard's
    /// credit when it covers it; else, inside a batch, a reservation for this map and the next
    /// `BATCH_CREDIT - 1` like it (one pair of shared atomics per batch, not per map); else,
    /// or when that does not fit, exactly this map, after giving the credit back (so this
    /// shard's own credit never makes it refuse a map that fits the quota). While a batch
    /// holds credit, another vCPU's map may find the quota full up to `BATCH_CREDIT` maps
    /// early; once every batch ended the counters are exact again.
    fn reserve(&mut self, pages: u64) -> bool {
        let (n, p) = self.credit;
        if n >= 1 && p >= pages {
            self.credit = (n - 1, p - pages);
            return true;
        }
        if self.in_batch {
            let more = BATCH_CREDIT - 1;
            let extra = pages.saturating_mul(more as u64);
            if self
                .shared
                .reserve(1 + more, pages.saturating_add(extra), &self.limits)
            {
                self.credit = (n + more, p + extra);
                return true;
            }
        }
        self.return_credit();
        self.shared.reserve(1, pages, &self.limits)
    }

    /// Gives back one mapping of `pages` pages: into the credit inside a batch (later maps of
    /// the batch use it), to [`Shared`] otherwise.
    fn unreserve(&mut self, pages: u64) {
        if self.in_batch {
            self.credit = (self.credit.0 + 1, self.credit.1 + pages);
        } else {
            self.shared.unreserve(1, pages);
        }
    }

    /// Returns the credit to [`Shared`] (end of a batch).
    fn return_credit(&mut self) {
        let (n, p) = core::mem::take(&mut self.credit);
        if n != 0 || p != 0 {
            self.shared.unreserve(n, p);
        }
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
    ///
    /// When the domain needs a flush for a new mapping ([`Iommu::map_needs_flush`]), it is
    /// done here; if it fails, the new entries are cleared again and the call fails with
    /// `Busy`. A failed map is not a mapping, but its IOVA stays held (as
    /// [`Counts::rolled_back`]) until the invalidation of whatever it wrote and cleared has
    /// completed.
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
        // Worst case for new table pages: one per level below the root plus one leaf table
        // per 512 pages. (Shards racing near the quota may each pass this check; the
        // kernel's quota covers every table the IOVA window can need.)
        if dom.table_pages() + 3 + pages.div_ceil(512) as usize > self.limits.max_table_pages
            || !self.reserve(pages)
        {
            return self.fail(Error::Nomem);
        }
        if !self.shared.claim(gpa, pages) {
            self.unreserve(pages);
            return self.fail(Error::Exist);
        }
        match self.map_claimed(dom, iovas, ram, clock, gpa, pages, access) {
            Ok(iova) => Ok(iova),
            Err(e) => {
                self.shared.unclaim(gpa, pages);
                self.unreserve(pages);
                self.fail(e)
            }
        }
    }

    /// The rest of MAP once the quota and the guest pages are held: `Err` is counted (and
    /// the holds given back) by the caller.
    #[allow(clippy::too_many_arguments)]
    fn map_claimed<D, I, R, C>(
        &mut self,
        dom: &mut D,
        iovas: &mut I,
        ram: &R,
        clock: &C,
        gpa: u64,
        pages: u64,
        access: Access,
    ) -> Result<u64, Error>
    where
        D: Iommu<Pending = P>,
        I: IovaSource,
        R: GuestRam,
        C: Clock,
    {
        let len = pages * PAGE_SIZE;
        let t0 = clock.cycles();
        let mut iova = iovas.alloc(pages);
        // The end of the allocation starts the page-table write (the common case).
        let mut t1 = clock.cycles();
        self.account_until(Phase::IovaAlloc, t0, t1);
        if iova.is_none() && !self.waiting.is_empty() {
            // IOVAs wait for an invalidation: flush now (accounted as such) and try once more.
            if self.flush(dom, iovas, clock, false).is_ok() {
                let t0 = clock.cycles();
                iova = iovas.alloc(pages);
                self.account(Phase::IovaAlloc, t0, clock);
            }
            t1 = clock.cycles();
        }
        let Some(iova) = iova else {
            return Err(Error::Nomem);
        };
        let m = Mapping {
            iova,
            pages,
            gpa,
            access,
        };
        let r = dom.map(iova, ram.host_base() + gpa, len, access, &mut self.pending);
        self.account(Phase::PteWrite, t1, clock);
        if let Err(e) = r {
            // The domain cleared what it wrote, but a device may hold it cached until the
            // invalidation the rollback left pending completes: the IOVA waits for it.
            self.hold(m, false, clock);
            if self.owes_flush() {
                let _ = self.flush(dom, iovas, clock, false);
            } else {
                self.deferred_entry_bound(dom, iovas, clock);
            }
            return Err(e);
        }
        if dom.map_needs_flush() && self.flush(dom, iovas, clock, true).is_err() {
            // The device may not be able to use the new entries: undo them, under the
            // pending invalidation, and hold the IOVA until it completes.
            let t0 = clock.cycles();
            let r = dom.unmap(iova, len, &mut self.pending);
            self.account(Phase::PteWrite, t0, clock);
            if r.is_ok() {
                self.hold(m, false, clock);
                return Err(Error::Busy);
            }
            // Cannot undo (the domain refused to clear what it just wrote): the map took
            // effect; it becomes usable with the next flush, which must run.
            self.map_unflushed = true;
        }
        self.live.insert(m);
        self.mapped_pages += pages;
        self.stats.maps += 1;
        Ok(iova)
    }

    /// UNMAP: removes the mapping that starts at `iova` and is `len` bytes long. When it
    /// returns [`Unmapped::Done`], the device can no longer use it under `Strict` (and
    /// `Batched` outside a batch); see the policy table for the others, and
    /// [`Unmapped::Unsynced`] for an invalidation the IOMMU did not confirm.
    ///
    /// An `Err` changed nothing.
    pub fn unmap<D, I, R, C>(
        &mut self,
        dom: &mut D,
        iovas: &mut I,
        ram: &R,
        clock: &C,
        iova: u64,
        len: u64,
    ) -> Result<Unmapped, Error>
    where
        D: Iommu<Pending = P>,
        I: IovaSource,
        R: GuestRam,
        C: Clock,
    {
        match self.unmap_own(dom, iovas, ram, clock, (iova, len)) {
            Ok(Some(u)) => Ok(u),
            Ok(None) => self.fail(Error::Noent),
            Err(e) => Err(e),
        }
    }

    /// As [`Self::unmap`] of `(iova, len)`, but a mapping this state does not hold (no mapping at `iova`:
    /// perhaps another shard's) is `Ok(None)`, neither changed nor counted as an error, so
    /// that a caller can fetch the record from elsewhere ([`Self::adopt`]) and try again
    /// with one lookup on the common path.
    pub fn unmap_own<D: Iommu<Pending = P>, I: IovaSource, R: GuestRam, C: Clock>(
        &mut self,
        dom: &mut D,
        iovas: &mut I,
        ram: &R,
        clock: &C,
        (iova, len): (u64, u64),
    ) -> Result<Option<Unmapped>, Error> {
        self.expire_deferred(dom, iovas, clock);
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) || !iova.is_multiple_of(PAGE_SIZE) {
            return self.fail(Error::Inval);
        }
        if self.policy == Policy::Passthrough {
            if let Err(e) = self.check_range(iova, len, ram) {
                return self.fail(e);
            }
            self.stats.unmaps += 1;
            return Ok(Some(Unmapped::Done));
        }
        // One probe: the slot stays valid (nothing touches the table before the removal).
        let Some((slot, m)) = self.live.lookup(iova) else {
            return Ok(None);
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
        self.live.remove_slot(slot);
        self.mapped_pages -= m.pages;
        self.shared.unclaim(m.gpa, m.pages);
        self.unreserve(m.pages);
        self.hold(m, true, clock);
        self.stats.unmaps += 1;
        if self.owes_flush() {
            if self.flush(dom, iovas, clock, false).is_err() {
                return Ok(Some(Unmapped::Unsynced));
            }
        } else {
            self.deferred_entry_bound(dom, iovas, clock);
        }
        Ok(Some(Unmapped::Done))
    }

    /// Under `Deferred`, flushes when `deferred_entries` ranges wait.
    #[inline]
    fn deferred_entry_bound<D, I, C>(&mut self, dom: &mut D, iovas: &mut I, clock: &C)
    where
        D: Iommu<Pending = P>,
        I: IovaSource,
        C: Clock,
    {
        if self.policy == Policy::Deferred
            && self.waiting.len() >= self.limits.deferred_entries
            && self.flush(dom, iovas, clock, false).is_ok()
        {
            self.stats.deferred_flushes += 1;
        }
    }

    /// Starts a batch (a MULTICALL): under `Batched`, unmaps wait for [`Self::end_batch`].
    pub fn begin_batch(&mut self) {
        self.in_batch = true;
    }

    /// Ends a batch. Under `Strict` and `Batched`, flushes whatever waits (under `Batched`
    /// the batch's unmaps; under `Strict` only what an earlier flush left unconfirmed); `Busy`
    /// when the IOMMU did not confirm it: every unmap of the batch took effect but is not
    /// synced (the MULTICALL's `unsynced` bit). Under `Deferred`, checks the time bound.
    pub fn end_batch<D, I, C>(&mut self, dom: &mut D, iovas: &mut I, clock: &C) -> Result<(), Error>
    where
        D: Iommu<Pending = P>,
        I: IovaSource,
        C: Clock,
    {
        self.in_batch = false;
        self.return_credit();
        match self.policy {
            Policy::Strict | Policy::Batched => self
                .flush(dom, iovas, clock, false)
                .map_err(|_| Error::Busy),
            Policy::Deferred => {
                self.expire_deferred(dom, iovas, clock);
                Ok(())
            }
            Policy::Passthrough => Ok(()),
        }
    }

    /// SYNC: flushes everything waiting, whatever the policy.
    pub fn sync<D, I, C>(&mut self, dom: &mut D, iovas: &mut I, clock: &C) -> Result<(), Error>
    where
        D: Iommu<Pending = P>,
        I: IovaSource,
        C: Clock,
    {
        self.flush(dom, iovas, clock, false)
            .map_err(|_| Error::Busy)
    }

    /// The deferred time bound: flushes when the oldest waiting unmap is
    /// `deferred_ns - slack_ns` old. Every call checks it too (inside a batch as well); the
    /// kernel calls this from its periodic timer so that the bound holds while the guest makes
    /// no call. See [`Self::deferred_deadline`] for the guarantee.
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
        // Inside a batch too: flushing early is always allowed under `Deferred`.
        if self.policy != Policy::Deferred {
            return;
        }
        let Some(oldest) = self.waiting.first().map(|w| w.since) else {
            return;
        };
        let age = clock.now_ns().saturating_sub(oldest);
        if age.saturating_add(self.limits.slack_ns) >= self.limits.deferred_ns
            && self.flush(dom, iovas, clock, false).is_ok()
        {
            self.stats.deferred_flushes += 1;
            let age = clock.now_ns().saturating_sub(oldest);
            self.stats.deferred_max_age_ns = self.stats.deferred_max_age_ns.max(age);
        }
    }

    /// Flushes the pending set and, once it completed, releases everything waiting. With
    /// `force`, flushes even when nothing waits (a new mapping that needs it).
    fn flush<D, I, C>(
        &mut self,
        dom: &mut D,
        iovas: &mut I,
        clock: &C,
        force: bool,
    ) -> Result<(), Error>
    where
        D: Iommu<Pending = P>,
        I: IovaSource,
        C: Clock,
    {
        if self.waiting.is_empty() && !force && !self.map_unflushed {
            return Ok(());
        }
        let t0 = clock.cycles();
        let r = dom.flush(&mut self.pending);
        let t1 = clock.cycles();
        self.account_until(Phase::InvalidateWait, t0, t1);
        let n = match r {
            Ok(n) => n,
            Err(e) => {
                self.stats.flush_failures += 1;
                return Err(e);
            }
        };
        self.map_unflushed = false;
        self.stats.flushes += 1;
        if n > 0 {
            self.stats.waits += 1;
        }
        self.stats.invalidations += n as u64;
        // Drained in place: the list keeps its capacity for the next batch.
        for w in self.waiting.drain(..) {
            iovas.free(w.m.iova, w.m.pages);
        }
        self.account(Phase::IovaFree, t1, clock);
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
        self.return_credit();
        let all: Vec<Mapping> = self.mappings().collect();
        for m in all {
            if let Err(e) = dom.unmap(m.iova, m.pages * PAGE_SIZE, &mut self.pending) {
                // What this teardown unmapped so far waits like any unmap: flush it now, so
                // a teardown that stops half-way leaves no bound overrun (if this flush fails
                // too, the next call retries it).
                let _ = self.flush(dom, iovas, clock, false);
                return Err(e);
            }
            self.live.remove(m.iova);
            self.mapped_pages -= m.pages;
            self.shared.unclaim(m.gpa, m.pages);
            self.shared.unreserve(1, m.pages);
            self.hold(m, true, clock);
        }
        // The guest makes no more calls: the tables kept for reuse go with this flush.
        dom.release_empty_tables(&mut self.pending);
        self.flush(dom, iovas, clock, false)
            .map_err(|_| Error::Busy)
    }
}
