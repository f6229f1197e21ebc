//! DMA remapping: one `moat-vtd` [`Unit`] per DRHD of the DMAR table, brought up at boot
//! (unless `iommu=off`), shared by the rest of the hypervisor behind a lock.

pub mod hw;
pub mod selftest;
mod test_pages;

use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use moat_config::Config;
use moat_dmar::Dmar;
use moat_vtd::fault::FaultRecord;
use moat_vtd::fault_queue::{FaultQueues, Taken};
use moat_vtd::{Unit, UnitConfig};

use crate::mm::mmio::Mmio;
use crate::mm::space;
use crate::mm::PhysAddr;
use crate::ratelimit::{RateLimit, Verdict};
use crate::sync::IrqMutex;
use hw::{KernelMemory, TscClock};

/// A unit as the kernel holds it.
pub type KernelUnit = Unit<Mmio, TscClock>;

/// One enabled remapping unit.
pub struct UnitSlot {
    /// Register base from the DRHD.
    pub base: u64,
    /// The driver.
    pub unit: KernelUnit,
}

/// Interrupt-safe: the fault event interrupt takes it (with `try_lock`).
static UNITS: IrqMutex<Vec<UnitSlot>> = IrqMutex::new(Vec::new());
/// The DMAR table the units came from (for device -> unit and RMRR lookups).
static DMAR: spin::Once<Dmar<'static>> = spin::Once::new();

/// Interrupt vector of the VT-d fault event (MSI from every unit to the BSP).
pub const FAULT_VECTOR: u8 = 0x40;
/// Most drained records one consumer's queue keeps; more are counted as that queue's drops.
const FAULT_QUEUE_CAPACITY: usize = 256;
/// Most records drained per unit by one interrupt or one follow-up drain: the rest is left
/// pending for the next follow-up (bounded work in interrupt context and on exits).
const DRAIN_BUDGET: usize = 64;

/// Records drained from the units, one bounded queue per (unit, domain) and the
/// hypervisor's queue per unit (sources attached to no domain).
/// Interrupt-safe: the fault event interrupt takes it (with `try_lock`).
static FAULTS: IrqMutex<FaultQueues<FaultRecord>> =
    IrqMutex::new(FaultQueues::new(FAULT_QUEUE_CAPACITY));
/// A unit may hold undrained records: an interrupt found a lock held or ran out of budget.
/// Set before trying the locks; every holder of `UNITS` or `FAULTS` checks it after
/// releasing them ([`follow_up`]), so a record cannot be stranded behind a held lock.
static DRAIN_PENDING: AtomicBool = AtomicBool::new(false);
static FAULT_IRQS: AtomicU64 = AtomicU64::new(0);
/// Bumped after every drain that queued a record (or a drop): a consumer that found its
/// queue empty at generation `g` need not look again (nor take the queue lock) while the
/// generation is still `g`.
static FAULT_GEN: AtomicU64 = AtomicU64::new(0);
static DRAINED_IN_IRQ: AtomicU64 = AtomicU64::new(0);
static DRAINED_POLLING: AtomicU64 = AtomicU64::new(0);
static DRAINED_FOLLOW_UP: AtomicU64 = AtomicU64::new(0);
static DRAINS_DEFERRED: AtomicU64 = AtomicU64::new(0);
/// Faults of sources attached to no domain (logged rate-limited).
static UNOWNED_FAULTS: RateLimit = RateLimit::new();

/// Fault-path counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct FaultPathStats {
    /// Fault event interrupts taken.
    pub interrupts: u64,
    /// Records drained by the interrupt handler.
    pub drained_in_interrupt: u64,
    /// Records drained by explicit polling ([`poll_faults`]).
    pub drained_polling: u64,
    /// Records drained by follow-up drains (after a lock holder released the lock, on guest
    /// exits) that an interrupt had to leave pending.
    pub drained_follow_up: u64,
    /// Drains an interrupt could not finish (a lock held, or its budget spent) and left to
    /// a follow-up.
    pub deferred: u64,
    /// Records drained but dropped because their consumer's queue was full.
    pub queue_dropped: u64,
}

/// The fault-path counters.
pub fn fault_path_stats() -> FaultPathStats {
    FaultPathStats {
        interrupts: FAULT_IRQS.load(Ordering::Relaxed),
        drained_in_interrupt: DRAINED_IN_IRQ.load(Ordering::Relaxed),
        drained_polling: DRAINED_POLLING.load(Ordering::Relaxed),
        drained_follow_up: DRAINED_FOLLOW_UP.load(Ordering::Relaxed),
        deferred: DRAINS_DEFERRED.load(Ordering::Relaxed),
        queue_dropped: FAULTS.lock().dropped_total(),
    }
}

