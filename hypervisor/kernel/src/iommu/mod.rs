//! DMA remapping: one `moat-vtd` [`Unit`] per DRHD of the DMAR table, brought up at boot
//! (unless `iommu=off`), shared by the rest of the hypervisor behind a lock.

pub mod hw;
pub mod selftest;

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use moat_config::Config;
use moat_dmar::Dmar;
use moat_vtd::fault::FaultRecord;
use moat_vtd::{Unit, UnitConfig};
use spin::Mutex;

use crate::mm::space;
use hw::{KernelMemory, Mmio, TscClock};

/// A unit as the kernel holds it.
pub type KernelUnit = Unit<Mmio, TscClock>;

/// One enabled remapping unit.
pub struct UnitSlot {
    /// Register base from the DRHD.
    pub base: u64,
    /// The driver.
    pub unit: KernelUnit,
}

static UNITS: Mutex<Vec<UnitSlot>> = Mutex::new(Vec::new());
/// The DMAR table the units came from (for device -> unit and RMRR lookups).
static DMAR: spin::Once<Dmar<'static>> = spin::Once::new();

/// Interrupt vector of the VT-d fault event (MSI from every unit to the BSP).
pub const FAULT_VECTOR: u8 = 0x40;
/// Most drained fault records kept for consumers; older ones are counted as lost.
const FAULT_LOG_CAPACITY: usize = 1024;

/// A drained fault record and the unit it came from.
#[derive(Debug, Clone, Copy)]
pub struct FaultEvent {
    /// Register base of the unit.
    pub unit: u64,
    /// The decoded record.
    pub record: FaultRecord,
}

/// Records drained from the units, waiting for a consumer ([`take_faults`]).
static FAULT_LOG: Mutex<VecDeque<FaultEvent>> = Mutex::new(VecDeque::new());
static FAULT_LOG_LOST: AtomicU64 = AtomicU64::new(0);
static FAULT_IRQS: AtomicU64 = AtomicU64::new(0);
static DRAINED_IN_IRQ: AtomicU64 = AtomicU64::new(0);
static DRAINED_POLLING: AtomicU64 = AtomicU64::new(0);

/// Fault-path counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct FaultPathStats {
    /// Fault event interrupts taken.
    pub interrupts: u64,
    /// Records drained by the interrupt handler.
    pub drained_in_interrupt: u64,
    /// Records drained by polling.
    pub drained_polling: u64,
    /// Records drained but pushed out of the log before anyone took them.
    pub lost: u64,
}

/// The fault-path counters.
pub fn fault_path_stats() -> FaultPathStats {
    FaultPathStats {
        interrupts: FAULT_IRQS.load(Ordering::Relaxed),
        drained_in_interrupt: DRAINED_IN_IRQ.load(Ordering::Relaxed),
        drained_polling: DRAINED_POLLING.load(Ordering::Relaxed),
        lost: FAULT_LOG_LOST.load(Ordering::Relaxed),
    }
}

/// Drains up to `budget` records per unit into the fault log; returns how many.
fn drain_units(units: &mut [UnitSlot], log: &mut VecDeque<FaultEvent>, budget: usize) -> u64 {
    let mut n = 0;
    for slot in units.iter_mut() {
        let base = slot.base;
        slot.unit.poll_faults(budget, |r| {
            if log.len() == FAULT_LOG_CAPACITY {
                log.pop_front();
                FAULT_LOG_LOST.fetch_add(1, Ordering::Relaxed);
            }
            log.push_back(FaultEvent {
                unit: base,
                record: *r,
            });
            n += 1;
        });
    }
    n
}

/// The fault event interrupt handler: drains the units unless this CPU interrupted code that
/// holds the unit or log lock (then the polling path picks the records up).
fn fault_interrupt() {
    FAULT_IRQS.fetch_add(1, Ordering::Relaxed);
    if let (Some(mut units), Some(mut log)) = (UNITS.try_lock(), FAULT_LOG.try_lock()) {
        let n = drain_units(&mut units, &mut log, 16);
        DRAINED_IN_IRQ.fetch_add(n, Ordering::Relaxed);
    }
}

/// The polling fallback: drains every unit (bounded work per call). Returns records drained.
pub fn poll_faults(budget: usize) -> u64 {
    let mut units = UNITS.lock();
    let mut log = FAULT_LOG.lock();
    let n = drain_units(&mut units, &mut log, budget);
    DRAINED_POLLING.fetch_add(n, Ordering::Relaxed);
    n
}

/// Takes the drained records `keep` selects from the fault log (the others stay). Does not
/// wait for the log lock (called on every guest exit): `None` when it is busy.
pub fn take_faults_if(keep: impl Fn(&FaultEvent) -> bool) -> Option<Vec<FaultEvent>> {
    let mut log = FAULT_LOG.try_lock()?;
    if log.is_empty() {
        return Some(Vec::new());
    }
    let mut taken = Vec::new();
    log.retain(|e| {
        if keep(e) {
            taken.push(*e);
            false
        } else {
            true
        }
    });
    Some(taken)
}

/// Takes every drained record from the fault log.
pub fn take_faults() -> Vec<FaultEvent> {
    FAULT_LOG.lock().drain(..).collect()
}

/// Brings up every DRHD unit. Returns how many are translating.
pub fn init(dmar: Option<&Dmar<'static>>, config: &Config) -> usize {
    crate::arch::idt::register(FAULT_VECTOR, fault_interrupt);
    let bsp_apic = crate::arch::apic::id() as u64;
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
        if let Err(e) = space::map_mmio(base, len) {
            log::error!("vtd: unit {i}: cannot map registers at {base:#x}: {e:?}");
            continue;
        }
        let mut unit = match Unit::new(
            Mmio::new(base, len as usize),
            TscClock,
            UnitConfig::new(i as u32),
        ) {
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
                    unit.root_table().unwrap_or(0)
                );
                // Fault events: MSI (fixed delivery, physical destination) to the BSP.
                unit.configure_fault_interrupt(0xFEE0_0000 | (bsp_apic << 12), FAULT_VECTOR as u32);
                log::info!(
                    "vtd: unit {i}: fault events -> MSI vector {FAULT_VECTOR:#x} on APIC {bsp_apic}, polling as fallback"
                );
                units.push(UnitSlot { base, unit });
            }
            Err(e) => log::error!(
                "vtd: unit {i} at {base:#x}: enable failed: {e}; DMA through it is NOT remapped"
            ),
        }
    }
    units.len()
}

/// Runs `f` with the unit whose register base is `base`.
pub fn with_unit<R>(
    base: u64,
    f: impl FnOnce(&mut KernelUnit, &mut KernelMemory) -> R,
) -> Option<R> {
    let mut units = UNITS.lock();
    let slot = units.iter_mut().find(|s| s.base == base)?;
    Some(f(&mut slot.unit, &mut KernelMemory))
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
    UNITS.lock().iter().any(|s| s.base == base).then_some(base)
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
