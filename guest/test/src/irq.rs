//! Interrupt tests: what a guest can make its device raise at the host.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use moat_abi::dma::DmaFlags;

use crate::abi::BootInfo;
use crate::dma::{driver, gpa, page, Edu, PAGE};
use crate::idt::{cli, sti, Cost};
use crate::vapic::{rdmsr, wrmsr};
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

/// The vector the MSI tests choose.
pub const MSI_VECTOR: u8 = 0x51;
/// x2APIC MSRs of the hypervisor's virtual local APIC.
const MSR_X2APIC_ID: u32 = 0x802;
const MSR_X2APIC_EOI: u32 = 0x80b;
/// Moat's MSR: TSC of the host handler that raised this vCPU's latest interrupt.
const MSR_MOAT_IRQ_TSC: u32 = 0x4d4f_0001;

/// A second vector with its own count (the MSI-X tests' admin-queue entry).
pub const AUX_VECTOR: u8 = 0x53;

/// Interrupts taken on [`MSI_VECTOR`].
pub(crate) static TAKEN: AtomicU64 = AtomicU64::new(0);
/// Interrupts taken per vCPU (index = x2APIC id read in the handler).
pub(crate) static TAKEN_ON: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
/// Interrupts taken on [`AUX_VECTOR`].
pub(crate) static AUX_TAKEN: AtomicU64 = AtomicU64::new(0);
/// Cycles from the host handler to this handler.
pub(crate) static COST: Cost = Cost::new();
/// Interrupts on any other vector of the interrupt IDT.
pub(crate) static STRAY: AtomicU64 = AtomicU64::new(0);
/// Set when vCPU 1 should leave its halt loop.
pub(crate) static WORKER_DONE: AtomicBool = AtomicBool::new(false);
/// Set once vCPU 1 has loaded the IDT and enabled interrupts.
pub(crate) static WORKER_READY: AtomicBool = AtomicBool::new(false);
/// Set when vCPU 1 has left its halt loop.
pub(crate) static WORKER_EXITED: AtomicBool = AtomicBool::new(false);

/// Every interrupt: [`MSI_VECTOR`] counted per vCPU with its delivery cost, [`AUX_VECTOR`]
/// counted apart, any other vector counted as stray; EOIed.
fn on_interrupt(vector: u8, _rip: u64) {
    if vector == MSI_VECTOR {
        let now = crate::abi::rdtsc();
        COST.record(now, rdmsr(MSR_MOAT_IRQ_TSC));
        let id = rdmsr(MSR_X2APIC_ID) as usize;
        if let Some(c) = TAKEN_ON.get(id) {
            c.fetch_add(1, Ordering::SeqCst);
        }
        TAKEN.fetch_add(1, Ordering::SeqCst);
    } else if vector == AUX_VECTOR {
        AUX_TAKEN.fetch_add(1, Ordering::SeqCst);
    } else {
        STRAY.fetch_add(1, Ordering::SeqCst);
    }
    wrmsr(MSR_X2APIC_EOI, 0);
}

/// Loads the interrupt IDT on this vCPU ([`on_interrupt`] for every vector from 32;
/// exceptions stay absent: a fault still triple-faults); puts the vCPU's local APIC in x2APIC
/// mode and software-enables it (it delivers nothing before).
pub(crate) fn load_idt() {
    crate::vapic::apic_enable();
    crate::idt::load_interrupts(on_interrupt, false);
}

/// `sti; hlt`: waits for an interrupt (atomically with enabling them).
pub(crate) fn halt() {
    // SAFETY: the interrupt IDT is loaded; HLT returns after the next interrupt.
    unsafe { core::arch::asm!("sti; hlt", options(nomem, nostack)) };
}

/// vCPU 1's side of `msi-edu=N,1`: interrupts on, halt until told to stop.
pub fn worker() {
    halt_until_done(|| {});
    println!(
        "msi worker: vcpu 1 took {} interrupt(s) on vector {MSI_VECTOR:#x}",
        TAKEN_ON[1].load(Ordering::SeqCst)
    );
}

/// vCPU 1 with the interrupt IDT and interrupts on halts until [`WORKER_DONE`], running
/// `on_wake` (interrupts off) after every wake-up and once more before it leaves.
pub(crate) fn halt_until_done(mut on_wake: impl FnMut()) {
    load_idt();
    sti();
    WORKER_READY.store(true, Ordering::SeqCst);
    // The flag is checked with interrupts off and `sti; hlt` waits atomically: a wake-up
    // that arrived between the check and the HLT would otherwise be taken there and the HLT
    // would sleep through it (a lost wake-up in the guest).
    loop {
        cli();
        on_wake();
        if WORKER_DONE.load(Ordering::SeqCst) {
            break;
        }
        halt();
    }
    WORKER_EXITED.store(true, Ordering::SeqCst);
}

