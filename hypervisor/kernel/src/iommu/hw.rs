//! The kernel's implementations of `moat-vtd`'s hardware traits: a unit's uncached register
//! window, table memory from the frame allocator (identity mapped, cache lines flushed for
//! non-coherent walks), and a TSC clock.

use moat_vtd::{Clock, DmaMemory, PhysAddr, RegisterWindow};

use crate::arch::tsc;
use crate::mm::frames;

/// One remapping unit's registers at `base` (mapped uncached by [`crate::mm::space::map_mmio`]).
pub struct Mmio {
    base: u64,
    len: usize,
}

impl Mmio {
    /// A window of `len` bytes at `base`. The caller has mapped it uncached.
    pub fn new(base: u64, len: usize) -> Self {
        Self { base, len }
    }

    fn addr(&self, offset: usize, width: usize) -> u64 {
        // The driver only uses offsets inside the register set; anything else is a bug that
        // must not turn into a stray MMIO access.
        assert!(
            offset + width <= self.len,
            "VT-d register offset {offset:#x} out of window"
        );
        self.base + offset as u64
    }
}

impl RegisterWindow for Mmio {
    fn read32(&mut self, offset: usize) -> u32 {
        // SAFETY: inside this unit's uncached register window (checked in addr).
        unsafe { core::ptr::read_volatile(self.addr(offset, 4) as *const u32) }
    }
    fn read64(&mut self, offset: usize) -> u64 {
        // SAFETY: as read32.
        unsafe { core::ptr::read_volatile(self.addr(offset, 8) as *const u64) }
    }
    fn write32(&mut self, offset: usize, value: u32) {
        // SAFETY: as read32; register writes only affect this remapping unit.
        unsafe { core::ptr::write_volatile(self.addr(offset, 4) as *mut u32, value) }
    }
    fn write64(&mut self, offset: usize, value: u64) {
        // SAFETY: as write32.
        unsafe { core::ptr::write_volatile(self.addr(offset, 8) as *mut u64, value) }
    }
}

/// Table memory: frames from the global allocator, accessed through the identity map.
pub struct KernelMemory;

impl DmaMemory for KernelMemory {
    fn alloc_frame(&mut self) -> Option<PhysAddr> {
        frames::alloc_zeroed()
    }
    fn free_frame(&mut self, frame: PhysAddr) {
        frames::free(frame)
    }
    fn read_u64(&self, addr: PhysAddr) -> u64 {
        // SAFETY: the driver only reads inside frames it allocated (identity-mapped RAM).
        unsafe { core::ptr::read_volatile(addr as *const u64) }
    }
    fn write_u64(&mut self, addr: PhysAddr, value: u64) {
        // SAFETY: the driver only writes inside frames it allocated and owns.
        unsafe { core::ptr::write_volatile(addr as *mut u64, value) }
    }
    fn read_u32(&self, addr: PhysAddr) -> u32 {
        // SAFETY: as read_u64.
        unsafe { core::ptr::read_volatile(addr as *const u32) }
    }
    fn write_u32(&mut self, addr: PhysAddr, value: u32) {
        // SAFETY: as write_u64.
        unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
    }
    fn flush_cache(&mut self, addr: PhysAddr, len: usize) {
        let mut line = addr & !63;
        while line < addr + len as u64 {
            // SAFETY: clflush of a mapped address only writes the line back.
            unsafe {
                core::arch::asm!("clflush [{}]", in(reg) line, options(nostack, preserves_flags))
            };
            line += 64;
        }
        // SAFETY: a fence has no side effect beyond ordering.
        unsafe { core::arch::asm!("mfence", options(nostack, preserves_flags)) };
    }
}

/// Nanoseconds from the calibrated TSC.
pub struct TscClock;

impl Clock for TscClock {
    fn now_ns(&self) -> u64 {
        tsc::cycles_to_ns(crate::arch::x86::rdtsc())
    }
}
