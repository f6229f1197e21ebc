//! Remapping structures: the variable part of the DMAR table after its header.
//!
//! Every structure starts with a 2-byte type and a 2-byte length (the whole
//! structure, header included) and is skipped by that length, so unknown types
//! are passed over safely.

use core::fmt;
use core::iter::FusedIterator;

use bitflags::bitflags;

use crate::bytes::{next_record, u16_at, u32_at, u64_at, u8_at};
use crate::error::DmarError;
use crate::scope::DeviceScopes;

/// Size of the common structure header (type and length).
pub const STRUCTURE_HEADER_LEN: usize = 4;

/// Raw remapping structure type numbers.
pub mod kind {
    /// DMA Remapping Hardware unit Definition.
    pub const DRHD: u16 = 0;
    /// Reserved Memory Region Reporting.
    pub const RMRR: u16 = 1;
    /// Root port ATS capability Reporting.
    pub const ATSR: u16 = 2;
    /// Remapping Hardware Static Affinity.
    pub const RHSA: u16 = 3;
    /// ACPI Name-space Device Declaration.
    pub const ANDD: u16 = 4;
    /// SoC Integrated Address Translation Cache.
    pub const SATC: u16 = 5;
    /// SoC Integrated Device Property.
    pub const SIDP: u16 = 6;
}

/// Fixed-part length of each known structure type: the smallest valid length.
pub const fn min_length(kind: u16) -> usize {
    match kind {
        kind::DRHD => Drhd::FIXED_LEN,
        kind::RMRR => Rmrr::FIXED_LEN,
        kind::ATSR => Atsr::FIXED_LEN,
        kind::RHSA => Rhsa::LEN,
        kind::ANDD => Andd::FIXED_LEN,
        kind::SATC => Satc::FIXED_LEN,
        kind::SIDP => Sidp::FIXED_LEN,
        _ => STRUCTURE_HEADER_LEN,
    }
}

/// Declares a remapping structure that names a PCI segment (at offset 6) and lists device
/// scopes after its fixed part of `FIXED_LEN` bytes (and, with `flags`, has a flags byte at
/// offset 4): the borrowed bytes and table offset, and the accessors every such type shares.
macro_rules! scoped_structure {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            fixed_len: $len:literal,
            $(flags: $flags:ident,)?
            scopes: $scopes:literal $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $name<'a> {
            bytes: &'a [u8],
            offset: usize,
        }

        impl<'a> $name<'a> {
            /// Length of the fixed part.
            pub const FIXED_LEN: usize = $len;

            $(
                /// Flags.
                pub fn flags(&self) -> $flags {
                    $flags::from_bits_retain(u8_at(self.bytes, 4))
                }
            )?

            /// The PCI segment (ECAM domain) of the devices in scope.
            pub fn segment(&self) -> u16 {
                u16_at(self.bytes, 6)
            }

            #[doc = $scopes]
            pub fn scopes(&self) -> DeviceScopes<'a> {
                let fixed = Self::FIXED_LEN;
                DeviceScopes::new(self.bytes.get(fixed..).unwrap_or(&[]), self.offset + fixed)
            }

            /// Table offset of this structure.
            pub fn offset(&self) -> usize {
                self.offset
            }
        }

        impl<'a> TryFrom<RemappingStructure<'a>> for $name<'a> {
            type Error = RemappingStructure<'a>;

            /// This structure type out of a [`RemappingStructure`], or the structure back.
            fn try_from(s: RemappingStructure<'a>) -> Result<Self, Self::Error> {
                match s {
                    RemappingStructure::$name(x) => Ok(x),
                    other => Err(other),
                }
            }
        }
    };
}

bitflags! {
    /// DRHD flags.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct DrhdFlags: u8 {
        /// The unit covers every PCI device of its segment not claimed by another
        /// unit's explicit scope. Its device scopes then list only I/O APICs, HPETs
        /// and ACPI namespace devices.
        const INCLUDE_PCI_ALL = 1 << 0;
    }
}

bitflags! {
    /// ATSR flags.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct AtsrFlags: u8 {
        /// Every root port of the segment supports ATS; the scope list is empty.
        const ALL_PORTS = 1 << 0;
    }
}

