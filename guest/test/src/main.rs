//! `moat-test-guest`: a small kernel that runs as a Moat guest.
//!
//! Moat enters it in 64-bit long mode at `_start` with RDI = the boot information
//! ([`abi::BootInfo`]) and RSI = the vCPU index. vCPU 0 runs the tests its module command line
//! names, in order (words `name` or `name=arg`), prints one `PASS name` or `FAIL name: why` line
//! each through the console hypercall, then a summary, and exits with the number of failures.
//! Other vCPUs say they are up and exit, or with `vcpu-spin` tick until they are stopped.
//!
//! Tests: `hello`, `spin=N`, `probe-pci`, `edu-bar`, `escape-read[=GPA]`,
//! `escape-write[=GPA]` (default: the first byte past the guest's memory), `msr`,
//! `triple-fault`, `bad-hypercall`, `vmmcall-bench=N`, the PV DMA tests `dma-*` (`dma/`,
//! `dma_bounds.rs`; `dma-demo` is `cargo xtask run`'s; `dma-bench-bytes=B` and
//! `dma-bench-batch=N` anywhere on the line run only `dma-bench`'s cells of that buffer size
//! and batch), the interrupt tests `irq-*`/`msi-*`
//! (`irq.rs`), `vapic-timer` (`vapic.rs`) and the NVMe tests `nvme-pattern`, `nvme-faults`, `nvme-errors`, `nvme-bench=N` (`nvme-burst=MAX`, `nvme-burst-min=MIN` before it: its bursts)
//! (`nvme/`, with `moat-nvme`; the other vCPUs run their queue pairs). Numbers are decimal or
//! `0x` hex.
#![no_std]
#![no_main]

mod abi;
mod capacity;
mod dma;
mod dma_bounds;
mod idt;
mod ipi;
mod irq;
mod msix;
mod nvme;
mod paging;
mod pci;
mod race;
mod vapic;

use abi::{call, hypercall, BootInfo};

core::arch::global_asm!(
    r#"
    .section .text.entry, "ax"
    .global _start
_start:
    and rsp, -16
    call guest_main
    ud2
    "#
);

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("moat-test-guest: PANIC: {info}");
    abi::exit(0xff)
}

fn cmdline(info: &BootInfo) -> &'static str {
    if info.cmdline_len.get() > 0xf00 {
        return "";
    }
    // SAFETY: the hypervisor copied the command line into this guest's memory at cmdline_gpa
    // (identity mapped); it is never written afterwards.
    let bytes = unsafe {
        core::slice::from_raw_parts(
            info.cmdline_gpa.get() as *const u8,
            info.cmdline_len.get() as usize,
        )
    };
    core::str::from_utf8(bytes).unwrap_or("")
}

fn name(info: &BootInfo) -> &str {
    let n = info.name.iter().position(|&b| b == 0).unwrap_or(16);
    core::str::from_utf8(&info.name[..n]).unwrap_or("?")
}

