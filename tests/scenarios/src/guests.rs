//! Guest scenarios: the test guest (`guest/test`, [`TEST_GUEST`]) booted as one or more Moat
//! guests from GRUB modules. Each check looks at values the guest or the hypervisor really
//! observed (device registers, the faulting guest-physical address, hypercall status codes,
//! which CPU printed), not only that something printed.

use crate::checks::{boot_complete, forbid_line, need_line};
use crate::{test_guest, BootModule, Firmware, Machine, Scenario, Spec, Variant};

/// The guests of `cargo xtask run`: one guest with the edu device at 00:05.0.
pub const DEMO_CMDLINE: &str = "guest=name=g0,mem=8M,dev=00:05.0,policy=batched";

/// The demo's boot modules.
pub fn demo_modules() -> Vec<BootModule> {
    vec![test_guest(
        "g0 hello probe-pci edu-bar dma-demo vmmcall-bench=2000",
    )]
}

/// What the demo's guest must show.
pub fn demo_check(log: &str) -> Result<(), String> {
    need_line(log, &["g0> edu-bar: id register 0x010000ed"])?;
    need_line(
        log,
        &["g0> dma-demo: policy batched: mapped 4 buffers with 1 MULTICALL(s)"],
    )?;
    need_line(
        log,
        &[
            "g0> dma-demo: edu DMA source",
            "every destination holds the source's bytes",
        ],
    )?;
    need_line(log, &["g0> dma-demo: unmapped the 4 buffers with 1 MULTICALL(s): 1 IOTLB invalidation(s), 1 wait(s)", "live mappings now 0"])?;
    need_line(log, &["g0> dma-demo: batched", "<- this guest: measured 1"])?;
    need_line(log, &["g0> PASS dma-demo"])?;
    need_line(log, &["g0> moat-test-guest: 5 passed, 0 failed"])?;
    need_line(log, &["guest g0 vcpu0: exited with code 0"])
}

/// Index of the first line containing every part.
fn line_of(log: &str, parts: &[&str]) -> Result<usize, String> {
    log.lines()
        .position(|l| parts.iter().all(|p| l.contains(p)))
        .ok_or_else(|| format!("no line containing all of {parts:?}"))
}

/// Index of the last line containing every part.
fn last_line_of(log: &str, parts: &[&str]) -> Result<usize, String> {
    log.lines()
        .enumerate()
        .filter(|(_, l)| parts.iter().all(|p| l.contains(p)))
        .map(|(i, _)| i)
        .last()
        .ok_or_else(|| format!("no line containing all of {parts:?}"))
}

/// The run ended with every guest stopped and the hypervisor alive.
fn guests_done(log: &str) -> Result<(), String> {
    boot_complete(log)?;
    need_line(log, &["vm: all guests stopped"])?;
    forbid_line(log, &["moat: exit Failure"])
}

/// Both guests printed ticks, each from its own CPU, and their output interleaves.
pub fn side_by_side(log: &str) -> Result<(), String> {
    let g0 = (
        line_of(log, &["cpu0 vm::guest: g0> tick"])?,
        last_line_of(log, &["cpu0 vm::guest: g0> tick"])?,
    );
    let g1 = (
        line_of(log, &["cpu1 vm::guest: g1> tick"])?,
        last_line_of(log, &["cpu1 vm::guest: g1> tick"])?,
    );
    if g1.0 > g0.1 || g0.0 > g1.1 {
        return Err(format!(
            "the guests did not run side by side: g0 ticks on lines {g0:?}, g1 ticks on lines {g1:?}"
        ));
    }
    Ok(())
}

/// The guest announced `escape: <verb> GPA x`, the hypervisor reported a nested page fault at
/// exactly `expect_gpa` for that access, and the other guest finished after it.
fn escape_check(log: &str, verb: &str, kind: &str, expect_gpa: u64) -> Result<(), String> {
    guests_done(log)?;
    let announced = format!("g0> escape: {verb} GPA {expect_gpa:#x}");
    need_line(log, &[&announced])?;
    let fault =
        format!("guest g0 vcpu0: nested page fault at GPA {expect_gpa:#x} ({kind}, not mapped)");
    let at = line_of(log, &[&fault, "guest stopped"])?;
    forbid_line(log, &["g0> escape: read 0x"])?;
    forbid_line(log, &["g0> FAIL escape"])?;
    went_on_after(log, at)
}

