//! Interrupt scenarios (`irq-*`, `msi-*`): what an assigned device can make the host take, and
//! the interrupts a guest gets from its device. Checks name the hypervisor's own counts and
//! what the guest observed, not only that something printed.

use crate::checks::{boot_complete, forbid_line, need_line, no_wrong};
use crate::{BootModule, Exit, Machine, Scenario, Variant, TEST_GUEST};

fn module(cmdline: &str) -> Vec<BootModule> {
    vec![BootModule {
        file: TEST_GUEST,
        cmdline: cmdline.to_string(),
    }]
}

/// An edu that can reach the interrupt window (32-bit DMA mask), at 00:05.0.
fn edu32() -> Machine {
    Machine {
        devices: vec!["edu,addr=0x5,dma_mask=0xffffffff".into()],
        ..Machine::default()
    }
}

/// The number in the hypervisor's `interrupts: vector V: N taken without a handler` line.
fn unowned(log: &str, vector: u32) -> u64 {
    let key = format!("interrupts: vector {vector}: ");
    log.lines()
        .find_map(|l| l.split(key.as_str()).nth(1))
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// What `irq-host-vectors` must show: the guest wrote every vector, the hypervisor took the
/// exception-range ones as ignored external interrupts, never as exceptions.
fn host_vectors_check(log: &str, rounds: u64) -> Result<(), String> {
    boot_complete(log)?;
    remapping_on(log)?;
    for v in ["0x8", "0xe", "0x11", "0x12", "0x40", "0x99"] {
        need_line(
            log,
            &[&format!(
                "g0> irq-host-vectors: wrote MSI data {v} to 0xfee00000 {rounds} time(s)"
            )],
        )?;
    }
    need_line(log, &["g0> PASS irq-host-vectors"])?;
    need_line(log, &["vm: all guests stopped"])?;
    forbid_line(log, &["moat: exit Failure"])?;
    forbid_line(log, &["FATAL exception"])?;
    // QEMU 7.2's interrupt remapping lets compatibility-format writes through (blocking them
    // with CFI clear came in QEMU 8.0), so every write arrives at the host: each one must
    // have been counted as an ignored interrupt on its vector.
    for v in [8, 14, 17, 18, 0x99] {
        let n = unowned(log, v);
        if n != rounds {
            return Err(format!(
                "vector {v}: {n} counted as ignored interrupts, {rounds} sent"
            ));
        }
    }
    Ok(())
}

/// The hypervisor turned interrupt remapping on for the (only) unit.
fn remapping_on(log: &str) -> Result<(), String> {
    need_line(
        log,
        &[
            "vtd: unit 0: interrupt remapping enabled (xAPIC destinations",
            "CFI clear",
        ],
    )
}

/// What `irq-vapic-timer` and `bochs-vapic-timer` must show of guest `g0` running
/// `vapic-timer`: every check the guest made of its virtual APIC passed, and the hypervisor
/// delivered exactly the interrupts the guest's handlers counted, each one EOIed; `vmx`: on
/// the VMX backend.
pub fn vapic_timer_check(log: &str, vmx: bool) -> Result<(), String> {
    boot_complete(log)?;
    need_line(log, &[if vmx { "vm: Intel VMX" } else { "vm: AMD SVM" }])?;
    no_wrong(log, "g0> vapic-timer:")?;
    for want in [
        "CPUID.1:ECX x2APIC: true ok",
        "5 refused accesses: 5 #GP",
        "taken in order [81, 61, 41] ok",
        "taken once after TPR 0x40: 1 ok",
        "on 0x71 while spinning without exits: taken 1 time(s)",
        "none after stopping",
        "masked timer: 0 interrupt(s), count 0 ok",
        "after `sti; nop` taken 1 time(s)",
        "after `sti; hlt` taken 1 time(s)",
        "host timer handler -> guest handler: min",
    ] {
        need_line(log, &["g0> vapic-timer:", want])?;
    }
    if vmx {
        need_line(log, &["g0> vapic-timer:", "CR8 6 -> TPR 0x60, self-IPI 0x55 held true; TPR 0x20 -> CR8 2; taken once after CR8 0: 1 ok"])?;
    }
    need_line(log, &["g0> PASS vapic-timer"])?;
    let taken: u64 = log
        .lines()
        .find_map(|l| {
            l.split("g0> vapic-timer: ")
                .nth(1)?
                .strip_suffix(" interrupt(s) taken in all")
        })
        .and_then(|n| n.parse().ok())
        .ok_or("no total of interrupts taken")?;
    need_line(
        log,
        &[&format!(
            "guest g0 vcpu0: interrupts: 0 raised, {taken} delivered, {taken} EOI(s); APIC timer"
        )],
    )?;
    need_line(log, &["guest g0 vcpu0: exited with code 0"])?;
    forbid_line(log, &["moat: exit Failure"])
}

/// The interrupt scenarios on `on`'s machine.
pub fn scenarios(on: Variant) -> Vec<Scenario> {
    let mut v = Vec::new();
    let no_ir = || Machine {
        iommu: Some("intel-iommu,intremap=off".into()),
        ..Machine::default()
    };
    let mut s = on.scenario(
        "irq-no-remapping-refused",
        "a guest assigned a device whose IOMMU unit does not remap interrupts (intremap=off) is refused with a clear line; the other guest runs",
        no_ir(),
        "guest=name=g0,mem=8M,dev=00:05.0 guest=name=g1,mem=8M",
        Exit::Success,
        Box::new(|log| {
            boot_complete(log)?;
            need_line(log, &["vtd: unit 0: no interrupt remapping (ECAP.IR clear)"])?;
            need_line(log, &["guest g0: not started: device 00:05.0: its IOMMU unit does not remap interrupts", "refused"])?;
            forbid_line(log, &["g0> "])?;
            need_line(log, &["g1> PASS hello"])?;
            need_line(log, &["vm: all guests stopped (1 started of 2 configured)"])
        }),
    );
    s.modules = vec![
        BootModule {
            file: TEST_GUEST,
            cmdline: "g0 hello edu-bar".into(),
        },
        BootModule {
            file: TEST_GUEST,
            cmdline: "g1 hello".into(),
        },
    ];
    v.push(s);
    let mut s = on.scenario(
        "irq-unsafe-interrupts",
        "with `unsafe-interrupts` the same guest starts, and the risk is logged at boot and at assignment",
        no_ir(),
        "unsafe-interrupts guest=name=g0,mem=8M,dev=00:05.0",
        Exit::Success,
        Box::new(|log| {
            boot_complete(log)?;
            need_line(log, &["vtd: RISK: unsafe-interrupts on the command line"])?;
            need_line(log, &["guest g0: RISK: device 00:05.0 assigned although its IOMMU unit does not remap interrupts"])?;
            need_line(log, &["g0> PASS edu-bar"])?;
            need_line(log, &["guest g0 vcpu0: exited with code 0"])
        }),
    );
    s.modules = module("g0 edu-bar");
    v.push(s);
    for (name, test, vcpus, dest, about) in [
        (
            "msi-edu",
            "msi-edu",
            1,
            0,
            "the guest enables MSI on its edu and waits for each DMA by interrupt (HLT): exactly one interrupt per DMA on its chosen vector, through an IRTE the hypervisor owns",
        ),
        (
            "msi-edu-2vcpu",
            "msi-edu-vcpu1",
            2,
            1,
            "the same with 2 vCPUs, the MSI routed to vCPU 1 (halted until it arrives): every interrupt taken there",
        ),
    ] {
        let n = 4;
        let mut s = on.scenario(
            name,
            about,
            Machine::default(),
            &format!("guest=name=g0,mem=16M,cpus={vcpus},dev=00:05.0,policy=strict"),
            Exit::Success,
            Box::new(move |log| {
                boot_complete(log)?;
                remapping_on(log)?;
                need_line(log, &["guest g0: 00:05.0: MSI virtualized (host vector"])?;
                need_line(log, &[&format!("guest g0: 00:05.0: MSI vector 0x51 -> vcpu{dest} (host vector")])?;
                need_line(log, &[&format!("g0> msi-edu: {n} DMA(s) with completion interrupt to vcpu {dest}: {n} interrupt(s) on vector 0x51, {n} on vcpu {dest}, 0 stray, 0 missed")])?;
                need_line(log, &[&format!("g0> PASS {test}")])?;
                // The host took every one of them on the device's vector (plus the one
                // wake-up of vCPU 1 at the end), and delivered each one it raised.
                let wakes: u64 = if dest == 1 {
                    need_line(log, &["g0> msi-edu: worker woken to stop by one interrupt-raise: left"])?;
                    1
                } else {
                    0
                };
                let taken = n + wakes;
                need_line(log, &["guest g0: MSI host vector", &format!(": {taken} interrupt(s) taken, 0 storm(s) masked")])?;
                need_line(log, &[&format!("guest g0 vcpu{dest}: interrupts: {taken} raised, {taken} delivered, {taken} EOI(s)")])?;
                need_line(log, &["guest g0 vcpu0: exited with code 0"])
            }),
        );
        s.modules = module(&format!("g0 {test}={n}"));
        v.push(s);
    }
    let mut s = on.scenario(
        "msi-attacks",
        "the guest programs MSI data naming host vectors 8 and 18 (refused, nothing arrives anywhere) and 0x40 (the guest's own vector 0x40, never the host's), byte-wise compatibility-format writes and writes past the capability (virtual only); the other guest is unaffected",
        Machine::default(),
        "guest=name=g0,mem=16M,dev=00:05.0,policy=strict guest=name=g1,mem=8M",
        Exit::Success,
        Box::new(|log| {
            boot_complete(log)?;
            remapping_on(log)?;
            no_wrong(log, "g0> msi-attacks:")?;
            for v in ["0x8", "0x12"] {
                need_line(log, &["guest g0: 00:05.0: MSI address 0xfee00000 data", &format!("data {v} refused (BadMessage)")])?;
            }
            need_line(log, &["g0> msi-attacks: MSI data vector 0x40: 1 interrupt(s) in the guest (want 1) ok"])?;
            need_line(log, &["g0> PASS msi-attacks"])?;
            // Nothing reached the host on 8 or 18, and the VT-d fault handler never ran.
            for v in [8, 18] {
                if unowned(log, v) != 0 {
                    return Err(format!("the host took vector {v}"));
                }
            }
            need_line(log, &["interrupts: VT-d fault event interrupts taken: 0"])?;
            need_line(log, &["g1> PASS spin"])?;
            need_line(log, &["vm: all guests stopped (2 started of 2 configured)"])
        }),
    );
    s.modules = vec![
        BootModule {
            file: TEST_GUEST,
            cmdline: "g0 msi-attacks".into(),
        },
        BootModule {
            file: TEST_GUEST,
            cmdline: "g1 spin=20".into(),
        },
    ];
    v.push(s);
    let storm = 5000;
    let mut s = on.scenario(
        "msi-storm",
        "the guest makes its edu raise thousands of MSIs back to back: the host counts them, masks the device past the storm threshold and stays alive; reprogrammed, the device's interrupt works again; the other guest is unaffected",
        Machine::default(),
        "guest=name=g0,mem=16M,dev=00:05.0,policy=strict guest=name=g1,mem=8M",
        Exit::Success,
        Box::new(move |log| {
            boot_complete(log)?;
            need_line(log, &[&format!("g0> msi-storm: {storm} interrupt-raise writes done, guest alive")])?;
            need_line(log, &["irq: interrupt storm from 00:05.0", "its MSI masked"])?;
            need_line(log, &["g0> msi-storm: after reprogramming, the DMA completion interrupt arrived"])?;
            need_line(log, &["g0> PASS msi-storm"])?;
            let taken: u64 = log
                .lines()
                .find_map(|l| l.split("guest g0: MSI host vector ").nth(1))
                .and_then(|r| r.split(": ").nth(1))
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.parse().ok())
                .ok_or("no MSI count line")?;
            if taken <= 200 {
                return Err(format!("only {taken} interrupts taken: no storm"));
            }
            need_line(log, &["1 storm(s) masked"])?;
            need_line(log, &["g1> PASS spin"])?;
            need_line(log, &["vm: all guests stopped (2 started of 2 configured)"])
        }),
    );
    s.modules = vec![
        BootModule {
            file: TEST_GUEST,
            cmdline: format!("g0 msi-storm={storm}"),
        },
        BootModule {
            file: TEST_GUEST,
            cmdline: "g1 spin=20".into(),
        },
    ];
    v.push(s);
    let mut s = on.scenario(
        "irq-fault-ring",
        "FAULT_IRQ: a batch of fault records landing in the empty ring raises its registered vector once, a batch landing in an unconsumed ring none; the records are in the ring",
        Machine::default(),
        "guest=name=g0,mem=16M,dev=00:05.0,policy=strict",
        Exit::Success,
        Box::new(|log| {
            boot_complete(log)?;
            need_line(log, &["g0> dma-fault-irq: FAULT_IRQ offered: true"])?;
            for (round, dmas) in [(1, 2), (2, 1)] {
                need_line(log, &[&format!("g0> dma-fault-irq: round {round}, {dmas} blocked DMA(s): "), &format!("raised {round} time(s) in all (want {round}) ok")])?;
            }
            need_line(log, &["g0> PASS dma-fault-irq"])
        }),
    );
    s.modules = module("g0 dma-fault-irq");
    v.push(s);
    let mut s = on.scenario(
        "irq-vapic-timer",
        "the guest's virtual x2APIC as its only interrupt source: #GP for refused accesses, self-IPIs highest priority first, the TPR holding a class back, one-shot and periodic timers (spinning without exits: the host timer makes it exit; halted: the wait ends at expiry), a masked timer silent, an interrupt pending with interrupts off taken right after `sti; nop` / `sti; hlt`",
        Machine::default(),
        "guest=name=g0,mem=8M",
        Exit::Success,
        Box::new(|log| vapic_timer_check(log, false)),
    );
    s.modules = module("g0 vapic-timer");
    v.push(s);
    let rounds = 3;
    let mut s = on.scenario(
        "irq-host-vectors",
        "a device DMAs MSI data naming host exception vectors (8, 14, 17, 18), the IOMMU's fault vector and an unused one to 0xFEE00000: counted and ignored, never fatal",
        edu32(),
        "guest=name=g0,mem=16M,dev=00:05.0,policy=strict",
        Exit::Success,
        Box::new(move |log| host_vectors_check(log, rounds)),
    );
    s.modules = module(&format!("g0 irq-host-vectors={rounds}"));
    v.push(s);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unowned_count_is_read_from_its_line() {
        let log =
            "[ 1.0] INFO  cpu0 idt: interrupts: vector 8: 3 taken without a handler (ignored)";
        assert_eq!(unowned(log, 8), 3);
        assert_eq!(unowned(log, 18), 0);
    }
}
