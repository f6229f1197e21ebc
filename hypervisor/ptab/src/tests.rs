//! Engine tests: each format against a page-granular model, and the table lifecycle.

use std::vec::Vec;

use proptest::prelude::*;

use super::format::*;
use super::ops::{op, translations_match, Model, Op};
use super::testing::ArenaMemory;
use super::*;

/// Per-format test attributes: a read-only and a writable leaf.
trait TestFormat: Format {
    /// The (read-only, writable) leaf attributes.
    fn attrs() -> (Self::Attr, Self::Attr);
    fn attr(write: bool) -> Self::Attr {
        let (ro, rw) = Self::attrs();
        if write {
            rw
        } else {
            ro
        }
    }
}
impl TestFormat for VtdSecondLevel {
    fn attrs() -> (VtdAttr, VtdAttr) {
        (VtdAttr::READ, VtdAttr::READ | VtdAttr::WRITE)
    }
}
impl TestFormat for X86 {
    fn attrs() -> (X86Flags, X86Flags) {
        (X86Flags::RO, X86Flags::RW)
    }
}
impl TestFormat for Npt {
    fn attrs() -> (NptFlags, NptFlags) {
        (
            NptFlags::PRESENT | NptFlags::USER | NptFlags::NO_EXECUTE,
            NptFlags::RAM,
        )
    }
}
impl TestFormat for Ept {
    fn attrs() -> (EptAttr, EptAttr) {
        (
            EptAttr {
                access: EptAccess::READ,
                mem_type: MemType::Uncacheable,
                ignore_pat: false,
            },
            EptAttr {
                access: EptAccess::all(),
                mem_type: MemType::WriteBack,
                ignore_pat: true,
            },
        )
    }
}

/// Collects what the engine hands over, as a VT-d gather does; with walkers, two callers'
/// walk caches, `turn` choosing whose the next call uses.
#[derive(Default, Debug)]
struct Pending {
    tables: Vec<PhysAddr>,
    inval: Vec<Range<u64>>,
    walkers: Option<[Walker; 2]>,
    turn: usize,
}
impl Sink for Pending {
    fn table_unlinked(&mut self, t: PhysAddr) {
        self.tables.push(t);
    }
    fn invalidate(&mut self, r: Range<u64>) {
        self.inval.push(r);
    }
    fn walker(&mut self) -> Option<&mut Walker> {
        let turn = self.turn;
        self.walkers.as_mut().map(|w| &mut w[turn])
    }
}

fn cfg(levels: u8, sp: bool, coherent: bool) -> Config {
    Config {
        levels,
        va_bits: 12 + 9 * levels as u32,
        pa_bits: 52,
        superpages: if sp { 0b1100 } else { 0 },
        coherent,
    }
}

/// Every linked table: (address, level, base of its span).
fn linked<F: Format>(pt: &PageTable<F>, mem: &ArenaMemory) -> Vec<(PhysAddr, u8, u64)> {
    let mut out = alloc_vec();
    out.push((pt.root(), pt.config().levels, 0));
    pt.visit(mem, |va, level, e| {
        if !is_leaf(e, level) {
            out.push((PhysAddr::new(e & ADDR_MASK), level - 1, va));
        }
    });
    out
}

/// Tables of `levels` levels in format `F` (superpages on, coherent) over 64 frames.
fn tables<F: Format>(levels: u8) -> (ArenaMemory, PageTable<F>) {
    let mem = ArenaMemory::new(64);
    let pt = PageTable::new(&mem, cfg(levels, true, true)).unwrap();
    (mem, pt)
}

/// Frees the tables: nothing of the arena stays allocated.
fn free_all<F: Format>(pt: PageTable<F>, mem: &ArenaMemory) {
    pt.free_all(mem);
    assert_eq!(mem.live_frames(), 0);
}

fn alloc_vec<T>() -> Vec<T> {
    Vec::new()
}

