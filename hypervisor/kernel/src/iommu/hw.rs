//! The kernel's implementations of `moat-vtd`'s hardware traits: a unit's uncached register
//! window, table memory from the frame allocator (identity mapped, cache lines flushed for
//! non-coherent walks), and a TSC clock.

use moat_vtd::regs::{Readable, Reg, Writable};
use moat_vtd::{Clock, DmaMemory, PhysAddr, RegisterWindow};

use crate::arch::tsc;
use crate::mm::frames;
use crate::mm::mmio::Mmio;

/// A unit's registers: its [`Mmio`] window (the DRHD register set, mapped uncached by
/// [`crate::mm::space::map_mmio`]) accessed by typed register; an offset past the register
/// set the DRHD reports panics in [`Mmio`] instead of touching a stray address.
impl RegisterWindow for Mmio {
    fn read32<A: Readable>(&mut self, reg: Reg<u32, A>) -> u32 {
        Mmio::read32(self, reg.offset())
    }
    fn read64<A: Readable>(&mut self, reg: Reg<u64, A>) -> u64 {
        Mmio::read64(self, reg.offset())
    }
    fn write32<A: Writable>(&mut self, reg: Reg<u32, A>, value: u32) {
        Mmio::write32(self, reg.offset(), value)
    }
    fn write64<A: Writable>(&mut self, reg: Reg<u64, A>, value: u64) {
        Mmio::write64(self, reg.offset(), value)
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
