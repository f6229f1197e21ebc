//! Property tests against a simple model: random firmware maps, reservations and operation
//! sequences; the allocator must agree with a BTreeSet of owned frames.

mod common;

use std::collections::BTreeSet;

use common::r;
use moat_frames::{Frame, FrameAllocator, FrameError, MemoryMap, RegionKind, PAGE_SIZE};
use proptest::prelude::*;

/// Address space of the random maps: 2 MiB (512 frames), small enough to check every frame.
const SPACE: u64 = 2 << 20;
const FRAMES: u64 = SPACE / PAGE_SIZE;

#[derive(Clone, Debug)]
enum Op {
    Alloc,
    AllocRun {
        count: u64,
        align_shift: u32,
    },
    /// Free the n-th live frame (modulo the live count).
    Free(usize),
    /// Free the n-th live run.
    FreeRun(usize),
    /// Free an arbitrary frame number (often not live, or not owned).
    FreeAny(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Alloc),
        2 => (1u64..40, 12u32..19).prop_map(|(count, align_shift)| Op::AllocRun { count, align_shift }),
        2 => any::<usize>().prop_map(Op::Free),
        1 => any::<usize>().prop_map(Op::FreeRun),
        1 => (0..FRAMES + 8).prop_map(Op::FreeAny),
    ]
}

fn kind() -> impl Strategy<Value = RegionKind> {
    prop_oneof![
        4 => Just(RegionKind::Usable),
        1 => Just(RegionKind::Reserved),
        1 => Just(RegionKind::AcpiReclaimable),
        1 => Just(RegionKind::AcpiNvs),
        1 => Just(RegionKind::Bad),
        1 => (6u32..20).prop_map(RegionKind::Other),
    ]
}

/// Regions and reservations with unaligned starts and lengths, overlapping freely.
fn ranges(max: usize) -> impl Strategy<Value = Vec<(u64, u64)>> {
    proptest::collection::vec((0..SPACE, 0..SPACE / 3), 0..max)
}

