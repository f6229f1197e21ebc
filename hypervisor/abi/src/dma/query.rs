//! The `DMA_QUERY` response: a header and the reserved IOVA regions.

use super::{Features, Limits, Policy};

use zerocopy::little_endian::{U16, U32, U64};

/// Bytes of a [`QueryHeader`].
pub const QUERY_HEADER_SIZE: usize = 64;
/// Bytes of a [`ReservedRegion`].
pub const REGION_SIZE: usize = 24;

abi_struct! {
    /// The `DMA_QUERY` response header (64 bytes, little-endian), followed directly by
    /// `regions_written` [`ReservedRegion`]s.
    ///
    /// | offset | size | field | meaning |
    /// |---|---|---|---|
    /// | 0 | 4 | `abi_version` | [`crate::ABI_VERSION`] of the hypervisor (same as CPUID) |
    /// | 4 | 4 | `header_size` | bytes of this header (64); regions start here |
    /// | 8 | 8 | `page_sizes` | bit *n* set: 2^*n*-byte IOMMU pages are used; bit 12 always set |
    /// | 16 | 1 | `iova_width` | bits of IOVA space: every IOVA + length ≤ 2^`iova_width` |
    /// | 17 | 1 | `policy` | [`Policy`] in force for this guest |
    /// | 18 | 2 | `reserved0` | 0 |
    /// | 20 | 4 | `max_batch` | most entries one MULTICALL runs |
    /// | 24 | 8 | `features` | [`Features`] bits |
    /// | 32 | 4 | `max_mappings` | quota of live mappings (NOMEM beyond) |
    /// | 36 | 4 | `max_pt_pages` | quota of IOMMU page-table pages (NOMEM beyond) |
    /// | 40 | 4 | `deferred_max_entries` | deferred: queue bound in unmaps (0 otherwise) |
    /// | 44 | 4 | `deferred_max_us` | deferred: queue bound in microseconds (0 otherwise) |
    /// | 48 | 4 | `nr_regions` | reserved regions that exist |
    /// | 52 | 4 | `regions_written` | reserved regions that follow (those that fit the buffer) |
    /// | 56 | 4 | `max_batch_pages` | most pages of a batch area ([`super::MAX_BATCH_PAGES`]) |
    /// | 60 | 4 | `max_map_pages` | most 4 KiB pages one mapping may cover (RANGE beyond); 0: only the IOVA width limits it |
    pub struct QueryHeader: QUERY_HEADER_SIZE {
        /// ABI version.
        pub abi_version: U32 @ 0,
        /// Bytes of this header.
        pub header_size: U32 @ 4,
        /// Page-size bitmap.
        pub page_sizes: U64 @ 8,
        /// IOVA width in bits.
        pub iova_width: u8 @ 16,
        /// [`Policy`] as a byte.
        pub policy: u8 @ 17,
        /// 0.
        pub reserved0: U16 @ 18,
        /// Most entries per MULTICALL.
        pub max_batch: U32 @ 20,
        /// [`Features`] bits.
        pub features: U64 @ 24,
        /// Quota of live mappings.
        pub max_mappings: U32 @ 32,
        /// Quota of page-table pages.
        pub max_pt_pages: U32 @ 36,
        /// Deferred queue bound in entries.
        pub deferred_max_entries: U32 @ 40,
        /// Deferred queue bound in microseconds.
        pub deferred_max_us: U32 @ 44,
        /// Reserved regions in total.
        pub nr_regions: U32 @ 48,
        /// Reserved regions in this response.
        pub regions_written: U32 @ 52,
        /// Most pages of a batch area.
        pub max_batch_pages: U32 @ 56,
        /// Most pages per mapping (0: no limit but the IOVA width).
        pub max_map_pages: U32 @ 60,
    }
}

impl QueryHeader {
    /// The policy; `None` for an unknown byte.
    pub const fn policy(&self) -> Option<Policy> {
        Policy::from_raw(self.policy)
    }

    /// The feature bits.
    pub const fn features(&self) -> Features {
        Features(self.features.get())
    }

    /// The validation limits this response announces.
    pub const fn limits(&self) -> Limits {
        Limits {
            iova_width: self.iova_width,
            max_batch: self.max_batch.get(),
            max_map_pages: self.max_map_pages.get(),
        }
    }

    /// Bytes of a response that holds every region (the value of RDX after QUERY).
    pub const fn full_size(nr_regions: u32) -> u64 {
        QUERY_HEADER_SIZE as u64 + nr_regions as u64 * REGION_SIZE as u64
    }

    /// How many regions fit a response buffer of `len` bytes (0 if the header does not fit).
    pub const fn regions_fitting(len: u64) -> u64 {
        if len < QUERY_HEADER_SIZE as u64 {
            0
        } else {
            (len - QUERY_HEADER_SIZE as u64) / REGION_SIZE as u64
        }
    }
}

abi_enum! {
    /// What a reserved IOVA region is (`kind` of a [`ReservedRegion`]).
    pub enum RegionKind: u32 {
        /// IOVAs the hypervisor never hands out; device accesses there fault.
        Reserved = 1,
        /// The MSI window ([`super::MSI_WINDOW_START`]`..`[`super::MSI_WINDOW_END`] on x86):
        /// device writes there are interrupt requests, never memory accesses.
        Msi = 2,
        /// An RMRR: identity-mapped for a device because firmware requires it; never handed out,
        /// never unmappable (UNMAP there → PERM).
        Identity = 3,
    }
}

abi_struct! {
    /// One reserved IOVA region (24 bytes, little-endian).
    ///
    /// | offset | size | field | meaning |
    /// |---|---|---|---|
    /// | 0 | 8 | `start` | first IOVA, page aligned |
    /// | 8 | 8 | `length` | bytes, page multiple |
    /// | 16 | 4 | `kind` | [`RegionKind`] |
    /// | 20 | 4 | `reserved` | 0 |
    ///
    /// MAP never returns an IOVA inside a reserved region, and UNMAP of a range that intersects one
    /// returns PERM.
    #[derive(Default)]
    pub struct ReservedRegion: REGION_SIZE {
        /// First IOVA.
        pub start: U64 @ 0,
        /// Bytes.
        pub length: U64 @ 8,
        /// [`RegionKind`] as `u32`.
        pub kind: U32 @ 16,
        /// 0.
        pub reserved: U32 @ 20,
    }
}

impl ReservedRegion {
    /// Whether `[iova, iova+length)` intersects this region (saturating at 2^64).
    pub const fn intersects(&self, iova: u64, length: u64) -> bool {
        let (start, len) = (self.start.get(), self.length.get());
        let end = iova.saturating_add(length);
        let rend = start.saturating_add(len);
        length != 0 && len != 0 && iova < rend && start < end
    }
}
