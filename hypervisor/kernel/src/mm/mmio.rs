//! Device MMIO: one window type for every register block the kernel drives (the local APIC,
//! PCI ECAM configuration space, the edu test device, VT-d remapping units).
//!
//! Making an [`Mmio`] is the `unsafe` step, with the contract below; its accessors are safe:
//! every access is volatile, of exactly the width asked for, naturally aligned and inside the
//! window (anything else panics rather than touching a stray address).

use super::PhysAddr;

/// A window of `len` bytes of device registers at physical (identity-mapped) address `base`.
#[derive(Debug)]
pub struct Mmio {
    base: PhysAddr,
    len: usize,
}

impl Mmio {
    /// The register window `[base, base + len)`.
    ///
    /// # Safety
    ///
    /// The caller guarantees, for as long as the value (or any made from the same range)
    /// is used:
    /// - the range is device MMIO (register space of one device, no RAM the kernel or a
    ///   guest uses), so loads and stores there touch no Rust-visible memory;
    /// - it is mapped uncached at the same virtual address (identity map), e.g. by
    ///   [`crate::mm::space::map_mmio`];
    /// - the caller owns the device: no other code programs it behind the caller's back,
    ///   and any register access allowed by the bounds checks is one the caller may make
    ///   (programming DMA through it stays the caller's responsibility).
    pub const unsafe fn new(base: PhysAddr, len: usize) -> Self {
        Self { base, len }
    }

    /// The address of the `width`-byte register at `offset`; panics unless it is naturally
    /// aligned and inside the window.
    fn at(&self, offset: usize, width: usize) -> u64 {
        let inside = offset.checked_add(width).is_some_and(|end| end <= self.len);
        let addr = self.base.as_u64().wrapping_add(offset as u64);
        assert!(
            inside && addr.is_multiple_of(width as u64),
            "MMIO access of {width} bytes at {offset:#x}: outside or misaligned in the \
             {:#x}-byte window at {:#x}",
            self.len,
            self.base
        );
        addr
    }

    /// Volatile 32-bit load of the register at `offset`.
    pub fn read32(&self, offset: usize) -> u32 {
        let a = self.at(offset, 4);
        // SAFETY: inside the window (checked in `at`), which `new`'s contract makes mapped,
        // uncached device registers; the address is 4-byte aligned.
        unsafe { core::ptr::read_volatile(a as *const u32) }
    }

    /// Volatile 64-bit load of the register at `offset` (one 64-bit access).
    pub fn read64(&self, offset: usize) -> u64 {
        let a = self.at(offset, 8);
        // SAFETY: as `read32`, 8-byte aligned.
        unsafe { core::ptr::read_volatile(a as *const u64) }
    }

    /// Volatile 32-bit store to the register at `offset`.
    pub fn write32(&self, offset: usize, value: u32) {
        let a = self.at(offset, 4);
        // SAFETY: as `read32`; by `new`'s contract a register write only affects the device
        // the caller owns, no Rust-visible memory.
        unsafe { core::ptr::write_volatile(a as *mut u32, value) }
    }

    /// Volatile 64-bit store to the register at `offset` (one 64-bit access).
    pub fn write64(&self, offset: usize, value: u64) {
        let a = self.at(offset, 8);
        // SAFETY: as `write32`, 8-byte aligned.
        unsafe { core::ptr::write_volatile(a as *mut u64, value) }
    }
}
