//! Gathering unmaps (and caching-mode maps) into one flush.
//!
//! Every `unmap` adds its range and the page-table pages it emptied to a [`Gather`]. Nothing
//! is released while it sits there: the pages stay allocated and the IOVAs stay owned by the
//! domain until [`crate::Unit::flush`] has issued the invalidations and the wait descriptor
//! reported completion. [`Gather::plan`] turns the accumulated ranges into the fewest
//! page-selective invalidations (one naturally aligned block per merged range, nested blocks
//! folded, neighbours merged into their common aligned block while it stays within twice the
//! bytes requested), or one domain-selective invalidation when PSI is unsupported, a block
//! exceeds `CAP.MAMV`, or too many descriptors would be needed.

use alloc::vec::Vec;
use core::ops::Range;

use crate::hw::PhysAddr;

/// A naturally aligned block of `2^am` 4 KiB pages for a page-selective invalidation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PsiBlock {
    /// Base address, aligned to `4096 << am`.
    pub addr: u64,
    /// Address mask: log2 of the page count.
    pub am: u8,
}

impl PsiBlock {
    /// Size of the block in bytes.
    pub const fn size(self) -> u64 {
        4096u64 << self.am
    }
    /// End address (exclusive).
    pub const fn end(self) -> u64 {
        self.addr + self.size()
    }
}

/// The smallest naturally aligned power-of-two block of pages containing `[start, end)`.
///
/// `start < end` is required; the result always contains the range (it may be larger).
pub const fn psi_cover(start: u64, end: u64) -> PsiBlock {
    let first = start >> 12;
    let last = (end - 1) >> 12;
    let diff = first ^ last;
    let am = if diff == 0 {
        0
    } else {
        64 - diff.leading_zeros()
    };
    PsiBlock {
        addr: (first >> am << am) << 12,
        am: am as u8,
    }
}

/// What one flush must invalidate in the IOTLB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlushPlan {
    /// Nothing to invalidate.
    Nothing,
    /// One domain-selective invalidation.
    Domain,
    /// Page-selective invalidations, sorted and disjoint.
    Pages {
        /// The blocks.
        blocks: Vec<PsiBlock>,
        /// Invalidation hint: only leaf entries changed (no page-table page was freed and no
        /// entry went from not-present to present).
        ih: bool,
    },
}

/// A [`FlushPlan`] whose blocks are borrowed from the gather's own buffer
/// ([`Gather::plan_in_place`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanRef<'a> {
    /// Nothing to invalidate.
    Nothing,
    /// One domain-selective invalidation.
    Domain,
    /// Page-selective invalidations, sorted and disjoint.
    Pages {
        /// The blocks.
        blocks: &'a [PsiBlock],
        /// Invalidation hint, as in [`FlushPlan::Pages`].
        ih: bool,
    },
}

/// What [`plan_blocks`] found.
enum Planned {
    Nothing,
    Domain,
    /// The blocks are in its `out`.
    Pages,
}

/// Accumulates the effects of maps and unmaps on one domain until a flush.
#[derive(Debug)]
pub struct Gather {
    unit: u32,
    did: u16,
    inval: Vec<Range<u64>>,
    /// The planner's buffers, kept across flushes (a flush allocates nothing once they have
    /// grown): blocks with the bytes requested inside them, and the planned blocks.
    work: Vec<(PsiBlock, u64)>,
    blocks: Vec<PsiBlock>,
    unmapped: Vec<Range<u64>>,
    freed_tables: Vec<PhysAddr>,
    new_mappings: bool,
    invalidate_maps: bool,
    /// Whether `unmapped` lists the unmapped ranges (see [`Gather::without_range_list`]).
    list_unmapped: bool,
    /// The owner's cache of its last leaf table (see [`Gather::with_walk_cache`]).
    walker: Option<moat_ptab::Walker>,
}

/// Appends `r` to `v`, merging with the last range when they touch or overlap.
#[inline]
fn push_merged(v: &mut Vec<Range<u64>>, r: Range<u64>) {
    if let Some(last) = v.last_mut()
        && r.start <= last.end
        && last.start <= r.end
    {
        last.start = last.start.min(r.start);
        last.end = last.end.max(r.end);
        return;
    }
    v.push(r);
}

