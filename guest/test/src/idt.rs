//! A minimal IDT for the `msr` test: vector 13 (#GP) counts the fault and skips the 2-byte
//! RDMSR/WRMSR that raised it. Every other vector is absent, so any other exception still ends
//! in a triple fault (which the `triple-fault` test relies on; it runs without this IDT).

use core::sync::atomic::{AtomicU64, Ordering};

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

/// Installs the IDT with the #GP handler (code selector 0x08 of the hypervisor-built GDT).
pub fn install() {
    let handler = gp_entry();
    let low = (handler & 0xffff) | 0x08 << 16 | 0x8e00 << 32 | (handler >> 16 & 0xffff) << 48;
    let high = handler >> 32;
    // SAFETY: only vCPU 0 runs tests, once at a time; the IDT is a static that lives forever.
    unsafe {
        let idt = &mut *core::ptr::addr_of_mut!(IDT);
        idt.0[26] = low;
        idt.0[27] = high;
        let ptr = (core::mem::size_of::<Idt>() as u64 - 1) as u16;
        let base = idt.0.as_ptr() as u64;
        let mut desc = [0u8; 10];
        desc[..2].copy_from_slice(&ptr.to_le_bytes());
        desc[2..].copy_from_slice(&base.to_le_bytes());
        core::arch::asm!("lidt [{}]", in(reg) desc.as_ptr(), options(nostack));
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
