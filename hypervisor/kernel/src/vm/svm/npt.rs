//! Nested page tables: the second translation stage (guest-physical to host-physical) of AMD
//! SVM. The format is the ordinary x86_64 4-level format; QEMU walks these tables as user
//! accesses, so every entry carries the U bit (see the platform notes). The tables are a
//! [`Stage2Tables`] in the [`moat_ptab::format::Npt`] format.

use crate::vm::vcpu::{MemKind, Stage2Tables};

/// Nested page-table entry flags.
pub use moat_ptab::format::NptFlags;

/// One guest's nested page tables (the root is the VMCB's `N_CR3`).
pub type Npt = Stage2Tables<moat_ptab::format::Npt>;

/// The leaf flags of a `kind` mapping.
pub fn flags(kind: MemKind) -> NptFlags {
    match kind {
        MemKind::Ram => NptFlags::RAM,
        MemKind::Mmio => NptFlags::MMIO,
    }
}
