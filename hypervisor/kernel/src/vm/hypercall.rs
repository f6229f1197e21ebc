//! Hypercalls and the hypervisor's CPUID leaves.
//!
//! # ABI (version 1)
//!
//! A guest issues `VMMCALL` (AMD) with the call number in RAX and arguments in RDI, RSI, RDX.
//! The hypervisor returns a [`Status`] in RAX (0 or a negative code) and a value in RDX; every
//! other register is preserved. CPUID leaf `0x4000_0000` returns the highest hypervisor leaf
//! in EAX and `"MoatMoatMoat"` in EBX, ECX, EDX; leaf `0x4000_0001` returns the ABI version
//! in EAX, the feature bits ([`FEATURES`]) in EBX and the hypercall instruction in ECX
//! (1 = VMMCALL, 2 = VMCALL).
//!
//! The test guest (`tests/guest`) carries its own copy of these numbers; they move to a shared
//! ABI crate with the paravirtual DMA interface.

use super::guest::{Guest, StopReason};
use super::vcpu::{Reg, Vcpu};

/// ABI version reported by [`Call::Version`] and CPUID `0x4000_0001`.
pub const ABI_VERSION: u64 = 1;
/// Highest hypervisor CPUID leaf.
pub const CPUID_MAX_LEAF: u32 = 0x4000_0001;
/// `"MoatMoatMoat"` split over EBX, ECX, EDX.
pub const SIGNATURE: [u8; 12] = *b"MoatMoatMoat";
/// Feature bits of CPUID `0x4000_0001` EBX: one per implemented call.
pub const FEATURES: u32 = 1 << Call::Version as u32
    | 1 << Call::ConsoleWrite as u32
    | 1 << Call::Exit as u32
    | 1 << Call::Nop as u32;
/// Most bytes one console write takes.
pub const CONSOLE_MAX: u64 = 4096;

/// Hypercall status codes returned in RAX. The whole set is ABI (the paravirtual DMA calls
/// use the rest), so codes no call returns yet are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i64)]
#[allow(dead_code)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// Invalid argument.
    Inval = -1,
    /// Not permitted.
    Perm = -2,
    /// No such object.
    Noent = -3,
    /// Already exists.
    Exist = -4,
    /// Out of range.
    Range = -5,
    /// Out of memory.
    Nomem = -6,
    /// Try again.
    Again = -7,
    /// A guest address the guest does not own.
    Fault = -8,
    /// Unknown or unsupported call.
    Unsupp = -9,
    /// Busy.
    Busy = -10,
}

/// Call numbers (RAX).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Call {
    /// Returns the ABI version in RDX.
    Version = 0,
    /// Writes RSI bytes at guest-physical RDI to the console; RDX = bytes written.
    ConsoleWrite = 1,
    /// Stops the calling vCPU with exit code RDI. Does not return.
    Exit = 2,
    /// Does nothing (round-trip measurements).
    Nop = 3,
}

/// What the vCPU loop does after a hypercall.
pub enum Outcome {
    /// Return to the guest after the instruction.
    Return,
    /// Stop the calling vCPU.
    Stop(StopReason),
}

type Handler = fn(&Guest, usize, &mut Vcpu) -> Result<u64, Status>;

/// The dispatch table, indexed by call number.
const TABLE: [Option<Handler>; 4] = [
    Some(|_, _, _| Ok(ABI_VERSION)),
    Some(console_write),
    None, // Exit: handled before the table, it does not return to the guest.
    Some(|_, _, _| Ok(0)),
];

/// Handles the hypercall the vCPU just made.
pub fn dispatch(guest: &Guest, vcpu_index: usize, vcpu: &mut Vcpu) -> Outcome {
    let number = vcpu.reg(Reg::Rax);
    if number == Call::Exit as u64 {
        return Outcome::Stop(StopReason::Exited(vcpu.reg(Reg::Rdi)));
    }
    let handler = usize::try_from(number)
        .ok()
        .and_then(|n| TABLE.get(n).copied().flatten());
    let result = match handler {
        Some(h) => h(guest, vcpu_index, vcpu),
        None => {
            log::warn!(
                "guest {} vcpu{vcpu_index}: unknown hypercall {number:#x}: returned UNSUPP ({})",
                guest.name(),
                Status::Unsupp as i64
            );
            Err(Status::Unsupp)
        }
    };
    let (status, value) = match result {
        Ok(v) => (Status::Ok, v),
        Err(s) => (s, 0),
    };
    vcpu.set_reg(Reg::Rax, status as i64 as u64);
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

/// Emulates CPUID: the host's values with the hypervisor bit set and SVM hidden, plus the
/// hypervisor leaves.
pub fn cpuid(vcpu: &mut Vcpu) {
    let leaf = vcpu.reg(Reg::Rax) as u32;
    let sub = vcpu.reg(Reg::Rcx) as u32;
    let word = |i: usize| {
        u32::from_le_bytes([
            SIGNATURE[i],
            SIGNATURE[i + 1],
            SIGNATURE[i + 2],
            SIGNATURE[i + 3],
        ])
    };
    let (a, b, c, d) = match leaf {
        0x4000_0000 => (CPUID_MAX_LEAF, word(0), word(4), word(8)),
        0x4000_0001 => (ABI_VERSION as u32, FEATURES, 1, 0),
        0x4000_0002..=0x4000_00ff => (0, 0, 0, 0),
        _ => {
            let r = crate::arch::x86::cpuid(leaf, sub);
            match leaf {
                // Hypervisor present; no x2APIC, no MONITOR, no VMX.
                1 => (
                    r.eax,
                    r.ebx,
                    (r.ecx | 1 << 31) & !(1 << 21 | 1 << 3 | 1 << 5),
                    r.edx,
                ),
                // No SVM inside the guest.
                0x8000_0001 => (r.eax, r.ebx, r.ecx & !(1 << 2), r.edx),
                0x8000_000a => (0, 0, 0, 0),
                _ => (r.eax, r.ebx, r.ecx, r.edx),
            }
        }
    };
    vcpu.set_reg(Reg::Rax, a as u64);
    vcpu.set_reg(Reg::Rbx, b as u64);
    vcpu.set_reg(Reg::Rcx, c as u64);
    vcpu.set_reg(Reg::Rdx, d as u64);
}
