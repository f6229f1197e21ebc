//! Bochs machines: an emulated Intel CPU with VMX (Skylake-X model, EPT, VPID, unrestricted
//! guest) on Bochs's i440fx board, with no IOMMU, no MCFG and no `isa-debug-exit`. The same
//! GRUB ISO boots there; the run's result comes from the hypervisor's final serial line
//! ([`Exit::from_serial`]) and the runner stops Bochs when it appears or at the time limit.
//!
//! Scenario names start with `bochs-`; they run in `cargo xtask test` beside the QEMU ones.

use crate::checks::{boot_complete, forbid_line, need_line, smp};
use crate::{scenario_on, Exit, Scenario};

/// The CPU model Bochs emulates (Debian's bochs 2.7: VMX level 2 with EPT and VPID).
pub const BOCHS_CPU: &str = "corei7_skylake_x";
/// Instructions per emulated second Bochs is told: it only scales Bochs's emulated clocks
/// (its TSC runs at this rate), so fewer make every timed wait (PIT calibration, INIT-SIPI
/// delays, a guest's ticks) cost fewer emulated instructions. 50 M made the `bochs-*` set
/// 3.7x faster than 200 M on the development machine.
pub const BOCHS_IPS: u64 = 50_000_000;
/// BIOS image from the `bochsbios` package.
pub const BOCHS_BIOS: &str = "/usr/share/bochs/BIOS-bochs-latest";
/// VGA BIOS image from the `vgabios` package.
pub const BOCHS_VGABIOS: &str = "/usr/share/vgabios/vgabios.bin";

/// A Bochs machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BochsMachine {
    /// CPUs.
    pub cpus: u32,
    /// RAM in MiB.
    pub memory_mib: u32,
}

impl Default for BochsMachine {
    fn default() -> Self {
        BochsMachine {
            cpus: 1,
            memory_mib: 256,
        }
    }
}

impl BochsMachine {
    /// The bochsrc booting `iso` from CD, COM1 into the file `serial`, Bochs's own log into
    /// `log` (where it reports a CPU reset), the `term` display (Bochs has no headless one
    /// here; the runner sends the screen to a file).
    pub fn bochsrc(&self, iso: &str, serial: &str, log: &str) -> String {
        format!(
            "megs: {mem}\n\
             cpu: model={BOCHS_CPU}, count={cpus}, ips={BOCHS_IPS}\n\
             boot: cdrom\n\
             ata0-master: type=cdrom, path={iso}, status=inserted\n\
             com1: enabled=1, mode=file, dev={serial}\n\
             display_library: term\n\
             romimage: file={BOCHS_BIOS}\n\
             vgaromimage: file={BOCHS_VGABIOS}\n\
             log: {log}\n\
             panic: action=fatal\n\
             error: action=report\n",
            mem = self.memory_mib,
            cpus = self.cpus,
        )
    }
}

/// The line Bochs writes into its log when a CPU triple-faults and it resets the machine.
pub const BOCHS_RESET_LINE: &str = "exception with no resolution";

/// Bochs scenarios take this long at most. Measured on the 2-core development machine with
/// the load average at 6-7 (other emulators beside it): a 1-CPU boot with a guest 14-16 s, a
/// 2-CPU run with two guests 18-34 s; the whole `bochs-*` set 98 s with two at a time.
pub const BOCHS_TIMEOUT_SECS: u64 = 300;

/// The scenario `cargo xtask run --bochs` boots: `cpus` CPUs, every AP reporting in, and a
/// VMX guest that says hello and measures the VMCALL round trip (emulated).
pub fn demo(cpus: u32) -> Scenario {
    let mut s = scenario_on(
        "bochs-demo",
        "the demo run under Bochs",
        BochsMachine {
            cpus,
            ..BochsMachine::default()
        },
        "guest=name=g0,mem=8M",
        Exit::Success,
        Box::new(move |log| {
            boot_complete(log)?;
            smp(log, cpus as usize)?;
            need_line(log, &["g0> PASS hello"])?;
            need_line(log, &["g0> vmmcall-bench:", "ns/call"])?;
            need_line(log, &["guest g0 vcpu0: exited with code 0"])
        }),
    );
    s.modules = vec![guest_module("g0 hello vmmcall-bench=200")];
    s
}

