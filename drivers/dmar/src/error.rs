//! Why a DMAR table was rejected.

use core::fmt;

/// A reason to reject a DMAR table.
///
/// Offsets are byte offsets from the start of the table. Every variant carries
/// enough context to say what was wrong and where, so the kernel can print one
/// line and go on without DMA remapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmarError {
    /// The slice is shorter than the 48-byte DMAR header.
    TooShortForHeader {
        /// Bytes available.
        len: usize,
    },
    /// The signature is not `DMAR`.
    BadSignature {
        /// The four signature bytes found.
        found: [u8; 4],
    },
    /// The header's length field is smaller than the DMAR header itself.
    TableLengthTooSmall {
        /// The header's length field.
        table_len: u32,
    },
    /// The header's length field reaches past the end of the slice.
    TableLengthPastSlice {
        /// The header's length field.
        table_len: u32,
        /// Bytes available.
        slice_len: usize,
    },
    /// The bytes of the table do not sum to zero.
    BadChecksum {
        /// The checksum byte stored in the header.
        stored: u8,
        /// The checksum byte that would make the table sum to zero.
        expected: u8,
    },
    /// The host address width field is out of range (it encodes width - 1; at most 63).
    BadHostAddressWidth {
        /// The raw field value.
        raw: u8,
    },
    /// Fewer than 4 bytes (a type and a length) are left for the next structure.
    StructureHeaderTruncated {
        /// Offset of the truncated structure header.
        offset: usize,
        /// Bytes left in the table.
        remaining: usize,
    },
    /// A remapping structure's length reaches past the end of the table.
    StructureLengthPastEnd {
        /// Offset of the structure.
        offset: usize,
        /// Its type field.
        kind: u16,
        /// Its length field.
        length: u16,
        /// Bytes left in the table from `offset`.
        remaining: usize,
    },
    /// A remapping structure's length is shorter than its fixed part (0 included).
    StructureTooShort {
        /// Offset of the structure.
        offset: usize,
        /// Its type field.
        kind: u16,
        /// Its length field.
        length: u16,
        /// The smallest valid length for this type.
        min: usize,
    },
    /// Fewer than 2 bytes (a type and a length) are left for the next device scope.
    ScopeHeaderTruncated {
        /// Offset of the truncated device scope.
        offset: usize,
        /// Bytes left in the enclosing structure.
        remaining: usize,
    },
    /// A device scope's length reaches past the end of its structure.
    ScopeLengthPastEnd {
        /// Offset of the device scope.
        offset: usize,
        /// Its length field.
        length: u8,
        /// Bytes left in the enclosing structure from `offset`.
        remaining: usize,
    },
    /// A device scope is shorter than its 6-byte header plus one path entry.
    ScopeTooShort {
        /// Offset of the device scope.
        offset: usize,
        /// Its length field.
        length: u8,
    },
    /// A device scope's path is not a whole number of (device, function) pairs.
    ScopePathOdd {
        /// Offset of the device scope.
        offset: usize,
        /// Its length field.
        length: u8,
    },
    /// A DRHD's register base address is not 4 KiB aligned.
    DrhdBaseUnaligned {
        /// Offset of the DRHD.
        offset: usize,
        /// The register base address.
        base: u64,
    },
    /// An RMRR's limit (inclusive end) is below its base.
    RmrrLimitBelowBase {
        /// Offset of the RMRR.
        offset: usize,
        /// The region's base address.
        base: u64,
        /// The region's limit address (inclusive).
        limit: u64,
    },
}

impl fmt::Display for DmarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::TooShortForHeader { len } => {
                write!(f, "DMAR table is {len} bytes, shorter than its 48-byte header")
            }
            Self::BadSignature { found } => write!(
                f,
                "bad DMAR signature {:?} (bytes {:02x?}), expected \"DMAR\"",
                core::str::from_utf8(&found).unwrap_or("?"),
                found
            ),
            Self::TableLengthTooSmall { table_len } => write!(
                f,
                "DMAR header length {table_len} is smaller than the 48-byte header"
            ),
            Self::TableLengthPastSlice {
                table_len,
                slice_len,
            } => write!(
                f,
                "DMAR header length {table_len} reaches past the {slice_len} bytes available"
            ),
            Self::BadChecksum { stored, expected } => write!(
                f,
                "bad DMAR checksum: stored 0x{stored:02x}, expected 0x{expected:02x} (table bytes do not sum to 0)"
            ),
            Self::BadHostAddressWidth { raw } => write!(
                f,
                "bad DMAR host address width field {raw} (width - 1, must be at most 63)"
            ),
            Self::StructureHeaderTruncated { offset, remaining } => write!(
                f,
                "remapping structure at offset {offset:#x}: only {remaining} bytes left, a structure header needs 4"
            ),
            Self::StructureLengthPastEnd {
                offset,
                kind,
                length,
                remaining,
            } => write!(
                f,
                "remapping structure at offset {offset:#x} (type {kind}): length {length} reaches past the end of the table ({remaining} bytes left)"
            ),
            Self::StructureTooShort {
                offset,
                kind,
                length,
                min,
            } => write!(
                f,
                "remapping structure at offset {offset:#x} (type {kind}): length {length} is shorter than the minimum {min}"
            ),
            Self::ScopeHeaderTruncated { offset, remaining } => write!(
                f,
                "device scope at offset {offset:#x}: only {remaining} bytes left in the structure, a scope header needs 2"
            ),
            Self::ScopeLengthPastEnd {
                offset,
                length,
                remaining,
            } => write!(
                f,
                "device scope at offset {offset:#x}: length {length} reaches past the end of its structure ({remaining} bytes left)"
            ),
            Self::ScopeTooShort { offset, length } => write!(
                f,
                "device scope at offset {offset:#x}: length {length} is shorter than 8 (6-byte header and one path entry)"
            ),
            Self::ScopePathOdd { offset, length } => write!(
                f,
                "device scope at offset {offset:#x}: length {length} leaves a path that is not whole (device, function) pairs"
            ),
            Self::DrhdBaseUnaligned { offset, base } => write!(
                f,
                "DRHD at offset {offset:#x}: register base {base:#x} is not 4 KiB aligned"
            ),
            Self::RmrrLimitBelowBase {
                offset,
                base,
                limit,
            } => write!(
                f,
                "RMRR at offset {offset:#x}: limit {limit:#x} is below base {base:#x}"
            ),
        }
    }
}

impl core::error::Error for DmarError {}
