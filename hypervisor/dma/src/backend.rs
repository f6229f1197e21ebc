//! What the service needs from the kernel: the IOMMU domain, the IOVA allocator, the guest's
//! memory layout and a cycle counter.

use core::ops::Range;

use moat_frames::PhysAddr;

/// Device access rights of a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// The device may read.
    pub read: bool,
    /// The device may write.
    pub write: bool,
}

impl Access {
    /// Read and write.
    pub const RW: Access = Access {
        read: true,
        write: true,
    };
    /// Read only.
    pub const R: Access = Access {
        read: true,
        write: false,
    };
    /// Write only.
    pub const W: Access = Access {
        read: false,
        write: true,
    };
}

/// One IOMMU domain (all of a guest's devices).
///
/// `map` writes the entries and records in the pending set what a flush must do for them
/// (VT-d with caching mode: invalidate the range; with write-buffer flushing: flush the write
/// buffer); when [`Iommu::map_needs_flush`] is true the service flushes after every map
/// before the mapping is used. `unmap` clears the entries and records what must be
/// invalidated in the pending set; nothing is invalidated until `flush`, which invalidates
/// everything pending and waits for completion.
pub trait Iommu {
    /// Unmaps waiting for invalidation.
    type Pending: Default;
    /// Maps `[iova, iova + len)` to host `[hpa, hpa + len)`, all or nothing, recording in
    /// `pending` what the flush that makes it usable must do. On `Err` no entry of the range
    /// is present, but entries it wrote and rolled back may still be cached: what must be
    /// invalidated for them is in `pending`, and the service holds the IOVA until a flush
    /// of `pending` completed.
    fn map(
        &mut self,
        iova: u64,
        hpa: PhysAddr,
        len: u64,
        access: Access,
        pending: &mut Self::Pending,
    ) -> Result<(), crate::Error>;
    /// Whether a new mapping needs a flush before a device may use it (VT-d: caching mode
    /// or `CAP.RWBF`). Then the service flushes after each map; if that flush fails it
    /// unmaps the range again (into `pending`) and the map fails with `Busy`.
    fn map_needs_flush(&self) -> bool;
    /// Unmaps exactly a range `map` created, adding it to `pending`.
    fn unmap(
        &mut self,
        iova: u64,
        len: u64,
        pending: &mut Self::Pending,
    ) -> Result<(), crate::Error>;
    /// Invalidates everything in `pending` and waits for it. On `Ok` the pending set is empty
    /// and returns how many invalidation requests were issued; on `Err` it is kept intact.
    fn flush(&mut self, pending: &mut Self::Pending) -> Result<u32, crate::Error>;
    /// Page-table pages in use (for the quota).
    fn table_pages(&self) -> usize;
    /// Unlinks every empty page-table page (the domain keeps emptied tables for reuse while
    /// the guest runs), adding them to `pending`; they are freed by the flush that
    /// invalidates them. Returns how many. Only valid when nothing will be mapped into the
    /// domain before that flush (teardown). The default keeps no tables.
    fn release_empty_tables(&mut self, pending: &mut Self::Pending) -> usize {
        let _ = pending;
        0
    }
}

/// The IOVA allocator of the guest's domain (on the calling CPU).
pub trait IovaSource {
    /// An IOVA range of at least `pages` pages, page aligned, below the device limit.
    fn alloc(&mut self, pages: u64) -> Option<u64>;
    /// Returns a range `alloc` gave for `pages` pages.
    fn free(&mut self, iova: u64, pages: u64);
}

/// The guest's RAM: one contiguous partition, guest-physical `[0, size)` at host `base`,
/// minus ranges the guest may not hand to a device.
pub trait GuestRam {
    /// Bytes of RAM.
    fn size(&self) -> u64;
    /// Host-physical address of guest-physical 0.
    fn host_base(&self) -> PhysAddr;
    /// A guest-physical range that may never be mapped for DMA (e.g. the MSI window,
    /// reserved regions), if `[gpa, gpa + len)` touches one.
    fn forbidden(&self, _gpa: Range<u64>) -> bool {
        false
    }
}

/// Cycle counter for the per-phase accounting.
pub trait Clock {
    /// A monotonic cycle count.
    fn cycles(&self) -> u64;
    /// Nanoseconds (for the deferred time bound).
    fn now_ns(&self) -> u64;
}

/// A clock that does not count (tests that do not look at time).
pub struct NoClock;

impl Clock for NoClock {
    fn cycles(&self) -> u64 {
        0
    }
    fn now_ns(&self) -> u64 {
        0
    }
}