/// The other guest (g1, on cpu1) finished after line `at`, where g0 was stopped.
fn went_on_after(log: &str, at: usize) -> Result<(), String> {
    let other = line_of(log, &["cpu1 vm::guest: g1> PASS spin"])?;
    if other < at {
        return Err("g1 finished before g0 faulted: nothing shows it went on".into());
    }
    need_line(log, &["guest g1 vcpu0: exited with code 0"])
}

/// The number written as `0x...` (or decimal) right after `key` in `line`.
pub fn number_after(line: &str, key: &str) -> Option<u64> {
    let i = line.find(key)? + key.len();
    let rest = line[i..].trim_start();
    let word: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    match word.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => word.parse().ok(),
    }
}

/// The first line containing every part.
pub fn find_line<'a>(log: &'a str, parts: &[&str]) -> Result<&'a str, String> {
    log.lines()
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .ok_or_else(|| format!("no line containing all of {parts:?}"))
}

/// The address the hypervisor's PCI enumeration reported for `bdf`'s BAR `bar` (its own
/// discovery line `pci:   BB:DD.F BARn mem32 0x... size 0x...`).
pub fn discovered_bar(log: &str, bdf: &str, bar: u8) -> Result<u64, String> {
    let key = format!("pci:   {bdf} BAR{bar} mem");
    let line = find_line(log, &[&key])?;
    let after = &line[line.find(&key).unwrap_or(0) + key.len()..];
    // "32 0xfea00000 size ..." or "32 pref 0x... size ..."
    after
        .split_whitespace()
        .find_map(|w| w.strip_prefix("0x"))
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or_else(|| format!("no address in {line:?}"))
}

/// The assigned edu's PCI command register as the guest saw it: it wrote the old value with
/// memory decode and bus mastering set and must read exactly that back (whatever firmware
/// left in it), and the BAR it sized is where the hypervisor mapped it.
fn guest_edu_check(log: &str) -> Result<(), String> {
    let line = find_line(log, &["g0> pci: 00:05.0 command"])?;
    let before = number_after(line, "command").ok_or(format!("no old value in {line:?}"))?;
    let after = number_after(line, "->").ok_or(format!("no new value in {line:?}"))?;
    if after != before | 0x6 {
        return Err(format!(
            "command register: wrote {:#06x}, read {after:#06x}: {line:?}",
            before | 0x6
        ));
    }
    let mapped = find_line(
        log,
        &[
            "guest g0: 00:05.0 BAR0 [",
            "mapped at the same guest-physical address",
        ],
    )?;
    let hv = number_after(mapped, "BAR0 [").ok_or("no BAR address in the mapping line")?;
    let seen = find_line(log, &["g0> pci: 00:05.0 BAR0"])?;
    let guest = number_after(seen, "BAR0").ok_or("no BAR address in the guest's line")?;
    if hv != guest || hv != discovered_bar(log, "00:05.0", 0)? {
        return Err(format!(
            "BAR0: the hypervisor mapped {hv:#x}, the guest saw {guest:#x}"
        ));
    }
    Ok(())
}

/// The machine with two edu devices, at 00:05.0 and 00:06.0.
pub(crate) fn two_edus() -> Machine {
    Machine {
        devices: vec!["edu,addr=0x5".into(), "edu,addr=0x6".into()],
        ..Machine::default()
    }
}

/// A machine booted by OVMF.
fn uefi() -> Machine {
    Machine {
        firmware: Firmware::Uefi,
        ..Machine::default()
    }
}

/// One guest with 8 MiB, two guests with 8 MiB each.
const ONE: &str = "guest=name=g0,mem=8M";
const TWO: &str = "guest=name=g0,mem=8M guest=name=g1,mem=8M";

