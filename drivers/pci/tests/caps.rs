//! Capability list walks, including broken lists.

mod common;

use common::*;
use moat_pci::*;

fn ids(cfg: &FakeSpace, at: moat_pci::Bdf) -> Vec<(u8, u8)> {
    capabilities(cfg, at).map(|c| (c.id, c.offset)).collect()
}

/// Where the hand-made functions sit.
const AT: moat_pci::Bdf = bdf(0, 3, 0);

/// A space with one endpoint at [`AT`]: its classic list starts at `first` and holds `caps`
/// (offset, id, next), its extended list holds `ext` (offset, id, version, next).
fn lists(first: u8, caps: &[(u8, u8, u8)], ext: &[(u16, u16, u8, u16)]) -> FakeSpace {
    let f = FakeFunction::endpoint(0x1234, 0x1, 0xff, 0, 0).cap_pointer(first);
    let f = caps
        .iter()
        .fold(f, |f, &(at, id, next)| f.cap(at, id, next));
    let f = ext
        .iter()
        .fold(f, |f, &(at, id, v, next)| f.ext_cap(at, id, v, next));
    FakeSpace::new().with(AT, f)
}

#[test]
fn well_formed_list() {
    let cfg = lists(
        0xc8,
        &[
            (0xc8, cap_id::POWER_MANAGEMENT, 0xd0),
            (0xd0, cap_id::MSI, 0xe0),
            (0xe0, cap_id::PCI_EXPRESS, 0xa0),
            (0xa0, cap_id::MSIX, 0x00),
        ],
        &[
            (0x100, ext_cap_id::AER, 2, 0x140),
            (0x140, ext_cap_id::ATS, 1, 0),
        ],
    );
    assert_eq!(
        ids(&cfg, AT),
        [(0x01, 0xc8), (0x05, 0xd0), (0x10, 0xe0), (0x11, 0xa0)]
    );
    assert_eq!(find_capability(&cfg, AT, cap_id::MSIX), Some(0xa0));
    assert_eq!(find_capability(&cfg, AT, cap_id::VENDOR), None);
    let ext: Vec<_> = extended_capabilities(&cfg, AT).collect();
    assert_eq!(
        ext,
        [
            ExtendedCapability {
                id: ext_cap_id::AER,
                version: 2,
                offset: 0x100
            },
            ExtendedCapability {
                id: ext_cap_id::ATS,
                version: 1,
                offset: 0x140
            }
        ]
    );
}

#[test]
fn q35_sata_capabilities() {
    let cfg = q35_with_edu();
    assert_eq!(ids(&cfg, bdf(0, 0x1f, 2)), [(0x05, 0x80), (0x12, 0xa8)]);
    // Not PCI Express: no extended list is read.
    assert_eq!(extended_capabilities(&cfg, bdf(0, 0x1f, 2)).count(), 0);
    // edu has one capability: MSI.
    assert_eq!(ids(&cfg, bdf(0, 1, 0)), [(0x05, 0x40)]);
    assert_eq!(find_capability(&cfg, bdf(0, 1, 0), cap_id::MSI), Some(0x40));
    // The host bridge has none.
    assert!(ids(&cfg, bdf(0, 0, 0)).is_empty());
    assert!(ids(&cfg, bdf(0, 9, 0)).is_empty());
}

#[test]
fn cyclic_list_terminates() {
    let cfg = lists(
        0x40,
        &[(0x40, cap_id::MSI, 0x50), (0x50, cap_id::VENDOR, 0x40)],
        &[],
    );
    let n = capabilities(&cfg, AT).count();
    assert_eq!(n, MAX_CAPABILITIES);
    assert_eq!(find_capability(&cfg, AT, cap_id::MSIX), None);
    // A self-loop too.
    let cfg = lists(0x40, &[(0x40, cap_id::MSI, 0x40)], &[]);
    assert_eq!(capabilities(&cfg, AT).count(), MAX_CAPABILITIES);
}

#[test]
fn pointer_into_the_header_ends_the_list() {
    // The low bits of the pointer are reserved: 0x43 means 0x40.
    let cfg = lists(0x43, &[(0x40, cap_id::MSI, 0x10)], &[]);
    assert_eq!(ids(&cfg, AT), [(0x05, 0x40)]);
}

#[test]
fn no_list_without_the_status_bit() {
    let at = bdf(0, 3, 0);
    let mut f = FakeFunction::endpoint(0x1234, 0x1, 0xff, 0, 0).cap(0x40, cap_id::MSI, 0);
    // A pointer but no CAPABILITIES_LIST status bit.
    f = f.cap_pointer(0x40).status(0);
    let cfg = FakeSpace::new().with(at, f);
    assert!(ids(&cfg, at).is_empty());
}

#[test]
fn cyclic_extended_list_terminates() {
    let express = [(0x40, cap_id::PCI_EXPRESS, 0)];
    let cfg = lists(
        0x40,
        &express,
        &[
            (0x100, ext_cap_id::AER, 1, 0x180),
            (0x180, ext_cap_id::ATS, 1, 0x100),
        ],
    );
    assert_eq!(
        extended_capabilities(&cfg, AT).count(),
        MAX_EXTENDED_CAPABILITIES
    );
    // A next pointer below 0x100 ends the list.
    let cfg = lists(0x40, &express, &[(0x100, ext_cap_id::AER, 1, 0x40)]);
    assert_eq!(extended_capabilities(&cfg, AT).count(), 1);
}
