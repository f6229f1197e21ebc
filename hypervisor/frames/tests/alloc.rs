//! FrameAllocator on the q35 fixture and on small hand-made maps.

mod common;

use std::collections::BTreeSet;

use common::*;
use moat_frames::{
    Frame, FrameAllocator, FrameError, MemoryMap, PhysAddr, PhysRange, RegionKind, PAGE_SIZE,
};

/// An allocator for `map` over a bitmap of its own (leaked: a test's allocator lives as long
/// as the test), filled with garbage on purpose: `new` clears it.
fn allocator_for(map: &MemoryMap) -> FrameAllocator<'static> {
    let bitmap = vec![u64::MAX; FrameAllocator::bitmap_words(map)].leak();
    FrameAllocator::new(map, bitmap).unwrap()
}

fn frame(addr: u64) -> Frame {
    Frame::from_start(PhysAddr::new(addr)).unwrap()
}

#[test]
fn q35_counts_and_single_frames_never_touch_reserved_memory() {
    let (map, trampoline) = q35_booted();
    let mut fa = allocator_for(&map);
    let expected = (0x200000 - 0x100000 + 0x1000 + 0x7fe0000 - 0x342000) / PAGE_SIZE;
    assert_eq!(fa.total_frames(), expected);
    assert_eq!(fa.free_frames(), expected);
    assert_eq!(
        FrameAllocator::bitmap_words(&map) as u64,
        expected.div_ceil(64)
    );

    let mut seen = BTreeSet::new();
    while let Ok(f) = fa.allocate() {
        let a = f.start().as_u64();
        assert!(seen.insert(f), "{f:?} handed out twice");
        assert!(map.is_usable(f.range()), "{f:?} is not usable");
        assert!(!(0x200000..0x340000).contains(&a), "kernel image {f:?}");
        assert!((0x100000..0x7fe0000).contains(&a), "{f:?}");
        assert_ne!(f.range(), trampoline);
        assert_ne!(a, 0x341000, "multiboot2 info");
    }
    assert_eq!(seen.len() as u64, expected);
    assert_eq!((fa.free_frames(), fa.used_frames()), (0, expected));
    assert_eq!(fa.allocate(), Err(FrameError::OutOfMemory));
    assert_eq!(
        fa.allocate_contiguous(1, 4096),
        Err(FrameError::NoContiguousRange {
            count: 1,
            align: 4096
        })
    );

    // Everything freed can be allocated again.
    for &f in &seen {
        fa.free(f).unwrap();
    }
    assert_eq!(fa.free_frames(), expected);
    let again: BTreeSet<Frame> = (0..expected).map(|_| fa.allocate().unwrap()).collect();
    assert_eq!(again, seen);
}

#[test]
fn contiguous_runs_are_contiguous_aligned_and_disjoint() {
    let (map, _) = q35_booted();
    let mut fa = allocator_for(&map);
    let single = fa.allocate().unwrap();
    let mut taken: Vec<(u64, u64)> = vec![(single.number(), 1)];
    // Page-table page, a 4 KiB invalidation queue, 2 MiB-aligned 8 MiB heap, 64 KiB odd run.
    for (count, align) in [
        (1, 4096),
        (1, 4096),
        (2048, 2 << 20),
        (16, 1 << 16),
        (3, 4096),
        (512, 1 << 21),
    ] {
        let f = fa.allocate_contiguous(count, align).unwrap();
        assert!(f.start().is_aligned(align), "{f:?} align {align:#x}");
        let range = PhysRange::from_start_len(f.start(), count * PAGE_SIZE);
        assert!(map.is_usable(range), "{range:?} not wholly usable");
        for n in f.number()..f.number() + count {
            assert_eq!(fa.is_free(Frame::from_number(n).unwrap()), Some(false));
        }
        for &(s, c) in &taken {
            assert!(f.number() + count <= s || s + c <= f.number(), "overlap");
        }
        taken.push((f.number(), count));
    }
    let used: u64 = taken.iter().map(|t| t.1).sum();
    assert_eq!(fa.used_frames(), used);
    assert_eq!(fa.free_frames() + fa.used_frames(), fa.total_frames());

    // The first 2 MiB-aligned address with 8 MiB free after the kernel is 4 MiB.
    assert_eq!(taken[3].0 * PAGE_SIZE, 4 * MIB);

    // Too big, bad arguments.
    assert_eq!(
        fa.allocate_contiguous(1 << 20, 4096),
        Err(FrameError::NoContiguousRange {
            count: 1 << 20,
            align: 4096
        })
    );
    assert_eq!(fa.allocate_contiguous(0, 4096), Err(FrameError::ZeroCount));
    assert_eq!(
        fa.allocate_contiguous(1, 0x1800),
        Err(FrameError::BadAlignment { align: 0x1800 })
    );
    assert_eq!(
        fa.allocate_contiguous(1, 0),
        Err(FrameError::BadAlignment { align: 0 })
    );
    assert_eq!(
        fa.allocate_contiguous(u64::MAX, 4096),
        Err(FrameError::NoContiguousRange {
            count: u64::MAX,
            align: 4096
        })
    );
    assert!(fa.allocate_contiguous(1, 1 << 63).is_err());

    // A range constraint.
    let low = fa
        .allocate_contiguous_within(4, 4096, span(0, 0x200000))
        .unwrap();
    assert!(low.start().as_u64() + 4 * PAGE_SIZE <= 0x200000);
    assert_eq!(
        fa.allocate_contiguous_within(1, 4096, span(0x200000, 0x340000)),
        Err(FrameError::NoContiguousRange {
            count: 1,
            align: 4096
        })
    );

    // Free them all: counts come back.
    for (s, c) in taken {
        fa.free_contiguous(Frame::from_number(s).unwrap(), c)
            .unwrap();
    }
    fa.free_contiguous(low, 4).unwrap();
    assert_eq!(fa.free_frames(), fa.total_frames());
}

