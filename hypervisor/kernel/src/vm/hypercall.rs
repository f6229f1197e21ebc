//! Hypercalls and the hypervisor's CPUID leaves.
//!
//! The ABI is `moat-abi` (its documentation is the specification): `VMMCALL` with the call
//! number in RAX and arguments in RDI, RSI, RDX, R10, R8, R9; a status in RAX (0 or a
//! negative code) and values in RDX (and R8, R9 for the DMA calls). CPUID leaf `0x4000_0000`
//! returns `"MoatMoatMoat"`; `0x4000_0001` the ABI version in EAX, the bitmap of calls this
//! guest has in EBX (the DMA calls only for a guest with devices) and the hypercall
//! instruction in ECX (1 = VMMCALL on SVM, 2 = VMCALL on VMX).

use moat_abi::cpuid::GuestCpu;
use moat_abi::{Args, Call, Status, CALLS_ALL, CALLS_BASE, CONSOLE_MAX};

use super::guest::{Guest, StopReason};
use super::vcpu::{Reg, Vcpu};
use crate::ratelimit::{RateLimit, Verdict};

/// The calls a guest has: every call for a guest with DMA devices, the base calls otherwise.
fn calls(guest: &Guest) -> u32 {
    if guest.dma().is_some() {
        CALLS_ALL
    } else {
        CALLS_BASE
    }
}

/// Unknown hypercalls of every guest (logged rate-limited).
static UNKNOWN_CALLS: RateLimit = RateLimit::new();

/// The tail of a rate-limited line: nothing for the first ones, then the counts.
struct Suppressed {
    nth: u64,
    suppressed: u64,
}

impl core::fmt::Display for Suppressed {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.nth < RateLimit::FIRST {
            Ok(())
        } else if self.nth == RateLimit::FIRST {
            f.write_str("; further unknown hypercalls are logged at power-of-two counts only")
        } else {
            write!(
                f,
                "; unknown hypercall #{}, {} not logged since the previous line",
                self.nth, self.suppressed
            )
        }
    }
}

/// What the vCPU loop does after a hypercall.
pub enum Outcome {
    /// Return to the guest after the instruction.
    Return,
    /// Stop the calling vCPU.
    Stop(StopReason),
}

/// Handles the hypercall the vCPU just made.
pub fn dispatch(guest: &Guest, vcpu_index: usize, vcpu: &mut Vcpu) -> Outcome {
    let number = vcpu.reg(Reg::Rax);
    let call = Call::from_number(number);
    if call == Some(Call::Exit) {
        return Outcome::Stop(StopReason::Exited(vcpu.reg(Reg::Rdi)));
    }
    if let (Some(c), Some(dma)) = (call, guest.dma())
        && c.number() >= Call::DmaQuery.number()
    {
        let args = Args::new([
            vcpu.reg(Reg::Rdi),
            vcpu.reg(Reg::Rsi),
            vcpu.reg(Reg::Rdx),
            vcpu.reg(Reg::R10),
            vcpu.reg(Reg::R8),
            vcpu.reg(Reg::R9),
        ]);
        let r = dma.hypercall(vcpu_index, c, &args);
        vcpu.set_reg(Reg::Rax, r.rax);
        vcpu.set_reg(Reg::Rdx, r.values[0]);
        vcpu.set_reg(Reg::R8, r.values[1]);
        vcpu.set_reg(Reg::R9, r.values[2]);
        return Outcome::Return;
    }
    let result = match call {
        Some(Call::Version) => Ok(moat_abi::ABI_VERSION as u64),
        Some(Call::ConsoleWrite) => console_write(guest, vcpu_index, vcpu),
        Some(Call::Nop) => Ok(0),
        _ => {
            // A guest can make these as fast as it likes: rate-limited, with the count of
            // the lines left out.
            if let Verdict::Log { nth, suppressed } = UNKNOWN_CALLS.event() {
                log::warn!(
                    "guest {} vcpu{vcpu_index}: unknown hypercall {number:#x}: returned UNSUPP ({}){}",
                    guest.name(),
                    Status::Unsupp.raw(),
                    Suppressed { nth, suppressed }
                );
            }
            Err(Status::Unsupp)
        }
    };
    let (status, value) = match result {
        Ok(v) => (Status::Ok, v),
        Err(s) => (s, 0),
    };
    vcpu.set_reg(Reg::Rax, status.raw() as u64);
    vcpu.set_reg(Reg::Rdx, value);
    Outcome::Return
}

fn console_write(guest: &Guest, vcpu_index: usize, vcpu: &mut Vcpu) -> Result<u64, Status> {
    let (gpa, len) = (vcpu.reg(Reg::Rdi), vcpu.reg(Reg::Rsi));
    if len > CONSOLE_MAX {
        return Err(Status::Range);
    }
    let mut buf = [0u8; CONSOLE_MAX as usize];
    let buf = &mut buf[..len as usize];
    // Copied once out of guest memory, then only the copy is looked at.
    guest.read(gpa, buf).map_err(|_| Status::Fault)?;
    guest.console(vcpu_index, buf);
    Ok(len)
}

/// Emulates CPUID: the guest's view from [`moat_abi::cpuid::GuestCpu`] (host values with the
/// hypervisor bit set, virtualization hidden and x2APIC shown, the TSC / APIC timer leaves,
/// plus the hypervisor leaves) for vCPU `index`, whose APIC ID it reports.
pub fn cpuid(guest: &Guest, index: usize, vcpu: &mut Vcpu) {
    let leaf = vcpu.reg(Reg::Rax) as u32;
    let sub = vcpu.reg(Reg::Rcx) as u32;
    let view = GuestCpu {
        calls: calls(guest),
        instruction: super::hypercall_instruction(),
        tsc_khz: crate::arch::tsc::khz(),
        timer_tsc_ratio: moat_x86arch::lapic::TSC_PER_TICK as u32,
        apic_id: index as u32,
    };
    let r = view.leaf(leaf, || crate::arch::x86::cpuid(leaf, sub));
    vcpu.set_reg(Reg::Rax, r.eax as u64);
    vcpu.set_reg(Reg::Rbx, r.ebx as u64);
    vcpu.set_reg(Reg::Rcx, r.ecx as u64);
    vcpu.set_reg(Reg::Rdx, r.edx as u64);
}
