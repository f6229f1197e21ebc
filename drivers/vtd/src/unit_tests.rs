//! Driver tests against the register-level model in `fake_unit`.

use std::vec;
use std::vec::Vec;

use crate::domain::Domain;
use crate::entry::{PagingLevels, SourceId};
use crate::error::{Error, Operation};
use crate::fake_unit::{drain, test_unit, Event, FakeUnit, TestUnit, QEMU_CAP, QEMU_ECAP};
use crate::fault::{FaultAccess, FaultReason};
use crate::gather::Gather;
use crate::hw::{DmaMemory, PhysAddr};
use crate::paging::Access;
use crate::regs::{
    ccmd, iotlb_reg, ContextGranularity, GlobalCommand, GlobalStatus, IotlbGranularity,
};
use crate::testing::{FakeClock, FakeMemory};
use crate::unit::{Flushed, Submitted, Unit, UnitConfig};

const RW: Access = Access::READ.union(Access::WRITE);
const EDU: SourceId = SourceId::new(0, 3, 0);

fn setup_with(cap: u64, ecap: u64) -> (FakeMemory, FakeUnit, TestUnit) {
    test_unit(cap, ecap, |_| {})
}

fn setup() -> (FakeMemory, FakeUnit, TestUnit) {
    setup_with(QEMU_CAP, QEMU_ECAP)
}

/// A unit brought up with one domain and the edu device attached to it, with a gather for
/// the domain's unmaps: (memory, unit model, driver, domain, gather), the set-up most tests
/// start from.
fn attached_with(cap: u64, ecap: u64) -> (FakeMemory, FakeUnit, TestUnit, Domain, Gather) {
    let (mut mem, hw, mut unit) = setup_with(cap, ecap);
    unit.enable(&mut mem).unwrap();
    let dom = unit.create_domain(&mut mem).unwrap();
    unit.attach(&mut mem, &dom, EDU).unwrap();
    let g = dom.gather();
    (mem, hw, unit, dom, g)
}

fn attached() -> (FakeMemory, FakeUnit, TestUnit, Domain, Gather) {
    attached_with(QEMU_CAP, QEMU_ECAP)
}

/// The unit model saw no programming error.
fn no_errors(hw: &FakeUnit) {
    let s = hw.state();
    assert!(s.errors.is_empty(), "{:?}", s.errors);
}

/// Maps `[iova, iova + len)` to `phys` read-write in `dom` and flushes: the device reaches it.
fn map_flushed(
    unit: &mut TestUnit,
    mem: &mut FakeMemory,
    dom: &Domain,
    g: &mut Gather,
    iova: u64,
    phys: u64,
    len: u64,
) {
    map_rw(dom, mem, g, iova, phys, len);
    unit.flush(mem, g).unwrap();
}

/// Maps `[iova, iova + len)` to `phys` read-write in `dom`.
fn map_rw(dom: &Domain, mem: &FakeMemory, g: &mut Gather, iova: u64, phys: u64, len: u64) {
    dom.map(mem, iova, PhysAddr::new(phys), len, RW, g).unwrap();
}

