//! Unit tests of the allocator as a whole.

extern crate std;

use super::*;
use std::collections::BTreeSet;
use std::vec::Vec;

fn alloc(base: u64, limit: u64, cpus: usize, strict: bool) -> IovaAllocator {
    IovaAllocator::new(
        Config::new(base, limit, cpus)
            .with_strict(strict)
            .with_max_ranges(4096)
            .with_drain_spins(16),
    )
    .unwrap()
}

/// Allocates `n` single pages on `h`, then frees them all in the same order.
fn alloc_then_free(h: &mut PerCpu<'_>, n: usize) {
    let v: Vec<_> = (0..n).map(|_| h.alloc(0, u64::MAX).unwrap()).collect();
    for i in v {
        h.free(i).unwrap();
    }
}

/// `x` freed with one order less is WrongSize (naming its order); freed at its size it goes;
/// freed again it is NotAllocated.
fn frees_once_at_its_size(mut free: impl FnMut(Iova) -> Result<(), Error>, x: Iova) {
    assert_eq!(
        free(Iova::new(x.pfn(), x.order() - 1)),
        Err(Error::WrongSize {
            allocated_order: x.order()
        })
    );
    free(x).unwrap();
    assert_eq!(free(x), Err(Error::NotAllocated));
}

#[test]
fn config_is_validated() {
    assert_eq!(
        IovaAllocator::new(Config::new(5, 5, 1)).err(),
        Some(Error::InvalidConfig)
    );
    assert_eq!(
        IovaAllocator::new(Config::new(0, 10, 0)).err(),
        Some(Error::InvalidConfig)
    );
    assert_eq!(
        IovaAllocator::new(Config::new(0, MAX_PFN + 1, 1)).err(),
        Some(Error::InvalidConfig)
    );
    assert_eq!(
        IovaAllocator::new(Config::new(0, 10, 1).with_max_ranges(0)).err(),
        Some(Error::InvalidConfig)
    );
    assert!(IovaAllocator::new(Config::new(1, MAX_PFN, 2)).is_ok());
}

#[test]
fn helpers() {
    assert_eq!(order_for_pages(0), None);
    assert_eq!(order_for_pages(1), Some(0));
    assert_eq!(order_for_pages(2), Some(1));
    assert_eq!(order_for_pages(3), Some(2));
    assert_eq!(order_for_pages(512), Some(9));
    assert_eq!(order_for_pages(513), Some(10));
    assert_eq!(order_for_pages(1 << 63), Some(63));
    assert_eq!(order_for_pages((1 << 63) + 1), None);
    assert_eq!(limit_for_dma_mask(0x0fff_ffff), 65536);
    assert_eq!(limit_for_dma_mask(u64::MAX), MAX_PFN);
    assert_eq!(limit_for_dma_mask(0x1fff), 2);
    assert_eq!(limit_for_dma_mask(0x1000), 1);
    assert_eq!(Iova::new(3, 2).pages(), 4);
    assert_eq!(Iova::new(3, 2).addr(), Some(0x3000));
    assert_eq!(Iova::new(MAX_PFN, 0).addr(), None);
}

#[test]
fn claim_is_exclusive_and_released_on_drop() {
    let a = alloc(1, 1 << 20, 2, true);
    let h = a.claim(0).unwrap();
    assert_eq!(a.claim(0).err(), Some(Error::CpuInUse));
    assert_eq!(a.claim(2).err(), Some(Error::CpuOutOfRange));
    drop(h);
    assert!(a.claim(0).is_ok());
}

#[test]
fn hit_path_reuses_the_last_freed_iova() {
    for strict in [false, true] {
        let a = alloc(1, 1 << 20, 1, strict);
        let mut h = a.claim(0).unwrap();
        let x = h.alloc(0, u64::MAX).unwrap();
        h.free(x).unwrap();
        assert_eq!(h.cached(), 1);
        assert_eq!(h.alloc(0, u64::MAX).unwrap(), x);
        assert_eq!(h.cached(), 0);
        h.free(x).unwrap();
        drop(h);
        let s = a.stats();
        assert_eq!(
            (s.free_pages, s.free_ranges, s.allocated_ranges),
            ((1 << 20) - 1, 1, 0)
        );
        a.verify().unwrap();
    }
}

#[test]
fn every_order_is_aligned_inside_window_and_limit() {
    let a = alloc(3, 1 << 22, 1, true);
    let mut h = a.claim(0).unwrap();
    let mut got = Vec::new();
    for order in 0..=12u8 {
        for limit in [u64::MAX, 1 << 16, 1 << 21] {
            let i = h.alloc(order, limit).unwrap();
            assert_eq!(i.pfn() % i.pages(), 0);
            assert!(i.pfn() >= 3 && i.pfn() + i.pages() <= limit.min(1 << 22));
            got.push(i);
        }
    }
    let mut pages = BTreeSet::new();
    for i in &got {
        for p in i.pfn()..i.pfn() + i.pages() {
            assert!(pages.insert(p), "page {p} handed out twice");
        }
    }
    for i in got {
        h.free(i).unwrap();
    }
    drop(h);
    assert_eq!(a.stats().free_pages, (1 << 22) - 3);
    a.verify().unwrap();
}