bitflags! {
    /// SATC flags.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct SatcFlags: u8 {
        /// The devices' address translation caches must be enabled for correct
        /// operation.
        const ATC_REQUIRED = 1 << 0;
    }
}

scoped_structure! {
    /// DMA Remapping Hardware unit Definition (type 0).
    ///
    /// | offset | size | field |
    /// |---|---|---|
    /// | 4 | 1 | flags ([`DrhdFlags`]) |
    /// | 5 | 1 | size: register set is 2^N 4 KiB pages (bits 3:0) |
    /// | 6 | 2 | PCI segment |
    /// | 8 | 8 | register base address |
    /// | 16 | .. | device scopes |
    pub struct Drhd {
        fixed_len: 16,
        flags: DrhdFlags,
        scopes: "The device scopes: devices (or, with INCLUDE_PCI_ALL, I/O APICs and HPETs) this unit handles.",
    }
}

impl<'a> Drhd<'a> {
    /// Whether this unit covers all PCI devices of its segment not claimed elsewhere.
    pub fn include_pci_all(&self) -> bool {
        self.flags().contains(DrhdFlags::INCLUDE_PCI_ALL)
    }

    /// Size of the register set in bytes (2^N 4 KiB pages; N = 0 on older tables).
    pub fn register_set_size(&self) -> u64 {
        4096u64 << (u8_at(self.bytes, 5) & 0xf)
    }

    /// Physical address of the unit's register set.
    pub fn register_base(&self) -> u64 {
        u64_at(self.bytes, 8)
    }
}

scoped_structure! {
    /// Reserved Memory Region Reporting (type 1): memory a device may DMA to at any
    /// time (e.g. USB legacy emulation, graphics stolen memory), which must stay
    /// identity-mapped for the devices in scope.
    ///
    /// | offset | size | field |
    /// |---|---|---|
    /// | 4 | 2 | reserved |
    /// | 6 | 2 | PCI segment |
    /// | 8 | 8 | base address (4 KiB aligned) |
    /// | 16 | 8 | limit address (inclusive end) |
    /// | 24 | .. | device scopes |
    pub struct Rmrr {
        fixed_len: 24,
        scopes: "The devices that use this region.",
    }
}

impl<'a> Rmrr<'a> {
    /// First byte of the region.
    pub fn base(&self) -> u64 {
        u64_at(self.bytes, 8)
    }

    /// Last byte of the region (inclusive).
    pub fn limit(&self) -> u64 {
        u64_at(self.bytes, 16)
    }
}

scoped_structure! {
    /// Root port ATS capability Reporting (type 2).
    ///
    /// | offset | size | field |
    /// |---|---|---|
    /// | 4 | 1 | flags ([`AtsrFlags`]) |
    /// | 5 | 1 | reserved |
    /// | 6 | 2 | PCI segment |
    /// | 8 | .. | device scopes (root ports) |
    pub struct Atsr {
        fixed_len: 8,
        flags: AtsrFlags,
        scopes: "The ATS-capable root ports (empty with ALL_PORTS).",
    }
}

impl<'a> Atsr<'a> {
    /// Whether every root port of the segment supports ATS.
    pub fn all_ports(&self) -> bool {
        self.flags().contains(AtsrFlags::ALL_PORTS)
    }
}

/// Remapping Hardware Static Affinity (type 3): the NUMA proximity domain of a unit.
///
/// | offset | size | field |
/// |---|---|---|
/// | 4 | 4 | reserved |
/// | 8 | 8 | register base address of the DRHD |
/// | 16 | 4 | proximity domain |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rhsa {
    /// Register base address of the DRHD this affinity is for.
    pub register_base: u64,
    /// The proximity domain (as in the SRAT).
    pub proximity_domain: u32,
}

impl Rhsa {
    /// Length of the structure.
    pub const LEN: usize = 20;
}

/// ACPI Name-space Device Declaration (type 4): names an ACPI device that a
/// device scope of type ACPI namespace device refers to by number.
///
/// | offset | size | field |
/// |---|---|---|
/// | 4 | 3 | reserved |
/// | 7 | 1 | ACPI device number |
/// | 8 | .. | ACPI object name, NUL-terminated ASCII |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Andd<'a> {
    bytes: &'a [u8],
}