/// Every Bochs scenario.
pub fn scenarios() -> Vec<Scenario> {
    let mut v = vec![];
    v.push(scenario_on(
        "bochs-boot-1",
        "Bochs (Intel Skylake-X, i440fx, no MCFG, no IOMMU): one CPU boots to the end",
        BochsMachine::default(),
        "",
        Exit::Success,
        Box::new(|log| {
            boot_complete(log)?;
            smp(log, 1)?;
            need_line(log, &["dmar: no DMAR table"])?;
            // No MCFG: the i440FX host bridge and the PIIX3 are found through port I/O.
            need_line(
                log,
                &["pci: no ECAM window (MCFG): enumerating segment 0 through ports 0xcf8/0xcfc"],
            )?;
            need_line(log, &["pci: 00:00.0 8086:1237"])?;
            need_line(log, &["pci: 00:01.0 8086:7000"])?;
            need_line(log, &["functions (port I/O)"])?;
            need_line(log, &["apic: xAPIC mode"])?;
            // Bochs's Skylake-X states a base frequency (CPUID 0x16) its emulated TSC does
            // not run at: the PIT measurement must win, and say so.
            need_line(
                log,
                &["tsc: CPUID states", "MHz, more than 10% off the PIT"],
            )?;
            need_line(log, &["TSC", "MHz from PIT calibration"])
        }),
    ));
    v.push(scenario_on(
        "bochs-x2apic-2",
        "Bochs, 2 CPUs, the APIC handed over in x2APIC mode (EXTD set): driven through MSRs, the AP started by the x2APIC ICR",
        BochsMachine {
            cpus: 2,
            ..BochsMachine::default()
        },
        "selftest=x2apic",
        Exit::Success,
        Box::new(|log| {
            need_line(log, &["selftest: local APIC put in x2APIC mode"])?;
            need_line(log, &["apic: x2APIC mode (registers through MSRs"])?;
            boot_complete(log)?;
            smp(log, 2)
        }),
    ));
    v.push(scenario_on(
        "bochs-smp-2",
        "Bochs, 2 CPUs: the AP leaves its trampoline for long mode without faulting and reports in",
        BochsMachine {
            cpus: 2,
            ..BochsMachine::default()
        },
        "",
        Exit::Success,
        Box::new(|log| {
            boot_complete(log)?;
            smp(log, 2)?;
            forbid_line(log, &["did not start"])
        }),
    ));
    let mut s = scenario_on(
        "bochs-guest-hello",
        "VMX: a guest enters 64-bit mode directly, finds Moat and VMCALL in CPUID, prints through the console hypercall; the VMCALL round trip is measured (emulated)",
        BochsMachine::default(),
        "guest=name=g0,mem=8M",
        Exit::Success,
        Box::new(|log| {
            boot_complete(log)?;
            need_line(log, &["vm: Intel VMX", "with EPT and VPID"])?;
            need_line(log, &["g0> moat-test-guest on g0 vcpu 0 of 1: 8 MiB"])?;
            need_line(log, &["g0> hello: cpuid 0x40000000 signature `MoatMoatMoat`", "hypervisor bit true"])?;
            need_line(log, &["g0> hello: VERSION hypercall returned status 0"])?;
            need_line(log, &["g0> PASS hello"])?;
            need_line(log, &["g0> vmmcall-bench:", "ns/call (VMCALL, emulated by Bochs"])?;
            need_line(log, &["guest g0 vcpu0: exited with code 0"])?;
            need_line(log, &["vm: all guests stopped"])
        }),
    );
    s.modules = vec![guest_module("g0 hello vmmcall-bench=200")];
    v.push(s);

    let mut s = scenario_on(
        "bochs-guest-two",
        "VMX: two guests side by side, one per CPU, each with its own EPT and VPID",
        BochsMachine {
            cpus: 2,
            ..BochsMachine::default()
        },
        "guest=name=g0,mem=8M guest=name=g1,mem=8M",
        Exit::Success,
        Box::new(|log| {
            guests_done(log)?;
            crate::guests::side_by_side(log)?;
            need_line(log, &["g0> PASS spin"])?;
            need_line(log, &["g1> PASS spin"])?;
            need_line(log, &["guest g0 vcpu0: exited with code 0"])?;
            need_line(log, &["guest g1 vcpu0: exited with code 0"])
        }),
    );
    s.modules = vec![guest_module("g0 spin=8"), guest_module("g1 spin=8")];
    v.push(s);

    let mut s = scenario_on(
        "bochs-guest-escape",
        "VMX: a read and a write outside the guest's partition are EPT violations at exactly that GPA and stop the guest",
        BochsMachine {
            cpus: 2,
            ..BochsMachine::default()
        },
        "guest=name=g0,mem=8M guest=name=g1,mem=8M",
        Exit::Success,
        Box::new(|log| {
            guests_done(log)?;
            for (g, verb, kind) in [("g0", "reading", "read"), ("g1", "writing", "write")] {
                need_line(log, &[&format!("{g}> escape: {verb} GPA 0x800000")])?;
                need_line(
                    log,
                    &[
                        &format!("guest {g} vcpu0: nested page fault at GPA 0x800000 ({kind}, not mapped)"),
                        "guest stopped",
                    ],
                )?;
                forbid_line(log, &[&format!("{g}> FAIL escape")])?;
            }
            forbid_line(log, &["g0> escape: read 0x"])
        }),
    );
    s.modules = vec![
        guest_module("g0 escape-read"),
        guest_module("g1 escape-write"),
    ];
    v.push(s);

    let mut s = scenario_on(
        "bochs-guest-faults",
        "VMX: a guest that triple-faults is stopped; beside it unknown hypercalls return UNSUPP (rate-limited), a console write from outside memory FAULT, and MSRs other than EFER get #GP injected",
        BochsMachine {
            cpus: 2,
            ..BochsMachine::default()
        },
        "guest=name=g0,mem=8M guest=name=g1,mem=8M",
        Exit::Success,
        Box::new(|log| {
            guests_done(log)?;
            need_line(log, &["g0> triple-fault: ud2 with no IDT"])?;
            need_line(log, &["guest g0 vcpu0: triple fault (shutdown)", "guest stopped"])?;
            forbid_line(log, &["g0> FAIL triple-fault"])?;
            need_line(log, &["guest g1 vcpu0: unknown hypercall 0x7fffdead: returned UNSUPP (-9)"])?;
            need_line(log, &["g1> bad-hypercall: 1000 more unknown calls, 1000 returned UNSUPP"])?;
            need_line(log, &["g1> bad-hypercall: console write from GPA 0xfffff0000000 returned status -8"])?;
            need_line(log, &["g1> PASS bad-hypercall"])?;
            need_line(
                log,
                &["g1> msr: EFER 0xd00; #GP after RDMSR EFER 0, after RDMSR 0xc0010117 1, after WRMSR EFER 2"],
            )?;
            need_line(log, &["g1> PASS msr"])?;
            need_line(log, &["guest g1 vcpu0: exited with code 0"])
        }),
    );
    s.modules = vec![
        guest_module("g0 triple-fault"),
        guest_module("g1 bad-hypercall msr"),
    ];
    v.push(s);

    let mut s = scenario_on(
        "bochs-vmx-entry",
        "VMX: an entry with an invalid guest state and one with a reserved control bit fail with the exit reason / VM-instruction error decoded; each stops only its guest",
        BochsMachine {
            cpus: 2,
            ..BochsMachine::default()
        },
        "guest=name=g0,mem=8M guest=name=g1,mem=8M selftest=vmx-entry",
        Exit::Success,
        Box::new(|log| {
            guests_done(log)?;
            need_line(log, &["vmx: VM entry failed: exit reason 33 (VM-entry failure: invalid guest state), exit qualification"])?;
            need_line(log, &["vmx: VMLAUNCH failed: VM-instruction error 7 (VM entry with invalid control field(s))"])?;
            need_line(log, &["invalid guest state", "guest stopped"])?;
            need_line(log, &["could not run: VM entry with invalid control field(s); guest stopped"])?;
            forbid_line(log, &["PASS hello"])
        }),
    );
    s.modules = vec![guest_module("g0 hello"), guest_module("g1 hello")];
    v.push(s);

    let mut s = scenario_on(
        "bochs-vapic-timer",
        "VMX interrupt injection with the guest's virtual x2APIC as the source: self-IPIs by priority, the TPR, one-shot and periodic timers (the host timer makes a spinning guest exit), and an interrupt pending while interrupts are off delivered through the interrupt window right after `sti; nop` / `sti; hlt`",
        BochsMachine::default(),
        "guest=name=g0,mem=8M",
        Exit::Success,
        Box::new(|log| crate::irq::vapic_timer_check(log, true)),
    );
    s.modules = vec![guest_module("g0 vapic-timer")];
    v.push(s);

    let mut s = scenario_on(
        "bochs-pvdma-no-iommu",
        "no IOMMU (Bochs): a guest given the PIIX3 IDE function under passthrough gets the PV DMA calls, MAP returning the host-physical address as the IOVA (the guest does not drive the IDE's DMA: the calls are checked); strict, batched and deferred are refused with a clear line",
        BochsMachine::default(),
        // One CPU: the refused guests come first (a refused guest takes no CPU).
        "unsafe-interrupts guest=name=g1,mem=8M,dev=00:01.0,policy=strict guest=name=g2,mem=8M,dev=00:00.0,policy=batched guest=name=g3,mem=8M,dev=00:01.3,policy=deferred guest=name=g0,mem=8M,dev=00:01.1,policy=passthrough",
        Exit::Success,
        Box::new(|log| {
            guests_done(log)?;
            need_line(log, &["guest g0: RISK: device 00:01.1 assigned with no IOMMU"])?;
            need_line(log, &["guest g0: DMA: policy Passthrough WITHOUT an IOMMU"])?;
            need_line(log, &["g0> dma-calls: policy passthrough", "(IOVA is GPA: false)"])?;
            crate::dma::iova_is_host_address(log, "g0", "dma-calls: MAP", "GPA", "returned IOVA")?;
            need_line(log, &["g0> dma-calls: UNMAP of IOVA", ": OK"])?;
            need_line(log, &["g0> dma-calls: MAP past the guest's memory: Some(Fault); UNMAP of IOVA 0x1000: Some(Range)"])?;
            need_line(log, &["g0> dma-calls: stats: 1 maps, 1 unmaps, 2 errors"])?;
            need_line(log, &["g0> PASS dma-calls"])?;
            for (g, policy, bdf) in [("g1", "strict", "00:01.0"), ("g2", "batched", "00:00.0"), ("g3", "deferred", "00:01.3")] {
                need_line(log, &[&format!("guest {g}: not started: DMA: policy {policy} needs an IOMMU"), &format!("{bdf} is not behind an enabled VT-d unit")])?;
                forbid_line(log, &[&format!("{g}> ")])?;
            }
            need_line(log, &["vm: all guests stopped (1 started of 4 configured)"])
        }),
    );
    s.modules = vec![
        guest_module("g0 dma-calls"),
        guest_module("g1 hello"),
        guest_module("g2 hello"),
        guest_module("g3 hello"),
    ];
    v.push(s);
    v
}