/// Drains up to `budget` records per unit into their consumers' queues, pass after pass until
/// a pass finds no record pending (a unit raises no new fault event while one is). Returns
/// the records drained and whether every unit was left with none pending.
fn drain_units(
    units: &mut [UnitSlot],
    queues: &mut FaultQueues<FaultRecord>,
    budget: usize,
) -> (u64, bool) {
    let mut n = 0u64;
    let mut complete = true;
    for slot in units.iter_mut() {
        let base = slot.base;
        let mut left = budget;
        loop {
            let p = slot.unit.poll_faults(left, |r| {
                if r.domain.is_none()
                    && let Verdict::Log { nth, suppressed } = UNOWNED_FAULTS.event() {
                        log::warn!(
                            "vtd: unit {base:#x}: fault from {} (attached to no domain) at {:#x}, {:?} {:?} (fault #{nth} of unattached sources, {suppressed} not logged since the previous line)",
                            r.source,
                            r.address,
                            r.access,
                            r.reason
                        );
                    }
                queues.push(base, r.domain, *r);
            });
            if p.drained > 0 {
                FAULT_GEN.fetch_add(1, Ordering::Release);
            }
            n += p.drained as u64;
            left -= p.drained.min(left);
            if p.drained == 0 {
                break;
            }
            if left == 0 {
                // Budget spent with records possibly still pending.
                complete = false;
                break;
            }
        }
    }
    (n, complete)
}

/// Where a drain was started from (for the counters).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Interrupt,
    FollowUp,
}

