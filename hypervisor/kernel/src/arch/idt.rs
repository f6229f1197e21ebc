//! The interrupt descriptor table: one asm entry stub per vector (pushing a dummy error code
//! where the CPU pushes none), a common stub that saves every general-purpose register into a
//! [`TrapFrame`] and calls [`moat_trap_dispatch`]. Exceptions in the hypervisor are fatal: the
//! handler prints a register dump and ends the run with [`ExitCode::Exception`]. An interrupt
//! the local APIC delivers on an exception vector (a device's MSI or a DMA write to
//! 0xFEEx_xxxx can name any vector) is told apart by its in-service bit and, like one on a
//! vector without a handler, counted, logged rate-limited and acknowledged: never fatal.

use x86_64::instructions::tables::lidt;
use x86_64::registers::control::{Cr0, Cr2, Cr3, Cr4};
use x86_64::structures::idt::{Entry, HandlerFunc};
use x86_64::structures::DescriptorTablePointer;
use x86_64::{registers::segmentation::SegmentSelector, VirtAddr};

use crate::exit::{self, ExitCode};

/// Vector for spurious local-APIC interrupts.
pub const SPURIOUS_VECTOR: u8 = 0xFF;

/// Interrupt handlers for vectors 32..=254, as function addresses (0 = none).
static HANDLERS: [core::sync::atomic::AtomicUsize; 256] =
    [const { core::sync::atomic::AtomicUsize::new(0) }; 256];

/// Installs `handler` for `vector` (>= 32). It runs with interrupts off, on the interrupted
/// stack, before the EOI. A lock it shares with other code must be a
/// [`crate::sync::IrqMutex`] (then the code it interrupted cannot hold it), taken with
/// `try_lock` where waiting for another CPU is wrong.
pub fn register(vector: u8, handler: fn()) {
    assert!(
        vector >= 32 && vector != SPURIOUS_VECTOR,
        "vector {vector} is reserved"
    );
    HANDLERS[vector as usize].store(handler as usize, core::sync::atomic::Ordering::SeqCst);
}

/// Handlers that take their vector (`fn(u8)` addresses, 0 = none): one handler shared by a
/// range of vectors (device MSIs).
static VECTORED: [core::sync::atomic::AtomicUsize; 256] =
    [const { core::sync::atomic::AtomicUsize::new(0) }; 256];

/// Installs `handler` for `vector` (>= 32), called with the vector; same rules as
/// [`register`].
pub fn register_vectored(vector: u8, handler: fn(u8)) {
    assert!(
        vector >= 32 && vector != SPURIOUS_VECTOR,
        "vector {vector} is reserved"
    );
    VECTORED[vector as usize].store(handler as usize, core::sync::atomic::Ordering::SeqCst);
}

/// Removes the handler of `vector` (an interrupt on it is then counted as unowned).
pub fn unregister(vector: u8) {
    HANDLERS[vector as usize].store(0, core::sync::atomic::Ordering::SeqCst);
    VECTORED[vector as usize].store(0, core::sync::atomic::Ordering::SeqCst);
}

/// Registers saved on entry, in stack order (lowest address first).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}
const _: () = assert!(core::mem::size_of::<TrapFrame>() == 22 * 8);

// The entry stubs: one per vector, each at `moat_isr_stubs + 16 * vector` (`.org` makes the
// assembler refuse a stub longer than its 16 bytes). A stub pushes a dummy error code where
// the CPU pushes none (every vector but 8, 10-14, 17, 21, 29, 30), then the vector number, and
// jumps to the common stub, which saves the general-purpose registers into a `TrapFrame`.
core::arch::global_asm!(
    r#"
    .section .text.isr, "ax"
    .code64
moat_isr_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    cld
    call moat_trap_dispatch
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    // The dispatcher left in the vector slot how many bytes to drop before IRETQ: 16
    // (vector + error code) or 8 (an external interrupt on a vector whose exception pushes
    // an error code: the CPU pushed none, only the stub's vector is there).
    add rsp, qword ptr [rsp]
    iretq

    .balign 16
    .global moat_isr_stubs
moat_isr_stubs:
    .set moat_isr_vector, 0
    .rept 256
    .if (moat_isr_vector == 8) || ((moat_isr_vector >= 10) && (moat_isr_vector <= 14)) || (moat_isr_vector == 17) || (moat_isr_vector == 21) || (moat_isr_vector == 29) || (moat_isr_vector == 30)
    .else
    push 0
    .endif
    push moat_isr_vector
    jmp moat_isr_common
    .org moat_isr_stubs + 16 * (moat_isr_vector + 1), 0xcc
    .set moat_isr_vector, moat_isr_vector + 1
    .endr
"#
);

