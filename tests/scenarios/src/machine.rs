//! A QEMU machine configuration and its command line.

/// Firmware QEMU boots the ISO with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS (QEMU's default).
    Bios,
    /// OVMF (UEFI), from the `ovmf` package.
    Uefi,
}

/// How a run ended, from QEMU's exit status (`isa-debug-exit`: `(code << 1) | 1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The hypervisor reported success (code 0x10, status 33).
    Success,
    /// A check inside the hypervisor failed (0x11, status 35).
    Failure,
    /// The hypervisor panicked (0x12, status 37).
    Panic,
    /// A CPU exception in the hypervisor (0x13, status 39).
    Exception,
    /// Any other status: QEMU ended without the hypervisor saying how (triple fault with
    /// `-no-reboot`, QEMU error, killed by a signal).
    Other(Option<i32>),
    /// The run exceeded its time limit and was killed.
    Timeout,
    /// The emulator reset the machine (a triple fault) before the hypervisor said how the run
    /// ended (Bochs, which has no `-no-reboot`).
    Reset,
}

impl Exit {
    /// Decodes QEMU's process exit status.
    pub fn from_status(code: Option<i32>) -> Exit {
        match code {
            Some(33) => Exit::Success,
            Some(35) => Exit::Failure,
            Some(37) => Exit::Panic,
            Some(39) => Exit::Exception,
            other => Exit::Other(other),
        }
    }

    /// The result the hypervisor printed as its final line, `moat: exit <Name> (code 0x..)`
    /// (for emulators without `isa-debug-exit`, e.g. Bochs), decoded by the code; `None`
    /// while there is no such line yet.
    pub fn from_serial(serial: &str) -> Option<Exit> {
        serial.lines().find_map(|l| {
            let rest = l.trim().strip_prefix("moat: exit ")?;
            let code = rest.split("(code ").nth(1)?.strip_suffix(')')?;
            let code = u32::from_str_radix(code.trim().strip_prefix("0x")?, 16).ok()?;
            Some(Exit::from_status(Some(((code << 1) | 1) as i32)))
        })
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Success => f.write_str("success (status 33)"),
            Exit::Failure => f.write_str("failure reported by the hypervisor (status 35)"),
            Exit::Panic => f.write_str("hypervisor panic (status 37)"),
            Exit::Exception => f.write_str("hypervisor exception (status 39)"),
            Exit::Other(Some(c)) => write!(
                f,
                "QEMU exited with status {c} without a result from the hypervisor (triple fault or QEMU error)"
            ),
            Exit::Other(None) => f.write_str("QEMU was killed by a signal"),
            Exit::Timeout => f.write_str("timed out"),
            Exit::Reset => f.write_str(
                "the emulator reset the machine (triple fault) without a result from the hypervisor",
            ),
        }
    }
}

/// A QEMU q35 machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// Firmware.
    pub firmware: Firmware,
    /// CPUs.
    pub smp: u32,
    /// RAM in MiB.
    pub memory_mib: u32,
    /// The IOMMU device (`-device` argument), e.g. `intel-iommu,intremap=on,eim=off`; put before the
    /// devices it translates.
    pub iommu: Option<String>,
    /// Further `-device` arguments (e.g. `edu,addr=0x6`).
    pub devices: Vec<String>,
    /// Extra raw QEMU arguments.
    pub extra: Vec<String>,
    /// The `-cpu` model; it must offer SVM with nested paging.
    pub cpu: &'static str,
}

/// The default CPU model: QEMU's generic x86-64 with SVM and nested paging.
pub const DEFAULT_CPU: &str = "qemu64,+svm,+npt";
/// The second machine's CPU model (`cargo xtask test --matrix`): an AMD EPYC with SVM.
pub const MATRIX_CPU: &str = "EPYC,+svm,+npt";
/// The second machine's IOMMU: 4-level tables and caching mode.
pub const MATRIX_IOMMU: &str = "intel-iommu,intremap=on,eim=off,aw-bits=48,caching-mode=on";
/// The second machine's CPU count.
pub const MATRIX_SMP: u32 = 4;

impl Default for Machine {
    fn default() -> Self {
        Machine {
            firmware: Firmware::Bios,
            smp: 2,
            memory_mib: 256,
            iommu: Some("intel-iommu,intremap=on,eim=off".into()),
            devices: vec!["edu,addr=0x5".into()],
            extra: vec![],
            cpu: DEFAULT_CPU,
        }
    }
}