#[test]
fn edu_limit_is_honoured_even_with_high_cached_iovas() {
    let a = alloc(1, 1 << 36, 1, false);
    let mut h = a.claim(0).unwrap();
    let low: Vec<_> = (1..300).map(|_| h.alloc(0, u64::MAX).unwrap()).collect();
    assert_eq!(low.last().unwrap().pfn(), 299);
    let high = h.alloc(0, u64::MAX).unwrap();
    assert_eq!(high.pfn(), 300);
    h.free(low[4]).unwrap();
    h.free(high).unwrap();
    // The top of the magazine (300) is above the limit: the entry below it is found instead.
    assert_eq!(h.alloc(0, 300), Ok(low[4]));
    // Nothing cached or free below 300 any more: NoSpace, never an IOVA above the limit.
    assert_eq!(h.alloc(0, 300), Err(Error::NoSpace));
    let lim = limit_for_dma_mask(0x0fff_ffff);
    let y = h.alloc(9, lim).unwrap();
    assert!(y.pfn() + 512 <= lim);
    for i in low.into_iter().chain([y]) {
        h.free(i).unwrap();
    }
    drop(h);
    a.drain_depot();
    a.verify().unwrap();
    assert_eq!(a.stats().free_ranges, 1, "{:?}", a.stats());
}

#[test]
fn misuse_is_rejected_in_strict_mode() {
    let a = alloc(16, 1 << 16, 1, true);
    let mut h = a.claim(0).unwrap();
    let x = h.alloc(2, u64::MAX).unwrap();
    let y = h.alloc(0, u64::MAX).unwrap();
    assert_eq!(
        h.free(Iova::new(x.pfn(), 1)),
        Err(Error::WrongSize { allocated_order: 2 })
    );
    assert_eq!(h.free(Iova::new(x.pfn() + 1, 0)), Err(Error::NotAllocated));
    assert_eq!(h.free(Iova::new(x.pfn() + 2, 1)), Err(Error::NotAllocated));
    assert_eq!(h.free(Iova::new(x.pfn() + 1, 2)), Err(Error::Misaligned));
    assert_eq!(h.free(Iova::new(8, 0)), Err(Error::OutOfWindow));
    assert_eq!(h.free(Iova::new(1 << 16, 0)), Err(Error::OutOfWindow));
    assert_eq!(h.free(Iova::new(0, 64)), Err(Error::InvalidOrder));
    h.free(x).unwrap();
    h.free(y).unwrap();
    // Double free of something now sitting in a magazine, not on top.
    assert_eq!(h.free(x), Err(Error::DoubleFree));
    assert_eq!(h.free(y), Err(Error::DoubleFree));
    let s = a.stats();
    assert_eq!(s.live_pages, 0);
    assert_eq!(s.cached_pages, 5);
    assert_eq!(s.late_misuse, 0);
    drop(h);
    a.verify().unwrap();
    assert_eq!(a.stats().free_pages, (1 << 16) - 16);
}

#[test]
fn misuse_in_release_mode_is_caught_cheaply_or_late() {
    let a = alloc(16, 1 << 16, 1, false);
    let mut h = a.claim(0).unwrap();
    let x = h.alloc(0, u64::MAX).unwrap();
    let y = h.alloc(0, u64::MAX).unwrap();
    h.free(x).unwrap();
    // Immediate double free: caught on the hit path.
    assert_eq!(h.free(x), Err(Error::DoubleFree));
    h.free(y).unwrap();
    // Not on top any more: accepted into the magazine, caught when it reaches the backing
    // allocator, counted and dropped.
    h.free(x).unwrap();
    // Forged IOVA: also only caught late.
    h.free(Iova::new(1000, 0)).unwrap();
    drop(h);
    let s = a.stats();
    assert_eq!(s.late_misuse, 2);
    assert_eq!(s.free_pages, (1 << 16) - 16);
    a.verify().unwrap();
    // Large orders always go to the backing allocator and are always checked.
    let mut h = a.claim(0).unwrap();
    let big = h.alloc(12, u64::MAX).unwrap();
    frees_once_at_its_size(|i| h.free(i), big);
}

