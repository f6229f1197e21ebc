//! Multiboot2 header, 32->64-bit trampoline and BootInfo for the Moat hypervisor.
#![no_std]