#[test]
fn map_translate_unmap_and_superpages() {
    let (mem, pt) = tables::<VtdSecondLevel>(3);
    let mut s = Pending::default();
    let rw = VtdAttr::READ | VtdAttr::WRITE;
    pt.map(
        &mem,
        0x20_0000,
        PhysAddr::new(0x4000_0000),
        0x40_0000,
        rw,
        &mut s,
    )
    .unwrap();
    // Two 2 MiB leaves in one level-2 table: root + 1.
    assert_eq!(pt.table_pages(), 2);
    let t = pt.translate(&mem, 0x30_1234).unwrap();
    assert_eq!(t.phys.as_u64(), 0x4010_1234);
    assert_eq!(t.page_size, 2 << 20);
    assert_eq!(
        pt.unmap(&mem, 0x20_0000, 0x1000, &mut s),
        Err(Error::PartialSuperpage {
            va: 0x20_0000,
            size: 2 << 20
        })
    );
    assert_eq!(
        pt.map(&mem, 0x40_0000, PhysAddr::new(0), 0x1000, rw, &mut s),
        Err(Error::AlreadyMapped { va: 0x40_0000 })
    );
    assert_eq!(
        pt.map(&mem, 0, PhysAddr::new(0), 0x1000, VtdAttr::SNOOP, &mut s),
        Err(Error::NoAccess)
    );
    pt.unmap(&mem, 0x20_0000, 0x40_0000, &mut s).unwrap();
    assert!(s.tables.is_empty());
    free_all(pt, &mem);
}

#[test]
fn superpage_not_over_a_kept_table() {
    let (mem, pt) = tables::<Npt>(4);
    let mut s = Pending::default();
    pt.map(
        &mem,
        0x1000,
        PhysAddr::new(0x1000),
        0x1000,
        NptFlags::RAM,
        &mut s,
    )
    .unwrap();
    pt.unmap(&mem, 0x1000, 0x1000, &mut s).unwrap();
    // The emptied level-1 table stays linked; a 2 MiB map there goes into it as 4 KiB pages.
    pt.map(
        &mem,
        0,
        PhysAddr::new(0x20_0000),
        0x20_0000,
        NptFlags::RAM,
        &mut s,
    )
    .unwrap();
    assert_eq!(pt.translate(&mem, 0x1000).unwrap().page_size, 4096);
    assert_eq!(pt.table_pages(), 4);
    // An unmap covering the level-1 table's span unlinks it; a release then unlinks the
    // two emptied tables above it.
    pt.unmap(&mem, 0, 0x20_0000, &mut s).unwrap();
    assert_eq!(s.tables.len(), 1);
    assert_eq!(pt.release_empty_tables(&mem, &mut s), 2);
    assert_eq!(s.inval.len(), 2);
    assert_eq!(pt.table_pages(), 1);
    for t in s.tables {
        mem.free_table(t);
    }
    free_all(pt, &mem);
}

#[test]
fn remap_splits_and_clears() {
    let (mem, pt) = tables::<X86>(4);
    pt.remap(&mem, 0, PhysAddr::new(0), 0x40_0000, Some(X86Flags::RW))
        .unwrap();
    assert_eq!(pt.translate(&mem, 0x1000).unwrap().page_size, 2 << 20);
    // Code page inside the first 2 MiB page: split, attributes kept around it.
    pt.remap(
        &mem,
        0x5000,
        PhysAddr::new(0x5000),
        0x1000,
        Some(X86Flags::RX),
    )
    .unwrap();
    let t = pt.translate(&mem, 0x5000).unwrap();
    assert_eq!((t.attr, t.page_size), (X86Flags::RX, 4096));
    assert_eq!(pt.translate(&mem, 0x6000).unwrap().attr, X86Flags::RW);
    assert_eq!(pt.translate(&mem, 0x6000).unwrap().phys.as_u64(), 0x6000);
    // Clearing page 0, and a range not mapped at all.
    pt.remap(&mem, 0, PhysAddr::new(0), 0x1000, None).unwrap();
    pt.remap(&mem, 1 << 40, PhysAddr::new(0), 0x40_0000, None)
        .unwrap();
    assert!(pt.translate(&mem, 0).is_none());
    assert!(pt.translate(&mem, 0x1000).is_some());
    // The second 2 MiB page is untouched.
    assert_eq!(pt.translate(&mem, 0x20_0000).unwrap().page_size, 2 << 20);
    free_all(pt, &mem);
}

