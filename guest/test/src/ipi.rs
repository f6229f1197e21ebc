//! `vapic-ipi=N` (2 vCPUs): IPIs between the vCPUs of one guest through their virtual x2APICs.
//! Each vCPU first checks that CPUID's APIC IDs (leaf 1 EBX bits 31:24, leaf 0xB EDX) are its
//! x2APIC ID register's. vCPU 0 then sends N fixed IPIs (physical destination 1) to vCPU 1,
//! halted, waiting for vCPU 1's answer to each, an IPI back to vCPU 0 (halted for every other
//! one, spinning without exits for the rest); then ICR writes
//! that must change nothing (a vCPU the guest does not have, NMI and INIT delivery, vector 3:
//! the ESR's send-illegal-vector bit); finally the all-excluding-self shorthand wakes vCPU 1 to
//! stop (it answers that one too).

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::abi::{cpuid, BootInfo};
use crate::idt::{cli, sti};
use crate::irq::{
    halt_until_done, load_idt, wait_flag, wait_taken, MSI_VECTOR, STRAY, TAKEN_ON, WORKER_DONE,
    WORKER_EXITED, WORKER_READY,
};
use crate::vapic::{msr, rdmsr, wrmsr};
use crate::{println, Outcome};

/// ICR: the destination field's shift.
const DEST: u32 = 32;
/// ICR: delivery modes NMI and INIT.
const NMI: u64 = 4 << 8;
const INIT: u64 = 5 << 8;
/// ICR: the all-excluding-self shorthand.
const OTHERS: u64 = 3 << 18;
/// ESR bit 5: send illegal vector.
const ESR_SEND_ILLEGAL: u64 = 1 << 5;

/// Whether each vCPU's CPUID APIC IDs matched its ID register.
static ID_OK: [AtomicBool; 2] = [const { AtomicBool::new(false) }; 2];
/// Answers vCPU 1 sent.
static ANSWERED: AtomicU64 = AtomicU64::new(0);

/// Checks on vCPU `vcpu` (its interrupt IDT loaded, so its APIC is in x2APIC mode) that
/// CPUID's APIC IDs are the ID register's, and that both are `vcpu`.
fn check_id(vcpu: usize) {
    let leaf1 = cpuid(1).1 >> 24;
    let leaf_b = cpuid(0xb).3;
    let reg = rdmsr(msr::ID);
    let ok = u64::from(leaf1) == reg && u64::from(leaf_b) == reg && reg == vcpu as u64;
    ID_OK[vcpu].store(ok, Ordering::SeqCst);
    println!(
        "vapic-ipi: vcpu {vcpu}: CPUID.1 APIC ID {leaf1}, CPUID.0xB x2APIC ID {leaf_b}, MSR 0x802 {reg}: {}",
        if ok { "ok" } else { "WRONG" }
    );
}

/// vCPU 1: checks its ID, then halts, answering every IPI it took with one to vCPU 0.
pub fn worker() {
    load_idt();
    check_id(1);
    halt_until_done(|| {
        while ANSWERED.load(Ordering::SeqCst) < TAKEN_ON[1].load(Ordering::SeqCst) {
            ANSWERED.fetch_add(1, Ordering::SeqCst);
            wrmsr(msr::ICR, u64::from(MSI_VECTOR));
        }
    });
}

/// vCPU 0's side (see the module).
pub fn run(boot: &BootInfo, n: u64) -> Outcome {
    if boot.vcpus.get() != 2 {
        return Err("vapic-ipi needs 2 vCPUs");
    }
    load_idt();
    check_id(0);
    if !wait_flag(boot, &WORKER_READY) {
        return Err("vCPU 1 did not come up");
    }
    sti();
    let mut missed = 0;
    for i in 0..n {
        let before = TAKEN_ON[0].load(Ordering::SeqCst);
        wrmsr(msr::ICR, u64::from(MSI_VECTOR) | 1 << DEST);
        // Every other answer is waited for spinning without exits: the hypervisor must make
        // the running vCPU exit to take it.
        let use_hlt = i % 2 == 0;
        if !wait_taken(boot, 0, before + 1, 2000, use_hlt) {
            println!("vapic-ipi: IPI {i}: no answer within 2 s (halted: {use_hlt})");
            missed += 1;
        }
    }
    let (to1, answers) = (
        TAKEN_ON[1].load(Ordering::SeqCst),
        TAKEN_ON[0].load(Ordering::SeqCst),
    );
    println!(
        "vapic-ipi: {n} IPI(s) to halted vcpu 1: {to1} taken on vector {MSI_VECTOR:#x} there, {answers} answer(s) taken on vcpu 0, {missed} missed"
    );
    // What must change nothing: a vCPU the guest does not have, NMI / INIT delivery, an
    // illegal vector (latched in the ESR by the next ESR write).
    wrmsr(msr::ESR, 0);
    for icr in [
        u64::from(MSI_VECTOR) | 7 << DEST,
        u64::from(MSI_VECTOR) | 1 << DEST | NMI,
        u64::from(MSI_VECTOR) | 1 << DEST | INIT,
        3 | 1 << DEST,
    ] {
        wrmsr(msr::ICR, icr);
    }
    crate::dma::delay_ms(boot, 300);
    wrmsr(msr::ESR, 0);
    let esr = rdmsr(msr::ESR);
    let unchanged =
        TAKEN_ON[1].load(Ordering::SeqCst) == to1 && TAKEN_ON[0].load(Ordering::SeqCst) == answers;
    let illegal = esr & ESR_SEND_ILLEGAL != 0;
    println!(
        "vapic-ipi: to vcpu 7, NMI, INIT, vector 3: {} taken in all, ESR {esr:#x} (send illegal vector: {illegal}) {}",
        TAKEN_ON[1].load(Ordering::SeqCst) - to1 + TAKEN_ON[0].load(Ordering::SeqCst) - answers,
        if unchanged && illegal { "ok" } else { "WRONG" }
    );
    // All-excluding-self wakes vCPU 1 to stop; it answers that one as well.
    WORKER_DONE.store(true, Ordering::SeqCst);
    wrmsr(msr::ICR, u64::from(MSI_VECTOR) | OTHERS);
    let left = wait_flag(boot, &WORKER_EXITED);
    let last = wait_taken(boot, 0, n + 1, 2000, true);
    crate::dma::delay_ms(boot, 100);
    cli();
    let (to1, answers) = (
        TAKEN_ON[1].load(Ordering::SeqCst),
        TAKEN_ON[0].load(Ordering::SeqCst),
    );
    let stray = STRAY.load(Ordering::SeqCst);
    println!(
        "vapic-ipi: all-excluding-self woke vcpu 1 to stop: {}, its answer {}; in all {to1} taken on vcpu 1, {answers} on vcpu 0, {} answered, {stray} stray",
        if left { "left" } else { "still halted" },
        if last { "taken" } else { "missing" },
        ANSWERED.load(Ordering::SeqCst)
    );
    if !ID_OK.iter().all(|o| o.load(Ordering::SeqCst)) {
        return Err("CPUID's APIC ID is not the x2APIC ID register's");
    }
    if missed != 0 || to1 != n + 1 || answers != n + 1 || stray != 0 || !left {
        return Err("not exactly one interrupt per IPI on the vCPU named");
    }
    if !unchanged || !illegal {
        return Err("an IPI that must be ignored changed something");
    }
    Ok(())
}