/// Waits up to 2 s for `flag` (spinning).
pub(crate) fn wait_flag(boot: &BootInfo, flag: &AtomicBool) -> bool {
    let end = crate::abi::rdtsc() + 2000 * boot.tsc_khz.get();
    while !flag.load(Ordering::SeqCst) && crate::abi::rdtsc() < end {
        core::hint::spin_loop();
    }
    flag.load(Ordering::SeqCst)
}

/// The assigned edu's MSI capability: (bus, dev, func, capability offset).
fn edu_msi() -> Option<(u8, u8, u8, u8)> {
    let mut found = None;
    crate::pci::scan(|f| {
        if f.vendor == 0x1234 && f.device == 0x11e8 && found.is_none() {
            found = Some(f);
        }
    });
    let f = found?;
    if crate::pci::read32(f.bus, f.dev, f.func, 0x04) & (1 << 20) == 0 {
        return None;
    }
    let cap = crate::pci::read32(f.bus, f.dev, f.func, 0x34) as u8 & 0xfc;
    let header = crate::pci::read32(f.bus, f.dev, f.func, cap);
    (header & 0xff == 0x05).then_some((f.bus, f.dev, f.func, cap))
}

/// Programs the guest's MSI of its edu: fixed delivery of `vector` to vCPU `dest`.
fn program_msi(dest: u8, vector: u8, enable: bool) -> Result<(), &'static str> {
    let (b, d, f, cap) = edu_msi().ok_or("no MSI capability visible on edu")?;
    let control = crate::pci::read32(b, d, f, cap) >> 16;
    if control & (1 << 7) == 0 {
        return Err("edu's MSI is not 64-bit capable");
    }
    crate::pci::write32(b, d, f, cap + 4, 0xfee0_0000 | u32::from(dest) << 12);
    crate::pci::write32(b, d, f, cap + 8, 0);
    crate::pci::write32(b, d, f, cap + 12, u32::from(vector));
    let enable_bit = if enable { 1 } else { 0 };
    crate::pci::write32(b, d, f, cap, (control & !1 | enable_bit) << 16 | 0x05);
    let back = crate::pci::read32(b, d, f, cap + 12) & 0xffff;
    if back != u32::from(vector) {
        return Err("the MSI data did not read back");
    }
    Ok(())
}

pub(crate) fn wait_taken(boot: &BootInfo, on: usize, want: u64, ms: u64, use_hlt: bool) -> bool {
    let end = crate::abi::rdtsc() + ms * boot.tsc_khz.get();
    loop {
        // With HLT, the count is checked with interrupts off and `sti; hlt` waits atomically
        // (an interrupt between the check and the HLT would be taken there and the HLT would
        // sleep through it); interrupts are on again when this returns.
        if use_hlt {
            cli();
        }
        if TAKEN_ON[on].load(Ordering::SeqCst) >= want {
            sti();
            return true;
        }
        if crate::abi::rdtsc() > end {
            sti();
            return false;
        }
        if use_hlt {
            halt();
        } else {
            core::hint::spin_loop();
        }
    }
}

