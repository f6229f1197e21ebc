//! Interrupt scenarios (`irq-*`, `msi-*`): what an assigned device can make the host take, and
//! the interrupts a guest gets from its device. Checks name the hypervisor's own counts and
//! what the guest observed, not only that something printed.

use crate::checks::{boot_complete, forbid_line, need_line, no_wrong};
use crate::{BootModule, Exit, Machine, Scenario, Variant, TEST_GUEST};

/// Interrupts merged in a row past which the host masks a device's MSI / MSI-X entry
/// (`hypervisor/kernel/src/vm/route.rs`).
const STORM_LIMIT: u64 = 200;

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

/// The host took none of `vectors` (from a device: they are the guest's attempts).
fn host_never_took(log: &str, vectors: &[u32]) -> Result<(), String> {
    match vectors.iter().find(|&&v| unowned(log, v) != 0) {
        Some(v) => Err(format!("the host took vector {v}")),
        None => Ok(()),
    }
}

/// Guest g0 running `g0`, beside guest g1 spinning for 20 ticks (the guest that must stay
/// unaffected).
fn beside_spinning_g1(g0: &str) -> Vec<BootModule> {
    vec![
        BootModule {
            file: TEST_GUEST,
            cmdline: format!("g0 {g0}"),
        },
        BootModule {
            file: TEST_GUEST,
            cmdline: "g1 spin=20".into(),
        },
    ]
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

/// Every host vector and IRTE was given back once the guests stopped.
fn routes_freed(log: &str) -> Result<(), String> {
    need_line(
        log,
        &["interrupts: after every guest stopped: 0 device host vector(s) and 0 IRTE(s) in use"],
    )
}

/// What both `msi-x-nvme` scenarios must show: MSI-X offered with its table trapped, the
/// guest's interrupts exactly one per completion on `dest`, the pending bits delivered on
/// unmask, and every route freed at stop.
fn msix_nvme_check(log: &str, dest: u32, vcpus: u32) -> Result<(), String> {
    let bdf = crate::nvme::NVME_BDF;
    boot_complete(log)?;
    remapping_on(log)?;
    need_line(
        log,
        &[
            &format!("guest g0: {bdf}: MSI-X virtualized: "),
            "table/PBA pages trapped",
        ],
    )?;
    need_line(
        log,
        &[
            &format!("guest g0: {bdf} BAR0 ["),
            "left unmapped: MSI-X table/PBA, emulated",
        ],
    )?;
    need_line(log, &["g0> msi-x: capability at", "table BAR", "PBA BAR"])?;
    need_line(
        log,
        &[&format!(
            "guest g0: {bdf}: MSI-X entry 1: vector 0x51 -> vcpu{dest} (host vector"
        )],
    )?;
    let n = 16;
    need_line(log, &[&format!("g0> msi-x-nvme: {n} I/O(s) with completion interrupt to vcpu {dest}: {n} interrupt(s) on vector 0x51 on vcpu {dest}, {n} with exactly one completion, 0 stray, 0 on 0x53, 0 missed; 0 byte(s) differ")])?;
    need_line(log, &["g0> msi-x-nvme: entry 1 masked: I/O completed, 0 interrupt(s), PBA bit 1; unmasked: 1 interrupt(s) in all, PBA bit 0 ok"])?;
    need_line(log, &["g0> msi-x-nvme: admin completion with entry 0 masked: PBA bit 1, 0 interrupt(s) on 0x53; unmasked: 1, PBA bit 0 ok"])?;
    let test = if dest == 1 {
        "msi-x-nvme-vcpu1"
    } else {
        "msi-x-nvme"
    };
    need_line(log, &[&format!("g0> PASS {test}")])?;
    // Host side: entry 1's interrupts (plus the wake-up of vCPU 1) and entry 0's one, over
    // two host vectors; each raised on its vCPU was delivered.
    let wakes = u64::from(dest == 1);
    let on_dest = n + 1 + wakes;
    let total = on_dest + 1;
    need_line(log, &[&format!("guest g0: {bdf}: MSI-X: {total} interrupt(s) taken over 2 host vector(s), 0 storm(s) masked")])?;
    if vcpus == 1 {
        need_line(
            log,
            &[&format!(
                "guest g0 vcpu0: interrupts: {total} raised, {total} delivered, {total} EOI(s)"
            )],
        )?;
    } else {
        need_line(
            log,
            &["g0> msi-x-nvme: worker woken to stop by one more completion: left"],
        )?;
        need_line(log, &[&format!("guest g0 vcpu1: interrupts: {on_dest} raised, {on_dest} delivered, {on_dest} EOI(s)")])?;
        need_line(
            log,
            &["guest g0 vcpu0: interrupts: 1 raised, 1 delivered, 1 EOI(s)"],
        )?;
    }
    need_line(log, &["guest g0 vcpu0: exited with code 0"])?;
    routes_freed(log)?;
    crate::dma::no_leak(log)
}

/// What `msi-x-attacks` must show.
fn msix_attacks_check(log: &str) -> Result<(), String> {
    let bdf = crate::nvme::NVME_BDF;
    boot_complete(log)?;
    remapping_on(log)?;
    if let Some(l) = log
        .lines()
        .find(|l| l.contains("g0> msi-x-attacks:") && l.contains("WRONG"))
    {
        return Err(format!("wrong answer: {l}"));
    }
    need_line(
        log,
        &["g0> msi-x-attacks: PBA written with all ones:", "ok"],
    )?;
    need_line(
        log,
        &[
            &format!("guest g0: {bdf}: MSI-X page access of 4 byte(s) at"),
            "(write) ignored: a write to the pending-bit array (read only)",
        ],
    )?;
    for (v, want) in [("0x8", 0), ("0x12", 0), ("0x40", 1)] {
        need_line(log, &[&format!("g0> msi-x-attacks: entry 1 data {v}: table reads back {v}, {want} interrupt(s) in the guest (want {want}) ok")])?;
    }
    for data in ["0x8", "0x12"] {
        need_line(log, &[&format!("guest g0: {bdf}: MSI-X entry 1 address 0xfee00000 data {data} refused (BadMessage)")])?;
    }
    need_line(
        log,
        &[&format!(
            "guest g0: {bdf}: MSI-X entry 1 address 0xfee00010 data 0x51 refused (BadMessage)"
        )],
    )?;
    need_line(log, &["g0> msi-x-attacks: entry 1 with a remappable-format address: 0 interrupt(s) in the guest (want 0) ok"])?;
    for what in ["2 byte(s)", "1 byte(s)"] {
        need_line(
            log,
            &[
                &format!("guest g0: {bdf}: MSI-X page access of {what} at"),
                "ignored: not an aligned dword or qword",
            ],
        )?;
    }
    need_line(
        log,
        &[
            "g0> msi-x-attacks: 2-byte write, misaligned dword write:",
            "ok",
        ],
    )?;
    need_line(log, &["g0> msi-x-attacks: qword write made entry 1 live: true; 64 mask/unmask writes under 16 I/Os: all completed", "the next I/O's interrupt arrived ok"])?;
    need_line(log, &["g0> PASS msi-x-attacks"])?;
    // The instruction the hypervisor does not emulate stops the guest, not the hypervisor.
    need_line(
        log,
        &[
            "guest g0 vcpu0: access to the trapped MSI-X page at GPA",
            "not emulated: instruction not emulated: opcode 0x83 not emulated; guest stopped",
        ],
    )?;
    forbid_line(log, &["FATAL exception"])?;
    host_never_took(log, &[8, 18])?;
    need_line(log, &["g1> PASS spin"])?;
    need_line(log, &["vm: all guests stopped (2 started of 2 configured)"])?;
    routes_freed(log)
}

/// Scenario `name` (`about`) on the NVMe machine with its disk, `config` and `modules`,
/// expected to end in success.
fn nvme_scenario(
    on: Variant,
    (name, about): (&str, &'static str),
    config: &str,
    modules: Vec<BootModule>,
    check: crate::Check,
) -> Scenario {
    let mut s = on.scenario(
        name,
        about,
        crate::nvme::machine(),
        config,
        Exit::Success,
        check,
    );
    s.modules = modules;
    crate::nvme::with_disk(s)
}

/// The MSI-X scenarios (NVMe: its MSI-X table is in BAR0).
fn msix_scenarios(on: Variant) -> Vec<Scenario> {
    let bdf = crate::nvme::NVME_BDF;
    let mut v = Vec::new();
    for (name, vcpus, dest, about) in [
        (
            "msi-x-nvme",
            1u32,
            0u32,
            "the guest enables MSI-X on its NVMe controller through the trapped table and waits for each of 16 I/Os by interrupt (HLT): exactly one interrupt per completion on its vector, data read back equal; a masked entry's completion shows in the PBA and is delivered on unmask; IRTEs and host vectors freed at stop",
        ),
        (
            "msi-x-nvme-2vcpu",
            2,
            1,
            "the same with 2 vCPUs, the I/O queue's entry routed to vCPU 1 (halted until each interrupt arrives)",
        ),
    ] {
        let test = if dest == 1 { "msi-x-nvme-vcpu1" } else { "msi-x-nvme" };
        v.push(nvme_scenario(
            on,
            (name, about),
            &format!("guest=name=g0,mem=64M,cpus={vcpus},dev={bdf},policy=strict"),
            module(&format!("g0 {test}=8")),
            Box::new(move |log| msix_nvme_check(log, dest, vcpus)),
        ));
    }
    let storm = 400;
    let besides: [(&str, &'static str, String, crate::Check); 2] = [
        (
            "msi-x-attacks",
            "through the trapped MSI-X table the guest writes host vectors 8 and 18 (refused, nothing reaches the host; the table reads back what was written), 0x40 (its own vector), a remappable-format address (refused), the PBA (ignored), odd-sized and misaligned accesses (ignored), mask/unmask under traffic; an ADD to the table stops only that guest; the other guest is unaffected",
            "msi-x-attacks msi-x-unemulated".into(),
            Box::new(msix_attacks_check),
        ),
        (
            "msi-x-storm",
            "an interrupt storm on an MSI-X entry: the NVMe controller completes hundreds of I/Os while the guest, interrupts off, takes none of their interrupts; the host counts them, masks the entry past its storm threshold (the rest never reach it), stays alive; the guest gets the one pending interrupt, and the entry reprogrammed works again; the other guest is unaffected",
            format!("msi-x-storm={storm}"),
            Box::new(move |log| msix_storm_check(log, storm)),
        ),
    ];
    for (name, about, g0, check) in besides {
        v.push(nvme_scenario(
            on,
            (name, about),
            &format!("guest=name=g0,mem=64M,dev={bdf},policy=strict guest=name=g1,mem=8M"),
            beside_spinning_g1(&g0),
            check,
        ));
    }
    v
}

/// What `msi-x-storm` must show with `n` I/Os: the guest's counts, the storm masked once
/// (the host's count of the device's MSI-X interrupts past the threshold), every route freed.
fn msix_storm_check(log: &str, n: u64) -> Result<(), String> {
    boot_complete(log)?;
    remapping_on(log)?;
    let polled = format!("g0> msi-x-storm: {n} I/O(s) polled with interrupts off: all completed, 1 interrupt(s) taken after sti (want 1)");
    for want in [
        &[polled.as_str()][..],
        &["g0> msi-x-storm: entry 1 reprogrammed: the next I/O's interrupt arrived"],
        &["g0> PASS msi-x-storm"],
        &["irq: interrupt storm from", "its MSI-X entry masked"],
    ] {
        need_line(log, want)?;
    }
    let taken: u64 = log
        .lines()
        .find_map(|l| l.split("MSI-X: ").nth(1)?.split(' ').next()?.parse().ok())
        .ok_or("no MSI-X count line")?;
    if taken <= STORM_LIMIT || taken >= n {
        return Err(format!(
            "{taken} MSI-X interrupts taken for {n} I/Os: no storm, or the entry was not masked"
        ));
    }
    need_line(log, &["MSI-X: ", "1 storm(s) masked"])?;
    need_line(log, &["g1> PASS spin"])?;
    need_line(log, &["vm: all guests stopped (2 started of 2 configured)"])?;
    routes_freed(log)
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

/// Guest g0 alone (`config`, the test guest with `cmdline`) on the default machine, expected
/// to end in success.
fn g0_alone(
    on: Variant,
    name: &str,
    about: &'static str,
    config: &str,
    cmdline: &str,
    check: crate::Check,
) -> Scenario {
    let mut s = on.scenario(
        name,
        about,
        Machine::default(),
        config,
        Exit::Success,
        check,
    );
    s.modules = module(cmdline);
    s
}

/// What `irq-vapic-ipi` must show with `n` IPIs: the guest's own checks, and the
/// hypervisor's per-vCPU counts equal to what the guest took and sent (`n` + the stop IPI
/// each way; vCPU 0's three ignored ICR writes and its illegal vector).
fn vapic_ipi_check(log: &str, n: u64) -> Result<(), String> {
    boot_complete(log)?;
    no_wrong(log, "g0> vapic-ipi:")?;
    for v in 0..2 {
        need_line(log, &[&format!("g0> vapic-ipi: vcpu {v}: CPUID.1 APIC ID {v}, CPUID.0xB x2APIC ID {v}, MSR 0x802 {v}: ok")])?;
    }
    need_line(log, &[&format!("g0> vapic-ipi: {n} IPI(s) to halted vcpu 1: {n} taken on vector 0x51 there, {n} answer(s) taken on vcpu 0, 0 missed")])?;
    need_line(log, &["g0> vapic-ipi: to vcpu 7, NMI, INIT, vector 3: 0 taken in all, ESR 0x20 (send illegal vector: true) ok"])?;
    let all = n + 1;
    need_line(log, &[&format!("g0> vapic-ipi: all-excluding-self woke vcpu 1 to stop: left, its answer taken; in all {all} taken on vcpu 1, {all} on vcpu 0, {all} answered, 0 stray")])?;
    need_line(log, &["g0> PASS vapic-ipi"])?;
    for (v, ignored, dropped) in [(0, 3, 1), (1, 0, 0)] {
        need_line(
            log,
            &[
                &format!("guest g0 vcpu{v}: interrupts: {all} raised, {all} delivered, {all} EOI(s); APIC timer"),
                &format!("{dropped} dropped; IPIs: {all} sent, {ignored} ignored"),
            ],
        )?;
    }
    need_line(log, &["guest g0 vcpu0: ICR 0x700000051 ignored"])?;
    need_line(log, &["guest g0 vcpu0: ICR 0x100000451 ignored"])?;
    need_line(log, &["guest g0 vcpu0: exited with code 0"])?;
    need_line(log, &["guest g0 vcpu1: exited with code 0"])?;
    forbid_line(log, &["moat: exit Failure"])
}

/// The interrupt scenarios on `on`'s machine.
pub fn scenarios(on: Variant) -> Vec<Scenario> {
    let mut v = msix_scenarios(on);
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
            host_never_took(log, &[8, 18])?;
            need_line(log, &["interrupts: VT-d fault event interrupts taken: 0"])?;
            need_line(log, &["g1> PASS spin"])?;
            need_line(log, &["vm: all guests stopped (2 started of 2 configured)"])
        }),
    );
    s.modules = beside_spinning_g1("msi-attacks");
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
            if taken <= STORM_LIMIT {
                return Err(format!("only {taken} interrupts taken: no storm"));
            }
            need_line(log, &["1 storm(s) masked"])?;
            need_line(log, &["g1> PASS spin"])?;
            need_line(log, &["vm: all guests stopped (2 started of 2 configured)"])
        }),
    );
    s.modules = beside_spinning_g1(&format!("msi-storm={storm}"));
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
    v.push(g0_alone(
        on,
        "irq-vapic-timer",
        "the guest's virtual x2APIC as its only interrupt source: #GP for refused accesses, self-IPIs highest priority first, the TPR holding a class back, one-shot and periodic timers (spinning without exits: the host timer makes it exit; halted: the wait ends at expiry), a masked timer silent, an interrupt pending with interrupts off taken right after `sti; nop` / `sti; hlt`",
        "guest=name=g0,mem=8M",
        "g0 vapic-timer",
        Box::new(|log| vapic_timer_check(log, false)),
    ));
    let n = 8;
    v.push(g0_alone(
        on,
        "irq-vapic-ipi",
        "IPIs between the 2 vCPUs of a guest: each vCPU's CPUID APIC IDs are its x2APIC ID register's; vCPU 0 sends N fixed IPIs to halted vCPU 1, which takes exactly N on the vector and answers each with an IPI back (taken by vCPU 0 halted, or spinning without exits: its CPU is kicked); IPIs to a vCPU the guest lacks, NMI / INIT delivery and vector 3 change nothing (ESR send-illegal set); the hypervisor's counts agree with the guest's",
        "guest=name=g0,mem=8M,cpus=2",
        &format!("g0 vapic-ipi={n}"),
        Box::new(move |log| vapic_ipi_check(log, n)),
    ));
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