#[unsafe(no_mangle)]
extern "C" fn guest_main(info: *const BootInfo, vcpu: u64) -> ! {
    // SAFETY: the hypervisor passes the address of the 64-byte boot information in RDI,
    // inside this guest's identity-mapped RAM; `BootInfo` has alignment 1 and every byte
    // pattern is one (`FromBytes`). Copied once.
    let info = unsafe { info.read() };
    let (_, _, insn, _) = abi::cpuid(0x4000_0001);
    abi::select_instruction(insn);
    if info.magic.get() != abi::BOOT_MAGIC {
        println!(
            "moat-test-guest: bad boot information magic {:#x}",
            info.magic.get()
        );
        abi::exit(0xfe);
    }
    let line = cmdline(&info);
    // Read by every vCPU before any `dma-bench` cell runs.
    dma::select_bench_cell(
        number_arg(line, "dma-bench-bytes="),
        number_arg(line, "dma-bench-batch="),
    );
    if vcpu != 0 {
        println!("vcpu {vcpu} of {} up", info.vcpus.get());
        if let Some(rounds) = number_arg(line, "dma-smp=") {
            match dma::smp_worker(
                vcpu as usize,
                info.vcpus.get() as usize,
                rounds,
                info.tsc_khz.get(),
            ) {
                Ok(d) => println!("vcpu {vcpu}: dma-smp worker done, {d} duplicate IOVA(s) seen"),
                Err(e) => println!("vcpu {vcpu}: dma-smp worker FAILED: {e}"),
            }
            abi::exit(0);
        }
        if let Some(rounds) = number_arg(line, "dma-concurrent=") {
            match dma::concurrent_worker(&info, vcpu as usize, rounds) {
                Ok(()) => println!("vcpu {vcpu}: dma-concurrent worker done"),
                Err(e) => println!("vcpu {vcpu}: dma-concurrent worker FAILED: {e}"),
            }
            abi::exit(0);
        }
        if let Some(ops) = number_arg(line, "dma-bench=") {
            if let Err(e) = dma::bench_worker(&info, vcpu as usize, ops) {
                println!("vcpu {vcpu}: dma-bench worker FAILED: {e}");
            }
            abi::exit(0);
        }
        if vcpu == 1
            && line
                .split_ascii_whitespace()
                .any(|w| w == "dma-stale" || w.starts_with("dma-stale="))
        {
            dma_bounds::stale_storm();
            abi::exit(0);
        }
        if vcpu == 1
            && line
                .split_ascii_whitespace()
                .any(|w| w == "dma-register-race")
        {
            race::worker();
            abi::exit(0);
        }
        if vcpu == 1 && line.split_ascii_whitespace().any(|w| w == "dma-capacity") {
            capacity::worker();
            abi::exit(0);
        }
        if vcpu == 1
            && line
                .split_ascii_whitespace()
                .any(|w| w.starts_with("msi-edu-vcpu1") || w.starts_with("msi-x-nvme-vcpu1"))
        {
            irq::worker();
            abi::exit(0);
        }
        if vcpu == 1
            && line
                .split_ascii_whitespace()
                .any(|w| w.starts_with("vapic-ipi"))
        {
            ipi::worker();
            abi::exit(0);
        }
        if vcpu == 1 && line.split_ascii_whitespace().any(|w| w == "dma-race") {
            dma::race_scribbler();
            abi::exit(0);
        }
        if line
            .split_ascii_whitespace()
            .any(|w| w.starts_with("nvme-"))
        {
            nvme::worker(vcpu as usize, &info);
            abi::exit(0);
        }
        if line.split_ascii_whitespace().any(|w| w == "vcpu-spin") {
            // Tick until the hypervisor stops this vCPU along with its guest.
            for i in 0.. {
                println!("vcpu {vcpu} tick {i}");
                delay_us(&info, 10_000);
            }
        }
        abi::exit(0);
    }
    println!(
        "moat-test-guest on {} vcpu {vcpu} of {}: {} MiB, command line `{line}`",
        name(&info),
        info.vcpus.get(),
        info.mem_size.get() >> 20
    );
    let (mut passed, mut failed) = (0u32, 0u32);
    for word in line.split_ascii_whitespace() {
        let (test, arg) = match word.split_once('=') {
            Some((t, a)) => (t, parse_number(a)),
            None => (word, None),
        };
        let r = match test {
            "hello" => hello(),
            "spin" => spin(&info, arg.unwrap_or(10)),
            "probe-pci" => probe_pci(),
            "edu-bar" => edu_bar(),
            "escape-read" => escape(arg.unwrap_or(info.mem_size.get()), false),
            "escape-write" => escape(arg.unwrap_or(info.mem_size.get()), true),
            "msr" => msr(),
            "triple-fault" => triple_fault(),
            "bad-hypercall" => bad_hypercall(),
            "vmmcall-bench" => vmmcall_bench(&info, arg.unwrap_or(10_000)),
            "dma-edu" => dma::edu(&info),
            "dma-calls" => dma::calls(&info),
            "dma-demo" => dma::demo(),
            "dma-batch" => dma::batch(arg.unwrap_or(64)),
            "dma-bad" => dma::bad(&info),
            "dma-bench" => dma::bench(&info, arg.unwrap_or(512)),
            "dma-hold" => dma::hold(&info, arg.unwrap_or(3000)),
            "dma-foreign" => dma::foreign(&info, arg.unwrap_or(1000)),
            "dma-smp" => dma::smp(&info, arg.unwrap_or(100)),
            "dma-concurrent" => dma::concurrent(&info, arg.unwrap_or(64)),
            "dma-faults" => dma::faults(),
            "dma-race" => dma::race(&info),
            "dma-capacity" => capacity::run(&info),
            "dma-register-race" => race::run(&info),
            "dma-msi" => dma_bounds::msi(),
            "dma-stale" => dma_bounds::stale(&info, arg.unwrap_or(12)),
            "dma-stop" => dma_bounds::stop(),
            "nvme-pattern" => nvme::pattern(&info),
            "nvme-bench" => nvme::bench(&info, arg.unwrap_or(2000)),
            "nvme-burst" => nvme::set_burst(arg, None),
            "nvme-burst-min" => nvme::set_burst(None, arg),
            "nvme-faults" => nvme::faults(&info),
            "nvme-errors" => nvme::errors(&info),
            "irq-host-vectors" => irq::host_vectors(arg.unwrap_or(2)),
            "msi-edu" => irq::msi_edu(&info, arg.unwrap_or(4), 0),
            "msi-edu-vcpu1" => irq::msi_edu(&info, arg.unwrap_or(4), 1),
            "msi-attacks" => irq::msi_attacks(&info),
            "dma-fault-irq" => irq::fault_irq(&info),
            "msi-storm" => irq::msi_storm(&info, arg.unwrap_or(5000)),
            "msi-x-nvme" => msix::nvme_irq(&info, arg.unwrap_or(8), 0),
            "msi-x-nvme-vcpu1" => msix::nvme_irq(&info, arg.unwrap_or(8), 1),
            "msi-x-attacks" => msix::attacks(&info),
            "msi-x-storm" => msix::storm(&info, arg.unwrap_or(400)),
            "msi-x-unemulated" => msix::unemulated(),
            "vapic-timer" => vapic::run(&info),
            "vapic-ipi" => ipi::run(&info, arg.unwrap_or(8)),
            // Read by the other vCPUs (see above).
            "vcpu-spin" => continue,
            // Read by every vCPU at start (see above).
            "dma-bench-bytes" | "dma-bench-batch" => continue,
            other => {
                println!("FAIL {other}: unknown test");
                failed += 1;
                continue;
            }
        };
        match r {
            Ok(()) => {
                println!("PASS {test}");
                passed += 1;
            }
            Err(why) => {
                println!("FAIL {test}: {why}");
                failed += 1;
            }
        }
    }
    nvme::stop_workers();
    println!("moat-test-guest: {passed} passed, {failed} failed");
    abi::exit(failed as u64)
}