#[test]
fn contiguous_search_skips_holes_made_by_live_frames() {
    let map = usable_map(0, 64 * 4096);
    let mut fa = allocator_for(&map);
    // Every 8th frame allocated and kept: no run of 8 anywhere, runs of 7 everywhere.
    let all: Vec<Frame> = (0..64).map(|_| fa.allocate().unwrap()).collect();
    for (i, f) in all.iter().enumerate() {
        if i % 8 != 0 {
            fa.free(*f).unwrap();
        }
    }
    assert!(fa.allocate_contiguous(8, 4096).is_err());
    let run = fa.allocate_contiguous(7, 4096).unwrap();
    assert_eq!(run.number(), 1);
    let aligned = fa.allocate_contiguous(4, 0x4000).unwrap();
    assert_eq!(
        aligned.number(),
        12,
        "frames 8 and 16 are live; 12..16 is the first aligned run"
    );
}

#[test]
fn runs_never_span_two_usable_ranges() {
    let mut map = usable_map(0, 0x4000);
    map.add_region(span(0x4000, 0x8000), RegionKind::Usable)
        .unwrap();
    map.reserve(span(0x4000, 0x5000), "hole").unwrap();
    let mut fa = allocator_for(&map);
    assert_eq!(
        fa.ranges().collect::<Vec<_>>(),
        [span(0, 0x4000), span(0x5000, 0x8000)]
    );
    assert!(
        fa.allocate_contiguous(5, 4096).is_err(),
        "7 free frames but split 4 + 3"
    );
    assert_eq!(fa.allocate_contiguous(4, 4096).unwrap(), frame(0));
    assert_eq!(fa.allocate_contiguous(3, 4096).unwrap(), frame(0x5000));
}

#[test]
fn double_free_and_foreign_frames_are_errors_that_change_nothing() {
    let (map, trampoline) = q35_booted();
    let mut fa = allocator_for(&map);
    let f = fa.allocate().unwrap();
    fa.free(f).unwrap();
    assert_eq!(fa.free(f), Err(FrameError::DoubleFree { frame: f }));
    for foreign in [
        0,
        0x200000,
        0x341000,
        0x7fe0000,
        0xb0000000,
        trampoline.start().as_u64(),
        1 << 40,
    ] {
        let g = frame(foreign);
        assert!(!fa.owns(g));
        assert_eq!(fa.is_free(g), None);
        assert_eq!(fa.free(g), Err(FrameError::NotOwned { frame: g }));
    }
    assert_eq!(fa.free_frames(), fa.total_frames());

    // Partly free or partly foreign runs: nothing is freed.
    let run = fa.allocate_contiguous(4, 4096).unwrap();
    let third = Frame::from_number(run.number() + 2).unwrap();
    fa.free(third).unwrap();
    let before = fa.free_frames();
    assert_eq!(
        fa.free_contiguous(run, 4),
        Err(FrameError::DoubleFree { frame: third })
    );
    assert_eq!(fa.free_frames(), before);
    assert_eq!(fa.is_free(run), Some(false));
    let last = frame(0x7fdf000);
    let tail = fa
        .allocate_contiguous_within(1, 4096, span(0x7fdf000, 0x7fe0000))
        .unwrap();
    assert_eq!(tail, last);
    assert_eq!(
        fa.free_contiguous(last, 2),
        Err(FrameError::NotOwned {
            frame: frame(0x7fe0000)
        })
    );
    assert_eq!(fa.is_free(last), Some(false));
    assert_eq!(fa.free_contiguous(last, 0), Ok(()));
    fa.free_contiguous(last, 1).unwrap();
}

