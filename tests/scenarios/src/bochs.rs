//! Bochs machines: an emulated Intel CPU with VMX (Skylake-X model, EPT, VPID, unrestricted
//! guest) on Bochs's i440fx board, with no IOMMU, no MCFG and no `isa-debug-exit`. The same
//! GRUB ISO boots there; the run's result comes from the hypervisor's final serial line
//! ([`Exit::from_serial`]) and the runner stops Bochs when it appears or at the time limit.
//!
//! Scenario names start with `bochs-`; they run in `cargo xtask test` beside the QEMU ones.

use crate::checks::{boot_complete, forbid_line, need_line, smp};
use crate::{Scenario, Spec, Variant};

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
    Spec {
        name: "bochs-demo".into(),
        about: "the demo run under Bochs",
        bochs: Some(BochsMachine {
            cpus,
            ..BochsMachine::default()
        }),
        cmdline: "guest=name=g0,mem=8M".into(),
        modules: &["g0 hello vmmcall-bench=200"],
        then: Some(Box::new(move |log| {
            smp(log, cpus as usize)?;
            need_line(log, &["g0> PASS hello"])?;
            need_line(log, &["g0> vmmcall-bench:", "ns/call"])?;
            need_line(log, &["guest g0 vcpu0: exited with code 0"])
        })),
        ..Spec::default()
    }
    .on(Variant::Default, boot_complete)
}

/// Bochs with 1 or 2 CPUs.
fn one() -> Option<BochsMachine> {
    Some(BochsMachine::default())
}

fn two() -> Option<BochsMachine> {
    Some(BochsMachine {
        cpus: 2,
        ..BochsMachine::default()
    })
}

/// Two guests with 8 MiB each.
const TWO: &str = "guest=name=g0,mem=8M guest=name=g1,mem=8M";

