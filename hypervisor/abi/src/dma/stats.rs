//! The `DMA_STATS` counters.

use crate::le::{put_u32, put_u64, u32_at, u64_at};
use core::mem::{offset_of, size_of};

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
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Bytes of this block.
    pub size: u32,
    /// 0.
    pub reserved: u32,
    /// Successful MAPs.
    pub maps: u64,
    /// Successful UNMAPs.
    pub unmaps: u64,
    /// Failed MAPs and UNMAPs.
    pub errors: u64,
    /// MULTICALL calls.
    pub multicalls: u64,
    /// IOTLB invalidation requests.
    pub invalidations: u64,
    /// Invalidation waits.
    pub waits: u64,
    /// DMA faults.
    pub faults: u64,
    /// VM exits for DMA calls.
    pub exits: u64,
    /// Cycles in exit/entry.
    pub cycles_exit: u64,
    /// Cycles in copy + validate.
    pub cycles_validate: u64,
    /// Cycles in IOVA allocation.
    pub cycles_iova_alloc: u64,
    /// Cycles writing PTEs.
    pub cycles_pte_write: u64,
    /// Cycles in invalidate + wait.
    pub cycles_invalidate: u64,
    /// Cycles in IOVA free.
    pub cycles_iova_free: u64,
    /// Live mappings (gauge).
    pub live_mappings: u64,
    /// Mapped 4 KiB pages (gauge).
    pub live_pages: u64,
    /// Unmaps awaiting invalidation (gauge).
    pub pending_invalidations: u64,
    /// Page-table pages (gauge).
    pub pt_pages: u64,
}

const _: () = {
    assert!(size_of::<Stats>() == STATS_SIZE);
    assert!(offset_of!(Stats, maps) == 8);
    assert!(offset_of!(Stats, multicalls) == 32);
    assert!(offset_of!(Stats, exits) == 64);
    assert!(offset_of!(Stats, cycles_exit) == 72);
    assert!(offset_of!(Stats, cycles_iova_free) == 112);
    assert!(offset_of!(Stats, live_mappings) == 120);
    assert!(offset_of!(Stats, pt_pages) == 144);
};

impl Stats {
    /// The `u64` fields in layout order (offset `8 + 8*i`).
    pub const fn counters(&self) -> [u64; 18] {
        [
            self.maps,
            self.unmaps,
            self.errors,
            self.multicalls,
            self.invalidations,
            self.waits,
            self.faults,
            self.exits,
            self.cycles_exit,
            self.cycles_validate,
            self.cycles_iova_alloc,
            self.cycles_pte_write,
            self.cycles_invalidate,
            self.cycles_iova_free,
            self.live_mappings,
            self.live_pages,
            self.pending_invalidations,
            self.pt_pages,
        ]
    }

    /// The block from its `u64` fields in layout order (`size` = [`STATS_SIZE`]).
    pub const fn from_counters(c: [u64; 18]) -> Stats {
        Stats {
            size: STATS_SIZE as u32,
            reserved: 0,
            maps: c[0],
            unmaps: c[1],
            errors: c[2],
            multicalls: c[3],
            invalidations: c[4],
            waits: c[5],
            faults: c[6],
            exits: c[7],
            cycles_exit: c[8],
            cycles_validate: c[9],
            cycles_iova_alloc: c[10],
            cycles_pte_write: c[11],
            cycles_invalidate: c[12],
            cycles_iova_free: c[13],
            live_mappings: c[14],
            live_pages: c[15],
            pending_invalidations: c[16],
            pt_pages: c[17],
        }
    }

    /// Decodes the little-endian bytes.
    pub fn from_bytes(b: &[u8; STATS_SIZE]) -> Stats {
        let mut c = [0u64; 18];
        for (i, v) in c.iter_mut().enumerate() {
            *v = u64_at(b, 8 + 8 * i);
        }
        Stats {
            size: u32_at(b, 0),
            reserved: u32_at(b, 4),
            ..Stats::from_counters(c)
        }
    }

    /// Encodes to little-endian bytes.
    pub fn to_bytes(&self) -> [u8; STATS_SIZE] {
        let mut b = [0u8; STATS_SIZE];
        put_u32(&mut b, 0, self.size);
        put_u32(&mut b, 4, self.reserved);
        for (i, v) in self.counters().iter().enumerate() {
            put_u64(&mut b, 8 + 8 * i, *v);
        }
        b
    }
}
