//! The configuration filter a guest sees through ports 0xCF8/0xCFC, over the model of
//! configuration space: what it reads of its assigned function, which writes reach the device,
//! BAR sizing without touching the BARs, and every other function invisible.

mod common;

use common::*;
use moat_pci::*;
use proptest::prelude::*;

/// A guest's side of the ports, as the kernel wires them: the address latch, its assigned
/// functions, and `IN`/`OUT` masked to the access size.
struct Ports<'a> {
    cfg: &'a FakeSpace,
    devices: Vec<AssignedDevice>,
    cf8: u32,
}

fn size_mask(size: u8) -> u32 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        _ => u32::MAX,
    }
}

impl<'a> Ports<'a> {
    fn new(cfg: &'a FakeSpace, assigned: &[Bdf]) -> Self {
        let devices = assigned
            .iter()
            .map(|&b| AssignedDevice::probe(cfg, b).unwrap())
            .collect();
        Ports {
            cfg,
            devices,
            cf8: 0,
        }
    }

    fn inp(&self, port: u16, size: u8) -> u32 {
        let v = match ConfigPort::decode(port, size) {
            Some(ConfigPort::Address) => self.cf8,
            Some(ConfigPort::Data { byte }) => match Target::decode(self.cf8, byte) {
                Some(t) => t.read(self.cfg, &self.devices),
                None => u32::MAX,
            },
            None => u32::MAX,
        };
        v & size_mask(size)
    }

    fn out(&mut self, port: u16, size: u8, value: u32) {
        let value = value & size_mask(size);
        match ConfigPort::decode(port, size) {
            Some(ConfigPort::Address) => self.cf8 = value,
            Some(ConfigPort::Data { byte }) => {
                if let Some(t) = Target::decode(self.cf8, byte) {
                    t.write(self.cfg, &mut self.devices, size, value);
                }
            }
            None => {}
        }
    }

    fn select(&mut self, b: Bdf, offset: u8) {
        self.out(0xcf8, 4, address(b, offset));
    }

    fn read(&mut self, b: Bdf, offset: u8) -> u32 {
        self.select(b, offset);
        self.inp(0xcfc, 4)
    }

    fn write(&mut self, b: Bdf, offset: u8, value: u32) {
        self.select(b, offset);
        self.out(0xcfc, 4, value);
    }
}

fn address(b: Bdf, offset: u8) -> u32 {
    1 << 31
        | u32::from(b.bus()) << 16
        | u32::from(b.device()) << 11
        | u32::from(b.function()) << 8
        | u32::from(offset)
}

const EDU: (u8, u8, u8) = (0, 1, 0);

fn edu() -> Bdf {
    bdf(EDU.0, EDU.1, EDU.2)
}

/// An endpoint with a 64-bit BAR (0-1), an I/O BAR (2), a capability list and status bits set.
fn nic() -> FakeFunction {
    FakeFunction::endpoint(0x8086, 0x10d3, 0x02, 0x00, 0x00)
        .mem64_bar(0, 0x8_0000_0000, 1 << 17, true)
        .io_bar(2, 0xc000, 0x20)
        .cap_pointer(0x40)
        .cap(0x40, 0x05, 0x50)
        .cap(0x50, 0x10, 0)
        .command(CMD_MEM | CMD_IO)
        .status(0x8000 | 0x0010)
}

fn nic_space() -> FakeSpace {
    q35_with_edu().with(bdf(0, 2, 0), nic())
}

#[test]
fn the_assigned_function_reads_through_its_header() {
    let cfg = q35_with_edu();
    let mut p = Ports::new(&cfg, &[edu()]);
    let real = cfg.function(edu());
    for offset in [0x00, 0x08, 0x0c, 0x2c, 0x3c] {
        assert_eq!(
            p.read(edu(), offset),
            real.reg(u16::from(offset)),
            "{offset:#x}"
        );
    }
    assert_eq!(
        p.read(edu(), 0x00),
        0x11e8_1234,
        "edu's vendor and device id"
    );
    // BAR0: its real address and flags.
    assert_eq!(p.read(edu(), 0x10), 0xfea0_0000);
    // Unimplemented BARs, the expansion ROM and the rest read zero.
    for offset in [0x14, 0x18, 0x1c, 0x20, 0x24, 0x28, 0x30, 0x38, 0xfc] {
        assert_eq!(p.read(edu(), offset), 0, "{offset:#x}");
    }
    // edu's MSI capability (64-bit, at 0x40) is the one capability shown, disabled.
    assert_eq!(p.read(edu(), 0x34), 0x40);
    assert_eq!(p.read(edu(), 0x40), (1 << 7) << 16 | 0x05);
}

