//! Virtual interrupts of one vCPU, behind the vCPU boundary (no backend type here): the
//! vectors raised for it from outside and not yet delivered ([`VirtualInterrupts`], set from
//! interrupt handlers on any CPU), and the glue between the vCPU loop and its virtual local
//! APIC ([`VcpuApic`] around the pure model [`moat_x86arch::lapic::LocalApic`]: priorities,
//! TPR, EOI, self-IPI, timer, the x2APIC MSRs). An IPI one vCPU's APIC sends to others of
//! its guest ([`VcpuApic::take_ipi`]) is raised on theirs like a device's MSI, which wakes a
//! halted one.
//!
//! Delivery: before each entry the vCPU loop brings the APIC up to date ([`VcpuApic::update`]:
//! raised vectors into its IRR, its timer to the current TSC), asks it for the vector to
//! deliver ([`VcpuApic::offer`]: the highest pending one above the processor priority) and
//! hands that to the backend ([`crate::vm::vcpu::Vcpu::request_interrupt`]), which delivers it
//! when the guest can take it (RFLAGS.IF set, no interrupt shadow: SVM's V_IRQ; VMX's
//! injection or interrupt-window exiting). After the exit, an offered vector the backend no
//! longer holds was taken ([`VcpuApic::after_exit`]): it moves to the ISR until the guest's
//! EOI.
//!
//! The timer's expiry is noticed at every exit and while the vCPU halts; so that a guest that
//! never exits still gets it, the vCPU loop arms this CPU's local APIC timer for the
//! deadline ([`HOST_TIMER_VECTOR`]; its interrupt makes the guest exit).

use core::sync::atomic::{AtomicU64, Ordering};

use moat_x86arch::lapic::{Gp, Ipi, LocalApic};

/// Vectors raised for a vCPU from outside (device MSIs, the fault ring) and not yet
/// delivered to it: a vector stays here while it is pending in the vCPU's IRR, so raising it
/// again merges, as on a local APIC.
pub struct VirtualInterrupts {
    pending: [AtomicU64; 4],
    /// TSC of the host handler that raised the latest vector (for the delivery cost).
    raised_tsc: AtomicU64,
    /// Vectors raised in all.
    raised: AtomicU64,
}

impl VirtualInterrupts {
    /// None pending.
    pub const fn new() -> Self {
        Self {
            pending: [const { AtomicU64::new(0) }; 4],
            raised_tsc: AtomicU64::new(0),
            raised: AtomicU64::new(0),
        }
    }

