//! VT-d hardware self-tests with the edu DMA engine (`selftest=vtd`, `selftest=vtd-storm`;
//! in every build: they only drive edu devices, which must not be assigned to anyone else). Every check looks at a real effect: bytes that arrived (or did not)
//! in RAM, fault records read from the unit, translations walked in the tables.
//!
//! Each check prints `vtd-test <name>: PASS|FAIL <details>`; the run fails if any check fails.

use alloc::string::ToString;
use alloc::vec::Vec;
use core::fmt;

use moat_dmar::{Dmar, NoBridges};
use moat_vtd::fault::{FaultAccess, FaultReason, FaultRecord};
use moat_vtd::{Access, Domain, SourceId};

use super::test_pages::{Frames, Page};
use super::with_unit;
use crate::discovery::{EcamAccess, PciDevice};
use crate::edu::{self, Direction, Edu};
use crate::mm::{frames, PhysAddr};

const PAGE: u64 = crate::mm::PAGE_SIZE;
/// Bytes per edu DMA (edu's buffer is 4 KiB and QEMU refuses a range that ends at its end).
const LEN: u64 = 2048;
const IOVA_A: u64 = 0x10_0000;
const IOVA_B: u64 = 0x20_0000;
const IOVA_HOLE: u64 = 0x30_0000;
const IOVA_HOLE_LOCKED: u64 = 0x31_0000;
const IOVA_HOLE_AFTER: u64 = 0x32_0000;
const IOVA_SUPER: u64 = 0x40_0000;
const IOVA_E: u64 = 0x50_0000;
const IOVA_RO: u64 = 0x70_0000;
const SUPER: u64 = 2 << 20;
const RW: Access = Access::READ.union(Access::WRITE);

struct Tally {
    passed: usize,
    failed: usize,
}

impl Tally {
    fn check(&mut self, name: &str, ok: bool, detail: fmt::Arguments<'_>) {
        if ok {
            self.passed += 1;
            crate::println!("vtd-test {name}: PASS {detail}");
        } else {
            self.failed += 1;
            crate::println!("vtd-test {name}: FAIL {detail}");
        }
    }
}

fn sid(e: &Edu) -> SourceId {
    SourceId::new(e.bdf.bus(), e.bdf.device(), e.bdf.function())
}

/// The byte at `i` of the test pattern with `seed` (never all-equal, never zero overall).
fn pattern_byte(i: usize, seed: u8) -> u8 {
    (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8
}

fn fill(p: Page<'_>, seed: u8) {
    for i in 0..PAGE {
        p.set(i, pattern_byte(i as usize, seed));
    }
}

/// Whether the DMA-covered part of page `p` holds exactly the pattern with `seed`.
fn holds_pattern(p: Page<'_>, seed: u8) -> bool {
    p.bytes(LEN)
        .enumerate()
        .all(|(i, b)| b == pattern_byte(i, seed))
}

/// FNV-1a over the DMA-covered part of page `p` (for the log; the checks compare bytes).
fn checksum(p: Page<'_>) -> u32 {
    p.bytes(LEN).fold(0x811c_9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    })
}

fn all_bytes(p: Page<'_>, v: u8) -> bool {
    p.bytes(PAGE).all(|b| b == v)
}

/// Faults of the unit at `base` drained so far (by the interrupt handler or, now, by polling).
fn drain(base: u64) -> Vec<FaultRecord> {
    while super::poll_faults(16) > 0 {}
    super::take_unit_faults(base).records
}

/// Faults of the unit at `base` already drained, without polling the unit.
fn drained_without_polling(base: u64) -> Vec<FaultRecord> {
    super::take_unit_faults(base).records
}

/// Spins with interrupts enabled until a fault event interrupt after the `seen`th was taken
/// (at most `timeout_us`). Returns whether one was.
fn wait_fault_interrupt(seen: u64, timeout_us: u64) -> bool {
    let d = crate::arch::tsc::deadline_us(timeout_us);
    crate::arch::x86::with_interrupts(|| {
        while super::FAULT_IRQS.load(core::sync::atomic::Ordering::Relaxed) == seen {
            if crate::arch::tsc::expired(d) {
                return false;
            }
            core::hint::spin_loop();
        }
        true
    })
}

