//! BAR sizing against a model whose BARs keep only their writable bits.

mod common;

use common::*;
use moat_pci::*;

#[test]
fn edu_has_one_1mib_memory_bar() {
    let cfg = q35_with_edu();
    let edu = bdf(0, 1, 0);
    let before = cfg.function(edu);
    let bars = probe_bars(&cfg, edu).unwrap();
    let all: Vec<Bar> = bars.iter().collect();
    assert_eq!(
        all,
        [Bar {
            index: 0,
            kind: BarKind::Memory32,
            prefetchable: false,
            address: 0xfea0_0000,
            size: 1 << 20
        }]
    );
    assert!(all[0].is_memory());
    assert_eq!(all[0].register(), 0x10);
    assert_eq!(all[0].to_string(), "BAR0 mem32 0xfea00000 size 0x100000");
    assert_eq!(cfg.violations.get(), 0, "BAR written with decode on");
    // Every BAR and the command register are back to what they were.
    let after = cfg.function(edu);
    for off in (0..0x40).step_by(4) {
        assert_eq!(after.reg(off), before.reg(off), "register {off:#x}");
    }
}

#[test]
fn ich9_io_and_memory_bars() {
    let cfg = q35_with_edu();
    let sata = probe_bars(&cfg, bdf(0, 0x1f, 2)).unwrap();
    assert_eq!(
        sata.get(4),
        Some(Bar {
            index: 4,
            kind: BarKind::Io,
            prefetchable: false,
            address: 0xc040,
            size: 0x20
        })
    );
    assert_eq!(sata.get(5).unwrap().size, 0x1000);
    assert_eq!(sata.iter().count(), 2);
    let smbus = probe_bars(&cfg, bdf(0, 0x1f, 3)).unwrap();
    assert_eq!(smbus.get(4).unwrap().to_string(), "BAR4 io 0x700 size 0x40");
    // The ISA bridge implements no BAR.
    assert_eq!(probe_bars(&cfg, bdf(0, 0x1f, 0)).unwrap().iter().count(), 0);
    assert_eq!(probe_bars(&cfg, bdf(0, 2, 0)), None);
    assert_eq!(cfg.violations.get(), 0);
}

#[test]
fn sixty_four_bit_bars() {
    let at = bdf(0, 4, 0);
    let cfg = FakeSpace::new().with(
        at,
        FakeFunction::endpoint(0x1b36, 0x0010, 0x01, 0x08, 0x02)
            .command(CMD_IO | CMD_MEM | CMD_BUS_MASTER)
            .status(1 << 13) // a latched master abort, write-1-to-clear
            // 8 GiB prefetchable above 4 GiB: its size is only in the upper half.
            .mem64_bar(0, 0x8_0000_0000, 8 << 30, true)
            // 16 KiB 64-bit BAR placed below 4 GiB.
            .mem64_bar(2, 0xfe00_0000, 16 << 10, false)
            .io_bar(4, 0x6000, 0x100),
        // BAR5 unimplemented: reads 0, all ones do not stick.
    );
    let before = cfg.function(at);
    let bars = probe_bars(&cfg, at).unwrap();
    assert_eq!(
        bars.get(0),
        Some(Bar {
            index: 0,
            kind: BarKind::Memory64,
            prefetchable: true,
            address: 0x8_0000_0000,
            size: 8 << 30
        })
    );
    assert_eq!(bars.get(1), None, "upper half of BAR0");
    assert_eq!(
        bars.get(2),
        Some(Bar {
            index: 2,
            kind: BarKind::Memory64,
            prefetchable: false,
            address: 0xfe00_0000,
            size: 16 << 10
        })
    );
    assert_eq!(bars.get(3), None, "upper half of BAR2");
    assert_eq!(bars.get(4).unwrap().size, 0x100);
    assert_eq!(bars.get(5), None);
    assert_eq!(bars.get(6), None);
    assert_eq!(bars.iter().count(), 3);
    assert_eq!(
        bars.get(0).unwrap().to_string(),
        "BAR0 mem64 pref 0x800000000 size 0x200000000"
    );
    assert_eq!(cfg.violations.get(), 0);
    let after = cfg.function(at);
    for off in (0..0x40).step_by(4) {
        assert_eq!(after.reg(off), before.reg(off), "register {off:#x}");
    }
    // The status error bit survived the command register writes.
    assert!(Header::read(&cfg, at)
        .unwrap()
        .status
        .contains(Status::RECEIVED_MASTER_ABORT));
}