/// Every Bochs scenario.
pub fn scenarios() -> Vec<Scenario> {
    let booted = |spec: Spec| spec.on(Variant::Default, boot_complete);
    let vmx = |spec: Spec| spec.on(Variant::Default, guests_done);
    vec![
        booted(Spec {
            name: "bochs-boot-1".into(),
            about: "Bochs (Intel Skylake-X, i440fx, no MCFG, no IOMMU): one CPU boots to the end",
            bochs: one(),
            need: &[
                &["dmar: no DMAR table"],
                // No MCFG: the i440FX host bridge and the PIIX3 are found through port I/O.
                &["pci: no ECAM window (MCFG): enumerating segment 0 through ports 0xcf8/0xcfc"],
                &["pci: 00:00.0 8086:1237"],
                &["pci: 00:01.0 8086:7000"],
                &["functions (port I/O)"],
                &["apic: xAPIC mode"],
                // Bochs's Skylake-X states a base frequency (CPUID 0x16) its emulated TSC does
                // not run at: the PIT measurement must win, and say so.
                &["tsc: CPUID states", "MHz, more than 10% off the PIT"],
                &["TSC", "MHz from PIT calibration"],
            ],
            then: Some(Box::new(|log| smp(log, 1))),
            ..Spec::default()
        }),
        booted(Spec {
            name: "bochs-x2apic-2".into(),
            about: "Bochs, 2 CPUs, the APIC handed over in x2APIC mode (EXTD set): driven through MSRs, the AP started by the x2APIC ICR",
            bochs: two(),
            cmdline: "selftest=x2apic".into(),
            need: &[
                &["selftest: local APIC put in x2APIC mode"],
                &["apic: x2APIC mode (registers through MSRs"],
            ],
            then: Some(Box::new(|log| smp(log, 2))),
            ..Spec::default()
        }),
        booted(Spec {
            name: "bochs-smp-2".into(),
            about: "Bochs, 2 CPUs: the AP leaves its trampoline for long mode without faulting and reports in",
            bochs: two(),
            forbid: &[&["did not start"]],
            then: Some(Box::new(|log| smp(log, 2))),
            ..Spec::default()
        }),
        vmx(Spec {
            name: "bochs-guest-hello".into(),
            about: "VMX: a guest enters 64-bit mode directly, finds Moat and VMCALL in CPUID, prints through the console hypercall; the VMCALL round trip is measured (emulated)",
            bochs: one(),
            cmdline: "guest=name=g0,mem=8M".into(),
            modules: &["g0 hello vmmcall-bench=200"],
            need: &[
                &["g0> moat-test-guest on g0 vcpu 0 of 1: 8 MiB"],
                &["g0> hello: cpuid 0x40000000 signature `MoatMoatMoat`", "hypervisor bit true"],
                &["g0> hello: VERSION hypercall returned status 0"],
                &["g0> PASS hello"],
                &["g0> vmmcall-bench:", "ns/call (VMCALL, emulated by Bochs"],
                &["guest g0 vcpu0: exited with code 0"],
            ],
            ..Spec::default()
        }),
        vmx(Spec {
            name: "bochs-guest-two".into(),
            about: "VMX: two guests side by side, one per CPU, each with its own EPT and VPID",
            bochs: two(),
            cmdline: TWO.into(),
            modules: &["g0 spin=8", "g1 spin=8"],
            need: &[
                &["g0> PASS spin"],
                &["g1> PASS spin"],
                &["guest g0 vcpu0: exited with code 0"],
                &["guest g1 vcpu0: exited with code 0"],
            ],
            then: Some(Box::new(crate::guests::side_by_side)),
            ..Spec::default()
        }),
        vmx(Spec {
            name: "bochs-guest-escape".into(),
            about: "VMX: a read and a write outside the guest's partition are EPT violations at exactly that GPA and stop the guest",
            bochs: two(),
            cmdline: TWO.into(),
            modules: &["g0 escape-read", "g1 escape-write"],
            forbid: &[&["g0> escape: read 0x"]],
            then: Some(Box::new(|log| {
                for (g, verb, kind) in [("g0", "reading", "read"), ("g1", "writing", "write")] {
                    need_line(log, &[&format!("{g}> escape: {verb} GPA 0x800000")])?;
                    let fault = format!("guest {g} vcpu0: nested page fault at GPA 0x800000 ({kind}, not mapped)");
                    need_line(log, &[&fault, "guest stopped"])?;
                    forbid_line(log, &[&format!("{g}> FAIL escape")])?;
                }
                Ok(())
            })),
            ..Spec::default()
        }),
        vmx(Spec {
            name: "bochs-guest-faults".into(),
            about: "VMX: a guest that triple-faults is stopped; beside it unknown hypercalls return UNSUPP (rate-limited), a console write from outside memory FAULT, and MSRs other than EFER get #GP injected",
            bochs: two(),
            cmdline: TWO.into(),
            modules: &["g0 triple-fault", "g1 bad-hypercall msr"],
            need: &[
                &["g0> triple-fault: ud2 with no IDT"],
                &["guest g0 vcpu0: triple fault (shutdown)", "guest stopped"],
                &["guest g1 vcpu0: unknown hypercall 0x7fffdead: returned UNSUPP (-9)"],
                &["g1> bad-hypercall: 1000 more unknown calls, 1000 returned UNSUPP"],
                &["g1> bad-hypercall: console write from GPA 0xfffff0000000 returned status -8"],
                &["g1> PASS bad-hypercall"],
                &["g1> msr: EFER 0xd00; #GP after RDMSR EFER 0, after RDMSR 0xc0010117 1, after WRMSR EFER 2"],
                &["g1> PASS msr"],
                &["guest g1 vcpu0: exited with code 0"],
            ],
            forbid: &[&["g0> FAIL triple-fault"]],
            ..Spec::default()
        }),
        vmx(Spec {
            name: "bochs-vmx-entry".into(),
            about: "VMX: an entry with an invalid guest state and one with a reserved control bit fail with the exit reason / VM-instruction error decoded; each stops only its guest",
            bochs: two(),
            cmdline: format!("{TWO} selftest=vmx-entry"),
            modules: &["g0 hello", "g1 hello"],
            need: &[
                &["vmx: VM entry failed: exit reason 33 (VM-entry failure: invalid guest state), exit qualification"],
                &["vmx: VMLAUNCH failed: VM-instruction error 7 (VM entry with invalid control field(s))"],
                &["invalid guest state", "guest stopped"],
                &["could not run: VM entry with invalid control field(s); guest stopped"],
            ],
            forbid: &[&["PASS hello"]],
            ..Spec::default()
        }),
        vmx(Spec {
            name: "bochs-pvdma-no-iommu".into(),
            about: "no IOMMU (Bochs): a guest given the PIIX3 IDE function under passthrough gets the PV DMA calls, MAP returning the host-physical address as the IOVA (the guest does not drive the IDE's DMA: the calls are checked); strict, batched and deferred are refused with a clear line",
            bochs: one(),
            // One CPU: the refused guests come first (a refused guest takes no CPU).
            cmdline: "unsafe-interrupts guest=name=g1,mem=8M,dev=00:01.0,policy=strict guest=name=g2,mem=8M,dev=00:00.0,policy=batched guest=name=g3,mem=8M,dev=00:01.3,policy=deferred guest=name=g0,mem=8M,dev=00:01.1,policy=passthrough".into(),
            modules: &["g0 dma-calls", "g1 hello", "g2 hello", "g3 hello"],
            need: &[
                &["guest g0: RISK: device 00:01.1 assigned with no IOMMU"],
                &["guest g0: DMA: policy Passthrough WITHOUT an IOMMU"],
                &["g0> dma-calls: policy passthrough", "(IOVA is GPA: false)"],
                &["g0> dma-calls: UNMAP of IOVA", ": OK"],
                &["g0> dma-calls: MAP past the guest's memory: Some(Fault); UNMAP of IOVA 0x1000: Some(Range)"],
                &["g0> dma-calls: stats: 1 maps, 1 unmaps, 2 errors"],
                &["g0> PASS dma-calls"],
                &["vm: all guests stopped (1 started of 4 configured)"],
            ],
            then: Some(Box::new(|log| {
                crate::dma::iova_is_host_address(log, "g0", "dma-calls: MAP", "GPA", "returned IOVA")?;
                for (g, policy, bdf) in [("g1", "strict", "00:01.0"), ("g2", "batched", "00:00.0"), ("g3", "deferred", "00:01.3")] {
                    need_line(log, &[&format!("guest {g}: not started: DMA: policy {policy} needs an IOMMU"), &format!("{bdf} is not behind an enabled VT-d unit")])?;
                    forbid_line(log, &[&format!("{g}> ")])?;
                }
                Ok(())
            })),
            ..Spec::default()
        }),
    ]
}

/// The run ended with every guest stopped and the hypervisor alive.
fn guests_done(log: &str) -> Result<(), String> {
    boot_complete(log)?;
    need_line(log, &["vm: Intel VMX", "with EPT and VPID"])?;
    need_line(log, &["vm: all guests stopped"])?;
    forbid_line(log, &["moat: exit Failure"])
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