/// Drains the units while a drain is pending and both locks can be taken without waiting.
/// When a lock is held, the drain stays pending: its holder runs [`follow_up`] after releasing
/// it (the flag is set before the lock is tried, so one of the two always sees the other).
fn drain_pending(path: Path) {
    // A few rounds at most: bounded work per call, the rest stays pending.
    for _ in 0..4 {
        if !DRAIN_PENDING.load(Ordering::SeqCst) {
            return;
        }
        let (Some(mut units), Some(mut queues)) = (UNITS.try_lock(), FAULTS.try_lock()) else {
            if path == Path::Interrupt {
                DRAINS_DEFERRED.fetch_add(1, Ordering::Relaxed);
            }
            return;
        };
        DRAIN_PENDING.store(false, Ordering::SeqCst);
        let (n, complete) = drain_units(&mut units, &mut queues, DRAIN_BUDGET);
        let counter = match path {
            Path::Interrupt => &DRAINED_IN_IRQ,
            Path::FollowUp => &DRAINED_FOLLOW_UP,
        };
        counter.fetch_add(n, Ordering::Relaxed);
        if !complete {
            DRAIN_PENDING.store(true, Ordering::SeqCst);
            if path == Path::Interrupt {
                DRAINS_DEFERRED.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
    }
}

/// The fault log's generation (see [`FAULT_GEN`]): read it before taking a queue; if the
/// queue was empty, nothing was queued for it until the generation changes.
pub fn fault_generation() -> u64 {
    FAULT_GEN.load(Ordering::Acquire)
}

/// The follow-up drain: runs a drain an interrupt had to leave pending. Called after
/// releasing `UNITS` or `FAULTS`, and on every exit of a guest with DMA devices (through
/// [`take_domain_faults`]); costs one atomic load when nothing is pending.
#[inline]
pub fn follow_up() {
    if DRAIN_PENDING.load(Ordering::SeqCst) {
        drain_pending(Path::FollowUp);
    }
}

/// The fault event interrupt handler: drains the units (bounded), or leaves the drain pending
/// for the lock holder when this CPU interrupted code that holds the unit or queue lock.
fn fault_interrupt() {
    FAULT_IRQS.fetch_add(1, Ordering::Relaxed);
    DRAIN_PENDING.store(true, Ordering::SeqCst);
    drain_pending(Path::Interrupt);
}

/// The polling fallback: drains every unit (at most `budget` records per unit). Returns
/// records drained.
pub fn poll_faults(budget: usize) -> u64 {
    let (n, complete) = {
        let mut units = UNITS.lock();
        let mut queues = FAULTS.lock();
        drain_units(&mut units, &mut queues, budget)
    };
    DRAINED_POLLING.fetch_add(n, Ordering::Relaxed);
    if !complete {
        DRAIN_PENDING.store(true, Ordering::SeqCst);
    }
    follow_up();
    n
}

/// Takes the records of domain `did` on the unit at `unit`, with the count of its records
/// dropped because its queue was full since the last take. Runs a pending follow-up drain
/// first. Does not wait for the queue lock (called on every guest exit): `None` when it is
/// busy.
pub fn take_domain_faults(unit: u64, did: u16) -> Option<Taken<FaultRecord>> {
    follow_up();
    let taken = {
        let mut q = FAULTS.try_lock()?;
        if !q.has(unit, Some(did)) {
            return Some(Taken::default());
        }
        q.take(unit, Some(did))
    };
    follow_up();
    Some(taken)
}

/// Takes every record of the unit at `unit` (its domains' and the hypervisor's queue), with
/// their drop counts: for the self-tests, which own every domain there is when they run.
pub fn take_unit_faults(unit: u64) -> Taken<FaultRecord> {
    let t = FAULTS.lock().take_unit(unit);
    follow_up();
    t
}

/// Takes the records of sources attached to no domain on `unit` that `pick` selects (the
/// others stay queued): e.g. the faults of a stopped guest's detached devices.
pub fn take_unattached_faults(unit: u64, pick: impl Fn(&FaultRecord) -> bool) -> Vec<FaultRecord> {
    let picked = {
        let mut q = FAULTS.lock();
        let all = q.take(unit, None);
        let mut picked = Vec::new();
        for r in all.records {
            if pick(&r) {
                picked.push(r);
            } else {
                q.push(unit, None, r);
            }
        }
        picked
    };
    follow_up();
    picked
}

/// Forgets the queued records of domain `did` on `unit` (its guest stopped; the id may be
/// reused). Returns how many records and drops were discarded.
pub fn discard_domain_faults(unit: u64, did: u16) -> (usize, u64) {
    let t = FAULTS.lock().take(unit, Some(did));
    follow_up();
    (t.records.len(), t.dropped)
}

/// Brings up every DRHD unit. Returns how many are translating.
pub fn init(dmar: Option<&Dmar<'static>>, config: &Config) -> usize {
    crate::arch::idt::register(FAULT_VECTOR, fault_interrupt);
    let bsp_apic = crate::arch::apic::id() as u64;
    if config.unsafe_interrupts {
        log::warn!("vtd: RISK: unsafe-interrupts on the command line: devices on units without interrupt remapping are assigned to guests anyway, and can then raise any interrupt on the host");
    }
    if !config.iommu {
        log::warn!("vtd: iommu=off on the command line: DMA remapping NOT enabled");
        return 0;
    }
    let Some(dmar) = dmar else { return 0 };
    DMAR.call_once(|| *dmar);
    let mut units = UNITS.lock();
    for (i, d) in dmar.drhds().enumerate() {
        let base = d.register_base();
        let len = d.register_set_size().max(4096);
        if let Err(e) = space::map_mmio(PhysAddr::new(base), len) {
            log::error!("vtd: unit {i}: cannot map registers at {base:#x}: {e:?}");
            continue;
        }
        // SAFETY: the DRHD's register set (from the firmware's DMAR table) is this unit's
        // MMIO, just mapped uncached, and the hypervisor alone drives the remapping units.
        let regs = unsafe { Mmio::new(PhysAddr::new(base), len as usize) };
        let mut unit = match Unit::new(regs, TscClock, UnitConfig::new(i as u32)) {
            Ok(u) => u,
            Err(e) => {
                log::error!("vtd: unit {i} at {base:#x}: {e}; left off");
                continue;
            }
        };
        let (v, cap, ecap) = (unit.version(), unit.capability(), unit.ext_capability());
        log::info!(
            "vtd: unit {i} at {base:#x}: version {}.{} CAP={:#x} ECAP={:#x}",
            v.major(),
            v.minor(),
            cap.0,
            ecap.0
        );
        log::info!(
            "vtd: unit {i}: SAGAW={:#x} MGAW={} -> {}-level tables; 2M={} 1G={} PSI={} MAMV={} CM={} RWBF={} ND={} bits NFR={} QI={} C={} SC={}",
            cap.sagaw(),
            cap.mgaw(),
            unit.levels().count(),
            cap.superpage_2m(),
            cap.superpage_1g(),
            cap.psi(),
            cap.mamv(),
            cap.caching_mode(),
            cap.rwbf(),
            cap.domain_id_bits(),
            cap.num_fault_records(),
            ecap.queued_invalidation(),
            ecap.coherent(),
            ecap.snoop_control()
        );
        match unit.enable(&mut KernelMemory) {
            Ok(()) => {
                log::info!(
                    "vtd: unit {i}: translation enabled ({} invalidation, root table {:#x})",
                    if unit.queued_invalidation() {
                        "queued"
                    } else {
                        "register-based"
                    },
                    unit.root_table().unwrap_or_default()
                );
                // Fault events: MSI (fixed delivery, physical destination) to the BSP.
                unit.configure_fault_interrupt(0xFEE0_0000 | (bsp_apic << 12), FAULT_VECTOR as u32);
                log::info!(
                    "vtd: unit {i}: fault events -> MSI vector {FAULT_VECTOR:#x} on APIC {bsp_apic}, polling as fallback"
                );
                enable_interrupt_remapping(i, &mut unit);
                units.push(UnitSlot { base, unit });
            }
            Err(e) => log::error!(
                "vtd: unit {i} at {base:#x}: enable failed: {e}; DMA through it is NOT remapped"
            ),
        }
    }
    units.len()
}

/// Turns interrupt remapping on when the unit offers it (ECAP.IR), with its table in the
/// hypervisor's frames; says plainly when it is not on (devices behind the unit can then
/// raise any interrupt, and are not assigned to guests without `unsafe-interrupts`).
fn enable_interrupt_remapping(i: usize, unit: &mut KernelUnit) {
    if !unit.ext_capability().interrupt_remapping() {
        log::warn!("vtd: unit {i}: no interrupt remapping (ECAP.IR clear): its devices' MSIs reach the CPUs unchecked");
        return;
    }
    match unit.enable_interrupt_remapping(&mut KernelMemory) {
        Ok(()) => log::info!(
            "vtd: unit {i}: interrupt remapping enabled ({} destinations, EIM {}, compatibility format interrupts off (CFI clear))",
            if unit.extended_interrupt_mode() { "x2APIC" } else { "xAPIC" },
            if unit.ext_capability().eim() { "offered" } else { "not offered" }
        ),
        Err(e) => log::error!(
            "vtd: unit {i}: interrupt remapping failed to enable: {e}; its devices' MSIs reach the CPUs unchecked"
        ),
    }
}

/// IRTEs handed out and not freed, over every unit.
pub fn irtes_in_use() -> usize {
    let n = UNITS.lock().iter().map(|s| s.unit.irtes_in_use()).sum();
    follow_up();
    n
}

/// Whether the enabled unit at `base` remaps interrupts.
pub fn remaps_interrupts(base: u64) -> bool {
    let on = UNITS
        .lock()
        .iter()
        .any(|s| s.base == base && s.unit.interrupt_remapping());
    follow_up();
    on
}

/// Runs `f` with the unit whose register base is `base`.
pub fn with_unit<R>(
    base: u64,
    f: impl FnOnce(&mut KernelUnit, &mut KernelMemory) -> R,
) -> Option<R> {
    let r = {
        let mut units = UNITS.lock();
        units
            .iter_mut()
            .find(|s| s.base == base)
            .map(|slot| f(&mut slot.unit, &mut KernelMemory))
    };
    // A fault interrupt may have come in while the lock was held (here or on this CPU).
    follow_up();
    r
}

fn function(bdf: moat_pci::Bdf) -> moat_dmar::PciFunction {
    moat_dmar::PciFunction::new(bdf.segment(), bdf.bus(), bdf.device(), bdf.function())
}

/// The register base of the enabled unit that translates `bdf`'s DMA.
pub fn unit_for(bdf: moat_pci::Bdf) -> Option<u64> {
    let base = DMAR
        .get()?
        .find_drhd(function(bdf), &moat_dmar::NoBridges)?
        .register_base();
    let enabled = UNITS.lock().iter().any(|s| s.base == base);
    follow_up();
    enabled.then_some(base)
}

/// The reserved memory regions (RMRRs) `bdf` needs identity-mapped: `(base, end)` pairs.
pub fn rmrrs_for(bdf: moat_pci::Bdf) -> Vec<(u64, u64)> {
    let Some(d) = DMAR.get() else {
        return Vec::new();
    };
    d.rmrrs_for(function(bdf), &moat_dmar::NoBridges)
        .map(|r| (r.base(), r.limit().saturating_add(1)))
        .collect()
}