#[test]
fn msi_writes_stay_virtual_and_are_reported() {
    let cfg = q35_with_edu();
    let mut d = AssignedDevice::probe(&cfg, edu()).unwrap();
    let cap = d.msi.expect("edu has MSI");
    assert_eq!(
        (cap.offset, cap.is_64bit, cap.maskable),
        (0x40, true, false)
    );
    let before = cfg.function(edu());
    let msi = |u: Option<ConfigUpdate>| match u {
        Some(ConfigUpdate::Msi(u)) => u,
        other => panic!("not an MSI update: {other:?}"),
    };
    // Address, data, then enable: each change reported, none reaching the device.
    let u = msi(d.write(&cfg, 0x44, 0xfee0_1000, u32::MAX));
    assert_eq!(u.state.address, 0xfee0_1000);
    assert!(
        d.write(&cfg, 0x44, 0xfee0_1000, u32::MAX).is_none(),
        "no change, no update"
    );
    assert!(d.write(&cfg, 0x48, 0, u32::MAX).is_none());
    let u = msi(d.write(&cfg, 0x4c, 0x0051, 0xffff));
    assert_eq!(u.state.data, 0x51);
    let u = msi(d.write(&cfg, 0x40, 1 << 16, 0x00ff_0000));
    assert!(u.state.enabled);
    assert_eq!(
        u.state.target(),
        Some(GuestMsiTarget {
            apic_id: 1,
            vector: 0x51
        })
    );
    assert_eq!(
        cfg.function(edu()),
        before,
        "the device's registers were never written"
    );
    assert_eq!(d.read(&cfg, 0x44), 0xfee0_1000);
    assert_eq!(d.read(&cfg, 0x4c), 0x51);
    assert_eq!(d.read(&cfg, 0x40) >> 16 & 1, 1);
    // Vectors below 32, level-triggered, remappable format or outside the window: no target.
    for (address, data) in [
        (0xfee0_0000u64, 0x0008u16),
        (0xfee0_0000, 0x8051),
        (0xfee0_0010, 0x0051),
        (0xfed0_0000, 0x0051),
        (0x1_fee0_0000, 0x0051),
    ] {
        let v = VirtualMsi {
            enabled: true,
            address,
            data,
            masked: false,
        };
        assert_eq!(v.target(), None, "{address:#x} {data:#x}");
    }
}

#[test]
fn msix_is_turned_off_at_assignment() {
    let at = bdf(0, 2, 0);
    let f = nic().cap(0x50, 0x11, 0).writable_dwords(0x50, 1);
    let cfg = q35_with_edu().with(at, f);
    // Firmware left MSI-X enabled (message control bit 15).
    let h = cfg.function(at).reg(0x50);
    cfg.write32(at, 0x50, h | 1 << 31);
    assert_ne!(cfg.function(at).reg(0x50) & 1 << 31, 0);
    let _ = AssignedDevice::probe(&cfg, at).unwrap();
    assert_eq!(cfg.function(at).reg(0x50) & 1 << 31, 0);
}

/// An NVMe-like function: MSI (64-bit) at 0x40 linked to MSI-X at 0x70 (65 entries, table
/// at BAR0 + 0x2000, PBA at BAR0 + 0x3000), then a PCI Express capability at 0x80.
fn msi_and_msix(table_bir: u32) -> FakeFunction {
    FakeFunction::endpoint(0x1b36, 0x0010, 0x01, 0x08, 0x02)
        .mem64_bar(0, 0xfebf_0000, 0x4000, false)
        .status(0x0010)
        .cap_pointer(0x40)
        .cap(0x40, 0x05, 0x70)
        .dword(0x40, (1 << 7) << 16 | 0x7005)
        .cap(0x70, 0x11, 0x80)
        .dword(0x70, 64 << 16 | 0x8011)
        .dword(0x74, 0x2000 | table_bir)
        .dword(0x78, 0x3000)
        .writable_dwords(0x70, 1)
        .cap(0x80, 0x10, 0)
}

