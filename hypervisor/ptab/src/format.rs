//! Entry formats: what the engine needs to know about one kind of page-table entry.
//!
//! All four formats Moat builds share the radix shape (512 entries of 8 bytes per 4 KiB table,
//! 9 bits per level, level 1 maps 4 KiB, a page-size bit 7 for 2 MiB / 1 GiB leaves, address
//! bits 51:12); they differ in what makes an entry present, what a table (non-leaf) entry
//! carries, and what the attribute bits of a leaf mean.

use core::fmt::Debug;

use bitflags::bitflags;

use crate::PhysAddr;

/// Address bits 51:12 of an entry (every format here).
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Page-size bit (bit 7) of a level-2 or level-3 entry: the entry is a 2 MiB / 1 GiB leaf.
pub const PS: u64 = 1 << 7;

/// One page-table entry format.
pub trait Format {
    /// Attributes of a leaf (permissions, memory type): everything but the address and the
    /// page-size bit.
    type Attr: Copy + Eq + Debug;
    /// Bit `n` set: the format can hold a leaf at level `n` (bit 1 is implied). A table's
    /// configuration may allow fewer (for example `CAP.SLLPS` on VT-d).
    const SUPERPAGE_LEVELS: u8;
    /// Whether the entry maps something (a table or a page).
    fn is_present(e: u64) -> bool;
    /// The entry linking a next-level table at `table` (the leaf decides the access rights,
    /// so a table entry grants everything the format lets a leaf restrict).
    fn table_entry(table: PhysAddr) -> u64;
    /// The attribute bits of a leaf with `attr` (must make the entry present; neither address
    /// nor page-size bit).
    fn leaf_bits(attr: Self::Attr) -> u64;
    /// The attributes of the present leaf `e` (status bits the hardware sets, such as
    /// accessed and dirty, are not attributes and are dropped).
    fn leaf_attr(e: u64) -> Self::Attr;
    /// Whether `attr` describes a usable leaf (for example not "no access at all").
    fn valid_attr(attr: Self::Attr) -> bool;
}

/// Whether `e` at `level` is a leaf (level 1, or the page-size bit above it).
pub const fn is_leaf(e: u64, level: u8) -> bool {
    level == 1 || e & PS != 0
}

// ---------------------------------------------------------------------------------------------
// VT-d second level (legacy mode), VT-d 9.8.

bitflags! {
    /// Attribute bits of a VT-d second-level leaf.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct VtdAttr: u64 {
        /// Read (bit 0).
        const READ = 1 << 0;
        /// Write (bit 1).
        const WRITE = 1 << 1;
        /// Snoop behaviour (bit 11, only defined with `ECAP.SC`).
        const SNOOP = 1 << 11;
    }
}

/// VT-d second-level tables: present when R or W is set; table entries carry R|W so that the
/// leaf decides; 2 MiB and 1 GiB leaves (`CAP.SLLPS` says which).
#[derive(Clone, Copy, Debug)]
pub enum VtdSecondLevel {}

impl Format for VtdSecondLevel {
    type Attr = VtdAttr;
    const SUPERPAGE_LEVELS: u8 = 0b1100;
    fn is_present(e: u64) -> bool {
        e & (VtdAttr::READ.bits() | VtdAttr::WRITE.bits()) != 0
    }
    fn table_entry(table: PhysAddr) -> u64 {
        table.as_u64() | VtdAttr::READ.bits() | VtdAttr::WRITE.bits()
    }
    fn leaf_bits(attr: VtdAttr) -> u64 {
        attr.bits()
    }
    fn leaf_attr(e: u64) -> VtdAttr {
        VtdAttr::from_bits_truncate(e)
    }
    fn valid_attr(attr: VtdAttr) -> bool {
        attr.intersects(VtdAttr::READ | VtdAttr::WRITE)
    }
}

// ---------------------------------------------------------------------------------------------
// The CPU's own 4-level tables and AMD nested page tables (the same hardware format).

