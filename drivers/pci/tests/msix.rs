//! MSI-X virtualization state: the capability's layout and the pages kept out of the guest,
//! the guest's virtual message control, and its virtual table (reset masked, dword accesses
//! only, an entry live only when everything allows it and its message is a valid one).

mod common;

use common::*;
use moat_pci::*;
use proptest::prelude::*;

const AT: Bdf = bdf(0, 3, 0);
const CAP: u16 = 0xa0;

/// QEMU's e1000e layout: 5 vectors, table at BAR3 + 0, PBA at BAR3 + 0x2000.
fn e1000e_like() -> FakeSpace {
    let f = FakeFunction::endpoint(0x8086, 0x10d3, 0x02, 0x00, 0x00)
        .mem32_bar(0, 0xfeb8_0000, 0x2_0000, false)
        .mem32_bar(3, 0xfebd_0000, 0x4000, false)
        .status(1 << 4)
        .cap_pointer(CAP as u8)
        .cap(CAP as u8, cap_id::MSIX, 0)
        .dword(CAP, (4 << 16) | u32::from(cap_id::MSIX))
        .dword(CAP + 4, 3)
        .dword(CAP + 8, 0x2000 | 3)
        .writable_dwords(CAP, 1);
    FakeSpace::new().with(AT, f)
}

fn cap() -> MsixCapability {
    MsixCapability::find(&e1000e_like(), AT).expect("MSI-X capability")
}

fn bars() -> Bars {
    probe_bars(&e1000e_like(), AT).unwrap()
}

#[test]
fn capability_layout_is_read_from_configuration_space() {
    let c = cap();
    assert_eq!(c.offset, CAP);
    assert_eq!(c.entries, 5);
    assert_eq!(c.table, MsixRegion { bir: 3, offset: 0 });
    assert_eq!(
        c.pba,
        MsixRegion {
            bir: 3,
            offset: 0x2000
        }
    );
    assert_eq!(c.table_len(), 5 * 16);
    assert_eq!(c.pba_len(), 8);
    assert_eq!(c.register(CAP), Some(MsixRegister::Control));
    assert_eq!(c.register(CAP + 4), Some(MsixRegister::TableLocation));
    assert_eq!(c.register(CAP + 8), Some(MsixRegister::PbaLocation));
    assert_eq!(c.register(CAP + 12), None);
    assert_eq!(c.register(CAP - 4), None);
}

#[test]
fn table_and_pba_pages_are_trapped_and_classified() {
    let c = cap();
    let b = bars();
    let [t, p] = c.trapped(&b).unwrap();
    let t = t.unwrap();
    let p = p.unwrap();
    assert_eq!((t.start, t.len), (0xfebd_0000, 0x1000));
    assert_eq!((p.start, p.len), (0xfebd_2000, 0x1000));
    assert_eq!(c.classify(&b, 0xfebd_0010), Some(MsixAccess::Table(0x10)));
    assert_eq!(c.classify(&b, 0xfebd_2004), Some(MsixAccess::Pba(4)));
    assert_eq!(c.classify(&b, 0xfebd_0800), Some(MsixAccess::Other(0x800)));
    assert_eq!(c.classify(&b, 0xfeb8_0000), None);
    // Table and PBA in one page: one range.
    let shared = MsixCapability::from_registers(CAP, 4 << 16, 3, 0x800 | 3);
    let [one, none] = shared.trapped(&b).unwrap();
    assert_eq!(one.map(|r| (r.start, r.len)), Some((0xfebd_0000, 0x1000)));
    assert_eq!(none, None);
    // A table past its BAR, or in a BAR that does not exist: not offered.
    let outside = MsixCapability::from_registers(CAP, 4 << 16, 0x3ff8 | 3, 0x2000 | 3);
    assert_eq!(outside.trapped(&b), None);
    let no_bar = MsixCapability::from_registers(CAP, 4 << 16, 5, 0x2000 | 3);
    assert_eq!(no_bar.trapped(&b), None);
}

#[test]
fn virtual_control_shows_clamped_size_and_virtual_bits_only() {
    let c = cap();
    let mut v = VirtualMsixControl::default();
    let header = v.read(&c, MsixRegister::Control, 0x50, 0);
    assert_eq!(header, (4 << 16) | 0x50 << 8 | 0x11);
    // A byte write to the low half of the control word changes nothing.
    assert!(!v.write(MsixRegister::Control, 0x8000_0000, 0x00ff_0000));
    assert!(v.write(MsixRegister::Control, 0xc000_0000, 0xff00_0000));
    assert!(v.enabled && v.function_masked);
    assert_eq!(v.read(&c, MsixRegister::Control, 0, 0) >> 16, 0xc000 | 4);
    // The locations are read only and pass through.
    assert!(!v.write(MsixRegister::TableLocation, 0x1234, u32::MAX));
    assert_eq!(v.read(&c, MsixRegister::TableLocation, 0, 3), 3);
    // A device with more vectors than offered shows MAX_VECTORS.
    let big = MsixCapability::from_registers(CAP, 0x7ff << 16, 3, 0x2000 | 3);
    assert_eq!(big.guest_entries() as usize, MAX_VECTORS);
    assert_eq!(
        VirtualMsixControl::default().read(&big, MsixRegister::Control, 0, 0) >> 16,
        MAX_VECTORS as u32 - 1
    );
}

#[test]
fn device_control_is_written_by_the_hypervisor() {
    let cfg = e1000e_like();
    let c = cap();
    c.set_control(&cfg, AT, true, false);
    assert_eq!(cfg.read32(AT, CAP) >> 16, 0x8004);
    c.disable(&cfg, AT);
    assert_eq!(cfg.read32(AT, CAP) >> 16, 0x0004);
    assert_eq!(cfg.read32(AT, CAP) & 0xffff, u32::from(cap_id::MSIX));
}

