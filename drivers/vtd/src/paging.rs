//! Second-level (legacy mode) I/O page tables of one domain: a thin VT-d wrapper around the
//! [`moat_ptab`] engine in the [`moat_ptab::format::VtdSecondLevel`] format.
//!
//! Entry format (VT-d 9.8): R (0), W (1), PS (7, large page in level 2/3 entries), SNP (11,
//! only when `ECAP.SC`), address (51:12). An entry is present when R or W is set. Non-leaf
//! entries carry R|W so that the leaf decides the access rights.
//!
//! Invariants (kept by the engine, see its docs):
//! - a table page is unlinked (and handed to the [`Gather`], to be freed by the flush that
//!   invalidates it) only by an unmap whose range covers the table's whole span. Then every
//!   IOVA of the span was mapped and is pending in the gather, so no map can link a fresh
//!   table into the same slot before the flush (hardware with a paging-structure cache may
//!   still hold the old directory entry until then). A table emptied by a smaller unmap, or
//!   left empty by a failed map, stays linked: later maps reuse it, and
//!   [`PageTable::release_empty_tables`] or the domain's teardown frees it;
//! - a superpage is only created where the IOVA and physical address are aligned to it, the
//!   range covers it, `CAP.SLLPS` allows it, and no table is linked in its slot;
//! - map and unmap are all-or-nothing: a failing map is rolled back, and unmap validates
//!   the whole range (present, no partial superpage) before changing anything.

use bitflags::bitflags;
use moat_ptab::format::{VtdAttr, VtdSecondLevel};

use crate::entry::PagingLevels;
use crate::error::Error;
use crate::gather::Gather;
use crate::hw::{DmaMemory, PhysAddr};

bitflags! {
    /// Access rights of a DMA mapping.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Access: u8 {
        /// The device may read (DMA from memory).
        const READ = 1 << 0;
        /// The device may write (DMA to memory).
        const WRITE = 1 << 1;
    }
}

/// Second-level page-table entry bits.
pub mod pte {
    /// Read permission.
    pub const R: u64 = 1 << 0;
    /// Write permission.
    pub const W: u64 = 1 << 1;
    /// Page size: the entry maps a 2 MiB (level 2) or 1 GiB (level 3) page.
    pub const PS: u64 = moat_ptab::format::PS;
    /// Snoop behaviour (only defined with `ECAP.SC`).
    pub const SNP: u64 = 1 << 11;
    /// Address bits 51:12.
    pub const ADDR_MASK: u64 = moat_ptab::format::ADDR_MASK;
}

/// Highest physical address width the entry format can hold.
pub const MAX_PHYS_BITS: u32 = 52;

/// What the page tables of a domain may use, derived from the unit's capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableConfig {
    /// Table depth.
    pub levels: PagingLevels,
    /// IOVAs must be below `1 << iova_bits` (min of the AGAW and `CAP.MGAW`).
    pub iova_bits: u32,
    /// 2 MiB superpages allowed.
    pub superpage_2m: bool,
    /// 1 GiB superpages allowed.
    pub superpage_1g: bool,
    /// Set SNP in leaf entries (only when `ECAP.SC`).
    pub snoop: bool,
    /// Page walks are coherent (`ECAP.C`); when false every table write is flushed.
    pub coherent: bool,
    /// `CAP.CM`: maps must be invalidated too.
    pub caching_mode: bool,
}

impl TableConfig {
    fn engine(&self) -> moat_ptab::Config {
        moat_ptab::Config {
            levels: self.levels.count(),
            va_bits: self.iova_bits,
            pa_bits: MAX_PHYS_BITS,
            superpages: (self.superpage_2m as u8) << 2 | (self.superpage_1g as u8) << 3,
            coherent: self.coherent,
        }
    }
}

/// Result of a translation lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Physical address the IOVA translates to.
    pub phys: PhysAddr,
    /// Access rights of the leaf.
    pub access: Access,
    /// Size of the page holding the IOVA (4 KiB, 2 MiB or 1 GiB).
    pub page_size: u64,
}

