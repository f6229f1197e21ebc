//! Capability list walks, including broken lists.

mod common;

use common::*;
use moat_pci::*;

fn ids(cfg: &FakeSpace, at: moat_pci::Bdf) -> Vec<(u8, u8)> {
    capabilities(cfg, at).map(|c| (c.id, c.offset)).collect()
}

#[test]
fn well_formed_list() {
    let at = bdf(0, 2, 0);
    let cfg = FakeSpace::new().with(
        at,
        FakeFunction::endpoint(0x8086, 0x10d3, 0x02, 0x00, 0x00)
            .cap_pointer(0xc8)
            .cap(0xc8, cap_id::POWER_MANAGEMENT, 0xd0)
            .cap(0xd0, cap_id::MSI, 0xe0)
            .cap(0xe0, cap_id::PCI_EXPRESS, 0xa0)
            .cap(0xa0, cap_id::MSIX, 0x00)
            .ext_cap(0x100, ext_cap_id::AER, 2, 0x140)
            .ext_cap(0x140, ext_cap_id::ATS, 1, 0),
    );
    assert_eq!(
        ids(&cfg, at),
        [(0x01, 0xc8), (0x05, 0xd0), (0x10, 0xe0), (0x11, 0xa0)]
    );
    assert_eq!(find_capability(&cfg, at, cap_id::MSIX), Some(0xa0));
    assert_eq!(find_capability(&cfg, at, cap_id::VENDOR), None);
    let ext: Vec<_> = extended_capabilities(&cfg, at).collect();
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
    let at = bdf(0, 3, 0);
    let cfg = FakeSpace::new().with(
        at,
        FakeFunction::endpoint(0x1234, 0x1, 0xff, 0, 0)
            .cap_pointer(0x40)
            .cap(0x40, cap_id::MSI, 0x50)
            .cap(0x50, cap_id::VENDOR, 0x40),
    );
    let n = capabilities(&cfg, at).count();
    assert_eq!(n, MAX_CAPABILITIES);
    assert_eq!(find_capability(&cfg, at, cap_id::MSIX), None);
    // A self-loop too.
    let cfg = FakeSpace::new().with(
        at,
        FakeFunction::endpoint(0x1234, 0x1, 0xff, 0, 0)
            .cap_pointer(0x40)
            .cap(0x40, cap_id::MSI, 0x40),
    );
    assert_eq!(capabilities(&cfg, at).count(), MAX_CAPABILITIES);
}

#[test]
fn pointer_into_the_header_ends_the_list() {
    let at = bdf(0, 3, 0);
    let cfg = FakeSpace::new().with(
        at,
        FakeFunction::endpoint(0x1234, 0x1, 0xff, 0, 0)
            .cap_pointer(0x43) // low bits reserved: means 0x40
            .cap(0x40, cap_id::MSI, 0x10),
    );
    assert_eq!(ids(&cfg, at), [(0x05, 0x40)]);
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
    let at = bdf(0, 3, 0);
    let cfg = FakeSpace::new().with(
        at,
        FakeFunction::endpoint(0x1234, 0x1, 0xff, 0, 0)
            .cap_pointer(0x40)
            .cap(0x40, cap_id::PCI_EXPRESS, 0)
            .ext_cap(0x100, ext_cap_id::AER, 1, 0x180)
            .ext_cap(0x180, ext_cap_id::ATS, 1, 0x100),
    );
    assert_eq!(
        extended_capabilities(&cfg, at).count(),
        MAX_EXTENDED_CAPABILITIES
    );
    // A next pointer below 0x100 ends the list.
    let cfg = FakeSpace::new().with(
        at,
        FakeFunction::endpoint(0x1234, 0x1, 0xff, 0, 0)
            .cap_pointer(0x40)
            .cap(0x40, cap_id::PCI_EXPRESS, 0)
            .ext_cap(0x100, ext_cap_id::AER, 1, 0x40),
    );
    assert_eq!(extended_capabilities(&cfg, at).count(), 1);
}
