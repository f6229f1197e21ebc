//! Start-up of application processors (APs).
//!
//! After INIT-SIPI-SIPI an AP starts in real mode at `CS:IP = (vector << 8):0`. The trampoline
//! below is copied by the BSP to a free page under 1 MiB and is position independent: it derives
//! its base from `CS`, so the page can be any free one. Its layout:
//!
//! | offset  | contents                                                                   |
//! |---------|----------------------------------------------------------------------------|
//! | `0x000` | 16-bit code: load the trampoline GDT, enter protected mode                 |
//! | `0x080` | 32-bit code: PAE, `CR3`, `EFER.LME/NXE`, paging, far return to 64-bit code |
//! | `0xF00` | GDTR (limit, base): base patched by [`install`]                            |
//! | `0xF10` | GDT: null, 32-bit code `0x08`, data `0x10`, 64-bit code `0x18`             |
//! | `0xFC0` | `CR3` for the AP (below 4 GiB), patched by [`install`]                     |
//! | `0xFC8` | 64-bit entry address, patched by [`install`]                               |
//!
//! The 64-bit entry (`moat_ap_entry64`, in ordinary kernel text) loads the stack and CPU index
//! the BSP published with [`publish`] and calls the kernel's `moat_ap_main(cpu: u64) -> !`.
//! The BSP starts one AP at a time and waits for it to report in before it publishes the next.

use core::sync::atomic::{AtomicU64, Ordering};

/// Size of the trampoline page.
pub const TRAMPOLINE_SIZE: usize = 4096;
const OFF_GDTR: usize = 0xF00;
const OFF_GDT: usize = 0xF10;
const OFF_CR3: usize = 0xFC0;
const OFF_ENTRY64: usize = 0xFC8;

/// Stack top for the AP being started (read by `moat_ap_entry64`).
#[unsafe(no_mangle)]
pub static MOAT_AP_STACK_TOP: AtomicU64 = AtomicU64::new(0);
/// CPU index for the AP being started (read by `moat_ap_entry64`).
#[unsafe(no_mangle)]
pub static MOAT_AP_CPU_INDEX: AtomicU64 = AtomicU64::new(0);

#[cfg(target_os = "none")]
core::arch::global_asm!(
    r#"
    .section .rodata.ap_trampoline, "a"
    .balign 4096
    .global moat_ap_trampoline_start
moat_ap_trampoline_start:
    .code16
    cli
    cld
    mov ax, cs
    mov ds, ax
    mov ss, ax
    mov sp, 0xE00
    xor ebx, ebx
    mov bx, ax
    shl ebx, 4
    lgdt [0xF00]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    mov eax, ebx
    add eax, 0x80
    .byte 0x66, 0x6a, 0x08
    .byte 0x66, 0x50
    .byte 0x66, 0xcb

    .balign 128
    .code32
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    lea esp, [ebx + 0xE00]
    push 0x18
    push dword ptr [ebx + 0xFC8]
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov eax, dword ptr [ebx + 0xFC0]
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x900
    wrmsr
    mov eax, cr0
    or eax, 0x80010001
    mov cr0, eax
    retf

    .balign 4096
    .global moat_ap_trampoline_end
moat_ap_trampoline_end:
    .code64

    .section .text.ap_entry64, "ax"
    .global moat_ap_entry64
moat_ap_entry64:
"#,
    load_flat_data_segments!(),
    r#"
    mov rsp, qword ptr [rip + MOAT_AP_STACK_TOP]
    mov rdi, qword ptr [rip + MOAT_AP_CPU_INDEX]
    xor ebp, ebp
    call moat_ap_main
7:
    cli
    hlt
    jmp 7b
"#
);

/// GDT used by the trampoline until the AP loads its own: null, 32-bit code, data, 64-bit code.
///
/// Every descriptor has its Accessed bit (bit 40) already set. The CPU sets that bit in the
/// GDT when it loads a descriptor that lacks it, and the far return into the 64-bit code
/// segment happens after paging is on, where the trampoline page is mapped read-only (R+X,
/// W^X) and CR0.WP is set: that write is a #PF with no IDT yet (the AP still has the real-mode
/// IDTR), so #DF, then a triple fault. Bochs performs the write (and resets the machine, as a
/// real CPU would); QEMU's TCG skips it, which hid the bug.
const TRAMPOLINE_GDT: [u64; 4] = [
    0,
    0x00cf_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x00af_9b00_0000_ffff,
];

/// The descriptor Accessed bit: set in every trampoline descriptor (see [`TRAMPOLINE_GDT`]).
pub const DESCRIPTOR_ACCESSED: u64 = 1 << 40;

/// Errors installing the trampoline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrampolineError {
    /// The page must be 4 KiB aligned and below 1 MiB (a SIPI vector is 8 bits of page number).
    BadBase(u64),
    /// `CR3` must be below 4 GiB: the AP loads it in 32-bit mode.
    Cr3Above4G(u64),
}

