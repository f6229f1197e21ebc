//! Moat's QEMU and Bochs scenarios: each is a machine configuration, a kernel command line, the expected
//! way the run ends and a check of what the hypervisor reported on its serial console.
//!
//! The checks look for specific report lines the hypervisor prints from what it really found
//! (ACPI, PCI config space, CPUs that executed their start-up code), so a scenario fails when
//! the hardware effect is missing, not only when the log is silent. `cargo xtask test` runs
//! them all in parallel.
#![forbid(unsafe_code)]

pub mod bochs;
pub mod checks;
pub mod dma;
pub mod guests;
pub mod irq;
pub mod machine;
pub mod nvme;
pub mod vtd;

pub use bochs::BochsMachine;
pub use machine::{Exit, Firmware, Machine};

/// A check of a serial log: `Err` says what is missing.
pub type Check = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Boot modules derived from what the hypervisor discovered: called with the serial log of a
/// first boot of the same machine with [`BASE_CMDLINE`] (no guests), it returns the modules of
/// the real run (e.g. a guest told the address firmware gave an unassigned device's BAR).
pub type Prepare = Box<dyn Fn(&str) -> Result<Vec<BootModule>, String> + Send + Sync>;

/// The machine a set of scenarios runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// The scenario's own machine (SeaBIOS, qemu64, 3-level VT-d, CM off, as written).
    Default,
    /// The second machine of `cargo xtask test --matrix` ([`Machine::matrix`]): OVMF, 4+
    /// CPUs, EPYC, aw-bits=48, caching-mode=on. Names get the suffix `@matrix`.
    Matrix,
}

impl Variant {
    /// The name suffix.
    pub fn suffix(self) -> &'static str {
        match self {
            Variant::Default => "",
            Variant::Matrix => "@matrix",
        }
    }

    /// The machine this variant runs `m` on.
    pub fn machine(self, m: Machine) -> Machine {
        match self {
            Variant::Default => m,
            Variant::Matrix => m.matrix(),
        }
    }

    /// A scenario on this variant's machine (name suffixed, machine moved, more time on the
    /// heavier machine).
    pub fn scenario(
        self,
        name: &str,
        about: &'static str,
        machine: Machine,
        extra_cmdline: &str,
        expect: Exit,
        check: Check,
    ) -> Scenario {
        let cmdline = if extra_cmdline.is_empty() {
            BASE_CMDLINE.to_string()
        } else {
            format!("{BASE_CMDLINE} {extra_cmdline}")
        };
        Scenario {
            name: format!("{name}{}", self.suffix()),
            about,
            machine: self.machine(machine),
            cmdline,
            expect,
            check,
            // More time on the heavier machine.
            timeout_secs: if self == Variant::Matrix { 180 } else { 120 },
            files: vec![],
            disks: vec![],
            modules: vec![],
            prepare: None,
            bochs: None,
        }
    }
}

