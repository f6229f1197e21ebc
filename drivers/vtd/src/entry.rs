//! Legacy-mode root and context entries and the PCI source id.

use core::fmt;

use crate::hw::PhysAddr;
use crate::regs::Capability;

/// A PCI requester / source id: bus (15:8), device (7:3), function (2:0).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct SourceId(pub u16);

impl SourceId {
    /// Builds a source id; `dev` is truncated to 5 bits and `func` to 3 bits.
    pub const fn new(bus: u8, dev: u8, func: u8) -> Self {
        Self(((bus as u16) << 8) | (((dev & 0x1f) as u16) << 3) | (func & 7) as u16)
    }
    /// Bus number.
    pub const fn bus(self) -> u8 {
        (self.0 >> 8) as u8
    }
    /// Device number (0..32).
    pub const fn dev(self) -> u8 {
        ((self.0 >> 3) & 0x1f) as u8
    }
    /// Function number (0..8).
    pub const fn func(self) -> u8 {
        (self.0 & 7) as u8
    }
    /// Device and function as one byte: the index into the bus's context table.
    pub const fn devfn(self) -> u8 {
        (self.0 & 0xff) as u8
    }
}

impl fmt::Debug for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus(), self.dev(), self.func())
    }
}

/// Number of second-level paging levels, i.e. the adjusted guest address width.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PagingLevels {
    /// 3 levels, 39-bit AGAW (context entry AW = 1).
    Three,
    /// 4 levels, 48-bit AGAW (context entry AW = 2).
    Four,
}

impl PagingLevels {
    /// Number of levels.
    pub const fn count(self) -> u8 {
        match self {
            Self::Three => 3,
            Self::Four => 4,
        }
    }
    /// Adjusted guest address width in bits.
    pub const fn width(self) -> u32 {
        match self {
            Self::Three => 39,
            Self::Four => 48,
        }
    }
    /// The context entry AW encoding.
    pub const fn aw_encoding(self) -> u8 {
        match self {
            Self::Three => 1,
            Self::Four => 2,
        }
    }
    /// Chooses the table depth for a unit: the smallest SAGAW-supported depth that covers
    /// MGAW, else the deepest supported one. `None` when the unit supports neither 3 nor 4
    /// levels (5-level only units are not handled).
    pub const fn choose(cap: Capability) -> Option<Self> {
        let three = cap.supports_levels(3);
        let four = cap.supports_levels(4);
        if three && cap.mgaw() <= 39 {
            Some(Self::Three)
        } else if four {
            Some(Self::Four)
        } else if three {
            Some(Self::Three)
        } else {
            None
        }
    }
}

/// A legacy-mode root entry (128 bits): context-table pointer of one bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(C)]
pub struct RootEntry {
    /// Bits 63:0: P (0), context-table pointer (63:12).
    pub lo: u64,
    /// Bits 127:64: reserved in legacy mode.
    pub hi: u64,
}

const _: () = assert!(core::mem::size_of::<RootEntry>() == 16);
const _: () = assert!(core::mem::size_of::<ContextEntry>() == 16);

impl RootEntry {
    /// A present root entry pointing at the context table at `context_table`.
    pub const fn new(context_table: PhysAddr) -> Self {
        Self {
            lo: (context_table.as_u64() & !0xfff) | 1,
            hi: 0,
        }
    }
    /// P bit.
    pub const fn present(self) -> bool {
        self.lo & 1 != 0
    }
    /// Context-table pointer.
    pub const fn context_table(self) -> u64 {
        self.lo & !0xfff
    }
}

/// Translation type of a legacy context entry (bits 3:2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TranslationType {
    /// Untranslated requests are translated through the second-level tables; translated
    /// requests and translation requests are blocked.
    Untranslated = 0,
    /// As `Untranslated`, plus device-TLB (ATS) requests are allowed.
    All = 1,
    /// Untranslated requests pass through untranslated (needs `ECAP.PT`).
    PassThrough = 2,
}

/// A legacy-mode context entry (128 bits) for one device function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(C)]
pub struct ContextEntry {
    /// Bits 63:0: P (0), FPD (1), TT (3:2), second-level page-table pointer (63:12).
    pub lo: u64,
    /// Bits 127:64: AW (66:64), DID (87:72).
    pub hi: u64,
}