/// Bytes between consecutive entry stubs.
const STUB_SIZE: u64 = 16;

/// The interrupt descriptor table: 256 interrupt gates (the `x86_64` crate's gate type), one
/// per entry stub. An array rather than the crate's `InterruptDescriptorTable`: that names the
/// exception gates by field and keeps the reserved vectors private, and every vector here has
/// the same asm stub.
#[repr(C, align(16))]
struct Idt([Entry<HandlerFunc>; 256]);

static IDT: spin::Once<Idt> = spin::Once::new();

fn build() -> Idt {
    unsafe extern "C" {
        static moat_isr_stubs: [u8; 256 * STUB_SIZE as usize];
    }
    let stubs = core::ptr::addr_of!(moat_isr_stubs) as u64;
    let mut idt = Idt([Entry::missing(); 256]);
    for (v, gate) in idt.0.iter_mut().enumerate() {
        let handler = VirtAddr::new(stubs + v as u64 * STUB_SIZE);
        // SAFETY: `handler` is the stub of vector `v` (asm above), which saves every register,
        // handles the error code itself and returns with IRETQ: it fits any gate type. The
        // gate is a present, DPL 0, 64-bit interrupt gate (interrupts off on entry) through
        // the kernel code segment of the GDT every CPU loads (`cpu::init_this_cpu`).
        let options = unsafe { gate.set_handler_addr(handler) };
        // SAFETY: as above, KERNEL_CS is a valid 64-bit code segment.
        unsafe { options.set_code_selector(SegmentSelector(super::cpu::KERNEL_CS)) };
        // #DF, NMI and #MC run on IST1 so a broken stack cannot turn them into a triple fault.
        if matches!(v, 2 | 8 | 18) {
            // SAFETY: every CPU's TSS has IST1 set to its own IST stack (`cpu::init_this_cpu`),
            // used by no other vector.
            unsafe { options.set_stack_index(0) };
        }
    }
    idt
}

/// Loads the IDT on this CPU (building it on first use).
pub fn load() {
    let idt = IDT.call_once(build);
    let p = DescriptorTablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: VirtAddr::from_ptr(idt),
    };
    // SAFETY: the IDT is 'static and every gate points at a stub in this image.
    unsafe { lidt(&p) };
}

const EXCEPTION_NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved 15",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization",
    "#CP control protection",
    "reserved 22",
    "reserved 23",
    "reserved 24",
    "reserved 25",
    "reserved 26",
    "reserved 27",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved 31",
];

/// The whole CR3 (table address and the PCD/PWT bits).
fn cr3() -> u64 {
    let (frame, low) = Cr3::read_raw();
    frame.start_address().as_u64() | u64::from(low)
}

/// Prints a register dump of `f` on the emergency console.
pub fn dump(f: &TrapFrame) {
    use core::fmt::Write;
    let mut w = crate::console::Emergency;
    let _ = writeln!(
        w,
        "  rip={:#018x} cs={:#06x} rflags={:#010x} err={:#x}",
        f.rip, f.cs, f.rflags, f.error
    );
    let _ = writeln!(
        w,
        "  rsp={:#018x} ss={:#06x} cr2={:#018x} cr3={:#018x}",
        f.rsp,
        f.ss,
        Cr2::read_raw(),
        cr3()
    );
    let _ = writeln!(
        w,
        "  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}",
        f.rax, f.rbx, f.rcx, f.rdx
    );
    let _ = writeln!(
        w,
        "  rsi={:#018x} rdi={:#018x} rbp={:#018x} r8 ={:#018x}",
        f.rsi, f.rdi, f.rbp, f.r8
    );
    let _ = writeln!(
        w,
        "  r9 ={:#018x} r10={:#018x} r11={:#018x} r12={:#018x}",
        f.r9, f.r10, f.r11, f.r12
    );
    let _ = writeln!(
        w,
        "  r13={:#018x} r14={:#018x} r15={:#018x}",
        f.r13, f.r14, f.r15
    );
    let _ = writeln!(w, "  cr0={:#x} cr4={:#x}", Cr0::read_raw(), Cr4::read_raw());
}