#[test]
fn non_coherent_flushes_every_write() {
    let mem = ArenaMemory::with_dirty_tracking(64, true);
    let pt = PageTable::<VtdSecondLevel>::new(&mem, cfg(3, true, false)).unwrap();
    let mut s = Pending::default();
    pt.map(
        &mem,
        0,
        PhysAddr::new(0x1_0000),
        0x3000,
        VtdAttr::READ,
        &mut s,
    )
    .unwrap();
    assert!(mem.unflushed().is_empty(), "{:x?}", mem.unflushed());
    pt.unmap(&mem, 0x1000, 0x1000, &mut s).unwrap();
    assert!(mem.unflushed().is_empty());
    pt.remap(&mem, 0, PhysAddr::new(0), 0x20_0000, Some(VtdAttr::WRITE))
        .unwrap();
    assert!(mem.unflushed().is_empty());
}

/// Tables with a walker, non-coherent (every write tracked until flushed; the memory then
/// lends no table, so the engine goes entry by entry) or coherent (tables lent, slices).
fn walker_tables(non_coherent: bool) -> (ArenaMemory, PageTable<VtdSecondLevel>, Pending) {
    let mem = ArenaMemory::with_dirty_tracking(64, non_coherent);
    let pt = PageTable::<VtdSecondLevel>::new(&mem, cfg(3, true, !non_coherent)).unwrap();
    let s = Pending {
        walkers: Some([Walker::default(); 2]),
        ..Pending::default()
    };
    (mem, pt, s)
}

/// The walker's one-pass fill of its cached leaf table: a taken slot (first, in the middle,
/// last) met on the way undoes the leaves written before it (reported for invalidation,
/// flushed for a non-coherent walk), and the call fails with nothing changed; a free run is
/// written and flushed as one range.
#[test]
fn cached_fill_undoes_a_partial_run() {
    for non_coherent in [true, false] {
        // The taken page first, in the middle, second of a pair, last (odd one out).
        for taken in [0x1000, 0x3000, 0x4000, 0x5000] {
            cached_fill_undoes_a_partial_run_in(non_coherent, taken);
        }
    }
}

fn cached_fill_undoes_a_partial_run_in(non_coherent: bool, taken: u64) {
    let (mem, pt, mut s) = walker_tables(non_coherent);
    let rw = VtdAttr::READ | VtdAttr::WRITE;
    pt.map(&mem, taken, PhysAddr::new(0x9000), 0x1000, rw, &mut s)
        .unwrap();
    s.inval.clear();
    // Pages 1 to 5, one of them taken: the cached table is tried first.
    let e = pt.map(&mem, 0x1000, PhysAddr::new(0x50_0000), 0x5000, rw, &mut s);
    assert_eq!(e, Err(Error::AlreadyMapped { va: taken }));
    for va in (0x1000..0x6000).step_by(0x1000).filter(|&va| va != taken) {
        assert!(pt.translate(&mem, va).is_none(), "{va:#x} left mapped");
    }
    assert_eq!(
        pt.translate(&mem, taken).unwrap().phys,
        PhysAddr::new(0x9000)
    );
    // What was written before the taken page and cleared again is to be invalidated.
    assert!(
        taken == 0x1000 || s.inval.iter().any(|r| r.start <= 0x1000 && r.end >= taken),
        "{:x?}",
        s.inval
    );
    assert!(mem.unflushed().is_empty(), "{:x?}", mem.unflushed());
    // Five free pages (pairs and an odd one), written and cleared.
    pt.map(&mem, 0x6000, PhysAddr::new(0x50_0000), 0x5000, rw, &mut s)
        .unwrap();
    assert_eq!(
        pt.translate(&mem, 0xA000).unwrap().phys,
        PhysAddr::new(0x50_4000)
    );
    assert!(mem.unflushed().is_empty(), "{:x?}", mem.unflushed());
    pt.unmap(&mem, 0x6000, 0x5000, &mut s).unwrap();
    for va in (0x6000..0xB000).step_by(0x1000) {
        assert!(pt.translate(&mem, va).is_none(), "{va:#x} left mapped");
    }
    assert!(mem.unflushed().is_empty(), "{:x?}", mem.unflushed());
}

