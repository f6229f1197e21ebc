//! Capability lists: the classic list from offset 0x34 and the PCI Express
//! extended list from offset 0x100. Both walks are bounded, so a cyclic or
//! corrupt list ends instead of looping.

use core::iter::FusedIterator;

use crate::bdf::Bdf;
use crate::config::{regs, ConfigAccess, Header, HeaderLayout, Status};

/// Classic capability ids.
pub mod cap_id {
    /// Power management.
    pub const POWER_MANAGEMENT: u8 = 0x01;
    /// MSI.
    pub const MSI: u8 = 0x05;
    /// Vendor specific.
    pub const VENDOR: u8 = 0x09;
    /// PCI Express.
    pub const PCI_EXPRESS: u8 = 0x10;
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
}

/// Extended capability ids.
pub mod ext_cap_id {
    /// Advanced error reporting.
    pub const AER: u16 = 0x0001;
    /// Address translation services.
    pub const ATS: u16 = 0x000f;
    /// Single-root I/O virtualisation.
    pub const SRIOV: u16 = 0x0010;
    /// Page request interface.
    pub const PRI: u16 = 0x0013;
    /// Process address space id.
    pub const PASID: u16 = 0x001b;
}

/// The most entries a classic list can hold: (256 - 64) / 4 dwords.
pub const MAX_CAPABILITIES: usize = 48;
/// The most entries an extended list can hold: (4096 - 256) / 4 dwords.
pub const MAX_EXTENDED_CAPABILITIES: usize = 960;

/// One classic capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// Capability id.
    pub id: u8,
    /// Offset of its header in configuration space.
    pub offset: u8,
}

/// Iterator over a function's classic capabilities.
#[derive(Debug)]
pub struct Capabilities<'a, C: ?Sized> {
    cfg: &'a C,
    bdf: Bdf,
    next: u8,
    budget: usize,
}

/// Walks the classic capability list of `bdf` (empty when the status register
/// says there is none). Stops at a null pointer, a pointer into the header
/// (below 0x40), or after [`MAX_CAPABILITIES`] entries.
pub fn capabilities<C: ConfigAccess + ?Sized>(cfg: &C, bdf: Bdf) -> Capabilities<'_, C> {
    let first = match Header::read(cfg, bdf) {
        Some(h) if h.status.contains(Status::CAPABILITIES_LIST) => match h.header_type.layout() {
            HeaderLayout::Endpoint | HeaderLayout::PciBridge => {
                cfg.read8(bdf, regs::CAPABILITIES_POINTER)
            }
            HeaderLayout::CardBusBridge => cfg.read8(bdf, 0x14),
            HeaderLayout::Unknown(_) => 0,
        },
        _ => 0,
    };
    Capabilities {
        cfg,
        bdf,
        next: first,
        budget: MAX_CAPABILITIES,
    }
}

/// The offset of `bdf`'s first classic capability with id `id`.
pub fn find_capability<C: ConfigAccess + ?Sized>(cfg: &C, bdf: Bdf, id: u8) -> Option<u8> {
    capabilities(cfg, bdf)
        .find(|c| c.id == id)
        .map(|c| c.offset)
}

impl<C: ConfigAccess + ?Sized> Iterator for Capabilities<'_, C> {
    type Item = Capability;

    fn next(&mut self) -> Option<Capability> {
        // The low 2 bits of a pointer are reserved.
        let offset = self.next & 0xfc;
        if offset < 0x40 || self.budget == 0 {
            self.budget = 0;
            return None;
        }
        self.budget -= 1;
        let header = self.cfg.read16(self.bdf, u16::from(offset));
        self.next = (header >> 8) as u8;
        Some(Capability {
            id: header as u8,
            offset,
        })
    }
}

impl<C: ConfigAccess + ?Sized> FusedIterator for Capabilities<'_, C> {}

/// One PCI Express extended capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtendedCapability {
    /// Capability id.
    pub id: u16,
    /// Capability version.
    pub version: u8,
    /// Offset of its header in configuration space (0x100..0x1000).
    pub offset: u16,
}

/// Iterator over a function's extended capabilities.
#[derive(Debug)]
pub struct ExtendedCapabilities<'a, C: ?Sized> {
    cfg: &'a C,
    bdf: Bdf,
    next: u16,
    budget: usize,
}

/// Walks the extended capability list of `bdf`, which exists only on PCI
/// Express functions (those with a PCI Express capability); empty otherwise.
/// Stops at a null or out-of-range pointer, an all-zero or all-ones header, or
/// after [`MAX_EXTENDED_CAPABILITIES`] entries.
pub fn extended_capabilities<C: ConfigAccess + ?Sized>(
    cfg: &C,
    bdf: Bdf,
) -> ExtendedCapabilities<'_, C> {
    let pcie = find_capability(cfg, bdf, cap_id::PCI_EXPRESS).is_some();
    ExtendedCapabilities {
        cfg,
        bdf,
        next: if pcie { 0x100 } else { 0 },
        budget: MAX_EXTENDED_CAPABILITIES,
    }
}

impl<C: ConfigAccess + ?Sized> Iterator for ExtendedCapabilities<'_, C> {
    type Item = ExtendedCapability;

    fn next(&mut self) -> Option<ExtendedCapability> {
        let offset = self.next & 0xffc;
        if offset < 0x100 || self.budget == 0 {
            self.budget = 0;
            return None;
        }
        self.budget -= 1;
        let header = self.cfg.read32(self.bdf, offset);
        if header == 0 || header == u32::MAX {
            self.budget = 0;
            return None;
        }
        self.next = (header >> 20) as u16;
        Some(ExtendedCapability {
            id: header as u16,
            version: ((header >> 16) & 0xf) as u8,
            offset,
        })
    }
}

impl<C: ConfigAccess + ?Sized> FusedIterator for ExtendedCapabilities<'_, C> {}
