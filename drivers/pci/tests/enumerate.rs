//! Enumeration over fake configuration spaces.

mod common;

use common::*;
use moat_pci::*;

fn bdfs(cfg: &FakeSpace, buses: std::ops::RangeInclusive<u8>) -> Vec<String> {
    enumerate(cfg, 0, buses)
        .map(|f| f.bdf.to_string())
        .collect()
}

#[test]
fn q35_with_edu_is_listed() {
    let cfg = q35_with_edu();
    let found: Vec<PciFunction> = enumerate(&cfg, 0, 0..=255).collect();
    let names: Vec<String> = found.iter().map(|f| f.to_string()).collect();
    assert_eq!(
        names,
        [
            "00:00.0 8086:29c0 class 060000 (host bridge)",
            "00:01.0 1234:11e8 class 00ff00 (unclassified)",
            "00:1f.0 8086:2918 class 060100 (ISA bridge)",
            "00:1f.2 8086:2922 class 010601 (SATA controller)",
            "00:1f.3 8086:2930 class 0c0500 (SMBus controller)",
        ]
    );
    let edu = found[1];
    assert_eq!(edu.bdf, bdf(0, 1, 0));
    assert_eq!(edu.header.vendor_id, 0x1234);
    assert_eq!(edu.header.device_id, 0x11e8);
    assert_eq!(edu.header.revision, 0x10);
    assert_eq!(
        edu.header.class,
        ClassCode {
            class: 0x00,
            subclass: 0xff,
            prog_if: 0
        }
    );
    assert_eq!(edu.header.header_type.layout(), HeaderLayout::Endpoint);
    assert!(!edu.header.header_type.multi_function());
    // SeaBIOS enabled decode (and SERR#) but not bus mastering.
    assert_eq!(
        edu.header.command,
        Command::IO_SPACE | Command::MEMORY_SPACE | Command::SERR_ENABLE
    );
    assert!(edu.header.status.contains(Status::CAPABILITIES_LIST));
    assert_eq!(
        (edu.header.interrupt_pin, edu.header.interrupt_line),
        (1, 10)
    );
    assert!(found[2].header.header_type.multi_function());
}

#[test]
fn ecam_region_enumeration_matches() {
    let cfg = q35_with_edu();
    let ecam = Ecam {
        base: 0xb000_0000,
        segment: 0,
        start_bus: 0,
        end_bus: 0xff,
    };
    assert_eq!(enumerate_ecam(&cfg, &ecam).count(), 5);
    // Another segment has nothing in this model.
    assert_eq!(enumerate(&cfg, 1, 0..=255).count(), 0);
}

#[test]
fn scan_cost_is_one_read_per_absent_device() {
    let cfg = FakeSpace::new();
    assert_eq!(enumerate(&cfg, 0, 0..=255).count(), 0);
    // Only function 0 of each of the 256 * 32 devices is read.
    assert_eq!(cfg.reads.get(), 256 * 32);
}

#[test]
fn empty_bus_and_empty_range() {
    let cfg = q35_with_edu();
    assert!(bdfs(&cfg, 1..=1).is_empty());
    assert!(bdfs(&cfg, 5..=200).is_empty());
    #[allow(clippy::reversed_empty_ranges)]
    let reversed = 3..=2;
    assert!(bdfs(&cfg, reversed).is_empty());
    assert_eq!(bdfs(&cfg, 0..=0).len(), 5);
    assert_eq!(bdfs(&cfg, 255..=255), Vec::<String>::new());
}

#[test]
fn multi_function_rules() {
    let ep = || FakeFunction::endpoint(0x1af4, 0x1000, 0x02, 0x00, 0x00);
    let cfg = FakeSpace::new()
        // Multi-function device: functions 0, 2 and 7.
        .with(bdf(0, 3, 0), ep().multi_function())
        .with(bdf(0, 3, 2), ep())
        .with(bdf(0, 3, 7), ep())
        // Single-function device that also answers at function 1 (some
        // devices ignore the function number): function 1 must not be listed.
        .with(bdf(0, 4, 0), ep())
        .with(bdf(0, 4, 1), ep())
        // Function 0 absent: the device is skipped even though function 1 answers.
        .with(bdf(0, 5, 1), ep())
        // Last device of the last bus in range, multi-function.
        .with(bdf(0xff, 31, 0), ep().multi_function())
        .with(bdf(0xff, 31, 7), ep());
    assert_eq!(
        bdfs(&cfg, 0..=255),
        ["00:03.0", "00:03.2", "00:03.7", "00:04.0", "ff:1f.0", "ff:1f.7"]
    );
}

#[test]
fn bridge_and_buses_behind_it() {
    let ep = |d| FakeFunction::endpoint(0x1b36, d, 0x01, 0x08, 0x02);
    let cfg = FakeSpace::new()
        .with(
            bdf(0, 0, 0),
            FakeFunction::endpoint(0x8086, 0x29c0, 6, 0, 0),
        )
        .with(
            bdf(0, 0x1c, 0),
            FakeFunction::bridge(0x1b36, 0x000c, 0, 1, 2),
        )
        .with(bdf(1, 0, 0), FakeFunction::bridge(0x1b36, 0x000e, 1, 2, 2))
        .with(bdf(2, 0, 0), ep(0x0010))
        .with(bdf(2, 1, 0), ep(0x0010));
    let found: Vec<_> = enumerate(&cfg, 0, 0..=255).collect();
    assert_eq!(found.len(), 5);
    let root_port = found[1];
    assert!(root_port.header.is_bridge());
    assert!(root_port.header.class.is_pci_bridge());
    assert_eq!(root_port.header.header_type.bar_count(), 2);
    assert_eq!(
        BridgeBuses::read(&cfg, root_port.bdf),
        Some(BridgeBuses {
            primary: 0,
            secondary: 1,
            subordinate: 2
        })
    );
    assert_eq!(BridgeBuses::read(&cfg, bdf(2, 0, 0)), None);
    assert_eq!(BridgeBuses::read(&cfg, bdf(9, 0, 0)), None);
    assert_eq!(found[4].bdf, bdf(2, 1, 0));
}

#[test]
fn fixed_capacity_output() {
    let cfg = q35_with_edu();
    let mut out = [None; 3];
    assert_eq!(enumerate_into(&cfg, 0, 0..=255, &mut out), (3, 5));
    assert_eq!(out[2].unwrap().bdf, bdf(0, 0x1f, 0));
    let mut big = [None; 8];
    assert_eq!(enumerate_into(&cfg, 0, 0..=255, &mut big), (5, 5));
    assert!(big[5].is_none());
}

#[test]
fn absent_function_has_no_header() {
    let cfg = q35_with_edu();
    assert_eq!(Header::read(&cfg, bdf(0, 2, 0)), None);
    let vendor_zero = FakeSpace::new().with(bdf(0, 0, 0), FakeFunction::endpoint(0, 0, 0, 0, 0));
    assert_eq!(enumerate(&vendor_zero, 0, 0..=0).count(), 0);
}