#[test]
fn bring_up_sequence_and_disable() {
    let (mut mem, hw, mut unit) = setup();
    unit.enable(&mut mem).unwrap();
    let root = unit.root_table().unwrap();
    let s = hw.state();
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    let gcmds: Vec<u32> = s
        .events
        .iter()
        .filter_map(|e| {
            if let Event::Gcmd(v) = e {
                Some(*v)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(
        gcmds,
        vec![
            GlobalCommand::SRTP.bits(),
            GlobalCommand::QIE.bits(),
            (GlobalCommand::TE | GlobalCommand::QIE).bits(),
        ]
    );
    // The order of the whole sequence.
    let pos = |pred: &dyn Fn(&Event) -> bool| s.events.iter().position(pred).unwrap();
    let rtaddr = pos(&|e| *e == Event::RtAddr(root.as_u64()));
    let srtp = pos(&|e| *e == Event::Gcmd(GlobalCommand::SRTP.bits()));
    let cc = pos(&|e| *e == Event::Ccmd(ccmd::encode(ContextGranularity::Global)));
    let tlb = pos(&|e| *e == Event::Iotlb(iotlb_reg::encode(IotlbGranularity::Global, true, true)));
    let iqa = pos(&|e| matches!(e, Event::Iqa(_)));
    let qie = pos(&|e| *e == Event::Gcmd(GlobalCommand::QIE.bits()));
    let wait = pos(&|e| matches!(e, Event::Desc(lo, _) if lo & 0xf == 5));
    let te = pos(&|e| *e == Event::Gcmd((GlobalCommand::TE | GlobalCommand::QIE).bits()));
    assert!(
        rtaddr < srtp && srtp < cc && cc < tlb && tlb < iqa && iqa < qie && qie < wait && wait < te
    );
    assert_eq!(s.events[iqa - 1], Event::Iqt(0));
    assert!(
        s.gsts & (GlobalStatus::TES | GlobalStatus::QIES).bits()
            == (GlobalStatus::TES | GlobalStatus::QIES).bits()
    );
    drop(s);
    assert!(unit.is_enabled() && unit.queued_invalidation());
    assert_eq!(
        unit.enable(&mut mem),
        Err(Error::InvalidState("unit already enabled"))
    );

    unit.disable().unwrap();
    let s = hw.state();
    let n = s.events.len();
    assert_eq!(
        s.events[n - 2..],
        [Event::Gcmd(GlobalCommand::QIE.bits()), Event::Gcmd(0)]
    );
    assert_eq!(s.gsts & (GlobalStatus::TES | GlobalStatus::QIES).bits(), 0);
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    drop(s);
    // Re-enable works and frees cleanly afterwards.
    unit.enable(&mut mem).unwrap();
    unit.disable().unwrap();
    unit.free_tables(&mut mem).unwrap();
    assert_eq!(mem.live_frames(), 0);
}

#[test]
fn slow_status_bits_are_polled() {
    let (mut mem, hw, mut unit) = setup();
    hw.state().gsts_delay = 7;
    unit.enable(&mut mem).unwrap();
    assert!(unit.is_enabled());
}

#[test]
fn dead_unit_times_out_instead_of_hanging() {
    let (mut mem, hw, mut unit) = setup();
    hw.state().gsts_delay = u32::MAX;
    assert_eq!(
        unit.enable(&mut mem),
        Err(Error::Timeout(Operation::SetRootTablePointer))
    );
    let (mut mem, hw, mut unit) = setup();
    hw.state().dead_registers = true;
    assert_eq!(
        unit.enable(&mut mem),
        Err(Error::Timeout(Operation::ContextCommand))
    );
}

#[test]
fn mapped_dma_translates_and_unmap_needs_the_flush() {
    let (mut mem, hw, mut unit) = setup();
    unit.enable(&mut mem).unwrap();
    let dom = unit.create_domain(&mut mem).unwrap();
    assert_ne!(dom.id(), 0);
    unit.attach(&mut mem, &dom, EDU).unwrap();
    let mut g = dom.gather();
    map_rw(&dom, &mem, &mut g, 0x10_0000, 0x5000_0000, 0x2000);
    dom.map(
        &mem,
        0x20_0000,
        PhysAddr::new(0x6000_0000),
        0x1000,
        Access::READ,
        &mut g,
    )
    .unwrap();
    let f = unit.flush(&mut mem, &mut g).unwrap();
    assert_eq!(
        f.invalidations, 0,
        "no caching mode: maps need no invalidation"
    );
    assert_eq!(hw.dma(EDU.0, 0x10_0008, true), Ok(0x5000_0008));
    assert_eq!(hw.dma(EDU.0, 0x10_1ff0, false), Ok(0x5000_1ff0));
    assert_eq!(hw.dma(EDU.0, 0x20_0000, false), Ok(0x6000_0000));
    // Write to a read-only page.
    assert_eq!(hw.dma(EDU.0, 0x20_0010, true), Err(5));
    let recs = drain(&mut unit);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].source, EDU);
    assert_eq!(recs[0].address, 0x20_0000);
    assert_eq!(recs[0].access, FaultAccess::Write);
    assert_eq!(recs[0].reason, FaultReason::WriteDenied);
    assert_eq!(recs[0].domain, Some(dom.id()));

    dom.unmap(&mem, 0x10_0000, 0x1000, &mut g).unwrap();
    // Stale IOTLB entry: still translates until the flush.
    assert_eq!(hw.dma(EDU.0, 0x10_0000, false), Ok(0x5000_0000));
    let f = unit.flush(&mut mem, &mut g).unwrap();
    assert_eq!(f.unmapped, vec![0x10_0000..0x10_1000]);
    assert_eq!(f.invalidations, 1);
    assert!(!f.domain_selective);
    let psi = crate::inval::Descriptor::iotlb(
        IotlbGranularity::Page {
            did: dom.id(),
            addr: 0x10_0000,
            am: 0,
            ih: true,
        },
        true,
        true,
    );
    assert!(hw.state().events.contains(&Event::Desc(psi.lo, psi.hi)));
    assert_eq!(hw.dma(EDU.0, 0x10_0000, false), Err(6));
    assert_eq!(hw.dma(EDU.0, 0x10_1000, false), Ok(0x5000_1000));
    let recs = drain(&mut unit);
    assert_eq!(recs.len(), 1);
    assert_eq!(
        (recs[0].address, recs[0].access, recs[0].reason),
        (0x10_0000, FaultAccess::Read, FaultReason::ReadDenied)
    );
    assert_eq!(unit.fault_counters().domain(dom.id()), 2);
    assert_eq!(unit.fault_counters().source(EDU), 2);
    no_errors(&hw);
    // Non-coherent unit (ECAP.C = 0): every CPU write to a table or the queue was flushed.
    assert!(mem.unflushed_writes().is_empty());
}

#[test]
fn unattached_devices_and_other_memory_are_blocked() {
    let (mut mem, hw, mut unit, dom, mut g) = attached();
    map_flushed(&mut unit, &mut mem, &dom, &mut g, 0x1000, 0x8000, 0x1000);
    assert_eq!(hw.dma(SourceId::new(0, 4, 0).0, 0x1000, false), Err(2));
    drain(&mut unit);
    assert_eq!(hw.dma(SourceId::new(1, 0, 0).0, 0x1000, false), Err(1));
    let recs = drain(&mut unit);
    assert_eq!(recs[0].reason, FaultReason::RootEntryNotPresent);
    assert_eq!(recs[0].domain, None);
    assert_eq!(hw.dma(EDU.0, 0x2000, true), Err(5));
    assert_eq!(hw.dma(EDU.0, 1 << 39, true), Err(4));
    assert_eq!(unit.fault_counters().unattached, 2);
}

#[test]
fn table_pages_released_only_after_completed_invalidation() {
    let (mut mem, hw, mut unit, dom, mut g) = attached();
    // 2 MiB of 4 KiB pages (the physical address rules out a superpage): one leaf table.
    map_rw(&dom, &mem, &mut g, 0x4000_0000, 0x9000_1000, 0x20_0000);
    unit.flush(&mut mem, &mut g).unwrap();
    assert!(hw.dma(EDU.0, 0x4000_0000, true).is_ok());
    let live = mem.live_frames();
    dom.unmap(&mem, 0x4000_0000, 0x20_0000, &mut g).unwrap();
    assert_eq!(g.pending_tables(), 1);
    // A hung queue: the flush fails and nothing is released.
    hw.state().ignore_waits = true;
    assert_eq!(
        unit.flush(&mut mem, &mut g),
        Err(Error::Timeout(Operation::InvalidationWait))
    );
    assert_eq!(unit.invalidation_stats().timeouts, 1);
    assert_eq!(mem.live_frames(), live);
    assert_eq!(g.pending_tables(), 1);
    assert_eq!(g.unmapped().to_vec(), vec![0x4000_0000..0x4020_0000]);
}

#[test]
fn table_pages_freed_after_flush() {
    let (mut mem, hw, mut unit, dom, mut g) = attached();
    map_rw(&dom, &mem, &mut g, 0x4000_0000, 0x9000_1000, 0x20_0000);
    let live = mem.live_frames();
    dom.unmap(&mem, 0x4000_0000, 0x20_0000, &mut g).unwrap();
    let f = unit.flush(&mut mem, &mut g).unwrap();
    assert_eq!(f.tables_freed, 1);
    assert_eq!(mem.live_frames(), live - 1);
    // The invalidation did not use the leaf-only hint: paging-structure entries went away.
    let has_ih0_psi = hw
        .state()
        .events
        .iter()
        .any(|e| matches!(e, Event::Desc(lo, hi) if lo & 0x3f == 0x32 && hi & (1 << 6) == 0));
    assert!(has_ih0_psi);
    assert!(g.is_empty());
}

#[test]
fn gather_batches_many_unmaps_into_one_flush() {
    let (mut mem, hw, mut unit, dom, mut g) = attached();
    map_flushed(&mut unit, &mut mem, &dom, &mut g, 0, 0x100_0000, 0x10_0000);
    for p in 0..64u64 {
        assert!(hw.dma(EDU.0, p * 4096, false).is_ok());
    }
    let before = hw.state().events.len();
    for p in (0..64u64).rev() {
        dom.unmap(&mem, p * 4096, 4096, &mut g).unwrap();
    }
    let f = unit.flush(&mut mem, &mut g).unwrap();
    assert_eq!(f.invalidations, 1);
    assert_eq!(f.unmapped.len(), 64);
    assert_eq!(f.unmapped[0], 63 * 4096..64 * 4096);
    let s = hw.state();
    let descs: Vec<(u64, u64)> = s.events[before..]
        .iter()
        .filter_map(|e| {
            if let Event::Desc(l, h) = e {
                Some((*l, *h))
            } else {
                None
            }
        })
        .collect();
    // One PSI of 64 pages, then one wait.
    assert_eq!(descs.len(), 2);
    assert_eq!(descs[0].1 & 0x3f, 6);
    assert_eq!(descs[1].0 & 0xf, 5);
    drop(s);
    for p in 0..64u64 {
        assert!(hw.dma(EDU.0, p * 4096, false).is_err());
        drain(&mut unit);
    }
    assert!(hw.dma(EDU.0, 64 * 4096, false).is_ok());
}

#[test]
fn register_based_invalidation_without_qi() {
    let (mut mem, hw, mut unit) = setup_with(QEMU_CAP, QEMU_ECAP & !2);
    unit.enable(&mut mem).unwrap();
    assert!(!unit.queued_invalidation());
    assert!(!hw.state().events.iter().any(|e| matches!(e, Event::Iqa(_))));
    let dom = unit.create_domain(&mut mem).unwrap();
    unit.attach(&mut mem, &dom, EDU).unwrap();
    let mut g = dom.gather();
    map_rw(&dom, &mem, &mut g, 0x20_0000, 0x20_0000, 0x20_0000);
    assert_eq!(dom.translate(&mem, 0x20_0000).unwrap().page_size, 0x20_0000);
    unit.flush(&mut mem, &mut g).unwrap();
    assert!(hw.dma(EDU.0, 0x21_0000, true).is_ok());
    dom.unmap(&mem, 0x20_0000, 0x20_0000, &mut g).unwrap();
    unit.flush(&mut mem, &mut g).unwrap();
    let page = IotlbGranularity::Page {
        did: dom.id(),
        addr: 0x20_0000,
        am: 9,
        ih: true,
    };
    assert!(hw
        .state()
        .events
        .contains(&Event::Iotlb(iotlb_reg::encode(page, true, true))));
    assert_eq!(hw.dma(EDU.0, 0x21_0000, true), Err(5));
    assert!(unit.invalidation_stats().register_invalidations >= 3);
    no_errors(&hw);
}

#[test]
fn caching_mode_invalidates_new_mappings_and_attach() {
    let (mut mem, hw, mut unit, dom, _) = attached_with(QEMU_CAP | (1 << 7), QEMU_ECAP);
    let dev0 = crate::inval::Descriptor::context_cache(ContextGranularity::Device {
        did: 0,
        sid: EDU.0,
        fm: 0,
    });
    assert!(hw.state().events.contains(&Event::Desc(dev0.lo, dev0.hi)));
    // The device touches the IOVA before it is mapped: the model caches "not present".
    assert!(hw.dma(EDU.0, 0x3000, false).is_err());
    drain(&mut unit);
    let mut g = dom.gather();
    map_rw(&dom, &mem, &mut g, 0x3000, 0x7000, 0x1000);
    assert!(
        hw.dma(EDU.0, 0x3000, false).is_err(),
        "not-present entry still cached"
    );
    drain(&mut unit);
    let f = unit.flush(&mut mem, &mut g).unwrap();
    assert_eq!(f.invalidations, 1);
    assert!(f.unmapped.is_empty());
    assert_eq!(hw.dma(EDU.0, 0x3000, false), Ok(0x7000));
}

#[test]
fn invalidation_queue_error_is_recovered() {
    let (mut mem, hw, mut unit, dom, mut g) = attached();
    map_flushed(&mut unit, &mut mem, &dom, &mut g, 0x5000, 0x7000, 0x1000);
    assert!(hw.dma(EDU.0, 0x5000, false).is_ok());
    dom.unmap(&mem, 0x5000, 0x1000, &mut g).unwrap();
    hw.state().reject_type = Some(2);
    unit.flush(&mut mem, &mut g).unwrap();
    assert_eq!(unit.invalidation_stats().iqe_recovered, 1);
    // The PSI was replaced by a global IOTLB invalidation: the stale entry is gone.
    let global = crate::inval::Descriptor::iotlb(IotlbGranularity::Global, false, false);
    assert!(hw
        .state()
        .events
        .contains(&Event::Desc(global.lo, global.hi)));
    assert_eq!(hw.dma(EDU.0, 0x5000, false), Err(6));
    assert_eq!(hw.state().fsts & 0x10, 0, "IQE cleared");
    // A refused wait descriptor is reported, not waited for until the timeout.
    hw.state().reject_type = Some(5);
    assert!(
        unit.flush(&mut mem, &mut dom.gather()).is_ok(),
        "empty gather does nothing"
    );
    map_rw(&dom, &mem, &mut g, 0x5000, 0x7000, 0x1000);
    dom.unmap(&mem, 0x5000, 0x1000, &mut g).unwrap();
    assert!(matches!(
        unit.flush(&mut mem, &mut g),
        Err(Error::InvalidationQueue { .. })
    ));
    assert_eq!(
        g.unmapped().to_vec(),
        vec![0x5000..0x6000],
        "nothing released after a failed flush"
    );
}

#[test]
fn gcmd_writes_keep_translation_and_qi_on_with_rwbf() {
    let (mut mem, hw, mut unit, dom, mut g) = attached_with(QEMU_CAP | (1 << 4), QEMU_ECAP);
    map_flushed(&mut unit, &mut mem, &dom, &mut g, 0x5000, 0x7000, 0x1000);
    let s = hw.state();
    let wbf = (GlobalCommand::WBF | GlobalCommand::TE | GlobalCommand::QIE).bits();
    assert!(s.events.iter().filter(|e| **e == Event::Gcmd(wbf)).count() >= 2);
    let on = (GlobalStatus::TES | GlobalStatus::QIES).bits();
    assert_eq!(s.gsts & on, on);
}

#[test]
fn four_level_tables_with_48_bit_width() {
    let cap48 = (QEMU_CAP & !(0x1f << 8) & !(0x3f << 16)) | (0b110 << 8) | (47 << 16);
    let (mut mem, hw, mut unit) = setup_with(cap48, QEMU_ECAP);
    assert_eq!(unit.levels(), PagingLevels::Four);
    unit.enable(&mut mem).unwrap();
    let dom = unit.create_domain(&mut mem).unwrap();
    unit.attach(&mut mem, &dom, EDU).unwrap();
    let mut g = dom.gather();
    map_rw(&dom, &mem, &mut g, 0x80_0000_0000, 0x1000, 0x1000);
    unit.flush(&mut mem, &mut g).unwrap();
    assert_eq!(hw.dma(EDU.0, 0x80_0000_0010, true), Ok(0x1010));
    // A 3-level choice can be forced when SAGAW has it.
    let mut cfg = UnitConfig::new(1);
    cfg.levels = Some(PagingLevels::Three);
    let u3 = Unit::new(
        FakeUnit::new(&mem, cap48, QEMU_ECAP),
        FakeClock::new(1),
        cfg,
    )
    .unwrap();
    assert_eq!(u3.levels(), PagingLevels::Three);
    cfg.levels = Some(PagingLevels::Four);
    let r = Unit::new(FakeUnit::qemu(&mem), FakeClock::new(1), cfg);
    assert!(matches!(r, Err(Error::Unsupported(_))));
}

#[test]
fn detach_blocks_and_destroy_frees_everything() {
    let (mut mem, hw, mut unit) = setup();
    unit.enable(&mut mem).unwrap();
    let base = mem.live_frames();
    let dom = unit.create_domain(&mut mem).unwrap();
    let other = unit.create_domain(&mut mem).unwrap();
    assert_ne!(dom.id(), other.id());
    unit.attach(&mut mem, &dom, EDU).unwrap();
    assert_eq!(
        unit.attach(&mut mem, &other, EDU),
        Err(Error::AlreadyAttached(EDU))
    );
    assert_eq!(
        unit.detach(&mut mem, &other, EDU),
        Err(Error::NotAttached(EDU))
    );
    let mut g = dom.gather();
    map_flushed(&mut unit, &mut mem, &dom, &mut g, 0, 0x10_0000, 0x40_0000);
    assert!(hw.dma(EDU.0, 0x1000, true).is_ok());
    let dom = match unit.destroy_domain(&mut mem, dom) {
        Err((d, Error::DomainInUse { devices: 1 })) => d,
        r => panic!("{r:?}"),
    };
    unit.detach(&mut mem, &dom, EDU).unwrap();
    assert_eq!(hw.dma(EDU.0, 0x1000, true), Err(2));
    assert_eq!(unit.attached_domain(EDU), None);
    unit.destroy_domain(&mut mem, dom).unwrap();
    unit.destroy_domain(&mut mem, other).unwrap();
    // Only the context table page created for bus 0 remains.
    assert_eq!(mem.live_frames(), base + 1);
    // The other unit's domain is refused.
    let (mut mem2, _hw2, mut unit2) = setup();
    let mut cfg = UnitConfig::new(7);
    cfg.timeout_ns = 1_000_000;
    let mut foreign = Unit::new(FakeUnit::qemu(&mem2), FakeClock::new(1), cfg).unwrap();
    let fd = foreign.create_domain(&mut mem2).unwrap();
    assert_eq!(unit2.attach(&mut mem2, &fd, EDU), Err(Error::WrongDomain));
}

#[test]
fn fault_storm_is_bounded_and_counted() {
    let (mut mem, hw, mut unit) = setup();
    unit.enable(&mut mem).unwrap();
    let dom = unit.create_domain(&mut mem).unwrap();
    let devs: Vec<SourceId> = (3..6).map(|d| SourceId::new(0, d, 0)).collect();
    for d in &devs {
        unit.attach(&mut mem, &dom, *d).unwrap();
    }
    let mut seen = 0;
    for round in 0..200u64 {
        for d in &devs {
            let _ = hw.dma(d.0, 0x1000 * round, true);
            let _ = hw.dma(d.0, 0x1000 * round, true);
        }
        if round % 3 == 0 {
            let p = unit.poll_faults(1, |_| seen += 1);
            assert!(p.drained <= 1);
        }
    }
    for _ in 0..16 {
        if unit.poll_faults(1, |_| seen += 1).drained == 0 {
            break;
        }
    }
    let s = hw.state();
    assert!(s.faults_overflowed > 0);
    assert_eq!(unit.fault_counters().recorded, s.faults_recorded);
    assert_eq!(seen, s.faults_recorded);
    assert!(unit.fault_counters().dropped > 0);
    assert_eq!(unit.fault_counters().domain(dom.id()), s.faults_recorded);
    assert_eq!(s.fsts & 3, 0, "PPF and PFO clear after draining");
}

#[test]
fn several_records_drained_from_fri_with_budget() {
    // NFR = 4 records.
    let cap = (QEMU_CAP & !(0xff << 40)) | (3 << 40);
    let (mut mem, hw, mut unit) = setup_with(cap, QEMU_ECAP);
    unit.enable(&mut mem).unwrap();
    for d in 0..4 {
        assert!(hw.dma(SourceId::new(2, d, 0).0, 0x1000, false).is_err());
    }
    let mut got = Vec::new();
    let p = unit.poll_faults(3, |r| got.push(r.source));
    assert_eq!((p.drained, p.more), (3, true));
    let p = unit.poll_faults(3, |r| got.push(r.source));
    assert_eq!((p.drained, p.more), (1, false));
    assert_eq!(
        got,
        (0..4).map(|d| SourceId::new(2, d, 0)).collect::<Vec<_>>()
    );
    // FRI moved on: the next fault lands in record 0 again, is found and drained.
    assert!(hw.dma(SourceId::new(2, 9, 0).0, 0x1000, true).is_err());
    assert_eq!(drain(&mut unit)[0].index, 0);
}

#[test]
fn fault_interrupt_programming() {
    let (mut mem, hw, mut unit) = setup();
    unit.enable(&mut mem).unwrap();
    assert_eq!(hw.state().fectl, 1 << 31, "masked after bring-up");
    unit.configure_fault_interrupt(0xfee0_0000, 0x41);
    let s = hw.state();
    assert_eq!(
        (s.feaddr, s.feuaddr, s.fedata, s.fectl),
        (0xfee0_0000, 0, 0x41, 0)
    );
    drop(s);
    unit.set_fault_interrupt_masked(true);
    assert_eq!(hw.state().fectl, 1 << 31);
}

mod model {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Clone, Debug)]
    enum Op {
        Map {
            page: u64,
            pages: u64,
            phys: u64,
            write: bool,
        },
        Unmap {
            page: u64,
            pages: u64,
        },
        Dma {
            page: u64,
        },
        /// Unmaps exactly the n-th live mapping (modulo their number).
        UnmapNth(usize),
        Flush,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u64..1024, 1u64..600, 0u64..2048, any::<bool>()).prop_map(|(page, pages, phys, write)| {
                // Favour 2 MiB alignment so superpages appear.
                let (page, phys) = if page % 4 == 0 { (page & !511, phys & !511) } else { (page, phys) };
                Op::Map { page, pages, phys, write }
            }),
            // Small mappings, as DMA clients make them: tables shared by several mappings.
            2 => (0u64..1024, 1u64..4, 0u64..2048, any::<bool>())
                .prop_map(|(page, pages, phys, write)| Op::Map { page, pages, phys, write }),
            3 => (0u64..1024, 1u64..600).prop_map(|(page, pages)| Op::Unmap { page, pages }),
            2 => any::<usize>().prop_map(Op::UnmapNth),
            3 => (0u64..1100).prop_map(|page| Op::Dma { page }),
            1 => Just(Op::Flush),
        ]
    }

    const WINDOW: u64 = 1100;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Whatever the sequence of maps, unmaps and DMAs (which fill the model IOTLB), after
        /// every flush each page of the window translates exactly as the reference model
        /// says: the planned invalidations always cover what changed, in every mode.
        #[test]
        fn after_each_flush_hardware_matches_model(
            ops in proptest::collection::vec(op(), 1..30),
            qi in any::<bool>(),
            cm in any::<bool>(),
            max_blocks in 1usize..20,
        ) {
            let cap = if cm { QEMU_CAP | (1 << 7) } else { QEMU_CAP };
            let ecap = if qi { QEMU_ECAP } else { QEMU_ECAP & !2 };
            let mem = FakeMemory::new(8192);
            let hw = FakeUnit::new(&mem, cap, ecap);
            let mut cfg = UnitConfig::new(0);
            cfg.max_psi_blocks = max_blocks;
            let mut unit = Unit::new(hw.clone(), FakeClock::new(1000), cfg).unwrap();
            let mut mem = mem;
            unit.enable(&mut mem).unwrap();
            let dom = unit.create_domain(&mut mem).unwrap();
            unit.attach(&mut mem, &dom, EDU).unwrap();
            let mut g = dom.gather();
            let mut model: BTreeMap<u64, (u64, bool)> = BTreeMap::new();
            let mut outstanding: Vec<std::ops::Range<u64>> = Vec::new();
            // Ranges of failed maps, invalidated by the next flush.
            let mut dirty: Vec<std::ops::Range<u64>> = Vec::new();
            let mut maps: Vec<(u64, u64)> = Vec::new();
            for op in ops.into_iter().chain([Op::Flush]) {
                let op = match op {
                    Op::UnmapNth(n) if !maps.is_empty() => {
                        let (page, pages) = maps[n % maps.len()];
                        Op::Unmap { page, pages }
                    }
                    Op::UnmapNth(_) => Op::Flush,
                    op => op,
                };
                match op {
                    Op::UnmapNth(_) => unreachable!(),
                    Op::Map { page, pages, phys, write } => {
                        let access = if write { RW } else { Access::READ };
                        let r = dom.map(&mem, page << 12, PhysAddr::new(phys << 12), pages << 12, access, &mut g);
                        let range = (page << 12)..((page + pages) << 12);
                        if r.is_ok() {
                            for i in 0..pages {
                                model.insert(page + i, (phys + i, write));
                            }
                            maps.push((page, pages));
                            // Without caching mode a new mapping is live at once, before
                            // any flush, unless it reuses IOVAs still pending in the gather
                            // (which a real caller never does: its allocator holds them).
                            let pending = outstanding.iter().chain(&dirty)
                                .any(|o| o.start < range.end && range.start < o.end);
                            if !cm && !pending {
                                for p in [page, page + pages - 1] {
                                    let want = ((phys + p - page) << 12) | 0x10;
                                    prop_assert_eq!(hw.dma(EDU.0, (p << 12) | 0x10, false), Ok(want),
                                        "fresh mapping at page {:#x}", p);
                                }
                            }
                        } else {
                            dirty.push(range);
                        }
                    }
                    Op::Unmap { page, pages } => {
                        if dom.unmap(&mem, page << 12, pages << 12, &mut g).is_ok() {
                            for p in page..page + pages {
                                prop_assert!(model.remove(&p).is_some());
                            }
                            maps.retain(|&(p, n)| p + n <= page || p >= page + pages);
                            outstanding.push((page << 12)..((page + pages) << 12));
                        }
                    }
                    Op::Dma { page } => {
                        let _ = hw.dma(EDU.0, page << 12, false);
                        unit.poll_faults(4, |_| {});
                    }
                    Op::Flush => {
                        let f = unit.flush(&mut mem, &mut g).unwrap();
                        prop_assert_eq!(&f.unmapped, &outstanding);
                        outstanding.clear();
                        dirty.clear();
                        for p in 0..WINDOW {
                            let got = hw.dma(EDU.0, (p << 12) | 0x18, true);
                            let want = match model.get(&p) {
                                Some(&(phys, true)) => Ok((phys << 12) | 0x18),
                                _ => Err(5),
                            };
                            prop_assert_eq!(got, want, "page {:#x}", p);
                            unit.poll_faults(4, |_| {});
                        }
                    }
                }
            }
            prop_assert!(hw.state().errors.is_empty(), "{:?}", hw.state().errors);
            prop_assert!(mem.unflushed_writes().is_empty());
        }
    }
}