    /// Raises `vector` (from any CPU, interrupt handlers included). Raising a vector that is
    /// still pending (not yet taken by the guest) merges with it, as on a local APIC's IRR:
    /// returns `false` then.
    pub fn raise(&self, vector: u8, tsc: u64) -> bool {
        self.stamp(tsc);
        self.raised.fetch_add(1, Ordering::Relaxed);
        let bit = 1 << (vector % 64);
        self.pending[usize::from(vector / 64)].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// Records `tsc` as the time the latest interrupt for this vCPU was raised.
    pub fn stamp(&self, tsc: u64) {
        self.raised_tsc.store(tsc, Ordering::Relaxed);
    }

    /// The vectors pending.
    fn snapshot(&self) -> [u64; 4] {
        core::array::from_fn(|i| self.pending[i].load(Ordering::Acquire))
    }

    /// `vector` was delivered (or refused): a new raise is a new interrupt.
    fn clear(&self, vector: u8) {
        self.pending[usize::from(vector / 64)].fetch_and(!(1 << (vector % 64)), Ordering::AcqRel);
    }

    /// TSC of the host handler that raised the latest vector.
    pub fn raised_tsc(&self) -> u64 {
        self.raised_tsc.load(Ordering::Relaxed)
    }

    /// Vectors raised in all.
    pub fn raised(&self) -> u64 {
        self.raised.load(Ordering::Relaxed)
    }
}

/// Moat's own MSRs next to the APIC's.
pub mod msr {
    /// Moat: the TSC at which the host raised this vCPU's latest interrupt (a device's host
    /// handler, or the host timer handler for the APIC timer; read only; for measuring the
    /// delivery cost from the guest's handler).
    pub const MOAT_IRQ_TSC: u32 = 0x4d4f_0001;
}

/// The host vector of the per-CPU timer that makes a running guest exit at its APIC timer's
/// deadline.
pub const HOST_TIMER_VECTOR: u8 = 0x42;

/// The host vector that makes the CPU running a vCPU exit so that the vCPU takes an IPI
/// another vCPU raised for it (the handler does nothing: the exit is the point).
pub const KICK_VECTOR: u8 = 0x43;

/// The kick's handler: nothing to do.
fn kick_interrupt() {}

/// Per CPU: host timer interrupts taken, and the TSC of the latest.
static HOST_TIMER: [(AtomicU64, AtomicU64); crate::arch::cpu::MAX_CPUS] =
    [const { (AtomicU64::new(0), AtomicU64::new(0)) }; crate::arch::cpu::MAX_CPUS];

/// The host timer's handler: records when it ran; its exit does the rest.
fn host_timer_interrupt() {
    let now = crate::arch::x86::rdtsc();
    if let Some((n, at)) = HOST_TIMER.get(crate::arch::cpu::current_index()) {
        at.store(now, Ordering::Relaxed);
        n.fetch_add(1, Ordering::Relaxed);
    }
}

/// Installs the host timer's handler (idempotent).
pub fn init() {
    crate::arch::idt::register(HOST_TIMER_VECTOR, host_timer_interrupt);
    crate::arch::idt::register(KICK_VECTOR, kick_interrupt);
}

/// The host timer of the CPU a vCPU runs on, armed for its APIC timer's deadline.
pub struct HostTimer {
    cpu: usize,
    /// The deadline armed and the CPU's host timer count when it was armed.
    armed: Option<(u64, u64)>,
}

impl HostTimer {
    /// The calling CPU's host timer, not armed.
    pub fn new() -> Self {
        init();
        HostTimer {
            cpu: crate::arch::cpu::current_index(),
            armed: None,
        }
    }

    fn slot(&self) -> Option<&'static (AtomicU64, AtomicU64)> {
        HOST_TIMER.get(self.cpu)
    }

    /// Arms the CPU's timer for TSC `deadline` (or stops it for `None`) when that differs
    /// from what is armed or the armed one already fired. An armed timer that has not fired
    /// when the deadline changes (the guest reprogrammed its timer, or an exit noticed the
    /// expiry first) is cancelled and its interrupt taken if it is already pending, so it
    /// makes no later exit for nothing: an emulator may hold a physical interrupt while the
    /// guest has its interrupts off (Bochs does), and it would then arrive exactly where the
    /// guest opens its interrupt window.
    pub fn set(&mut self, deadline: Option<u64>) {
        let taken = self.slot().map_or(0, |s| s.0.load(Ordering::Relaxed));
        if let Some((d, n)) = self.armed {
            let fired = n != taken;
            if fired || Some(d) != deadline {
                self.armed = None;
                if !fired {
                    crate::arch::apic::stop_timer();
                    crate::arch::x86::take_pending_interrupts();
                }
            }
        }
        if self.armed.is_none()
            && let Some(d) = deadline
        {
            let taken = self.slot().map_or(0, |s| s.0.load(Ordering::Relaxed));
            crate::arch::apic::arm_oneshot_at(HOST_TIMER_VECTOR, d);
            self.armed = Some((d, taken));
        }
    }

    /// TSC of this CPU's latest host timer interrupt.
    pub fn last_fired(&self) -> u64 {
        self.slot().map_or(0, |s| s.1.load(Ordering::Relaxed))
    }

    /// Stops the CPU's timer.
    pub fn stop(&mut self) {
        if self.armed.take().is_some() {
            crate::arch::apic::stop_timer();
        }
    }
}

/// The virtual local APIC of one vCPU with what the vCPU loop needs around it: only the
/// vCPU's own thread touches it.
pub struct VcpuApic {
    apic: LocalApic,
    /// The vector offered to the backend for the current entry.
    offered: Option<u8>,
}

/// An APIC MSR access the guest made: done, or refused with #GP.
pub type MsrResult<T> = Result<T, Gp>;