impl Machine {
    /// The same machine moved to the second configuration of `cargo xtask test --matrix`:
    /// OVMF, at least [`MATRIX_SMP`] CPUs, an EPYC CPU model, and (if the machine has an
    /// IOMMU) intel-iommu with `aw-bits=48,caching-mode=on` (interrupt remapping as the
    /// machine has it). Devices stay where they are.
    pub fn matrix(&self) -> Machine {
        Machine {
            firmware: Firmware::Uefi,
            smp: self.smp.max(MATRIX_SMP),
            // A machine whose unit has no interrupt remapping keeps it so.
            iommu: self.iommu.as_ref().map(|i| {
                if i.contains("intremap=off") {
                    MATRIX_IOMMU.replace("intremap=on,eim=off", "intremap=off")
                } else {
                    MATRIX_IOMMU.to_string()
                }
            }),
            cpu: MATRIX_CPU,
            ..self.clone()
        }
    }

    /// QEMU arguments to boot `iso` with `ovmf` as the UEFI firmware image. Serial goes to
    /// stdout; `isa-debug-exit` reports the result; `-no-reboot` turns a triple fault into an
    /// exit.
    pub fn qemu_args(&self, iso: &str, ovmf: &str) -> Vec<String> {
        let mut a: Vec<String> = [
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-no-reboot",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push("-cpu".into());
        a.push(self.cpu.into());
        a.push("-smp".into());
        a.push(self.smp.to_string());
        a.push("-m".into());
        a.push(format!("{}M", self.memory_mib));
        if self.firmware == Firmware::Uefi {
            a.push("-drive".into());
            a.push(format!("if=pflash,format=raw,readonly=on,file={ovmf}"));
        }
        if let Some(iommu) = &self.iommu {
            a.push("-device".into());
            a.push(iommu.clone());
        }
        for d in &self.devices {
            a.push("-device".into());
            a.push(d.clone());
        }
        a.extend(self.extra.iter().cloned());
        a.push("-cdrom".into());
        a.push(iso.into());
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_decoding() {
        assert_eq!(Exit::from_status(Some(33)), Exit::Success);
        assert_eq!(Exit::from_status(Some(39)), Exit::Exception);
        assert_eq!(Exit::from_status(Some(0)), Exit::Other(Some(0)));
        assert_eq!(Exit::from_status(None), Exit::Other(None));
    }

    #[test]
    fn exit_from_the_final_serial_line() {
        let cases = [
            ("boot\nmoat: halted\n", None),
            (
                "x\nmoat: exit Success (code 0x10)\nmoat: halted\n",
                Some(Exit::Success),
            ),
            ("moat: exit Panic (code 0x12)\r\n", Some(Exit::Panic)),
            ("moat: exit Exception (code 0x13)", Some(Exit::Exception)),
            ("moat: exit Failure (code 0x11)", Some(Exit::Failure)),
            // A guest echoing something like it mid-line does not count.
            ("g0> moat: exit Success (code 0x10)", None),
            ("moat: exit Success (code 0x1", None),
        ];
        for (serial, want) in cases {
            assert_eq!(Exit::from_serial(serial), want, "{serial:?}");
        }
    }

    #[test]
    fn iommu_comes_before_devices_and_uefi_adds_pflash() {
        let m = Machine {
            firmware: Firmware::Uefi,
            ..Machine::default()
        };
        let a = m.qemu_args("x.iso", "/ovmf.fd");
        let iommu = a.iter().position(|s| s.starts_with("intel-iommu")).unwrap();
        let edu = a.iter().position(|s| s.starts_with("edu")).unwrap();
        assert!(iommu < edu);
        assert!(a
            .iter()
            .any(|s| s == "if=pflash,format=raw,readonly=on,file=/ovmf.fd"));
        assert_eq!(a.last().unwrap(), "x.iso");
    }

    #[test]
    fn matrix_machine_changes_firmware_cpus_iommu_and_cpu_model() {
        let m = Machine {
            devices: vec!["edu,addr=0x6".into()],
            ..Machine::default()
        }
        .matrix();
        assert_eq!(m.firmware, Firmware::Uefi);
        assert_eq!(m.smp, MATRIX_SMP);
        assert_eq!(m.iommu.as_deref(), Some(MATRIX_IOMMU));
        assert_eq!(m.devices, vec!["edu,addr=0x6".to_string()]);
        let a = m.qemu_args("x.iso", "/ovmf.fd");
        let cpu = a.iter().position(|s| s == "-cpu").unwrap();
        assert_eq!(a[cpu + 1], MATRIX_CPU);
        let none = Machine {
            iommu: None,
            ..Machine::default()
        };
        assert_eq!(none.matrix().iommu, None);
    }
}