/// The run ended with every guest stopped and the hypervisor alive.
fn guests_done(log: &str) -> Result<(), String> {
    boot_complete(log)?;
    need_line(log, &["vm: Intel VMX", "with EPT and VPID"])?;
    need_line(log, &["vm: all guests stopped"])?;
    forbid_line(log, &["moat: exit Failure"])
}

fn guest_module(cmdline: &str) -> crate::BootModule {
    crate::BootModule {
        file: crate::TEST_GUEST,
        cmdline: cmdline.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bochsrc_names_the_iso_serial_cpus_and_firmware() {
        let rc = BochsMachine {
            cpus: 2,
            memory_mib: 128,
        }
        .bochsrc("/x.iso", "/s.log", "/b.log");
        for want in [
            "megs: 128\n",
            "cpu: model=corei7_skylake_x, count=2,",
            "path=/x.iso, status=inserted",
            "com1: enabled=1, mode=file, dev=/s.log\n",
            "display_library: term\n",
            "log: /b.log\n",
            BOCHS_BIOS,
            BOCHS_VGABIOS,
        ] {
            assert!(rc.contains(want), "{want:?} missing from\n{rc}");
        }
    }

    #[test]
    fn bochs_scenarios_are_named_and_machined_as_such() {
        for s in scenarios() {
            assert!(s.name.starts_with("bochs-"), "{}", s.name);
            assert!(s.bochs.is_some(), "{}", s.name);
        }
    }
}