impl<'a> Andd<'a> {
    /// Length of the fixed part.
    pub const FIXED_LEN: usize = 8;

    /// The ACPI device number (matches a scope's enumeration id).
    pub fn device_number(&self) -> u8 {
        u8_at(self.bytes, 7)
    }

    /// The object name's bytes, up to (not including) the first NUL.
    pub fn object_name(&self) -> &'a [u8] {
        let name = self.bytes.get(Self::FIXED_LEN..).unwrap_or(&[]);
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        name.get(..end).unwrap_or(&[])
    }
}

scoped_structure! {
    /// SoC Integrated Address Translation Cache (type 5).
    ///
    /// | offset | size | field |
    /// |---|---|---|
    /// | 4 | 1 | flags ([`SatcFlags`]) |
    /// | 5 | 1 | reserved |
    /// | 6 | 2 | PCI segment |
    /// | 8 | .. | device scopes |
    pub struct Satc {
        fixed_len: 8,
        flags: SatcFlags,
        scopes: "The SoC-integrated devices with an address translation cache.",
    }
}

scoped_structure! {
    /// SoC Integrated Device Property (type 6).
    ///
    /// | offset | size | field |
    /// |---|---|---|
    /// | 4 | 2 | reserved |
    /// | 6 | 2 | PCI segment |
    /// | 8 | .. | device scopes (properties in each scope's flags byte) |
    pub struct Sidp {
        fixed_len: 8,
        scopes: "The devices described.",
    }
}