/// The walker's one-pass clear of its cached leaf table checks every page first: a range
/// with a hole (first, middle or last page) is refused with nothing cleared, by either path.
#[test]
fn cached_clear_refuses_a_range_with_a_hole() {
    let rw = VtdAttr::READ | VtdAttr::WRITE;
    for non_coherent in [true, false] {
        for hole in [0x1000u64, 0x3000, 0x5000] {
            let (mem, pt, mut s) = walker_tables(non_coherent);
            for va in (0x1000..0x6000).step_by(0x1000).filter(|&va| va != hole) {
                pt.map(&mem, va, PhysAddr::new(va + 0x10_0000), 0x1000, rw, &mut s)
                    .unwrap();
            }
            let e = pt.unmap(&mem, 0x1000, 0x5000, &mut s);
            assert_eq!(e, Err(Error::NotMapped { va: hole }), "hole {hole:#x}");
            for va in (0x1000..0x6000).step_by(0x1000).filter(|&va| va != hole) {
                assert!(pt.translate(&mem, va).is_some(), "{va:#x} cleared");
            }
            assert!(mem.unflushed().is_empty(), "{:x?}", mem.unflushed());
        }
    }
}

fn flush(mem: &ArenaMemory, s: &mut Pending) {
    for t in s.tables.drain(..) {
        mem.free_table(t);
    }
    s.inval.clear();
}

/// Map/unmap/release of format `F` against a page-granular model; with `walkers`, the calls
/// alternate (in runs of three) between two callers' walk caches, so cached tables outlive
/// the other caller's unlinks, releases and the flushes that free them (a stale one would
/// be written in a freed frame, which the arena refuses, or miss the model).
fn run_model<F: TestFormat>(
    ops: Vec<Op>,
    levels: u8,
    superpages: bool,
    coherent: bool,
) -> Result<(), TestCaseError> {
    run_model_with::<F>(ops, levels, superpages, coherent, false)
}

