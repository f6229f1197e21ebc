//! MSIs of assigned devices, host side: every assigned function with an MSI capability on a
//! unit that remaps interrupts gets a host vector and an IRTE the hypervisor owns. When the
//! guest programs its virtual MSI capability (intercepted by the configuration filter,
//! [`moat_pci::MsiUpdate`]), the hypervisor points the IRTE at the host vector on the CPU
//! that runs the vCPU the guest named (source-id validation: the device alone may use it)
//! and programs the device with the remappable-format address of that IRTE. The host
//! handler raises the guest's vector on that vCPU ([`super::virq::VirtualInterrupts`]).
//!
//! A route whose interrupts keep arriving while the guest has not taken the previous one
//! (more than [`STORM_LIMIT`] in a row merged into a vector still pending) is an interrupt
//! storm: the device raises them faster than the guest consumes them, so each is host work
//! for nothing. The handler turns the device's MSI off (configuration space, no lock) and
//! logs it; the guest's next MSI programming turns it on again. (Counting merges rather than
//! a rate keeps the verdict independent of how fast the machine runs.)

use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, Ordering};

use moat_pci::{Bdf, MsiCapability, MsiUpdate};
use moat_vtd::intremap::{remappable_msi, DeliveryMode, Irte, SourceQualifier, SourceValidation};
use moat_vtd::SourceId;

use super::pci::Ecams;
use super::virq::VirtualInterrupts;
use crate::ratelimit::{RateLimit, Verdict};
use crate::sync::IrqMutex;

/// First host vector for device MSIs.
pub const HOST_VECTOR_BASE: u8 = 0x50;
/// Host vectors for device MSIs (`0x50..0x70`).
const HOST_VECTORS: usize = 32;
/// Interrupts in a row a route may merge into its still-pending vector before it is masked.
pub const STORM_LIMIT: u64 = 200;

/// One host vector's route to a vCPU.
struct Route {
    /// The target vCPU's pending set (null: no route).
    target: AtomicPtr<VirtualInterrupts>,
    /// The guest's vector.
    vector: AtomicU8,
    /// Interrupts taken.
    taken: AtomicU64,
    /// Interrupts in a row that found the guest's vector still pending.
    merged_in_a_row: AtomicU64,
    /// Masked as a storm (until the guest programs its MSI again).
    stormed: AtomicBool,
    /// Storms seen.
    storms: AtomicU64,
    /// The device, for masking from the handler (`try_lock` only there).
    device: IrqMutex<Option<(Ecams, Bdf, MsiCapability)>>,
}

impl Route {
    const fn new() -> Self {
        Self {
            target: AtomicPtr::new(core::ptr::null_mut()),
            vector: AtomicU8::new(0),
            taken: AtomicU64::new(0),
            merged_in_a_row: AtomicU64::new(0),
            stormed: AtomicBool::new(false),
            storms: AtomicU64::new(0),
            device: IrqMutex::new(None),
        }
    }
}

static ROUTES: [Route; HOST_VECTORS] = [const { Route::new() }; HOST_VECTORS];
/// Rate limit of the storm lines.
static STORM_LOG: RateLimit = RateLimit::new();
/// Host vectors in use (bit i: `HOST_VECTOR_BASE + i`).
static USED: AtomicU32 = AtomicU32::new(0);

/// The host handler of every device-MSI vector.
fn handler(vector: u8) {
    let now = crate::arch::x86::rdtsc();
    let Some(r) = ROUTES.get(usize::from(vector.wrapping_sub(HOST_VECTOR_BASE))) else {
        return;
    };
    r.taken.fetch_add(1, Ordering::Relaxed);
    if r.stormed.load(Ordering::Acquire) {
        return;
    }
    let p = r.target.load(Ordering::Acquire);
    // SAFETY: `target` is null or points into a guest's `virqs`, which live as long as the
    // leaked guest; only `DeviceMsi::program` stores it (and `release` clears it).
    let Some(t) = (unsafe { p.as_ref() }) else {
        return;
    };
    if t.raise(r.vector.load(Ordering::Relaxed), now) {
        r.merged_in_a_row.store(0, Ordering::Relaxed);
        return;
    }
    let n = r.merged_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
    if n > STORM_LIMIT && !r.stormed.swap(true, Ordering::AcqRel) {
        r.storms.fetch_add(1, Ordering::Relaxed);
        if let Some(dev) = r.device.try_lock()
            && let Some((ecams, bdf, cap)) = *dev
        {
            cap.disable(&ecams, bdf);
            // A guest can re-arm its device and storm again: rate-limited.
            if let Verdict::Log { nth, suppressed } = STORM_LOG.event() {
                log::warn!(
                        "irq: interrupt storm from {bdf} (host vector {vector:#x}): {n} interrupts in a row while the guest had not taken the previous one; its MSI masked until the guest programs it again (storm #{nth}, {suppressed} not logged)"
                    );
            }
        }
    }
}

/// One assigned function's MSI, as the hypervisor holds it.
pub struct DeviceMsi {
    bdf: Bdf,
    cap: MsiCapability,
    unit: u64,
    irte: u16,
    host_vector: u8,
}

/// Why a guest's MSI programming was not followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not a fixed/lowest-priority, edge, physical MSI to a vector >= 32 in the window.
    BadMessage,
    /// The destination names no vCPU of the guest.
    NoSuchVcpu(u8),
    /// The IOMMU refused the IRTE.
    Irte,
}

