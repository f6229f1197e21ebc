//! Interrupt remapping against the register-level model in `fake_unit`: bring-up order,
//! IRTE programming with source-id validation, interrupt entry cache invalidation, the
//! compatibility format blocked, and interrupt-remapping faults decoded and counted.

use std::vec::Vec;

use crate::entry::SourceId;
use crate::error::Error;
use crate::fake_unit::{
    drain, test_unit, Delivered, Event, FakeUnit, TestUnit, QEMU_CAP, QEMU_ECAP,
};
use crate::fault::FaultReason;
use crate::hw::PhysAddr;
use crate::intremap::{
    compatibility_msi, irta_value, remappable_msi, DeliveryMode, Irte, MsiMessage, SourceQualifier,
    SourceValidation, TABLE_ENTRIES, TABLE_SIZE_FIELD,
};
use crate::regs::{GlobalCommand, GlobalStatus, GSTS_PERSISTENT_MASK};
use crate::testing::FakeMemory;

const EDU: SourceId = SourceId::new(0, 5, 0);
const OTHER: SourceId = SourceId::new(0, 6, 0);
/// ECAP.EIM (bit 4).
const EIM: u64 = 1 << 4;

fn setup_with(ecap: u64, x2apic: bool) -> (FakeMemory, FakeUnit, TestUnit) {
    let (mem, hw, mut unit) = test_unit(QEMU_CAP, ecap, |cfg| cfg.x2apic = x2apic);
    let mut m = mem.clone();
    unit.enable(&mut m).unwrap();
    (mem, hw, unit)
}

fn setup() -> (FakeMemory, FakeUnit, TestUnit) {
    setup_with(QEMU_ECAP, false)
}

/// [`setup`] with interrupt remapping on and one table entry allocated: that entry's index
/// and the remappable MSI naming it.
fn setup_one_entry() -> (FakeMemory, FakeUnit, TestUnit, u16, MsiMessage) {
    let (mut mem, hw, mut unit) = setup();
    unit.enable_interrupt_remapping(&mut mem).unwrap();
    let i = unit.alloc_irte().unwrap();
    (mem, hw, unit, i, remappable_msi(i))
}

fn edu_entry(vector: u8) -> Irte {
    Irte::remapped(
        vector,
        0,
        false,
        DeliveryMode::Fixed,
        SourceValidation::Requester {
            sid: EDU,
            qualifier: SourceQualifier::Exact,
        },
    )
}

#[test]
fn bring_up_order_carries_persistent_bits_and_blocks_compatibility_format() {
    let (mut mem, hw, mut unit) = setup();
    // Firmware left compatibility format on: the driver must turn it off.
    {
        let mut s = hw.state();
        s.gsts |= GlobalStatus::CFIS.bits();
        s.events.clear();
    }
    unit.enable_interrupt_remapping(&mut mem).unwrap();
    assert!(unit.interrupt_remapping());
    let s = hw.state();
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    let pos = |pred: &dyn Fn(&Event) -> bool| s.events.iter().position(pred).unwrap();
    let irta = pos(&|e| matches!(e, Event::Irta(_)));
    let Event::Irta(v) = s.events[irta] else {
        unreachable!()
    };
    assert_eq!(v & 0xfff, TABLE_SIZE_FIELD as u64, "size field, EIME clear");
    assert_eq!(s.latched_irta, Some(v));
    let base = (GlobalCommand::TE | GlobalCommand::QIE).bits();
    let sirtp =
        pos(&|e| *e == Event::Gcmd(base | (GlobalCommand::SIRTP | GlobalCommand::CFI).bits()));
    let iec = pos(&|e| matches!(e, Event::Desc(lo, 0) if lo & 0xf == 4 && lo & 0x10 == 0));
    let cfi_off = pos(&|e| *e == Event::Gcmd(base));
    let ire = pos(&|e| *e == Event::Gcmd(base | GlobalCommand::IRE.bits()));
    assert!(
        irta < sirtp && sirtp < iec && iec < cfi_off && cfi_off < ire,
        "{:?}",
        s.events
    );
    // Every GCMD write carried TE and QIE (the persistent bits).
    for e in &s.events {
        if let Event::Gcmd(g) = e {
            assert_eq!(g & base, base, "GCMD {g:#x} dropped a persistent bit");
        }
    }
    assert_eq!(s.gsts & GSTS_PERSISTENT_MASK & GlobalStatus::CFIS.bits(), 0);
    drop(s);
    // Compatibility format is blocked, with the requester recorded.
    assert_eq!(hw.msi(EDU.0, compatibility_msi(0, 8).address, 8), Err(0x25));
    let recs = drain(&mut unit);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].reason, FaultReason::IrCompatibilityBlocked);
    assert_eq!(recs[0].source, EDU);
    assert_eq!(unit.fault_counters().interrupt_source(EDU), 1);
    assert_eq!(unit.fault_counters().interrupt_remapping, 1);
}