#[test]
fn table_resets_masked_and_round_trips() {
    let c = cap();
    let mut t = VirtualMsixTable::new(&c);
    assert_eq!(t.len(), 5);
    for i in 0..5 {
        assert_eq!(t.read(i * 16 + 12), Ok(1), "entry {i} masked at reset");
    }
    assert_eq!(t.write(16, 0xfee0_1003), Ok(Some(1)));
    assert_eq!(t.read(16), Ok(0xfee0_1000), "reserved address bits read 0");
    assert_eq!(t.write(16, 0xfee0_1000), Ok(None), "no change");
    assert_eq!(t.write(24, 0x41), Ok(Some(1)));
    assert_eq!(t.write(28, 0), Ok(Some(1)));
    assert_eq!(
        t.entry(1),
        Some(MsixEntry {
            address: 0xfee0_1000,
            data: 0x41,
            masked: false
        })
    );
    assert_eq!(t.entry(0), Some(MsixEntry::default()));
    assert_eq!(t.read(2), Err(TableAccessError::Unaligned));
    assert_eq!(t.write(5 * 16, 0), Err(TableAccessError::OutOfRange));
    assert_eq!(t.read(u32::MAX - 3), Err(TableAccessError::OutOfRange));
}

#[test]
fn entry_is_live_only_when_everything_allows_it() {
    let c = cap();
    let mut t = VirtualMsixTable::new(&c);
    t.write(0, 0xfee0_1000).unwrap();
    t.write(8, 0x41).unwrap();
    let on = VirtualMsixControl {
        enabled: true,
        function_masked: false,
    };
    assert_eq!(t.target(0, &on), None, "entry masked");
    t.write(12, 0).unwrap();
    assert_eq!(
        t.target(0, &on),
        Some(GuestMsiTarget {
            apic_id: 1,
            vector: 0x41
        })
    );
    assert_eq!(
        t.target(0, &VirtualMsixControl::default()),
        None,
        "MSI-X off"
    );
    let masked = VirtualMsixControl {
        enabled: true,
        function_masked: true,
    };
    assert_eq!(t.target(0, &masked), None, "function masked");
    assert_eq!(t.target(9, &on), None, "no such entry");
}

#[test]
fn bad_messages_are_never_live() {
    let c = cap();
    let on = VirtualMsixControl {
        enabled: true,
        function_masked: false,
    };
    for (address, data, why) in [
        (0xfee0_0000u64, 8u32, "vector below 32"),
        (0xfee0_0000, 18, "machine check"),
        (0xfee0_0010, 0x41, "remappable format"),
        (0xfee0_0004, 0x41, "logical destination"),
        (0x1_fee0_0000, 0x41, "high address"),
        (0xfed0_0000, 0x41, "outside the interrupt window"),
        (0xfee0_0000, 0x241, "SMI delivery"),
        (0xfee0_0000, 0x8041, "level triggered"),
        (0xfee0_0000, 0x1_0041, "reserved data bits"),
    ] {
        let mut t = VirtualMsixTable::new(&c);
        t.write(0, address as u32).unwrap();
        t.write(4, (address >> 32) as u32).unwrap();
        t.write(8, data).unwrap();
        t.write(12, 0).unwrap();
        assert_eq!(t.target(0, &on), None, "{why}");
    }
}

#[test]
fn pba_hides_bits_of_entries_not_offered() {
    let t = VirtualMsixTable::new(&cap());
    assert_eq!(t.read_pba(0, u32::MAX), Ok(0x1f));
    assert_eq!(t.read_pba(4, u32::MAX), Ok(0));
    assert_eq!(t.read_pba(1, 0), Err(TableAccessError::Unaligned));
}

proptest! {
    /// Any sequence of dword writes leaves the table equal to a plain model: each write
    /// changes only the entry it addresses, reports a change exactly when there was one,
    /// and reads return what was written (reserved address bits zero).
    #[test]
    fn table_matches_a_model(writes in proptest::collection::vec((0u32..100, any::<u32>()), 0..64)) {
        let c = cap();
        let mut t = VirtualMsixTable::new(&c);
        let mut model = [[0u32, 0, 0, 1]; 5];
        for (slot, value) in writes {
            let offset = slot * 4;
            let r = t.write(offset, value);
            let entry = (slot / 4) as usize;
            if entry >= 5 {
                prop_assert_eq!(r, Err(TableAccessError::OutOfRange));
                continue;
            }
            let word = (slot % 4) as usize;
            let stored = match word { 0 => value & !3, 3 => value & 1, _ => value };
            let changed = model[entry][word] != stored;
            model[entry][word] = stored;
            prop_assert_eq!(r, Ok(changed.then_some(entry as u16)));
            for (i, m) in model.iter().enumerate() {
                for (w, v) in m.iter().enumerate() {
                    prop_assert_eq!(t.read((i * 16 + w * 4) as u32), Ok(*v));
                }
            }
        }
    }
}

proptest! {
    /// Only naturally aligned dwords and qwords reach the table or PBA, as whole dwords
    /// inside the access; everything else is refused.
    #[test]
    fn only_aligned_dwords_and_qwords_are_emulated(offset in 0u32..0x1000, size in 0u8..17) {
        match msix_dwords(offset, size) {
            Some((first, n)) => {
                prop_assert!(size == 4 || size == 8);
                prop_assert_eq!(offset % u32::from(size), 0);
                prop_assert_eq!((first, n), (offset, u32::from(size) / 4));
            }
            None => prop_assert!(!matches!(size, 4 | 8) || offset % u32::from(size) != 0),
        }
    }
}