/// One remapping structure, borrowed from the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemappingStructure<'a> {
    /// A remapping hardware unit.
    Drhd(Drhd<'a>),
    /// A reserved memory region.
    Rmrr(Rmrr<'a>),
    /// ATS-capable root ports.
    Atsr(Atsr<'a>),
    /// A unit's NUMA affinity.
    Rhsa(Rhsa),
    /// An ACPI namespace device declaration.
    Andd(Andd<'a>),
    /// SoC-integrated address translation caches.
    Satc(Satc<'a>),
    /// SoC-integrated device properties.
    Sidp(Sidp<'a>),
    /// A type this parser does not know, skipped by its length.
    Unknown {
        /// The type field.
        kind: u16,
        /// The whole structure, header included.
        bytes: &'a [u8],
    },
}

impl<'a> RemappingStructure<'a> {
    /// Decodes one structure whose bytes are exactly its length (already checked
    /// against the table), checking its type-specific fixed part.
    fn decode(bytes: &'a [u8], offset: usize) -> Result<Self, DmarError> {
        let kind = u16_at(bytes, 0);
        let min = min_length(kind);
        if bytes.len() < min {
            return Err(DmarError::StructureTooShort {
                offset,
                kind,
                length: u16_at(bytes, 2),
                min,
            });
        }
        Ok(match kind {
            kind::DRHD => {
                let d = Drhd { bytes, offset };
                if d.register_base() & 0xfff != 0 {
                    return Err(DmarError::DrhdBaseUnaligned {
                        offset,
                        base: d.register_base(),
                    });
                }
                Self::Drhd(d)
            }
            kind::RMRR => {
                let r = Rmrr { bytes, offset };
                if r.limit() < r.base() {
                    return Err(DmarError::RmrrLimitBelowBase {
                        offset,
                        base: r.base(),
                        limit: r.limit(),
                    });
                }
                Self::Rmrr(r)
            }
            kind::ATSR => Self::Atsr(Atsr { bytes, offset }),
            kind::RHSA => Self::Rhsa(Rhsa {
                register_base: u64_at(bytes, 8),
                proximity_domain: u32_at(bytes, 16),
            }),
            kind::ANDD => Self::Andd(Andd { bytes }),
            kind::SATC => Self::Satc(Satc { bytes, offset }),
            kind::SIDP => Self::Sidp(Sidp { bytes, offset }),
            _ => Self::Unknown { kind, bytes },
        })
    }

    /// The raw type field.
    pub fn kind(&self) -> u16 {
        match self {
            Self::Drhd(_) => kind::DRHD,
            Self::Rmrr(_) => kind::RMRR,
            Self::Atsr(_) => kind::ATSR,
            Self::Rhsa(_) => kind::RHSA,
            Self::Andd(_) => kind::ANDD,
            Self::Satc(_) => kind::SATC,
            Self::Sidp(_) => kind::SIDP,
            Self::Unknown { kind, .. } => *kind,
        }
    }

    /// The structure's device scopes, if its type has any (empty otherwise).
    pub fn scopes(&self) -> DeviceScopes<'a> {
        match self {
            Self::Drhd(s) => s.scopes(),
            Self::Rmrr(s) => s.scopes(),
            Self::Atsr(s) => s.scopes(),
            Self::Satc(s) => s.scopes(),
            Self::Sidp(s) => s.scopes(),
            Self::Rhsa(_) | Self::Andd(_) | Self::Unknown { .. } => DeviceScopes::new(&[], 0),
        }
    }
}

impl fmt::Display for RemappingStructure<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Drhd(d) => write!(
                f,
                "DRHD segment {} base {:#x} size {:#x}{}",
                d.segment(),
                d.register_base(),
                d.register_set_size(),
                if d.include_pci_all() {
                    " INCLUDE_PCI_ALL"
                } else {
                    ""
                }
            ),
            Self::Rmrr(r) => write!(
                f,
                "RMRR segment {} {:#x}..={:#x}",
                r.segment(),
                r.base(),
                r.limit()
            ),
            Self::Atsr(a) => write!(
                f,
                "ATSR segment {}{}",
                a.segment(),
                if a.all_ports() { " ALL_PORTS" } else { "" }
            ),
            Self::Rhsa(r) => write!(
                f,
                "RHSA base {:#x} proximity domain {}",
                r.register_base, r.proximity_domain
            ),
            Self::Andd(a) => write!(
                f,
                "ANDD device {} {:?}",
                a.device_number(),
                core::str::from_utf8(a.object_name()).unwrap_or("?")
            ),
            Self::Satc(s) => write!(f, "SATC segment {} flags {:#x}", s.segment(), s.flags()),
            Self::Sidp(s) => write!(f, "SIDP segment {}", s.segment()),
            Self::Unknown { kind, bytes } => {
                write!(f, "unknown type {kind} ({} bytes)", bytes.len())
            }
        }
    }
}

/// Iterator over the remapping structures of a table.
///
/// Yields `Err` once for the first malformed structure and then stops, so it
/// always terminates: every step either consumes at least 4 bytes or ends.
#[derive(Clone, Debug)]
pub struct Structures<'a> {
    bytes: &'a [u8],
    /// Table offset of `bytes[0]`.
    offset: usize,
}

impl<'a> Structures<'a> {
    pub(crate) fn new(bytes: &'a [u8], offset: usize) -> Self {
        Self { bytes, offset }
    }
}

impl<'a> Iterator for Structures<'a> {
    type Item = Result<RemappingStructure<'a>, DmarError>;

    fn next(&mut self) -> Option<Self::Item> {
        next_record(&mut self.bytes, &mut self.offset, |bytes, offset| {
            let remaining = bytes.len();
            if remaining < STRUCTURE_HEADER_LEN {
                return Err(DmarError::StructureHeaderTruncated { offset, remaining });
            }
            let kind = u16_at(bytes, 0);
            let length = u16_at(bytes, 2);
            let len = usize::from(length);
            // Checked for every type, known or not: a length of 0 would never advance.
            if len < STRUCTURE_HEADER_LEN {
                return Err(DmarError::StructureTooShort {
                    offset,
                    kind,
                    length,
                    min: min_length(kind),
                });
            }
            let (this, rest) =
                bytes
                    .split_at_checked(len)
                    .ok_or(DmarError::StructureLengthPastEnd {
                        offset,
                        kind,
                        length,
                        remaining,
                    })?;
            Ok((RemappingStructure::decode(this, offset)?, rest))
        })
    }
}

impl FusedIterator for Structures<'_> {}