#[test]
fn msix_is_offered_with_a_virtual_enable_and_function_mask() {
    let at = bdf(0, 4, 0);
    let cfg = q35_with_edu().with(at, msi_and_msix(0));
    let mut p = Ports::new(&cfg, &[at]);
    let real = cfg.function(at);
    // MSI first, linked to MSI-X, whose next pointer ends the list (PCIe hidden).
    assert_eq!(p.read(at, 0x34), 0x40);
    assert_eq!(p.read(at, 0x40) >> 8 & 0xff, 0x70);
    let header = p.read(at, 0x70);
    assert_eq!(header & 0xffff, 0x0011, "id MSI-X, next 0");
    assert_eq!(
        header >> 16,
        63,
        "65 entries clamped to 64 (field = size - 1), disabled, unmasked"
    );
    assert_eq!(p.read(at, 0x74), 0x2000);
    assert_eq!(p.read(at, 0x78), 0x3000);
    assert_eq!(p.read(at, 0x80), 0, "capabilities past MSI-X stay hidden");
    // Enable and Function Mask change the guest's view and are reported, never written.
    let d = &mut p.devices[0];
    let u = d.write(&cfg, 0x70, (1 << 31) | (1 << 30), 0xff00_0000);
    assert_eq!(
        u,
        Some(ConfigUpdate::Msix(MsixUpdate {
            bdf: at,
            control: VirtualMsixControl {
                enabled: true,
                function_masked: true
            }
        }))
    );
    assert_eq!(
        d.write(&cfg, 0x70, (1 << 31) | (1 << 30), 0xff00_0000),
        None
    );
    // The table size and locations are read only.
    assert_eq!(d.write(&cfg, 0x70, 0x0003_0000, 0x00ff_0000), None);
    assert_eq!(d.write(&cfg, 0x74, 0x5003, u32::MAX), None);
    assert_eq!(p.read(at, 0x70) >> 16, 0xc000 | 63);
    assert_eq!(p.read(at, 0x74), 0x2000);
    assert_eq!(cfg.function(at), real, "the device was never written");
}

#[test]
fn msix_alone_heads_the_list_and_a_bad_table_is_not_offered() {
    let at = bdf(0, 4, 0);
    let f = msi_and_msix(0).cap_pointer(0x70);
    let cfg = q35_with_edu().with(at, f);
    let mut p = Ports::new(&cfg, &[at]);
    assert!(p.devices[0].msi.is_none());
    assert_eq!(p.read(at, 0x34), 0x70);
    assert_ne!(p.read(at, 0x04) & (1 << 20), 0);
    // The table in BAR1 (the upper half of the 64-bit BAR0: no memory BAR of its own).
    let cfg = q35_with_edu().with(at, msi_and_msix(1).cap_pointer(0x70));
    let mut p = Ports::new(&cfg, &[at]);
    assert!(p.devices[0].msix.is_none());
    assert_eq!(p.read(at, 0x34), 0);
    assert_eq!(p.read(at, 0x70), 0);
}

#[test]
fn the_hypervisor_programs_the_device() {
    let cfg = q35_with_edu();
    // Make edu's MSI registers writable in the model, as they are in the device.
    let f = cfg.function(edu()).writable_dwords(0x40, 4);
    let cfg = cfg.with(edu(), f);
    let d = AssignedDevice::probe(&cfg, edu()).unwrap();
    let cap = d.msi.unwrap();
    cap.program(&cfg, edu(), 0xfee0_0210, 0, true);
    let real = cfg.function(edu());
    assert_eq!(real.reg(0x44), 0xfee0_0210);
    assert_eq!(real.reg(0x48), 0);
    assert_eq!(real.reg(0x4c) & 0xffff, 0);
    assert!(cap.enabled(&cfg, edu()));
    // The guest still sees its own (empty, disabled) state.
    assert_eq!(d.read(&cfg, 0x44), 0);
    assert_eq!(d.read(&cfg, 0x40) >> 16 & 1, 0);
    cap.disable(&cfg, edu());
    assert!(!cap.enabled(&cfg, edu()));
}

#[test]
fn only_the_msi_capability_is_visible() {
    let cfg = nic_space();
    let nic = bdf(0, 2, 0);
    let mut p = Ports::new(&cfg, &[nic]);
    let real = cfg.function(nic).reg(0x04);
    assert_ne!(real & (1 << 20), 0);
    assert_eq!(p.read(nic, 0x04), real);
    assert_eq!(p.read(nic, 0x34), 0x40);
    // MSI (32-bit) with its next pointer cut: the PCI Express capability behind it is hidden.
    assert_eq!(p.read(nic, 0x40), 0x05);
    assert_eq!(p.read(nic, 0x50), 0);
    // Without an MSI capability the list is hidden altogether.
    let plain = FakeFunction::endpoint(0x8086, 0x10d3, 0x02, 0x00, 0x00)
        .mem64_bar(0, 0x8_0000_0000, 1 << 17, true)
        .cap_pointer(0x50)
        .cap(0x50, 0x10, 0)
        .status(0x0010);
    let cfg = q35_with_edu().with(nic, plain);
    let mut p = Ports::new(&cfg, &[nic]);
    assert_eq!(p.read(nic, 0x04) & (1 << 20), 0);
    assert_eq!(p.read(nic, 0x34), 0);
    assert_eq!(p.read(nic, 0x50), 0);
}

