//! Interrupt tests: what a guest can make its device raise at the host.

use moat_abi::dma::DmaFlags;

use crate::dma::{driver, gpa, page, Edu, PAGE};
use crate::{println, Outcome};

/// The interrupt address window's base: a 4-byte write there is an MSI to APIC 0
/// (compatibility format: fixed delivery, physical destination 0, vector = data bits 7:0).
const MSI_ADDRESS: u64 = 0xfee0_0000;

/// `irq-host-vectors` (a guest whose edu has a 32-bit DMA mask): edu writes MSI data naming
/// the host's exception vectors (8 #DF and 14 #PF, 17 #AC: the CPU would push an error code;
/// 18 #MC), the IOMMU fault vector 0x40 and an unused vector 0x99 straight to 0xFEE00000 by
/// DMA, `rounds` times each. The hypervisor must survive every one; the scenario checks its
/// per-vector counts.
pub fn host_vectors(rounds: u64) -> Outcome {
    let mut d = driver()?;
    let edu = Edu::find().ok_or("no edu device")?;
    let src = d
        .map(gpa(3), PAGE as u64, DmaFlags::READ)
        .map_err(|_| "MAP of the source failed")?;
    let mut sent = 0u64;
    for vector in [8u32, 14, 17, 18, 0x40, 0x99] {
        page(3)[..4].copy_from_slice(&vector.to_le_bytes());
        if !edu.dma_raw(src, 4, false) {
            return Err("edu DMA did not finish");
        }
        for _ in 0..rounds {
            if !edu.dma_raw(MSI_ADDRESS, 4, true) {
                return Err("edu DMA to the interrupt window did not finish");
            }
            sent += 1;
        }
        println!(
            "irq-host-vectors: wrote MSI data {vector:#x} to {MSI_ADDRESS:#x} {rounds} time(s)"
        );
    }
    d.unmap(src, PAGE as u64).map_err(|_| "UNMAP failed")?;
    println!("irq-host-vectors: {sent} write(s) to the interrupt window, guest alive");
    Ok(())
}
