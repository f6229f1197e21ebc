//! The multiboot2 header and the BSP's 32-bit entry point.
//!
//! GRUB (BIOS or UEFI) loads the ELF at its physical addresses and jumps to `_start` in 32-bit
//! protected mode with paging off, `EAX` = multiboot2 magic and `EBX` = physical address of the
//! multiboot2 information. The code below checks both, checks for long mode, identity-maps the
//! first 4 GiB with 2 MiB pages (writable, executable: the kernel replaces these tables with
//! W^X ones as soon as it has a frame allocator), enables PAE, long mode, NX and write
//! protection, and calls `moat_boot_main(magic: u32, mbi: u32) -> !` on a 64 KiB boot stack.

/// The multiboot2 magic value GRUB leaves in `EAX`.
pub const MULTIBOOT2_BOOTLOADER_MAGIC: u32 = 0x36d7_6289;

/// Size of the BSP's boot stack in bytes.
pub const BOOT_STACK_SIZE: usize = 64 * 1024;

// Header: magic 0xE85250D6, architecture 0 (i386 protected mode), length 24 (header + end tag),
// checksum -(magic + arch + length) mod 2^32 = 0x17ADAF12.
#[cfg(target_os = "none")]
core::arch::global_asm!(
    r#"
    .section .multiboot2, "a"
    .balign 8
    .long 0xE85250D6
    .long 0
    .long 24
    .long 0x17ADAF12
    .short 0
    .short 0
    .long 8

    .section .text.boot, "ax"
    .code32
    .global _start
_start:
    cli
    cld
    mov esp, offset moat_boot_stack_top
    mov edi, eax
    mov esi, ebx
    cmp eax, 0x36d76289
    jne 90f

    mov eax, 0x80000000
    cpuid
    cmp eax, 0x80000001
    jb 91f
    mov eax, 0x80000001
    cpuid
    test edx, 0x20000000
    jz 91f
    mov ebp, edx

    mov eax, offset moat_boot_pdpt
    or eax, 3
    mov dword ptr [moat_boot_pml4], eax
    mov eax, offset moat_boot_pd
    or eax, 3
    xor ecx, ecx
2:
    mov dword ptr [moat_boot_pdpt + ecx * 8], eax
    add eax, 4096
    inc ecx
    cmp ecx, 4
    jne 2b
    xor ecx, ecx
3:
    mov eax, ecx
    shl eax, 21
    or eax, 0x83
    mov dword ptr [moat_boot_pd + ecx * 8], eax
    mov eax, ecx
    shr eax, 11
    mov dword ptr [moat_boot_pd + ecx * 8 + 4], eax
    inc ecx
    cmp ecx, 2048
    jne 3b

    mov eax, offset moat_boot_pml4
    mov cr3, eax
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100
    test ebp, 0x100000
    jz 4f
    or eax, 0x800
4:
    wrmsr
    mov eax, cr0
    or eax, 0x80010001
    mov cr0, eax
    lgdt [moat_boot_gdt_ptr]
    push 0x08
    mov eax, offset moat_boot_long_mode
    push eax
    retf

90:
    mov esi, offset moat_boot_msg_magic
    jmp 92f
91:
    mov esi, offset moat_boot_msg_lm
92:
    mov dx, 0x3fd
93:
    in al, dx
    test al, 0x20
    jz 93b
    mov dx, 0x3f8
    lodsb
    test al, al
    jz 94f
    out dx, al
    jmp 92b
94:
    hlt
    jmp 94b

    .code64
moat_boot_long_mode:
"#,
    load_flat_data_segments!(),
    r#"
    mov edi, edi
    mov esi, esi
    lea rsp, [rip + moat_boot_stack_top]
    xor ebp, ebp
    call moat_boot_main
6:
    cli
    hlt
    jmp 6b

    .section .rodata.boot, "a"
    .balign 8
moat_boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
moat_boot_gdt_ptr:
    .short 23
    .long moat_boot_gdt
moat_boot_msg_magic:
    .asciz "moat: not started by a multiboot2 loader\r\n"
moat_boot_msg_lm:
    .asciz "moat: this CPU has no long mode\r\n"

    .section .bss.boot, "aw", @nobits
    .balign 4096
moat_boot_pml4:
    .skip 4096
moat_boot_pdpt:
    .skip 4096
moat_boot_pd:
    .skip 4096 * 4
    .global moat_boot_stack_bottom
moat_boot_stack_bottom:
    .skip 65536
    .global moat_boot_stack_top
moat_boot_stack_top:
"#
);