#[test]
fn other_functions_are_invisible() {
    let cfg = nic_space();
    let mut p = Ports::new(&cfg, &[edu()]);
    for other in [
        bdf(0, 0, 0),
        bdf(0, 0x1f, 2),
        bdf(0, 2, 0),
        bdf(0, 9, 0),
        bdf(3, 0, 0),
    ] {
        let before = cfg.function_or_none(other);
        for offset in (0..=0xfcu8).step_by(4) {
            assert_eq!(p.read(other, offset), u32::MAX, "{other} {offset:#x}");
            p.write(other, offset, 0);
            p.write(other, offset, u32::MAX);
        }
        assert_eq!(cfg.function_or_none(other), before, "{other} changed");
    }
    assert_eq!(cfg.violations.get(), 0);
}

#[test]
fn a_disabled_address_reads_all_ones_and_writes_nothing() {
    let cfg = q35_with_edu();
    let mut p = Ports::new(&cfg, &[edu()]);
    let before = cfg.function(edu()).reg(0x04);
    p.out(0xcf8, 4, address(edu(), 0x04) & !(1 << 31));
    assert_eq!(
        p.inp(0xcf8, 4),
        address(edu(), 0x04) & !(1 << 31),
        "the latch reads back"
    );
    assert_eq!(p.inp(0xcfc, 4), u32::MAX);
    assert_eq!(p.inp(0xcfd, 1), 0xff);
    p.out(0xcfc, 4, 0);
    assert_eq!(cfg.function(edu()).reg(0x04), before);
}

#[test]
fn the_guest_sets_only_its_command_bits() {
    let cfg = nic_space();
    let nic = bdf(0, 2, 0);
    let mut p = Ports::new(&cfg, &[nic]);
    let status = cfg.function(nic).reg(0x04) >> 16;
    // Memory off, bus master and INTx disable on; SERR, parity, fast back-to-back refused.
    p.write(
        nic,
        0x04,
        0xffff_0000 | 0x0400 | 0x0100 | 0x0040 | 0x0200 | 0x0004 | 0x0001,
    );
    let after = cfg.function(nic).reg(0x04);
    assert_eq!(after & 0xffff, 0x0400 | 0x0004 | 0x0001);
    // All-ones in the status half did not clear its write-one-to-clear bits.
    assert_eq!(after >> 16, status);
    assert_eq!(p.read(nic, 0x04) & 0xffff, 0x0405);
    // Every command bit the guest may not change keeps its value both ways.
    let cfg = q35_with_edu();
    let mut p = Ports::new(&cfg, &[edu()]);
    let real = cfg.function(edu()).reg(0x04) & 0xffff;
    p.write(edu(), 0x04, 0);
    assert_eq!(
        cfg.function(edu()).reg(0x04) & 0xffff,
        real & !u32::from(GUEST_COMMAND)
    );
}

#[test]
fn writes_elsewhere_never_reach_the_device() {
    let cfg = q35_with_edu();
    let mut p = Ports::new(&cfg, &[edu()]);
    let before = cfg.function(edu());
    for offset in [
        0x00, 0x08, 0x0c, 0x28, 0x2c, 0x30, 0x34, 0x3c, 0x40, 0x80, 0xfc,
    ] {
        p.write(edu(), offset, 0x5a5a_5a5a);
    }
    assert_eq!(cfg.function(edu()), before);
}