impl ContextEntry {
    /// A not-present entry.
    pub const EMPTY: Self = Self { lo: 0, hi: 0 };

    /// A present entry translating through the second-level table at `slptptr` with the
    /// given depth, tagged with domain id `did`.
    pub const fn new(
        slptptr: PhysAddr,
        levels: PagingLevels,
        did: u16,
        tt: TranslationType,
    ) -> Self {
        Self {
            lo: (slptptr.as_u64() & !0xfff) | ((tt as u64) << 2) | 1,
            hi: ((did as u64) << 8) | levels.aw_encoding() as u64,
        }
    }
    /// Sets FPD: suppress fault recording for this device.
    pub const fn with_fault_processing_disabled(mut self, fpd: bool) -> Self {
        if fpd {
            self.lo |= 2;
        } else {
            self.lo &= !2;
        }
        self
    }
    /// P bit.
    pub const fn present(self) -> bool {
        self.lo & 1 != 0
    }
    /// FPD bit.
    pub const fn fault_processing_disabled(self) -> bool {
        self.lo & 2 != 0
    }
    /// TT field (raw).
    pub const fn translation_type(self) -> u8 {
        ((self.lo >> 2) & 3) as u8
    }
    /// Second-level page-table pointer.
    pub const fn slptptr(self) -> u64 {
        self.lo & !0xfff
    }
    /// AW field (raw).
    pub const fn address_width(self) -> u8 {
        (self.hi & 7) as u8
    }
    /// Domain id.
    pub const fn domain_id(self) -> u16 {
        (self.hi >> 8) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_id_fields() {
        let s = SourceId::new(0x3a, 0x1f, 7);
        assert_eq!(s.0, 0x3aff);
        assert_eq!(
            (s.bus(), s.dev(), s.func(), s.devfn()),
            (0x3a, 0x1f, 7, 0xff)
        );
        assert_eq!(std::format!("{}", SourceId::new(0, 4, 0)), "00:04.0");
    }

    #[test]
    fn root_entry_encoding() {
        let r = RootEntry::new(PhysAddr::new(0x1234_5000));
        assert_eq!(r.lo, 0x1234_5001);
        assert_eq!(r.hi, 0);
        assert!(r.present());
        assert_eq!(r.context_table(), 0x1234_5000);
        assert!(!RootEntry::default().present());
    }

    #[test]
    fn context_entry_encoding() {
        let c = ContextEntry::new(
            PhysAddr::new(0xabc_d000),
            PagingLevels::Three,
            0x1234,
            TranslationType::Untranslated,
        );
        assert_eq!(c.lo, 0xabc_d001);
        assert_eq!(c.hi, (0x1234 << 8) | 1);
        assert_eq!(c.domain_id(), 0x1234);
        assert_eq!(c.address_width(), 1);
        let c = ContextEntry::new(
            PhysAddr::new(0x1000),
            PagingLevels::Four,
            1,
            TranslationType::PassThrough,
        )
        .with_fault_processing_disabled(true);
        assert_eq!(c.lo, 0x1000 | (2 << 2) | 2 | 1);
        assert_eq!(c.hi, (1 << 8) | 2);
        assert!(c.fault_processing_disabled());
        assert_eq!(c.translation_type(), 2);
        assert!(!c
            .with_fault_processing_disabled(false)
            .fault_processing_disabled());
    }

    #[test]
    fn level_choice_follows_sagaw_and_mgaw() {
        // QEMU default: SAGAW = 39-bit only, MGAW = 39.
        assert_eq!(
            PagingLevels::choose(Capability(0xd2_008c_2226_0206)),
            Some(PagingLevels::Three)
        );
        // aw-bits=48: SAGAW = 39 | 48, MGAW = 48.
        let cap48 =
            (0xd2_008c_2226_0206u64 & !(0x1f << 8) & !(0x3f << 16)) | (0b110 << 8) | (47 << 16);
        assert_eq!(
            PagingLevels::choose(Capability(cap48)),
            Some(PagingLevels::Four)
        );
        // 4-level only.
        assert_eq!(
            PagingLevels::choose(Capability((0b100 << 8) | (38 << 16))),
            Some(PagingLevels::Four)
        );
        // 5-level only: unsupported.
        assert_eq!(PagingLevels::choose(Capability(0b1000 << 8)), None);
    }
}
