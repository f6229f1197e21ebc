//! Device scope entries (VT-d spec, "Device Scope Structure").
//!
//! Layout of one entry:
//!
//! | offset | size | field                                            |
//! |--------|------|--------------------------------------------------|
//! | 0      | 1    | type                                             |
//! | 1      | 1    | length (6 + 2 * number of path entries)          |
//! | 2      | 1    | flags (used by SIDP scopes; reserved otherwise)  |
//! | 3      | 1    | reserved                                         |
//! | 4      | 1    | enumeration id (IOAPIC id, HPET number, ACPI device number) |
//! | 5      | 1    | start bus number                                 |
//! | 6      | 2*N  | path: (device, function) pairs                   |

use core::fmt;
use core::iter::FusedIterator;

use crate::bytes::{next_record, u8_at};
use crate::error::DmarError;

/// Size of a device scope's fixed header, before its path.
pub const SCOPE_HEADER_LEN: usize = 6;

/// The kind of thing a device scope names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScopeType {
    /// A PCI endpoint device (type 1).
    PciEndpoint,
    /// A PCI-PCI bridge and every device below it (type 2).
    PciSubHierarchy,
    /// An I/O APIC (type 3); the enumeration id is its APIC id.
    IoApic,
    /// An MSI-capable HPET (type 4); the enumeration id is its HPET number.
    Hpet,
    /// An ACPI namespace device (type 5); the enumeration id matches an ANDD.
    AcpiNamespaceDevice,
    /// A type this parser does not know; kept as is.
    Other(u8),
}

impl ScopeType {
    /// Decodes the raw type byte.
    pub const fn from_raw(raw: u8) -> Self {
        match raw {
            1 => Self::PciEndpoint,
            2 => Self::PciSubHierarchy,
            3 => Self::IoApic,
            4 => Self::Hpet,
            5 => Self::AcpiNamespaceDevice,
            other => Self::Other(other),
        }
    }

    /// The raw type byte.
    pub const fn raw(self) -> u8 {
        match self {
            Self::PciEndpoint => 1,
            Self::PciSubHierarchy => 2,
            Self::IoApic => 3,
            Self::Hpet => 4,
            Self::AcpiNamespaceDevice => 5,
            Self::Other(raw) => raw,
        }
    }
}

/// One hop of a device scope path: a device and function on the current bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathEntry {
    /// PCI device number (0..32 on a well-formed table).
    pub device: u8,
    /// PCI function number (0..8 on a well-formed table).
    pub function: u8,
}

impl fmt::Display for PathEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}.{:x}", self.device, self.function)
    }
}

/// One device scope entry, borrowed from the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceScope<'a> {
    bytes: &'a [u8],
}

impl<'a> DeviceScope<'a> {
    /// What the scope names.
    pub fn scope_type(&self) -> ScopeType {
        ScopeType::from_raw(u8_at(self.bytes, 0))
    }

    /// The scope's flags byte (meaningful in SIDP scopes, reserved elsewhere).
    pub fn flags(&self) -> u8 {
        u8_at(self.bytes, 2)
    }

    /// Enumeration id: the I/O APIC id, HPET number or ACPI device number.
    pub fn enumeration_id(&self) -> u8 {
        u8_at(self.bytes, 4)
    }

    /// The bus number where the path starts.
    pub fn start_bus(&self) -> u8 {
        u8_at(self.bytes, 5)
    }

    /// The path: (device, function) hops starting at [`start_bus`](Self::start_bus).
    pub fn path(&self) -> PathIter<'a> {
        PathIter {
            bytes: self.bytes.get(SCOPE_HEADER_LEN..).unwrap_or(&[]),
        }
    }

    /// Number of hops in the path (at least 1 for a scope that passed validation).
    pub fn path_len(&self) -> usize {
        self.bytes.len().saturating_sub(SCOPE_HEADER_LEN) / 2
    }

    /// The raw bytes of this entry (its whole length).
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The (bus, device, function) this scope names when its path has exactly one
    /// hop: no bridge has to be crossed, so no config space has to be read.
    pub fn direct_bdf(&self) -> Option<(u8, u8, u8)> {
        let mut path = self.path();
        let first = path.next()?;
        path.next()
            .is_none()
            .then_some((self.start_bus(), first.device, first.function))
    }
}

impl fmt::Display for DeviceScope<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scope_type() {
            ScopeType::PciEndpoint => f.write_str("endpoint")?,
            ScopeType::PciSubHierarchy => f.write_str("bridge")?,
            ScopeType::IoApic => write!(f, "ioapic {}", self.enumeration_id())?,
            ScopeType::Hpet => write!(f, "hpet {}", self.enumeration_id())?,
            ScopeType::AcpiNamespaceDevice => write!(f, "acpi-dev {}", self.enumeration_id())?,
            ScopeType::Other(t) => write!(f, "type-{t} id {}", self.enumeration_id())?,
        }
        write!(f, " {:02x}", self.start_bus())?;
        for (i, hop) in self.path().enumerate() {
            f.write_str(if i == 0 { ":" } else { "/" })?;
            write!(f, "{hop}")?;
        }
        Ok(())
    }
}

/// Iterator over the hops of a device scope path.
#[derive(Clone, Debug)]
pub struct PathIter<'a> {
    bytes: &'a [u8],
}

impl Iterator for PathIter<'_> {
    type Item = PathEntry;

    fn next(&mut self) -> Option<PathEntry> {
        let (&[device, function], rest) = self.bytes.split_first_chunk::<2>()?;
        self.bytes = rest;
        Some(PathEntry { device, function })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.bytes.len() / 2;
        (n, Some(n))
    }
}

impl ExactSizeIterator for PathIter<'_> {}
impl FusedIterator for PathIter<'_> {}

/// Iterator over the device scopes that end a remapping structure.
///
/// Yields `Err` once for the first malformed entry and then stops.
#[derive(Clone, Debug)]
pub struct DeviceScopes<'a> {
    bytes: &'a [u8],
    /// Table offset of `bytes[0]`, for error reports.
    offset: usize,
}

impl<'a> DeviceScopes<'a> {
    pub(crate) fn new(bytes: &'a [u8], offset: usize) -> Self {
        Self { bytes, offset }
    }

    /// Walks every entry once; returns the number of entries or the first error.
    pub fn validate(self) -> Result<usize, DmarError> {
        let mut n = 0;
        for scope in self {
            scope?;
            n += 1;
        }
        Ok(n)
    }
}

impl<'a> Iterator for DeviceScopes<'a> {
    type Item = Result<DeviceScope<'a>, DmarError>;

    fn next(&mut self) -> Option<Self::Item> {
        next_record(&mut self.bytes, &mut self.offset, |bytes, offset| {
            let remaining = bytes.len();
            if remaining < 2 {
                return Err(DmarError::ScopeHeaderTruncated { offset, remaining });
            }
            let length = u8_at(bytes, 1);
            let len = usize::from(length);
            if len < SCOPE_HEADER_LEN + 2 {
                return Err(DmarError::ScopeTooShort { offset, length });
            }
            if len % 2 != 0 {
                return Err(DmarError::ScopePathOdd { offset, length });
            }
            let (entry, rest) =
                bytes
                    .split_at_checked(len)
                    .ok_or(DmarError::ScopeLengthPastEnd {
                        offset,
                        length,
                        remaining,
                    })?;
            Ok((DeviceScope { bytes: entry }, rest))
        })
    }
}

impl FusedIterator for DeviceScopes<'_> {}