#[test]
fn bar_sizing_answers_without_touching_the_bar() {
    let cfg = q35_with_edu();
    let mut p = Ports::new(&cfg, &[edu()]);
    let before = cfg.function(edu());
    p.write(edu(), 0x10, u32::MAX);
    assert_eq!(
        p.read(edu(), 0x10),
        !((1u32 << 20) - 1),
        "1 MiB, 32-bit, not prefetchable"
    );
    // Restoring the address ends sizing.
    p.write(edu(), 0x10, 0xfea0_0000);
    assert_eq!(p.read(edu(), 0x10), 0xfea0_0000);
    // An attempt to move it ends sizing too, and the BAR stays where firmware put it.
    p.write(edu(), 0x10, u32::MAX);
    p.write(edu(), 0x10, 0xd000_0000);
    assert_eq!(p.read(edu(), 0x10), 0xfea0_0000);
    assert_eq!(cfg.function(edu()), before);
    assert_eq!(cfg.violations.get(), 0);
    // Unimplemented BARs stay zero even when written with ones.
    p.write(edu(), 0x14, u32::MAX);
    assert_eq!(p.read(edu(), 0x14), 0);
}

#[test]
fn sixty_four_bit_and_io_bars_size_per_register() {
    let cfg = nic_space();
    let nic = bdf(0, 2, 0);
    let mut p = Ports::new(&cfg, &[nic]);
    let before = cfg.function(nic);
    assert_eq!(
        p.read(nic, 0x10),
        0b1100,
        "64-bit prefetchable flags, low address 0"
    );
    assert_eq!(p.read(nic, 0x14), 0x8);
    p.write(nic, 0x10, u32::MAX);
    assert_eq!(p.read(nic, 0x10), !((1u32 << 17) - 1) | 0b1100);
    assert_eq!(p.read(nic, 0x14), 0x8, "the upper half sizes on its own");
    p.write(nic, 0x14, u32::MAX);
    assert_eq!(p.read(nic, 0x14), u32::MAX);
    p.write(nic, 0x10, 0);
    p.write(nic, 0x14, 0x8);
    assert_eq!((p.read(nic, 0x10), p.read(nic, 0x14)), (0b1100, 0x8));
    // I/O BAR: flag bits 1:0.
    assert_eq!(p.read(nic, 0x18), 0xc001);
    p.write(nic, 0x18, u32::MAX);
    assert_eq!(p.read(nic, 0x18), !0x1fu32 | 1);
    assert_eq!(cfg.function(nic), before);
    assert_eq!(cfg.violations.get(), 0);
}

#[test]
fn sub_dword_accesses_see_their_bytes() {
    let cfg = q35_with_edu();
    let mut p = Ports::new(&cfg, &[edu()]);
    p.select(edu(), 0x00);
    assert_eq!(p.inp(0xcfc, 1), 0x34);
    assert_eq!(p.inp(0xcfd, 1), 0x12);
    assert_eq!(p.inp(0xcfe, 1), 0xe8);
    assert_eq!(p.inp(0xcff, 1), 0x11);
    assert_eq!(p.inp(0xcfc, 2), 0x1234);
    assert_eq!(p.inp(0xcfe, 2), 0x11e8);
    // Low address bits in the latch are ignored: the dword is chosen by bits 7:2.
    p.out(0xcf8, 4, address(edu(), 0x02));
    assert_eq!(p.inp(0xcfc, 4), 0x11e8_1234);

    // A byte write to the command register's high byte sets INTx disable alone.
    let real = cfg.function(edu()).reg(0x04) & 0xffff;
    p.select(edu(), 0x04);
    p.out(0xcfd, 1, 0xff);
    assert_eq!(cfg.function(edu()).reg(0x04) & 0xffff, real | 0x0400);
    // A byte write to the low byte clears the guest's bits there, leaves the high byte.
    p.out(0xcfc, 1, 0);
    assert_eq!(
        cfg.function(edu()).reg(0x04) & 0xffff,
        real & !0x0007 | 0x0400
    );
    // A write to the status half alone does not touch the command register.
    let now = cfg.function(edu()).reg(0x04);
    p.out(0xcfe, 2, 0xffff);
    assert_eq!(cfg.function(edu()).reg(0x04), now);

    // A byte write of 0xff to the top byte of BAR0 is not all ones: no sizing.
    p.select(edu(), 0x10);
    p.out(0xcff, 1, 0xff);
    assert_eq!(p.inp(0xcfc, 4), 0xfea0_0000);
    // Today's behaviour: the filter keeps no partial BAR value, so sizing takes one dword
    // write of all ones; two word writes of ones do not start it.
    p.out(0xcfc, 2, 0xffff);
    p.out(0xcfe, 2, 0xffff);
    assert_eq!(p.inp(0xcfc, 4), 0xfea0_0000);
    // A dword write of ones from the data port's first byte does.
    p.out(0xcfc, 4, u32::MAX);
    assert_eq!(p.inp(0xcfc, 4), 0xfff0_0000);
    assert_eq!(p.inp(0xcfe, 2), 0xfff0);
}

