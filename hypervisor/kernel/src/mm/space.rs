//! The hypervisor's address space: built once at boot from the memory map, shared by all CPUs.

use moat_boot::{BootInfo, MemoryKind};
use spin::Mutex;

use super::paging::{AddressSpace, MapError, Pte};
use super::{align_down, align_up, kernel_image, PhysAddr, PAGE_SIZE};

static KERNEL_SPACE: Mutex<Option<AddressSpace>> = Mutex::new(None);

/// Builds the W^X identity map and switches this CPU to it. Returns the root table (CR3).
///
/// * every memory-map region: RAM and ACPI regions read-write NX, reserved regions uncached NX;
/// * the first 1 MiB read-write NX, page 0 unmapped (null pointer accesses fault);
/// * the kernel image: text RX, rodata R NX, data/bss RW NX;
/// * `exec_page` (the AP trampoline) R X.
pub fn build(boot: &BootInfo, exec_page: PhysAddr) -> Result<PhysAddr, MapError> {
    let mut s = AddressSpace::new()?;
    for r in boot.memory_map() {
        let start = align_down(r.start, PAGE_SIZE);
        let end = align_up(r.end(), PAGE_SIZE);
        let flags = match r.kind {
            MemoryKind::Usable | MemoryKind::AcpiReclaimable | MemoryKind::AcpiNvs => Pte::RW,
            MemoryKind::Reserved | MemoryKind::Defective => Pte::MMIO,
        };
        s.map(PhysAddr::new(start), end - start, flags)?;
    }
    s.map(PhysAddr::new(0), 0x10_0000, Pte::RW)?;
    s.unmap_page(PhysAddr::new(0))?;
    let k = kernel_image();
    s.map(PhysAddr::new(k.text.0), k.text.1 - k.text.0, Pte::RX)?;
    s.map(PhysAddr::new(k.rodata.0), k.rodata.1 - k.rodata.0, Pte::RO)?;
    let data_end = align_up(k.data.1, PAGE_SIZE);
    s.map(PhysAddr::new(k.data.0), data_end - k.data.0, Pte::RW)?;
    s.map(exec_page, PAGE_SIZE, Pte::RX)?;
    let root = s.root();
    // SAFETY: the new space maps the kernel image (code, stacks in .bss, statics), all RAM
    // (frames, heap, boot information) and the first 1 MiB, identically to the boot map.
    unsafe { s.activate() };
    *KERNEL_SPACE.lock() = Some(s);
    Ok(root)
}

/// Identity-maps an MMIO range uncached (idempotent; widened to whole pages).
pub fn map_mmio(phys: PhysAddr, len: u64) -> Result<(), MapError> {
    let start = phys.align_down(PAGE_SIZE);
    let end = align_up(phys.as_u64() + len.max(1), PAGE_SIZE);
    match KERNEL_SPACE.lock().as_mut() {
        Some(s) => s.map(start, end - start.as_u64(), Pte::MMIO),
        // Before the kernel space exists the boot map covers the first 4 GiB.
        None => Ok(()),
    }
}

/// Flags of the page containing `virt` (for the W^X self-check).
pub fn flags_of(virt: u64) -> Option<Pte> {
    KERNEL_SPACE.lock().as_ref()?.lookup(virt).map(|(_, f)| f)
}

/// Effective flags (every level combined) of the page containing `virt`.
pub fn effective_flags(virt: u64) -> Option<Pte> {
    KERNEL_SPACE.lock().as_ref()?.effective_flags(virt)
}

/// Calls `f(address, size, effective flags)` for every mapped page (see
/// [`AddressSpace::for_each_leaf`]); `false` before the space exists.
pub fn for_each_page(f: impl FnMut(u64, u64, Pte)) -> bool {
    match KERNEL_SPACE.lock().as_ref() {
        Some(s) => {
            s.for_each_leaf(f);
            true
        }
        None => false,
    }
}

/// Makes one page writable AND executable: only for the W^X self-check's own test
/// (`selftest=wx`), which must then see the check fail.
#[cfg(feature = "selftest")]
pub fn break_wx_for_selftest(page: u64) -> Result<(), MapError> {
    remap_page(page, Pte::PRESENT | Pte::WRITABLE)
}

fn remap_page(page: u64, flags: Pte) -> Result<(), MapError> {
    let mut guard = KERNEL_SPACE.lock();
    let s = guard.as_mut().ok_or(MapError::OutOfFrames)?;
    s.map(PhysAddr::new(page), PAGE_SIZE, flags)?;
    // SAFETY: invlpg only drops this CPU's cached translation of `page`.
    unsafe { core::arch::asm!("invlpg [{}]", in(reg) page, options(nostack, preserves_flags)) };
    Ok(())
}

/// Makes one page writable (and not executable).
pub fn map_rw(page: u64) -> Result<(), MapError> {
    remap_page(page, Pte::RW)
}

/// Makes one page executable (and read-only).
pub fn map_rx(page: u64) -> Result<(), MapError> {
    remap_page(page, Pte::RX)
}
