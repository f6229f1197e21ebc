//! MemoryMap: normalisation of firmware maps, reservations, carving, capacity.

mod common;

use common::*;
use moat_frames::{
    MapError, MemoryMap, PhysAddr, PhysRange, RegionKind, MAX_REGIONS, MAX_RESERVATIONS,
};

fn usable(map: &MemoryMap) -> Vec<(u64, u64)> {
    map.usable()
        .iter()
        .map(|u| (u.start().as_u64(), u.end().as_u64()))
        .collect()
}

#[test]
fn q35_seabios_usable_set() {
    let map = q35_map();
    assert_eq!(map.regions().len(), 9);
    // The first region ends at 0x9fc00: cut down to 0x9f000.
    assert_eq!(usable(&map), [(0, 0x9f000), (0x100000, 0x7fe0000)]);
    assert_eq!(map.usable_bytes(), 0x9f000 + 0x7ee0000);
}

#[test]
fn q35_after_boot_reservations() {
    let (map, trampoline) = q35_booted();
    // The trampoline is the highest whole free page below 1 MiB.
    assert_eq!(trampoline, span(0x9e000, 0x9f000));
    // Kernel image [2 MiB, 3.25 MiB) and the info block in the frame 0x341000 are gone.
    assert_eq!(
        usable(&map),
        [
            (0x100000, 0x200000),
            (0x340000, 0x341000),
            (0x342000, 0x7fe0000)
        ]
    );
    let whys: Vec<&str> = map.reservations().iter().map(|r| r.why).collect();
    assert_eq!(
        whys,
        [
            "first MiB",
            "AP trampoline",
            "kernel image",
            "multiboot2 info"
        ]
    );
    assert!(map.is_usable(span(0x342000, 0x7fe0000)));
    assert!(!map.is_usable(span(0x341000, 0x342000)));
    assert!(!map.is_usable(span(0x100000, 0x201000)));
}

#[test]
fn unsorted_overlapping_unaligned_regions() {
    let mut map = usable_map(0x5000, 0x9800);
    map.add_region(span(0x800, 0x3200), RegionKind::Usable)
        .unwrap();
    map.add_region(span(0x3000, 0x6000), RegionKind::Usable)
        .unwrap(); // overlaps both
    map.add_region(span(0x20000, 0x20fff), RegionKind::Usable)
        .unwrap(); // no whole frame
    map.add_region(span(0x30000, 0x32000), RegionKind::Usable)
        .unwrap();
    map.add_region(span(0x32000, 0x34000), RegionKind::Usable)
        .unwrap(); // adjacent: merged
    map.add_region(r(0x40000, 0), RegionKind::Usable).unwrap(); // empty: ignored
    assert_eq!(map.regions().len(), 6);
    assert!(map
        .regions()
        .windows(2)
        .all(|w| w[0].range.start() <= w[1].range.start()));
    assert_eq!(usable(&map), [(0x1000, 0x9000), (0x30000, 0x34000)]);
}

#[test]
fn non_usable_kinds_win_over_usable() {
    for kind in [
        RegionKind::Reserved,
        RegionKind::AcpiReclaimable,
        RegionKind::AcpiNvs,
        RegionKind::Bad,
        RegionKind::Other(17),
    ] {
        let mut map = MemoryMap::new();
        map.add_region(span(0x2100, 0x3100), kind).unwrap(); // added first, still wins
        map.add_region(span(0, 0x10000), RegionKind::Usable)
            .unwrap();
        assert_eq!(usable(&map), [(0, 0x2000), (0x4000, 0x10000)], "{kind}");
    }
    assert_eq!(RegionKind::from_multiboot(1), RegionKind::Usable);
    assert_eq!(RegionKind::from_multiboot(3), RegionKind::AcpiReclaimable);
    assert_eq!(RegionKind::from_multiboot(4), RegionKind::AcpiNvs);
    assert_eq!(RegionKind::from_multiboot(5), RegionKind::Bad);
    assert_eq!(RegionKind::from_multiboot(12), RegionKind::Other(12));
}

#[test]
fn reservations_clip_and_split() {
    let mut map = usable_map(0, 0x100000);
    map.reserve(span(0x10800, 0x11000), "half a frame").unwrap(); // whole frame excluded
    map.reserve(span(0xff000, 0x200000), "past the end")
        .unwrap();
    map.reserve(span(0x50000, 0x50000), "empty").unwrap(); // ignored
    map.reserve(span(0x300000, 0x400000), "not RAM").unwrap(); // recorded, no effect
    assert_eq!(map.reservations().len(), 3);
    assert_eq!(usable(&map), [(0, 0x10000), (0x11000, 0xff000)]);
    // Reserving everything leaves nothing.
    map.reserve(PhysRange::ALL, "all").unwrap();
    assert!(map.usable().is_empty());
    assert_eq!(map.usable_bytes(), 0);
}

