//! Memory management: physical frames, the hypervisor's page tables, the kernel heap.

pub mod frames;
pub mod heap;
pub mod mmio;
pub mod paging;
pub mod space;
pub mod tables;

/// Page size and the host-physical address type: Moat's one of each (`moat-frames`; the PV
/// DMA ABI's mapping granule is asserted equal).
pub use moat_frames::{PhysAddr, PAGE_SIZE};
const _: () = assert!(PAGE_SIZE == moat_abi::dma::PAGE_SIZE);

unsafe extern "C" {
    static __kernel_start: u8;
    static __text_start: u8;
    static __text_end: u8;
    static __rodata_start: u8;
    static __rodata_end: u8;
    static __data_start: u8;
    static __data_end: u8;
    static __kernel_end: u8;
}

/// Physical ranges of the kernel image's sections (identity mapped).
#[derive(Debug, Clone, Copy)]
pub struct KernelImage {
    /// Whole image `[start, end)`.
    pub image: (u64, u64),
    /// Code.
    pub text: (u64, u64),
    /// Read-only data.
    pub rodata: (u64, u64),
    /// Data and bss.
    pub data: (u64, u64),
}

/// The kernel image layout from the linker script's symbols.
pub fn kernel_image() -> KernelImage {
    fn a(s: &u8) -> u64 {
        s as *const u8 as u64
    }
    // SAFETY: the symbols are defined by linker.ld; only their addresses are taken.
    unsafe {
        KernelImage {
            image: (a(&__kernel_start), a(&__kernel_end)),
            text: (a(&__text_start), a(&__text_end)),
            rodata: (a(&__rodata_start), a(&__rodata_end)),
            data: (a(&__data_start), a(&__data_end)),
        }
    }
}

/// Rounds `x` up to a multiple of `a` (a power of two).
pub const fn align_up(x: u64, a: u64) -> u64 {
    (x + a - 1) & !(a - 1)
}

/// Rounds `x` down to a multiple of `a` (a power of two).
pub const fn align_down(x: u64, a: u64) -> u64 {
    x & !(a - 1)
}
