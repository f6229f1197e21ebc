//! A minimal IDT for the `msr` test: vector 13 (#GP) counts the fault and skips the 2-byte
//! RDMSR/WRMSR that raised it. Every other vector is absent, so any other exception still ends
//! in a triple fault (which the `triple-fault` test relies on; it runs without this IDT).
//! Also what the interrupt tests' IDTs share: gates, loading, STI/CLI, the delivery cost.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// #GP faults taken.
pub static GP_COUNT: AtomicU64 = AtomicU64::new(0);

core::arch::global_asm!(
    r#"
    .section .text
    .global guest_gp_entry
guest_gp_entry:
    lock inc qword ptr [rip + {count}]
    add qword ptr [rsp + 8], 2
    add rsp, 8
    iretq
    "#,
    count = sym GP_COUNT,
);

unsafe extern "C" {
    fn guest_gp_entry();
}

#[repr(C, align(16))]
struct Idt([u64; 2 * 32]);

static mut IDT: Idt = Idt([0; 64]);

/// An interrupt gate to `handler` (code selector 0x08 of the hypervisor-built GDT, present,
/// DPL 0): the two quadwords of its IDT entry.
pub fn gate(handler: u64) -> (u64, u64) {
    (
        (handler & 0xffff) | 0x08 << 16 | 0x8e00 << 32 | (handler >> 16 & 0xffff) << 48,
        handler >> 32,
    )
}

/// Loads `table` (two quadwords per vector) as the IDT.
///
/// # Safety
/// `table` lives as long as it is loaded and holds only valid gates (or zeros).
pub unsafe fn load(table: &[u64]) {
    let limit = (core::mem::size_of_val(table) - 1) as u16;
    let mut desc = [0u8; 10];
    desc[..2].copy_from_slice(&limit.to_le_bytes());
    desc[2..].copy_from_slice(&(table.as_ptr() as u64).to_le_bytes());
    // SAFETY: the caller's contract.
    unsafe { core::arch::asm!("lidt [{}]", in(reg) desc.as_ptr(), options(nostack)) };
}

/// Enables interrupts.
pub fn sti() {
    // SAFETY: the interrupt tests call this with their IDT loaded.
    unsafe { core::arch::asm!("sti", options(nomem, nostack)) };
}

/// Disables interrupts.
pub fn cli() {
    // SAFETY: masks interrupts; always allowed at CPL 0.
    unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
}

/// The cost of interrupts delivered to the guest: TSC cycles from the host's handler that
/// raised it (Moat's MSR 0x4d4f0001) to the guest's handler.
pub struct Cost {
    n: AtomicU64,
    sum: AtomicU64,
    min: AtomicU64,
}

impl Cost {
    /// Nothing recorded.
    pub const fn new() -> Self {
        Cost {
            n: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            min: AtomicU64::new(u64::MAX),
        }
    }

    /// Records one delivery: the guest's handler ran at `now`, the host raised it at `host`
    /// (0: unknown, not recorded).
    pub fn record(&self, now: u64, host: u64) {
        if host != 0 && now > host {
            self.n.fetch_add(1, Ordering::Relaxed);
            self.sum.fetch_add(now - host, Ordering::Relaxed);
            self.min.fetch_min(now - host, Ordering::Relaxed);
        }
    }

    /// (deliveries recorded, minimum, mean) in cycles.
    pub fn summary(&self) -> (u64, u64, u64) {
        let n = self.n.load(Ordering::SeqCst);
        (
            n,
            self.min.load(Ordering::SeqCst),
            self.sum.load(Ordering::SeqCst) / n.max(1),
        )
    }
}

/// The handler [`load_interrupts`] installed: a `fn(u8, u64)` (0: none).
static HANDLER: AtomicUsize = AtomicUsize::new(0);

