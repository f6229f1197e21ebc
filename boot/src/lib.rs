//! Boot path of the Moat hypervisor.
//!
//! * [`entry`]: the multiboot2 header and the 32-bit entry point GRUB jumps to; it builds an
//!   identity map of the first 4 GiB, enters long mode and calls the kernel's
//!   `moat_boot_main(magic, mbi)`.
//! * [`ap`]: the real-mode start-up trampoline that application processors run after
//!   INIT-SIPI-SIPI, and the parameter block the BSP fills for each of them.
//! * [`info`]: [`BootInfo`](info::BootInfo), the typed view of the multiboot2 information the
//!   rest of the hypervisor uses (memory map, RSDP, modules, command line).
#![no_std]

/// Assembly (64-bit) that loads the flat data selector 0x10 into DS/ES/SS and a null selector
/// into FS/GS: the first thing both the BSP (`entry`) and every AP (`ap`) do in long mode.
#[cfg(target_os = "none")]
macro_rules! load_flat_data_segments {
    () => {
        r#"
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
"#
    };
}

pub mod ap;
pub mod entry;
pub mod info;

pub use info::{BootInfo, BootInfoError, Framebuffer, MemoryKind, MemoryRegion, Module};
