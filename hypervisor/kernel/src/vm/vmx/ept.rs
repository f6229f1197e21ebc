//! Extended page tables: the second translation stage (guest-physical to host-physical) of
//! Intel VMX, a [`Stage2Tables`] in the [`moat_ptab::format::Ept`] format (the same engine as
//! NPT, VT-d and the hypervisor's own tables).

use moat_ptab::format::{EptAccess, EptAttr, MemType};

use crate::vm::vcpu::{MemKind, Stage2Tables};

/// One guest's EPT (the root goes in the EPT pointer).
pub type Ept = Stage2Tables<moat_ptab::format::Ept>;

/// The leaf attributes of a `kind` mapping: RAM read/write/execute write-back, MMIO
/// read/write uncacheable (guest PAT ignored).
pub fn attr(kind: MemKind) -> EptAttr {
    match kind {
        MemKind::Ram => EptAttr {
            access: EptAccess::all(),
            mem_type: MemType::WriteBack,
            ignore_pat: false,
        },
        MemKind::Mmio => EptAttr {
            access: EptAccess::READ | EptAccess::WRITE,
            mem_type: MemType::Uncacheable,
            ignore_pat: true,
        },
    }
}