#[test]
fn remapped_entry_delivers_only_for_its_source() {
    let (mut mem, hw, mut unit, i, msg) = setup_one_entry();
    // Not present yet.
    assert_eq!(hw.msi(EDU.0, msg.address, msg.data), Err(0x22));
    assert_eq!(drain(&mut unit)[0].interrupt_index(), Some(i));
    unit.set_irte(&mut mem, i, edu_entry(0x51)).unwrap();
    assert_eq!(
        hw.msi(EDU.0, msg.address, msg.data),
        Ok(Delivered {
            vector: 0x51,
            apic_id: 0,
            remapped: true
        })
    );
    // Another device naming the same entry fails source-id validation.
    assert_eq!(hw.msi(OTHER.0, msg.address, msg.data), Err(0x26));
    let recs = drain(&mut unit);
    assert_eq!(recs[0].reason, FaultReason::IrSourceIdInvalid);
    assert_eq!(recs[0].source, OTHER);
    assert_eq!(recs[0].interrupt_index(), Some(i));
    assert_eq!(unit.fault_counters().interrupt_source(OTHER), 1);
    assert_eq!(unit.fault_counters().interrupt_source(EDU), 1);
    // Past the table.
    let far = remappable_msi(TABLE_ENTRIES as u16);
    assert_eq!(hw.msi(EDU.0, far.address, far.data), Err(0x21));
    drain(&mut unit);
    // Reserved data without SHV, and an address outside the window.
    assert_eq!(hw.msi(EDU.0, msg.address, 1), Err(0x20));
    drain(&mut unit);
    assert_eq!(hw.msi(EDU.0, 0xfed0_0010, 0), Err(0x20));
    drain(&mut unit);
    assert!(hw.state().errors.is_empty());
}

#[test]
fn entry_changes_are_invalidated_and_never_seen_torn() {
    let (mut mem, hw, mut unit, i, msg) = setup_one_entry();
    unit.set_irte(&mut mem, i, edu_entry(0x51)).unwrap();
    assert_eq!(hw.msi(EDU.0, msg.address, 0).map(|d| d.vector), Ok(0x51));
    assert!(hw.state().irte_cache.contains_key(&(i as u32)), "cached");
    // A change is seen at once: the cached entry was invalidated.
    unit.set_irte(&mut mem, i, edu_entry(0x52)).unwrap();
    assert_eq!(hw.msi(EDU.0, msg.address, 0).map(|d| d.vector), Ok(0x52));
    // Freed: not present, and the cache does not keep it alive.
    unit.free_irte(&mut mem, i).unwrap();
    assert_eq!(hw.msi(EDU.0, msg.address, 0), Err(0x22));
    assert_eq!(
        unit.irte(&mem, i),
        Err(Error::InvalidState("IRTE index not allocated"))
    );
    // Index-selective descriptors only (after bring-up's global one).
    let s = hw.state();
    let iecs: Vec<u64> = s
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Desc(lo, _) if lo & 0xf == 4 => Some(*lo),
            _ => None,
        })
        .collect();
    assert_eq!(iecs[0] & 0x10, 0, "bring-up: global");
    assert!(iecs[1..]
        .iter()
        .all(|lo| lo & 0x10 != 0 && (lo >> 32) as u16 == i));
    assert!(s.errors.is_empty(), "{:?}", s.errors);
}