/// Whether the CPU pushes an error code when it raises exception `v` (the stubs above push a
/// dummy one for every other vector).
const fn exception_pushes_error(v: usize) -> bool {
    matches!(v, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// Bytes the common stub drops after the registers: the vector and the error code.
const DROP_VECTOR_AND_ERROR: u64 = 16;
/// Bytes to drop when only the stub's vector is on the stack (no error code was pushed).
const DROP_VECTOR_ONLY: u64 = 8;

/// Interrupts taken on a vector the hypervisor has no handler for (below 32: delivered by the
/// local APIC, not raised by the CPU), per vector.
static UNOWNED: [core::sync::atomic::AtomicU64; 256] =
    [const { core::sync::atomic::AtomicU64::new(0) }; 256];
/// Rate limit of the "unowned interrupt" log line (all vectors together: a device or a guest
/// can repeat them at will).
static UNOWNED_LOG: crate::ratelimit::RateLimit = crate::ratelimit::RateLimit::new();

/// Logs one line per vector that took interrupts without a handler (an exception-range
/// vector counts only when the local APIC delivered it), or that there were none.
pub fn report_unowned() {
    let mut any = false;
    for (v, n) in UNOWNED.iter().enumerate() {
        let n = n.load(core::sync::atomic::Ordering::Relaxed);
        if n != 0 {
            log::info!("interrupts: vector {v}: {n} taken without a handler (ignored)");
            any = true;
        }
    }
    if !any {
        log::info!("interrupts: none taken without a handler");
    }
}

/// Counts an interrupt on a vector nobody owns, logs it rate-limited, and acknowledges it.
fn unowned(v: usize, rip: u64) {
    let n = UNOWNED[v].fetch_add(1, core::sync::atomic::Ordering::Relaxed) + 1;
    super::apic::eoi();
    if let crate::ratelimit::Verdict::Log { nth, suppressed } = UNOWNED_LOG.event() {
        let kind = if v < 32 {
            "external interrupt on exception vector"
        } else {
            "interrupt on unowned vector"
        };
        log::warn!(
            "{kind} {v} on cpu{} at rip {rip:#x}: ignored ({n} on this vector, {nth} unowned in all, {suppressed} not logged)",
            super::cpu::current_index()
        );
    }
}

/// Called by the common stub with interrupts off.
#[unsafe(no_mangle)]
extern "C" fn moat_trap_dispatch(f: &mut TrapFrame) {
    let v = f.vector as usize;
    f.vector = DROP_VECTOR_AND_ERROR;
    // A vector below 32 is either an exception the CPU raised or an interrupt the local APIC
    // delivered (an MSI or a DMA write to 0xFEEx_xxxx naming that vector). Only the latter
    // sets the vector's in-service bit; NMI (2) never does and stays fatal.
    if v < 32 && v != 2 && super::apic::in_service(v as u8) {
        if exception_pushes_error(v) {
            // No error code on the stack: what the frame calls `error` is the RIP.
            f.vector = DROP_VECTOR_ONLY;
            unowned(v, f.error);
        } else {
            unowned(v, f.rip);
        }
        return;
    }
    if v < 32 {
        crate::console::print_emergency(format_args!(
            "\nmoat: FATAL exception {} (vector {}) on cpu{}\n",
            EXCEPTION_NAMES[v],
            v,
            super::cpu::current_index()
        ));
        dump(f);
        exit::exit(ExitCode::Exception);
    }
    if v == SPURIOUS_VECTOR as usize {
        return;
    }
    let h = HANDLERS[v].load(core::sync::atomic::Ordering::SeqCst);
    if h != 0 {
        // SAFETY: only `register` stores into HANDLERS, and it stores `fn()` addresses.
        let handler: fn() = unsafe { core::mem::transmute::<usize, fn()>(h) };
        handler();
        super::apic::eoi();
        return;
    }
    let h = VECTORED[v].load(core::sync::atomic::Ordering::SeqCst);
    if h != 0 {
        // SAFETY: only `register_vectored` stores into VECTORED, and it stores `fn(u8)`
        // addresses.
        let handler: fn(u8) = unsafe { core::mem::transmute::<usize, fn(u8)>(h) };
        handler(v as u8);
        super::apic::eoi();
        return;
    }
    unowned(v, f.rip);
}
