//! The guest's own page tables: the hypervisor's boot tables identity-map the first 4 GiB
//! (the top GiB uncached); a device BAR above 4 GiB (OVMF places 64-bit BARs there, e.g. at
//! 0xe0_0000_0000) gets an uncached identity mapping here.

use core::sync::atomic::{AtomicBool, Ordering};

/// PML4 of the boot page tables, from the hypervisor's guest layout.
const PML4_GPA: u64 = 0x3000;

#[repr(C, align(4096))]
struct Table([u64; 512]);

static mut HIGH_PDPT: Table = Table([0; 512]);
static mut HIGH_PD: Table = Table([0; 512]);
static USED: AtomicBool = AtomicBool::new(false);

const P: u64 = 1;
const RW: u64 = 2;
const PWT_PCD: u64 = 3 << 3;
const PS: u64 = 1 << 7;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

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
    if (end - 1) >> 30 != addr >> 30 || addr >> 47 != 0 {
        return Err("BAR crosses a GiB boundary or lies above 128 TiB");
    }
    let pml4e = (PML4_GPA + 8 * ((addr >> 39) & 511)) as *mut u64;
    // SAFETY: the PML4 is the hypervisor-built boot table at PML4_GPA, identity-mapped in
    // this guest's RAM; only vCPU 0 changes the tables, before other vCPUs use the BAR.
    let e = unsafe { core::ptr::read_volatile(pml4e) };
    let pdpt = if e & P != 0 {
        (e & ADDR) as *mut u64
    } else {
        claim()?;
        let t = core::ptr::addr_of_mut!(HIGH_PDPT) as *mut u64;
        // SAFETY: links this module's (zeroed, unused) PDPT into the PML4.
        unsafe { core::ptr::write_volatile(pml4e, t as u64 | P | RW) };
        t
    };
    // SAFETY: `pdpt` is a live page-table page of this guest (identity-mapped RAM).
    let pdpte = unsafe { pdpt.add(((addr >> 30) & 511) as usize) };
    // SAFETY: as above.
    if unsafe { core::ptr::read_volatile(pdpte) } & P == 0 {
        claim_pd()?;
        let pd = core::ptr::addr_of_mut!(HIGH_PD);
        let gib = addr >> 30 << 30;
        for i in 0..512u64 {
            // SAFETY: HIGH_PD is this module's static table, not yet linked.
            unsafe { (*pd).0[i as usize] = (gib + (i << 21)) | P | RW | PS | PWT_PCD };
        }
        // SAFETY: links the filled table into the live PDPT.
        unsafe { core::ptr::write_volatile(pdpte, pd as u64 | P | RW) };
    }
    // SAFETY: reloading CR3 flushes this CPU's TLB; the tables stay the same.
    unsafe {
        let cr3: u64;
        core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack));
        core::arch::asm!("mov cr3, {}", in(reg) cr3, options(nostack));
    }
    Ok(())
}

static PD_USED: AtomicBool = AtomicBool::new(false);

fn claim() -> Result<(), &'static str> {
    if USED.swap(true, Ordering::SeqCst) {
        return Err("a second high BAR region is not supported");
    }
    Ok(())
}

fn claim_pd() -> Result<(), &'static str> {
    if PD_USED.swap(true, Ordering::SeqCst) {
        return Err("a second high BAR region is not supported");
    }
    Ok(())
}
