//! Nested page tables: the second translation stage (guest-physical to host-physical) of AMD
//! SVM. The format is the ordinary x86_64 4-level format; QEMU walks these tables as user
//! accesses, so every entry carries the U bit (see the platform notes).

use bitflags::bitflags;

use crate::mm::{frames, PAGE_SIZE};

bitflags! {
    /// Nested page-table entry flags.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct NptFlags: u64 {
        /// Present.
        const PRESENT = 1 << 0;
        /// Writable.
        const WRITABLE = 1 << 1;
        /// User: required on every level of a nested walk.
        const USER = 1 << 2;
        /// Write-through.
        const PWT = 1 << 3;
        /// Cache disable.
        const PCD = 1 << 4;
        /// 2 MiB leaf (in a PD).
        const HUGE = 1 << 7;
        /// No execute.
        const NO_EXECUTE = 1 << 63;
    }
}

impl NptFlags {
    /// Guest RAM: read, write, execute.
    pub const RAM: NptFlags = NptFlags::PRESENT
        .union(NptFlags::WRITABLE)
        .union(NptFlags::USER);
    /// Device memory: read, write, uncached, no execute.
    pub const MMIO: NptFlags = NptFlags::RAM
        .union(NptFlags::PCD)
        .union(NptFlags::PWT)
        .union(NptFlags::NO_EXECUTE);
    const TABLE: NptFlags = NptFlags::RAM;
}

const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const HUGE_2M: u64 = 2 << 20;
/// Highest guest-physical address + 1 the tables accept (4-level: 48 bits).
pub const GPA_LIMIT: u64 = 1 << 48;

/// Errors building nested page tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NptError {
    /// No frame for a table page.
    OutOfFrames,
    /// Address or length not page aligned, or beyond [`GPA_LIMIT`].
    BadRange,
    /// The range overlaps something already mapped.
    Overlap,
}

/// One guest's nested page tables.
pub struct Npt {
    root: u64,
}

fn table(phys: u64) -> &'static mut [u64; 512] {
    // SAFETY: table pages are zeroed frames owned by this `Npt`, identity mapped RW in the
    // hypervisor; they are only written while the guest is being built (before any vCPU runs).
    unsafe { &mut *(phys as *mut [u64; 512]) }
}

fn index(gpa: u64, level: u32) -> usize {
    ((gpa >> (12 + 9 * level)) & 511) as usize
}

impl Npt {
    /// Empty tables.
    pub fn new() -> Result<Self, NptError> {
        Ok(Npt {
            root: frames::alloc_zeroed().ok_or(NptError::OutOfFrames)?,
        })
    }

    /// Physical address of the PML4 (the VMCB's `N_CR3`).
    pub fn root(&self) -> u64 {
        self.root
    }

    fn next(entry: &mut u64) -> Result<u64, NptError> {
        if *entry & NptFlags::PRESENT.bits() == 0 {
            let t = frames::alloc_zeroed().ok_or(NptError::OutOfFrames)?;
            *entry = t | NptFlags::TABLE.bits();
            return Ok(t);
        }
        if *entry & NptFlags::HUGE.bits() != 0 {
            return Err(NptError::Overlap);
        }
        Ok(*entry & ADDR_MASK)
    }

    /// Maps guest-physical `[gpa, gpa + len)` to host-physical `[hpa, hpa + len)` with
    /// `flags`, using 2 MiB pages where both sides are aligned. Refuses to replace a mapping.
    pub fn map(&mut self, gpa: u64, hpa: u64, len: u64, flags: NptFlags) -> Result<(), NptError> {
        let aligned = (gpa | hpa | len).is_multiple_of(PAGE_SIZE);
        let end = gpa.checked_add(len).ok_or(NptError::BadRange)?;
        if !aligned || end > GPA_LIMIT || hpa.checked_add(len).is_none() {
            return Err(NptError::BadRange);
        }
        let mut off = 0;
        while off < len {
            let (g, h) = (gpa + off, hpa + off);
            let l4 = &mut table(self.root)[index(g, 3)];
            let pdpt = Self::next(l4)?;
            let l3 = &mut table(pdpt)[index(g, 2)];
            let pd = Self::next(l3)?;
            let l2 = &mut table(pd)[index(g, 1)];
            if (g | h).is_multiple_of(HUGE_2M) && len - off >= HUGE_2M {
                if *l2 != 0 {
                    return Err(NptError::Overlap);
                }
                *l2 = h | (flags | NptFlags::HUGE).bits();
                off += HUGE_2M;
                continue;
            }
            let pt = Self::next(l2)?;
            let l1 = &mut table(pt)[index(g, 0)];
            if *l1 != 0 {
                return Err(NptError::Overlap);
            }
            *l1 = h | flags.bits();
            off += PAGE_SIZE;
        }
        Ok(())
    }

    /// The host-physical address `gpa` maps to, if any (for checks and diagnostics).
    pub fn translate(&self, gpa: u64) -> Option<u64> {
        if gpa >= GPA_LIMIT {
            return None;
        }
        let mut t = self.root;
        for level in (0..4).rev() {
            let e = table(t)[index(gpa, level)];
            if e & NptFlags::PRESENT.bits() == 0 {
                return None;
            }
            if level == 1 && e & NptFlags::HUGE.bits() != 0 {
                return Some((e & ADDR_MASK & !(HUGE_2M - 1)) + (gpa & (HUGE_2M - 1)));
            }
            if level == 0 {
                return Some((e & ADDR_MASK) + (gpa & (PAGE_SIZE - 1)));
            }
            t = e & ADDR_MASK;
        }
        None
    }
}