impl From<moat_ptab::Error> for Error {
    fn from(e: moat_ptab::Error) -> Self {
        use moat_ptab::Error as E;
        match e {
            E::Misaligned => Error::Misaligned,
            E::OutOfRange => Error::OutOfRange,
            E::NoAccess => Error::NoAccess,
            E::NoMemory => Error::NoMemory,
            E::AlreadyMapped { va } => Error::AlreadyMapped { iova: va },
            E::NotMapped { va } => Error::NotMapped { iova: va },
            E::PartialSuperpage { va, size } => Error::PartialSuperpage { iova: va, size },
        }
    }
}

#[cfg(test)]
const fn level_size(level: u8) -> u64 {
    moat_ptab::level_size(level)
}

#[cfg(test)]
fn is_present(e: u64) -> bool {
    use moat_ptab::Format;
    VtdSecondLevel::is_present(e)
}

#[cfg(test)]
const fn is_leaf(e: u64, level: u8) -> bool {
    moat_ptab::format::is_leaf(e, level)
}

#[cfg(test)]
fn table_empty<M: DmaMemory>(mem: &M, table: PhysAddr) -> bool {
    (0..512).all(|i| !is_present(mem.read_u64(table + i * 8)))
}

/// A domain's second-level page tables.
#[derive(Debug)]
pub struct PageTable {
    inner: moat_ptab::PageTable<VtdSecondLevel>,
    cfg: TableConfig,
}

impl PageTable {
    /// Allocates an empty root table.
    pub fn new<M: DmaMemory>(mem: &mut M, cfg: TableConfig) -> Result<Self, Error> {
        Ok(Self {
            inner: moat_ptab::PageTable::new(&*mem, cfg.engine())?,
            cfg,
        })
    }

    /// Physical address of the root table (the context entry's SLPTPTR).
    pub fn root(&self) -> PhysAddr {
        self.inner.root()
    }

    /// The configuration the tables were built with.
    pub fn config(&self) -> &TableConfig {
        &self.cfg
    }

    /// Bytes currently mapped (for per-domain quotas).
    pub fn mapped_bytes(&self) -> u64 {
        self.inner.mapped_bytes()
    }

    /// Number of table pages currently linked into the tree (root included).
    #[inline]
    pub fn table_pages(&self) -> usize {
        self.inner.table_pages()
    }

    /// Maps `[iova, iova + len)` to `[phys, phys + len)` with `access`.
    ///
    /// Uses the largest pages allowed by alignment and the unit. Records the map in `gather`
    /// (caching mode needs an invalidation; `CAP.RWBF` needs a write-buffer flush).
    ///
    /// On error the mapping is unchanged: the leaves this call wrote are cleared again, and
    /// the table pages it installed stay linked (empty, counted in [`Self::table_pages`],
    /// reused by later maps): nothing is unlinked behind the hardware's back. A device may
    /// have used the cleared leaves already, so their range is recorded in `gather` as an
    /// invalidation (leaf-only, IH = 1). **The caller must flush `gather` (and see the flush
    /// succeed) before it reuses the IOVAs of a failed map**, even though the map failed;
    /// the gather holds no table page to free and reports no unmapped range for it.
    #[inline]
    pub fn map<M: DmaMemory>(
        &self,
        mem: &M,
        iova: u64,
        phys: PhysAddr,
        len: u64,
        access: Access,
        gather: &mut Gather,
    ) -> Result<(), Error> {
        let mut attr = VtdAttr::from_bits_truncate(access.bits() as u64);
        if self.cfg.snoop {
            attr |= VtdAttr::SNOOP;
        }
        self.inner.map(mem, iova, phys, len, attr, gather)?;
        gather.add_mapped(iova..iova + len, self.cfg.caching_mode);
        Ok(())
    }