#[test]
fn regions_at_the_top_of_the_address_space() {
    let mut map = MemoryMap::new();
    // Length overflows: clamped to u64::MAX, the partial last frame is not usable.
    map.add_region(r(u64::MAX - 0x2fff, 0x10000), RegionKind::Usable)
        .unwrap();
    assert_eq!(usable(&map), [(u64::MAX - 0x2fff, u64::MAX - 0xfff)]);
    map.reserve(r(u64::MAX - 0x1000, 0x5000), "top").unwrap();
    assert_eq!(usable(&map), [(u64::MAX - 0x2fff, u64::MAX - 0x1fff)]);
}

#[test]
fn capacity_overflow_is_an_error() {
    let mut map = MemoryMap::new();
    for i in 0..MAX_REGIONS as u64 {
        map.add_region(r(i * 0x10000, 0x8000), RegionKind::Usable)
            .unwrap();
    }
    assert_eq!(
        map.add_region(r(0x1_0000_0000, 0x1000), RegionKind::Usable),
        Err(MapError::TooManyRegions { max: MAX_REGIONS })
    );
    // Empty regions never count.
    map.add_region(r(0x1_0000_0000, 0), RegionKind::Usable)
        .unwrap();
    for i in 0..MAX_RESERVATIONS as u64 {
        map.reserve(r(i * 0x10000, 0x1000), "r").unwrap();
    }
    let before = map.usable().to_vec();
    assert_eq!(
        map.reserve(r(0x5000, 0x1000), "one too many"),
        Err(MapError::TooManyReservations {
            max: MAX_RESERVATIONS
        })
    );
    assert_eq!(map.usable(), before, "a failed reserve changes nothing");
    assert_eq!(map.usable().len(), MAX_REGIONS);
    assert!(map.usable().iter().take(64).all(|u| u.len() == 0x7000));
}

#[test]
fn carve_takes_the_highest_fitting_block_and_reserves_it() {
    let mut map = q35_map();
    let a = map.carve(0x1800, 0x1000, PhysRange::ALL, "a").unwrap();
    assert_eq!(a, span(0x7fde000, 0x7fe0000), "rounded up to whole frames");
    let b = map.carve(0x1000, 2 * MIB, PhysRange::ALL, "b").unwrap();
    assert_eq!(b, span(0x7e00000, 0x7e01000));
    let c = map.carve(3 * MIB, 4096, span(0, 4 * MIB), "c").unwrap();
    assert_eq!(c, span(MIB, 4 * MIB));
    assert_eq!(
        map.carve(0x1000, 0x1000, span(MIB, 4 * MIB), "d"),
        Err(MapError::NoSpace {
            size: 0x1000,
            align: 0x1000
        })
    );
    assert_eq!(
        map.carve(0x1000, 0x3000, PhysRange::ALL, "e"),
        Err(MapError::BadAlignment { align: 0x3000 })
    );
    assert_eq!(
        map.carve(u64::MAX, 0x1000, PhysRange::ALL, "f"),
        Err(MapError::NoSpace {
            size: u64::MAX,
            align: 0x1000
        })
    );
    for block in [a, b, c] {
        assert!(map.usable().iter().all(|u| !u.overlaps(block)));
    }
    let whys: Vec<&str> = map.reservations().iter().map(|r| r.why).collect();
    assert_eq!(whys, ["c", "b", "a"]);
}

#[test]
fn display_for_the_boot_log() {
    let (map, _) = q35_booted();
    assert_eq!(
        map.regions()[3].to_string(),
        "[0x0000000000100000-0x0000000007fe0000)  126.8 MiB usable"
    );
    assert_eq!(
        map.reservations()[2].to_string(),
        "[0x0000000000200000-0x0000000000340000)    1.2 MiB kernel image"
    );
    assert_eq!(
        MapError::NoSpace {
            size: 8192,
            align: 4096
        }
        .to_string(),
        "no usable memory block of 8 KiB aligned to 0x1000"
    );
    assert_eq!(PhysAddr::new(0x1000).to_string(), "0x1000");
}