impl DeviceMsi {
    /// Sets up `bdf`'s MSI on the unit at `unit` (which remaps interrupts): a host vector
    /// and an IRTE, both unused until the guest programs the device. `None` when the
    /// vectors or IRTEs are exhausted.
    pub fn new(bdf: Bdf, cap: MsiCapability, unit: u64) -> Option<DeviceMsi> {
        let slot = loop {
            let used = USED.load(Ordering::Acquire);
            let free = (!used).trailing_zeros() as usize;
            if free >= HOST_VECTORS {
                return None;
            }
            if USED
                .compare_exchange(used, used | 1 << free, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                break free;
            }
        };
        let host_vector = HOST_VECTOR_BASE + slot as u8;
        let irte = crate::iommu::with_unit(unit, |u, _| u.alloc_irte()).and_then(|r| r.ok());
        let Some(irte) = irte else {
            USED.fetch_and(!(1 << slot), Ordering::AcqRel);
            return None;
        };
        let r = &ROUTES[slot];
        r.target.store(core::ptr::null_mut(), Ordering::Release);
        r.stormed.store(false, Ordering::Release);
        crate::arch::idt::register_vectored(host_vector, handler);
        Some(DeviceMsi {
            bdf,
            cap,
            unit,
            irte,
            host_vector,
        })
    }

    /// The function.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    /// The host vector.
    pub fn host_vector(&self) -> u8 {
        self.host_vector
    }

    /// The IRTE index.
    pub fn irte(&self) -> u16 {
        self.irte
    }

    fn route(&self) -> &'static Route {
        &ROUTES[usize::from(self.host_vector - HOST_VECTOR_BASE)]
    }

    /// Interrupts taken and storms seen on this device's vector.
    pub fn counts(&self) -> (u64, u64) {
        let r = self.route();
        (
            r.taken.load(Ordering::Relaxed),
            r.storms.load(Ordering::Relaxed),
        )
    }

    /// Follows the guest's MSI programming `u`: enabled with a valid message, the IRTE
    /// targets the host vector on the CPU with APIC id `apic_of(vcpu)` for the vCPU the
    /// message names (`targets[vcpu]`) and the device gets the IRTE's remappable address;
    /// otherwise the device's MSI is off and the IRTE not present. Returns the vCPU and
    /// vector routed, or why not. `targets` must live as long as the route: a guest's, which
    /// is leaked once created, until [`DeviceMsi::release`].
    pub fn program(
        &self,
        ecams: &Ecams,
        u: &MsiUpdate,
        targets: &[VirtualInterrupts],
        apic_of: impl Fn(usize) -> u32,
    ) -> Result<Option<(usize, u8)>, Refused> {
        let r = self.route();
        // Off first: the device raises nothing while the route changes.
        self.cap.disable(ecams, self.bdf);
        r.target.store(core::ptr::null_mut(), Ordering::Release);
        let clear = |this: &Self| {
            crate::iommu::with_unit(this.unit, |unit, mem| {
                unit.set_irte(mem, this.irte, Irte::NOT_PRESENT)
            })
        };
        if !u.state.enabled {
            clear(self);
            return Ok(None);
        }
        let Some(t) = u.state.target() else {
            clear(self);
            return Err(Refused::BadMessage);
        };
        let vcpu = usize::from(t.apic_id);
        let Some(target) = targets.get(vcpu) else {
            clear(self);
            return Err(Refused::NoSuchVcpu(t.apic_id));
        };
        let entry = Irte::remapped(
            self.host_vector,
            apic_of(vcpu),
            false,
            DeliveryMode::Fixed,
            SourceValidation::Requester {
                sid: SourceId(self.bdf.requester_id()),
                qualifier: SourceQualifier::Exact,
            },
        );
        let ok =
            crate::iommu::with_unit(self.unit, |unit, mem| unit.set_irte(mem, self.irte, entry));
        if !matches!(ok, Some(Ok(()))) {
            return Err(Refused::Irte);
        }
        r.vector.store(t.vector, Ordering::Relaxed);
        r.target.store(
            target as *const VirtualInterrupts as *mut VirtualInterrupts,
            Ordering::Release,
        );
        *r.device.lock() = Some((*ecams, self.bdf, self.cap));
        r.merged_in_a_row.store(0, Ordering::Relaxed);
        r.stormed.store(false, Ordering::Release);
        if !u.state.masked {
            let m = remappable_msi(self.irte);
            self.cap
                .program(ecams, self.bdf, m.address, m.data as u16, true);
        }
        Ok(Some((vcpu, t.vector)))
    }

    /// Turns the device's MSI off, frees the IRTE and the host vector (the guest stopped).
    pub fn release(&self, ecams: &Ecams) {
        self.cap.disable(ecams, self.bdf);
        let r = self.route();
        r.target.store(core::ptr::null_mut(), Ordering::Release);
        *r.device.lock() = None;
        let freed = crate::iommu::with_unit(self.unit, |unit, mem| unit.free_irte(mem, self.irte));
        if !matches!(freed, Some(Ok(()))) {
            log::error!(
                "irq: {}: IRTE {} could not be freed: {freed:?}",
                self.bdf,
                self.irte
            );
        }
        crate::arch::idt::unregister(self.host_vector);
        USED.fetch_and(
            !(1 << (self.host_vector - HOST_VECTOR_BASE)),
            Ordering::AcqRel,
        );
    }
}