#[test]
fn explicit_domain_and_global_invalidation_drop_stale_entries() {
    let (mut mem, hw, mut unit, dom, mut g) = attached();
    map_flushed(&mut unit, &mut mem, &dom, &mut g, 0x5000, 0x7000, 0x2000);
    assert!(hw.dma(EDU.0, 0x5000, false).is_ok());
    assert!(hw.dma(EDU.0, 0x6000, false).is_ok());
    dom.unmap(&mem, 0x5000, 0x1000, &mut g).unwrap();
    assert!(hw.dma(EDU.0, 0x5000, false).is_ok(), "stale");
    unit.invalidate_domain(&mut mem, dom.id()).unwrap();
    assert_eq!(hw.dma(EDU.0, 0x5000, false), Err(6));
    drain(&mut unit);
    // The gather still owns the IOVA until it is flushed.
    assert_eq!(g.unmapped().len(), 1);
    assert!(hw.dma(EDU.0, 0x6000, false).is_ok(), "cached again");
    dom.unmap(&mem, 0x6000, 0x1000, &mut g).unwrap();
    assert!(hw.dma(EDU.0, 0x6000, false).is_ok(), "stale");
    unit.invalidate_all(&mut mem).unwrap();
    assert_eq!(hw.dma(EDU.0, 0x6000, false), Err(6));
    assert_eq!(unit.flush(&mut mem, &mut g).unwrap().unmapped.len(), 2);
}