type Outcome = Result<(), &'static str>;

/// The number after `key` (e.g. `dma-smp=`) in the first word of `line` that starts with it.
fn number_arg(line: &str, key: &str) -> Option<u64> {
    line.split_ascii_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(parse_number)
}

fn parse_number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn hello() -> Outcome {
    let (max, b, c, d) = abi::cpuid(0x4000_0000);
    let mut sig = [0u8; 12];
    sig[..4].copy_from_slice(&b.to_le_bytes());
    sig[4..8].copy_from_slice(&c.to_le_bytes());
    sig[8..].copy_from_slice(&d.to_le_bytes());
    let sig = core::str::from_utf8(&sig).unwrap_or("?");
    let (version, features, insn, _) = abi::cpuid(0x4000_0001);
    let hv_bit = abi::cpuid(1).2 & (1 << 31) != 0;
    println!(
        "hello: cpuid 0x40000000 signature `{sig}` max leaf {max:#x}; version {version} features {features:#x} instruction {insn}; hypervisor bit {hv_bit}"
    );
    let (status, v) = hypercall(call::VERSION, 0, 0, 0);
    println!("hello: VERSION hypercall returned status {status} value {v}");
    if sig != "MoatMoatMoat" || !hv_bit {
        return Err("no Moat signature in CPUID");
    }
    if status != abi::OK || u64::from(version) != v {
        return Err("VERSION hypercall disagrees with CPUID");
    }
    Ok(())
}

fn delay_us(info: &BootInfo, us: u64) {
    let end = abi::rdtsc() + us * info.tsc_khz.get().max(1) / 1000;
    while abi::rdtsc() < end {
        core::hint::spin_loop();
    }
}

fn spin(info: &BootInfo, ticks: u64) -> Outcome {
    for i in 0..ticks {
        println!("tick {i}");
        delay_us(info, 20_000);
    }
    Ok(())
}

