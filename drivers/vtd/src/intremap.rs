//! Interrupt remapping formats (VT-d chapter 5 and 9.10): the remapped-format interrupt
//! remapping table entry ([`Irte`]) with source-id validation, the IRTA register value, the
//! remappable and compatibility MSI formats, and interrupt entry cache invalidation.
//!
//! With interrupt remapping on and compatibility format interrupts off (GSTS.CFIS clear), a
//! device can only raise the interrupts whose IRTEs the hypervisor made present and whose
//! source-id validation names it: an MSI write in compatibility format, to an index past the
//! table, to a non-present entry, or from another requester faults (reasons 0x20-0x27,
//! [`crate::fault::FaultReason`]) instead of reaching a CPU.

use crate::entry::SourceId;
use crate::hw::PhysAddr;

/// Bytes per IRTE.
pub const IRTE_SIZE: usize = 16;
/// IRTEs in the one 4 KiB table page this driver uses.
pub const TABLE_ENTRIES: usize = 256;
/// IRTA.S for [`TABLE_ENTRIES`]: the table has `2^(S + 1)` entries.
pub const TABLE_SIZE_FIELD: u8 = 7;
const _: () = assert!(1usize << (TABLE_SIZE_FIELD + 1) == TABLE_ENTRIES);
const _: () = assert!(TABLE_ENTRIES * IRTE_SIZE == 4096);

/// IRTA register bit: extended interrupt mode (x2APIC, 32-bit destinations; compatibility
/// format interrupts are then always blocked).
pub const IRTA_EIME: u64 = 1 << 11;

/// The IRTA register value: table base (4 KiB aligned), EIME, size field `s`
/// (`2^(s + 1)` entries).
pub const fn irta_value(base: PhysAddr, eime: bool, s: u8) -> u64 {
    (base.as_u64() & !0xfff) | if eime { IRTA_EIME } else { 0 } | (s as u64 & 0xf)
}

/// The number of entries an IRTA value's size field names.
pub const fn irta_entries(irta: u64) -> usize {
    1usize << ((irta & 0xf) + 1)
}

/// IRTE delivery mode (DLM, bits 7:5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    /// Fixed.
    Fixed = 0,
    /// Lowest priority.
    LowestPriority = 1,
    /// NMI.
    Nmi = 4,
}

/// Which bits of the requester id source-id validation compares (SQ, with SVT = 01).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceQualifier {
    /// All 16 bits.
    Exact = 0,
    /// All but function bit 2.
    IgnoreFunctionBit2 = 1,
    /// All but function bits 2:1.
    IgnoreFunctionBits2To1 = 2,
    /// All but the function number.
    IgnoreFunction = 3,
}

impl SourceQualifier {
    /// The requester-id bits compared.
    pub const fn mask(self) -> u16 {
        match self {
            Self::Exact => 0xffff,
            Self::IgnoreFunctionBit2 => 0xfffb,
            Self::IgnoreFunctionBits2To1 => 0xfff9,
            Self::IgnoreFunction => 0xfff8,
        }
    }
}

/// Source-id validation of an IRTE (SVT, SQ, SID).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceValidation {
    /// SVT = 00: any requester may use the entry. Never used by this driver for a device.
    None,
    /// SVT = 01: the requester id must equal `sid` in the bits `qualifier` keeps.
    Requester {
        /// Expected requester.
        sid: SourceId,
        /// Bits compared.
        qualifier: SourceQualifier,
    },
    /// SVT = 10: the requester's bus must lie in `[first, last]` (devices behind a
    /// PCIe-to-PCI bridge).
    Bus {
        /// First bus.
        first: u8,
        /// Last bus.
        last: u8,
    },
}

/// A remapped-format interrupt remapping table entry (128 bits).
///
/// Low qword: P (0), FPD (1), DM (2), RH (3), TM (4), DLM (7:5), AVAIL (11:8), IM (15, 0 =
/// remapped), V (23:16), DST (63:32; in xAPIC mode the APIC id in bits 47:40). High qword:
/// SID (15:0), SQ (17:16), SVT (19:18). Everything else is reserved (zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(C)]
pub struct Irte {
    /// Bits 63:0.
    pub lo: u64,
    /// Bits 127:64.
    pub hi: u64,
}
const _: () = assert!(core::mem::size_of::<Irte>() == IRTE_SIZE);

