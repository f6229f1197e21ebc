//! Moat: a bare-metal microhypervisor that owns the Intel VT-d unit and gives guests strict,
//! fast DMA protection.
//!
//! Boot order (BSP): console and TSC, boot information, command line, this CPU's descriptor
//! tables, ACPI discovery, frame allocator, W^X page tables, heap, DMAR, PCI, application
//! processors, then the configured work.
#![no_std]
#![no_main]

extern crate alloc;

mod acpi;
mod arch;
mod console;
mod discovery;
mod dma;
mod edu;
mod exit;
mod fbcon;
mod iommu;
mod mm;
mod panic;
mod platform;
mod ratelimit;
mod smp;
mod sync;
mod vm;

#[unsafe(no_mangle)]
extern "C" fn moat_boot_main(magic: u32, mbi: u32) -> ! {
    platform::boot(magic, mbi)
}

#[unsafe(no_mangle)]
extern "C" fn moat_ap_main(cpu: u64) -> ! {
    smp::ap_main(cpu as usize)
}