fn has_fault(
    v: &[FaultRecord],
    s: SourceId,
    addr: u64,
    access: FaultAccess,
) -> Option<FaultRecord> {
    v.iter()
        .find(|r| r.source == s && r.address == addr & !0xfff && r.access == access)
        .copied()
}

fn fault_text(r: Option<FaultRecord>) -> FaultText {
    FaultText(r)
}

struct FaultText(Option<FaultRecord>);
impl fmt::Display for FaultText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(r) => write!(
                f,
                "fault source={} address={:#x} access={:?} reason={:?} domain={:?}",
                r.source, r.address, r.access, r.reason, r.domain
            ),
            None => f.write_str("no matching fault record"),
        }
    }
}

/// Finds the edu devices, their remapping unit, and runs the requested suite.
pub fn run(
    storm: bool,
    dmar: Option<&Dmar<'_>>,
    cfg: &EcamAccess<'_>,
    devices: &[PciDevice],
) -> bool {
    let edus: Vec<Edu> = devices
        .iter()
        .filter(|d| (d.vendor, d.device) == edu::ID)
        .filter_map(|d| {
            let bar0 = d.bars.get(0).filter(|b| b.is_memory())?;
            // SAFETY: `bar0` is the memory BAR0 of this edu as probed at discovery; the
            // self-test runs before any guest is started, so the hypervisor owns the device.
            match unsafe { Edu::new(cfg, d.bdf, PhysAddr::new(bar0.address)) } {
                Ok(e) => Some(e),
                Err(err) => {
                    log::error!("edu at {}: {err:?}", d.bdf);
                    None
                }
            }
        })
        .collect();
    let Some(first) = edus.first() else {
        crate::println!("vtd-test setup: FAIL no edu device (add -device edu)");
        return false;
    };
    let f = moat_dmar::PciFunction::new(
        first.bdf.segment(),
        first.bdf.bus(),
        first.bdf.device(),
        first.bdf.function(),
    );
    let Some(base) = dmar
        .and_then(|d| d.find_drhd(f, &NoBridges))
        .map(|u| u.register_base())
    else {
        crate::println!("vtd-test setup: FAIL no DRHD unit covers {}", first.bdf);
        return false;
    };
    if with_unit(base, |_, _| ()).is_none() {
        crate::println!("vtd-test setup: FAIL the unit at {base:#x} is not enabled");
        return false;
    }
    let levels = with_unit(base, |u, _| u.levels().count()).unwrap_or(0);
    let cm = with_unit(base, |u, _| u.capability().caching_mode()).unwrap_or(false);
    crate::println!(
        "vtd-test setup: {} edu device(s), unit {base:#x}, {levels}-level tables, caching mode {}",
        edus.len(),
        if cm { "on" } else { "off" }
    );
    let _ = drain(base);
    let mut t = Tally {
        passed: 0,
        failed: 0,
    };
    if storm {
        fault_storm(base, &edus, &mut t);
    } else {
        suite(base, &edus, &mut t);
    }
    let (recorded, dropped) = with_unit(base, |u, _| {
        let c = u.fault_counters();
        (c.recorded, c.dropped)
    })
    .unwrap_or((0, 0));
    crate::println!(
        "vtd-test summary: {} passed, {} failed; unit faults recorded {recorded}, fault overflows observed (PFO) {dropped}",
        t.passed,
        t.failed
    );
    t.failed == 0
}

fn create_domain(base: u64) -> Option<Domain> {
    match with_unit(base, |u, m| u.create_domain(m))? {
        Ok(d) => Some(d),
        Err(e) => {
            log::error!("create_domain: {e}");
            None
        }
    }
}