#[test]
fn stalled_queue_is_never_overwritten() {
    let (mut mem, hw, mut unit, dom, mut g) = attached();
    map_rw(&dom, &mem, &mut g, 0x5000, 0x7000, 0x1000);
    dom.unmap(&mem, 0x5000, 0x1000, &mut g).unwrap();
    hw.state().ignore_waits = true;
    assert!(unit.flush(&mut mem, &mut g).is_err());
    let (iqa, head) = {
        let s = hw.state();
        (s.iqa & !0xfff, s.iqh as u64)
    };
    let stuck = mem.peek_u64(iqa + head * 16);
    assert_eq!(
        stuck & 0xf,
        5,
        "the hardware stopped at the wait descriptor"
    );
    let mut errors = 0;
    for _ in 0..300 {
        // The hardware stopped at the first flush's wait; behind it 254 slots are free and
        // each failed flush leaves two more descriptors: 127 fit, then the queue is full.
        let e = unit.flush(&mut mem, &mut g).unwrap_err();
        let want = if errors < 127 {
            Operation::InvalidationWait
        } else {
            Operation::InvalidationQueueSpace
        };
        assert_eq!(e, Error::Timeout(want), "after {errors} flushes");
        errors += 1;
        assert_eq!(
            mem.peek_u64(iqa + head * 16),
            stuck,
            "after {errors} flushes"
        );
    }
    assert_eq!(g.unmapped().to_vec(), vec![0x5000..0x6000]);
}

