//! The DMAR tables QEMU 7.2 really generates (captured by data/capture.py), and
//! corrupted variants of them.

mod common;

use common::*;
use moat_dmar::*;

const DRHD_OFF: usize = 48;
const IOAPIC_SCOPE_OFF: usize = DRHD_OFF + 16;

/// The default table with `bytes` written at `offset`, its checksum fixed again.
fn patched(offset: usize, bytes: &[u8]) -> Vec<u8> {
    let mut t = QEMU_DMAR.to_vec();
    t[offset..offset + bytes.len()].copy_from_slice(bytes);
    fix_checksum(&mut t);
    t
}

#[test]
fn default_table_parses() {
    let dmar = Dmar::parse(QEMU_DMAR).unwrap();
    assert_eq!(dmar.as_bytes().len(), 112);
    assert_eq!(dmar.revision(), 1);
    assert_eq!(&dmar.oem_id(), b"BOCHS ");
    assert_eq!(dmar.host_address_width(), 39);
    assert_eq!(dmar.flags(), DmarFlags::empty());
    let summary = dmar.validate().unwrap();
    assert_eq!(
        summary,
        Summary {
            drhds: 1,
            rmrrs: 0,
            atsrs: 0,
            others: 0,
            unknown: 0,
            scopes: 6
        }
    );

    let units: Vec<_> = dmar.drhds().collect();
    assert_eq!(units.len(), 1);
    let unit = units[0];
    assert_eq!(unit.register_base(), 0xfed9_0000);
    // QEMU 7.2 does not set INCLUDE_PCI_ALL: it names every root-bus device.
    assert!(!unit.include_pci_all());
    assert_eq!(unit.flags(), DrhdFlags::empty());
    assert_eq!(unit.segment(), 0);
    assert_eq!(unit.register_set_size(), 4096);
    assert_eq!(
        std::format!("{}", RemappingStructure::Drhd(unit)),
        "DRHD segment 0 base 0xfed90000 size 0x1000"
    );

    let scopes: Vec<String> = unit
        .scopes()
        .map(|s| std::format!("{}", s.unwrap()))
        .collect();
    // QEMU lists the I/O APIC (on its pseudo bus 0xff) and every function on bus 0,
    // here the host bridge, the edu device and the ICH9 LPC, SATA and SMBus.
    assert_eq!(
        scopes,
        [
            "ioapic 0 ff:00.0",
            "endpoint 00:00.0",
            "endpoint 00:01.0",
            "endpoint 00:1f.0",
            "endpoint 00:1f.2",
            "endpoint 00:1f.3"
        ]
    );
    assert_eq!(dmar.rmrrs().count(), 0);
    assert_eq!(dmar.atsrs().count(), 0);
}

#[test]
fn default_table_lookups() {
    let dmar = Dmar::parse(QEMU_DMAR).unwrap();
    let edu = PciFunction::new(0, 0, 1, 0);
    let unit = dmar.find_drhd(edu, &NoBridges).unwrap();
    assert_eq!(unit.register_base(), 0xfed9_0000);
    assert!(unit.scope_covers(edu, &NoBridges));
    // Named in no scope and there is no INCLUDE_PCI_ALL unit: not translated.
    assert_eq!(
        dmar.find_drhd(PciFunction::new(0, 0, 5, 0), &NoBridges),
        None
    );
    assert_eq!(
        dmar.find_drhd(PciFunction::new(0, 5, 0, 0), &NoBridges),
        None
    );
    assert_eq!(
        dmar.find_drhd(PciFunction::new(1, 0, 1, 0), &NoBridges),
        None
    );
    assert_eq!(dmar.rmrrs_for(edu, &NoBridges).count(), 0);

    let (ioapic_unit, scope) = dmar.find_ioapic(0).unwrap();
    assert_eq!(ioapic_unit, unit);
    assert_eq!(scope.direct_bdf(), Some((0xff, 0, 0)));
    assert!(dmar.find_ioapic(1).is_none());
}

#[test]
fn include_pci_all_catches_the_rest() {
    // The real table with the DRHD's INCLUDE_PCI_ALL flag set (checksum fixed).
    let t = patched(DRHD_OFF + 4, &[DrhdFlags::INCLUDE_PCI_ALL.bits()]);
    let dmar = Dmar::parse(&t).unwrap();
    let unit = dmar.drhds().next().unwrap();
    assert!(unit.include_pci_all());
    let elsewhere = PciFunction::new(0, 5, 0, 0);
    assert_eq!(dmar.find_drhd(elsewhere, &NoBridges), Some(unit));
    assert_eq!(
        dmar.find_drhd(PciFunction::new(1, 5, 0, 0), &NoBridges),
        None
    );
}