/// The main suite: data in both directions, faults, stale IOTLB vs flush, superpage,
/// unattached and foreign devices, no leak.
fn suite(base: u64, edus: &[Edu], t: &mut Tally) {
    let e0 = &edus[0];
    let s0 = sid(e0);
    // The unit creates a bus's context table on the first attach there and keeps it for its
    // lifetime: attach and detach a throwaway domain first so the leak check below counts
    // only what this suite allocates.
    if let Some(w) = create_domain(base) {
        let _ = with_unit(base, |u, m| {
            u.attach(m, &w, s0)?;
            u.detach(m, &w, s0)?;
            u.destroy_domain(m, w).map_err(|(_, e)| e)
        });
    }
    let free_before = frames::stats().1;
    let (fa, fb, fc) = match (Frames::one(), Frames::one(), Frames::one()) {
        (Some(a), Some(b), Some(c)) => (a, b, c),
        _ => return t.check("setup", false, format_args!("out of frames")),
    };
    let (a, b, c) = (fa.page(0), fb.page(0), fc.page(0));
    fill(a, 7);
    c.fill(0xA5);
    let Some(mut dom) = create_domain(base) else {
        return t.check("setup", false, format_args!("no domain"));
    };
    let did = dom.id();
    let r = with_unit(base, |u, m| {
        let mut g = dom.gather();
        dom.map(m, IOVA_A, a.phys(), PAGE, Access::READ, &mut g)?;
        dom.map(m, IOVA_B, b.phys(), PAGE, Access::WRITE, &mut g)?;
        dom.map(m, IOVA_RO, a.phys(), PAGE, Access::READ, &mut g)?;
        u.attach(m, &dom, s0)?;
        u.flush(m, &mut g)
    });
    t.check(
        "attach",
        matches!(r, Some(Ok(_))),
        format_args!("domain {did} attached to {} with IOVA {IOVA_A:#x} (R), {IOVA_B:#x} (W), {IOVA_RO:#x} (R)", e0.bdf),
    );

    // 1. Mapped DMA in both directions delivers the bytes.
    let ok1 = e0.dma(Direction::FromRam, IOVA_A, 0, LEN).is_ok();
    let ok2 = e0.dma(Direction::ToRam, IOVA_B, 0, LEN).is_ok();
    let faults = drain(base);
    t.check(
        "dma-both-directions",
        ok1 && ok2 && holds_pattern(b, 7) && faults.is_empty(),
        format_args!(
            "RAM->edu via {IOVA_A:#x}, edu->RAM via {IOVA_B:#x}: source checksum {:#x}, arrived {:#x}, faults {}",
            checksum(a),
            checksum(b),
            faults.len()
        ),
    );

    // 2. Unmapped IOVA: blocked and recorded, both directions; write to a read-only page.
    for (name, direction, access) in [
        ("fault-unmapped-write", Direction::ToRam, FaultAccess::Write),
        ("fault-unmapped-read", Direction::FromRam, FaultAccess::Read),
    ] {
        let _ = e0.dma(direction, IOVA_HOLE, 0, LEN);
        let f = has_fault(&drain(base), s0, IOVA_HOLE, access);
        t.check(name, f.is_some(), format_args!("{}", fault_text(f)));
    }
    // (A fresh IOVA: QEMU checks permissions on a table walk, not on an IOTLB hit, where
    // the write is dropped silently.)

    let _ = e0.dma(Direction::ToRam, IOVA_RO, 0, LEN);
    let fp = has_fault(&drain(base), s0, IOVA_RO, FaultAccess::Write);
    t.check(
        "fault-write-to-read-only",
        fp.is_some_and(|r| r.reason == FaultReason::WriteDenied) && holds_pattern(a, 7),
        format_args!(
            "{}; page unchanged: {}",
            fault_text(fp),
            holds_pattern(a, 7)
        ),
    );

    let fp = super::fault_path_stats();
    t.check(
        "fault-interrupt",
        fp.interrupts > 0 && fp.drained_in_interrupt > 0,
        format_args!(
            "{} fault event interrupts (MSI vector {:#x}), {} records drained by the handler, {} by polling",
            fp.interrupts,
            super::FAULT_VECTOR,
            fp.drained_in_interrupt,
            fp.drained_polling
        ),
    );

    // 2b. A fault event taken while this CPU holds the unit lock: the handler cannot drain,
    //     so the drain stays pending and the lock holder runs it on release. Without that the
    //     record stays in the unit, which then raises no event for later faults (it only
    //     does while no record is pending) and overflows. No polling here.
    let before = super::fault_path_stats();
    let overflows_before = with_unit(base, |u, _| u.fault_counters().dropped).unwrap_or(0);
    let irq_in_lock = with_unit(base, |_, _| {
        let _ = e0.start(Direction::ToRam, IOVA_HOLE_LOCKED, 0, LEN);
        let _ = e0.wait(5_000);
        wait_fault_interrupt(before.interrupts, 2_000_000)
    })
    .unwrap_or(false);
    let mid = super::fault_path_stats();
    let f1 = has_fault(
        &drained_without_polling(base),
        s0,
        IOVA_HOLE_LOCKED,
        FaultAccess::Write,
    );
    let _ = e0.start(Direction::ToRam, IOVA_HOLE_AFTER, 0, LEN);
    let _ = e0.wait(5_000);
    let irq_after = wait_fault_interrupt(mid.interrupts, 2_000_000);
    let f2 = has_fault(
        &drained_without_polling(base),
        s0,
        IOVA_HOLE_AFTER,
        FaultAccess::Write,
    );
    let overflows =
        with_unit(base, |u, _| u.fault_counters().dropped).unwrap_or(0) - overflows_before;
    let after = super::fault_path_stats();
    t.check(
        "fault-interrupt-while-locked",
        irq_in_lock
            && mid.deferred > before.deferred
            && mid.drained_follow_up > before.drained_follow_up
            && f1.is_some()
            && irq_after
            && after.drained_in_interrupt > mid.drained_in_interrupt
            && f2.is_some()
            && overflows == 0,
        format_args!(
            "event taken with the unit lock held: {irq_in_lock}, drain left pending {} time(s), {} record(s) drained after the release; {IOVA_HOLE_LOCKED:#x}: {}; next fault raised an event: {irq_after}, {IOVA_HOLE_AFTER:#x}: {}; overflows {overflows}",
            mid.deferred - before.deferred,
            mid.drained_follow_up - before.drained_follow_up,
            f1.is_some(),
            f2.is_some()
        ),
    );

    // 3. Unmap without flush: QEMU's cached translation still works (so the next check can
    //    fail); after the flush the same IOVA faults and RAM stays untouched. The failed read
    //    above left edu's buffer undefined: load the pattern again first.
    let reload = e0.dma(Direction::FromRam, IOVA_A, 0, LEN).is_ok();
    b.fill(0);
    let mut g2 = dom.gather();
    let un = with_unit(base, |_, m| dom.unmap(m, IOVA_B, PAGE, &mut g2));
    let _ = e0.dma(Direction::ToRam, IOVA_B, 0, LEN);
    let stale = holds_pattern(b, 7);
    t.check(
        "stale-iotlb-before-flush",
        reload && matches!(un, Some(Ok(_))) && stale && drain(base).is_empty(),
        format_args!(
            "PTE cleared, no invalidation yet: DMA through the cached translation {}",
            if stale {
                "still landed"
            } else {
                "did not land"
            }
        ),
    );
    b.fill(0);
    let fl = with_unit(base, |u, m| u.flush(m, &mut g2));
    let flushed = matches!(&fl, Some(Ok(f)) if f.unmapped.iter().any(|r| r.start == IOVA_B));
    let _ = e0.dma(Direction::ToRam, IOVA_B, 0, LEN);
    let ff = has_fault(&drain(base), s0, IOVA_B, FaultAccess::Write);
    t.check(
        "fault-after-unmap-and-flush",
        flushed && ff.is_some() && all_bytes(b, 0),
        format_args!(
            "flush released {IOVA_B:#x}: {flushed}; then {}; RAM untouched: {}",
            fault_text(ff),
            all_bytes(b, 0)
        ),
    );

    // 4. A 2 MiB superpage.
    superpage(base, e0, &mut dom, a, t);

    // 5. Memory outside the domain: the identity address of a canary page is not mapped.
    let _ = e0.dma(Direction::ToRam, c.phys().as_u64(), 0, LEN);
    let fo = has_fault(&drain(base), s0, c.phys().as_u64(), FaultAccess::Write);
    t.check(
        "outside-domain-blocked",
        fo.is_some() && all_bytes(c, 0xA5),
        format_args!(
            "edu->RAM at bus address {:#x} (a page not in the domain): {}; canary intact: {}",
            c.phys(),
            fault_text(fo),
            all_bytes(c, 0xA5)
        ),
    );

    // 6. A second device: unattached, then attached to its own domain.
    if let Some(e1) = edus.get(1) {
        second_device(base, e1, c, a, t);
    } else {
        t.check(
            "unattached-device-blocked",
            false,
            format_args!("needs a second edu device"),
        );
    }

    // 7. Tear down; every frame comes back.
    let r = with_unit(base, |u, m| {
        let mut g = dom.gather();
        dom.unmap(m, IOVA_A, PAGE, &mut g)?;
        dom.unmap(m, IOVA_RO, PAGE, &mut g)?;
        u.flush(m, &mut g)?;
        u.detach(m, &dom, s0)?;
        u.destroy_domain(m, dom).map_err(|(_, e)| e)
    });
    if matches!(r, Some(Ok(()))) {
        drop((fa, fb, fc));
    } else {
        // Still mapped for the device in a domain that could not be torn down: never
        // handed out again.
        core::mem::forget((fa, fb, fc));
    }
    let free_after = frames::stats().1;
    t.check(
        "teardown-no-leak",
        matches!(r, Some(Ok(()))) && free_after == free_before,
        format_args!(
            "domain destroyed: {:?}; free frames before {free_before}, after {free_after}",
            r.map(|x| x.map_err(|e| e.to_string()))
        ),
    );
}