#[test]
fn magazines_overflow_into_the_depot_and_come_back() {
    let a = alloc(1, 1 << 20, 1, true);
    let mut h = a.claim(0).unwrap();
    let n = MAG_SIZE * 5;
    alloc_then_free(&mut h, n);
    let s = a.stats();
    // Three magazines' worth went to the depot (two stay loaded/previous on the CPU).
    assert_eq!(s.depot_full[0], 3, "{:?}", s.depot_full);
    assert_eq!(
        s.cached_pages as usize,
        h.cached() + s.depot_full[0] * MAG_SIZE
    );
    // Trimming goes toward the target (1 per CPU) one magazine per call, then stops.
    assert_eq!(a.trim(), 1);
    assert_eq!(a.trim(), 1);
    assert_eq!(a.trim(), 0);
    let s = a.stats();
    assert_eq!(s.depot_full[0], 1);
    assert_eq!(s.cached_pages as usize, h.cached() + MAG_SIZE);
    a.verify().unwrap();
    let again: BTreeSet<_> = (0..n).map(|_| h.alloc(0, u64::MAX).unwrap()).collect();
    assert_eq!(again.len(), n);
    for i in again {
        h.free(i).unwrap();
    }
    drop(h);
    a.verify().unwrap();
}

#[test]
fn exhaustion_drains_depot_and_own_cache_then_reports_no_space() {
    let a = alloc(0, 64, 1, true);
    let mut h = a.claim(0).unwrap();
    let v: Vec<_> = (0..64).map(|_| h.alloc(0, u64::MAX).unwrap()).collect();
    assert_eq!(h.alloc(0, u64::MAX), Err(Error::NoSpace));
    for &i in &v {
        h.free(i).unwrap();
    }
    // All 64 pages are cached as order-0 IOVAs: an order-6 request must drain them.
    assert_eq!(h.cached(), 64);
    let big = h.alloc(6, u64::MAX).unwrap();
    assert_eq!(big, Iova::new(0, 6));
    assert_eq!(h.cached(), 0);
    assert_eq!(h.alloc(0, u64::MAX), Err(Error::NoSpace));
    assert_eq!(h.alloc(7, u64::MAX), Err(Error::NoSpace));
    assert_eq!(h.alloc(64, u64::MAX), Err(Error::InvalidOrder));
    h.free(big).unwrap();
    a.verify().unwrap();
}

#[test]
fn exhaustion_asks_other_cpus_to_drain() {
    let a = alloc(0, 8, 2, true);
    let mut h0 = a.claim(0).unwrap();
    let mut h1 = a.claim(1).unwrap();
    let v: Vec<_> = (0..8).map(|_| h1.alloc(0, u64::MAX).unwrap()).collect();
    for i in v {
        h1.free(i).unwrap();
    }
    assert_eq!(h1.cached(), 8);
    // CPU 1 does not answer (same thread): CPU 0 gets NoSpace after its bounded wait...
    assert_eq!(h0.alloc(0, u64::MAX), Err(Error::NoSpace));
    // ...and CPU 1 empties its cache at its next poll, after which CPU 0 succeeds.
    h1.poll();
    assert_eq!(h1.cached(), 0);
    assert_eq!(h0.alloc(3, u64::MAX), Ok(Iova::new(0, 3)));
    a.verify().unwrap();
}

#[test]
fn uncached_path_and_large_orders() {
    let a = alloc(1, 1 << 30, 2, true);
    let x = a.alloc_uncached(20, u64::MAX).unwrap();
    assert_eq!(x.pfn() % (1 << 20), 0);
    frees_once_at_its_size(|i| a.free_uncached(i), x);
    assert_eq!(a.alloc_uncached(30, u64::MAX), Err(Error::NoSpace));
    assert_eq!(a.alloc_uncached(3, 8), Err(Error::NoSpace));
    assert_eq!(a.alloc_uncached(3, 16), Ok(Iova::new(8, 3)));
    a.verify().unwrap();
}

#[test]
fn limit_below_base_fails_fast() {
    let a = alloc(1 << 20, 1 << 21, 1, false);
    let mut h = a.claim(0).unwrap();
    let x = h.alloc(0, u64::MAX).unwrap();
    h.free(x).unwrap();
    assert_eq!(h.alloc(0, 1 << 19), Err(Error::NoSpace));
    // The cache was not drained for a request that can never succeed.
    assert_eq!(h.cached(), 1);
}

#[test]
fn node_arena_limit_is_no_space_not_a_panic() {
    let a = IovaAllocator::new(
        Config::new(0, 1 << 20, 1)
            .with_max_ranges(8)
            .with_drain_spins(4),
    )
    .unwrap();
    let mut h = a.claim(0).unwrap();
    let mut v = Vec::new();
    loop {
        match h.alloc(0, u64::MAX) {
            Ok(i) => v.push(i),
            Err(e) => {
                assert_eq!(e, Error::NoSpace);
                break;
            }
        }
        assert!(v.len() <= 8);
    }
    assert_eq!(v.len(), 8);
    for i in v {
        h.free(i).unwrap();
    }
}