#[test]
fn root_port_is_a_sub_hierarchy_scope() {
    let dmar = Dmar::parse(QEMU_DMAR_ROOTPORT).unwrap();
    let unit = dmar.drhds().next().unwrap();
    let port = unit
        .scopes()
        .map(Result::unwrap)
        .find(|s| s.scope_type() == ScopeType::PciSubHierarchy)
        .unwrap();
    assert_eq!(port.direct_bdf(), Some((0, 1, 0)));
    assert_eq!(std::format!("{port}"), "bridge 00:01.0");

    // The root port at 00:01.0 bridges to bus 1, where edu sits at 01:00.0.
    let topology = |f: PciFunction| {
        (f == PciFunction::new(0, 0, 1, 0)).then_some(BusRange {
            secondary: 1,
            subordinate: 1,
        })
    };
    let edu = PciFunction::new(0, 1, 0, 0);
    assert_eq!(dmar.find_drhd(edu, &topology), Some(unit));
    assert_eq!(
        dmar.find_drhd(PciFunction::new(0, 0, 1, 0), &topology),
        Some(unit)
    );
    assert_eq!(
        dmar.find_drhd(PciFunction::new(0, 2, 0, 0), &topology),
        None
    );
    // Without knowing the bridge's buses, edu cannot be placed.
    assert_eq!(dmar.find_drhd(edu, &NoBridges), None);
}

#[test]
fn variants_parse() {
    let aw48 = Dmar::parse(QEMU_DMAR_AW48_CM).unwrap();
    assert_eq!(aw48.host_address_width(), 48);
    assert_eq!(aw48.drhds().next().unwrap().register_base(), 0xfed9_0000);

    let ir = Dmar::parse(QEMU_DMAR_IR).unwrap();
    assert_eq!(ir.flags(), DmarFlags::INTR_REMAP);
    assert_eq!(ir.host_address_width(), 39);

    let ats = Dmar::parse(QEMU_DMAR_ATS).unwrap();
    let atsr: Vec<_> = ats.atsrs().collect();
    assert_eq!(atsr.len(), 1);
    assert!(atsr[0].all_ports());
    assert_eq!(atsr[0].segment(), 0);
    assert_eq!(atsr[0].scopes().count(), 0);
    assert_eq!(ats.validate().unwrap().atsrs, 1);
    assert_eq!(ats.drhds().count(), 1);
}

#[test]
fn flipped_byte_is_a_bad_checksum() {
    let mut t = QEMU_DMAR.to_vec();
    t[DRHD_OFF] ^= 0xff; // DRHD type 0x0000 -> 0x00ff; the table now sums to 0xff
    assert_eq!(
        Dmar::parse(&t),
        Err(DmarError::BadChecksum {
            stored: 0x29,
            expected: 0x2a
        })
    );
    let msg = std::format!("{}", Dmar::parse(&t).unwrap_err());
    assert_eq!(
        msg,
        "bad DMAR checksum: stored 0x29, expected 0x2a (table bytes do not sum to 0)"
    );
    // Every single-byte change is caught.
    for i in 0..t.len() {
        let mut t = QEMU_DMAR.to_vec();
        t[i] = t[i].wrapping_add(1);
        assert!(Dmar::parse(&t).is_err(), "byte {i}");
    }
}

#[test]
fn truncated_slice_is_rejected() {
    assert_eq!(
        Dmar::parse(&QEMU_DMAR[..100]),
        Err(DmarError::TableLengthPastSlice {
            table_len: 112,
            slice_len: 100
        })
    );
    assert_eq!(
        Dmar::parse(&QEMU_DMAR[..20]),
        Err(DmarError::TooShortForHeader { len: 20 })
    );
    assert_eq!(
        Dmar::parse(&[]),
        Err(DmarError::TooShortForHeader { len: 0 })
    );
}

