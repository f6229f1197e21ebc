//! The kernel's back ends for `moat-dma`: a guest's VT-d domain, its IOVA allocator handle on
//! the calling CPU, its RAM partition, and the TSC.

use moat_dma::{Access, Clock, Error, GuestRam, Iommu, IovaSource};
use moat_iova::{order_for_pages, Iova, PerCpu};
use moat_vtd::{DmaMemory, Domain, Gather, PhysAddr, Submitted};

use crate::arch::{tsc, x86};
use crate::iommu::hw::KernelMemory;
use crate::iommu::{with_unit, KernelUnit};

/// One guest's VT-d domain on the unit at `unit`, shared by the guest's vCPUs: map and unmap
/// change the page tables with atomic entry writes (new tables linked by compare-and-swap),
/// each vCPU with its own pending set, without a lock; only a flush takes the unit's lock.
pub struct VtdDomain {
    /// Register base of the unit.
    pub unit: u64,
    /// The domain (page tables, id, attached devices).
    pub domain: Domain,
    /// With caching mode (not-present entries may be cached) or write-buffer flushing
    /// (`CAP.CM`, `CAP.RWBF`) a new mapping needs a flush before the device may use it;
    /// otherwise nothing has to be invalidated for a not-present -> present change.
    pub map_needs_flush: bool,
}

/// Unmaps waiting for the flush (the driver's gather, created on first use), and the
/// shard's own invalidation status word: its flushes queue a wait descriptor that writes
/// it, and poll it outside the unit's lock.
#[derive(Default)]
pub struct VtdPending {
    gather: Option<Gather>,
    /// The status word (none: the flush then waits under the unit's lock).
    status: Option<PhysAddr>,
    /// The last value asked of the status word.
    seq: u32,
    /// A wait on the status word timed out: the hardware may still write it later, so its
    /// frame is never freed.
    pub poisoned: bool,
}

impl VtdPending {
    /// Stops using the status word (teardown): whether the unit can still write it (a wait
    /// on it timed out), in which case its frame must never be freed.
    pub fn take_status(&mut self) -> (Option<PhysAddr>, bool) {
        (self.status.take(), self.poisoned)
    }

    /// An empty pending set whose flushes wait on the status word at `status` (4-byte
    /// aligned, in a VT-d frame the caller owns and keeps while the unit may write it).
    pub fn with_status(status: PhysAddr) -> Self {
        Self {
            status: Some(status),
            ..Self::default()
        }
    }
}

/// Polls between two looks at the queue's error state (under the unit's lock).
const QUEUE_CHECK_EVERY: u32 = 1024;

fn vtd_error(e: moat_vtd::Error) -> Error {
    use moat_vtd::Error as V;
    match e {
        V::AlreadyMapped { .. } => Error::Exist,
        V::NotMapped { .. } => Error::Noent,
        V::NoMemory => Error::Nomem,
        V::PartialSuperpage { .. } => Error::Inval,
        V::Misaligned | V::OutOfRange => Error::Range,
        V::Timeout(_) | V::InvalidationQueue { .. } => Error::Busy,
        _ => Error::Inval,
    }
}

fn access(a: Access) -> moat_vtd::Access {
    let mut v = moat_vtd::Access::empty();
    if a.read {
        v |= moat_vtd::Access::READ;
    }
    if a.write {
        v |= moat_vtd::Access::WRITE;
    }
    v
}

impl Iommu for &VtdDomain {
    type Pending = VtdPending;

    #[inline]
    fn map(
        &mut self,
        iova: u64,
        hpa: PhysAddr,
        len: u64,
        a: Access,
        pending: &mut VtdPending,
    ) -> Result<(), Error> {
        // The map records in the gather what a flush must do for it (caching mode:
        // invalidate the range; RWBF: flush the write buffer) and, when it fails, what its
        // rollback cleared; `moat-dma` flushes when `map_needs_flush` says so.
        // The caller's IOVA range is its own (allocated to it, not yet handed to anyone):
        // its leaves are written without a lock.
        let dom = &self.domain;
        let g = pending
            .gather
            .get_or_insert_with(|| dom.gather().without_range_list().with_walk_cache());
        dom.map(&KernelMemory, iova, hpa, len, access(a), g)
            .map_err(vtd_error)
    }

    fn map_needs_flush(&self) -> bool {
        self.map_needs_flush
    }

    #[inline]
    fn unmap(&mut self, iova: u64, len: u64, pending: &mut VtdPending) -> Result<(), Error> {
        // A live mapping of the caller's shard: nobody else writes its entries.
        let dom = &self.domain;
        let g = pending
            .gather
            .get_or_insert_with(|| dom.gather().without_range_list().with_walk_cache());
        dom.unmap(&KernelMemory, iova, len, g).map_err(vtd_error)
    }

