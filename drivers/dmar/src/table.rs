//! The DMAR table header and whole-table validation.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | signature `DMAR` |
//! | 4 | 4 | length of the whole table |
//! | 8 | 1 | revision |
//! | 9 | 1 | checksum (all bytes of the table sum to 0) |
//! | 10 | 6 | OEM id |
//! | 16 | 8 | OEM table id |
//! | 24 | 4 | OEM revision |
//! | 28 | 4 | creator id |
//! | 32 | 4 | creator revision |
//! | 36 | 1 | host address width - 1 |
//! | 37 | 1 | flags ([`DmarFlags`]) |
//! | 38 | 10 | reserved |
//! | 48 | .. | remapping structures |

use bitflags::bitflags;

use crate::bytes::{bytes_at, u32_at, u8_at};
use crate::error::DmarError;
use crate::structures::{Atsr, Drhd, RemappingStructure, Rmrr, Structures};

/// The DMAR table signature.
pub const SIGNATURE: [u8; 4] = *b"DMAR";

/// Size of the DMAR header (the ACPI SDT header plus the DMAR fields).
pub const HEADER_LEN: usize = 48;

bitflags! {
    /// DMAR table flags.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct DmarFlags: u8 {
        /// The platform supports interrupt remapping.
        const INTR_REMAP = 1 << 0;
        /// Firmware asks the OS not to enable x2APIC mode.
        const X2APIC_OPT_OUT = 1 << 1;
        /// Firmware asks the OS to enable DMA protection (it may have set up
        /// protected memory regions for pre-boot DMA protection).
        const DMA_CTRL_PLATFORM_OPT_IN = 1 << 2;
    }
}

/// A DMAR table whose header has been checked, borrowed from its bytes.
///
/// [`Dmar::parse`] also walks every structure and device scope once
/// ([`Dmar::validate`]); after it succeeds the iterators below yield no errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dmar<'a> {
    /// Exactly the table's bytes (header length, not the slice length).
    bytes: &'a [u8],
}

/// What [`Dmar::validate`] counted while walking the table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// DRHD units.
    pub drhds: usize,
    /// Reserved memory regions.
    pub rmrrs: usize,
    /// ATSR structures.
    pub atsrs: usize,
    /// RHSA, ANDD, SATC and SIDP structures.
    pub others: usize,
    /// Structures of unknown types, skipped by length.
    pub unknown: usize,
    /// Device scopes across all structures.
    pub scopes: usize,
}

impl<'a> Dmar<'a> {
    /// Checks the header (signature, length, checksum, host address width) and
    /// walks every remapping structure and device scope once.
    ///
    /// `bytes` may be longer than the table: only the header's length is used.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, DmarError> {
        let dmar = Self::parse_header(bytes)?;
        dmar.validate()?;
        Ok(dmar)
    }

    /// Checks only the header: signature, length, checksum, host address width.
    /// The structures are decoded lazily; call [`validate`](Self::validate) to
    /// check them all up front.
    pub fn parse_header(bytes: &'a [u8]) -> Result<Self, DmarError> {
        if bytes.len() < HEADER_LEN {
            return Err(DmarError::TooShortForHeader { len: bytes.len() });
        }
        let found: [u8; 4] = bytes_at(bytes, 0);
        if found != SIGNATURE {
            return Err(DmarError::BadSignature { found });
        }
        let table_len = u32_at(bytes, 4);
        let len = usize::try_from(table_len).unwrap_or(usize::MAX);
        if len < HEADER_LEN {
            return Err(DmarError::TableLengthTooSmall { table_len });
        }
        let table = bytes.get(..len).ok_or(DmarError::TableLengthPastSlice {
            table_len,
            slice_len: bytes.len(),
        })?;
        let sum = table.iter().fold(0u8, |acc, &b| acc.wrapping_add(b));
        if sum != 0 {
            let stored = u8_at(table, 9);
            return Err(DmarError::BadChecksum {
                stored,
                expected: stored.wrapping_sub(sum),
            });
        }
        let raw = u8_at(table, 36);
        if raw > 63 {
            return Err(DmarError::BadHostAddressWidth { raw });
        }
        Ok(Self { bytes: table })
    }

    /// Walks every remapping structure and every device scope once, returning
    /// counts, or the first error. Never reads out of bounds and always ends.
    pub fn validate(&self) -> Result<Summary, DmarError> {
        let mut summary = Summary::default();
        for s in self.structures() {
            let s = s?;
            match s {
                RemappingStructure::Drhd(_) => summary.drhds += 1,
                RemappingStructure::Rmrr(_) => summary.rmrrs += 1,
                RemappingStructure::Atsr(_) => summary.atsrs += 1,
                RemappingStructure::Unknown { .. } => summary.unknown += 1,
                _ => summary.others += 1,
            }
            summary.scopes += s.scopes().validate()?;
        }
        Ok(summary)
    }

    /// The table's bytes (exactly its header length).
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The table revision.
    pub fn revision(&self) -> u8 {
        u8_at(self.bytes, 8)
    }

    /// OEM id.
    pub fn oem_id(&self) -> [u8; 6] {
        bytes_at(self.bytes, 10)
    }

    /// OEM table id.
    pub fn oem_table_id(&self) -> [u8; 8] {
        bytes_at(self.bytes, 16)
    }

    /// Maximum DMA physical address width in bits (the field plus one).
    pub fn host_address_width(&self) -> u8 {
        u8_at(self.bytes, 36) + 1
    }

    /// Table flags.
    pub fn flags(&self) -> DmarFlags {
        DmarFlags::from_bits_retain(u8_at(self.bytes, 37))
    }

    /// Every remapping structure in table order; stops after the first error.
    pub fn structures(&self) -> Structures<'a> {
        Structures::new(self.bytes.get(HEADER_LEN..).unwrap_or(&[]), HEADER_LEN)
    }

    /// The structures of type `T` in table order (stops at a malformed structure).
    fn of_type<T: TryFrom<RemappingStructure<'a>>>(
        &self,
    ) -> impl Iterator<Item = T> + Clone + 'a + use<'a, T> {
        self.structures()
            .map_while(Result::ok)
            .filter_map(|s| T::try_from(s).ok())
    }

    /// The DRHD units in table order (stops at a malformed structure).
    pub fn drhds(&self) -> impl Iterator<Item = Drhd<'a>> + Clone + 'a + use<'a> {
        self.of_type()
    }

    /// The reserved memory regions in table order (stops at a malformed structure).
    pub fn rmrrs(&self) -> impl Iterator<Item = Rmrr<'a>> + Clone + 'a + use<'a> {
        self.of_type()
    }

    /// The ATSR structures in table order (stops at a malformed structure).
    pub fn atsrs(&self) -> impl Iterator<Item = Atsr<'a>> + Clone + 'a + use<'a> {
        self.of_type()
    }
}