#[test]
fn truncated_table_cuts_the_drhd() {
    // A consistent header (length 100, checksum fixed) but the DRHD says 64 bytes.
    let mut t = QEMU_DMAR[..100].to_vec();
    fix_header(&mut t);
    assert_eq!(
        Dmar::parse(&t),
        Err(DmarError::StructureLengthPastEnd {
            offset: 48,
            kind: 0,
            length: 64,
            remaining: 52
        })
    );
    // Cut in the middle of a structure header.
    let mut t = QEMU_DMAR[..50].to_vec();
    fix_header(&mut t);
    assert_eq!(
        Dmar::parse(&t),
        Err(DmarError::StructureHeaderTruncated {
            offset: 48,
            remaining: 2
        })
    );
    // The header alone is a valid table without units.
    let mut t = QEMU_DMAR[..48].to_vec();
    fix_header(&mut t);
    let dmar = Dmar::parse(&t).unwrap();
    assert_eq!(dmar.drhds().count(), 0);
    assert_eq!(
        dmar.find_drhd(PciFunction::new(0, 0, 1, 0), &NoBridges),
        None
    );
}

#[test]
fn structure_length_past_end() {
    let t = patched(DRHD_OFF + 2, &[72]);
    let err = Dmar::parse(&t).unwrap_err();
    assert_eq!(
        err,
        DmarError::StructureLengthPastEnd {
            offset: 48,
            kind: 0,
            length: 72,
            remaining: 64
        }
    );
    assert_eq!(
        std::format!("{err}"),
        "remapping structure at offset 0x30 (type 0): length 72 reaches past the end of the table (64 bytes left)"
    );
    // The header alone still parses; the lazy iterators stop at the bad structure.
    let dmar = Dmar::parse_header(&t).unwrap();
    assert_eq!(dmar.drhds().count(), 0);
    let mut it = dmar.structures();
    assert!(it.next().unwrap().is_err());
    assert!(it.next().is_none());
}

#[test]
fn structure_length_zero() {
    let t = patched(DRHD_OFF + 2, &[0]);
    assert_eq!(
        Dmar::parse(&t),
        Err(DmarError::StructureTooShort {
            offset: 48,
            kind: 0,
            length: 0,
            min: 16
        })
    );
    // A DRHD shorter than its fixed part, with the rest of the table still
    // well-formed behind it.
    let mut t = QEMU_DMAR.to_vec();
    t[DRHD_OFF + 2] = 12;
    t.truncate(DRHD_OFF + 12);
    fix_header(&mut t);
    assert_eq!(
        Dmar::parse(&t),
        Err(DmarError::StructureTooShort {
            offset: 48,
            kind: 0,
            length: 12,
            min: 16
        })
    );
}

#[test]
fn unknown_structure_with_length_zero() {
    let mut t = QEMU_DMAR.to_vec();
    t.extend_from_slice(&[0x99, 0, 0, 0]);
    fix_header(&mut t);
    let err = Dmar::parse(&t).unwrap_err();
    assert_eq!(
        err,
        DmarError::StructureTooShort {
            offset: 112,
            kind: 0x99,
            length: 0,
            min: 4
        }
    );
    assert_eq!(
        std::format!("{err}"),
        "remapping structure at offset 0x70 (type 153): length 0 is shorter than the minimum 4"
    );
    // Length 2: shorter than the type and length fields themselves.
    let n = t.len();
    t[n - 2] = 2;
    fix_checksum(&mut t);
    assert!(matches!(
        Dmar::parse(&t),
        Err(DmarError::StructureTooShort { length: 2, .. })
    ));
}