/// Called by every interrupt stub with the vector and the interrupted RIP.
#[unsafe(no_mangle)]
extern "C" fn guest_interrupt(vector: u64, rip: u64) {
    let h = HANDLER.load(Ordering::Acquire);
    if h != 0 {
        // SAFETY: only `load_interrupts` stores here, the address of a `fn(u8, u64)`.
        let f = unsafe { core::mem::transmute::<usize, fn(u8, u64)>(h) };
        f(vector as u8, rip);
    }
}

// One 16-byte stub per vector 32..=255 (`push rdi; mov edi, vector; jmp`), then the common
// part: saves the caller-saved registers, calls `guest_interrupt(vector, interrupted RIP)`.
core::arch::global_asm!(
    r#"
    .section .text
    .balign 16
    .global guest_interrupt_stubs
guest_interrupt_stubs:
    .set stub_vector, 32
    .rept 224
    .balign 16
    push rdi
    mov edi, stub_vector
    jmp guest_interrupt_common
    .set stub_vector, stub_vector + 1
    .endr
guest_interrupt_common:
    // [rsp] = the stub's RDI, [rsp + 8] = the interrupted RIP.
    push rsi
    mov rsi, [rsp + 16]
    push rax
    push rcx
    push rdx
    push r8
    push r9
    push r10
    push r11
    mov rax, rsp
    and rsp, -16
    push rax
    sub rsp, 8
    call guest_interrupt
    add rsp, 8
    pop rsp
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdx
    pop rcx
    pop rax
    pop rsi
    pop rdi
    iretq
    "#
);

unsafe extern "C" {
    fn guest_interrupt_stubs();
}

/// The interrupt tests' IDT: every vector from 32 to its stub, #GP to the counting handler
/// when asked.
static mut INTERRUPT_IDT: [u64; 2 * 256] = [0; 512];

/// Loads the interrupt tests' IDT on this vCPU with `handler` called for every vector from
/// 32 (with interrupts off, the interrupted RIP as its second argument) and, when `gp`, the
/// #GP handler that skips a faulting RDMSR/WRMSR; other exceptions stay absent (a fault
/// triple-faults). One handler at a time for every vCPU.
pub fn load_interrupts(handler: fn(u8, u64), gp: bool) {
    HANDLER.store(handler as usize, Ordering::Release);
    let stubs = guest_interrupt_stubs as *const () as u64;
    // SAFETY: a static that lives forever; the vCPUs that load it write the same gates (vCPU 1
    // of the MSI tests loads it after vCPU 0, with the same handler).
    unsafe {
        let idt = &mut *core::ptr::addr_of_mut!(INTERRUPT_IDT);
        for v in 13..256u64 {
            let (lo, hi) = match v {
                13 if gp => gate(gp_entry()),
                32.. => gate(stubs + 16 * (v - 32)),
                _ => (0, 0),
            };
            idt[2 * v as usize] = lo;
            idt[2 * v as usize + 1] = hi;
        }
        load(&*core::ptr::addr_of!(INTERRUPT_IDT));
    }
}

/// Installs the IDT with the #GP handler.
pub fn install() {
    let (low, high) = gate(gp_entry());
    // SAFETY: only vCPU 0 runs tests, once at a time; the IDT is a static that lives forever.
    unsafe {
        let idt = &mut *core::ptr::addr_of_mut!(IDT);
        idt.0[26] = low;
        idt.0[27] = high;
        load(&idt.0);
    }
}

/// The address of the #GP handler (for other test IDTs).
pub fn gp_entry() -> u64 {
    guest_gp_entry as *const () as u64
}

/// Drops the IDT again (limit 0).
pub fn remove() {
    let desc = [0u8; 10];
    // SAFETY: an empty IDT: any exception escalates to a triple fault, as at entry.
    unsafe { core::arch::asm!("lidt [{}]", in(reg) desc.as_ptr(), options(nostack)) };
}

/// #GP faults taken so far.
pub fn gp_count() -> u64 {
    GP_COUNT.load(Ordering::SeqCst)
}