#[test]
fn depot_pool_exhaustion_falls_back_to_the_backing_allocator() {
    // No extra depot magazines: the pool holds the CPU's 20 and 10 spare (one per class in
    // flight). Once the spares are full, a CPU with both magazines full empties one in place.
    let a = IovaAllocator::new(
        Config::new(1, 1 << 20, 1)
            .with_strict(true)
            .with_depot_magazines(0)
            .with_max_ranges(4096),
    )
    .unwrap();
    let mut h = a.claim(0).unwrap();
    let n = MAG_SIZE * 14;
    alloc_then_free(&mut h, n);
    let s = a.stats();
    assert!(s.depot_full[0] <= 10);
    assert_eq!(
        s.cached_pages as usize,
        h.cached() + s.depot_full[0] * MAG_SIZE
    );
    assert!(
        (s.cached_pages as usize) < n,
        "some magazines went back to the backing allocator"
    );
    assert_eq!(s.live_pages, 0);
    a.verify().unwrap();
}

#[test]
fn dropping_a_handle_returns_everything() {
    let a = alloc(1, 1 << 20, 2, true);
    let mut h = a.claim(1).unwrap();
    alloc_then_free(&mut h, 3 * MAG_SIZE);
    drop(h);
    a.drain_depot();
    let s = a.stats();
    assert_eq!(
        (s.free_ranges, s.allocated_ranges, s.cached_pages),
        (1, 0, 0)
    );
    // The magazines went back to the pool: both CPUs can claim again.
    let _h0 = a.claim(0).unwrap();
    let _h1 = a.claim(1).unwrap();
}

#[test]
fn reserved_ranges_are_skipped_refused_and_merged() {
    // A 32-bit window from 1 MiB with the MSI window 0xFEE00000..0xFF000000 reserved.
    let mut a = alloc(0x100, 1 << 20, 1, true);
    a.reserve(0xFEE00, 0xFF000).unwrap();
    assert_eq!(a.reserved(), &[(0xFEE00, 0xFF000)]);
    assert_eq!(a.stats().reserved_pages, 0x200);
    // Touching and overlapping reservations merge; parts outside the window are ignored.
    a.reserve(0xFF000, 0xFF010).unwrap();
    a.reserve(0xFEDF0, 0xFEE10).unwrap();
    a.reserve(0x10, 0x100).unwrap();
    a.reserve((1 << 20) - 4, u64::MAX).unwrap();
    assert_eq!(
        a.reserved(),
        &[(0xFEDF0, 0xFF010), ((1 << 20) - 4, 1 << 20)]
    );
    a.verify().unwrap();
    // 512 MiB blocks: the one holding the MSI window is never handed out.
    let order = 17;
    let got: Vec<Iova> = (0..8)
        .map_while(|_| a.alloc_uncached(order, u64::MAX).ok())
        .collect();
    assert!(got
        .iter()
        .all(|i| i.pfn() + i.pages() <= 0xFEDF0 || i.pfn() >= 0xFF010));
    // Of the eight blocks the first starts below the window base and the last holds the MSI
    // window.
    assert_eq!(got.len(), 6, "all but the block holding the MSI window");
    // A range holding allocated pages cannot be reserved; nothing changes.
    let before = a.stats();
    assert_eq!(a.reserve(got[0].pfn(), got[0].pfn() + 1), Err(Error::InUse));
    assert_eq!(a.stats(), before);
    // Frees into a reserved range are refused on every path.
    assert_eq!(a.free_uncached(Iova::new(0xFEE00, 0)), Err(Error::Reserved));
    for i in got {
        a.free_uncached(i).unwrap();
    }
    {
        let mut h = a.claim(0).unwrap();
        assert_eq!(h.free(Iova::new(0xFEE00, 0)), Err(Error::Reserved));
        assert_eq!(h.free(Iova::new(0xFEC00, 9)), Err(Error::Reserved));
    }
    a.verify().unwrap();
    let s = a.stats();
    assert_eq!(s.free_pages + s.reserved_pages, s.window_pages);
}

#[test]
fn reservations_count_against_the_range_capacity() {
    let mut a = IovaAllocator::new(Config::new(0, 1000, 1).with_max_ranges(3)).unwrap();
    a.reserve(10, 11).unwrap();
    a.reserve(20, 21).unwrap();
    a.reserve(30, 31).unwrap();
    assert_eq!(a.reserve(40, 41), Err(Error::NoSpace));
    a.reserve(31, 35).unwrap(); // merges: no new range
    assert_eq!(a.alloc_uncached(0, u64::MAX), Err(Error::NoSpace));
    a.verify().unwrap();
}
