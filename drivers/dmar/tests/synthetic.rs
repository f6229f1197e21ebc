//! Tables built structure by structure: several units, RMRRs, ATSRs, multi-hop
//! scope paths and the less common structure types.

mod common;

use common::*;
use moat_dmar::*;

const ENDPOINT: u8 = 1;
const BRIDGE: u8 = 2;
const IOAPIC: u8 = 3;
const HPET: u8 = 4;
const ACPI_DEV: u8 = 5;

/// A laptop-like table: a graphics unit, a unit for one root port's hierarchy,
/// and the catch-all unit (listed first, to show order does not matter).
fn laptop() -> Vec<u8> {
    TableBuilder::new(39, 0b101) // INTR_REMAP | DMA_CTRL_PLATFORM_OPT_IN
        .drhd(
            1,
            0,
            0xfed9_1000,
            &[
                scope(IOAPIC, 2, 0xf0, &[(0x1f, 0)]),
                scope(HPET, 0, 0, &[(0x1f, 0)]),
            ],
        )
        .drhd(0, 0, 0xfed9_0000, &[scope(ENDPOINT, 0, 0, &[(2, 0)])])
        .drhd(0, 0, 0xfed9_2000, &[scope(BRIDGE, 0, 0, &[(0x1c, 0)])])
        .rmrr(
            0,
            0x7b80_0000,
            0x7fff_ffff,
            &[scope(ENDPOINT, 0, 0, &[(2, 0)])],
        )
        .rmrr(
            0,
            0x000e_0000,
            0x000e_ffff,
            &[
                scope(ENDPOINT, 0, 0, &[(0x14, 0)]),
                // An endpoint two hops down: root port 00:1c.0, then device 0.0
                // on the port's secondary bus.
                scope(ENDPOINT, 0, 0, &[(0x1c, 0), (0, 0)]),
            ],
        )
        .atsr(0, 0, &[scope(BRIDGE, 0, 0, &[(0x1c, 0)])])
        .build()
}

/// 00:1c.0 is a root port to buses 2..=3; 02:00.0 a switch port to bus 3.
fn topology(f: PciFunction) -> Option<BusRange> {
    match (f.segment, f.bus, f.device, f.function) {
        (0, 0, 0x1c, 0) => Some(BusRange {
            secondary: 2,
            subordinate: 3,
        }),
        (0, 2, 0, 0) => Some(BusRange {
            secondary: 3,
            subordinate: 3,
        }),
        _ => None,
    }
}

fn base_of(d: Option<Drhd<'_>>) -> Option<u64> {
    d.map(|d| d.register_base())
}

#[test]
fn laptop_table_parses() {
    let t = laptop();
    let dmar = Dmar::parse(&t).unwrap();
    assert_eq!(
        dmar.flags(),
        DmarFlags::INTR_REMAP | DmarFlags::DMA_CTRL_PLATFORM_OPT_IN
    );
    assert_eq!(
        dmar.validate().unwrap(),
        Summary {
            drhds: 3,
            rmrrs: 2,
            atsrs: 1,
            others: 0,
            unknown: 0,
            scopes: 8
        }
    );
    let bases: Vec<u64> = dmar.drhds().map(|d| d.register_base()).collect();
    assert_eq!(bases, [0xfed9_1000, 0xfed9_0000, 0xfed9_2000]);

    let rmrrs: Vec<_> = dmar.rmrrs().collect();
    assert_eq!(rmrrs[0].base(), 0x7b80_0000);
    assert_eq!(rmrrs[0].limit(), 0x7fff_ffff);
    assert_eq!(rmrrs[1].segment(), 0);
    let two_hop = rmrrs[1].scopes().nth(1).unwrap().unwrap();
    assert_eq!(two_hop.path_len(), 2);
    assert_eq!(
        two_hop.path().collect::<Vec<_>>(),
        [
            PathEntry {
                device: 0x1c,
                function: 0
            },
            PathEntry {
                device: 0,
                function: 0
            }
        ]
    );
    assert_eq!(two_hop.direct_bdf(), None);
    assert_eq!(std::format!("{two_hop}"), "endpoint 00:1c.0/00.0");
    assert_eq!(
        two_hop.resolve(0, &topology),
        Some(PciFunction::new(0, 2, 0, 0))
    );
    assert_eq!(two_hop.resolve(0, &NoBridges), None);

    let atsr = dmar.atsrs().next().unwrap();
    assert!(!atsr.all_ports());
    assert_eq!(atsr.scopes().count(), 1);
}