bitflags! {
    /// x86-64 page-table entry bits (the CPU's own tables).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct X86Flags: u64 {
        /// Present.
        const PRESENT = 1 << 0;
        /// Writable.
        const WRITABLE = 1 << 1;
        /// User accessible.
        const USER = 1 << 2;
        /// Write-through.
        const PWT = 1 << 3;
        /// Cache disable.
        const PCD = 1 << 4;
        /// Accessed (set by the CPU).
        const ACCESSED = 1 << 5;
        /// Dirty (set by the CPU).
        const DIRTY = 1 << 6;
        /// Large page (2 MiB in a PD, 1 GiB in a PDPT).
        const HUGE = 1 << 7;
        /// Global.
        const GLOBAL = 1 << 8;
        /// No execute.
        const NO_EXECUTE = 1 << 63;
    }
}

impl X86Flags {
    /// Read-only data: present, no-execute.
    pub const RO: X86Flags = X86Flags::PRESENT.union(X86Flags::NO_EXECUTE);
    /// Read-write data.
    pub const RW: X86Flags = X86Flags::PRESENT
        .union(X86Flags::WRITABLE)
        .union(X86Flags::NO_EXECUTE);
    /// Code: present, executable, read-only.
    pub const RX: X86Flags = X86Flags::PRESENT;
    /// Device memory: read-write, uncached, no-execute.
    pub const MMIO: X86Flags = X86Flags::RW.union(X86Flags::PCD).union(X86Flags::PWT);
}

/// Attribute bits of an x86 leaf that the engine keeps (not the address, not PS, not the
/// accessed/dirty status bits).
const X86_ATTR_MASK: u64 = !(ADDR_MASK | PS | (1 << 5) | (1 << 6));

/// The CPU's own 4-level tables: table entries are present and writable (no user, no NX), so
/// the leaf decides.
#[derive(Clone, Copy, Debug)]
pub enum X86 {}

impl Format for X86 {
    type Attr = X86Flags;
    const SUPERPAGE_LEVELS: u8 = 0b1100;
    fn is_present(e: u64) -> bool {
        e & X86Flags::PRESENT.bits() != 0
    }
    fn table_entry(table: PhysAddr) -> u64 {
        table.as_u64() | (X86Flags::PRESENT | X86Flags::WRITABLE).bits()
    }
    fn leaf_bits(attr: X86Flags) -> u64 {
        attr.bits() & X86_ATTR_MASK
    }
    fn leaf_attr(e: u64) -> X86Flags {
        X86Flags::from_bits_retain(e & X86_ATTR_MASK)
    }
    fn valid_attr(attr: X86Flags) -> bool {
        attr.contains(X86Flags::PRESENT)
    }
}

bitflags! {
    /// Nested page-table entry bits (AMD SVM).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct NptFlags: u64 {
        /// Present.
        const PRESENT = 1 << 0;
        /// Writable.
        const WRITABLE = 1 << 1;
        /// User: required on every level of a nested walk (QEMU walks NPT as user accesses).
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
}

/// AMD nested page tables: the x86-64 format, every table entry present, writable and user.
#[derive(Clone, Copy, Debug)]
pub enum Npt {}

impl Format for Npt {
    type Attr = NptFlags;
    const SUPERPAGE_LEVELS: u8 = 0b1100;
    fn is_present(e: u64) -> bool {
        e & NptFlags::PRESENT.bits() != 0
    }
    fn table_entry(table: PhysAddr) -> u64 {
        table.as_u64() | NptFlags::RAM.bits()
    }
    fn leaf_bits(attr: NptFlags) -> u64 {
        attr.bits() & X86_ATTR_MASK
    }
    fn leaf_attr(e: u64) -> NptFlags {
        NptFlags::from_bits_retain(e & X86_ATTR_MASK)
    }
    fn valid_attr(attr: NptFlags) -> bool {
        attr.contains(NptFlags::PRESENT)
    }
}

// ---------------------------------------------------------------------------------------------
// Intel EPT (SDM 29.3.2).

bitflags! {
    /// EPT access rights (bits 2:0).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct EptAccess: u64 {
        /// Read.
        const READ = 1 << 0;
        /// Write.
        const WRITE = 1 << 1;
        /// Execute (supervisor execute with mode-based control).
        const EXECUTE = 1 << 2;
    }
}