/// One QEMU scenario.
pub struct Scenario {
    /// Unique name (used for logs: `target/xtask/logs/<name>.log`).
    pub name: String,
    /// One line on what it shows.
    pub about: &'static str,
    /// The machine.
    pub machine: Machine,
    /// The kernel command line (GRUB `multiboot2` line).
    pub cmdline: String,
    /// How the run must end.
    pub expect: Exit,
    /// What the serial log must show.
    pub check: Check,
    /// Wall-clock limit in seconds.
    pub timeout_secs: u64,
    /// Files the scenario needs next to its ISO: (name, bytes). `@FILE:name` in
    /// `machine.extra` is replaced by the file's path.
    pub files: Vec<(&'static str, Vec<u8>)>,
    /// Sparse disk images the scenario needs next to its ISO: (name, bytes), created empty
    /// (reading as zeros); `@FILE:name` in `machine.extra` is replaced by the file's path.
    pub disks: Vec<(&'static str, u64)>,
    /// GRUB boot modules (`module2 /boot/<file> <cmdline>`), in order.
    pub modules: Vec<BootModule>,
    /// When set, the modules come from a first boot instead (see [`Prepare`]).
    pub prepare: Option<Prepare>,
    /// When set, the scenario runs under Bochs on this machine (an Intel CPU with VMX) and
    /// `machine` is not used; see [`bochs`].
    pub bochs: Option<BochsMachine>,
}

/// The test guest's ELF (`guest/test`), built by the harness when a scenario uses it.
pub const TEST_GUEST: &str = "moat-test-guest.elf";

/// A boot module: a file the harness builds and the module's command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootModule {
    /// Which file: [`TEST_GUEST`].
    pub file: &'static str,
    /// Its command line: the guest's name, then the guest's own arguments.
    pub cmdline: String,
}

/// The command line every scenario starts from.
pub const BASE_CMDLINE: &str = "exit=qemu log=info";

/// A scenario declared as data: its name, machine, command line, the test guest's modules and
/// the lines its log must and must not show. What every scenario of a group checks first (the
/// boot ran to the end, every guest stopped) is given once, to [`Spec::on`].
pub struct Spec {
    /// Unique name (the variant's suffix is added).
    pub name: String,
    /// One line on what it shows.
    pub about: &'static str,
    /// The QEMU machine (not used when `bochs` is set).
    pub machine: Machine,
    /// The kernel command line after [`BASE_CMDLINE`].
    pub cmdline: String,
    /// How the run must end.
    pub expect: Exit,
    /// The command lines of the [`TEST_GUEST`] boot modules, in order.
    pub modules: &'static [&'static str],
    /// Lines the log must show (each a line containing every part), checked in order.
    pub need: &'static [&'static [&'static str]],
    /// Lines the log must not show, checked after `need`.
    pub forbid: &'static [&'static [&'static str]],
    /// What else the log must show, checked last.
    pub then: Option<Check>,
    /// Run under Bochs on this machine instead of QEMU.
    pub bochs: Option<BochsMachine>,
    /// The modules come from a first boot instead (see [`Prepare`]).
    pub prepare: Option<Prepare>,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            name: String::new(),
            about: "",
            machine: Machine::default(),
            cmdline: String::new(),
            expect: Exit::Success,
            modules: &[],
            need: &[],
            forbid: &[],
            then: None,
            bochs: None,
            prepare: None,
        }
    }
}

impl Spec {
    /// The scenario on `on`'s machine, its check `first`, then the declared lines.
    pub fn on(self, on: Variant, first: fn(&str) -> Result<(), String>) -> Scenario {
        let (need, forbid, then) = (self.need, self.forbid, self.then);
        let check: Check = Box::new(move |log| {
            first(log)?;
            for parts in need {
                checks::need_line(log, parts)?;
            }
            for parts in forbid {
                checks::forbid_line(log, parts)?;
            }
            then.as_ref().map_or(Ok(()), |then| then(log))
        });
        let mut s = on.scenario(
            &self.name,
            self.about,
            self.machine,
            &self.cmdline,
            self.expect,
            check,
        );
        if let Some(m) = self.bochs {
            // Under Bochs (see [`bochs`]); `machine` is not used.
            s.machine = Machine::default();
            s.bochs = Some(m);
            s.timeout_secs = bochs::BOCHS_TIMEOUT_SECS;
        }
        s.modules = self.modules.iter().map(|c| test_guest(c)).collect();
        s.prepare = self.prepare;
        s
    }
}

/// A [`TEST_GUEST`] boot module with this command line.
pub fn test_guest(cmdline: &str) -> BootModule {
    BootModule {
        file: TEST_GUEST,
        cmdline: cmdline.to_string(),
    }
}