/// Reserved bits of the low qword in any mode (14:12, 31:24; IM (15) is not supported).
const LO_RESERVED: u64 = 0x0000_0000_ff00_f000;
/// Further reserved bits of the low qword in xAPIC mode (DST 39:32 and 63:48).
const LO_RESERVED_XAPIC: u64 = 0xffff_00ff_0000_0000;
/// Reserved bits of the high qword (127:84).
const HI_RESERVED: u64 = !0xf_ffff;

impl Irte {
    /// The not-present entry.
    pub const NOT_PRESENT: Irte = Irte { lo: 0, hi: 0 };

    /// A present remapped entry: edge-triggered, physical destination `apic_id` (an 8-bit
    /// xAPIC id unless `x2apic`), `vector`, `delivery`, validated by `source`.
    pub const fn remapped(
        vector: u8,
        apic_id: u32,
        x2apic: bool,
        delivery: DeliveryMode,
        source: SourceValidation,
    ) -> Irte {
        let dst = if x2apic {
            (apic_id as u64) << 32
        } else {
            ((apic_id & 0xff) as u64) << 40
        };
        let lo = 1 | ((delivery as u64) << 5) | ((vector as u64) << 16) | dst;
        let hi = match source {
            SourceValidation::None => 0,
            SourceValidation::Requester { sid, qualifier } => {
                (1 << 18) | ((qualifier as u64) << 16) | sid.0 as u64
            }
            SourceValidation::Bus { first, last } => {
                (2 << 18) | ((first as u64) << 8) | last as u64
            }
        };
        Irte { lo, hi }
    }

    /// P: the entry is present.
    pub const fn present(self) -> bool {
        self.lo & 1 != 0
    }

    /// FPD: faults through this entry are not recorded.
    pub const fn fault_processing_disabled(self) -> bool {
        self.lo & 2 != 0
    }

    /// V: the vector delivered.
    pub const fn vector(self) -> u8 {
        (self.lo >> 16) as u8
    }

    /// DLM: the delivery mode code.
    pub const fn delivery_code(self) -> u8 {
        ((self.lo >> 5) & 7) as u8
    }

    /// DM: logical destination.
    pub const fn logical(self) -> bool {
        self.lo & 4 != 0
    }

    /// TM: level-triggered.
    pub const fn level(self) -> bool {
        self.lo & 0x10 != 0
    }

    /// The destination APIC id (8 bits in xAPIC mode, 32 bits in x2APIC mode).
    pub const fn destination(self, x2apic: bool) -> u32 {
        if x2apic {
            (self.lo >> 32) as u32
        } else {
            ((self.lo >> 40) & 0xff) as u32
        }
    }

    /// The entry's source-id validation (`None` for the reserved SVT 11 as well: see
    /// [`Irte::reserved_bits_set`]).
    pub const fn source_validation(self) -> SourceValidation {
        let sid = self.hi as u16;
        match (self.hi >> 18) & 3 {
            1 => SourceValidation::Requester {
                sid: SourceId(sid),
                qualifier: match (self.hi >> 16) & 3 {
                    0 => SourceQualifier::Exact,
                    1 => SourceQualifier::IgnoreFunctionBit2,
                    2 => SourceQualifier::IgnoreFunctionBits2To1,
                    _ => SourceQualifier::IgnoreFunction,
                },
            },
            2 => SourceValidation::Bus {
                first: (sid >> 8) as u8,
                last: sid as u8,
            },
            _ => SourceValidation::None,
        }
    }