fn superpage(base: u64, e0: &Edu, dom: &mut Domain, pattern: Page<'_>, t: &mut Tally) {
    let has_2m = with_unit(base, |u, _| u.capability().superpage_2m()).unwrap_or(false);
    let Some(frames2m) = Frames::contiguous(SUPER / PAGE, SUPER) else {
        return t.check(
            "superpage-2m",
            false,
            format_args!("no 2 MiB of contiguous frames"),
        );
    };
    let s = frames2m.phys();
    let last = SUPER - PAGE;
    let last_page = frames2m.page(SUPER / PAGE - 1);
    last_page.fill(0);
    let mapped = with_unit(base, |u, m| {
        let mut g = dom.gather();
        dom.map(m, IOVA_SUPER, s, SUPER, RW, &mut g)?;
        u.flush(m, &mut g).map(|_| ())
    });
    let tr = with_unit(base, |_, m| dom.translate(m, IOVA_SUPER + last)).flatten();
    let _ = e0.dma(Direction::ToRam, IOVA_SUPER + last, 0, LEN);
    let landed = last_page.bytes(LEN).eq(pattern.bytes(LEN));
    let want_size = if has_2m { SUPER } else { PAGE };
    t.check(
        "superpage-2m",
        matches!(mapped, Some(Ok(()))) && tr.is_some_and(|x| x.page_size == want_size && x.phys == s + last) && landed,
        format_args!(
            "IOVA {IOVA_SUPER:#x}+{last:#x} -> {:?} (unit 2M support: {has_2m}); DMA landed at {:#x}: {landed}",
            tr.map(|x| (x.phys, x.page_size)),
            s + last
        ),
    );
    if has_2m {
        let partial = with_unit(base, |_, m| {
            let mut g = dom.gather();
            dom.unmap(m, IOVA_SUPER + PAGE, PAGE, &mut g)
        });
        let still = with_unit(base, |_, m| dom.translate(m, IOVA_SUPER + PAGE)).flatten();
        t.check(
            "superpage-partial-unmap-refused",
            matches!(partial, Some(Err(moat_vtd::Error::PartialSuperpage { .. })))
                && still.is_some(),
            format_args!(
                "unmap of 4 KiB inside the 2 MiB page: {:?}; mapping intact: {}",
                partial.map(|r| r.map_err(|e| e.to_string())),
                still.is_some()
            ),
        );
    }
    let un = with_unit(base, |u, m| {
        let mut g = dom.gather();
        dom.unmap(m, IOVA_SUPER, SUPER, &mut g)?;
        u.flush(m, &mut g).map(|_| ())
    });
    if matches!(un, Some(Ok(()))) {
        drop(frames2m);
    } else {
        core::mem::forget(frames2m);
        log::error!(
            "superpage unmap failed: {:?}; its frames stay pinned",
            un.map(|r| r.map_err(|e| e.to_string()))
        );
    }
}