impl VcpuApic {
    /// The APIC of vCPU `index` (its x2APIC ID; vCPU 0 is the bootstrap processor) of a
    /// guest of `vcpus` vCPUs (the APICs its IPIs reach).
    pub fn new(index: usize, vcpus: usize) -> Self {
        VcpuApic {
            apic: LocalApic::new(index as u32, index == 0).in_group(vcpus as u32),
            offered: None,
        }
    }

    /// Brings the APIC up to TSC `now`: vectors raised from outside and not in its IRR yet
    /// go there (a disabled APIC drops them: a new raise is then a new interrupt), and the
    /// timer advances. Returns whether an
    /// unmasked timer expiry was added to the IRR (for the delivery-cost stamp).
    pub fn update(&mut self, irqs: &VirtualInterrupts, now: u64) -> bool {
        let irr = self.apic.irr().0;
        for (w, (bits, have)) in irqs.snapshot().into_iter().zip(irr).enumerate() {
            let mut new = bits & !have;
            while new != 0 {
                let v = (w * 64) as u8 + new.trailing_zeros() as u8;
                new &= new - 1;
                if !self.apic.raise(v) {
                    irqs.clear(v);
                }
            }
        }
        let fired = self.apic.counts().timer_expiries;
        let deadline = self.apic.deadline();
        self.apic.poll_timer(now);
        deadline.is_some() && self.apic.counts().timer_expiries != fired
    }

    /// The vector to request from the backend for the next entry (`None`: withdraw any).
    pub fn offer(&mut self) -> Option<u8> {
        self.offered = self.apic.deliverable();
        self.offered
    }

    /// After an exit: `still_requested` is the vector the backend still holds. An offered
    /// vector it no longer holds was taken by the guest: now in service, and a new raise of
    /// it is a new interrupt. (A raise from another CPU between the guest taking the vector
    /// and this call merges into the one taken; raises from this vCPU's own CPU, where its
    /// devices' MSIs are routed, cannot fall there: they are taken after this call.)
    pub fn after_exit(&mut self, still_requested: Option<u8>, irqs: &VirtualInterrupts) {
        if let Some(v) = self.offered.take()
            && still_requested != Some(v)
        {
            self.apic.acknowledge(v);
            irqs.clear(v);
        }
    }

    /// Whether an interrupt can be delivered now (a halted vCPU wakes).
    pub fn has_work(&self) -> bool {
        self.apic.deliverable().is_some()
    }

    /// The guest's CR8 (TPR bits 7:4).
    pub fn cr8(&self) -> u64 {
        self.apic.cr8()
    }

    /// A MOV to CR8.
    pub fn set_cr8(&mut self, value: u64) -> MsrResult<()> {
        self.apic.set_cr8(value)
    }

    /// The TSC at which the timer next needs the host's attention.
    pub fn deadline(&self) -> Option<u64> {
        self.apic.deadline()
    }

    /// The IPI the latest ICR write sends to other vCPUs (to raise on theirs).
    pub fn take_ipi(&mut self) -> Option<Ipi> {
        self.apic.take_ipi()
    }

    /// What the APIC has done.
    pub fn counts(&self) -> moat_x86arch::lapic::Counts {
        self.apic.counts()
    }

    /// RDMSR / WRMSR (`Some(value)`) of MSR `m` at TSC `now`: `None` when the MSR is not
    /// the APIC's, else the value read (0 for a write) or #GP.
    pub fn msr(
        &mut self,
        m: u32,
        write: Option<u64>,
        irqs: &VirtualInterrupts,
        now: u64,
    ) -> Option<MsrResult<u64>> {
        if m == msr::MOAT_IRQ_TSC {
            return Some(match write {
                None => Ok(irqs.raised_tsc()),
                Some(_) => Err(Gp),
            });
        }
        if !LocalApic::handles(m) {
            return None;
        }
        self.update(irqs, now);
        let r = match write {
            None => self.apic.read_msr(m, now),
            Some(v) => self.apic.write_msr(m, v, now).map(|()| 0),
        };
        Some(r)
    }
}