#[test]
fn the_ports_are_decoded() {
    assert_eq!(ConfigPort::decode(0xcf8, 4), Some(ConfigPort::Address));
    assert_eq!(
        ConfigPort::decode(0xcf8, 1),
        None,
        "byte access to 0xCF8 is not the latch"
    );
    assert_eq!(ConfigPort::decode(0xcf8, 2), None);
    assert_eq!(ConfigPort::decode(0xcf9, 1), None, "reset control");
    assert_eq!(ConfigPort::decode(0xcfb, 4), None);
    for (port, byte) in [(0xcfc, 0), (0xcfd, 1), (0xcfe, 2), (0xcff, 3)] {
        for size in [1, 2, 4] {
            assert_eq!(
                ConfigPort::decode(port, size),
                Some(ConfigPort::Data { byte })
            );
        }
    }
    assert_eq!(ConfigPort::decode(0xd00, 4), None);
    assert_eq!(ConfigPort::decode(0x3f8, 1), None);
}

#[test]
fn the_address_latch_is_decoded() {
    assert_eq!(decode_address(0), None);
    assert_eq!(decode_address(0x7fff_fffc), None, "enable bit clear");
    assert_eq!(decode_address(0x8000_0800), Some((bdf(0, 1, 0), 0)));
    assert_eq!(
        decode_address(0x80ab_fefc),
        Some((bdf(0xab, 0x1f, 6), 0xfc))
    );
    // Bits 1:0 and the reserved bits 30:24 are ignored.
    assert_eq!(decode_address(0xff00_0013), Some((bdf(0, 0, 0), 0x10)));
    let t = Target::decode(0x8000_0804, 3).unwrap();
    assert_eq!((t.bdf, t.offset, t.shift), (bdf(0, 1, 0), 4, 24));
    assert_eq!(Target::decode(0x0000_0804, 0), None);
}

#[test]
fn only_present_endpoints_are_assigned() {
    let cfg = q35_with_edu().with(bdf(0, 3, 0), FakeFunction::bridge(0x8086, 0x244e, 0, 1, 1));
    assert_eq!(
        AssignedDevice::probe(&cfg, bdf(0, 9, 0)).err(),
        Some(AssignError::Absent)
    );
    assert_eq!(
        AssignedDevice::probe(&cfg, bdf(0, 3, 0)).err(),
        Some(AssignError::NotEndpoint)
    );
    let d = AssignedDevice::probe(&cfg, edu()).unwrap();
    assert_eq!(d.bdf, edu());
    assert_eq!(d.bars.get(0).map(|b| b.size), Some(1 << 20));
    assert_eq!(AssignError::Absent.to_string(), "no such PCI function");
}

proptest! {
    /// Whatever a guest does at the ports: nothing panics, no BAR of any function moves, no
    /// function but the assigned one is written, the assigned one's command register changes
    /// only in the guest's bits, and no BAR is written with decode on.
    #[test]
    fn a_guest_cannot_escape_the_filter(
        ops in prop::collection::vec(
            (any::<bool>(), 0xcf6u16..0xd01, prop::sample::select(vec![1u8, 2, 4]), any::<u32>(),
             any::<bool>(), 0u8..4, 0u8..64),
            0..64,
        ),
    ) {
        let cfg = nic_space();
        let nic = bdf(0, 2, 0);
        let mut p = Ports::new(&cfg, &[nic]);
        let before_edu = cfg.function(edu());
        let before_nic = cfg.function(nic);
        for (write, port, size, value, aim, dev, dword) in ops {
            if aim {
                // Point the latch at a real function half of the time.
                p.out(0xcf8, 4, address(bdf(0, dev, 0), dword * 4));
            }
            if write {
                p.out(port, size, value);
            } else {
                let v = p.inp(port, size);
                prop_assert_eq!(v & !size_mask(size), 0);
            }
        }
        prop_assert_eq!(cfg.function(edu()), before_edu);
        let after = cfg.function(nic);
        for offset in (0..0x1000).step_by(4) {
            let (a, b) = (after.reg(offset), before_nic.reg(offset));
            if offset == 4 {
                prop_assert_eq!(a & !u32::from(GUEST_COMMAND), b & !u32::from(GUEST_COMMAND));
            } else {
                prop_assert_eq!(a, b, "{:#x}", offset);
            }
        }
        prop_assert_eq!(cfg.violations.get(), 0);
    }
}