/// The model of the usable set: a frame is usable when every byte of it is inside some usable
/// region and inside no other region and no reservation.
fn model_usable(
    regions: &[((u64, u64), RegionKind)],
    reservations: &[(u64, u64)],
) -> BTreeSet<u64> {
    let covered = |lo: u64, hi: u64, set: &mut dyn Iterator<Item = (u64, u64)>| -> bool {
        // Whether [lo, hi) is covered by the union of the ranges (byte-exact).
        let mut v: Vec<(u64, u64)> = set.filter(|&(s, e)| s < hi && e > lo).collect();
        v.sort();
        let mut at = lo;
        for (s, e) in v {
            if s > at {
                return false;
            }
            at = at.max(e);
        }
        at >= hi
    };
    let end = |(s, l): (u64, u64)| (s, s.saturating_add(l));
    (0..FRAMES + 1024)
        .filter(|&f| {
            let (lo, hi) = (f * PAGE_SIZE, (f + 1) * PAGE_SIZE);
            let in_usable = covered(
                lo,
                hi,
                &mut regions
                    .iter()
                    .filter(|(_, k)| k.is_usable())
                    .map(|(x, _)| end(*x)),
            );
            let holes = regions
                .iter()
                .filter(|(_, k)| !k.is_usable())
                .map(|(x, _)| end(*x))
                .chain(reservations.iter().map(|x| end(*x)));
            let hit = holes.clone().any(|(s, e)| s < hi && e > lo);
            in_usable && !hit
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn allocator_agrees_with_the_model(
        regions in proptest::collection::vec(((0..SPACE, 0..SPACE / 2), kind()), 0..12),
        reservations in ranges(8),
        ops in proptest::collection::vec(op(), 0..200),
    ) {
        let mut map = MemoryMap::new();
        for &((start, len), k) in &regions {
            map.add_region(r(start, len), k).unwrap();
        }
        for &(start, len) in &reservations {
            map.reserve(r(start, len), "test").unwrap();
        }
        let usable = model_usable(&regions, &reservations);

        // The map's usable set is exactly the model's.
        let from_map: BTreeSet<u64> = map.usable().iter().flat_map(|u| u.whole_frames()).collect();
        prop_assert_eq!(&from_map, &usable);
        prop_assert!(map.usable().windows(2).all(|w| w[0].end() < w[1].start()));

        let mut bitmap = vec![0u64; FrameAllocator::bitmap_words(&map)];
        let mut fa = FrameAllocator::new(&map, &mut bitmap).unwrap();
        prop_assert_eq!(fa.total_frames(), usable.len() as u64);

        let mut live: BTreeSet<u64> = BTreeSet::new();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut singles: Vec<u64> = Vec::new();
        for op in ops {
            match op {
                Op::Alloc => match fa.allocate() {
                    Ok(f) => {
                        let n = f.number();
                        prop_assert!(usable.contains(&n), "not usable: {:?}", f);
                        prop_assert!(live.insert(n), "handed out twice: {:?}", f);
                        singles.push(n);
                    }
                    Err(e) => {
                        prop_assert_eq!(e, FrameError::OutOfMemory);
                        prop_assert_eq!(live.len(), usable.len());
                    }
                },
                Op::AllocRun { count, align_shift } => {
                    let align = 1u64 << align_shift;
                    let af = align / PAGE_SIZE;
                    // The lowest fitting aligned run in the model.
                    let expected = usable.iter().copied().filter(|s| s % af == 0).find(|&s| {
                        (s..s + count).all(|n| usable.contains(&n) && !live.contains(&n))
                    });
                    match fa.allocate_contiguous(count, align) {
                        Ok(f) => {
                            prop_assert_eq!(Some(f.number()), expected);
                            prop_assert!(f.start().is_aligned(align));
                            for n in f.number()..f.number() + count {
                                live.insert(n);
                            }
                            runs.push((f.number(), count));
                        }
                        Err(e) => {
                            prop_assert_eq!(expected, None);
                            prop_assert_eq!(e, FrameError::NoContiguousRange { count, align });
                        }
                    }
                }
                Op::Free(i) => {
                    if singles.is_empty() { continue; }
                    let n = singles.swap_remove(i % singles.len());
                    fa.free(Frame::from_number(n).unwrap()).unwrap();
                    live.remove(&n);
                    // Freeing again is a double free.
                    prop_assert_eq!(
                        fa.free(Frame::from_number(n).unwrap()),
                        Err(FrameError::DoubleFree { frame: Frame::from_number(n).unwrap() })
                    );
                }
                Op::FreeRun(i) => {
                    if runs.is_empty() { continue; }
                    let (s, c) = runs.swap_remove(i % runs.len());
                    fa.free_contiguous(Frame::from_number(s).unwrap(), c).unwrap();
                    for n in s..s + c {
                        live.remove(&n);
                    }
                }
                Op::FreeAny(n) => {
                    let f = Frame::from_number(n).unwrap();
                    let result = fa.free(f);
                    if !usable.contains(&n) {
                        prop_assert_eq!(result, Err(FrameError::NotOwned { frame: f }));
                    } else if !live.contains(&n) {
                        prop_assert_eq!(result, Err(FrameError::DoubleFree { frame: f }));
                    } else {
                        prop_assert_eq!(result, Ok(()));
                        live.remove(&n);
                        singles.retain(|&x| x != n);
                        // A run with a frame freed by hand: freeing it whole is now a double
                        // free (reported at its first free frame, nothing changed); its other
                        // frames become singles.
                        if let Some(pos) = runs.iter().position(|&(s, c)| (s..s + c).contains(&n)) {
                            let (s, c) = runs.swap_remove(pos);
                            let first_free = (s..s + c).find(|m| !live.contains(m)).unwrap();
                            prop_assert_eq!(
                                fa.free_contiguous(Frame::from_number(s).unwrap(), c),
                                Err(FrameError::DoubleFree { frame: Frame::from_number(first_free).unwrap() })
                            );
                            singles.extend((s..s + c).filter(|m| live.contains(m)));
                        }
                    }
                }
            }
            prop_assert_eq!(fa.used_frames(), live.len() as u64);
            prop_assert_eq!(fa.free_frames() + fa.used_frames(), fa.total_frames());
        }
        for n in &usable {
            let f = Frame::from_number(*n).unwrap();
            prop_assert_eq!(fa.is_free(f), Some(!live.contains(n)));
        }
        // Free everything; then every usable frame can be allocated again, once.
        for &n in &live {
            fa.free(Frame::from_number(n).unwrap()).unwrap();
        }
        let mut again = BTreeSet::new();
        while let Ok(f) = fa.allocate() {
            prop_assert!(again.insert(f.number()));
        }
        prop_assert_eq!(again, usable);
    }
}
