//! Physical memory regions and the physical frame allocator.
//!
//! Two steps, no heap:
//!
//! 1. [`MemoryMap`]: the kernel adds the firmware's regions (multiboot2 memory map; any order,
//!    overlapping and unaligned entries allowed) and reserves what it must keep (kernel image,
//!    boot modules, multiboot2 info, ACPI tables, the first MiB, ...). The map keeps the
//!    *usable set*: RAM in a usable region, outside every other region and reservation, cut
//!    to whole 4 KiB frames. [`MemoryMap::carve`] takes blocks out of it before any
//!    allocator exists (the AP trampoline page below 1 MiB, the allocator's bitmap).
//! 2. [`FrameAllocator`]: a bitmap over the usable set, in caller-provided memory
//!    ([`FrameAllocator::bitmap_words`] words), handing out single frames and aligned
//!    contiguous runs, and catching double frees and frees of frames it never owned.
//!
//! [`PhysAddr`] is Moat's one host-physical address type and [`PAGE_SIZE`] its one hardware
//! page size: `moat-ptab` re-exports both (and `moat-vtd` and the kernel use them from there or
//! from here). Guest-physical addresses and IOVAs are not host-physical and stay `u64`.
//!
//! # Example
//!
//! ```
//! use moat_frames::{FrameAllocator, MemoryMap, PhysAddr, PhysRange, RegionKind};
//!
//! let mut map = MemoryMap::new();
//! let r = |start: u64, len: u64| PhysRange::from_start_len(PhysAddr::new(start), len);
//! map.add_region(r(0, 0x9fc00), RegionKind::Usable)?;
//! map.add_region(r(0x100000, 0x7ee0000), RegionKind::Usable)?;
//! map.reserve(r(0x200000, 0x80000), "kernel image")?;
//! let trampoline = map.carve(4096, 4096, r(0x1000, 0xff000), "AP trampoline")?;
//! map.reserve(r(0, 0x100000), "first MiB")?;
//!
//! let mut bitmap = vec![0u64; FrameAllocator::bitmap_words(&map)];
//! let mut frames = FrameAllocator::new(&map, &mut bitmap)?;
//! let page_table = frames.allocate()?;
//! let queue = frames.allocate_contiguous(1, 4096)?;
//! let heap = frames.allocate_contiguous(1024, 2 << 20)?; // 4 MiB, 2 MiB aligned
//! assert!(heap.start().is_aligned(2 << 20));
//! frames.free(page_table)?;
//! assert_eq!(trampoline.start().as_u64(), 0x9e000);
//! # let _ = queue;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

#[cfg(test)]
extern crate std;

mod addr;
mod alloc;
mod map;

pub use addr::{Bytes, Frame, PhysAddr, PhysRange, PAGE_SHIFT, PAGE_SIZE};
pub use alloc::{FrameAllocator, FrameError};
pub use map::{
    MapError, MemoryMap, Region, RegionKind, Reservation, MAX_REGIONS, MAX_RESERVATIONS, MAX_USABLE,
};