/// The scenario `cargo xtask run` boots: q35 + intel-iommu + edu, everything reported.
pub fn demo(firmware: Firmware, smp: u32) -> Scenario {
    let machine = Machine {
        firmware,
        smp,
        devices: vec!["edu,addr=0x5".into(), "edu,addr=0x6".into()],
        ..Machine::default()
    };
    let mut demo = Variant::Default.scenario(
        "demo",
        "the demo run",
        machine,
        &format!("selftest=vtd {}", guests::DEMO_CMDLINE),
        Exit::Success,
        Box::new(move |log| {
            checks::boot_complete(log)?;
            checks::smp(log, smp as usize)?;
            vtd::demo_check(log)?;
            guests::demo_check(log)
        }),
    );
    demo.modules = guests::demo_modules();
    demo
}

/// Every scenario of `cargo xtask test`.
pub fn all(real_dmar: &[u8]) -> Vec<Scenario> {
    use checks::*;
    let booted = |spec: Spec| spec.on(Variant::Default, boot_complete);
    let mut v = vec![
        booted(Spec {
            name: "boot-bios".into(),
            about: "SeaBIOS + GRUB boot: memory map, W^X paging, RSDT",
            need: &[
                &["ACPI root: RSDT"],
                &["memory map (", "regions):"],
                &["usable"],
            ],
            ..Spec::default()
        }),
        booted(Spec {
            name: "boot-uefi".into(),
            about: "OVMF (UEFI) + GRUB boot: XSDT, memory map",
            machine: Machine {
                firmware: Firmware::Uefi,
                ..Machine::default()
            },
            need: &[&["ACPI root: XSDT"], &["smp: 2 of 2 CPUs online"]],
            ..Spec::default()
        }),
    ];
    for n in [1u32, 2, 4] {
        v.push(booted(Spec {
            name: format!("smp-{n}"),
            about: "every CPU the MADT lists runs its start-up code and reports in",
            machine: Machine {
                smp: n,
                ..Machine::default()
            },
            then: Some(Box::new(move |log| smp(log, n as usize))),
            ..Spec::default()
        }));
    }
    let mut bad = booted(Spec {
        name: "dmar-malformed".into(),
        about: "a DMAR whose DRHD length runs past the table is rejected; boot goes on without remapping",
        machine: Machine {
            iommu: None,
            extra: vec!["-acpitable".into(), "file=@FILE:bad-dmar.bin".into()],
            ..Machine::default()
        },
        need: &[&["dmar: malformed DMAR table rejected", "going on WITHOUT DMA remapping"]],
        ..Spec::default()
    });
    bad.files
        .push(("bad-dmar.bin", corrupt_dmar_length(real_dmar)));
    v.extend([
        booted(Spec {
            name: "smp-limit".into(),
            about: "smp=2 on a 4-CPU machine brings up exactly 2",
            machine: Machine {
                smp: 4,
                ..Machine::default()
            },
            cmdline: "smp=2".into(),
            need: &[&["smp: 2 of 2 CPUs online (4 listed by ACPI)"]],
            forbid: &[&["cpu2 online"]],
            ..Spec::default()
        }),
        booted(Spec {
            name: "dmar-discovery".into(),
            about: "the DMAR names the DRHD at 0xfed90000 and the unit covers the edu device",
            need: &[
                &["dmar: DRHD unit 0 base=0xfed90000 segment=0"],
                &["dmar: host address width 39 bits"],
                &["dmar: 00:05.0 -> DRHD unit 0 (0xfed90000)"],
            ],
            ..Spec::default()
        }),
        booted(Spec {
            name: "dmar-aw48".into(),
            about: "aw-bits=48: the DMAR reports a 48-bit host address width",
            machine: Machine {
                iommu: Some("intel-iommu,intremap=on,eim=off,aw-bits=48,caching-mode=on".into()),
                ..Machine::default()
            },
            need: &[&["dmar: host address width 48 bits"], &["dmar: DRHD unit 0 base=0xfed90000"]],
            ..Spec::default()
        }),
        booted(Spec {
            name: "pci-edu".into(),
            about: "ECAM enumeration finds the edu device at its real BDF with its 1 MiB BAR",
            machine: Machine {
                devices: vec!["edu,addr=0x7".into()],
                ..Machine::default()
            },
            need: &[
                &["pci: 00:07.0 1234:11e8 class 00ff00"],
                &["pci:   00:07.0 BAR0 mem32", "size 0x100000"],
                &["pci: 00:00.0 8086:29c0"],
            ],
            forbid: &[&["pci: 00:05.0 1234:11e8"]],
            ..Spec::default()
        }),
        booted(Spec {
            name: "no-iommu".into(),
            about: "without VT-d there is no DMAR: said clearly, boot goes on",
            machine: Machine {
                iommu: None,
                ..Machine::default()
            },
            need: &[&["dmar: no DMAR table", "going on without remapping"]],
            ..Spec::default()
        }),
        bad,
        booted(Spec {
            name: "cmdline-bad".into(),
            about: "unknown options and bad values are reported with the valid ones; boot goes on with defaults",
            cmdline: "frobnicate=1 log=loud smp=0".into(),
            need: &[
                &["unknown option `frobnicate` ignored; valid options:", "log", "smp", "iommu"],
                &["bad value `loud` for log", "off", "trace"],
                &["bad value `0` for smp"],
                &["config: log=info"],
            ],
            ..Spec::default()
        }),
    ]);
    for (name, arg, vector, extra) in [
        (
            "exception-ud",
            "selftest=ud",
            "#UD invalid opcode (vector 6)",
            "rip=",
        ),
        (
            "exception-pf",
            "selftest=pf",
            "#PF page fault (vector 14)",
            "cr2=0x0000000000000010",
        ),
        (
            "exception-gp",
            "selftest=gp",
            "#GP general protection (vector 13)",
            "rip=",
        ),
        (
            "exception-de",
            "selftest=de",
            "#DE divide error (vector 0)",
            "rip=",
        ),
    ] {
        v.push(Variant::Default.scenario(
            name,
            "a CPU exception in the hypervisor prints a register dump and fails the run",
            Machine::default(),
            arg,
            Exit::Exception,
            Box::new(move |log| {
                need_line(log, &["moat: FATAL exception", vector])?;
                need_line(log, &[extra])?;
                need_line(log, &["rax=", "rbx="])?;
                forbid_line(log, &["moat: boot complete"])
            }),
        ));
    }
    v.extend(guests::all(Variant::Default));
    v.extend(vtd::scenarios(Variant::Default));
    v.extend(dma::scenarios(Variant::Default));
    v.extend(nvme::scenarios(Variant::Default));
    v.extend(irq::scenarios(Variant::Default));
    v.extend(bochs::scenarios());
    // The runs that must end without "boot complete".
    let unfinished = |spec: Spec| {
        spec.on(Variant::Default, |log| {
            forbid_line(log, &["moat: boot complete"])
        })
    };
    v.extend([
        unfinished(Spec {
            name: "panic".into(),
            about: "a panic prints where and why and fails the run",
            cmdline: "selftest=panic".into(),
            expect: Exit::Panic,
            need: &[&["moat: PANIC on cpu0: panicked at", "platform.rs"], &["selftest: deliberate panic"]],
            ..Spec::default()
        }),
        unfinished(Spec {
            name: "overflow-checks".into(),
            about: "the test kernel is built with overflow checks: an arithmetic overflow panics, it does not wrap",
            cmdline: "selftest=overflow".into(),
            expect: Exit::Panic,
            need: &[&["moat: PANIC on cpu0: panicked at", "platform.rs"], &["attempt to add with overflow"]],
            forbid: &[&["overflow wrapped"]],
            ..Spec::default()
        }),
        unfinished(Spec {
            name: "wx-every-page".into(),
            about: "the W^X self-check looks at every page: one writable page in the middle of the text fails the run",
            cmdline: "selftest=wx".into(),
            expect: Exit::Failure,
            need: &[&["paging: W^X enforced on every page (text"]],
            forbid: &[&["W^X self-check missed"]],
            then: Some(Box::new(|log| {
                let page = log
                    .lines()
                    .find_map(|l| l.split("selftest: text page ").nth(1))
                    .and_then(|r| r.split(' ').next())
                    .ok_or("no `selftest: text page` line")?;
                need_line(log, &[&format!("paging: W^X self-check failed: text page {page} has flags")])
            })),
            ..Spec::default()
        }),
    ]);
    v
}