    /// Unmaps `[iova, iova + len)`.
    ///
    /// The whole range must be mapped, and every superpage it touches must lie entirely
    /// inside it: a partial superpage unmap is rejected with [`Error::PartialSuperpage`]
    /// (superpages are never split implicitly; the caller unmaps the whole superpage and maps
    /// back what it wants to keep). On error nothing changed. On success the range is added
    /// to `gather`, with the table pages whose whole span the range covers (unlinked); they
    /// are released only by the flush that invalidates them. A table left empty by a smaller
    /// range stays linked (see the module docs).
    #[inline]
    pub fn unmap<M: DmaMemory>(
        &self,
        mem: &M,
        iova: u64,
        len: u64,
        gather: &mut Gather,
    ) -> Result<(), Error> {
        self.inner.unmap(mem, iova, len, gather)?;
        gather.add_unmapped(iova..iova + len);
        Ok(())
    }

    /// Walks to the entry mapping `iova`: returns the entry and its level. A not-present
    /// entry is returned with the level at which the walk stopped.
    #[cfg(test)]
    fn walk<M: DmaMemory>(&self, mem: &M, iova: u64) -> (u64, u8) {
        self.inner.walk(mem, iova)
    }

    /// Unlinks every table page that has no present entry (a child's release may empty
    /// its parent) and hands it to `gather`, with its whole span as an invalidation (the
    /// flush then uses IH = 0, so cached directory entries pointing to it are dropped
    /// before it is freed). The root stays. Returns the number of pages unlinked.
    ///
    /// For teardown or a quiesced domain: **the caller must not map into this domain until
    /// `gather` was flushed successfully**, since the spans of the released tables may hold
    /// IOVAs it owns (a map there would link a fresh table into a slot the hardware may
    /// still have cached).
    pub fn release_empty_tables<M: DmaMemory>(&self, mem: &M, gather: &mut Gather) -> usize {
        self.inner.release_empty_tables(mem, gather)
    }

    /// Looks up `iova` in the tables (as the hardware would walk them).
    pub fn translate<M: DmaMemory>(&self, mem: &M, iova: u64) -> Option<Translation> {
        let t = self.inner.translate(mem, iova)?;
        Some(Translation {
            phys: t.phys,
            access: Access::from_bits_truncate(t.attr.bits() as u8),
            page_size: t.page_size,
        })
    }