fn probe_pci() -> Outcome {
    let mut count = 0;
    let mut sized = false;
    let mut bus_master = false;
    pci::scan(|f| {
        count += 1;
        println!(
            "pci: {:02x}:{:02x}.{} {:04x}:{:04x}",
            f.bus, f.dev, f.func, f.vendor, f.device
        );
        let bar0 = pci::read32(f.bus, f.dev, f.func, 0x10);
        pci::write32(f.bus, f.dev, f.func, 0x10, u32::MAX);
        let mask = pci::read32(f.bus, f.dev, f.func, 0x10);
        pci::write32(f.bus, f.dev, f.func, 0x10, bar0);
        let after = pci::read32(f.bus, f.dev, f.func, 0x10);
        let size = (!(mask & !0xf)).wrapping_add(1);
        println!(
            "pci: {:02x}:{:02x}.{} BAR0 {:#x} size {size:#x} (restored {after:#x})",
            f.bus, f.dev, f.func, bar0
        );
        sized |= mask != 0 && after == bar0 && size.is_power_of_two();
        let command = pci::read32(f.bus, f.dev, f.func, 0x04) as u16;
        pci::write16(f.bus, f.dev, f.func, 0x04, command | 0x6);
        let now = pci::read32(f.bus, f.dev, f.func, 0x04) as u16;
        println!(
            "pci: {:02x}:{:02x}.{} command {command:#06x} -> {now:#06x}",
            f.bus, f.dev, f.func
        );
        bus_master |= now & 0x4 != 0;
        let cap = pci::read32(f.bus, f.dev, f.func, 0x34) & 0xff;
        let past = pci::read32(f.bus, f.dev, f.func, 0x40);
        println!(
            "pci: {:02x}:{:02x}.{} capability pointer {cap:#x}, dword 0x40 {past:#x}",
            f.bus, f.dev, f.func
        );
    });
    println!("probe-pci: {count} function(s) visible");
    if count == 0 {
        return Err("no PCI function visible");
    }
    if !sized {
        return Err("BAR0 sizing did not work");
    }
    if !bus_master {
        return Err("bus mastering could not be enabled");
    }
    Ok(())
}

fn edu_bar() -> Outcome {
    let mut edu = None;
    pci::scan(|f| {
        if f.vendor == 0x1234 && f.device == 0x11e8 && edu.is_none() {
            edu = Some(f);
        }
    });
    let f = edu.ok_or("no edu device visible")?;
    let bar = u64::from(pci::read32(f.bus, f.dev, f.func, 0x10) & !0xf);
    println!(
        "edu-bar: edu at {:02x}:{:02x}.{} BAR0 {bar:#x}",
        f.bus, f.dev, f.func
    );
    let reg = |off: u64| (bar + off) as *mut u32;
    // SAFETY: the BAR is mapped into this guest by the hypervisor at its configured address
    // (identity-mapped, uncached, by the boot page tables); edu registers are 32-bit.
    let (id, inverted, factorial) = unsafe {
        let id = core::ptr::read_volatile(reg(0x00));
        core::ptr::write_volatile(reg(0x04), 0x1234_5678);
        let inverted = core::ptr::read_volatile(reg(0x04));
        core::ptr::write_volatile(reg(0x08), 10);
        let mut spins = 0u64;
        while core::ptr::read_volatile(reg(0x20)) & 1 != 0 && spins < 100_000_000 {
            spins += 1;
            core::hint::spin_loop();
        }
        (id, inverted, core::ptr::read_volatile(reg(0x08)))
    };
    println!("edu-bar: id register {id:#010x}");
    println!("edu-bar: liveness wrote 0x12345678 read {inverted:#010x}");
    println!("edu-bar: factorial of 10 = {factorial}");
    if id != 0x0100_00ed {
        return Err("edu id register is not 0x010000ed");
    }
    if inverted != !0x1234_5678u32 {
        return Err("edu liveness register did not invert");
    }
    if factorial != 3_628_800 {
        return Err("edu factorial of 10 is not 3628800");
    }
    Ok(())
}

fn escape(gpa: u64, write: bool) -> Outcome {
    let p = gpa as *mut u64;
    if write {
        println!("escape: writing GPA {gpa:#x}");
        // SAFETY: deliberately outside the partition: the hypervisor must stop this guest.
        unsafe { core::ptr::write_volatile(p, 0x6d6f_6174_6d6f_6174) };
    } else {
        println!("escape: reading GPA {gpa:#x}");
        // SAFETY: as above.
        let v = unsafe { core::ptr::read_volatile(p) };
        println!("escape: read {v:#x}");
    }
    Err("the access outside the partition went through")
}