    /// Reserved bits set (fault reason 0x24 on a present entry): reserved fields, posted
    /// mode (IM), SVT = 11, or an undefined delivery mode.
    pub const fn reserved_bits_set(self, x2apic: bool) -> bool {
        let lo_mask = if x2apic {
            LO_RESERVED | (1 << 15)
        } else {
            LO_RESERVED | LO_RESERVED_XAPIC | (1 << 15)
        };
        self.lo & lo_mask != 0
            || self.hi & HI_RESERVED != 0
            || (self.hi >> 18) & 3 == 3
            || matches!(self.delivery_code(), 3 | 6)
    }

    /// Whether `requester` passes this entry's source-id validation.
    pub const fn admits(self, requester: SourceId) -> bool {
        match self.source_validation() {
            SourceValidation::None => true,
            SourceValidation::Requester { sid, qualifier } => {
                requester.0 & qualifier.mask() == sid.0 & qualifier.mask()
            }
            SourceValidation::Bus { first, last } => {
                let bus = requester.bus();
                first <= bus && bus <= last
            }
        }
    }
}

/// An MSI as a device writes it: a 32-bit address in the interrupt window and 32 bits of data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    /// Address (bits 63:32 must be zero; 31:20 are 0xFEE).
    pub address: u64,
    /// Data.
    pub data: u32,
}

/// Address bit 4: interrupt format (1 = remappable).
pub const MSI_REMAPPABLE: u64 = 1 << 4;
/// Address bit 3: SHV (subhandle valid: the data's low 16 bits are added to the handle).
pub const MSI_SHV: u64 = 1 << 3;

/// The remappable-format MSI naming IRTE `index` (no subhandle; data 0).
pub const fn remappable_msi(index: u16) -> MsiMessage {
    MsiMessage {
        address: 0xfee0_0000
            | (((index & 0x7fff) as u64) << 5)
            | MSI_REMAPPABLE
            | ((((index >> 15) & 1) as u64) << 2),
        data: 0,
    }
}

/// The compatibility-format MSI for a fixed, edge, physical `vector` to xAPIC `apic_id`.
pub const fn compatibility_msi(apic_id: u8, vector: u8) -> MsiMessage {
    MsiMessage {
        address: 0xfee0_0000 | ((apic_id as u64) << 12),
        data: vector as u32,
    }
}

/// What an interrupt request decodes to before the table is consulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsiFormat {
    /// Compatibility format: vector in data bits 7:0, destination in address bits 19:12.
    Compatibility {
        /// Vector.
        vector: u8,
        /// Destination APIC id.
        apic_id: u8,
    },
    /// Remappable format naming `index` (handle plus the subhandle when SHV is set).
    Remappable {
        /// The interrupt index.
        index: u32,
    },
    /// Not an interrupt request of either format (address outside the window or reserved
    /// bits set): fault reason 0x20.
    Malformed,
}

impl MsiMessage {
    /// Decodes the request format.
    pub const fn format(self) -> MsiFormat {
        if self.address >> 32 != 0 || (self.address >> 20) & 0xfff != 0xfee {
            return MsiFormat::Malformed;
        }
        if self.address & MSI_REMAPPABLE == 0 {
            return MsiFormat::Compatibility {
                vector: self.data as u8,
                apic_id: (self.address >> 12) as u8,
            };
        }
        let handle = (((self.address >> 5) & 0x7fff) | (((self.address >> 2) & 1) << 15)) as u32;
        if self.address & MSI_SHV != 0 {
            MsiFormat::Remappable {
                index: handle + (self.data & 0xffff),
            }
        } else if self.data != 0 {
            // Without SHV the data is reserved.
            MsiFormat::Malformed
        } else {
            MsiFormat::Remappable { index: handle }
        }
    }
}

/// Interrupt entry cache invalidation granularity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IecGranularity {
    /// Every cached entry.
    Global,
    /// Entries `[index, index + 2^mask)` (`index` aligned to `2^mask`).
    Index {
        /// First index.
        index: u16,
        /// Index mask: log2 of the number of entries.
        mask: u8,
    },
}