fn second_device(base: u64, e1: &Edu, canary: Page<'_>, a: Page<'_>, t: &mut Tally) {
    let s1 = sid(e1);
    let _ = e1.dma(Direction::ToRam, canary.phys().as_u64(), 0, LEN);
    let fu = has_fault(&drain(base), s1, canary.phys().as_u64(), FaultAccess::Write);
    t.check(
        "unattached-device-blocked",
        fu.is_some_and(|r| r.reason == FaultReason::ContextEntryNotPresent)
            && all_bytes(canary, 0xA5),
        format_args!(
            "{} (not attached) edu->RAM at {:#x}: {}; canary intact: {}",
            e1.bdf,
            canary.phys(),
            fault_text(fu),
            all_bytes(canary, 0xA5)
        ),
    );
    let Some(fe) = Frames::one() else {
        return;
    };
    let e = fe.page(0);
    fill(e, 99);
    let Some(dom2) = create_domain(base) else {
        return;
    };
    let r = with_unit(base, |u, m| {
        let mut g = dom2.gather();
        dom2.map(m, IOVA_E, e.phys(), PAGE, RW, &mut g)?;
        u.attach(m, &dom2, s1)?;
        u.flush(m, &mut g).map(|_| ())
    });
    let sum = checksum(e);
    let ok_in = e1.dma(Direction::FromRam, IOVA_E, 0, LEN).is_ok();
    e.fill(0);
    let ok_out = e1.dma(Direction::ToRam, IOVA_E, 0, LEN).is_ok();
    t.check(
        "second-domain-dma",
        matches!(r, Some(Ok(())))
            && ok_in
            && ok_out
            && holds_pattern(e, 99)
            && drain(base).is_empty(),
        format_args!(
            "{} in domain {} round trip through {IOVA_E:#x}: {:#x} -> {:#x}",
            e1.bdf,
            dom2.id(),
            sum,
            checksum(e)
        ),
    );

    let _ = e1.dma(Direction::ToRam, IOVA_A, 0, LEN);
    let fx = has_fault(&drain(base), s1, IOVA_A, FaultAccess::Write);
    t.check(
        "other-domain-iova-blocked",
        fx.is_some() && holds_pattern(a, 7),
        format_args!(
            "{} DMA to {IOVA_A:#x} (mapped only in the other domain): {}; page unchanged: {}",
            e1.bdf,
            fault_text(fx),
            holds_pattern(a, 7)
        ),
    );
    let r = with_unit(base, |u, m| {
        let mut g = dom2.gather();
        dom2.unmap(m, IOVA_E, PAGE, &mut g)?;
        u.flush(m, &mut g)?;
        u.detach(m, &dom2, s1)?;
        u.destroy_domain(m, dom2).map_err(|(_, e)| e)
    });
    if matches!(r, Some(Ok(()))) {
        drop(fe);
    } else {
        core::mem::forget(fe);
    }
}