/// Sorts and merges touching or overlapping ranges, in place (allocates nothing).
pub(crate) fn merge_ranges(v: &mut Vec<Range<u64>>) {
    v.sort_unstable_by_key(|r| r.start);
    let mut kept = 0usize;
    for i in 0..v.len() {
        let r = v[i].clone();
        // Sorted by start: `r` touches the last kept range when it starts at or before its end.
        match kept.checked_sub(1).map(|k| &mut v[k]) {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => {
                v[kept] = r;
                kept += 1;
            }
        }
    }
    v.truncate(kept);
}

/// Plans the page-selective blocks covering `ranges` (sorted and merged here, in place) into
/// `out`, with `work` as scratch (both cleared first): see [`Gather::plan`].
fn plan_blocks(
    ranges: &mut Vec<Range<u64>>,
    (psi, mamv, max_blocks): (bool, u8, usize),
    work: &mut Vec<(PsiBlock, u64)>,
    out: &mut Vec<PsiBlock>,
) -> Planned {
    if ranges.is_empty() {
        return Planned::Nothing;
    }
    if !psi || max_blocks == 0 {
        return Planned::Domain;
    }
    merge_ranges(ranges);
    // (block, bytes actually requested inside it)
    work.clear();
    for r in ranges.iter() {
        let b = psi_cover(r.start, r.end);
        if b.am > mamv {
            return Planned::Domain;
        }
        work.push((b, r.end - r.start));
    }
    // Aligned blocks either nest or are disjoint: sort by address (bigger first on ties),
    // fold blocks inside the previous kept one into it, and merge neighbours into their
    // common aligned cover while that cover is at most twice the bytes really requested
    // (exact buddies always qualify; far-apart pages never do). The kept blocks are a prefix
    // of `work` (never longer than what was read so far).
    work.sort_unstable_by(|a, b| a.0.addr.cmp(&b.0.addr).then(b.0.am.cmp(&a.0.am)));
    let mut kept = 0;
    for i in 0..work.len() {
        let (b, w) = work[i];
        if kept > 0 && b.addr < work[kept - 1].0.end() {
            work[kept - 1].1 += w;
            continue;
        }
        work[kept] = (b, w);
        kept += 1;
        while kept >= 2 {
            let ((a, wa), (b, wb)) = (work[kept - 2], work[kept - 1]);
            let cover = psi_cover(a.addr, b.end());
            if cover.am > mamv || cover.size() > 2u64.saturating_mul(wa + wb) {
                break;
            }
            // A cover reaching below `a` and containing earlier blocks merges with them
            // in the next rounds: their cover is itself, within the same bound.
            kept -= 1;
            work[kept - 1] = (cover, wa + wb);
        }
    }
    if kept > max_blocks {
        return Planned::Domain;
    }
    out.clear();
    out.extend(work[..kept].iter().map(|&(b, _)| b));
    Planned::Pages
}

impl Gather {
    /// An empty gather for the domain with id `did` on the unit with id `unit_id`
    /// (usually obtained from [`crate::Domain::gather`]).
    pub fn new(unit_id: u32, did: u16) -> Self {
        Self {
            unit: unit_id,
            did,
            inval: Vec::new(),
            work: Vec::new(),
            blocks: Vec::new(),
            unmapped: Vec::new(),
            freed_tables: Vec::new(),
            new_mappings: false,
            invalidate_maps: false,
            list_unmapped: true,
            walker: None,
        }
    }

    /// This gather with a walk cache (`moat_ptab`'s "Walkers"): the domain's maps and unmaps
    /// through it keep the leaf table they used, so a batch in one table's span walks the
    /// tables once, and keep their mapped-bytes count here until they walk again (the
    /// domain's shared count is then updated once per walk, not per call). One gather per
    /// owner of IOVA ranges, as always.
    pub fn with_walk_cache(mut self) -> Self {
        self.walker = Some(moat_ptab::Walker::default());
        self
    }

    /// This gather without the list of unmapped ranges: [`Self::unmapped`] and the flush's
    /// `unmapped` stay empty. For callers that keep their own records of what they unmapped,
    /// so that gathering a batch's unmaps allocates nothing once the invalidation list has
    /// grown (it keeps its capacity across flushes).
    pub fn without_range_list(mut self) -> Self {
        self.list_unmapped = false;
        self
    }

    /// Id of the unit whose domain this gather belongs to.
    pub fn unit_id(&self) -> u32 {
        self.unit
    }

    /// Domain id this gather belongs to.
    pub fn domain_id(&self) -> u16 {
        self.did
    }

    /// True when a flush would do nothing.
    pub fn is_empty(&self) -> bool {
        self.inval.is_empty() && self.freed_tables.is_empty() && !self.new_mappings
    }