impl IecGranularity {
    /// The descriptor's low qword bits for this granularity (G at bit 4, IM 31:27, IIDX 47:32).
    pub const fn descriptor_bits(self) -> u64 {
        match self {
            Self::Global => 0,
            Self::Index { index, mask } => {
                (1 << 4) | (((mask & 0x1f) as u64) << 27) | ((index as u64) << 32)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remapped_irte_encoding() {
        let sid = SourceId::new(0, 5, 0);
        let e = Irte::remapped(
            0x51,
            3,
            false,
            DeliveryMode::Fixed,
            SourceValidation::Requester {
                sid,
                qualifier: SourceQualifier::Exact,
            },
        );
        assert_eq!(e.lo, 1 | (0x51 << 16) | (3 << 40));
        assert_eq!(e.hi, (1 << 18) | 0x28);
        assert!(e.present());
        assert_eq!(e.vector(), 0x51);
        assert_eq!(e.destination(false), 3);
        assert!(!e.reserved_bits_set(false));
        assert!(e.admits(sid));
        assert!(!e.admits(SourceId::new(0, 6, 0)));
        assert!(!e.admits(SourceId::new(0, 5, 1)));
        let x2 = Irte::remapped(
            0x51,
            0x1_0003,
            true,
            DeliveryMode::Fixed,
            SourceValidation::None,
        );
        assert_eq!(x2.destination(true), 0x1_0003);
        assert!(
            x2.reserved_bits_set(false),
            "a 32-bit destination in xAPIC mode"
        );
        assert!(!x2.reserved_bits_set(true));
        let posted = Irte {
            lo: e.lo | (1 << 15),
            hi: e.hi,
        };
        assert!(posted.reserved_bits_set(false));
        let svt3 = Irte {
            lo: e.lo,
            hi: e.hi | (3 << 18),
        };
        assert!(svt3.reserved_bits_set(false));
    }

    #[test]
    fn source_qualifier_and_bus_range() {
        let e = Irte::remapped(
            0x40,
            0,
            false,
            DeliveryMode::Fixed,
            SourceValidation::Requester {
                sid: SourceId::new(1, 2, 0),
                qualifier: SourceQualifier::IgnoreFunction,
            },
        );
        assert!(e.admits(SourceId::new(1, 2, 7)));
        assert!(!e.admits(SourceId::new(1, 3, 0)));
        let b = Irte::remapped(
            0x40,
            0,
            false,
            DeliveryMode::Fixed,
            SourceValidation::Bus { first: 2, last: 4 },
        );
        assert!(b.admits(SourceId::new(3, 9, 1)));
        assert!(!b.admits(SourceId::new(5, 0, 0)));
        assert_eq!(
            b.source_validation(),
            SourceValidation::Bus { first: 2, last: 4 }
        );
    }

    #[test]
    fn msi_formats() {
        for index in [0u16, 1, 255, 0x7fff, 0x8000, 0xffff] {
            assert_eq!(
                remappable_msi(index).format(),
                MsiFormat::Remappable {
                    index: index as u32
                }
            );
        }
        assert_eq!(
            compatibility_msi(2, 0x31).format(),
            MsiFormat::Compatibility {
                vector: 0x31,
                apic_id: 2
            }
        );
        let shv = MsiMessage {
            address: remappable_msi(8).address | MSI_SHV,
            data: 3,
        };
        assert_eq!(shv.format(), MsiFormat::Remappable { index: 11 });
        let bad_data = MsiMessage {
            data: 1,
            ..remappable_msi(8)
        };
        assert_eq!(bad_data.format(), MsiFormat::Malformed);
        let outside = MsiMessage {
            address: 0xfed0_0010,
            data: 0,
        };
        assert_eq!(outside.format(), MsiFormat::Malformed);
        assert_eq!(
            irta_value(PhysAddr::new(0x1234_5000), true, 7),
            0x1234_5000 | (1 << 11) | 7
        );
        assert_eq!(
            irta_entries(irta_value(PhysAddr::new(0), false, TABLE_SIZE_FIELD)),
            256
        );
        assert_eq!(
            IecGranularity::Index { index: 9, mask: 0 }.descriptor_bits(),
            (1 << 4) | (9 << 32)
        );
    }
}
