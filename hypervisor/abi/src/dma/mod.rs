//! The paravirtual DMA interface: flags, ops, policies, features and every structure shared
//! through guest memory. See the crate documentation for the call-by-call specification.

mod batch;
mod fault;
mod query;
mod stats;

pub use batch::{
    batch_capacity, decode_map_regs, decode_unmap_regs, validate_batch, validate_entry,
    BatchHeader, BatchInfo, Entry, EntryOutcome, MulticallReturn, MulticallStop, Request,
    BATCH_HEADER_SIZE, BATCH_MAGIC, BATCH_VERSION, ENTRY_SIZE, MAX_BATCH_PAGES, MULTICALL_UNSYNCED,
    STATUS_PENDING,
};
pub use fault::{
    fault_ring_capacity, Direction, FaultRecord, FaultRingHeader, FAULT_RECORD_SIZE,
    FAULT_RING_HEADER_SIZE, FAULT_RING_MAGIC, FAULT_RING_VERSION, MAX_FAULT_RING_PAGES,
};
pub use query::{QueryHeader, RegionKind, ReservedRegion, QUERY_HEADER_SIZE, REGION_SIZE};
pub use stats::{Stats, StatsFlags, STATS_SIZE};

/// The mapping granule: every GPA, IOVA and length in the DMA calls is a multiple of it.
pub const PAGE_SIZE: u64 = 4096;
/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u32 = 12;

/// The x86 MSI window `[0xfee0_0000, 0xfef0_0000)`: a device write there is an interrupt
/// request, never a memory access. It is a [`RegionKind::Msi`] reserved region of every
/// guest whose IOVA window reaches it: MAP never returns an IOVA inside it and UNMAP of a
/// range that intersects it returns PERM.
pub const MSI_WINDOW_START: u64 = 0xfee0_0000;
/// End (exclusive) of the MSI window.
pub const MSI_WINDOW_END: u64 = 0xfef0_0000;

/// Whether `v` is a multiple of [`PAGE_SIZE`].
#[inline]
pub const fn is_page_aligned(v: u64) -> bool {
    v & (PAGE_SIZE - 1) == 0
}

/// Access rights of a mapping, from the device's point of view (`flags` of a MAP).
///
/// There is no execute right. Bits other than [`DmaFlags::READ`] and [`DmaFlags::WRITE`] are
/// reserved: a request carrying one is refused with INVAL, and a MAP needs at least one right.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DmaFlags(u16);

impl DmaFlags {
    /// The device may read the memory (memory to device, e.g. a transmit buffer).
    pub const READ: DmaFlags = DmaFlags(1 << 0);
    /// The device may write the memory (device to memory, e.g. a receive buffer).
    pub const WRITE: DmaFlags = DmaFlags(1 << 1);
    /// Both rights.
    pub const READ_WRITE: DmaFlags = DmaFlags(Self::READ.0 | Self::WRITE.0);
    /// No right (valid only where flags must be 0, i.e. UNMAP).
    pub const EMPTY: DmaFlags = DmaFlags(0);
    /// Every defined bit.
    pub const KNOWN: u16 = Self::READ_WRITE.0;

    /// The raw bits.
    #[inline]
    pub const fn bits(self) -> u16 {
        self.0
    }

    /// Flags from raw bits; `None` if a reserved bit is set.
    #[inline]
    pub const fn from_bits(bits: u16) -> Option<DmaFlags> {
        if bits & !Self::KNOWN != 0 {
            None
        } else {
            Some(DmaFlags(bits))
        }
    }

    /// Whether every right of `other` is in `self`.
    #[inline]
    pub const fn contains(self, other: DmaFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether no right is set.
    #[inline]
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The union of two sets of rights.
    #[inline]
    pub const fn union(self, other: DmaFlags) -> DmaFlags {
        DmaFlags(self.0 | other.0)
    }
}

impl core::fmt::Debug for DmaFlags {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let r = if self.contains(Self::READ) { "R" } else { "-" };
        let w = if self.contains(Self::WRITE) { "W" } else { "-" };
        write!(f, "DmaFlags({r}{w})")
    }
}

