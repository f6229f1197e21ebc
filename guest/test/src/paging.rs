//! The guest's own page tables: the hypervisor's boot tables identity-map the first 4 GiB
//! (the top GiB uncached); a device BAR above 4 GiB (placed there by some firmware) gets an
//! uncached identity mapping here.

use core::sync::atomic::{AtomicBool, Ordering};

/// PDPT of the boot page tables (PML4 entry 0), from the hypervisor's guest layout.
const PDPT_GPA: u64 = 0x4000;

#[repr(C, align(4096))]
struct Table([u64; 512]);

static mut HIGH_PD: Table = Table([0; 512]);
static USED: AtomicBool = AtomicBool::new(false);

/// Makes `[addr, addr + len)` reachable, uncached, at the same virtual address.
pub fn map_mmio(addr: u64, len: u64) -> Result<(), &'static str> {
    let end = addr.checked_add(len).ok_or("BAR wraps")?;
    if end <= 4 << 30 {
        return if addr >= 3 << 30 {
            Ok(())
        } else {
            Err("BAR below 3 GiB would be cached")
        };
    }
    let gib = addr >> 30;
    if (end - 1) >> 30 != gib || gib >= 512 {
        return Err("BAR crosses a GiB boundary or lies above 512 GiB");
    }
    let pdpte = (PDPT_GPA + 8 * gib) as *mut u64;
    // SAFETY: the PDPT is the hypervisor-built boot table at PDPT_GPA, identity-mapped in
    // this guest's RAM; only vCPU 0 changes it, before other vCPUs use the BAR.
    let present = unsafe { core::ptr::read_volatile(pdpte) } & 1 != 0;
    if present {
        return Ok(());
    }
    if USED.swap(true, Ordering::SeqCst) {
        return Err("a second high BAR region is not supported");
    }
    let pd = core::ptr::addr_of_mut!(HIGH_PD);
    const P_RW_PS_PWT_PCD: u64 = 1 | 2 | (1 << 7) | (3 << 3);
    for i in 0..512u64 {
        // SAFETY: HIGH_PD is this module's static table, not yet linked.
        unsafe { (*pd).0[i as usize] = ((gib << 30) + (i << 21)) | P_RW_PS_PWT_PCD };
    }
    // SAFETY: links the new table into the live PDPT, then reloads CR3 to flush the TLB.
    unsafe {
        core::ptr::write_volatile(pdpte, pd as u64 | 1 | 2);
        let cr3: u64;
        core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack));
        core::arch::asm!("mov cr3, {}", in(reg) cr3, options(nostack));
    }
    Ok(())
}
