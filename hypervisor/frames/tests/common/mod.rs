//! Shared fixtures.
#![allow(dead_code)]

use moat_frames::{MemoryMap, PhysAddr, PhysRange, RegionKind};

/// `[start, start + len)`.
pub fn r(start: u64, len: u64) -> PhysRange {
    PhysRange::from_start_len(PhysAddr::new(start), len)
}

/// `[start, end)`.
pub fn span(start: u64, end: u64) -> PhysRange {
    PhysRange::new(PhysAddr::new(start), PhysAddr::new(end)).unwrap()
}

pub const MIB: u64 = 1 << 20;

/// A map with one usable region, `[start, end)`.
pub fn usable_map(start: u64, end: u64) -> MemoryMap {
    let mut map = MemoryMap::new();
    map.add_region(span(start, end), RegionKind::Usable)
        .unwrap();
    map
}

/// The e820 map SeaBIOS gives a QEMU q35 machine with 128 MiB (`-m 128`), as multiboot2
/// (type, start, length) entries.
pub const Q35_SEABIOS_128M: [(u32, u64, u64); 9] = [
    (1, 0x0, 0x9fc00),
    (2, 0x9fc00, 0x400),
    (2, 0xf0000, 0x10000),
    (1, 0x100000, 0x7ee0000),
    (2, 0x7fe0000, 0x20000),
    (2, 0xb0000000, 0x10000000),
    (2, 0xfed1c000, 0x4000),
    (2, 0xfeffc000, 0x4000),
    (2, 0xfffc0000, 0x40000),
];

/// The q35 firmware map alone.
pub fn q35_map() -> MemoryMap {
    let mut map = MemoryMap::new();
    for (kind, start, len) in Q35_SEABIOS_128M {
        map.add_region(r(start, len), RegionKind::from_multiboot(kind))
            .unwrap();
    }
    map
}

/// The q35 map after the kernel's boot reservations: an image of 1.25 MiB at 2 MiB, a
/// multiboot2 info block, the AP trampoline page taken below 1 MiB, then the first MiB.
pub fn q35_booted() -> (MemoryMap, PhysRange) {
    let mut map = q35_map();
    map.reserve(r(0x200000, 0x140000), "kernel image").unwrap();
    map.reserve(r(0x341230, 0x2a8), "multiboot2 info").unwrap();
    let trampoline = map
        .carve(4096, 4096, span(0x1000, MIB), "AP trampoline")
        .unwrap();
    map.reserve(span(0, MIB), "first MiB").unwrap();
    (map, trampoline)
}