#[test]
fn huge_64_bit_bar_spanning_both_halves() {
    // 2^63 bytes: the only writable bit is the top one.
    let at = bdf(0, 4, 0);
    let cfg = FakeSpace::new().with(
        at,
        FakeFunction::endpoint(0x1234, 0x5678, 0x05, 0x00, 0x00).mem64_bar(0, 0, 1 << 63, true),
    );
    assert_eq!(probe_bars(&cfg, at).unwrap().get(0).unwrap().size, 1 << 63);
}

#[test]
fn sixty_four_bit_bar_in_the_last_register_is_left_out() {
    let at = bdf(0, 6, 0);
    let mut f = FakeFunction::endpoint(0x1234, 0x5678, 0x05, 0x00, 0x00).mem32_bar(
        0,
        0xfe00_0000,
        0x1000,
        false,
    );
    // BAR5 claims to be 64-bit, but there is no BAR6.
    f = f.mem32_bar(5, 0xfd00_0004, 0x1000, false);
    let cfg = FakeSpace::new().with(at, f);
    let before = cfg.function(at);
    let bars = probe_bars(&cfg, at).unwrap();
    assert_eq!(bars.iter().map(|b| b.index).collect::<Vec<_>>(), [0]);
    // The register after it (CardBus CIS pointer, 0x28) was not touched.
    assert_eq!(cfg.function(at).reg(0x28), before.reg(0x28));
}

#[test]
fn legacy_below_1mib_bar() {
    let at = bdf(0, 7, 0);
    let cfg = FakeSpace::new().with(
        at,
        FakeFunction::endpoint(0x1234, 0x5678, 0x03, 0x00, 0x00).mem32_bar(
            0,
            0x000a_0002,
            0x2_0000,
            false,
        ),
    );
    let bar = probe_bars(&cfg, at).unwrap().get(0).unwrap();
    assert_eq!(bar.kind, BarKind::Memory1M);
    assert_eq!(bar.address, 0xa_0000);
    assert_eq!(bar.size, 0x2_0000);
}

#[test]
fn bridge_has_two_bars_and_its_bus_numbers_are_untouched() {
    let at = bdf(0, 0x1c, 0);
    let cfg = FakeSpace::new().with(
        at,
        FakeFunction::bridge(0x8086, 0x2940, 0, 1, 4)
            .command(CMD_MEM | CMD_BUS_MASTER)
            .mem32_bar(0, 0xfeb4_0000, 0x1000, false),
    );
    let bars = probe_bars(&cfg, at).unwrap();
    assert_eq!(bars.iter().count(), 1);
    assert_eq!(bars.get(0).unwrap().size, 0x1000);
    // Offset 0x18 would be BAR2 on an endpoint: here it holds the bus numbers.
    assert_eq!(
        BridgeBuses::read(&cfg, at),
        Some(BridgeBuses {
            primary: 0,
            secondary: 1,
            subordinate: 4
        })
    );
    assert_eq!(cfg.violations.get(), 0);
    assert_eq!(
        read_command(&cfg, at),
        Command::MEMORY_SPACE | Command::BUS_MASTER
    );
}

#[test]
fn model_catches_sizing_with_decode_on() {
    // The check behind `violations == 0` above can fail: size a BAR naively.
    let cfg = q35_with_edu();
    let edu = bdf(0, 1, 0);
    cfg.write32(edu, 0x10, u32::MAX);
    assert_eq!(cfg.read32(edu, 0x10), 0xfff0_0000);
    assert_eq!(cfg.violations.get(), 1);
}

#[test]
fn command_helpers() {
    let cfg = q35_with_edu();
    let edu = bdf(0, 1, 0);
    let written = update_command(&cfg, edu, |c| c | Command::BUS_MASTER);
    assert_eq!(
        written,
        Command::IO_SPACE | Command::MEMORY_SPACE | Command::SERR_ENABLE | Command::BUS_MASTER
    );
    assert_eq!(read_command(&cfg, edu), written);
    write_command(&cfg, edu, Command::empty());
    assert_eq!(Header::read(&cfg, edu).unwrap().command, Command::empty());
}