#[test]
fn explicit_scopes_win_over_include_pci_all() {
    let t = laptop();
    let dmar = Dmar::parse(&t).unwrap();
    let find = |seg, bus, dev, func| {
        base_of(dmar.find_drhd(PciFunction::new(seg, bus, dev, func), &topology))
    };
    assert_eq!(find(0, 0, 2, 0), Some(0xfed9_0000)); // graphics endpoint
    assert_eq!(find(0, 0, 0x1c, 0), Some(0xfed9_2000)); // the bridge itself
    assert_eq!(find(0, 2, 0, 0), Some(0xfed9_2000)); // behind it
    assert_eq!(find(0, 3, 0, 0), Some(0xfed9_2000)); // two levels behind it
    assert_eq!(find(0, 0, 2, 1), Some(0xfed9_1000)); // another function: catch-all
    assert_eq!(find(0, 0, 0x14, 0), Some(0xfed9_1000));
    assert_eq!(find(0, 4, 0, 0), Some(0xfed9_1000)); // outside the bridge's range
    assert_eq!(find(1, 0, 2, 0), None); // no unit for segment 1
                                        // Without topology the bridge still matches itself, but nothing behind it.
    assert_eq!(
        base_of(dmar.find_drhd(PciFunction::new(0, 2, 0, 0), &NoBridges)),
        Some(0xfed9_1000)
    );
}

#[test]
fn rmrrs_for_a_device() {
    let t = laptop();
    let dmar = Dmar::parse(&t).unwrap();
    let bases =
        |f: PciFunction| -> Vec<u64> { dmar.rmrrs_for(f, &topology).map(|r| r.base()).collect() };
    assert_eq!(bases(PciFunction::new(0, 0, 2, 0)), [0x7b80_0000]);
    assert_eq!(bases(PciFunction::new(0, 0, 0x14, 0)), [0x000e_0000]);
    assert_eq!(bases(PciFunction::new(0, 2, 0, 0)), [0x000e_0000]);
    assert!(bases(PciFunction::new(0, 3, 0, 0)).is_empty()); // endpoint scope: exact
    assert!(bases(PciFunction::new(1, 0, 2, 0)).is_empty());
}

#[test]
fn ioapic_and_hpet_scopes() {
    let t = laptop();
    let dmar = Dmar::parse(&t).unwrap();
    let (unit, scope) = dmar.find_ioapic(2).unwrap();
    assert_eq!(unit.register_base(), 0xfed9_1000);
    assert_eq!(scope.direct_bdf(), Some((0xf0, 0x1f, 0)));
    assert_eq!(std::format!("{scope}"), "ioapic 2 f0:1f.0");
    let hpet = unit.scopes().nth(1).unwrap().unwrap();
    assert_eq!(hpet.scope_type(), ScopeType::Hpet);
    // I/O APIC and HPET scopes never cover a PCI function.
    assert!(!scope.covers(0, PciFunction::new(0, 0xf0, 0x1f, 0), &NoBridges));
}

#[test]
fn several_segments() {
    let t = TableBuilder::new(46, 0)
        .drhd(1, 0, 0xa000_0000, &[])
        .drhd(1, 1, 0xb000_0000, &[])
        .drhd(0, 1, 0xb000_1000, &[scope(ENDPOINT, 0, 0x80, &[(3, 1)])])
        .build();
    let dmar = Dmar::parse(&t).unwrap();
    let find = |seg, bus, dev, func| {
        base_of(dmar.find_drhd(PciFunction::new(seg, bus, dev, func), &NoBridges))
    };
    assert_eq!(find(0, 0x80, 3, 1), Some(0xa000_0000));
    assert_eq!(find(1, 0x80, 3, 1), Some(0xb000_1000));
    assert_eq!(find(1, 0x80, 3, 0), Some(0xb000_0000));
    assert_eq!(find(2, 0, 0, 0), None);
    assert_eq!(dmar.host_address_width(), 46);
}

