//! Thin, named wrappers around the x86 instructions the kernel uses (port I/O, MSRs, control
//! registers, TSC, CPUID, halting), on top of the `x86_64` crate's typed accessors. Every
//! `unsafe` instruction keeps its contract here.

use x86_64::instructions::{hlt, interrupts, port::Port};
use x86_64::registers::control::Cr3;
use x86_64::registers::model_specific::Msr;
use x86_64::structures::paging::PhysFrame;
use x86_64::PhysAddr;

/// Writes a byte to an I/O port.
///
/// # Safety
/// The port must belong to a device the caller drives; the write has device side effects.
#[inline]
pub unsafe fn outb(port: u16, v: u8) {
    // SAFETY: contract above.
    unsafe { Port::new(port).write(v) }
}

/// Writes a dword to an I/O port.
///
/// # Safety
/// As [`outb`].
#[inline]
pub unsafe fn outl(port: u16, v: u32) {
    // SAFETY: contract above.
    unsafe { Port::new(port).write(v) }
}

/// Reads a model-specific register.
///
/// # Safety
/// The MSR must exist on this CPU (else #GP).
#[inline]
pub unsafe fn rdmsr(msr: u32) -> u64 {
    // SAFETY: contract above.
    unsafe { Msr::new(msr).read() }
}

/// Writes a model-specific register.
///
/// # Safety
/// The MSR must exist and the value must be valid and safe for the kernel's state.
#[inline]
pub unsafe fn wrmsr(msr: u32, v: u64) {
    // SAFETY: contract above.
    unsafe { Msr::new(msr).write(v) }
}

/// Reads the time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects and is always allowed at CPL 0.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// CPUID leaf/subleaf, raw (for passing leaves through to guests), in the ABI's register
/// type. Feature bits are read through `raw_cpuid`'s named accessors instead.
#[inline]
pub fn cpuid(leaf: u32, sub: u32) -> moat_abi::cpuid::CpuidRegs {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    moat_abi::cpuid::CpuidRegs {
        eax: r.eax,
        ebx: r.ebx,
        ecx: r.ecx,
        edx: r.edx,
    }
}

/// This CPU's initial local APIC id (CPUID leaf 1).
pub fn initial_apic_id() -> u32 {
    raw_cpuid::CpuId::new()
        .get_feature_info()
        .map_or(0, |f| u32::from(f.initial_local_apic_id()))
}

/// Loads CR3 (switches address space) with the PML4 at `pml4` (a page offset, normally 0,
/// goes into the PCD/PWT bits unchanged).
///
/// # Safety
/// `pml4` must be a valid PML4 that maps the running code, stack and all live data.
#[inline]
pub unsafe fn write_cr3(pml4: crate::mm::PhysAddr) {
    let frame = PhysFrame::containing_address(PhysAddr::new_truncate(pml4.as_u64()));
    // SAFETY: contract above; the low 12 bits (PCD/PWT) are passed through unchanged.
    unsafe { Cr3::write_raw(frame, pml4.page_offset() as u16) }
}

/// Disables interrupts and halts forever.
pub fn halt_forever() -> ! {
    loop {
        interrupts::disable();
        hlt();
    }
}

/// Runs `f` with interrupts enabled on this CPU, then disables them again. The hypervisor
/// otherwise runs with interrupts off; this is where device and fault interrupts are taken.
/// Called with a [`crate::sync::IrqMutex`] held it lets in the interrupts that lock keeps out:
/// only the VT-d self-test does that, on purpose, to exercise the handler's `try_lock` path.
pub fn with_interrupts<R>(f: impl FnOnce() -> R) -> R {
    // The IDT is loaded and every vector has a handler.
    interrupts::enable();
    let r = f();
    interrupts::disable();
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
    /// Local APIC base.
    pub const APIC_BASE: u32 = 0x1B;
}
