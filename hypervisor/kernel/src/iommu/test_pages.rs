//! Data frames the VT-d self-test owns: allocated from the frame allocator, freed when dropped,
//! and read and written only through volatile accesses (the edu device writes them by DMA
//! behind the compiler's back). No safe function here turns an integer into a reference.

use core::marker::PhantomData;

use crate::mm::{frames, PhysAddr, PAGE_SIZE};

/// `count` physically contiguous frames owned by the holder (identity mapped RW, as every frame
/// the allocator hands out).
pub struct Frames {
    phys: PhysAddr,
    count: u64,
}

impl Frames {
    /// One zeroed frame, or `None` when the allocator is out of frames.
    pub fn one() -> Option<Frames> {
        frames::alloc_zeroed().map(|phys| Frames { phys, count: 1 })
    }

    /// `count` contiguous frames aligned to `align` bytes (contents undefined).
    pub fn contiguous(count: u64, align: u64) -> Option<Frames> {
        frames::alloc_contiguous(count, align).map(|phys| Frames { phys, count })
    }

    /// The physical (and identity-mapped virtual) address of the first frame.
    pub fn phys(&self) -> PhysAddr {
        self.phys
    }

    /// Frame `i` of the allocation (the last one when `i` is past the end).
    pub fn page(&self, i: u64) -> Page<'_> {
        Page {
            phys: self.phys + i.min(self.count - 1) * PAGE_SIZE,
            _owner: PhantomData,
        }
    }
}

impl Drop for Frames {
    fn drop(&mut self) {
        if self.count == 1 {
            frames::free(self.phys);
        } else {
            frames::free_contiguous(self.phys, self.count);
        }
    }
}

/// One 4 KiB frame of a [`Frames`] allocation, borrowed from it.
#[derive(Clone, Copy)]
pub struct Page<'a> {
    phys: PhysAddr,
    _owner: PhantomData<&'a Frames>,
}

impl Page<'_> {
    /// The frame's physical address.
    pub fn phys(self) -> PhysAddr {
        self.phys
    }

    /// The byte at `offset` (taken modulo the page size).
    pub fn byte(self, offset: u64) -> u8 {
        let p = (self.phys + offset % PAGE_SIZE).as_u64() as *const u8;
        // SAFETY: `p` lies in a frame the borrowed `Frames` owns, identity mapped RW; a
        // volatile read of a byte a device may be writing is defined.
        unsafe { p.read_volatile() }
    }

    /// Writes `v` at `offset` (taken modulo the page size).
    pub fn set(self, offset: u64, v: u8) {
        let p = (self.phys + offset % PAGE_SIZE).as_u64() as *mut u8;
        // SAFETY: as in `byte`; no reference to the frame exists, so nothing aliases the write.
        unsafe { p.write_volatile(v) }
    }

    /// Sets every byte of the frame to `v`.
    pub fn fill(self, v: u8) {
        (0..PAGE_SIZE).for_each(|i| self.set(i, v));
    }

    /// The bytes `0..len` as an iterator (each read once, volatile).
    pub fn bytes(self, len: u64) -> impl Iterator<Item = u8> {
        (0..len.min(PAGE_SIZE)).map(move |i| self.byte(i))
    }
}
