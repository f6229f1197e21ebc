//! The kernel's implementations of `moat-vtd`'s hardware traits: a unit's uncached register
//! window, table memory from the frame allocator (identity mapped, every access checked against
//! the VT-d frame set, cache lines flushed for non-coherent walks), and a TSC clock.

use moat_vtd::regs::{Readable, Reg, Writable};
use moat_vtd::{Clock, DmaMemory, PhysAddr, RegisterWindow};

use crate::arch::tsc;
use crate::mm::mmio::Mmio;
use crate::mm::tables::DMA_FRAMES;

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

/// VT-d memory: frames from the global allocator recorded in [`DMA_FRAMES`], accessed
/// through the identity map. Every access is checked against the set (see `mm::tables`), so
/// the safe accessors cannot reach memory the kernel's Rust code owns.
pub struct KernelMemory;

/// Frames, 64-bit words and cache flushes are the page-table engine's view of the same
/// frames (the unit frees unlinked table pages with [`DmaMemory::free_frame`]).
impl DmaMemory for KernelMemory {
    fn read_u32(&self, addr: PhysAddr) -> u32 {
        DMA_FRAMES.check(addr, 4);
        // SAFETY: checked: 4-byte aligned inside a VT-d frame (identity-mapped RAM no Rust
        // reference points to); the hardware writes status words there, hence volatile.
        unsafe { core::ptr::read_volatile(addr.as_u64() as *const u32) }
    }
    fn write_u32(&mut self, addr: PhysAddr, value: u32) {
        DMA_FRAMES.check(addr, 4);
        // SAFETY: as read_u32.
        unsafe { core::ptr::write_volatile(addr.as_u64() as *mut u32, value) }
    }
}

crate::mm::tables::table_memory_in!(KernelMemory, DMA_FRAMES);

/// Nanoseconds from the calibrated TSC.
pub struct TscClock;

impl Clock for TscClock {
    fn now_ns(&self) -> u64 {
        tsc::cycles_to_ns(crate::arch::x86::rdtsc())
    }
}
