//! Virtual interrupts of one vCPU, behind the vCPU boundary (no backend type here): the
//! vectors raised for it and not yet delivered ([`VirtualInterrupts`], set from interrupt
//! handlers on any CPU), and a minimal virtual local APIC ([`VirtualApic`]: one vector in
//! service until the guest's EOI, the x2APIC ID/EOI/version/TPR MSRs and `IA32_APIC_BASE`).
//!
//! Delivery: before each entry the vCPU loop asks [`VirtualApic::next`] for the highest
//! pending vector when none is in service and none is already requested, and hands it to
//! the backend ([`crate::vm::vcpu::Vcpu::request_interrupt`]), which delivers it when the
//! guest can take it (RFLAGS.IF set, no interrupt shadow: SVM's V_IRQ; VMX's
//! interrupt-window exiting). After the exit, a request the backend no longer holds was
//! delivered: the vector is then in service until the guest writes the EOI MSR.

use core::sync::atomic::{AtomicU64, Ordering};

/// Vectors raised for a vCPU and not yet handed to the backend.
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
    /// already pending merges with it, as on a local APIC's IRR: returns `false` then.
    pub fn raise(&self, vector: u8, tsc: u64) -> bool {
        self.raised_tsc.store(tsc, Ordering::Relaxed);
        self.raised.fetch_add(1, Ordering::Relaxed);
        let bit = 1 << (vector % 64);
        self.pending[usize::from(vector / 64)].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// Whether any vector is pending.
    pub fn any(&self) -> bool {
        self.pending.iter().any(|w| w.load(Ordering::Acquire) != 0)
    }

    /// Takes the highest pending vector.
    pub fn take_highest(&self) -> Option<u8> {
        for (i, w) in self.pending.iter().enumerate().rev() {
            let mut cur = w.load(Ordering::Acquire);
            while cur != 0 {
                let bit = 63 - cur.leading_zeros();
                match w.compare_exchange(
                    cur,
                    cur & !(1 << bit),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return Some((i * 64) as u8 + bit as u8),
                    Err(now) => cur = now,
                }
            }
        }
        None
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

/// x2APIC MSRs the virtual local APIC answers.
pub mod msr {
    /// `IA32_APIC_BASE`.
    pub const APIC_BASE: u32 = 0x1b;
    /// x2APIC ID.
    pub const ID: u32 = 0x802;
    /// x2APIC version.
    pub const VERSION: u32 = 0x803;
    /// x2APIC task priority.
    pub const TPR: u32 = 0x808;
    /// x2APIC end of interrupt (write 0).
    pub const EOI: u32 = 0x80b;
    /// Moat: the TSC at which the host's handler raised this vCPU's latest interrupt (read
    /// only; for measuring the delivery cost from the guest's handler).
    pub const MOAT_IRQ_TSC: u32 = 0x4d4f_0001;
}

/// The minimal virtual local APIC of one vCPU (x2APIC mode, physical destination = vCPU
/// index): only the vCPU's own state, no locking (the vCPU's thread alone touches it).
#[derive(Debug, Default)]
pub struct VirtualApic {
    id: u32,
    /// The vector delivered and not yet EOIed.
    in_service: Option<u8>,
    /// The vector handed to the backend and not yet delivered.
    requested: Option<u8>,
    /// Interrupts delivered to the guest.
    pub delivered: u64,
    /// EOIs written.
    pub eois: u64,
}

impl VirtualApic {
    /// The APIC of vCPU `index` (its x2APIC id).
    pub fn new(index: usize) -> Self {
        Self {
            id: index as u32,
            ..Self::default()
        }
    }

    /// The vector to request from the backend now, taken from `irqs`: only when nothing is
    /// in service or requested (one vector at a time; a higher one waits for the EOI).
    pub fn next(&mut self, irqs: &VirtualInterrupts) -> Option<u8> {
        if self.in_service.is_some() || self.requested.is_some() {
            return None;
        }
        let v = irqs.take_highest()?;
        self.requested = Some(v);
        Some(v)
    }

    /// After an exit: `still_requested` is the vector the backend still holds. A request
    /// it no longer holds was delivered and is now in service.
    pub fn after_exit(&mut self, still_requested: Option<u8>) {
        if let Some(v) = self.requested
            && still_requested != Some(v)
        {
            self.requested = None;
            self.in_service = Some(v);
            self.delivered += 1;
        }
    }

    /// Whether an interrupt is requested from the backend or waiting in `irqs`.
    pub fn has_work(&self, irqs: &VirtualInterrupts) -> bool {
        self.requested.is_some() || (self.in_service.is_none() && irqs.any())
    }

    /// RDMSR of an APIC MSR: `None` for MSRs it does not answer.
    pub fn read_msr(&self, msr: u32, bsp: bool, irqs: &VirtualInterrupts) -> Option<u64> {
        Some(match msr {
            // Base 0xFEE00000, enabled (11), x2APIC (10), BSP (8).
            msr::APIC_BASE => 0xfee0_0000 | 1 << 11 | 1 << 10 | u64::from(bsp) << 8,
            msr::ID => u64::from(self.id),
            // Version 0x14, 6 LVT entries.
            msr::VERSION => 0x0005_0014,
            msr::TPR => 0,
            msr::MOAT_IRQ_TSC => irqs.raised_tsc(),
            _ => return None,
        })
    }

    /// WRMSR of an APIC MSR: `false` for MSRs it does not accept (the caller injects #GP).
    pub fn write_msr(&mut self, msr: u32, value: u64) -> bool {
        match msr {
            msr::EOI if value == 0 => {
                self.in_service = None;
                self.eois += 1;
                true
            }
            // The priority is not modelled: every vector is deliverable.
            msr::TPR => true,
            _ => false,
        }
    }
}
