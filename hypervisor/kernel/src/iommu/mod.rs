//! DMA remapping: one `moat-vtd` [`Unit`] per DRHD of the DMAR table, brought up at boot
//! (unless `iommu=off`), shared by the rest of the hypervisor behind a lock.

pub mod hw;
pub mod selftest;

use alloc::vec::Vec;

use moat_config::Config;
use moat_dmar::Dmar;
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
    /// PCI segment.
    pub segment: u16,
    /// The driver.
    pub unit: KernelUnit,
}

static UNITS: Mutex<Vec<UnitSlot>> = Mutex::new(Vec::new());

/// Brings up every DRHD unit. Returns how many are translating.
pub fn init(dmar: Option<&Dmar<'_>>, config: &Config) -> usize {
    if !config.iommu {
        log::warn!("vtd: iommu=off on the command line: DMA remapping NOT enabled");
        return 0;
    }
    let Some(dmar) = dmar else { return 0 };
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
                units.push(UnitSlot {
                    base,
                    segment: d.segment(),
                    unit,
                });
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