#[test]
fn queue_head_is_read_about_once_per_lap() {
    let (mut mem, hw, mut unit, dom, mut g) = attached();
    let reads0 = hw.state().iqh_reads;
    // Each flush queues one invalidation and one wait: 2 of the 256 slots.
    for i in 0..1000u64 {
        map_rw(&dom, &mem, &mut g, 0x5000, 0x7000, 0x1000);
        dom.unmap(&mem, 0x5000, 0x1000, &mut g).unwrap();
        assert_eq!(
            unit.flush(&mut mem, &mut g).unwrap().invalidations,
            1,
            "flush {i}"
        );
    }
    let reads = hw.state().iqh_reads - reads0;
    // 2000 descriptors are ~8 laps of the queue.
    assert!(
        (1..=16).contains(&reads),
        "{reads} IQH reads for 1000 flushes"
    );
    assert!(hw.state().errors.is_empty(), "{:?}", hw.state().errors);
}

/// Exactly one IOTLB descriptor, invalidating leaves only (IH = 1).
fn assert_one_leaf_only(d: &[(u64, u64)]) {
    let one_leaf_only = matches!(d, [(_, hi)] if hi & (1 << 6) != 0);
    assert!(
        one_leaf_only,
        "want one leaf-only (IH = 1) invalidation: {d:x?}"
    );
}

