//! Function addresses and ECAM address computation.

use moat_pci::*;

#[test]
fn bdf_display_and_limits() {
    assert_eq!(format!("{}", Bdf::new(0, 5, 0).unwrap()), "00:05.0");
    assert_eq!(
        format!("{}", Bdf::with_segment(1, 0x2a, 0x1f, 7).unwrap()),
        "0001:2a:1f.7"
    );
    assert_eq!(Bdf::new(0, 32, 0), None);
    assert_eq!(Bdf::new(0, 0, 8), None);
    let b = Bdf::with_segment(3, 0x80, 0x1c, 4).unwrap();
    assert_eq!(
        (b.segment(), b.bus(), b.device(), b.function()),
        (3, 0x80, 0x1c, 4)
    );
    assert_eq!(b.requester_id(), 0x80e4);
    assert_eq!(b.with_function(2).unwrap().function(), 2);
    assert_eq!(b.with_function(8), None);
}

#[test]
fn ecam_addresses() {
    // q35's MCFG: base 0xb0000000, segment 0, buses 0..=255.
    let ecam = Ecam {
        base: 0xb000_0000,
        segment: 0,
        start_bus: 0,
        end_bus: 0xff,
    };
    let edu = Bdf::new(0, 1, 0).unwrap();
    assert_eq!(ecam.address(edu, 0), Some(0xb000_8000));
    assert_eq!(ecam.address(edu, 0x10), Some(0xb000_8010));
    let f = Bdf::new(0x12, 0x1f, 7).unwrap();
    assert_eq!(
        ecam.address(f, 0xffc),
        Some(0xb000_0000 + (0x12 << 20) + (0x1f << 15) + (7 << 12) + 0xffc)
    );
    assert_eq!(ecam.address(f, 0x1000), None);
    assert_eq!(
        ecam.address(Bdf::with_segment(1, 0, 1, 0).unwrap(), 0),
        None
    );
    assert_eq!(ecam.size(), 256 << 20);
    assert_eq!(
        ecam_offset(f, 0x40),
        (0x12 << 20) | (0x1f << 15) | (7 << 12) | 0x40
    );

    // A region decoding buses 0x10..=0x1f: the base is still bus 0's address.
    let partial = Ecam {
        base: 0xe000_0000,
        segment: 2,
        start_bus: 0x10,
        end_bus: 0x1f,
    };
    let inside = Bdf::with_segment(2, 0x10, 0, 0).unwrap();
    assert_eq!(partial.address(inside, 0), Some(0xe000_0000 + (0x10 << 20)));
    assert!(partial.contains(inside));
    assert_eq!(
        partial.address(Bdf::with_segment(2, 0x20, 0, 0).unwrap(), 0),
        None
    );
    assert_eq!(
        partial.address(Bdf::with_segment(2, 0x0f, 0, 0).unwrap(), 0),
        None
    );
    assert_eq!(partial.size(), 16 << 20);
}

#[test]
fn port_io_address_encodes_mechanism_one() {
    use moat_pci::port_io_address;
    let f = Bdf::new(0x12, 0x1f, 7).unwrap();
    // enable | bus 0x12 | device 0x1f | function 7 | register 0x40
    assert_eq!(port_io_address(f, 0x40), Some(0x8012_ff40));
    // The low two bits select bytes in the data port, not the address.
    assert_eq!(port_io_address(f, 0x43), Some(0x8012_ff40));
    assert_eq!(
        port_io_address(Bdf::new(0, 0, 0).unwrap(), 0),
        Some(0x8000_0000)
    );
    assert_eq!(port_io_address(f, 0xfc), Some(0x8012_fffc));
    // Extended configuration space and other segments need ECAM.
    assert_eq!(port_io_address(f, 0x100), None);
    assert_eq!(
        port_io_address(Bdf::with_segment(1, 0, 0, 0).unwrap(), 0),
        None
    );
}
