//! The VMX instructions on the current VMCS, named and typed: VMXON, VMCLEAR, VMPTRLD,
//! VMREAD/VMWRITE by [`Field`], INVEPT and INVVPID. Every one reports VMfail as an `Err` with
//! the VM-instruction error number when the CPU gives one.

use core::arch::asm;

use moat_x86arch::vmx::{field, Field};

use crate::mm::PhysAddr;

/// A failed VMX instruction: `Some(n)` is VMfailValid with VM-instruction error `n`, `None`
/// VMfailInvalid (no current VMCS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmFail(pub Option<u32>);

impl VmFail {
    /// What the failure means, for log lines.
    pub fn describe(self) -> &'static str {
        match self.0 {
            Some(n) => moat_x86arch::vmx::instruction_error(n),
            None => "VMfailInvalid (no current VMCS or bad operand)",
        }
    }
}

/// Decodes RFLAGS after a VMX instruction (CF: VMfailInvalid, ZF: VMfailValid).
fn check(rflags: u64) -> Result<(), VmFail> {
    if rflags & 1 != 0 {
        Err(VmFail(None))
    } else if rflags & (1 << 6) != 0 {
        Err(VmFail(Some(read(field::VM_INSTRUCTION_ERROR) as u32)))
    } else {
        Ok(())
    }
}

/// Runs the VMX instruction `$insn` on the region at physical `$pa` (a 64-bit memory
/// operand holding the address) and decodes VMfail. Only inside an `unsafe fn` whose contract
/// makes the instruction sound.
macro_rules! on_region {
    ($insn:literal, $pa:expr) => {{
        let pa: u64 = PhysAddr::as_u64($pa);
        let flags: u64;
        // SAFETY: the calling function's contract.
        unsafe {
            asm!(concat!($insn, " [{pa}]"), "pushfq", "pop {f}", pa = in(reg) &pa, f = out(reg) flags);
        }
        check(flags)
    }};
}

/// VMXON with the region at physical `pa`.
///
/// # Safety
/// CR4.VMXE is set, CR0/CR4 satisfy the fixed bits, `pa` is this CPU's zeroed VMXON region
/// with the revision identifier written, owned forever.
pub unsafe fn vmxon(pa: PhysAddr) -> Result<(), VmFail> {
    on_region!("vmxon", pa)
}

/// VMCLEAR of the VMCS at `pa` (makes it inactive, clear, launch state "clear").
///
/// # Safety
/// In VMX operation; `pa` is a VMCS region owned by the caller.
pub unsafe fn vmclear(pa: PhysAddr) -> Result<(), VmFail> {
    on_region!("vmclear", pa)
}

/// VMPTRLD: makes the VMCS at `pa` current on this CPU.
///
/// # Safety
/// As [`vmclear`]; the VMCS is not current on another CPU.
pub unsafe fn vmptrld(pa: PhysAddr) -> Result<(), VmFail> {
    on_region!("vmptrld", pa)
}

/// Reads a field of the current VMCS (0 when it cannot be read).
pub fn read(f: Field) -> u64 {
    let v: u64;
    // SAFETY: VMREAD only reads the current VMCS; without one it fails (flags), which is
    // ignored here and yields 0. The backend only calls it with its VMCS current.
    unsafe {
        asm!("vmread {v}, {f}", f = in(reg) u64::from(f.0), v = out(reg) v, options(nostack));
    }
    v
}

/// Writes a field of the current VMCS.
///
/// # Safety
/// The current VMCS is the caller's; the value is one the caller checked (host state and
/// controls decide what the CPU does on the next exit).
pub unsafe fn write(f: Field, v: u64) -> Result<(), VmFail> {
    let flags: u64;
    // SAFETY: contract above.
    unsafe {
        asm!("vmwrite {f}, {v}", "pushfq", "pop {fl}", f = in(reg) u64::from(f.0), v = in(reg) v,
             fl = out(reg) flags);
    }
    check(flags)
}

/// INVEPT single-context for `eptp`.
///
/// # Safety
/// In VMX operation with single-context INVEPT supported.
pub unsafe fn invept_single(eptp: u64) -> Result<(), VmFail> {
    let desc: [u64; 2] = [eptp, 0];
    let flags: u64;
    // SAFETY: contract above; the descriptor lives on the stack for the instruction.
    unsafe {
        asm!("invept {t}, [{d}]", "pushfq", "pop {f}", t = in(reg) 1u64, d = in(reg) &desc,
             f = out(reg) flags);
    }
    check(flags)
}

/// INVVPID single-context for `vpid`.
///
/// # Safety
/// In VMX operation with single-context INVVPID supported; `vpid` is not 0.
pub unsafe fn invvpid_single(vpid: u16) -> Result<(), VmFail> {
    let desc: [u64; 2] = [u64::from(vpid), 0];
    let flags: u64;
    // SAFETY: contract above.
    unsafe {
        asm!("invvpid {t}, [{d}]", "pushfq", "pop {f}", t = in(reg) 1u64, d = in(reg) &desc,
             f = out(reg) flags);
    }
    check(flags)
}