/// Every guest scenario on `on`'s machine: each checks first that every guest stopped with
/// the hypervisor alive.
pub fn all(on: Variant) -> Vec<Scenario> {
    // g0 takes every CPU of the machine, so g1 finds none left.
    let cpus = on.machine(Machine::default()).smp;
    vec![
        Spec {
            name: "guest-hello".into(),
            about: "a guest boots in 64-bit mode, finds Moat in CPUID and prints through the console hypercall",
            cmdline: ONE.into(),
            modules: &["g0 hello"],
            need: &[
                &["vm: AMD SVM", "nested paging"],
                &["cpu0 vm::guest: g0> moat-test-guest on g0 vcpu 0 of 1: 8 MiB, command line `hello`"],
                &["g0> hello: cpuid 0x40000000 signature `MoatMoatMoat` max leaf 0x40000001", "hypervisor bit true"],
                &["g0> hello: VERSION hypercall returned status 0 value 2"],
                &["g0> PASS hello"],
                &["guest g0 vcpu0: exited with code 0"],
            ],
            ..Spec::default()
        },
        Spec {
            name: "guest-two-smp2".into(),
            about: "two guests on -smp 2 run side by side, one per CPU",
            cmdline: TWO.into(),
            modules: &["g0 spin=12", "g1 spin=12"],
            need: &[
                &["g0> PASS spin"],
                &["g1> PASS spin"],
                &["guest g0 vcpu0: exited with code 0"],
                &["guest g1 vcpu0: exited with code 0"],
            ],
            then: Some(Box::new(side_by_side)),
            ..Spec::default()
        },
        escape("read", "reading", &["g0 escape-read", "g1 spin=25"]),
        escape("write", "writing", &["g0 escape-write", "g1 spin=25"]),
        Spec {
            name: "guest-edu".into(),
            about: "an assigned edu device works through its mapped BAR; an unassigned one and the host bridge are invisible",
            machine: two_edus(),
            cmdline: "guest=name=g0,mem=8M,dev=00:05.0".into(),
            modules: &["g0 probe-pci edu-bar"],
            need: &[
                &["guest g0: 00:05.0 BAR0", "mapped at the same guest-physical address"],
                &["g0> pci: 00:05.0 1234:11e8"],
                &["g0> probe-pci: 1 function(s) visible"],
                &["g0> pci: 00:05.0 BAR0", "size 0x100000"],
                // The one capability the guest sees: edu's MSI (64-bit, next pointer 0, off).
                &["g0> pci: 00:05.0 capability pointer 0x40, dword 0x40 0x800005"],
                &["g0> PASS probe-pci"],
                &["g0> edu-bar: id register 0x010000ed"],
                &["g0> edu-bar: liveness wrote 0x12345678 read 0xedcba987"],
                &["g0> edu-bar: factorial of 10 = 3628800"],
                &["g0> PASS edu-bar"],
                &["guest g0 vcpu0: exited with code 0"],
            ],
            forbid: &[&["g0> pci: 00:06.0"], &["g0> pci: 00:00.0"]],
            then: Some(Box::new(guest_edu_check)),
            ..Spec::default()
        },
        Spec {
            name: "guest-unassigned-bar".into(),
            about: "the BAR of a device not assigned to the guest is not mapped: touching it stops the guest",
            machine: two_edus(),
            cmdline: "guest=name=g0,mem=8M,dev=00:05.0".into(),
            need: &[&["g0> PASS edu-bar"]],
            forbid: &[&["g0> escape: read 0x"]],
            // Wherever firmware put the unassigned edu's BAR0 (the hypervisor reports it), the
            // guest touched exactly that address and was stopped for it.
            then: Some(Box::new(|log| {
                let bar = discovered_bar(log, "00:06.0", 0)?;
                need_line(log, &[&format!("g0> escape: reading GPA {bar:#x}")])?;
                let fault = format!("guest g0 vcpu0: nested page fault at GPA {bar:#x} (read, not mapped)");
                need_line(log, &[&fault, "guest stopped"])
            })),
            // The guest is told the address the hypervisor discovers on this machine.
            prepare: Some(Box::new(|log| {
                let bar = discovered_bar(log, "00:06.0", 0)?;
                Ok(vec![test_guest(&format!("g0 edu-bar escape-read={bar:#x}"))])
            })),
            ..Spec::default()
        },
        Spec {
            name: "guest-msr-gp".into(),
            about: "RDMSR EFER is answered without SVME; other MSR accesses get #GP injected into the guest",
            cmdline: ONE.into(),
            modules: &["g0 msr"],
            need: &[
                &["g0> msr: EFER 0xd00; #GP after RDMSR EFER 0, after RDMSR 0xc0010117 1, after WRMSR EFER 2"],
                &["g0> PASS msr"],
                &["guest g0 vcpu0: exited with code 0"],
            ],
            ..Spec::default()
        },
        Spec {
            name: "guest-hello-uefi".into(),
            about: "under OVMF (UEFI memory map) a guest boots and prints",
            machine: uefi(),
            cmdline: ONE.into(),
            modules: &["g0 hello"],
            need: &[&["g0> PASS hello"], &["guest g0 vcpu0: exited with code 0"]],
            ..Spec::default()
        },
        Spec {
            name: "guest-fbcon-uefi".into(),
            about: "under OVMF GRUB hands over a GOP framebuffer: the hypervisor draws its warnings, errors and result line there, and the result line decodes back from video memory",
            machine: uefi(),
            cmdline: ONE.into(),
            modules: &["g0 hello"],
            need: &[
                &["fbcon: ", "framebuffer at", "characters): warnings, errors and the result are shown there"],
                &["fbcon: result line read back from the framebuffer: `moat: exit Success (code 0x10)`"],
            ],
            ..Spec::default()
        },
        Spec {
            name: "guest-bad-hypercall".into(),
            about: "an unknown hypercall returns UNSUPP (-9) (a flood of them is logged rate-limited) and a console write from outside memory FAULT (-8)",
            cmdline: ONE.into(),
            modules: &["g0 bad-hypercall"],
            need: &[
                &["guest g0 vcpu0: unknown hypercall 0x7fffdead: returned UNSUPP (-9)"],
                &["g0> bad-hypercall: 1000 more unknown calls, 1000 returned UNSUPP"],
                // 1001 unknown calls: 8 lines, then one per power of two (16 .. 512) with the
                // count of the lines left out.
                &["unknown hypercall", "#512, 255 not logged since the previous line"],
                &["g0> bad-hypercall: call 0x7fffdead returned status -9 value 0"],
                &["g0> bad-hypercall: console write from GPA 0xfffff0000000 returned status -8"],
                &["g0> PASS bad-hypercall"],
                &["guest g0 vcpu0: exited with code 0"],
            ],
            then: Some(Box::new(|log| {
                let lines = log.lines().filter(|l| l.contains("unknown hypercall 0x")).count();
                if lines > 8 + 6 {
                    return Err(format!("{lines} WARN lines for 1001 unknown hypercalls: not rate-limited"));
                }
                Ok(())
            })),
            ..Spec::default()
        },
        Spec {
            name: "guest-triple-fault".into(),
            about: "a guest that triple-faults is stopped; the other guest goes on",
            cmdline: TWO.into(),
            modules: &["g0 triple-fault", "g1 spin=25"],
            need: &[&["g0> triple-fault: ud2 with no IDT"], &["guest g1 vcpu0: exited with code 0"]],
            forbid: &[&["g0> FAIL triple-fault"]],
            then: Some(Box::new(|log| {
                let at = line_of(log, &["guest g0 vcpu0: triple fault (shutdown)", "guest stopped"])?;
                went_on_after(log, at)
            })),
            ..Spec::default()
        },
        Spec {
            name: "guest-config".into(),
            about: "a guest with every CPU gets them all; a guest with no CPU left or no module is refused with a clear line",
            cmdline: format!("guest=name=g0,mem=8M,cpus={cpus} guest=name=g1,mem=8M guest=name=g2,mem=8M"),
            modules: &["g0 hello", "g1 hello"],
            need: &[
                &["g0> PASS hello"],
                &["guest g2: no boot module", "not started"],
                &["vm: all guests stopped (1 started of 3 configured)"],
            ],
            then: Some(Box::new(move |log| {
                for k in 1..cpus {
                    need_line(log, &[&format!("cpu{k} vm::guest: g0> vcpu {k} of {cpus} up")])?;
                    need_line(log, &[&format!("guest g0 vcpu{k}: exited with code 0")])?;
                }
                need_line(log, &[&format!("guest g1: needs 1 CPU(s), 0 of {cpus} left"), "not started"])
            })),
            ..Spec::default()
        },
        Spec {
            name: "guest-refused".into(),
            about: "a guest with too little memory or a device that does not exist is refused with a clear line and takes no CPU",
            cmdline: "guest=name=g0,mem=1M guest=name=g1,mem=8M,dev=00:09.0 guest=name=g2,mem=8M".into(),
            modules: &["g0 hello", "g1 hello", "g2 hello"],
            need: &[
                &["guest g0: not started: memory too small"],
                &["guest g1: not started: device 00:09.0: no such PCI function"],
                // Neither refused guest kept a CPU: g2 still gets cpu0.
                &["cpu0 vm::guest: g2> PASS hello"],
                &["vm: all guests stopped (1 started of 3 configured)"],
            ],
            ..Spec::default()
        },
        Spec {
            name: "guest-smp-fault".into(),
            about: "when one vCPU of a 2-vCPU guest faults, the guest's other vCPU is stopped too",
            cmdline: "guest=name=g0,mem=8M,cpus=2".into(),
            modules: &["g0 vcpu-spin spin=3 escape-read"],
            need: &[
                &["cpu1 vm::guest: g0> vcpu 1 of 2 up"],
                &["guest g0: all 2 vCPU(s) stopped (nested page fault at GPA 0x800000"],
            ],
            then: Some(Box::new(|log| {
                let fault = line_of(log, &["cpu0 vm::guest: guest g0 vcpu0: nested page fault at GPA 0x800000 (read, not mapped)", "guest stopped"])?;
                let stopped = line_of(log, &["cpu1 vm::guest: guest g0 vcpu1: stopped with its guest"])?;
                if stopped < fault {
                    return Err("vcpu1 stopped before vcpu0 faulted".into());
                }
                Ok(())
            })),
            ..Spec::default()
        },
        Spec {
            name: "guest-vmmcall-bench".into(),
            about: "VMMCALL round trip measured in the guest (QEMU TCG)",
            cmdline: ONE.into(),
            modules: &["g0 vmmcall-bench=20000"],
            need: &[
                &["g0> vmmcall-bench: 20000 round trips:", "cycles/call", "ns/call (QEMU TCG"],
                &["g0> PASS vmmcall-bench"],
            ],
            ..Spec::default()
        },
    ]
    .into_iter()
    .map(|spec| spec.on(on, guests_done))
    .collect()
}

