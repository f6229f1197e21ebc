//! The hypervisor's own 4-level page tables: an identity map of RAM with W^X (text RX, rodata
//! R+NX, data RW+NX, everything else NX), MMIO mapped uncached on demand, page 0 unmapped.

use bitflags::bitflags;

use super::{frames, PAGE_SIZE};

bitflags! {
    /// x86_64 page-table entry flags.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Pte: u64 {
        const PRESENT = 1 << 0;
        const WRITABLE = 1 << 1;
        const USER = 1 << 2;
        const PWT = 1 << 3;
        const PCD = 1 << 4;
        const ACCESSED = 1 << 5;
        const DIRTY = 1 << 6;
        /// Large page (2 MiB in a PD, 1 GiB in a PDPT).
        const HUGE = 1 << 7;
        const GLOBAL = 1 << 8;
        const NO_EXECUTE = 1 << 63;
    }
}

const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
const HUGE_2M: u64 = 2 << 20;

impl Pte {
    /// Read-only data: present, no-execute.
    pub const RO: Pte = Pte::PRESENT.union(Pte::NO_EXECUTE);
    /// Read-write data.
    pub const RW: Pte = Pte::PRESENT.union(Pte::WRITABLE).union(Pte::NO_EXECUTE);
    /// Code: present, executable, read-only.
    pub const RX: Pte = Pte::PRESENT;
    /// Device memory: read-write, uncached, no-execute.
    pub const MMIO: Pte = Pte::RW.union(Pte::PCD).union(Pte::PWT);
}

/// Errors from mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapError {
    /// No frame for a page-table page.
    OutOfFrames,
    /// Address or length not page aligned.
    Unaligned,
}

/// Flags accumulated down the levels: a lower level can only take write access away (every
/// level must set W) and add no-execute (any level's NX applies); the other bits are the
/// lower level's.
fn combine(upper: Pte, lower: Pte) -> Pte {
    let w = upper.contains(Pte::WRITABLE) && lower.contains(Pte::WRITABLE);
    let nx = upper.contains(Pte::NO_EXECUTE) || lower.contains(Pte::NO_EXECUTE);
    let mut f = lower - Pte::WRITABLE - Pte::NO_EXECUTE;
    f.set(Pte::WRITABLE, w);
    f.set(Pte::NO_EXECUTE, nx);
    f
}

/// A 4-level address space (identity mapped, so virtual = physical).
pub struct AddressSpace {
    pml4: u64,
}

fn table(phys: u64) -> &'static mut [u64; 512] {
    // SAFETY: page-table pages are frames owned by this address space, identity mapped and
    // only touched under the kernel address-space lock.
    unsafe { &mut *(phys as *mut [u64; 512]) }
}

impl AddressSpace {
    /// An empty address space.
    pub fn new() -> Result<Self, MapError> {
        Ok(Self {
            pml4: frames::alloc_zeroed().ok_or(MapError::OutOfFrames)?,
        })
    }

    /// Physical address of the PML4 (the CR3 value).
    pub fn root(&self) -> u64 {
        self.pml4
    }

    /// Returns the next-level table behind `entry`, creating it (or splitting a 2 MiB page into
    /// 4 KiB pages with the same flags) if needed.
    fn next_table(entry: &mut u64, split_huge: bool) -> Result<u64, MapError> {
        let flags = Pte::from_bits_retain(*entry);
        if !flags.contains(Pte::PRESENT) {
            let t = frames::alloc_zeroed().ok_or(MapError::OutOfFrames)?;
            *entry = t | (Pte::PRESENT | Pte::WRITABLE).bits();
            return Ok(t);
        }
        if flags.contains(Pte::HUGE) {
            debug_assert!(split_huge);
            let base = *entry & ADDR_MASK & !(HUGE_2M - 1);
            let leaf = (flags - Pte::HUGE - Pte::ACCESSED - Pte::DIRTY)
                & !Pte::from_bits_retain(ADDR_MASK);
            let t = frames::alloc_zeroed().ok_or(MapError::OutOfFrames)?;
            for (i, e) in table(t).iter_mut().enumerate() {
                *e = (base + i as u64 * PAGE_SIZE) | leaf.bits();
            }
            *entry = t | (Pte::PRESENT | Pte::WRITABLE).bits();
            return Ok(t);
        }
        Ok(*entry & ADDR_MASK)
    }