/// EPT memory type of a leaf (bits 5:3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MemType {
    /// Uncacheable.
    Uncacheable = 0,
    /// Write combining.
    WriteCombining = 1,
    /// Write through.
    WriteThrough = 4,
    /// Write protected.
    WriteProtected = 5,
    /// Write back.
    WriteBack = 6,
}

impl MemType {
    const fn from_bits(b: u64) -> Option<Self> {
        Some(match b {
            0 => Self::Uncacheable,
            1 => Self::WriteCombining,
            4 => Self::WriteThrough,
            5 => Self::WriteProtected,
            6 => Self::WriteBack,
            _ => return None,
        })
    }
}

/// Attributes of an EPT leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EptAttr {
    /// Read / write / execute.
    pub access: EptAccess,
    /// Memory type (bits 5:3).
    pub mem_type: MemType,
    /// Ignore the guest PAT (bit 6).
    pub ignore_pat: bool,
}

const EPT_IPAT: u64 = 1 << 6;

/// Intel EPT: present when any of R/W/X is set; table entries carry R|W|X; 2 MiB and 1 GiB
/// leaves. A leaf must not be write-only or write+execute without read (an EPT
/// misconfiguration).
#[derive(Clone, Copy, Debug)]
pub enum Ept {}

impl Format for Ept {
    type Attr = EptAttr;
    const SUPERPAGE_LEVELS: u8 = 0b1100;
    fn is_present(e: u64) -> bool {
        e & EptAccess::all().bits() != 0
    }
    fn table_entry(table: PhysAddr) -> u64 {
        table.as_u64() | EptAccess::all().bits()
    }
    fn leaf_bits(attr: EptAttr) -> u64 {
        attr.access.bits()
            | (attr.mem_type as u64) << 3
            | if attr.ignore_pat { EPT_IPAT } else { 0 }
    }
    fn leaf_attr(e: u64) -> EptAttr {
        EptAttr {
            access: EptAccess::from_bits_truncate(e),
            // Only written by `leaf_bits`, so always one of the defined types.
            mem_type: MemType::from_bits((e >> 3) & 7).unwrap_or(MemType::Uncacheable),
            ignore_pat: e & EPT_IPAT != 0,
        }
    }
    fn valid_attr(attr: EptAttr) -> bool {
        !attr.access.is_empty()
            && (attr.access.contains(EptAccess::READ) || !attr.access.contains(EptAccess::WRITE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ept_bits() {
        let a = EptAttr {
            access: EptAccess::READ | EptAccess::EXECUTE,
            mem_type: MemType::WriteBack,
            ignore_pat: true,
        };
        assert_eq!(Ept::leaf_bits(a), 0b101 | 6 << 3 | 1 << 6);
        assert_eq!(Ept::leaf_attr(Ept::leaf_bits(a) | 0x1234_5000 | PS), a);
        assert!(!Ept::valid_attr(EptAttr {
            access: EptAccess::WRITE,
            ..a
        }));
        assert_eq!(Ept::table_entry(PhysAddr::new(0x5000)), 0x5007);
        assert!(Ept::is_present(EptAccess::EXECUTE.bits()));
    }

    #[test]
    fn x86_and_npt_bits() {
        assert_eq!(X86::table_entry(PhysAddr::new(0x5000)), 0x5003);
        assert_eq!(Npt::table_entry(PhysAddr::new(0x5000)), 0x5007);
        // Accessed/dirty and PS are not attributes.
        let e = 0x20_0000 | X86Flags::RW.bits() | 0x60 | PS;
        assert_eq!(X86::leaf_attr(e), X86Flags::RW);
        assert_eq!(
            Npt::leaf_attr(0x1000 | NptFlags::MMIO.bits()),
            NptFlags::MMIO
        );
        assert!(!X86::valid_attr(X86Flags::WRITABLE));
    }

    #[test]
    fn vtd_bits() {
        assert!(!VtdSecondLevel::is_present(VtdAttr::SNOOP.bits()));
        assert!(VtdSecondLevel::is_present(VtdAttr::WRITE.bits()));
        assert_eq!(VtdSecondLevel::table_entry(PhysAddr::new(0x5000)), 0x5003);
        assert!(!VtdSecondLevel::valid_attr(VtdAttr::SNOOP));
    }
}