/// Flushes `g`: what the flush did and the IOTLB invalidation descriptors (lo, hi) it issued.
fn flush_iotlb(
    unit: &mut TestUnit,
    mem: &mut FakeMemory,
    hw: &FakeUnit,
    g: &mut Gather,
) -> (Flushed, Vec<(u64, u64)>) {
    let from = hw.state().events.len();
    let f = unit.flush(mem, g).unwrap();
    let d = hw.state().events[from..]
        .iter()
        .filter_map(|e| match e {
            Event::Desc(lo, hi) if lo & 0xf == 2 => Some((*lo, *hi)),
            _ => None,
        })
        .collect();
    (f, d)
}

/// Issue 9, defect 2. The only mapping of a leaf table is unmapped while other IOVAs of its
/// 2 MiB span stay free; before the (deferred) flush a new IOVA of that span is mapped. The
/// old driver unlinked the emptied tables at the unmap and linked fresh ones for the new map
/// without any invalidation (CM = 0): a unit whose paging-structure cache still held the old
/// directory entries walked the old, empty table and faulted on the live mapping. Now the
/// emptied tables stay linked and the new mapping goes into them.
#[test]
fn map_into_emptied_table_before_flush_translates_through_cached_directories() {
    let (mut mem, hw, mut unit, dom, mut g) = attached();
    map_rw(&dom, &mem, &mut g, 0x1000, 0x5000_0000, 0x1000);
    unit.flush(&mut mem, &mut g).unwrap();
    // The device uses it: the unit caches the leaf and the directory entries of the walk.
    assert_eq!(hw.dma(EDU.0, 0x1000, true), Ok(0x5000_0000));
    assert!(!hw.state().dir_cache.is_empty());
    let tables = dom.tables().table_pages();
    dom.unmap(&mem, 0x1000, 0x1000, &mut g).unwrap();
    // Before the flush (deferred), a new IOVA of the same span is mapped and used.
    map_rw(&dom, &mem, &mut g, 0x5000, 0x6000_0000, 0x1000);
    let hits = hw.state().dir_cache_hits;
    assert_eq!(hw.dma(EDU.0, 0x5008, true), Ok(0x6000_0008));
    assert!(
        hw.state().dir_cache_hits > hits,
        "the walk used cached directory entries"
    );
    assert_eq!(
        g.pending_tables(),
        0,
        "the unmap did not cover a table's span"
    );
    assert_eq!(dom.tables().table_pages(), tables);
    let (f, d) = flush_iotlb(&mut unit, &mut mem, &hw, &mut g);
    assert_eq!(f.unmapped, vec![0x1000..0x2000]);
    assert_eq!(f.tables_freed, 0);
    // Only a leaf went away: leaf-only invalidation (IH = 1).
    assert_one_leaf_only(&d);
    assert_eq!(hw.dma(EDU.0, 0x1000, true), Err(5));
    drain(&mut unit);
    assert_eq!(hw.dma(EDU.0, 0x5000, true), Ok(0x6000_0000));
    no_errors(&hw);
}