fn run_model_with<F: TestFormat>(
    ops: Vec<Op>,
    levels: u8,
    superpages: bool,
    coherent: bool,
    walkers: bool,
) -> Result<(), TestCaseError> {
    let mem = ArenaMemory::with_dirty_tracking(4096, !coherent);
    let pt = PageTable::<F>::new(&mem, cfg(levels, superpages, coherent)).unwrap();
    let mut s = Pending {
        walkers: walkers.then(Default::default),
        ..Pending::default()
    };
    let mut model = Model::new();
    let mut maps: Vec<(u64, u64)> = Vec::new();
    for (i, op) in ops.into_iter().enumerate() {
        s.turn = i / 3 % 2;
        let op = op.resolve(&maps);
        let before = linked(&pt, &mem);
        let pending_before = s.tables.len();
        match op {
            Op::UnmapNth(_) => unreachable!(),
            Op::Flush => flush(&mem, &mut s),
            Op::Release => {
                let n = pt.release_empty_tables(&mem, &mut s);
                prop_assert_eq!(s.tables.len(), pending_before + n);
                flush(&mem, &mut s);
            }
            Op::Map {
                page,
                pages,
                phys_page,
                write,
            } => {
                let r = pt.map(
                    &mem,
                    page * 4096,
                    PhysAddr::new(phys_page * 4096),
                    pages * 4096,
                    F::attr(write),
                    &mut s,
                );
                let clash = (page..page + pages).any(|p| model.contains_key(&p));
                prop_assert_eq!(r.is_ok(), !clash, "{:?}", r);
                prop_assert_eq!(s.tables.len(), pending_before);
                if r.is_ok() {
                    for i in 0..pages {
                        model.insert(page + i, (phys_page + i, write));
                    }
                    maps.push((page, pages));
                }
            }
            Op::Unmap { page, pages } => match pt.unmap(&mem, page * 4096, pages * 4096, &mut s) {
                Ok(()) => {
                    for p in page..page + pages {
                        prop_assert!(model.remove(&p).is_some());
                    }
                    maps.retain(|&(p, n)| p + n <= page || p >= page + pages);
                    let (start, end) = (page * 4096, (page + pages) * 4096);
                    for &t in &s.tables[pending_before..] {
                        let &(_, level, base) = before.iter().find(|x| x.0 == t).unwrap();
                        let span = level_size(level) * 512;
                        prop_assert!(start <= base && base + span <= end);
                    }
                }
                Err(Error::NotMapped { va }) => {
                    prop_assert!(!model.contains_key(&(va / 4096)))
                }
                Err(Error::PartialSuperpage { va, size }) => {
                    prop_assert_eq!(pt.translate(&mem, va).unwrap().page_size, size);
                }
                Err(e) => prop_assert!(false, "{:?}", e),
            },
        }
        if !coherent {
            prop_assert!(mem.unflushed().is_empty());
        }
        let now = linked(&pt, &mem);
        for &(t, ..) in &now {
            prop_assert!(mem.is_live(t));
            prop_assert!(!s.tables.contains(&t));
        }
        prop_assert_eq!(now.len(), pt.table_pages());
        prop_assert_eq!(pt.table_pages() + s.tables.len(), mem.live_frames());
    }
    let translate = |va| pt.translate(&mem, va);
    translations_match(&model, 2048 + 600, 8, translate, |t, phys, write| {
        prop_assert_eq!(t.phys.as_u64(), phys);
        prop_assert_eq!(t.attr, F::attr(write));
        if !superpages {
            prop_assert_eq!(t.page_size, 4096);
        }
        Ok(())
    })?;
    if let Some(w) = s.walkers.as_mut() {
        for w in w {
            pt.settle(w);
        }
    }
    prop_assert_eq!(pt.mapped_bytes(), model.len() as u64 * 4096);
    let mut seen = s.tables.clone();
    seen.sort_unstable();
    seen.dedup();
    prop_assert_eq!(seen.len(), s.tables.len());
    flush(&mem, &mut s);
    pt.free_all(&mem);
    prop_assert_eq!(mem.live_frames(), 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn vtd_matches_model(ops in proptest::collection::vec(op(), 1..40), four in any::<bool>(),
                         sp in any::<bool>(), coherent in any::<bool>()) {
        run_model::<VtdSecondLevel>(ops, if four { 4 } else { 3 }, sp, coherent)?;
    }
    #[test]
    fn vtd_with_walkers_matches_model(ops in proptest::collection::vec(op(), 1..60), four in any::<bool>(),
                         sp in any::<bool>(), coherent in any::<bool>()) {
        run_model_with::<VtdSecondLevel>(ops, if four { 4 } else { 3 }, sp, coherent, true)?;
    }
    #[test]
    fn npt_matches_model(ops in proptest::collection::vec(op(), 1..40), sp in any::<bool>()) {
        run_model::<Npt>(ops, 4, sp, true)?;
    }
    #[test]
    fn ept_matches_model(ops in proptest::collection::vec(op(), 1..40), sp in any::<bool>()) {
        run_model::<Ept>(ops, 4, sp, true)?;
    }
    #[test]
    fn x86_matches_model(ops in proptest::collection::vec(op(), 1..40), sp in any::<bool>()) {
        run_model::<X86>(ops, 4, sp, true)?;
    }

    /// `remap` (replace semantics, splitting superpages) against a model: the translation of
    /// every page is the last remap's, and no table leaks.
    #[test]
    fn remap_matches_model(ops in proptest::collection::vec(
        (0u64..2048, 1u64..700, 0u64..4096, 0u8..3), 1..30)) {
        let mem = ArenaMemory::new(4096);
        let pt = PageTable::<X86>::new(&mem, cfg(4, true, true)).unwrap();
        let mut model = Model::new();
        for (page, pages, phys_page, kind) in ops {
            let page = if page % 3 == 0 { page & !511 } else { page };
            let phys_page = if page % 512 == 0 { phys_page & !511 } else { phys_page };
            let attr = match kind { 0 => None, k => Some(X86::attr(k == 2)) };
            pt.remap(&mem, page * 4096, PhysAddr::new(phys_page * 4096), pages * 4096, attr).unwrap();
            for i in 0..pages {
                match kind {
                    0 => { model.remove(&(page + i)); }
                    k => { model.insert(page + i, (phys_page + i, k == 2)); }
                }
            }
            prop_assert_eq!(linked(&pt, &mem).len(), mem.live_frames());
        }
        translations_match(&model, 2048 + 700, 0, |va| pt.translate(&mem, va), |t, phys, w| {
            prop_assert_eq!(t.phys.as_u64(), phys);
            prop_assert_eq!(t.attr, X86::attr(w));
            Ok(())
        })?;
        pt.free_all(&mem);
        prop_assert_eq!(mem.live_frames(), 0);
    }
}

/// Maps of disjoint ranges from several threads race to link the same tables: every map
/// lands, the losers' pages are freed, and the accounting is exact.
#[test]
fn concurrent_table_installation() {
    let mut lost = 0;
    for round in 0..40u64 {
        let mem = ArenaMemory::new(4096);
        mem.yield_in_alloc
            .store(round % 2 == 0, core::sync::atomic::Ordering::Relaxed);
        let pt = PageTable::<Ept>::new(&mem, cfg(4, false, true)).unwrap();
        const THREADS: u64 = 4;
        const PAGES: u64 = 64;
        let start = std::sync::Barrier::new(THREADS as usize);
        std::thread::scope(|sc| {
            for t in 0..THREADS {
                let (pt, mem, start) = (&pt, &mem, &start);
                sc.spawn(move || {
                    let mut s = Pending::default();
                    start.wait();
                    // Interleaved pages: every thread needs the same tables.
                    for i in 0..PAGES {
                        let page = i * THREADS + t;
                        // Spread over four 1 GiB regions so level-3 tables race too.
                        let va = (page % 4) << 30 | page << 12;
                        pt.map(
                            mem,
                            va,
                            PhysAddr::new(page << 12),
                            4096,
                            Ept::attr(true),
                            &mut s,
                        )
                        .unwrap();
                    }
                    assert!(s.tables.is_empty() && s.inval.is_empty());
                });
            }
        });
        for page in 0..THREADS * PAGES {
            let va = (page % 4) << 30 | page << 12;
            assert_eq!(pt.translate(&mem, va).unwrap().phys.as_u64(), page << 12);
        }
        assert_eq!(pt.table_pages(), linked(&pt, &mem).len());
        assert_eq!(pt.table_pages(), mem.live_frames());
        assert_eq!(pt.mapped_bytes(), THREADS * PAGES * 4096);
        // Pages allocated but not linked were the losers' (freed at once).
        lost += mem.allocs() - mem.live_frames();
        pt.free_all(&mem);
        assert_eq!(mem.live_frames(), 0);
    }
    // The races did happen (yielding inside the allocation makes them near certain).
    assert!(lost > 0, "no installation race was lost in 40 rounds");
}

/// Walkers on real threads, with ownership handed over as the IOVA allocator does: threads
/// take 64-page chunks of four 2 MiB spans from a pool, map and unmap pages of them through
/// their own walker, and now and then take all eight chunks of a span, map and unmap it
/// whole (unlinking its leaf table, which is freed before the chunks go back). The arena is
/// small, so freed tables are soon reused: a walker that used a table after its unlink would
/// write into a freed frame (the arena panics) or into another table (a translation check
/// fails).
#[test]
fn walkers_with_ownership_handover() {
    const SPANS: u64 = 4;
    let mem = ArenaMemory::new(16);
    let pt = PageTable::<VtdSecondLevel>::new(&mem, cfg(3, false, true)).unwrap();
    let rw = VtdAttr::READ | VtdAttr::WRITE;
    // Free chunks: (span, chunk).
    let pool = std::sync::Mutex::new(
        (0..SPANS)
            .flat_map(|s| (0..8).map(move |c| (s, c)))
            .collect::<Vec<_>>(),
    );
    let wholes = AtomicUsize::new(0);
    std::thread::scope(|sc| {
        for t in 0..4u64 {
            let (pt, mem, pool, wholes) = (&pt, &mem, &pool, &wholes);
            sc.spawn(move || {
                let mut s = Pending {
                    walkers: Some(Default::default()),
                    ..Pending::default()
                };
                let mut seed = 0x2545_F491_4F6C_DD1Du64 ^ (t + 1);
                let mut next = || {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed
                };
                for _ in 0..3000 {
                    let r = next();
                    if r % 16 == 0 {
                        // A whole span, if all of its chunks are free.
                        let span = next() % SPANS;
                        let taken = {
                            let mut p = pool.lock().unwrap();
                            let mine: Vec<_> = p.iter().filter(|c| c.0 == span).copied().collect();
                            if mine.len() < 8 {
                                continue;
                            }
                            p.retain(|c| c.0 != span);
                            mine
                        };
                        let va = span << 21;
                        pt.map(mem, va, PhysAddr::new(va), 1 << 21, rw, &mut s)
                            .unwrap();
                        assert_eq!(
                            pt.translate(mem, va + 0x1234).unwrap().phys.as_u64(),
                            va + 0x1234
                        );
                        pt.unmap(mem, va, 1 << 21, &mut s).unwrap();
                        assert!(pt.translate(mem, va).is_none());
                        flush(mem, &mut s);
                        wholes.fetch_add(1, Ordering::Relaxed);
                        pool.lock().unwrap().extend(taken);
                        continue;
                    }
                    let Some((span, chunk)) = ({
                        let mut p = pool.lock().unwrap();
                        let n = p.len();
                        (n > 0).then(|| p.swap_remove(r as usize % n))
                    }) else {
                        continue;
                    };
                    let base = span << 21 | chunk << 18;
                    // A few pages of the chunk, mapped and unmapped in pieces.
                    let pages = 1 + next() % 16;
                    let at = base + (next() % (64 - pages)) * 4096;
                    let phys = 0x8000_0000 + at;
                    pt.map(mem, at, PhysAddr::new(phys), pages * 4096, rw, &mut s)
                        .unwrap();
                    for i in 0..pages {
                        let tr = pt.translate(mem, at + i * 4096).unwrap();
                        assert_eq!(tr.phys.as_u64(), phys + i * 4096);
                    }
                    pt.unmap(mem, at, pages * 4096, &mut s).unwrap();
                    assert!(pt.translate(mem, at).is_none());
                    flush(mem, &mut s);
                    pool.lock().unwrap().push((span, chunk));
                }
                if let Some(w) = s.walkers.as_mut() {
                    for w in w {
                        pt.settle(w);
                    }
                }
            });
        }
    });
    assert!(
        wholes.load(Ordering::Relaxed) > 0,
        "no whole-span unmap happened"
    );
    assert_eq!(pt.mapped_bytes(), 0);
    let mut s = Pending::default();
    pt.release_empty_tables(&mem, &mut s);
    flush(&mem, &mut s);
    assert_eq!(pt.table_pages(), 1);
    pt.free_all(&mem);
    assert_eq!(mem.live_frames(), 0);
}
