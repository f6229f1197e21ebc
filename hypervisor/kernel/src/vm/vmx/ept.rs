//! Extended page tables: the second translation stage (guest-physical to host-physical) of
//! Intel VMX, a `moat_ptab` engine in the [`moat_ptab::format::Ept`] format over the host
//! table memory (the same engine as NPT, VT-d and the hypervisor's own tables).

use moat_ptab::format::{EptAccess, EptAttr, MemType};
use moat_ptab::{Config, NoSink, PageTable};

use crate::mm::tables::HostTables;
use crate::mm::PhysAddr;
use crate::vm::vcpu::{MemKind, VcpuError};

/// 4 levels, 48-bit guest-physical addresses, 2 MiB pages.
const CONFIG: Config = Config {
    levels: 4,
    va_bits: 48,
    pa_bits: 52,
    superpages: 1 << 2,
    coherent: true,
};

/// One guest's EPT.
pub struct Ept {
    tables: PageTable<moat_ptab::format::Ept>,
}

impl Ept {
    /// Empty tables.
    pub fn new() -> Result<Self, VcpuError> {
        Ok(Ept {
            tables: PageTable::new(&HostTables, CONFIG).map_err(|_| VcpuError::OutOfMemory)?,
        })
    }

    /// Physical address of the PML4 (in the EPT pointer).
    pub fn root(&self) -> PhysAddr {
        self.tables.root()
    }

    /// Maps guest-physical `[gpa, gpa + len)` to `[hpa, hpa + len)`: RAM read/write/execute
    /// write-back, MMIO read/write uncacheable (guest PAT ignored). Refuses to replace a
    /// mapping.
    pub fn map(
        &mut self,
        gpa: u64,
        hpa: PhysAddr,
        len: u64,
        kind: MemKind,
    ) -> Result<(), VcpuError> {
        if len == 0 {
            return Ok(());
        }
        let attr = match kind {
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
        };
        self.tables
            .map(&HostTables, gpa, hpa, len, attr, &mut NoSink)
            .map_err(|e| match e {
                moat_ptab::Error::NoMemory => VcpuError::OutOfMemory,
                _ => VcpuError::BadMapping,
            })
    }

    /// The host-physical address `gpa` maps to, if any.
    pub fn translate(&self, gpa: u64) -> Option<PhysAddr> {
        self.tables.translate(&HostTables, gpa).map(|t| t.phys)
    }
}
