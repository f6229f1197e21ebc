//! Nested page tables: the second translation stage (guest-physical to host-physical) of AMD
//! SVM. The format is the ordinary x86_64 4-level format; QEMU walks these tables as user
//! accesses, so every entry carries the U bit (see the platform notes). The tables are a
//! `moat_ptab` engine in the [`moat_ptab::format::Npt`] format over the host table memory.

use moat_ptab::{Config, NoSink, PageTable};

use crate::mm::tables::HostTables;
use crate::mm::PhysAddr;

/// Nested page-table entry flags.
pub use moat_ptab::format::NptFlags;

/// 4 levels, 48-bit guest-physical addresses, 2 MiB pages (no 1 GiB pages, as before).
const CONFIG: Config = Config {
    levels: 4,
    va_bits: 48,
    pa_bits: 52,
    superpages: 1 << 2,
    coherent: true,
};

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
    tables: PageTable<moat_ptab::format::Npt>,
}

impl Npt {
    /// Empty tables.
    pub fn new() -> Result<Self, NptError> {
        Ok(Npt {
            tables: PageTable::new(&HostTables, CONFIG).map_err(|_| NptError::OutOfFrames)?,
        })
    }

    /// Physical address of the PML4 (the VMCB's `N_CR3`).
    pub fn root(&self) -> PhysAddr {
        self.tables.root()
    }

    /// Maps guest-physical `[gpa, gpa + len)` to host-physical `[hpa, hpa + len)` with
    /// `flags`, using 2 MiB pages where both sides are aligned. Refuses to replace a mapping
    /// (and then leaves the tables as they were).
    pub fn map(
        &mut self,
        gpa: u64,
        hpa: PhysAddr,
        len: u64,
        flags: NptFlags,
    ) -> Result<(), NptError> {
        if len == 0 && (gpa | hpa.as_u64()).is_multiple_of(crate::mm::PAGE_SIZE) && gpa <= GPA_LIMIT
        {
            return Ok(());
        }
        self.tables
            .map(&HostTables, gpa, hpa, len, flags, &mut NoSink)
            .map_err(|e| match e {
                moat_ptab::Error::NoMemory => NptError::OutOfFrames,
                moat_ptab::Error::AlreadyMapped { .. } => NptError::Overlap,
                _ => NptError::BadRange,
            })
    }

    /// The host-physical address `gpa` maps to, if any (for checks and diagnostics).
    pub fn translate(&self, gpa: u64) -> Option<PhysAddr> {
        self.tables.translate(&HostTables, gpa).map(|t| t.phys)
    }
}
