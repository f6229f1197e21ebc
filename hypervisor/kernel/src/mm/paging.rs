//! The hypervisor's own 4-level page tables: an identity map of RAM with W^X (text RX, rodata
//! R+NX, data RW+NX, everything else NX), MMIO mapped uncached on demand, page 0 unmapped.
//!
//! The tables are a `moat_ptab` engine in the [`X86`] format over [`HostTables`]; this module
//! adds the rebuild-in-place semantics of the boot-time builder and the W^X views.

use moat_ptab::format::{is_leaf, X86};
use moat_ptab::{level_size, Config, PageTable};

use super::tables::HostTables;
use super::{PhysAddr, PAGE_SIZE};

/// x86_64 page-table entry flags.
pub use moat_ptab::format::X86Flags as Pte;

const ADDR_MASK: u64 = moat_ptab::format::ADDR_MASK;

/// 4 levels, 48-bit addresses, 2 MiB pages (no 1 GiB pages, as before the engine): the
/// configuration of the hypervisor's own tables and of the guests' NPT and EPT.
pub(crate) const CONFIG: Config = Config {
    levels: 4,
    va_bits: 48,
    pa_bits: 52,
    superpages: 1 << 2,
    coherent: true,
};

/// Errors from mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapError {
    /// No frame for a page-table page.
    OutOfFrames,
    /// Address or length not page aligned (or beyond the 48-bit address space).
    Unaligned,
    /// The flags do not make the page present.
    NotPresent,
}

impl From<moat_ptab::Error> for MapError {
    fn from(e: moat_ptab::Error) -> Self {
        match e {
            moat_ptab::Error::NoMemory => MapError::OutOfFrames,
            moat_ptab::Error::NoAccess => MapError::NotPresent,
            _ => MapError::Unaligned,
        }
    }
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

fn flags(e: u64) -> Pte {
    Pte::from_bits_retain(e & !ADDR_MASK)
}

/// A 4-level address space (identity mapped, so virtual = physical).
pub struct AddressSpace {
    tables: PageTable<X86>,
}

impl AddressSpace {
    /// An empty address space.
    pub fn new() -> Result<Self, MapError> {
        Ok(Self {
            tables: PageTable::new(&HostTables, CONFIG)?,
        })
    }

    /// Physical address of the PML4 (the CR3 value).
    pub fn root(&self) -> PhysAddr {
        self.tables.root()
    }

    /// Identity-maps `[phys, phys + len)` with `flags`, using 2 MiB pages where aligned,
    /// replacing whatever was mapped there (a 2 MiB page partly replaced is split into 4 KiB
    /// pages with its flags; where a table is linked the pages go into it).
    pub fn map(&mut self, phys: PhysAddr, len: u64, flags: Pte) -> Result<(), MapError> {
        if !phys.is_page_aligned() || !len.is_multiple_of(PAGE_SIZE) {
            return Err(MapError::Unaligned);
        }
        if len == 0 {
            return Ok(());
        }
        Ok(self
            .tables
            .remap(&HostTables, phys.as_u64(), phys, len, Some(flags))?)
    }

    /// Removes the 4 KiB mapping of `phys` (splitting a 2 MiB page if needed).
    pub fn unmap_page(&mut self, phys: PhysAddr) -> Result<(), MapError> {
        Ok(self.tables.remap(
            &HostTables,
            phys.as_u64(),
            PhysAddr::new(0),
            PAGE_SIZE,
            None,
        )?)
    }

    /// Looks up the address and flags of the page at `virt` (for self-checks).
    pub fn lookup(&self, virt: u64) -> Option<(PhysAddr, Pte)> {
        let (e, level) = self.tables.walk(&HostTables, virt);
        if e & Pte::PRESENT.bits() == 0 {
            return None;
        }
        if level == 1 {
            return Some((PhysAddr::new(e & ADDR_MASK), flags(e)));
        }
        let size = level_size(level);
        let phys = (e & ADDR_MASK & !(size - 1)) + (virt & (size - 1));
        Some((PhysAddr::new(phys), flags(e)))
    }

    /// Flags of the page at `virt` as the CPU applies them: writable only if every level
    /// allows writes, no-execute if any level forbids execution (for the W^X check).
    pub fn effective_flags(&self, virt: u64) -> Option<Pte> {
        let mut acc = Pte::PRESENT | Pte::WRITABLE;
        let (e, _) = self
            .tables
            .walk_path(&HostTables, virt, |_, e| acc = combine(acc, flags(e)));
        (e & Pte::PRESENT.bits() != 0).then_some(acc)
    }

    /// Calls `f(address, size, effective flags)` for every present leaf (4 KiB, 2 MiB or
    /// 1 GiB page) of the address space, in address order (for the W^X check of every page).
    pub fn for_each_leaf(&self, mut f: impl FnMut(u64, u64, Pte)) {
        // acc[l]: the flags accumulated down to (and including) the last entry at level l.
        let mut acc = [Pte::PRESENT | Pte::WRITABLE; 6];
        self.tables.visit(&HostTables, |va, level, e| {
            let l = level as usize;
            acc[l] = combine(acc[l + 1], flags(e));
            if is_leaf(e, level) {
                f(va, level_size(level), acc[l]);
            }
        });
    }

    /// Switches this CPU to the address space.
    ///
    /// # Safety
    /// The address space must map the running code, stack and all data in use.
    pub unsafe fn activate(&self) {
        // SAFETY: contract above.
        unsafe { crate::arch::x86::write_cr3(self.tables.root()) };
    }
}
