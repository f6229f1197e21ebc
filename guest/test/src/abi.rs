//! The Moat guest ABI as this guest uses it: boot information, CPUID leaves, hypercalls.
//!
//! The numbers come from `moat-abi`, the hypervisor's own definition.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};

pub use moat_abi::boot::{BootInfo, BOOT_MAGIC};

/// Hypercall numbers.
pub mod call {
    use moat_abi::Call;
    /// ABI version in the value.
    pub const VERSION: u64 = Call::Version.number();
    /// Console write (GPA, length).
    pub const CONSOLE_WRITE: u64 = Call::ConsoleWrite.number();
    /// Stop this vCPU with a code.
    pub const EXIT: u64 = Call::Exit.number();
    /// Nothing.
    pub const NOP: u64 = Call::Nop.number();
}

/// Status: success.
pub const OK: i64 = moat_abi::Status::Ok.raw();
/// Status: a guest address the guest does not own.
pub const FAULT: i64 = moat_abi::Status::Fault.raw();
/// Status: unknown call.
pub const UNSUPP: i64 = moat_abi::Status::Unsupp.raw();

static USE_VMCALL: AtomicBool = AtomicBool::new(false);

/// Chooses the hypercall instruction from CPUID `0x4000_0001` ECX (1 VMMCALL, 2 VMCALL).
pub fn select_instruction(ecx: u32) {
    USE_VMCALL.store(ecx == 2, Ordering::Relaxed);
}

/// Whether hypercalls use VMCALL (Intel VMX) rather than VMMCALL (AMD SVM).
pub fn uses_vmcall() -> bool {
    USE_VMCALL.load(Ordering::Relaxed)
}

/// Makes hypercall `nr` with up to three arguments; returns (status, value).
#[inline(always)]
pub fn hypercall(nr: u64, a: u64, b: u64, c: u64) -> (i64, u64) {
    let (status, value): (u64, u64);
    if USE_VMCALL.load(Ordering::Relaxed) {
        // SAFETY: VMCALL traps to the hypervisor, which follows the ABI above (RAX and RDX
        // written, every other register preserved).
        unsafe {
            asm!("vmcall", inout("rax") nr => status, in("rdi") a, in("rsi") b,
                 inout("rdx") c => value, options(nostack))
        };
    } else {
        // SAFETY: as above, with VMMCALL (AMD).
        unsafe {
            asm!("vmmcall", inout("rax") nr => status, in("rdi") a, in("rsi") b,
                 inout("rdx") c => value, options(nostack))
        };
    }
    (status as i64, value)
}

/// CPUID.
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Reads the TSC.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Stops this vCPU.
pub fn exit(code: u64) -> ! {
    hypercall(call::EXIT, code, 0, 0);
    loop {
        // SAFETY: HLT only stops this vCPU (the hypervisor stops it on HLT).
        unsafe { asm!("hlt", options(nomem, nostack)) };
    }
}

/// The console: every `write_str` is one console-write hypercall.
pub struct Console;

impl core::fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        // Identity-mapped guest: the string's address is its guest-physical address.
        let (status, _) = hypercall(call::CONSOLE_WRITE, s.as_ptr() as u64, s.len() as u64, 0);
        if status == OK {
            Ok(())
        } else {
            Err(core::fmt::Error)
        }
    }
}

/// Prints a line through the console hypercall.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::abi::Console, format_args!("{}\n", format_args!($($arg)*)));
    }};
}