#[test]
fn rare_structures() {
    let mut rhsa = vec![0; 4];
    rhsa.extend_from_slice(&0xfed9_0000u64.to_le_bytes());
    rhsa.extend_from_slice(&3u32.to_le_bytes());
    let mut andd = vec![0, 0, 0, 7];
    andd.extend_from_slice(b"\\_SB.PCI0.I2C1\0");
    let satc = [1, 0, 0, 0];
    let sidp = [0, 0, 2, 0];
    let mut sidp_scope = scope(ENDPOINT, 0, 0, &[(5, 0)]);
    sidp_scope[2] = 0x3; // property flags
    let t = TableBuilder::new(39, 0)
        .drhd(1, 0, 0xfed9_0000, &[scope(ACPI_DEV, 7, 0, &[(0x15, 1)])])
        .structure(3, &rhsa, &[])
        .structure(4, &andd, &[])
        .structure(5, &satc, &[scope(ENDPOINT, 0, 0, &[(2, 0)])])
        .structure(6, &sidp, &[sidp_scope])
        .build();
    let dmar = Dmar::parse(&t).unwrap();
    let s: Vec<_> = dmar.structures().map(Result::unwrap).collect();
    assert_eq!(s.len(), 5);
    assert_eq!(
        s[1],
        RemappingStructure::Rhsa(Rhsa {
            register_base: 0xfed9_0000,
            proximity_domain: 3
        })
    );
    let RemappingStructure::Andd(a) = s[2] else {
        panic!("{:?}", s[2])
    };
    assert_eq!(a.device_number(), 7);
    assert_eq!(a.object_name(), b"\\_SB.PCI0.I2C1");
    assert_eq!(
        std::format!("{}", s[2]),
        "ANDD device 7 \"\\\\_SB.PCI0.I2C1\""
    );
    let RemappingStructure::Satc(c) = s[3] else {
        panic!("{:?}", s[3])
    };
    assert_eq!(c.flags(), SatcFlags::ATC_REQUIRED);
    assert_eq!(c.scopes().count(), 1);
    let RemappingStructure::Sidp(p) = s[4] else {
        panic!("{:?}", s[4])
    };
    assert_eq!(p.segment(), 2);
    assert_eq!(p.scopes().next().unwrap().unwrap().flags(), 3);
    let acpi = s[0].scopes().next().unwrap().unwrap();
    assert_eq!(acpi.scope_type(), ScopeType::AcpiNamespaceDevice);
    assert_eq!(acpi.enumeration_id(), 7);
    assert_eq!(dmar.validate().unwrap().others, 4);
}

#[test]
fn short_known_structures_are_rejected() {
    for (kind, min) in [
        (0u16, 16usize),
        (1, 24),
        (2, 8),
        (3, 20),
        (4, 8),
        (5, 8),
        (6, 8),
    ] {
        let body = vec![0; min - 4 - 1];
        let t = TableBuilder::new(39, 0).structure(kind, &body, &[]).build();
        assert_eq!(
            Dmar::parse(&t),
            Err(DmarError::StructureTooShort {
                offset: 48,
                kind,
                length: (min - 1) as u16,
                min
            }),
            "type {kind}"
        );
        assert_eq!(min_length(kind), min);
    }
}

#[test]
fn rmrr_limit_below_base() {
    let t = TableBuilder::new(39, 0)
        .rmrr(0, 0x2000, 0x2fff, &[])
        .rmrr(0, 0x2000, 0x1000, &[])
        .build();
    assert_eq!(
        Dmar::parse(&t),
        Err(DmarError::RmrrLimitBelowBase {
            offset: 72,
            base: 0x2000,
            limit: 0x1000
        })
    );
}

#[test]
fn unknown_scope_type_is_kept() {
    let t = TableBuilder::new(39, 0)
        .drhd(0, 0, 0x1000, &[scope(0x80, 9, 0, &[(1, 0)])])
        .build();
    let dmar = Dmar::parse(&t).unwrap();
    let s = dmar
        .drhds()
        .next()
        .unwrap()
        .scopes()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(s.scope_type(), ScopeType::Other(0x80));
    assert_eq!(s.scope_type().raw(), 0x80);
    assert_eq!(ScopeType::from_raw(2), ScopeType::PciSubHierarchy);
    assert!(!s.covers(0, PciFunction::new(0, 0, 1, 0), &NoBridges));
}