    /// Identity-maps `[phys, phys + len)` with `flags`, using 2 MiB pages where aligned,
    /// replacing whatever was mapped there.
    pub fn map(&mut self, phys: u64, len: u64, flags: Pte) -> Result<(), MapError> {
        if !phys.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(MapError::Unaligned);
        }
        let mut a = phys;
        let end = phys + len;
        while a < end {
            let l4 = &mut table(self.pml4)[(a >> 39) as usize & 511];
            let pdpt = Self::next_table(l4, false)?;
            let l3 = &mut table(pdpt)[(a >> 30) as usize & 511];
            let pd = Self::next_table(l3, true)?;
            let l2 = &mut table(pd)[(a >> 21) as usize & 511];
            if a.is_multiple_of(HUGE_2M) && end - a >= HUGE_2M {
                // A whole 2 MiB page; a page table that was here is dropped (its frame leaks
                // only if the range was mapped twice with different granularity, which the
                // boot-time builder does not do for 2 MiB-covered ranges).
                *l2 = a | (flags | Pte::HUGE).bits();
                a += HUGE_2M;
                continue;
            }
            let pt = Self::next_table(l2, true)?;
            table(pt)[(a >> 12) as usize & 511] = a | flags.bits();
            a += PAGE_SIZE;
        }
        Ok(())
    }

    /// Removes the 4 KiB mapping of `phys` (splitting a 2 MiB page if needed).
    pub fn unmap_page(&mut self, phys: u64) -> Result<(), MapError> {
        let l4 = &mut table(self.pml4)[(phys >> 39) as usize & 511];
        let pdpt = Self::next_table(l4, false)?;
        let l3 = &mut table(pdpt)[(phys >> 30) as usize & 511];
        let pd = Self::next_table(l3, true)?;
        let l2 = &mut table(pd)[(phys >> 21) as usize & 511];
        let pt = Self::next_table(l2, true)?;
        table(pt)[(phys >> 12) as usize & 511] = 0;
        Ok(())
    }

    /// Looks up the flags of the 4 KiB page at `virt` (for self-checks).
    pub fn lookup(&self, virt: u64) -> Option<(u64, Pte)> {
        let e4 = table(self.pml4)[(virt >> 39) as usize & 511];
        if e4 & 1 == 0 {
            return None;
        }
        let e3 = table(e4 & ADDR_MASK)[(virt >> 30) as usize & 511];
        if e3 & 1 == 0 {
            return None;
        }
        let e2 = table(e3 & ADDR_MASK)[(virt >> 21) as usize & 511];
        if e2 & 1 == 0 {
            return None;
        }
        if e2 & Pte::HUGE.bits() != 0 {
            let base = e2 & ADDR_MASK & !(HUGE_2M - 1);
            return Some((
                base + (virt & (HUGE_2M - 1)),
                Pte::from_bits_retain(e2 & !ADDR_MASK),
            ));
        }
        let e1 = table(e2 & ADDR_MASK)[(virt >> 12) as usize & 511];
        if e1 & 1 == 0 {
            return None;
        }
        Some((e1 & ADDR_MASK, Pte::from_bits_retain(e1 & !ADDR_MASK)))
    }

    /// Flags of the 4 KiB page at `virt` as the CPU applies them: writable only if every
    /// level allows writes, no-execute if any level forbids execution (for the W^X check).
    pub fn effective_flags(&self, virt: u64) -> Option<Pte> {
        let mut acc = Pte::PRESENT | Pte::WRITABLE;
        let mut t = self.pml4;
        for shift in [39u64, 30, 21, 12] {
            let e = table(t)[(virt >> shift) as usize & 511];
            let f = Pte::from_bits_retain(e & !ADDR_MASK);
            if !f.contains(Pte::PRESENT) {
                return None;
            }
            acc = combine(acc, f);
            if shift == 12 || (shift == 21 && f.contains(Pte::HUGE)) {
                return Some(acc);
            }
            t = e & ADDR_MASK;
        }
        None
    }

    /// Calls `f(address, size, effective flags)` for every present leaf (4 KiB or 2 MiB page)
    /// of the address space, in address order (for the W^X check of every page).
    pub fn for_each_leaf(&self, mut f: impl FnMut(u64, u64, Pte)) {
        let root = Pte::PRESENT | Pte::WRITABLE;
        for (i4, &e4) in table(self.pml4).iter().enumerate() {
            let f4 = Pte::from_bits_retain(e4 & !ADDR_MASK);
            if !f4.contains(Pte::PRESENT) {
                continue;
            }
            let a4 = combine(root, f4);
            for (i3, &e3) in table(e4 & ADDR_MASK).iter().enumerate() {
                let f3 = Pte::from_bits_retain(e3 & !ADDR_MASK);
                if !f3.contains(Pte::PRESENT) {
                    continue;
                }
                // The builder never makes 1 GiB pages: a HUGE bit here is not followed.
                let a3 = combine(a4, f3);
                let base3 = (i4 as u64) << 39 | (i3 as u64) << 30;
                if f3.contains(Pte::HUGE) {
                    f(base3, 1 << 30, a3);
                    continue;
                }
                for (i2, &e2) in table(e3 & ADDR_MASK).iter().enumerate() {
                    let f2 = Pte::from_bits_retain(e2 & !ADDR_MASK);
                    if !f2.contains(Pte::PRESENT) {
                        continue;
                    }
                    let a2 = combine(a3, f2);
                    let base2 = base3 | (i2 as u64) << 21;
                    if f2.contains(Pte::HUGE) {
                        f(base2, HUGE_2M, a2);
                        continue;
                    }
                    for (i1, &e1) in table(e2 & ADDR_MASK).iter().enumerate() {
                        let f1 = Pte::from_bits_retain(e1 & !ADDR_MASK);
                        if f1.contains(Pte::PRESENT) {
                            f(base2 | (i1 as u64) << 12, PAGE_SIZE, combine(a2, f1));
                        }
                    }
                }
            }
        }
    }

    /// Switches this CPU to the address space.
    ///
    /// # Safety
    /// The address space must map the running code, stack and all data in use.
    pub unsafe fn activate(&self) {
        // SAFETY: contract above.
        unsafe { crate::arch::x86::write_cr3(self.pml4) };
    }
}