    /// Unmapped IOVA ranges waiting for the flush, exactly as passed to each successful
    /// unmap (not merged, so an IOVA allocator can free each allocation as it made it).
    pub fn unmapped(&self) -> &[Range<u64>] {
        &self.unmapped
    }

    /// Number of page-table pages waiting to be freed after the flush.
    pub fn pending_tables(&self) -> usize {
        self.freed_tables.len()
    }

    /// The page-table pages waiting to be freed, in the order they were unlinked.
    #[cfg(test)]
    pub(crate) fn pending_table_list(&self) -> &[PhysAddr] {
        &self.freed_tables
    }

    /// True when a map added entries since the last flush (for `CAP.RWBF`).
    pub fn has_new_mappings(&self) -> bool {
        self.new_mappings
    }

    #[inline]
    pub(crate) fn add_unmapped(&mut self, r: Range<u64>) {
        if self.list_unmapped {
            self.unmapped.push(r.clone());
        }
        push_merged(&mut self.inval, r);
    }

    /// Records a range to invalidate that is not released to the caller (rollback of a
    /// failed map, pruned tables).
    pub(crate) fn add_invalidation(&mut self, r: Range<u64>) {
        push_merged(&mut self.inval, r);
    }

    /// Records a map; with caching mode the range must be invalidated too.
    #[inline]
    pub(crate) fn add_mapped(&mut self, r: Range<u64>, caching_mode: bool) {
        self.new_mappings = true;
        if caching_mode {
            self.invalidate_maps = true;
            push_merged(&mut self.inval, r);
        }
    }

    pub(crate) fn add_freed_table(&mut self, table: PhysAddr) {
        self.freed_tables.push(table);
    }

    /// Plans the IOTLB invalidation for this gather.
    ///
    /// `psi` is `CAP.PSI`, `mamv` is `CAP.MAMV`, `max_blocks` is the most page-selective
    /// descriptors one flush may use before a single domain-selective one is cheaper.
    pub fn plan(&self, psi: bool, mamv: u8, max_blocks: usize) -> FlushPlan {
        let (mut ranges, mut blocks) = (self.inval.clone(), Vec::new());
        let planned = plan_blocks(
            &mut ranges,
            (psi, mamv, max_blocks),
            &mut Vec::new(),
            &mut blocks,
        );
        match planned {
            Planned::Nothing => FlushPlan::Nothing,
            Planned::Domain => FlushPlan::Domain,
            Planned::Pages => FlushPlan::Pages {
                blocks,
                ih: self.leaf_only(),
            },
        }
    }

    /// As [`Self::plan`], without allocating once the gather's buffers have grown: the
    /// pending ranges are sorted and merged in place (the same ranges), the blocks are lent
    /// from the gather.
    pub fn plan_in_place(&mut self, psi: bool, mamv: u8, max_blocks: usize) -> PlanRef<'_> {
        let params = (psi, mamv, max_blocks);
        match plan_blocks(&mut self.inval, params, &mut self.work, &mut self.blocks) {
            Planned::Nothing => PlanRef::Nothing,
            Planned::Domain => PlanRef::Domain,
            Planned::Pages => PlanRef::Pages {
                ih: self.leaf_only(),
                blocks: &self.blocks,
            },
        }
    }

    /// The invalidation hint: only leaf entries changed (no page-table page was freed and no
    /// entry went from not-present to present).
    fn leaf_only(&self) -> bool {
        self.freed_tables.is_empty() && !self.invalidate_maps
    }

    /// Empties the gather, returning the unmapped ranges and the page-table pages to free.
    pub(crate) fn take(&mut self) -> (Vec<Range<u64>>, Vec<PhysAddr>) {
        self.inval.clear();
        self.new_mappings = false;
        self.invalidate_maps = false;
        (
            core::mem::take(&mut self.unmapped),
            core::mem::take(&mut self.freed_tables),
        )
    }
}