/// RDMSR of EFER is answered (without SVME); RDMSR of the host-save MSR and WRMSR of EFER
/// get #GP injected, which this guest's IDT counts.
fn msr() -> Outcome {
    idt::install();
    let before = idt::gp_count();
    let rdmsr = |msr: u32| {
        let (lo, hi): (u32, u32);
        // SAFETY: RDMSR traps to the hypervisor; a #GP is handled by `idt`.
        unsafe {
            core::arch::asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack))
        };
        (hi as u64) << 32 | lo as u64
    };
    let efer = rdmsr(0xc000_0080);
    let after_efer = idt::gp_count() - before;
    let _ = rdmsr(0xc001_0117);
    let after_hsave = idt::gp_count() - before;
    // SAFETY: WRMSR traps to the hypervisor, which refuses it with #GP (handled by `idt`).
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") 0xc000_0080u32, in("eax") efer as u32,
                         in("edx") (efer >> 32) as u32, options(nomem, nostack))
    };
    let after_write = idt::gp_count() - before;
    idt::remove();
    println!(
        "msr: EFER {efer:#x}; #GP after RDMSR EFER {after_efer}, after RDMSR 0xc0010117 {after_hsave}, after WRMSR EFER {after_write}"
    );
    if efer & 0x500 != 0x500 || efer & (1 << 12) != 0 {
        return Err("EFER should show LME|LMA and hide SVME");
    }
    if (after_efer, after_hsave, after_write) != (0, 1, 2) {
        return Err("the #GP injections did not arrive as expected");
    }
    Ok(())
}

fn triple_fault() -> Outcome {
    println!("triple-fault: ud2 with no IDT");
    // SAFETY: deliberately raises #UD with no IDT: #GP, #DF, shutdown.
    unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
    Err("still running after ud2")
}

/// Unknown hypercalls made after the first one by `bad-hypercall`.
const FLOOD: u64 = 1000;

fn bad_hypercall() -> Outcome {
    let nr = 0x7fff_dead;
    let (status, value) = hypercall(nr, 1, 2, 3);
    println!("bad-hypercall: call {nr:#x} returned status {status} value {value}");
    // A flood of unknown calls: the hypervisor must rate-limit its WARN lines about them.
    let mut flood_unsupp = 0;
    for i in 0..FLOOD {
        flood_unsupp += (hypercall(nr + 1 + (i % 4), 0, 0, 0).0 == abi::UNSUPP) as u64;
    }
    println!("bad-hypercall: {FLOOD} more unknown calls, {flood_unsupp} returned UNSUPP");
    let (fault, _) = hypercall(call::CONSOLE_WRITE, 0xffff_f000_0000, 16, 0);
    println!("bad-hypercall: console write from GPA 0xfffff0000000 returned status {fault}");
    if status != abi::UNSUPP {
        return Err("unknown hypercall did not return UNSUPP (-9)");
    }
    if fault != abi::FAULT {
        return Err("console write from outside memory did not return FAULT (-8)");
    }
    if flood_unsupp != FLOOD {
        return Err("an unknown hypercall of the flood did not return UNSUPP");
    }
    Ok(())
}

fn vmmcall_bench(info: &BootInfo, n: u64) -> Outcome {
    let n = n.max(1);
    for _ in 0..100 {
        hypercall(call::NOP, 0, 0, 0);
    }
    let mut bad = 0;
    let t0 = abi::rdtsc();
    for _ in 0..n {
        bad += (hypercall(call::NOP, 0, 0, 0).0 != abi::OK) as u64;
    }
    let cycles = (abi::rdtsc() - t0) / n;
    let ns = cycles * 1_000_000 / info.tsc_khz.get().max(1);
    // Scenarios run SVM guests under QEMU TCG and VMX guests under Bochs: both emulated.
    let how = if abi::uses_vmcall() {
        "VMCALL, emulated by Bochs in the scenarios"
    } else {
        "QEMU TCG"
    };
    println!(
        "vmmcall-bench: {n} round trips: {cycles} cycles/call, {ns} ns/call ({how}, TSC {} MHz)",
        info.tsc_khz.get() / 1000
    );
    if bad != 0 {
        return Err("a NOP hypercall failed");
    }
    Ok(())
}