    fn flush(&mut self, pending: &mut VtdPending) -> Result<u32, Error> {
        let Some(g) = pending.gather.as_mut() else {
            return Ok(0);
        };
        let Some(status) = pending.status else {
            return with_unit(self.unit, |u, m| u.flush(m, g))
                .ok_or(Error::Busy)?
                .map(|f| f.invalidations as u32)
                .map_err(vtd_error);
        };
        // The unit's lock only to write the descriptors and move the tail.
        pending.seq = pending.seq.wrapping_add(1).max(1);
        let seq = pending.seq;
        let submitted = with_unit(self.unit, |u, m| u.flush_submit(m, g, status, seq))
            .ok_or(Error::Busy)?
            .map_err(vtd_error)?;
        let q = match submitted {
            Submitted::Done(f) => return Ok(f.invalidations as u32),
            Submitted::Queued(q) => q,
        };
        // Our own status word, polled outside every lock; the queue's error state under
        // the unit's lock now and then.
        let mut m = KernelMemory;
        let t0 = tsc::cycles_to_ns(x86::rdtsc());
        let mut polls = 0u32;
        loop {
            if q.flush_status {
                m.flush_cache(q.status, 4);
            }
            if m.read_u32(q.status) == q.seq {
                break;
            }
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(QUEUE_CHECK_EVERY) {
                let r = with_unit(self.unit, |u, m| u.queue_check(m, &q)).ok_or(Error::Busy)?;
                if let Err(e) = r {
                    // Our wait descriptor was refused: nothing will write the word.
                    return Err(vtd_error(e));
                }
                if tsc::cycles_to_ns(x86::rdtsc()).saturating_sub(t0) > q.timeout_ns {
                    with_unit(self.unit, |u, _| u.queue_timed_out(&q));
                    pending.poisoned = true;
                    return Err(Error::Busy);
                }
            }
            core::hint::spin_loop();
        }
        Ok(KernelUnit::flush_release(&mut m, g, &q).invalidations as u32)
    }

    fn table_pages(&self) -> usize {
        self.domain.tables().table_pages()
    }

    fn release_empty_tables(&mut self, pending: &mut VtdPending) -> usize {
        // Teardown only: the guest has stopped and every shard is held by the caller.
        let dom = &self.domain;
        let g = pending
            .gather
            .get_or_insert_with(|| dom.gather().without_range_list().with_walk_cache());
        dom.release_empty_tables(&KernelMemory, g).unwrap_or(0)
    }
}

/// The guest's IOVA allocator seen from one vCPU (its per-CPU magazines).
pub struct IovaHandle<'a> {
    /// The magazines of this vCPU.
    pub cpu: &'a mut PerCpu<'static>,
    /// Exclusive end of the window the guest's devices can address, in pages.
    pub limit_pfn: u64,
    /// Every vCPU's shard (this one's is held by the caller): an exhausted allocation
    /// empties the magazines of the vCPUs that are not in a DMA call right now.
    pub all: &'a [spin::Mutex<super::Shard>],
}

impl IovaSource for IovaHandle<'_> {
    #[inline]
    fn alloc(&mut self, pages: u64) -> Option<u64> {
        let order = order_for_pages(pages)?;
        if let Ok(iova) = self.cpu.alloc(order, self.limit_pfn) {
            return iova.addr();
        }
        self.reclaim_and_alloc(order)
    }

    #[inline]
    fn free(&mut self, iova: u64, pages: u64) {
        let Some(order) = order_for_pages(pages) else {
            return;
        };
        if let Err(e) = self.cpu.free(Iova::new(iova >> 12, order)) {
            // The service only frees what it allocated: a failure here is a bug, reported
            // loudly but without taking the hypervisor down.
            log::error!("dma: IOVA {iova:#x} ({pages} pages) refused by the allocator: {e:?}");
        }
    }
}

impl IovaHandle<'_> {
    /// The allocation failed: empty the magazines of the other vCPUs and try once more.
    #[cold]
    #[inline(never)]
    fn reclaim_and_alloc(&mut self, order: u8) -> Option<u64> {
        // The allocator's own exhaustion path drained the depot, this vCPU's magazines and
        // asked the others to drain; a vCPU that makes no DMA call never answers that
        // request, so its magazines are emptied here (its handle is free between calls).
        let mut reclaimed = 0;
        for other in self.all {
            if let Some(mut c) = other.try_lock() {
                reclaimed += c.iova.cached();
                c.iova.flush();
            }
        }
        if reclaimed == 0 {
            return None;
        }
        self.cpu.alloc(order, self.limit_pfn).ok()?.addr()
    }
}

/// A guest's RAM partition: guest-physical `[0, size)` at host `base`.
pub struct Partition {
    /// Host-physical base.
    pub base: u64,
    /// Bytes.
    pub size: u64,
}

/// The MSI window (moat-abi's): never a DMA target.
const MSI_WINDOW: core::ops::Range<u64> =
    moat_abi::dma::MSI_WINDOW_START..moat_abi::dma::MSI_WINDOW_END;

impl GuestRam for Partition {
    fn size(&self) -> u64 {
        self.size
    }
    fn host_base(&self) -> PhysAddr {
        PhysAddr::new(self.base)
    }
    fn forbidden(&self, gpa: core::ops::Range<u64>) -> bool {
        gpa.start < MSI_WINDOW.end && gpa.end > MSI_WINDOW.start
    }
}

/// The TSC for phase accounting and the deferred time bound.
pub struct Tsc;

impl Clock for Tsc {
    fn cycles(&self) -> u64 {
        x86::rdtsc()
    }
    fn now_ns(&self) -> u64 {
        tsc::cycles_to_ns(x86::rdtsc())
    }
}