#[test]
fn unknown_structure_is_skipped() {
    let mut t = QEMU_DMAR.to_vec();
    t.extend_from_slice(&[0x2a, 0x00, 12, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
    // The header length still says 112: the extra bytes are not part of the table.
    assert_eq!(Dmar::parse(&t).unwrap().validate().unwrap().unknown, 0);
    // With the length but not the checksum fixed, it is rejected ...
    t[4] = 124;
    assert!(matches!(
        Dmar::parse(&t),
        Err(DmarError::BadChecksum { .. })
    ));
    // ... and with it, the unknown structure is skipped by its length.
    fix_header(&mut t);
    let dmar = Dmar::parse(&t).unwrap();
    let summary = dmar.validate().unwrap();
    assert_eq!(summary.drhds, 1);
    assert_eq!(summary.unknown, 1);
    let last = dmar.structures().last().unwrap().unwrap();
    assert_eq!(last.kind(), 0x2a);
    assert!(matches!(last, RemappingStructure::Unknown { bytes, .. } if bytes.len() == 12));
    assert_eq!(
        dmar.find_drhd(PciFunction::new(0, 0, 1, 0), &NoBridges)
            .unwrap()
            .register_base(),
        0xfed9_0000
    );
}

#[test]
fn table_length_larger_than_slice() {
    let mut t = patched(4, &4096u32.to_le_bytes());
    assert_eq!(
        Dmar::parse(&t),
        Err(DmarError::TableLengthPastSlice {
            table_len: 4096,
            slice_len: 112
        })
    );
    t[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        Dmar::parse(&t),
        Err(DmarError::TableLengthPastSlice { .. })
    ));
}

#[test]
fn slice_longer_than_table_uses_header_length() {
    let mut t = QEMU_DMAR.to_vec();
    t.extend_from_slice(&[0xde, 0xad, 0, 0, 0, 0]); // junk after the table
    let dmar = Dmar::parse(&t).unwrap();
    assert_eq!(dmar.as_bytes(), QEMU_DMAR);
}

#[test]
fn table_length_smaller_than_header() {
    let mut t = QEMU_DMAR.to_vec();
    t[4..8].copy_from_slice(&40u32.to_le_bytes());
    assert_eq!(
        Dmar::parse(&t),
        Err(DmarError::TableLengthTooSmall { table_len: 40 })
    );
}

#[test]
fn bad_signature() {
    let t = patched(0, b"APIC");
    let err = Dmar::parse(&t).unwrap_err();
    assert_eq!(err, DmarError::BadSignature { found: *b"APIC" });
    assert!(std::format!("{err}").starts_with("bad DMAR signature \"APIC\""));
}

#[test]
fn bad_host_address_width() {
    let t = patched(36, &[64]);
    assert_eq!(
        Dmar::parse(&t),
        Err(DmarError::BadHostAddressWidth { raw: 64 })
    );
    let t = patched(36, &[63]);
    assert_eq!(Dmar::parse(&t).unwrap().host_address_width(), 64);
}

#[test]
fn scope_length_errors() {
    let with_scope_len = |len: u8| {
        let t = patched(IOAPIC_SCOPE_OFF + 1, &[len]);
        Dmar::parse(&t).map(|_| ())
    };
    assert_eq!(
        with_scope_len(50),
        Err(DmarError::ScopeLengthPastEnd {
            offset: IOAPIC_SCOPE_OFF,
            length: 50,
            remaining: 48
        })
    );
    assert_eq!(
        with_scope_len(0),
        Err(DmarError::ScopeTooShort {
            offset: IOAPIC_SCOPE_OFF,
            length: 0
        })
    );
    assert_eq!(
        with_scope_len(6),
        Err(DmarError::ScopeTooShort {
            offset: IOAPIC_SCOPE_OFF,
            length: 6
        })
    );
    assert_eq!(
        with_scope_len(9),
        Err(DmarError::ScopePathOdd {
            offset: IOAPIC_SCOPE_OFF,
            length: 9
        })
    );
    // Length 10: a 2-hop path that swallows the next entry's first 2 bytes, so
    // the next entry starts mid-way and its "length" byte is 0x00.
    assert_eq!(
        with_scope_len(10),
        Err(DmarError::ScopeTooShort {
            offset: IOAPIC_SCOPE_OFF + 10,
            length: 0
        })
    );
    // A DRHD whose scopes end with a single stray byte.
    let mut t = QEMU_DMAR.to_vec();
    t[DRHD_OFF + 2] = 65;
    t.push(1);
    fix_header(&mut t);
    assert_eq!(
        Dmar::parse(&t),
        Err(DmarError::ScopeHeaderTruncated {
            offset: 112,
            remaining: 1
        })
    );
}

#[test]
fn unaligned_drhd_base() {
    let t = patched(DRHD_OFF + 8, &[0x10]);
    assert_eq!(
        Dmar::parse(&t),
        Err(DmarError::DrhdBaseUnaligned {
            offset: 48,
            base: 0xfed9_0010
        })
    );
}

#[test]
fn every_error_has_a_message() {
    let errors = [
        DmarError::TooShortForHeader { len: 3 },
        DmarError::BadSignature { found: [0xff; 4] },
        DmarError::TableLengthTooSmall { table_len: 1 },
        DmarError::RmrrLimitBelowBase {
            offset: 48,
            base: 0x2000,
            limit: 0x1000,
        },
    ];
    for e in errors {
        let text = std::format!("{e}");
        assert!(text.len() > 20, "{text}");
    }
}