/// An unmap covering a leaf table's whole span unlinks it; the flush must then drop the
/// cached directory entry pointing to it (IH = 0) before freeing it: with IH = 1 the next
/// walk would read the freed (poisoned) frame and the fake memory would panic.
#[test]
fn table_unlinked_by_a_whole_span_unmap_is_invalidated_with_ih0_before_it_is_freed() {
    let (mut mem, hw, mut unit, dom, mut g) = attached();
    // 2 MiB of 4 KiB pages (the physical address rules out a superpage).
    map_rw(&dom, &mem, &mut g, 0x20_0000, 0x9000_1000, 0x20_0000);
    // And a neighbour in the same 1 GiB, so the level-2 table stays.
    map_rw(&dom, &mem, &mut g, 0x40_0000, 0x7000_0000, 0x1000);
    unit.flush(&mut mem, &mut g).unwrap();
    assert!(hw.dma(EDU.0, 0x20_0000, true).is_ok());
    assert!(hw.dma(EDU.0, 0x3f_f000, true).is_ok());
    dom.unmap(&mem, 0x20_0000, 0x20_0000, &mut g).unwrap();
    assert_eq!(g.pending_tables(), 1);
    let (f, d) = flush_iotlb(&mut unit, &mut mem, &hw, &mut g);
    assert_eq!(f.tables_freed, 1);
    assert!(!d.is_empty());
    assert!(d.iter().all(|(_, hi)| hi & (1 << 6) == 0), "IH = 0: {d:x?}");
    // The freed table is poisoned; these walks must not reach it.
    for iova in [0x20_0000, 0x2a_b000, 0x3f_f000] {
        assert_eq!(hw.dma(EDU.0, iova, true), Err(5));
        drain(&mut unit);
    }
    assert_eq!(hw.dma(EDU.0, 0x40_0000, true), Ok(0x7000_0000));
    // The span can be mapped again (a fresh table).
    map_rw(&dom, &mem, &mut g, 0x20_0000, 0x9000_1000, 0x1000);
    unit.flush(&mut mem, &mut g).unwrap();
    assert_eq!(hw.dma(EDU.0, 0x20_0000, true), Ok(0x9000_1000));
}

/// Issue 9, defect 3. A device walks the tables while a map is in progress (it reads an
/// IOVA the map just wrote); the map then fails (out of frames) and is rolled back. The old
/// rollback unlinked the leaf table it had emptied and handed it to the gather: a map of
/// another IOVA of the same span before the flush linked a fresh table behind the cached
/// directory entry, and the live mapping faulted (and the table leaked when the gather was
/// dropped). Now the rollback keeps the table linked, holds no table page for the flush and
/// records only a leaf invalidation of the rolled-back range.
#[test]
fn failed_map_rollback_keeps_tables_and_records_a_leaf_invalidation() {
    let (mut mem, hw, mut unit, dom, mut g) = attached();
    // A mapping elsewhere in the first 1 GiB, so the level-2 table exists.
    map_rw(&dom, &mem, &mut g, 0x40_0000, 0x7000_0000, 0x1000);
    unit.flush(&mut mem, &mut g).unwrap();
    let tables = dom.tables().table_pages();
    // The map of [0x1fe000, 0x201000) allocates the leaf table of [0, 2M), writes two
    // leaves, then asks for the leaf table of [2M, 4M): the device reads 0x1fe000 right
    // then, and the allocation fails.
    let (hw2, seen) = (hw.clone(), std::rc::Rc::new(std::cell::Cell::new(None)));
    let (seen2, mut calls) = (seen.clone(), 0);
    mem.set_alloc_hook(move || {
        calls += 1;
        if calls == 2 {
            seen2.set(Some(hw2.dma(EDU.0, 0x1f_e000, false)));
            return true;
        }
        false
    });
    let r = dom.map(
        &mem,
        0x1f_e000,
        PhysAddr::new(0x8000_0000),
        0x3000,
        RW,
        &mut g,
    );
    mem.0.borrow_mut().alloc_hook = None;
    assert_eq!(r, Err(Error::NoMemory));
    assert_eq!(seen.get(), Some(Ok(0x8000_0000)), "the device saw the leaf");
    assert!(dom.translate(&mem, 0x1f_e000).is_none());
    assert!(g.unmapped().is_empty());
    assert!(
        !g.is_empty(),
        "the rolled-back leaves still need an invalidation"
    );
    // Before any flush, another IOVA of the same span is mapped and used.
    map_rw(&dom, &mem, &mut g, 0x10_0000, 0x6000_0000, 0x1000);
    assert_eq!(hw.dma(EDU.0, 0x10_0000, true), Ok(0x6000_0000));
    assert_eq!(g.pending_tables(), 0, "no table page handed to the gather");
    assert_eq!(
        dom.tables().table_pages(),
        tables + 1,
        "the new table stays linked"
    );
    // The flush invalidates the rolled-back leaves (the device's cached translation of
    // 0x1fe000 goes away), leaf-only, and frees nothing.
    let (f, d) = flush_iotlb(&mut unit, &mut mem, &hw, &mut g);
    assert_eq!((f.tables_freed, f.unmapped.len()), (0, 0));
    assert_one_leaf_only(&d);
    assert_eq!(hw.dma(EDU.0, 0x1f_e000, false), Err(6));
    drain(&mut unit);
    assert_eq!(hw.dma(EDU.0, 0x10_0000, true), Ok(0x6000_0000));
    no_errors(&hw);
    // Nothing leaked: teardown frees every page, the kept ones included.
    unit.detach(&mut mem, &dom, EDU).unwrap();
    let live = mem.live_frames();
    let n = dom.tables().table_pages();
    unit.destroy_domain(&mut mem, dom).unwrap();
    assert_eq!(mem.live_frames(), live - n);
}

/// Teardown: after the last unmap, `release_empty_tables` hands every emptied table to the
/// gather and the flush frees them (table pages back to the empty domain's one root).
#[test]
fn release_empty_tables_at_teardown() {
    let (mut mem, hw, mut unit, dom, _) = attached();
    let baseline = dom.tables().table_pages();
    let live = mem.live_frames();
    let mut g = dom.gather();
    for i in 0..8u64 {
        map_rw(
            &dom,
            &mem,
            &mut g,
            i * 0x3_3000,
            0x5000_0000 + i * 0x1000,
            0x1000,
        );
    }
    unit.flush(&mut mem, &mut g).unwrap();
    for i in 0..8u64 {
        assert!(hw.dma(EDU.0, i * 0x3_3000, true).is_ok());
    }
    for i in 0..8u64 {
        dom.unmap(&mem, i * 0x3_3000, 0x1000, &mut g).unwrap();
    }
    assert!(dom.tables().table_pages() > baseline);
    let mut wrong = crate::gather::Gather::new(0, dom.id() + 1);
    assert_eq!(
        dom.release_empty_tables(&mem, &mut wrong),
        Err(Error::WrongDomain)
    );
    let n = dom.release_empty_tables(&mem, &mut g).unwrap();
    assert_eq!(n, 2);
    assert_eq!(dom.tables().table_pages(), baseline);
    let f = unit.flush(&mut mem, &mut g).unwrap();
    assert_eq!(f.tables_freed, 2);
    assert_eq!(mem.live_frames(), live);
    // The cached directory entries went with the IH = 0 flush: no walk reaches a freed page.
    for i in 0..8u64 {
        assert_eq!(hw.dma(EDU.0, i * 0x3_3000, true), Err(5));
        drain(&mut unit);
    }
}

