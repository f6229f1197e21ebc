//! The kernel's back ends for `moat-dma`: a guest's VT-d domain, its IOVA allocator handle on
//! the calling CPU, its RAM partition, and the TSC.

use moat_dma::{Access, Clock, Error, GuestRam, Iommu, IovaSource};
use moat_iova::{order_for_pages, Iova, PerCpu};
use moat_vtd::{Domain, Gather};

use crate::arch::{tsc, x86};
use crate::iommu::hw::KernelMemory;
use crate::iommu::with_unit;

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

/// Unmaps waiting for the flush: the driver's gather, created on first use.
#[derive(Default)]
pub struct VtdPending(Option<Gather>);

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

    fn map(
        &mut self,
        iova: u64,
        hpa: u64,
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
        let g = pending.0.get_or_insert_with(|| dom.gather());
        dom.map(&KernelMemory, iova, hpa, len, access(a), g)
            .map_err(vtd_error)
    }

    fn map_needs_flush(&self) -> bool {
        self.map_needs_flush
    }

    fn unmap(&mut self, iova: u64, len: u64, pending: &mut VtdPending) -> Result<(), Error> {
        // A live mapping of the caller's shard: nobody else writes its entries.
        let dom = &self.domain;
        let g = pending.0.get_or_insert_with(|| dom.gather());
        dom.unmap(&KernelMemory, iova, len, g).map_err(vtd_error)
    }

    fn flush(&mut self, pending: &mut VtdPending) -> Result<u32, Error> {
        let Some(g) = pending.0.as_mut() else {
            return Ok(0);
        };
        with_unit(self.unit, |u, m| u.flush(m, g))
            .ok_or(Error::Busy)?
            .map(|f| f.invalidations as u32)
            .map_err(vtd_error)
    }

    fn table_pages(&self) -> usize {
        self.domain.tables().table_pages()
    }

    fn release_empty_tables(&mut self, pending: &mut VtdPending) -> usize {
        // Teardown only: the guest has stopped and every shard is held by the caller.
        let dom = &self.domain;
        let g = pending.0.get_or_insert_with(|| dom.gather());
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
    fn alloc(&mut self, pages: u64) -> Option<u64> {
        let order = order_for_pages(pages)?;
        if let Ok(iova) = self.cpu.alloc(order, self.limit_pfn) {
            return iova.addr();
        }
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
    fn host_base(&self) -> u64 {
        self.base
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