#[test]
fn bitmap_too_small_and_empty_maps() {
    let (map, _) = q35_booted();
    let needed = FrameAllocator::bitmap_words(&map);
    assert_eq!(FrameAllocator::bitmap_bytes(&map), needed * 8);
    let mut short = vec![0u64; needed - 1];
    assert_eq!(
        FrameAllocator::new(&map, &mut short).err(),
        Some(FrameError::BitmapTooSmall {
            needed,
            given: needed - 1
        })
    );
    let empty = MemoryMap::new();
    let mut none: [u64; 0] = [];
    let mut fa = FrameAllocator::new(&empty, &mut none).unwrap();
    assert_eq!(fa.total_frames(), 0);
    assert_eq!(fa.allocate(), Err(FrameError::OutOfMemory));
    assert!(fa.allocate_contiguous(1, 4096).is_err());
}

#[test]
fn single_allocations_follow_the_hint() {
    let map = usable_map(0, 256 * 4096);
    let mut fa = allocator_for(&map);
    let first: Vec<u64> = (0..130).map(|_| fa.allocate().unwrap().number()).collect();
    assert_eq!(
        first,
        (0..130).collect::<Vec<_>>(),
        "ascending from the start"
    );
    // Freeing a low frame moves the hint back to it, so it is reused first.
    fa.free(Frame::from_number(5).unwrap()).unwrap();
    assert_eq!(fa.allocate().unwrap().number(), 5);
    assert_eq!(fa.allocate().unwrap().number(), 130);
}

#[test]
fn from_map_carves_its_bitmap_out_of_the_map() {
    // "Physical memory" is a host buffer standing for [0, 8 MiB).
    // Leaked: the allocator gets a 'static bitmap inside it.
    let memory: &'static mut [u8] = Box::leak(vec![0xa5u8; 8 * MIB as usize].into_boxed_slice());
    let base = memory.as_mut_ptr();
    let mut map = usable_map(0, 8 * MIB);
    map.reserve(span(0, MIB), "first MiB").unwrap();
    let words_before = FrameAllocator::bitmap_words(&map);
    // SAFETY: every address below 8 MiB maps into `memory`, which is leaked ('static) and
    // not otherwise touched while the allocator lives.
    let fa = unsafe {
        FrameAllocator::from_map(&mut map, span(0, 8 * MIB), |pa| {
            base.add(pa.as_u64() as usize)
        })
    };
    let mut fa = fa.unwrap();
    let bitmap_block = map.reservations()[1];
    assert_eq!(bitmap_block.why, "frame allocator bitmap");
    assert_eq!(bitmap_block.range, span(8 * MIB - 4096, 8 * MIB));
    assert!(words_before >= FrameAllocator::bitmap_words(&map));
    assert_eq!(fa.total_frames(), (7 * MIB - 4096) / PAGE_SIZE);
    let mut n = 0;
    while let Ok(f) = fa.allocate() {
        assert!(!bitmap_block.range.overlaps(f.range()));
        n += 1;
    }
    assert_eq!(n, fa.total_frames());

    // No room inside `within`: a typed error, nothing carved.
    let mut map = usable_map(0x100000, 0x200000);
    // SAFETY: the translation is never used because carving fails first.
    let err =
        unsafe { FrameAllocator::from_map(&mut map, span(0, 0x100000), |_| std::ptr::null_mut()) };
    assert!(matches!(err, Err(FrameError::Map(_))));
    // A null translation is refused.
    // SAFETY: the returned pointer is null, which from_map rejects before using it.
    let err =
        unsafe { FrameAllocator::from_map(&mut map, PhysRange::ALL, |_| std::ptr::null_mut()) };
    assert!(matches!(err, Err(FrameError::BadMapping { .. })));
}

#[test]
fn error_messages() {
    assert_eq!(
        FrameError::DoubleFree {
            frame: frame(0x5000)
        }
        .to_string(),
        "frame 0x5000 freed twice"
    );
    assert_eq!(
        FrameError::NoContiguousRange {
            count: 3,
            align: 0x200000
        }
        .to_string(),
        "no 3 contiguous free frames aligned to 0x200000"
    );
}