/// `msi-edu=N` (`dest` = the vCPU the guest routes the MSI to): the guest programs its edu's
/// MSI (vector 0x51 to vCPU `dest`), runs N DMAs with edu's completion interrupt and waits
/// for each by interrupt (HLT on vCPU 0); exactly one interrupt per DMA, on `dest`, and no
/// stray vector. Prints the cost from the host's handler to the guest's (cycles).
pub fn msi_edu(boot: &BootInfo, n: u64, dest: u8) -> Outcome {
    let vcpus = boot.vcpus.get() as usize;
    if usize::from(dest) >= vcpus {
        return Err("no such vCPU");
    }
    let mut d = driver()?;
    let edu = Edu::find().ok_or("no edu device")?;
    let src = d
        .map(gpa(3), PAGE as u64, DmaFlags::READ)
        .map_err(|_| "MAP of the source failed")?;
    load_idt();
    if dest == 1 {
        wait_flag(boot, &WORKER_READY);
    }
    program_msi(dest, MSI_VECTOR, true)?;
    sti();
    let on = usize::from(dest);
    let mut missed = 0;
    for i in 0..n {
        let before = TAKEN_ON[on].load(Ordering::SeqCst);
        if !edu.dma_irq(src) {
            return Err("edu DMA did not finish");
        }
        if !wait_taken(boot, on, before + 1, 2000, dest == 0) {
            println!("msi-edu: DMA {i}: no interrupt within 2 s");
            missed += 1;
        }
        edu.ack_irq(0x100);
    }
    // Anything late or doubled would arrive now.
    crate::dma::delay_ms(boot, 300);
    cli();
    let taken = TAKEN.load(Ordering::SeqCst);
    let on_dest = TAKEN_ON[on].load(Ordering::SeqCst);
    let stray = STRAY.load(Ordering::SeqCst);
    let (_, cost_min, cost_avg) = COST.summary();
    println!(
        "msi-edu: {n} DMA(s) with completion interrupt to vcpu {dest}: {taken} interrupt(s) on vector {MSI_VECTOR:#x}, {on_dest} on vcpu {dest}, {stray} stray, {missed} missed"
    );
    println!(
        "msi-edu: host handler -> guest handler: min {cost_min} cycles, mean {cost_avg} cycles (TSC {} MHz)",
        boot.tsc_khz.get() / 1000
    );
    program_msi(dest, MSI_VECTOR, false)?;
    if dest == 1 {
        // Wake the worker once more (edu's interrupt-raise register) so it sees DONE:
        // exactly one interrupt, which must arrive (a lost one leaves it halted).
        WORKER_DONE.store(true, Ordering::SeqCst);
        program_msi(dest, MSI_VECTOR, true)?;
        edu.raise_irq(1);
        edu.ack_irq(1);
        let left = wait_flag(boot, &WORKER_EXITED);
        program_msi(dest, MSI_VECTOR, false)?;
        println!(
            "msi-edu: worker woken to stop by one interrupt-raise: {}",
            if left { "left" } else { "still halted" }
        );
        if !left {
            return Err("the wake-up interrupt did not reach the halted vCPU 1");
        }
    }
    d.unmap(src, PAGE as u64).map_err(|_| "UNMAP failed")?;
    if taken != n || on_dest != n || stray != 0 || missed != 0 {
        return Err("not exactly one interrupt per DMA on the chosen vector and vCPU");
    }
    Ok(())
}

/// Interrupts of every vector this vCPU took through the interrupt IDT (MSI_VECTOR and
/// stray ones).
fn all_taken() -> u64 {
    TAKEN.load(Ordering::SeqCst) + STRAY.load(Ordering::SeqCst)
}

/// Has edu raise its interrupt once with this vCPU's interrupts on for 100 ms and returns how
/// many interrupts (of any vector) the vCPU took meanwhile. Interrupts are off when it returns.
fn raise_and_count(boot: &BootInfo, edu: &Edu) -> u64 {
    let before = all_taken();
    sti();
    edu.raise_irq(1);
    crate::dma::delay_ms(boot, 100);
    cli();
    edu.ack_irq(1);
    all_taken() - before
}

/// `msi-attacks`: the guest tries to make its device raise host vectors through the MSI
/// capability: data naming vectors 8 and 18 (refused: the device's MSI stays off, nothing
/// arrives anywhere), vector 0x40 (the host's VT-d fault vector: it is the guest's own vector
/// 0x40, delivered to the guest), byte-wise and misaligned writes over the capability and
/// writes past it (all virtual). Prints what arrived; the scenario checks the host's counts.
pub fn msi_attacks(boot: &BootInfo) -> Outcome {
    let edu = Edu::find().ok_or("no edu device")?;
    let (b, d, f, cap) = edu_msi().ok_or("no MSI capability visible on edu")?;
    load_idt();
    let mut failures = 0;
    for vector in [8u8, 18, 0x40] {
        // Ignore the read-back check: refused messages still read back as written.
        let _ = program_msi(0, vector, true);
        let got = raise_and_count(boot, &edu);
        let want = u64::from(vector >= 32);
        println!(
            "msi-attacks: MSI data vector {vector:#x}: {got} interrupt(s) in the guest (want {want}) {}",
            if got == want { "ok" } else { "WRONG" }
        );
        failures += u32::from(got != want);
        let _ = program_msi(0, vector, false);
    }
    // Byte-wise writes of a compatibility-format address and data, and writes around and past
    // the capability: the guest's view changes, the device never sees them.
    for (off, byte) in [
        (4u8, 0x00u8),
        (5, 0x00),
        (6, 0xe0),
        (7, 0xfe),
        (12, 0x12),
        (0, 0x05),
    ] {
        crate::pci::write8(b, d, f, cap + off, byte);
    }
    crate::pci::write16(b, d, f, cap + 2, 1);
    for off in (cap + 16..=0xfc).step_by(4) {
        crate::pci::write32(b, d, f, off, 0xfee0_0012);
    }
    let got = raise_and_count(boot, &edu);
    println!(
        "msi-attacks: byte-wise compatibility-format MSI (vector 0x12) and writes past the capability: {got} interrupt(s) in the guest (want 0) {}",
        if got == 0 { "ok" } else { "WRONG" }
    );
    failures += u32::from(got != 0);
    let _ = program_msi(0, MSI_VECTOR, false);
    if failures == 0 {
        Ok(())
    } else {
        Err("an MSI attack had an effect")
    }
}