#[test]
fn a_stale_cached_entry_survives_without_invalidation() {
    // The model's cache is real: writing the table behind the driver's back is not seen.
    // This is what makes the driver's invalidation in `set_irte` observable above.
    let (mut mem, hw, mut unit) = setup();
    unit.enable_interrupt_remapping(&mut mem).unwrap();
    let i = unit.alloc_irte().unwrap();
    unit.set_irte(&mut mem, i, edu_entry(0x51)).unwrap();
    let msg = remappable_msi(i);
    assert!(hw.msi(EDU.0, msg.address, 0).is_ok());
    let irta = hw.state().latched_irta.unwrap();
    let at = (irta & !0xfff) + i as u64 * 16;
    use crate::hw::DmaMemory;
    mem.write_u64(PhysAddr::new(at), 0);
    assert_eq!(hw.msi(EDU.0, msg.address, 0).map(|d| d.vector), Ok(0x51));
}

#[test]
fn extended_interrupt_mode_only_when_offered_and_wanted() {
    let (mut mem, hw, mut unit) = setup_with(QEMU_ECAP | EIM, true);
    unit.enable_interrupt_remapping(&mut mem).unwrap();
    assert!(unit.extended_interrupt_mode());
    let irta = hw.state().latched_irta.unwrap();
    assert_eq!(
        irta & 0xfff,
        irta_value(PhysAddr::new(0), true, TABLE_SIZE_FIELD)
    );
    let i = unit.alloc_irte().unwrap();
    let e = Irte::remapped(
        0x60,
        0x1_0002,
        true,
        DeliveryMode::Fixed,
        SourceValidation::Requester {
            sid: EDU,
            qualifier: SourceQualifier::Exact,
        },
    );
    unit.set_irte(&mut mem, i, e).unwrap();
    let msg = remappable_msi(i);
    assert_eq!(
        hw.msi(EDU.0, msg.address, 0).map(|d| d.apic_id),
        Ok(0x1_0002)
    );
    // EIME blocks the compatibility format even if CFIS were set.
    hw.state().gsts |= GlobalStatus::CFIS.bits();
    let c = compatibility_msi(0, 0x30);
    assert_eq!(hw.msi(EDU.0, c.address, c.data), Err(0x25));
    // Offered but the APICs are in xAPIC mode: EIME stays clear.
    let (mut mem, hw, mut unit) = setup_with(QEMU_ECAP | EIM, false);
    unit.enable_interrupt_remapping(&mut mem).unwrap();
    assert!(!unit.extended_interrupt_mode());
    assert_eq!(hw.state().latched_irta.unwrap() & (1 << 11), 0);
    // A 32-bit destination is refused in xAPIC mode (reserved bits).
    let i = unit.alloc_irte().unwrap();
    assert!(unit.set_irte(&mut mem, i, e).is_err());
}

#[test]
fn refused_without_ir_or_queue_and_table_exhaustion() {
    let (mut mem, _hw, mut unit) = setup_with(QEMU_ECAP & !(1 << 3), false);
    assert!(matches!(
        unit.enable_interrupt_remapping(&mut mem),
        Err(Error::Unsupported(_))
    ));
    assert!(!unit.interrupt_remapping());
    assert!(unit.alloc_irte().is_err());
    let (mut mem, _hw, mut unit) = setup();
    unit.enable_interrupt_remapping(&mut mem).unwrap();
    let live = mem.live_frames();
    for k in 0..TABLE_ENTRIES {
        assert_eq!(unit.alloc_irte().unwrap() as usize, k);
    }
    assert!(unit.alloc_irte().is_err());
    unit.free_irte(&mut mem, 7).unwrap();
    assert_eq!(unit.alloc_irte().unwrap(), 7);
    assert_eq!(mem.live_frames(), live, "IRTEs live in the one table page");
    // Disable turns IR off first; free_tables returns the table.
    unit.disable().unwrap();
    assert!(!unit.interrupt_remapping());
    unit.free_tables(&mut mem).unwrap();
    assert_eq!(mem.live_frames(), 0);
}

#[test]
fn compatibility_format_passes_only_when_ir_is_off() {
    let (_mem, hw, _unit) = setup();
    let c: MsiMessage = compatibility_msi(1, 0x41);
    assert_eq!(
        hw.msi(EDU.0, c.address, c.data),
        Ok(Delivered {
            vector: 0x41,
            apic_id: 1,
            remapped: false
        })
    );
}