/// Bad DMAs the storm issues.
const STORM_DMAS: u64 = 200;

/// Several edu devices DMA to unmapped IOVAs over and over: the unit records what it can and
/// sets PFO (primary fault overflow) when it cannot; every record it made must be drained and
/// reach its consumer, the overflows must be seen, the hypervisor stays responsive, and mapped
/// DMA still works afterwards. The unit cannot say how many faults an overflow lost: PFO is one
/// bit, so the counts of overflows are observations (each means at least one lost fault), and
/// the faults lost are the bad DMAs minus the records drained (one fault per bad DMA).
fn fault_storm(base: u64, edus: &[Edu], t: &mut Tally) {
    let Some(dom) = create_domain(base) else {
        return;
    };
    let attached = with_unit(base, |u, m| {
        edus.iter().try_for_each(|e| u.attach(m, &dom, sid(e)))
    });
    t.check(
        "storm-attach",
        matches!(attached, Some(Ok(()))),
        format_args!("{} devices in domain {}", edus.len(), dom.id()),
    );
    let overflows_before = with_unit(base, |u, _| u.fault_counters().dropped).unwrap_or(0);
    let start = crate::arch::tsc::micros_since_boot();
    let deadline = crate::arch::tsc::deadline_us(60_000_000);
    let mut started = 0u64;
    let mut drained = 0u64;
    let mut queue_dropped = 0u64;
    let mut polls = 0u64;
    let mut per_source = [0u64; 8];
    let mut count = |taken: super::Taken<FaultRecord>, drained: &mut u64, dropped: &mut u64| {
        *dropped += taken.dropped;
        for r in taken.records {
            *drained += 1;
            if let Some(i) = edus.iter().position(|e| sid(e) == r.source) {
                per_source[i.min(7)] += 1;
            }
        }
    };
    loop {
        for (i, e) in edus.iter().enumerate() {
            if !e.busy()
                && started < STORM_DMAS
                && e.start(Direction::ToRam, 0x60_0000 + (i as u64) * PAGE, 0, LEN)
                    .is_ok()
            {
                started += 1;
            }
        }
        // Let the fault event interrupt in for a moment, then poll as the fallback.
        crate::arch::x86::with_interrupts(|| {
            for _ in 0..2000 {
                core::hint::spin_loop();
            }
        });
        polls += 1;
        super::poll_faults(4);
        count(
            super::take_unit_faults(base),
            &mut drained,
            &mut queue_dropped,
        );
        if started >= STORM_DMAS || crate::arch::tsc::expired(deadline) {
            break;
        }
    }
    for e in edus {
        let _ = e.wait(2_000);
    }
    while super::poll_faults(16) > 0 {}
    count(
        super::take_unit_faults(base),
        &mut drained,
        &mut queue_dropped,
    );
    let (recorded, overflows, by_source) = with_unit(base, |u, _| {
        let c = u.fault_counters();
        (
            c.recorded,
            c.dropped - overflows_before,
            edus.iter().map(|e| c.source(sid(e))).sum::<u64>(),
        )
    })
    .unwrap_or((0, 0, 0));
    let lost = started.saturating_sub(drained);
    let ms = (crate::arch::tsc::micros_since_boot() - start) / 1000;
    t.check(
        "storm-records-drained",
        started >= 20 && drained > 0 && recorded == drained && by_source == recorded && queue_dropped == 0,
        format_args!(
            "{started} bad DMAs from {} devices in {ms} ms, {polls} polls: {drained} fault records drained (unit recorded {recorded}, per-source sum {by_source}), {queue_dropped} dropped by a full queue; per device {:?}",
            edus.len(),
            &per_source[..edus.len().min(8)]
        ),
    );
    t.check(
        "storm-overflows-observed",
        drained <= started && (lost > 0) == (overflows > 0) && overflows <= lost,
        format_args!(
            "{lost} faults not recorded by the unit (bad DMAs minus records), {overflows} overflow observations (PFO seen set; each means >= 1 unrecorded fault)"
        ),
    );
    let fp = super::fault_path_stats();
    t.check(
        "storm-interrupt-path",
        fp.interrupts > 0 && fp.drained_in_interrupt > 0 && fp.queue_dropped == 0,
        format_args!(
            "{} fault interrupts, {} records drained by the handler, {} by polling, {} by follow-ups ({} drains left pending), {} dropped by a full queue",
            fp.interrupts,
            fp.drained_in_interrupt,
            fp.drained_polling,
            fp.drained_follow_up,
            fp.deferred,
            fp.queue_dropped
        ),
    );
    // The unit still translates: map a page for edu0 and round-trip it.
    let Some(fp_frame) = Frames::one() else {
        return;
    };
    // Left mapped for edu0 in the storm's domain, which this run never tears down: the
    // frame is never handed out again.
    let p = fp_frame.page(0);
    fill(p, 42);
    let sum = checksum(p);
    let r = with_unit(base, |u, m| {
        let mut g = dom.gather();
        dom.map(m, IOVA_A, p.phys(), PAGE, RW, &mut g)?;
        u.flush(m, &mut g).map(|_| ())
    });
    let ok = edus[0].dma(Direction::FromRam, IOVA_A, 0, LEN).is_ok() && {
        p.fill(0);
        edus[0].dma(Direction::ToRam, IOVA_A, 0, LEN).is_ok()
    };
    t.check(
        "storm-then-dma-works",
        matches!(r, Some(Ok(()))) && ok && holds_pattern(p, 42),
        format_args!(
            "after the storm {} round trip: {sum:#x} -> {:#x}",
            edus[0].bdf,
            checksum(p)
        ),
    );
    core::mem::forget(fp_frame);
}