/// The SIPI vector that starts an AP at `base`.
pub const fn sipi_vector(base: u64) -> u8 {
    (base >> 12) as u8
}

/// Builds the trampoline image for a page at `base` into `page`.
///
/// `code` is the trampoline code (see [`trampoline_code`]); `entry64` the address of the 64-bit
/// entry; `cr3` the page-table root the AP switches to.
pub fn build_image(
    page: &mut [u8; TRAMPOLINE_SIZE],
    code: &[u8],
    base: u64,
    cr3: u64,
    entry64: u64,
) -> Result<(), TrampolineError> {
    if !base.is_multiple_of(4096) || base >= 0x10_0000 {
        return Err(TrampolineError::BadBase(base));
    }
    if cr3 >= 1 << 32 {
        return Err(TrampolineError::Cr3Above4G(cr3));
    }
    let n = code.len().min(OFF_GDTR);
    page.fill(0);
    page[..n].copy_from_slice(&code[..n]);
    let gdt_base = (base as u32) + OFF_GDT as u32;
    let limit = (TRAMPOLINE_GDT.len() * 8 - 1) as u16;
    page[OFF_GDTR..OFF_GDTR + 2].copy_from_slice(&limit.to_le_bytes());
    page[OFF_GDTR + 2..OFF_GDTR + 6].copy_from_slice(&gdt_base.to_le_bytes());
    for (i, d) in TRAMPOLINE_GDT.iter().enumerate() {
        page[OFF_GDT + i * 8..OFF_GDT + i * 8 + 8].copy_from_slice(&d.to_le_bytes());
    }
    page[OFF_CR3..OFF_CR3 + 8].copy_from_slice(&cr3.to_le_bytes());
    page[OFF_ENTRY64..OFF_ENTRY64 + 8].copy_from_slice(&entry64.to_le_bytes());
    Ok(())
}

/// The trampoline code as linked into the kernel image, and the 64-bit entry address.
#[cfg(target_os = "none")]
pub fn trampoline_code() -> (&'static [u8], u64) {
    unsafe extern "C" {
        static moat_ap_trampoline_start: u8;
        static moat_ap_trampoline_end: u8;
        fn moat_ap_entry64();
    }
    // SAFETY: both symbols are defined by the asm above, in one section, start before end; the
    // bytes between them are immutable code.
    unsafe {
        let start = core::ptr::addr_of!(moat_ap_trampoline_start);
        let end = core::ptr::addr_of!(moat_ap_trampoline_end);
        let len = end as usize - start as usize;
        (
            core::slice::from_raw_parts(start, len),
            moat_ap_entry64 as *const () as u64,
        )
    }
}

/// Publishes the stack and CPU index for the next AP to start. The BSP calls this before the
/// SIPI and must not call it again until that AP has reported in.
pub fn publish(cpu_index: u64, stack_top: u64) {
    MOAT_AP_STACK_TOP.store(stack_top, Ordering::SeqCst);
    MOAT_AP_CPU_INDEX.store(cpu_index, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_layout() {
        let mut page = [0xAAu8; TRAMPOLINE_SIZE];
        let code = [0x90u8; 200];
        build_image(&mut page, &code, 0x8000, 0x1234_5000, 0x20_1000).unwrap();
        assert_eq!(&page[..200], &code[..]);
        let u64_at = |at: usize| u64::from_le_bytes(page[at..at + 8].try_into().unwrap());
        assert_eq!(u16::from_le_bytes([page[0xF00], page[0xF01]]), 31);
        assert_eq!(
            u32::from_le_bytes(page[0xF02..0xF06].try_into().unwrap()),
            0x8F10
        );
        assert_eq!(u64_at(0xF18), 0x00cf_9b00_0000_ffff);
        assert_eq!(u64_at(0xFC0), 0x1234_5000);
        assert_eq!(u64_at(0xFC8), 0x20_1000);
        assert_eq!(sipi_vector(0x8000), 8);
    }

    #[test]
    fn every_descriptor_is_already_accessed() {
        // The AP loads the 64-bit code segment with paging on and the trampoline page
        // read-only: a clear Accessed bit would make the CPU write the GDT there (a #PF).
        for d in TRAMPOLINE_GDT.iter().skip(1) {
            assert_ne!(d & DESCRIPTOR_ACCESSED, 0, "{d:#x}");
        }
    }

    #[test]
    fn rejects_bad_placement() {
        let mut page = [0u8; TRAMPOLINE_SIZE];
        assert_eq!(
            build_image(&mut page, &[], 0x8100, 0x1000, 0),
            Err(TrampolineError::BadBase(0x8100))
        );
        assert_eq!(
            build_image(&mut page, &[], 0x10_0000, 0x1000, 0),
            Err(TrampolineError::BadBase(0x10_0000))
        );
        assert_eq!(
            build_image(&mut page, &[], 0x8000, 1 << 32, 0),
            Err(TrampolineError::Cr3Above4G(1 << 32))
        );
    }
}
