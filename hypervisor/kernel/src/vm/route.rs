//! Host vectors routed to guest vCPUs: what MSI ([`super::msi`]) and MSI-X
//! ([`super::msix`]) virtualization share. A [`HostRoute`] owns one host vector (of
//! `0x50..0x70`) and one IRTE on the device's remapping unit; aiming it at a guest's
//! message ([`HostRoute::aim`]) points the IRTE (remapped format, source-id checked: the
//! device alone may use it) at the host vector on the CPU that runs the vCPU the message
//! names, and the host handler raises the guest's vector on that vCPU
//! ([`super::virq::VirtualInterrupts`]).
//!
//! A route whose interrupts keep arriving while the guest has not taken the previous one
//! (more than [`STORM_LIMIT`] in a row merged into a vector still pending) is an interrupt
//! storm: the device raises them faster than the guest consumes them, so each is host work
//! for nothing. The handler masks the source ([`Masker`]: the device's MSI off in
//! configuration space, or its MSI-X table entry masked; no lock) and logs it; the guest's
//! next programming of that message turns it on again. (Counting merges rather than a rate
//! keeps the verdict independent of how fast the machine runs.)

use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, Ordering};

use moat_pci::{Bdf, GuestMsiTarget, MsiCapability};
use moat_vtd::intremap::{DeliveryMode, Irte, SourceQualifier, SourceValidation};
use moat_vtd::SourceId;

use super::pci::Ecams;
use super::virq::VirtualInterrupts;
use crate::mm::PhysAddr;
use crate::ratelimit::{RateLimit, Verdict};
use crate::sync::IrqMutex;

/// First host vector for device MSIs.
pub const HOST_VECTOR_BASE: u8 = 0x50;
/// Host vectors for device MSIs (`0x50..0x70`).
const HOST_VECTORS: usize = 32;
/// Interrupts in a row a route may merge into its still-pending vector before it is masked.
pub const STORM_LIMIT: u64 = 200;

/// How the handler silences a storming source.
#[derive(Clone, Copy)]
pub enum Masker {
    /// The function's MSI, turned off in configuration space.
    Msi(Ecams, Bdf, MsiCapability),
    /// One MSI-X table entry: its vector control at this (identity-mapped, uncached)
    /// physical address gets the mask bit.
    MsixEntry(Bdf, PhysAddr),
}

impl Masker {
    fn mask(&self) {
        match *self {
            Masker::Msi(ecams, bdf, cap) => cap.disable(&ecams, bdf),
            Masker::MsixEntry(_, vector_control) => {
                // SAFETY: the device's table entry, mapped uncached by `DeviceMsix::new` and
                // owned by the hypervisor (the guest never reaches it); dword aligned.
                let m = unsafe { crate::mm::mmio::Mmio::new(vector_control, 4) };
                m.write32(0, 1);
            }
        }
    }

    fn bdf(&self) -> Bdf {
        match *self {
            Masker::Msi(_, bdf, _) | Masker::MsixEntry(bdf, _) => bdf,
        }
    }
}

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
    /// Masked as a storm (until the guest programs its message again).
    stormed: AtomicBool,
    /// Storms seen.
    storms: AtomicU64,
    /// The source, for masking from the handler (`try_lock` only there).
    device: IrqMutex<Option<Masker>>,
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
    // leaked guest; only `HostRoute::aim` stores it (and `clear`/`release` clear it).
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
            && let Some(m) = *dev
        {
            m.mask();
            // A guest can re-arm its device and storm again: rate-limited.
            if let Verdict::Log { nth, suppressed } = STORM_LOG.event() {
                let what = match m {
                    Masker::Msi(..) => "MSI",
                    Masker::MsixEntry(..) => "MSI-X entry",
                };
                log::warn!(
                    "irq: interrupt storm from {} (host vector {vector:#x}): {n} interrupts in a row while the guest had not taken the previous one; its {what} masked until the guest programs it again (storm #{nth}, {suppressed} not logged)",
                    m.bdf()
                );
            }
        }
    }
}

/// Host vectors routed to devices now (every one is freed when its guest stops).
pub fn host_vectors_in_use() -> u32 {
    USED.load(Ordering::Acquire).count_ones()
}

/// Why a guest's message was not followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not a fixed/lowest-priority, edge, physical MSI to a vector >= 32 in the window.
    BadMessage,
    /// The destination names no vCPU of the guest.
    NoSuchVcpu(u8),
    /// The IOMMU refused the IRTE.
    Irte,
    /// No host vector or IRTE left.
    Exhausted,
}

/// A host vector and an IRTE the hypervisor owns for one message of one device.
pub struct HostRoute {
    bdf: Bdf,
    unit: u64,
    irte: u16,
    host_vector: u8,
}

impl HostRoute {
    /// Takes a host vector and an IRTE on the unit at `unit` (which remaps interrupts) for
    /// `bdf`, both unused until [`HostRoute::aim`]. `None` when either is exhausted.
    pub fn new(bdf: Bdf, unit: u64) -> Option<HostRoute> {
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
        Some(HostRoute {
            bdf,
            unit,
            irte,
            host_vector,
        })
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

    /// Interrupts taken and storms seen on this route's vector.
    pub fn counts(&self) -> (u64, u64) {
        let r = self.route();
        (
            r.taken.load(Ordering::Relaxed),
            r.storms.load(Ordering::Relaxed),
        )
    }

    /// No delivery: the IRTE not present, no target.
    pub fn clear(&self) {
        self.route()
            .target
            .store(core::ptr::null_mut(), Ordering::Release);
        let _ = crate::iommu::with_unit(self.unit, |unit, mem| {
            unit.set_irte(mem, self.irte, Irte::NOT_PRESENT)
        });
    }

    /// Aims the route at the guest's message target `t` (`None`: not a valid message):
    /// the IRTE targets the host vector on the CPU with APIC id `apic_of(vcpu)` for the vCPU
    /// the message names (`targets[vcpu]`), the handler raises `t.vector` there, `masker`
    /// silences a storm. On a refusal the route is cleared. Returns the vCPU and vector.
    /// `targets` must live as long as the route: a guest's, which is leaked once created,
    /// until [`HostRoute::release`].
    pub fn aim(
        &self,
        t: Option<GuestMsiTarget>,
        targets: &[VirtualInterrupts],
        apic_of: &dyn Fn(usize) -> u32,
        masker: Masker,
    ) -> Result<(usize, u8), Refused> {
        let r = self.route();
        r.target.store(core::ptr::null_mut(), Ordering::Release);
        let Some(t) = t else {
            self.clear();
            return Err(Refused::BadMessage);
        };
        let vcpu = usize::from(t.apic_id);
        let Some(target) = targets.get(vcpu) else {
            self.clear();
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
        *r.device.lock() = Some(masker);
        r.merged_in_a_row.store(0, Ordering::Relaxed);
        r.stormed.store(false, Ordering::Release);
        Ok((vcpu, t.vector))
    }

    /// Frees the IRTE and the host vector (the guest stopped; the caller silenced the
    /// device first).
    pub fn release(&self) {
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
