//! The Moat guest ABI as this guest uses it: boot information, CPUID leaves, hypercalls.
//!
//! These numbers mirror `hypervisor/kernel/src/vm/{guest,hypercall}.rs` (ABI version 1).

use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};

/// `BootInfo::magic`.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"MOATBOOT");

/// What the hypervisor leaves at guest-physical 0x1000 (pointer in RDI at entry).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// Layout version.
    pub version: u32,
    /// vCPUs of this guest.
    pub vcpus: u32,
    /// RAM bytes at guest-physical 0.
    pub mem_size: u64,
    /// TSC frequency in kHz.
    pub tsc_khz: u64,
    /// Command line address.
    pub cmdline_gpa: u64,
    /// Command line length.
    pub cmdline_len: u64,
    /// Guest name, NUL padded.
    pub name: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<BootInfo>() == 64);

/// Hypercall numbers.
pub mod call {
    /// ABI version in the value.
    pub const VERSION: u64 = 0;
    /// Console write (GPA, length).
    pub const CONSOLE_WRITE: u64 = 1;
    /// Stop this vCPU with a code.
    pub const EXIT: u64 = 2;
    /// Nothing.
    pub const NOP: u64 = 3;
}

/// Status: success.
pub const OK: i64 = 0;
/// Status: a guest address the guest does not own.
pub const FAULT: i64 = -8;
/// Status: unknown call.
pub const UNSUPP: i64 = -9;

static USE_VMCALL: AtomicBool = AtomicBool::new(false);

/// Chooses the hypercall instruction from CPUID `0x4000_0001` ECX (1 VMMCALL, 2 VMCALL).
pub fn select_instruction(ecx: u32) {
    USE_VMCALL.store(ecx == 2, Ordering::Relaxed);
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