    /// Frees every table page, root included. Only valid when no hardware can walk the
    /// tables any more (no device attached and the domain's IOTLB entries invalidated).
    pub(crate) fn free_all<M: DmaMemory>(self, mem: &mut M) {
        self.inner.free_all(&*mem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeMemory;
    use alloc::vec::Vec;
    use moat_ptab::ops::{op, translations_match, Model, Op};
    use proptest::prelude::*;

    fn cfg(levels: PagingLevels, sp: bool, coherent: bool) -> TableConfig {
        TableConfig {
            levels,
            iova_bits: levels.width(),
            superpage_2m: sp,
            superpage_1g: sp,
            snoop: false,
            coherent,
            caching_mode: false,
        }
    }

    const RW: Access = Access::READ.union(Access::WRITE);

    /// Tables in `cfg` over a memory of `frames` frames, with a gather for their unmaps.
    fn table(frames: usize, cfg: TableConfig) -> (FakeMemory, PageTable, Gather) {
        let mut mem = FakeMemory::new(frames);
        let pt = PageTable::new(&mut mem, cfg).unwrap();
        (mem, pt, Gather::new(0, 1))
    }

    /// Maps `[iova, iova + len)` to `phys` read-write.
    fn map_rw(pt: &PageTable, mem: &FakeMemory, g: &mut Gather, iova: u64, phys: u64, len: u64) {
        pt.map(mem, iova, PhysAddr::new(phys), len, RW, g).unwrap();
    }

    #[test]
    fn map_translate_unmap_4k() {
        let (mem, pt, mut g) = table(64, cfg(PagingLevels::Three, true, true));
        pt.map(
            &mem,
            0x1000,
            PhysAddr::new(0x5000_0000),
            0x2000,
            Access::READ,
            &mut g,
        )
        .unwrap();
        assert_eq!(pt.table_pages(), 3);
        let t = pt.translate(&mem, 0x1234).unwrap();
        assert_eq!(
            t,
            Translation {
                phys: PhysAddr::new(0x5000_0234),
                access: Access::READ,
                page_size: 4096
            }
        );
        assert_eq!(
            pt.translate(&mem, 0x2fff).unwrap().phys,
            PhysAddr::new(0x5000_1fff)
        );
        assert!(pt.translate(&mem, 0x3000).is_none());
        assert_eq!(
            pt.map(&mem, 0x2000, PhysAddr::new(0), 0x1000, RW, &mut g),
            Err(Error::AlreadyMapped { iova: 0x2000 })
        );
        pt.unmap(&mem, 0x1000, 0x2000, &mut g).unwrap();
        assert!(pt.translate(&mem, 0x1000).is_none());
        // Both lower tables became empty, but the unmap covered neither's span: they stay
        // linked (other IOVAs of their span may be mapped before the flush).
        assert_eq!(g.pending_tables(), 0);
        assert_eq!(pt.table_pages(), 3);
        assert_eq!(mem.live_frames(), 3);
        // A later map reuses them.
        map_rw(&pt, &mem, &mut g, 0x5000, 0x6000_0000, 0x1000);
        assert_eq!((pt.table_pages(), mem.live_frames()), (3, 3));
    }

    #[test]
    fn superpage_range_over_a_kept_table_maps_small_pages_inside_it() {
        let (mem, pt, mut g) = table(64, cfg(PagingLevels::Three, true, true));
        map_rw(&pt, &mem, &mut g, 0x5000, 0x5000, 0x1000);
        pt.unmap(&mem, 0x5000, 0x1000, &mut g).unwrap();
        let tables = pt.walk_tables(&mem);
        assert_eq!(tables.len(), 3, "the emptied leaf table stays linked");
        // 2 MiB aligned both sides: a superpage, except that a table is linked there.
        map_rw(&pt, &mem, &mut g, 0, 0x4000_0000, 0x40_0000);
        assert_eq!(pt.translate(&mem, 0x1000).unwrap().page_size, 4096);
        assert_eq!(
            pt.translate(&mem, 0x1000).unwrap().phys,
            PhysAddr::new(0x4000_1000)
        );
        assert_eq!(pt.translate(&mem, 0x20_0000).unwrap().page_size, 0x20_0000);
        assert_eq!(pt.walk_tables(&mem), tables, "no table replaced");
        // A clash inside the kept table is found at its page.
        pt.unmap(&mem, 0, 0x20_0000, &mut g).unwrap();
        map_rw(&pt, &mem, &mut g, 0x7000, 0x7000, 0x1000);
        assert_eq!(
            pt.map(&mem, 0, PhysAddr::new(0), 0x20_0000, RW, &mut g),
            Err(Error::AlreadyMapped { iova: 0x7000 })
        );
        assert!(pt.translate(&mem, 0).is_none());
    }

    #[test]
    fn unmap_unlinks_only_tables_whose_span_it_covers() {
        let (mem, pt, mut g) = table(64, cfg(PagingLevels::Three, false, true));
        // Two leaf tables (spans [0, 2M) and [2M, 4M)) under one level-2 table.
        map_rw(&pt, &mem, &mut g, 0, 0x4000_0000, 0x40_0000);
        assert_eq!(pt.table_pages(), 4);
        let leaf0 = pt.walk_tables(&mem)[2];
        // Half of the first span: nothing unlinked.
        pt.unmap(&mem, 0, 0x10_0000, &mut g).unwrap();
        assert_eq!(g.pending_tables(), 0);
        // The rest of it (the whole span is now unmapped, but by two unmaps): still linked.
        pt.unmap(&mem, 0x10_0000, 0x10_0000, &mut g).unwrap();
        assert_eq!(g.pending_tables(), 0);
        assert_eq!(pt.table_pages(), 4);
        // One unmap covering the second span exactly: its leaf table goes to the gather;
        // the level-2 table (1 GiB span) stays.
        let leaf1 = pt.walk_tables(&mem)[3];
        pt.unmap(&mem, 0x20_0000, 0x20_0000, &mut g).unwrap();
        assert_eq!(g.pending_tables(), 1);
        assert_eq!(pt.table_pages(), 3);
        assert!(!pt.walk_tables(&mem).contains(&leaf1));
        assert!(pt.walk_tables(&mem).contains(&leaf0));
        assert!(matches!(
            g.plan(true, 18, 8),
            crate::gather::FlushPlan::Pages { ih: false, .. }
        ));
        // Teardown-style release: the empty leaf table and then its parent.
        assert_eq!(pt.release_empty_tables(&mem, &mut g), 2);
        assert_eq!(pt.table_pages(), 1);
        assert_eq!(g.pending_tables(), 3);
        assert_eq!(pt.table_pages() + g.pending_tables(), mem.live_frames());
        assert_eq!(
            g.plan(true, 18, 8),
            crate::gather::FlushPlan::Pages {
                blocks: alloc::vec![crate::gather::PsiBlock { addr: 0, am: 18 }],
                ih: false,
            }
        );
    }

    #[test]
    fn superpages_used_when_aligned_and_allowed() {
        let (mut mem, pt, mut g) = table(64, cfg(PagingLevels::Four, true, true));
        map_rw(&pt, &mem, &mut g, 0x4000_0000, 0x8000_0000, 0x4020_0000);
        assert_eq!(pt.translate(&mem, 0x4000_1000).unwrap().page_size, 1 << 30);
        assert_eq!(pt.translate(&mem, 0x8010_0000).unwrap().page_size, 2 << 20);
        assert_eq!(
            pt.translate(&mem, 0x8010_0000).unwrap().phys,
            PhysAddr::new(0xc010_0000)
        );
        // Unaligned physical address: only 4 KiB pages.
        map_rw(&pt, &mem, &mut g, 0x20_0000, 0x1000, 0x20_0000);
        assert_eq!(pt.translate(&mem, 0x20_0000).unwrap().page_size, 4096);
        // Superpages disabled.
        let pt2 = PageTable::new(&mut mem, cfg(PagingLevels::Three, false, true)).unwrap();
        map_rw(&pt2, &mem, &mut g, 0x20_0000, 0x20_0000, 0x20_0000);
        assert_eq!(pt2.translate(&mem, 0x20_0000).unwrap().page_size, 4096);
    }

    #[test]
    fn partial_superpage_unmap_rejected_without_change() {
        let (mem, pt, mut g) = table(64, cfg(PagingLevels::Three, true, true));
        map_rw(&pt, &mem, &mut g, 0x20_0000, 0x20_0000, 0x20_0000);
        assert_eq!(
            pt.unmap(&mem, 0x20_0000, 0x1000, &mut g),
            Err(Error::PartialSuperpage {
                iova: 0x20_0000,
                size: 0x20_0000
            })
        );
        assert_eq!(
            pt.unmap(&mem, 0x1f_f000, 0x20_1000, &mut g),
            Err(Error::NotMapped { iova: 0x1f_f000 })
        );
        assert!(g.unmapped().is_empty());
        assert_eq!(pt.translate(&mem, 0x20_0000).unwrap().page_size, 0x20_0000);
        pt.unmap(&mem, 0x20_0000, 0x20_0000, &mut g).unwrap();
        assert!(pt.translate(&mem, 0x20_0000).is_none());
    }

    #[test]
    fn bad_arguments_rejected() {
        let (mem, pt, mut g) = table(8, cfg(PagingLevels::Three, true, true));
        assert_eq!(
            pt.map(&mem, 0x1001, PhysAddr::new(0), 0x1000, RW, &mut g),
            Err(Error::Misaligned)
        );
        assert_eq!(
            pt.map(&mem, 0x1000, PhysAddr::new(0x10), 0x1000, RW, &mut g),
            Err(Error::Misaligned)
        );
        assert_eq!(
            pt.map(&mem, 0x1000, PhysAddr::new(0), 0, RW, &mut g),
            Err(Error::Misaligned)
        );
        assert_eq!(
            pt.map(&mem, 1 << 39, PhysAddr::new(0), 0x1000, RW, &mut g),
            Err(Error::OutOfRange)
        );
        assert_eq!(
            pt.map(&mem, !0xfff, PhysAddr::new(0), 0x1000, RW, &mut g),
            Err(Error::OutOfRange)
        );
        assert_eq!(
            pt.map(&mem, 0, PhysAddr::new(1 << 52), 0x1000, RW, &mut g),
            Err(Error::OutOfRange)
        );
        assert_eq!(
            pt.map(&mem, 0, PhysAddr::new(0), 0x1000, Access::empty(), &mut g),
            Err(Error::NoAccess)
        );
        assert_eq!(
            pt.unmap(&mem, 0, 0x1000, &mut g),
            Err(Error::NotMapped { iova: 0 })
        );
        assert!(g.is_empty());
    }

    #[test]
    fn out_of_memory_map_rolls_back() {
        // Root + 2 tables fit; the second 1 GiB region needs 2 more tables.
        let (mem, pt, mut g) = table(4, cfg(PagingLevels::Three, false, true));
        let r = pt.map(&mem, 0x3fff_f000, PhysAddr::new(0x1000), 0x2000, RW, &mut g);
        assert_eq!(r, Err(Error::NoMemory));
        assert!(pt.translate(&mem, 0x3fff_f000).is_none());
        // Region 0's two tables and region 1's level-2 table stay linked (empty): nothing is
        // unlinked behind the hardware's back and nothing waits to be freed.
        assert_eq!(g.pending_tables(), 0);
        assert_eq!(pt.table_pages(), 4);
        assert_eq!(mem.live_frames(), 4);
        assert!(g.unmapped().is_empty());
        // The leaf written and cleared again must be invalidated (leaf only: IH = 1).
        assert_eq!(
            g.plan(true, 18, 8),
            crate::gather::FlushPlan::Pages {
                blocks: alloc::vec![crate::gather::PsiBlock {
                    addr: 0x3fff_f000,
                    am: 0
                }],
                ih: true
            }
        );
        // The kept tables are reused: this map needs no new frame.
        map_rw(&pt, &mem, &mut g, 0x3fff_e000, 0x1000, 0x2000);
        assert_eq!(pt.table_pages(), 4);
    }

    #[test]
    fn rollback_keeps_a_table_even_when_it_cleared_its_whole_span() {
        let (mem, pt, mut g) = table(64, cfg(PagingLevels::Three, false, true));
        map_rw(&pt, &mem, &mut g, 0x20_0000, 0x1000, 0x1000);
        let tables = pt.table_pages();
        // Fills the leaf table of [0, 2M) completely, then clashes at 2M.
        assert_eq!(
            pt.map(&mem, 0, PhysAddr::new(0x10_0000), 0x20_1000, RW, &mut g),
            Err(Error::AlreadyMapped { iova: 0x20_0000 })
        );
        assert!(pt.translate(&mem, 0x1f_f000).is_none());
        // The IOVAs go back to the caller: the table must stay linked.
        assert_eq!(g.pending_tables(), 0);
        assert_eq!(pt.table_pages(), tables + 1);
        assert_eq!(
            g.plan(true, 18, 8),
            crate::gather::FlushPlan::Pages {
                blocks: alloc::vec![crate::gather::PsiBlock { addr: 0, am: 9 }],
                ih: true
            }
        );
    }

    #[test]
    fn non_coherent_flushes_every_table_write() {
        let (mem, pt, mut g) = table(16, cfg(PagingLevels::Three, false, false));
        map_rw(&pt, &mem, &mut g, 0, 0x10000, 0x3000);
        // Every written entry's line was flushed after the write.
        assert!(
            mem.unflushed_writes().is_empty(),
            "{:?}",
            mem.unflushed_writes()
        );
        pt.unmap(&mem, 0x1000, 0x1000, &mut g).unwrap();
        assert!(mem.unflushed_writes().is_empty());
        // The coherent configuration does not pay for flushes.
        let mut mem = FakeMemory::new(16);
        let pt = PageTable::new(&mut mem, cfg(PagingLevels::Three, false, true)).unwrap();
        map_rw(&pt, &mem, &mut g, 0, 0x10000, 0x3000);
        assert_eq!(mem.flush_calls(), 0);
    }

    #[test]
    fn snoop_bit_only_when_configured() {
        let mut mem = FakeMemory::new(16);
        let mut c = cfg(PagingLevels::Three, false, true);
        let pt = PageTable::new(&mut mem, c).unwrap();
        let mut g = Gather::new(0, 1);
        map_rw(&pt, &mem, &mut g, 0, 0x10000, 0x1000);
        assert_eq!(leaf_entry(&mem, &pt, 0) & pte::SNP, 0);
        c.snoop = true;
        let pt = PageTable::new(&mut mem, c).unwrap();
        map_rw(&pt, &mem, &mut g, 0, 0x10000, 0x1000);
        assert_eq!(
            leaf_entry(&mem, &pt, 0),
            0x10000 | pte::SNP | pte::R | pte::W
        );
    }

    impl PageTable {
        fn table_empty_for_test(&self, mem: &FakeMemory, t: PhysAddr) -> bool {
            table_empty(mem, t)
        }

        /// Every linked table page, root first, depth first.
        fn walk_tables(&self, mem: &FakeMemory) -> Vec<PhysAddr> {
            self.linked_tables(mem)
                .into_iter()
                .map(|(t, _, _)| t)
                .collect()
        }

        /// Every linked table page with its level and the base IOVA of its span.
        fn linked_tables(&self, mem: &FakeMemory) -> Vec<(PhysAddr, u8, u64)> {
            fn rec(
                mem: &FakeMemory,
                t: PhysAddr,
                level: u8,
                base: u64,
                out: &mut Vec<(PhysAddr, u8, u64)>,
            ) {
                out.push((t, level, base));
                if level == 1 {
                    return;
                }
                for i in 0..512u64 {
                    let e = mem.read_u64(t + i * 8);
                    if is_present(e) && !is_leaf(e, level) {
                        rec(
                            mem,
                            PhysAddr::new(e & pte::ADDR_MASK),
                            level - 1,
                            base + i * level_size(level),
                            out,
                        );
                    }
                }
            }
            let mut out = Vec::new();
            rec(mem, self.root(), self.cfg.levels.count(), 0, &mut out);
            out
        }
    }

    fn leaf_entry(mem: &FakeMemory, pt: &PageTable, iova: u64) -> u64 {
        pt.walk(mem, iova).0
    }

    /// Frees what the gather holds, as a completed flush would.
    fn flush(mem: &mut FakeMemory, g: &mut Gather) {
        let (_, tables) = g.take();
        for t in tables {
            mem.free_frame(t);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        /// Map/unmap against a page-granular model: translations agree, errors leave the
        /// tables unchanged, and every table page is either linked, pending in the gather,
        /// or free (no leak, no double use).
        #[test]
        fn matches_model(ops in proptest::collection::vec(op(), 1..40), four in any::<bool>(),
                         coherent in any::<bool>()) {
            let levels = if four { PagingLevels::Four } else { PagingLevels::Three };
            let (mut mem, pt, mut g) = table(4096, cfg(levels, true, coherent));
            let mut model = Model::new();
            let mut maps: Vec<(u64, u64)> = Vec::new();
            for op in ops {
                let op = op.resolve(&maps);
                let before = pt.linked_tables(&mem);
                let pending_before = g.pending_tables();
                match op {
                    Op::UnmapNth(_) => unreachable!(),
                    Op::Flush => flush(&mut mem, &mut g),
                    Op::Release => {
                        let n = pt.release_empty_tables(&mem, &mut g);
                        prop_assert_eq!(g.pending_tables(), pending_before + n);
                        for &t in &g.pending_table_list()[pending_before..] {
                            prop_assert!(pt.table_empty_for_test(&mem, t));
                        }
                        flush(&mut mem, &mut g);
                    }
                    Op::Map { page, pages, phys_page, write } => {
                        let access = if write { RW } else { Access::READ };
                        let r = pt.map(&mem, page * 4096, PhysAddr::new(phys_page * 4096), pages * 4096, access, &mut g);
                        let clash = (page..page + pages).any(|p| model.contains_key(&p));
                        prop_assert_eq!(r.is_ok(), !clash, "{:?}", r);
                        // A map, failed or not, never unlinks a table.
                        prop_assert_eq!(g.pending_tables(), pending_before);
                        if r.is_ok() {
                            for i in 0..pages {
                                model.insert(page + i, (phys_page + i, write));
                            }
                            maps.push((page, pages));
                        }
                    }
                    Op::Unmap { page, pages } => {
                        let r = pt.unmap(&mem, page * 4096, pages * 4096, &mut g);
                        match r {
                            Ok(()) => {
                                for p in page..page + pages {
                                    prop_assert!(model.remove(&p).is_some());
                                }
                                maps.retain(|&(p, n)| p + n <= page || p >= page + pages);
                                // Unlinked only tables whose whole span the range covered.
                                let (start, end) = (page * 4096, (page + pages) * 4096);
                                for &t in &g.pending_table_list()[pending_before..] {
                                    let &(_, level, base) = before
                                        .iter()
                                        .find(|x| x.0 == t)
                                        .expect("an unlinked table was linked");
                                    let span = level_size(level) * 512;
                                    prop_assert!(start <= base && base + span <= end,
                                        "table {:#x} (level {}, span {:#x}+{:#x}) unlinked by unmap {:#x}..{:#x}",
                                        t, level, base, span, start, end);
                                }
                            }
                            Err(Error::NotMapped { iova }) => {
                                prop_assert!(!model.contains_key(&(iova / 4096)));
                            }
                            Err(Error::PartialSuperpage { iova, size }) => {
                                let t = pt.translate(&mem, iova).unwrap();
                                prop_assert_eq!(t.page_size, size);
                            }
                            Err(e) => prop_assert!(false, "{:?}", e),
                        }
                    }
                }
                if !coherent {
                    prop_assert!(mem.unflushed_writes().is_empty());
                }
                // No linked table is a freed frame or one waiting in the gather, and the
                // accounting is exact.
                let linked = pt.linked_tables(&mem);
                for &(t, ..) in &linked {
                    prop_assert!(mem.is_live(t.as_u64()) && !mem.is_poisoned(t.as_u64()), "linked table {:#x} freed", t);
                    prop_assert!(!g.pending_table_list().contains(&t));
                }
                prop_assert_eq!(linked.len(), pt.table_pages());
                prop_assert_eq!(pt.table_pages() + g.pending_tables(), mem.live_frames());
            }
            translations_match(&model, 2048 + 600, 8, |va| pt.translate(&mem, va), |t, phys, write| {
                prop_assert_eq!(t.phys.as_u64(), phys);
                prop_assert_eq!(t.access.contains(Access::WRITE), write);
                Ok(())
            })?;
            prop_assert_eq!(pt.mapped_bytes(), model.len() as u64 * 4096);
            // Frame accounting: linked + pending == live.
            prop_assert_eq!(pt.table_pages() + g.pending_tables(), mem.live_frames());
            let (_, tables) = g.take();
            let mut seen: Vec<PhysAddr> = tables.clone();
            seen.sort_unstable();
            seen.dedup();
            prop_assert_eq!(seen.len(), tables.len());
            for t in tables { mem.free_frame(t); }
            pt.free_all(&mut mem);
            prop_assert_eq!(mem.live_frames(), 0);
        }
    }
}
