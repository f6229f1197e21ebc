//! The `DMA_STATS` counters.

use zerocopy::little_endian::{U32, U64};

/// Bytes of a [`Stats`] block.
pub const STATS_SIZE: usize = 152;

/// Flags of `DMA_STATS` (RDX). Other bits → INVAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsFlags(pub u64);

impl StatsFlags {
    /// Zero the counters (not the gauges) after reading them, atomically with the read.
    pub const RESET: u64 = 1 << 0;
    /// Every defined bit.
    pub const KNOWN: u64 = Self::RESET;
}

abi_struct! {
    /// The guest's DMA counters (152 bytes, little-endian, every field after the first two a
    /// `u64`), summed over its vCPUs since the guest started or the last reset. Cycle sums are
    /// TSC cycles measured by the hypervisor.
    ///
    /// | offset | field | meaning |
    /// |---|---|---|
    /// | 0 | `size` (u32) | bytes of this block ([`STATS_SIZE`]) |
    /// | 4 | `reserved` (u32) | 0 |
    /// | 8 | `maps` | MAPs that returned OK (calls and entries) |
    /// | 16 | `unmaps` | UNMAPs that returned OK |
    /// | 24 | `errors` | MAPs and UNMAPs that failed |
    /// | 32 | `multicalls` | MULTICALL calls |
    /// | 40 | `invalidations` | IOTLB invalidation requests issued for the guest's domain |
    /// | 48 | `waits` | invalidation waits (completion waits) |
    /// | 56 | `faults` | DMA faults on the guest's domain (recorded or dropped) |
    /// | 64 | `exits` | VM exits for DMA calls |
    /// | 72 | `cycles_exit` | world switch: exit to dispatch plus return to guest entry |
    /// | 80 | `cycles_validate` | copying and validating requests and entries |
    /// | 88 | `cycles_iova_alloc` | IOVA allocation |
    /// | 96 | `cycles_pte_write` | writing and clearing IOMMU PTEs |
    /// | 104 | `cycles_invalidate` | invalidation and wait |
    /// | 112 | `cycles_iova_free` | IOVA release |
    /// | 120 | `live_mappings` | gauge: mappings now live |
    /// | 128 | `live_pages` | gauge: 4 KiB pages now mapped |
    /// | 136 | `pending_invalidations` | gauge: unmaps whose invalidation has not completed |
    /// | 144 | `pt_pages` | gauge: IOMMU page-table pages of the guest's domain |
    #[derive(Default)]
    pub struct Stats: STATS_SIZE {
        /// Bytes of this block.
        pub size: U32 @ 0,
        /// 0.
        pub reserved: U32 @ 4,
        /// Successful MAPs.
        pub maps: U64 @ 8,
        /// Successful UNMAPs.
        pub unmaps: U64 @ 16,
        /// Failed MAPs and UNMAPs.
        pub errors: U64 @ 24,
        /// MULTICALL calls.
        pub multicalls: U64 @ 32,
        /// IOTLB invalidation requests.
        pub invalidations: U64 @ 40,
        /// Invalidation waits.
        pub waits: U64 @ 48,
        /// DMA faults.
        pub faults: U64 @ 56,
        /// VM exits for DMA calls.
        pub exits: U64 @ 64,
        /// Cycles in exit/entry.
        pub cycles_exit: U64 @ 72,
        /// Cycles in copy + validate.
        pub cycles_validate: U64 @ 80,
        /// Cycles in IOVA allocation.
        pub cycles_iova_alloc: U64 @ 88,
        /// Cycles writing PTEs.
        pub cycles_pte_write: U64 @ 96,
        /// Cycles in invalidate + wait.
        pub cycles_invalidate: U64 @ 104,
        /// Cycles in IOVA free.
        pub cycles_iova_free: U64 @ 112,
        /// Live mappings (gauge).
        pub live_mappings: U64 @ 120,
        /// Mapped 4 KiB pages (gauge).
        pub live_pages: U64 @ 128,
        /// Unmaps awaiting invalidation (gauge).
        pub pending_invalidations: U64 @ 136,
        /// Page-table pages (gauge).
        pub pt_pages: U64 @ 144,
    }
}

impl Stats {
    /// The `u64` fields in layout order (offset `8 + 8*i`).
    pub const fn counters(&self) -> [u64; 18] {
        [
            self.maps.get(),
            self.unmaps.get(),
            self.errors.get(),
            self.multicalls.get(),
            self.invalidations.get(),
            self.waits.get(),
            self.faults.get(),
            self.exits.get(),
            self.cycles_exit.get(),
            self.cycles_validate.get(),
            self.cycles_iova_alloc.get(),
            self.cycles_pte_write.get(),
            self.cycles_invalidate.get(),
            self.cycles_iova_free.get(),
            self.live_mappings.get(),
            self.live_pages.get(),
            self.pending_invalidations.get(),
            self.pt_pages.get(),
        ]
    }

    /// The block from its `u64` fields in layout order (`size` = [`STATS_SIZE`]).
    pub const fn from_counters(c: [u64; 18]) -> Stats {
        Stats {
            size: U32::new(STATS_SIZE as u32),
            reserved: U32::ZERO,
            maps: U64::new(c[0]),
            unmaps: U64::new(c[1]),
            errors: U64::new(c[2]),
            multicalls: U64::new(c[3]),
            invalidations: U64::new(c[4]),
            waits: U64::new(c[5]),
            faults: U64::new(c[6]),
            exits: U64::new(c[7]),
            cycles_exit: U64::new(c[8]),
            cycles_validate: U64::new(c[9]),
            cycles_iova_alloc: U64::new(c[10]),
            cycles_pte_write: U64::new(c[11]),
            cycles_invalidate: U64::new(c[12]),
            cycles_iova_free: U64::new(c[13]),
            live_mappings: U64::new(c[14]),
            live_pages: U64::new(c[15]),
            pending_invalidations: U64::new(c[16]),
            pt_pages: U64::new(c[17]),
        }
    }
}
