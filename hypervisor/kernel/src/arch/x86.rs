//! Thin, named wrappers around the x86 instructions the kernel uses (port I/O, MSRs, control
//! registers, TSC, halting). Every `unsafe` instruction lives here with its contract.

use core::arch::asm;

/// Writes a byte to an I/O port.
///
/// # Safety
/// The port must belong to a device the caller drives; the write has device side effects.
#[inline]
pub unsafe fn outb(port: u16, v: u8) {
    // SAFETY: contract above.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
///
/// # Safety
/// As [`outb`]: reads may have device side effects.
#[inline]
pub unsafe fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: contract above.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Writes a dword to an I/O port.
///
/// # Safety
/// As [`outb`].
#[inline]
pub unsafe fn outl(port: u16, v: u32) {
    // SAFETY: contract above.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a model-specific register.
///
/// # Safety
/// The MSR must exist on this CPU (else #GP).
#[inline]
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: contract above.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    ((hi as u64) << 32) | lo as u64
}

/// Writes a model-specific register.
///
/// # Safety
/// The MSR must exist and the value must be valid and safe for the kernel's state.
#[inline]
pub unsafe fn wrmsr(msr: u32, v: u64) {
    // SAFETY: contract above.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack, preserves_flags))
    }
}

/// Reads the time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects and is always allowed at CPL 0.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// CPUID leaf/subleaf.
#[inline]
pub fn cpuid(leaf: u32, sub: u32) -> core::arch::x86_64::CpuidResult {
    core::arch::x86_64::__cpuid_count(leaf, sub)
}

/// Reads CR0, CR2, CR3 or CR4.
#[inline]
pub fn read_cr(n: u8) -> u64 {
    let v: u64;
    // SAFETY: reading control registers has no side effects at CPL 0.
    unsafe {
        match n {
            0 => asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags)),
            2 => asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)),
            3 => asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)),
            _ => asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)),
        }
    }
    v
}

/// Loads CR3 (switches address space).
///
/// # Safety
/// `pml4` must be a valid PML4 that maps the running code, stack and all live data.
#[inline]
pub unsafe fn write_cr3(pml4: u64) {
    // SAFETY: contract above.
    unsafe { asm!("mov cr3, {}", in(reg) pml4, options(nostack, preserves_flags)) }
}

/// Disables interrupts and halts forever.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: CLI+HLT only stops this CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Runs `f` with interrupts enabled on this CPU, then disables them again. The hypervisor
/// otherwise runs with interrupts off; this is where device and fault interrupts are taken.
pub fn with_interrupts<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: the IDT is loaded and every vector has a handler; the caller holds no lock an
    // interrupt handler takes without try_lock.
    unsafe { asm!("sti", options(nomem, nostack)) };
    let r = f();
    // SAFETY: CLI only masks interrupts on this CPU.
    unsafe { asm!("cli", options(nomem, nostack)) };
    r
}

/// Opens a short interrupt window so pending interrupts are taken now. A loop, not a single
/// instruction: emulators (QEMU TCG) only recognise interrupts between blocks of code, and a
/// branch ends a block.
pub fn take_pending_interrupts() {
    with_interrupts(|| {
        let mut i = 0u32;
        while core::hint::black_box(i) < 64 {
            core::hint::spin_loop();
            i += 1;
        }
    })
}

/// Spin-loop hint.
#[inline]
pub fn pause() {
    core::hint::spin_loop();
}

/// MSR numbers used by the kernel.
pub mod msr {
    /// Extended feature enable register.
    pub const EFER: u32 = 0xC000_0080;
    /// GS base (per-CPU data pointer).
    pub const GS_BASE: u32 = 0xC000_0101;
    /// Local APIC base.
    pub const APIC_BASE: u32 = 0x1B;
}