/// The scenarios of `cargo xtask test --matrix` beyond [`all`]: the guest, VT-d, DMA, interrupt
/// and NVMe scenarios again on the second machine ([`Variant::Matrix`]).
pub fn matrix() -> Vec<Scenario> {
    let mut v = guests::all(Variant::Matrix);
    v.extend(vtd::scenarios(Variant::Matrix));
    v.extend(dma::scenarios(Variant::Matrix));
    v.extend(nvme::scenarios(Variant::Matrix));
    v.extend(irq::scenarios(Variant::Matrix));
    v
}

/// The real DMAR table with its first structure's length pointing past the end of the table
/// (the header checksum is fixed up so only the structure is wrong).
pub fn corrupt_dmar_length(real: &[u8]) -> Vec<u8> {
    let mut t = real.to_vec();
    if t.len() >= 52 {
        let len = t.len() as u16;
        // first remapping structure at 48: type(2) length(2)
        t[50..52].copy_from_slice(&(len).to_le_bytes());
        t[9] = 0;
        let sum = t.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        t[9] = 0u8.wrapping_sub(sum);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique() {
        let mut all = all(&[0u8; 80]);
        all.extend(matrix());
        let mut names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
        names.sort();
        let n = names.len();
        names.dedup();
        assert_eq!(n, names.len());
    }

    #[test]
    fn matrix_reruns_guest_vtd_and_dma_scenarios_on_the_second_machine() {
        let m = matrix();
        assert!(m.len() >= 20);
        for s in &m {
            assert!(s.name.ends_with("@matrix"), "{}", s.name);
            assert!(
                ["guest-", "vtd-", "dma-", "nvme-", "irq-", "msi-"]
                    .iter()
                    .any(|p| s.name.starts_with(p)),
                "{}",
                s.name
            );
            assert_eq!(s.machine.firmware, Firmware::Uefi, "{}", s.name);
            assert!(s.machine.smp >= machine::MATRIX_SMP, "{}", s.name);
            assert_eq!(s.machine.cpu, machine::MATRIX_CPU, "{}", s.name);
            if let Some(i) = s.machine.iommu.as_deref() {
                if i.contains("intremap=off") {
                    assert_eq!(i, "intel-iommu,intremap=off,aw-bits=48,caching-mode=on");
                } else {
                    assert_eq!(i, machine::MATRIX_IOMMU);
                }
            }
        }
        let base: Vec<String> = all(&[0u8; 80])
            .into_iter()
            .filter(|s| {
                ["guest-", "dma-", "nvme-", "irq-", "msi-"]
                    .iter()
                    .any(|p| s.name.starts_with(p))
            })
            .map(|s| format!("{}@matrix", s.name))
            .collect();
        for n in base {
            assert!(m.iter().any(|s| s.name == n), "{n} missing from the matrix");
        }
    }

    #[test]
    fn corrupted_dmar_keeps_a_valid_checksum_and_a_bad_length() {
        let mut real = vec![0u8; 80];
        real[..4].copy_from_slice(b"DMAR");
        real[4..8].copy_from_slice(&80u32.to_le_bytes());
        real[50..52].copy_from_slice(&24u16.to_le_bytes());
        let bad = corrupt_dmar_length(&real);
        assert_eq!(bad.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(u16::from_le_bytes([bad[50], bad[51]]), 80);
    }
}