abi_enum! {
    /// The operation of a batch entry (`op`, a `u16`). Zero is not an op, so a zeroed entry is
    /// refused (INVAL) rather than doing something.
    pub enum Op: u16 {
        /// Map guest pages `[gpa, gpa+length)`; the hypervisor chooses and returns the IOVA.
        Map = 1,
        /// Unmap the mapping that starts at `iova` and is `length` bytes long.
        Unmap = 2,
    }
}

abi_enum! {
    /// The protection policy in force for the guest (chosen by the host administrator, reported
    /// by QUERY). See the crate docs, *IOVA lifetime per policy*.
    pub enum Policy: u8 {
        /// Guest memory is direct-mapped for the guest's devices (IOVA = GPA); MAP and UNMAP keep
        /// their bookkeeping and checks but do not change what the device can reach.
        Passthrough = 0,
        /// Every UNMAP invalidates the IOTLB and waits for completion before it returns.
        Strict = 1,
        /// Like strict, with one gathered invalidation and one wait per MULTICALL, before the call
        /// returns.
        Batched = 2,
        /// Invalidations are queued; the queue is flushed when it holds
        /// `deferred_max_entries` unmaps or its oldest is `deferred_max_us` old, or on SYNC.
        Deferred = 3,
    }
}

impl Policy {
    /// The name used on the hypervisor command line.
    pub const fn name(self) -> &'static str {
        match self {
            Policy::Passthrough => "passthrough",
            Policy::Strict => "strict",
            Policy::Batched => "batched",
            Policy::Deferred => "deferred",
        }
    }

    /// Whether an UNMAP that returned OK (for `Batched`: whose MULTICALL returned) is already
    /// unreachable by the device, without a SYNC.
    pub const fn unmap_is_synchronous(self) -> bool {
        matches!(self, Policy::Strict | Policy::Batched)
    }
}

/// Optional features of the DMA interface (`features` of the QUERY response, a `u64`).
///
/// Bits not defined here are reserved and reported as 0; a guest ignores bits it does not
/// know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Features(pub u64);

impl Features {
    /// `DMA_FAULT_RING_REGISTER` works (faults are delivered through a ring).
    pub const FAULT_RING: u64 = 1 << 0;
    /// The fault ring can raise a virtual interrupt (a non-zero vector at registration).
    pub const FAULT_IRQ: u64 = 1 << 1;
    /// `DMA_STATS` works.
    pub const STATS: u64 = 1 << 2;
    /// The hypervisor may use 2 MiB IOMMU pages for 2 MiB-aligned mappings. (Invisible to the
    /// guest: an UNMAP always names a whole mapping.)
    pub const SUPERPAGES: u64 = 1 << 3;
    /// MAP returns IOVA = GPA (reported under the passthrough policy).
    pub const IOVA_IS_GPA: u64 = 1 << 4;
    /// Every bit defined by this ABI version.
    pub const KNOWN: u64 =
        Self::FAULT_RING | Self::FAULT_IRQ | Self::STATS | Self::SUPERPAGES | Self::IOVA_IS_GPA;

    /// Whether every bit of `mask` is set.
    #[inline]
    pub const fn has(self, mask: u64) -> bool {
        self.0 & mask == mask
    }
}

/// The limits the pure validation functions check against (from the QUERY response on the
/// guest side, from the hypervisor's configuration on the other).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bits of IOVA space (`iova_width`), 12..=64.
    pub iova_width: u8,
    /// Most entries one MULTICALL runs (`max_batch`).
    pub max_batch: u32,
    /// Most pages one mapping may cover (`max_map_pages`); 0: no limit but the IOVA width.
    pub max_map_pages: u32,
}

impl Limits {
    /// Bytes of IOVA space, saturating at `u64::MAX` for a 64-bit width.
    pub const fn iova_space(&self) -> u64 {
        if self.iova_width >= 64 {
            u64::MAX
        } else {
            1u64 << self.iova_width
        }
    }
}