/// Issue 9 (item 10): queued invalidation was turned off without waiting for IQH == IQT. A
/// flush whose wait timed out on a slow unit leaves descriptors in the queue; `disable` must
/// let the unit consume them (bounded) before clearing QIE. The model refuses (and records)
/// a QIE clear with a non-empty queue, as the specification forbids it.
#[test]
fn disable_waits_for_the_queue_to_drain() {
    let (mut mem, hw, mut unit, dom, mut g) = attached();
    map_flushed(&mut unit, &mut mem, &dom, &mut g, 0x5000, 0x7000, 0x1000);
    dom.unmap(&mem, 0x5000, 0x1000, &mut g).unwrap();
    // A slow unit: one descriptor per 700 register reads; the flush polls ~1000 times.
    hw.state().queue_delay = 700;
    assert_eq!(
        unit.flush(&mut mem, &mut g),
        Err(Error::Timeout(Operation::InvalidationWait))
    );
    {
        let s = hw.state();
        assert_ne!(s.iqh, s.iqt, "the queue has not drained yet");
    }
    unit.disable().unwrap();
    let s = hw.state();
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert_eq!(s.iqh, s.iqt);
    assert_eq!(s.gsts & (GlobalStatus::TES | GlobalStatus::QIES).bits(), 0);
    drop(s);
    assert!(!unit.queued_invalidation());
    // A hung queue never drains: disable reports it and leaves QI on (translation is off).
    let (mut mem, hw, mut unit) = setup();
    unit.enable(&mut mem).unwrap();
    let dom = unit.create_domain(&mut mem).unwrap();
    let mut g = dom.gather();
    map_rw(&dom, &mem, &mut g, 0x5000, 0x7000, 0x1000);
    dom.unmap(&mem, 0x5000, 0x1000, &mut g).unwrap();
    hw.state().ignore_waits = true;
    assert!(unit.flush(&mut mem, &mut g).is_err());
    assert_eq!(
        unit.disable(),
        Err(Error::Timeout(Operation::InvalidationQueueDrain))
    );
    assert!(unit.queued_invalidation());
    assert!(!unit.is_enabled());
    let s = hw.state();
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert_eq!(s.gsts & GlobalStatus::TES.bits(), 0);
}

/// The split flush of concurrent callers: two submissions outstanding at once, each with its
/// own status word, written only when the queue reached it (the fake runs descriptors some
/// register reads after the IQT write); nothing is released before `flush_release`, the
/// stale translations stay usable until the status is written, and a refused wait
/// descriptor is reported to its waiter by `queue_check`.
#[test]
fn split_flush_per_waiter_status_words() {
    let (mut mem, hw, mut unit, dom, _) = attached();
    let (mut ga, mut gb) = (dom.gather(), dom.gather());
    // A whole 2 MiB leaf table for A (4 KiB pages: the physical range is not 2 MiB
    // aligned; unlinked by its unmap), one page for B.
    map_rw(&dom, &mem, &mut ga, 0x40_0000, 0x5000_1000, 0x20_0000);
    map_rw(&dom, &mem, &mut gb, 0x10_0000, 0x6000_0000, 0x1000);
    unit.flush(&mut mem, &mut ga).unwrap();
    unit.flush(&mut mem, &mut gb).unwrap();
    assert_eq!(hw.dma(EDU.0, 0x40_0000, false), Ok(0x5000_1000));
    assert_eq!(hw.dma(EDU.0, 0x10_0000, false), Ok(0x6000_0000));
    dom.unmap(&mem, 0x40_0000, 0x20_0000, &mut ga).unwrap();
    dom.unmap(&mem, 0x10_0000, 0x1000, &mut gb).unwrap();
    assert_eq!(ga.pending_tables(), 1);
    let status = mem.alloc_frame().unwrap();
    let (sa, sb) = (status, status + 64);
    hw.state().queue_delay = 3;
    let waits = unit.invalidation_stats().waits;
    let Submitted::Queued(qa) = unit.flush_submit(&mut mem, &mut ga, sa, 5).unwrap() else {
        panic!("queued invalidation: the flush is queued")
    };
    let Submitted::Queued(qb) = unit.flush_submit(&mut mem, &mut gb, sb, 9).unwrap() else {
        panic!("queued invalidation: the flush is queued")
    };
    assert_eq!((qa.invalidations, qb.invalidations), (1, 1));
    // Not yet run: the stale translations still work, nothing was released.
    assert_ne!(mem.read_u32(sa), 5);
    assert_eq!(hw.dma(EDU.0, 0x10_0000, false), Ok(0x6000_0000));
    assert_eq!(ga.pending_tables(), 1);
    // Each waiter polls its own word (register reads let the fake's queue advance).
    let mut polls = 0;
    while mem.read_u32(sb) != 9 {
        unit.queue_check(&mut mem, &qb).unwrap();
        polls += 1;
        assert!(polls < 100, "B's status word never written");
    }
    // The queue runs in order: A's wait came first.
    assert_eq!(mem.read_u32(sa), 5);
    unit.queue_check(&mut mem, &qa).unwrap();
    assert_eq!(hw.dma(EDU.0, 0x10_0000, false), Err(6));
    assert_eq!(hw.dma(EDU.0, 0x40_0000, false), Err(6));
    let fa = Unit::<FakeUnit, FakeClock>::flush_release(&mut mem, &mut ga, &qa);
    let fb = Unit::<FakeUnit, FakeClock>::flush_release(&mut mem, &mut gb, &qb);
    assert_eq!(fa.unmapped, vec![0x40_0000..0x60_0000]);
    assert_eq!((fa.tables_freed, fb.tables_freed), (1, 0));
    assert_eq!(fb.unmapped, vec![0x10_0000..0x10_1000]);
    assert!(ga.is_empty() && gb.is_empty());
    assert_eq!(unit.invalidation_stats().waits, waits + 2);

    // A refused wait descriptor: its waiter learns it from queue_check, the gather stays.
    hw.state().queue_delay = 0;
    map_rw(&dom, &mem, &mut gb, 0x10_0000, 0x6000_0000, 0x1000);
    unit.flush(&mut mem, &mut gb).unwrap();
    dom.unmap(&mem, 0x10_0000, 0x1000, &mut gb).unwrap();
    hw.state().reject_type = Some(crate::inval::desc_type::WAIT);
    let Submitted::Queued(q) = unit.flush_submit(&mut mem, &mut gb, sb, 10).unwrap() else {
        panic!("queued")
    };
    assert_ne!(mem.read_u32(sb), 10);
    assert!(matches!(
        unit.queue_check(&mut mem, &q),
        Err(Error::InvalidationQueue { .. })
    ));
    assert!(!gb.is_empty(), "nothing released after a failed wait");
    no_errors(&hw);
}