/// The page-table engine hands what an unmap or release unlinks to the gather: the table
/// pages wait for the flush, the ranges are invalidated by it.
impl moat_ptab::Sink for Gather {
    fn table_unlinked(&mut self, table: PhysAddr) {
        self.add_freed_table(table);
    }
    fn invalidate(&mut self, range: Range<u64>) {
        self.add_invalidation(range);
    }
    fn walker(&mut self) -> Option<&mut moat_ptab::Walker> {
        self.walker.as_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use proptest::prelude::*;

    #[test]
    fn cover_of_single_and_crossing_ranges() {
        assert_eq!(
            psi_cover(0x5000, 0x6000),
            PsiBlock {
                addr: 0x5000,
                am: 0
            }
        );
        assert_eq!(
            psi_cover(0x4000, 0x8000),
            PsiBlock {
                addr: 0x4000,
                am: 2
            }
        );
        // Two pages across a 2 MiB boundary need the 4 MiB block around them.
        assert_eq!(
            psi_cover(0x1f_f000, 0x20_1000),
            PsiBlock { addr: 0, am: 10 }
        );
        assert_eq!(
            psi_cover(0x20_0000, 0x40_0000),
            PsiBlock {
                addr: 0x20_0000,
                am: 9
            }
        );
        assert_eq!(
            psi_cover(0x5000, 0x7000),
            PsiBlock {
                addr: 0x4000,
                am: 2
            }
        );
    }

    #[test]
    fn without_range_list_plans_the_same_and_lists_nothing() {
        let mut a = Gather::new(0, 3);
        let mut b = Gather::new(0, 3).without_range_list();
        for p in [9u64, 1, 2, 700, 3] {
            a.add_unmapped(p * 4096..(p + 1) * 4096);
            b.add_unmapped(p * 4096..(p + 1) * 4096);
        }
        assert_eq!(a.plan(true, 18, 16), b.plan(true, 18, 16));
        assert_eq!(a.unmapped().len(), 5);
        assert!(b.unmapped().is_empty());
        assert!(!b.is_empty());
        let (ranges, _) = b.take();
        assert!(ranges.is_empty());
        assert!(b.is_empty());
    }

    #[test]
    fn plan_coalesces_adjacent_and_buddies() {
        let mut g = Gather::new(0, 3);
        for p in [0u64, 1, 2, 3, 5, 4, 6, 7] {
            g.add_unmapped(p * 4096..(p + 1) * 4096);
        }
        assert_eq!(
            g.plan(true, 18, 16),
            FlushPlan::Pages {
                blocks: vec![PsiBlock { addr: 0, am: 3 }],
                ih: true
            }
        );
        // Two separate buddies that are not adjacent in insertion order.
        let mut g = Gather::new(0, 3);
        g.add_unmapped(0x2000..0x3000);
        g.add_unmapped(0x10_0000..0x10_1000);
        g.add_unmapped(0x3000..0x4000);
        assert_eq!(
            g.plan(true, 18, 16),
            FlushPlan::Pages {
                blocks: vec![
                    PsiBlock {
                        addr: 0x2000,
                        am: 1
                    },
                    PsiBlock {
                        addr: 0x10_0000,
                        am: 0
                    }
                ],
                ih: true
            }
        );
    }

    #[test]
    fn plan_merges_near_neighbours_but_not_far_ones() {
        let blocks = |pages: &[u64]| {
            let mut g = Gather::new(0, 1);
            for p in pages {
                g.add_unmapped(p * 4096..(p + 1) * 4096);
            }
            match g.plan(true, 18, 64) {
                FlushPlan::Pages { blocks, .. } => blocks,
                p => panic!("{p:?}"),
            }
        };
        // Pages 0 and 2: one 4-page block (twice the requested bytes).
        assert_eq!(blocks(&[0, 2]), vec![PsiBlock { addr: 0, am: 2 }]);
        // Every other page of 16: one 64 KiB block for 8 requested pages.
        assert_eq!(
            blocks(&[0, 2, 4, 6, 8, 10, 12, 14]),
            vec![PsiBlock { addr: 0, am: 4 }]
        );
        // Far apart: kept separate.
        assert_eq!(
            blocks(&[0, 100]),
            vec![
                PsiBlock { addr: 0, am: 0 },
                PsiBlock {
                    addr: 100 * 4096,
                    am: 0
                }
            ]
        );
        // A merge whose cover reaches below an earlier block takes that block in too.
        assert_eq!(
            blocks(&[0, 5, 8, 9, 10, 11, 12, 13, 14, 15]),
            vec![PsiBlock { addr: 0, am: 4 }]
        );
    }

    #[test]
    fn plan_falls_back_to_domain() {
        let mut g = Gather::new(0, 1);
        assert_eq!(g.plan(true, 18, 16), FlushPlan::Nothing);
        g.add_unmapped(0..0x1000);
        assert_eq!(g.plan(false, 18, 16), FlushPlan::Domain);
        // 2 GiB exceeds MAMV 18 (1 GiB).
        let mut g = Gather::new(0, 1);
        g.add_unmapped(0..0x8000_0000);
        assert_eq!(g.plan(true, 18, 16), FlushPlan::Domain);
        // Exactly 1 GiB fits.
        let mut g = Gather::new(0, 1);
        g.add_unmapped(0x4000_0000..0x8000_0000);
        assert_eq!(
            g.plan(true, 18, 16),
            FlushPlan::Pages {
                blocks: vec![PsiBlock {
                    addr: 0x4000_0000,
                    am: 18
                }],
                ih: true
            }
        );
        // Too many scattered blocks.
        let mut g = Gather::new(0, 1);
        for i in 0..5u64 {
            g.add_unmapped(i * 0x10_0000..i * 0x10_0000 + 0x1000);
        }
        assert_eq!(g.plan(true, 18, 4), FlushPlan::Domain);
        assert!(matches!(g.plan(true, 18, 5), FlushPlan::Pages { .. }));
    }

    #[test]
    fn hint_cleared_when_tables_freed_or_caching_mode_maps() {
        let mut g = Gather::new(0, 1);
        g.add_unmapped(0..0x1000);
        g.add_freed_table(PhysAddr::new(0x9000));
        assert!(matches!(
            g.plan(true, 18, 8),
            FlushPlan::Pages { ih: false, .. }
        ));
        let mut g = Gather::new(0, 1);
        g.add_mapped(0..0x1000, false);
        assert_eq!(g.plan(true, 18, 8), FlushPlan::Nothing);
        assert!(!g.is_empty());
        g.add_mapped(0x1000..0x2000, true);
        assert!(matches!(
            g.plan(true, 18, 8),
            FlushPlan::Pages { ih: false, .. }
        ));
        let (unmapped, tables) = g.take();
        assert!(unmapped.is_empty() && tables.is_empty() && g.is_empty());
    }

    proptest! {
        /// Planning in place (the flush's way: ranges normalized in the gather, blocks lent)
        /// gives the plan of [`Gather::plan`], again and again as ranges keep coming, and
        /// leaves the same set of ranges to invalidate.
        #[test]
        fn plan_in_place_matches_plan(rounds in proptest::collection::vec(
                                          proptest::collection::vec((0u64..4096, 1u64..40), 0..12), 1..4),
                                      mamv in 0u8..20, max in 0usize..40, psi in any::<bool>()) {
            let mut g = Gather::new(0, 1);
            for pages in rounds {
                for (p, n) in pages {
                    g.add_unmapped(p * 4096..(p + n) * 4096);
                }
                let want = g.plan(psi, mamv, max);
                let pages_before: alloc::collections::BTreeSet<u64> =
                    g.inval.iter().flat_map(|r| r.start / 4096..r.end / 4096).collect();
                let got = match g.plan_in_place(psi, mamv, max) {
                    PlanRef::Nothing => FlushPlan::Nothing,
                    PlanRef::Domain => FlushPlan::Domain,
                    PlanRef::Pages { blocks, ih } => FlushPlan::Pages { blocks: blocks.to_vec(), ih },
                };
                prop_assert_eq!(got, want);
                let pages_after: alloc::collections::BTreeSet<u64> =
                    g.inval.iter().flat_map(|r| r.start / 4096..r.end / 4096).collect();
                prop_assert_eq!(pages_after, pages_before);
            }
        }

        /// The plan covers every gathered page, and the blocks are aligned, disjoint and
        /// within MAMV.
        #[test]
        fn plan_covers_every_page(pages in proptest::collection::vec((0u64..4096, 1u64..40), 1..20),
                                  mamv in 0u8..20, max in 1usize..40) {
            let mut g = Gather::new(0, 1);
            for (p, n) in &pages {
                g.add_unmapped(p * 4096..(p + n) * 4096);
            }
            match g.plan(true, mamv, max) {
                FlushPlan::Nothing => prop_assert!(false),
                FlushPlan::Domain => {}
                FlushPlan::Pages { blocks, .. } => {
                    prop_assert!(blocks.len() <= max);
                    for w in blocks.windows(2) {
                        prop_assert!(w[0].end() <= w[1].addr);
                    }
                    for b in &blocks {
                        prop_assert!(b.am <= mamv);
                        prop_assert_eq!(b.addr % b.size(), 0);
                    }
                    for (p, n) in &pages {
                        for q in *p..p + n {
                            let a = q * 4096;
                            prop_assert!(blocks.iter().any(|b| b.addr <= a && a < b.end()));
                        }
                    }
                }
            }
        }
    }
}