/// `guest-escape-{kind}`: g0 `verb` outside its partition is stopped; g1 goes on.
fn escape(kind: &'static str, verb: &'static str, modules: &'static [&'static str]) -> Spec {
    Spec {
        name: format!("guest-escape-{kind}"),
        about: "a guest touching memory outside its partition takes a nested page fault and is stopped; the other guest goes on",
        cmdline: TWO.into(),
        modules,
        then: Some(Box::new(move |log| escape_check(log, verb, kind, 8 << 20))),
        ..Spec::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_by_side_needs_interleaving_from_two_cpus() {
        let ok = "\
x cpu0 vm::guest: g0> tick 0
x cpu1 vm::guest: g1> tick 0
x cpu0 vm::guest: g0> tick 1
x cpu1 vm::guest: g1> tick 1
";
        assert!(side_by_side(ok).is_ok());
        let serial = "\
x cpu0 vm::guest: g0> tick 0
x cpu0 vm::guest: g0> tick 1
x cpu1 vm::guest: g1> tick 0
x cpu1 vm::guest: g1> tick 1
";
        assert!(side_by_side(serial).is_err());
        assert!(side_by_side(&ok.replace("cpu1", "cpu0")).is_err());
    }

    #[test]
    fn guest_edu_check_derives_the_command_and_bar_from_the_log() {
        let log = "\
[0] INFO  cpu0 discovery: pci:   00:05.0 BAR0 mem32 0x80000000 size 0x100000
[1] INFO  cpu0 vm::guest: guest g0: 00:05.0 BAR0 [0x80000000-0x80100000) mapped at the same guest-physical address
[2] INFO  cpu0 vm::guest: g0> pci: 00:05.0 BAR0 0x80000000 size 0x100000 (restored 0x80000000)
[3] INFO  cpu0 vm::guest: g0> pci: 00:05.0 command 0x0000 -> 0x0006
";
        assert_eq!(guest_edu_check(log), Ok(()));
        assert!(guest_edu_check(&log.replace("-> 0x0006", "-> 0x0004")).is_err());
        assert!(guest_edu_check(&log.replace("0x0000 -> 0x0006", "0x0103 -> 0x0107")).is_ok());
        assert!(
            guest_edu_check(&log.replace("BAR0 0x80000000 size", "BAR0 0x90000000 size")).is_err()
        );
        assert_eq!(discovered_bar(log, "00:05.0", 0), Ok(0x8000_0000));
        assert_eq!(
            discovered_bar(
                "pci:   00:01.0 BAR0 mem32 pref 0xfd000000 size 0x1000000",
                "00:01.0",
                0
            ),
            Ok(0xfd00_0000)
        );
    }

    #[test]
    fn escape_check_wants_the_exact_gpa() {
        let log = "\
[0] INFO  cpu0 platform: paging: W^X enforced
moat: boot complete
[1] INFO  cpu0 vm::guest: g0> escape: reading GPA 0x800000
[2] ERROR cpu0 vm::guest: guest g0 vcpu0: nested page fault at GPA 0x800000 (read, not mapped) rip=0x1: outside its memory and devices; guest stopped
[3] INFO  cpu1 vm::guest: g1> PASS spin
[4] INFO  cpu1 vm::guest: guest g1 vcpu0: exited with code 0
[5] INFO  cpu0 vm: vm: all guests stopped (2 started of 2 configured)
";
        assert_eq!(escape_check(log, "reading", "read", 0x80_0000), Ok(()));
        assert!(escape_check(log, "reading", "read", 0x80_1000).is_err());
        assert!(escape_check(log, "writing", "write", 0x80_0000).is_err());
    }
}