/// `msi-storm=N`: the guest programs its MSI and writes edu's interrupt-raise register N
/// times back to back with its own interrupts off (each write is one MSI); the hypervisor
/// must survive, count and mask the storm. Afterwards the guest programs its MSI again and
/// one DMA's completion interrupt arrives: the device works.
pub fn msi_storm(boot: &BootInfo, n: u64) -> Outcome {
    let mut d = driver()?;
    let edu = Edu::find().ok_or("no edu device")?;
    load_idt();
    program_msi(0, MSI_VECTOR, true)?;
    for _ in 0..n {
        edu.raise_irq(1);
    }
    edu.ack_irq(1);
    println!("msi-storm: {n} interrupt-raise writes done, guest alive");
    // Drain what the guest was sent (merged while its interrupts were off).
    sti();
    crate::dma::delay_ms(boot, 50);
    cli();
    let before = TAKEN_ON[0].load(Ordering::SeqCst);
    program_msi(0, MSI_VECTOR, false)?;
    program_msi(0, MSI_VECTOR, true)?;
    let src = d
        .map(gpa(3), PAGE as u64, DmaFlags::READ)
        .map_err(|_| "MAP of the source failed")?;
    sti();
    if !edu.dma_irq(src) {
        return Err("edu DMA did not finish");
    }
    let ok = wait_taken(boot, 0, before + 1, 2000, false);
    cli();
    edu.ack_irq(0x100);
    d.unmap(src, PAGE as u64).map_err(|_| "UNMAP failed")?;
    program_msi(0, MSI_VECTOR, false)?;
    println!(
        "msi-storm: after reprogramming, the DMA completion interrupt {}",
        if ok { "arrived" } else { "did NOT arrive" }
    );
    if ok {
        Ok(())
    } else {
        Err("the device's MSI does not work after the storm")
    }
}

/// The vector `dma-fault-irq` registers its fault ring with.
const FAULT_VECTOR: u8 = 0x52;

/// `dma-fault-irq`: the guest registers its fault ring with vector 0x52 (FAULT_IRQ offered in
/// QUERY's features) and makes edu DMA to an unmapped IOVA: a batch of records landing in an
/// empty ring raises vector 0x52 once, a batch landing in a ring not yet consumed none (the
/// ABI's empty -> non-empty rule), and the records are in the ring.
pub fn fault_irq(boot: &BootInfo) -> Outcome {
    let mut d = driver()?;
    let offered = d.info().features.has(moat_abi::dma::Features::FAULT_IRQ);
    println!("dma-fault-irq: FAULT_IRQ offered: {offered}");
    if !offered {
        return Err("FAULT_IRQ not offered");
    }
    load_idt();
    d.attach_fault_ring(moat_pvdma::FaultRingArea {
        gpa: gpa(6),
        pages: 1,
        vector: FAULT_VECTOR,
    })
    .map_err(|_| "FAULT_RING_REGISTER with a vector failed")?;
    let edu = Edu::find().ok_or("no edu device")?;
    let iova = d
        .map(gpa(4), PAGE as u64, DmaFlags::WRITE)
        .map_err(|_| "MAP failed")?;
    d.unmap(iova, PAGE as u64).map_err(|_| "UNMAP failed")?;
    sti();
    let mut failures = 0;
    // Round 1: two blocked DMAs, each delivered as its own batch, the ring not consumed in
    // between: only the first batch finds the ring empty (one interrupt). Round 2, after
    // consuming: one more.
    for (round, dmas) in [(1u64, 2), (2, 1)] {
        for _ in 0..dmas {
            let _ = edu.dma(iova, true);
            // Every exit lets the hypervisor deliver; wait with exits (STATS) for the records.
            let end = crate::abi::rdtsc() + 300 * boot.tsc_khz.get();
            while crate::abi::rdtsc() < end {
                let _ = d.stats(false);
                crate::dma::delay_ms(boot, 10);
            }
        }
        let irqs = STRAY.load(Ordering::SeqCst);
        let mut records = 0;
        let poll = d
            .poll_faults(&mut |r| records += u64::from(r.iova == iova))
            .map_err(|_| "fault ring poll failed")?;
        let ok = irqs == round && records >= dmas;
        println!(
            "dma-fault-irq: round {round}, {dmas} blocked DMA(s): {} record(s) ({records} for IOVA {iova:#x}), vector {FAULT_VECTOR:#x} raised {irqs} time(s) in all (want {round}) {}",
            poll.records,
            if ok { "ok" } else { "WRONG" }
        );
        failures += u32::from(!ok);
    }
    cli();
    d.detach_fault_ring().map_err(|_| "unregister failed")?;
    if failures == 0 {
        Ok(())
    } else {
        Err("the fault vector was not raised once per batch")
    }
}
