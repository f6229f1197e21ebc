//! The BSP's boot sequence, from the multiboot2 hand-off to a running platform.

use moat_boot::{BootInfo, MemoryKind};
use moat_config::{Config, Dump, ExitAction, LogLevel, SelfTest};

use crate::arch::{apic, cpu, tsc, x86};
use crate::exit::{self, ExitCode};
use crate::mm::{self, frames, frames::Reservation, space, PhysAddr, PAGE_SIZE};

/// Heap size carved from physical memory at boot.
const HEAP_SIZE: u64 = 16 << 20;

fn level_filter(l: LogLevel) -> log::LevelFilter {
    match l {
        LogLevel::Off => log::LevelFilter::Off,
        LogLevel::Error => log::LevelFilter::Error,
        LogLevel::Warn => log::LevelFilter::Warn,
        LogLevel::Info => log::LevelFilter::Info,
        LogLevel::Debug => log::LevelFilter::Debug,
        LogLevel::Trace => log::LevelFilter::Trace,
    }
}

fn kind_name(k: MemoryKind) -> &'static str {
    match k {
        MemoryKind::Usable => "usable",
        MemoryKind::Reserved => "reserved",
        MemoryKind::AcpiReclaimable => "ACPI reclaimable",
        MemoryKind::AcpiNvs => "ACPI NVS",
        MemoryKind::Defective => "defective",
    }
}

/// The BSP's whole boot. Never returns.
pub fn boot(magic: u32, mbi: u32) -> ! {
    tsc::mark_boot();
    crate::console::init();
    let tsc = tsc::calibrate();
    // SAFETY: GRUB handed us the multiboot2 information; its frames are reserved below and
    // never written.
    let boot = match unsafe { BootInfo::from_multiboot2(magic, mbi as usize) } {
        Ok(b) => b,
        Err(e) => {
            crate::println!("moat: cannot boot: {e}");
            exit::exit(ExitCode::Failure)
        }
    };
    let (config, diags) = Config::parse(boot.cmdline);
    exit::set_qemu_exit(config.exit == ExitAction::Qemu);
    crate::console::init_log(level_filter(config.log));
    crate::println!(
        "\nMoat microhypervisor {} ({} build)",
        env!("CARGO_PKG_VERSION"),
        if cfg!(feature = "selftest") {
            "selftest"
        } else {
            "release"
        }
    );
    log::info!(
        "boot loader: {:?}, TSC {} MHz from {}",
        boot.bootloader,
        tsc.khz / 1000,
        tsc.source.name()
    );
    if tsc.disagree {
        log::warn!(
            "tsc: CPUID states {} MHz, more than 10% off the PIT's measurement: using the measurement (an emulator?)",
            tsc.stated_khz / 1000
        );
    }
    log::info!("command line: {:?}", boot.cmdline);
    for d in diags.iter() {
        log::warn!("command line: {d}; using the default");
    }
    if diags.dropped() > 0 {
        log::warn!("command line: {} more problems not shown", diags.dropped());
    }
    log::info!("config: {config}");

    cpu::init_this_cpu(0, x86::initial_apic_id());

    log::info!(
        "memory map ({} regions{}):",
        boot.memory_map().len(),
        if boot.efi_memory_map {
            ", from EFI"
        } else {
            ""
        }
    );
    for r in boot.memory_map() {
        log::info!(
            "  [{:#014x}-{:#014x}) {:>10} KiB {}",
            r.start,
            r.end(),
            r.len / 1024,
            kind_name(r.kind)
        );
    }
    if boot.regions_dropped > 0 {
        log::warn!(
            "{} memory-map regions beyond capacity ignored",
            boot.regions_dropped
        );
    }
    for m in boot.modules() {
        log::info!("module [{:#x}-{:#x}) {:?}", m.start, m.end, m.cmdline);
    }

    match boot.acpi {
        Some(moat_boot::info::AcpiRoot::Rsdt(a)) => {
            log::info!("ACPI root: RSDT at {a:#x} (RSDP 1.0)")
        }
        Some(moat_boot::info::AcpiRoot::Xsdt { address, revision }) => {
            log::info!("ACPI root: XSDT at {address:#x} (RSDP revision {revision})")
        }
        None => {}
    }
    let platform = match crate::acpi::discover(boot.acpi) {
        Ok(p) => p,
        Err(e) => {
            log::error!("ACPI: {e}; cannot go on without a MADT");
            exit::exit(ExitCode::Failure)
        }
    };

    // Frames: everything usable except what boot data lives in.
    let k = mm::kernel_image();
    let mut res = [Reservation {
        start: 0,
        end: 0,
        what: "",
    }; 96];
    let mut n = 0;
    let mut reserve = |start: u64, end: u64, what: &'static str| {
        if n < res.len() {
            res[n] = Reservation { start, end, what };
            n += 1;
        }
    };
    reserve(k.image.0, k.image.1, "kernel image");
    reserve(boot.mbi.0, boot.mbi.1, "multiboot2 information");
    for m in boot.modules() {
        reserve(m.start, m.end, "boot module");
    }
    crate::acpi::table_ranges(|s, e| reserve(s, e, "ACPI table"));
    let fr = match frames::init(&boot, &res[..n]) {
        Ok(r) => r,
        Err(e) => {
            log::error!("frames: {e}");
            exit::exit(ExitCode::Failure)
        }
    };
    frames::log_reservations();
    log::info!(
        "frames: {} MiB managed, {} MiB free, {} reservations",
        fr.total * 4 / 1024,
        fr.free * 4 / 1024,
        fr.reservations
    );
    let Some(tramp) = fr.trampoline else {
        log::error!("no free page below 640 KiB for the AP trampoline");
        exit::exit(ExitCode::Failure)
    };
    let cr3 = match space::build(&boot, tramp) {
        Ok(c) => c,
        Err(e) => {
            log::error!("building the page tables failed: {e:?}");
            exit::exit(ExitCode::Failure)
        }
    };
    wx_self_check();
    let Some(heap) = frames::alloc_contiguous(HEAP_SIZE / PAGE_SIZE, PAGE_SIZE) else {
        log::error!("no {} MiB for the heap", HEAP_SIZE >> 20);
        exit::exit(ExitCode::Failure)
    };
    // SAFETY: the frames were just allocated for the heap alone and are mapped RW.
    unsafe { mm::heap::init(heap.as_u64(), HEAP_SIZE as usize) };
    log::info!("heap: {} MiB at {:#x}", HEAP_SIZE >> 20, heap);

    crate::fbcon::init(boot.framebuffer);
    let _ = space::map_mmio(PhysAddr::new(platform.lapic_address), PAGE_SIZE);
    for io in platform.ioapics() {
        let _ = space::map_mmio(PhysAddr::new(u64::from(io.address)), PAGE_SIZE);
    }
    if config.selftest == SelfTest::X2apic {
        if apic::enter_x2apic_as_firmware() {
            log::info!(
                "selftest: local APIC put in x2APIC mode, as firmware with EXTD set hands it over"
            );
        } else {
            log::warn!("selftest: this CPU offers no x2APIC (CPUID.1:ECX bit 21)");
        }
    }
    apic::mask_legacy_pic();
    apic::init_this_cpu();
    if apic::x2apic() {
        log::info!(
            "apic: x2APIC mode (registers through MSRs 0x800-0x8ff), BSP id {}",
            apic::id()
        );
    } else {
        log::info!(
            "apic: xAPIC mode at {:#x}, BSP id {}",
            apic::base(),
            apic::id()
        );
    }
    let timer = apic::calibrate_timer();
    log::info!("apic: timer {} ticks/ms (bus clock / 16)", timer);
    log::info!(
        "ACPI: {} CPUs (APIC ids {:?}), {} IOAPICs, {} ECAM windows, DMAR {}",
        platform.cpus().len(),
        ApicIds(&platform),
        platform.ioapics().len(),
        platform.ecam().len(),
        if platform.dmar.is_some() {
            "present"
        } else {
            "absent"
        }
    );

    for c in platform.cpus() {
        log::debug!("ACPI: processor uid {} APIC id {}", c.uid, c.apic_id);
    }
    for io in platform.ioapics() {
        log::info!(
            "ACPI: IOAPIC id {} at {:#x}, GSI base {}",
            io.id,
            io.address,
            io.gsi_base
        );
    }
    let dmar = crate::discovery::report_dmar(&platform, &config);
    let devices = crate::discovery::report_pci(&platform, dmar.as_ref());
    let units = crate::iommu::init(dmar.as_ref(), &config);
    crate::dma::init();
    log::info!("vtd: {units} remapping unit(s) translating");

    // APs: install the trampoline (the page is R+X in the kernel map; write it through the
    // boot-time view is gone, so map it RW briefly).
    install_trampoline(tramp.as_u64(), cr3.as_u64());
    let smp = crate::smp::start_aps(&platform, config.smp, tramp.as_u64());
    log::info!(
        "smp: {} of {} CPUs online ({} listed by ACPI)",
        smp.online,
        smp.wanted,
        smp.listed
    );

    run_selftest(config.selftest, dmar.as_ref(), &platform, &devices);
    let (used, hfree) = mm::heap::usage();
    let (ftotal, ffree) = frames::stats();
    log::info!("frames: {ffree}/{ftotal} free; heap: {used} bytes used, {hfree} free");
    crate::println!("moat: boot complete");
    let _ = config.dump == Dump::None;
    crate::vm::run(&boot, &config, &platform);
    exit::exit(ExitCode::Success)
}

struct ApicIds<'a>(&'a crate::acpi::Platform);
impl core::fmt::Debug for ApicIds<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list()
            .entries(self.0.cpus().iter().map(|c| c.apic_id))
            .finish()
    }
}

fn install_trampoline(page: u64, cr3: u64) {
    let (code, entry64) = moat_boot::ap::trampoline_code();
    let mut image = [0u8; moat_boot::ap::TRAMPOLINE_SIZE];
    if let Err(e) = moat_boot::ap::build_image(&mut image, code, page, cr3, entry64) {
        log::error!("AP trampoline: {e:?}");
        return;
    }
    // Temporarily writable, then back to R+X.
    let _ = space::map_rw(page);
    // SAFETY: the page was picked from usable RAM below 640 KiB, is reserved from the frame
    // allocator (first 1 MiB) and is mapped writable right now.
    unsafe { core::ptr::copy_nonoverlapping(image.as_ptr(), page as *mut u8, image.len()) };
    let _ = space::map_rx(page);
}

/// Checks that the kernel's own mappings really are W^X: every page of text R+X, of rodata
/// R+NX, of data/bss RW+NX (the flags of all levels combined, as the CPU applies them), page 0
/// unmapped, and no mapped page anywhere both writable and executable. Ends the run if not.
fn wx_self_check() {
    use mm::paging::Pte;
    let k = mm::kernel_image();
    let exec = |f: Pte| !f.contains(Pte::NO_EXECUTE);
    let write = |f: Pte| f.contains(Pte::WRITABLE);
    type Section = (&'static str, (u64, u64), fn(Pte) -> bool);
    let sections: [Section; 3] = [
        ("text", k.text, |f| {
            !f.contains(Pte::WRITABLE) && !f.contains(Pte::NO_EXECUTE)
        }),
        ("rodata", k.rodata, |f| {
            !f.contains(Pte::WRITABLE) && f.contains(Pte::NO_EXECUTE)
        }),
        ("data", k.data, |f| {
            f.contains(Pte::WRITABLE) && f.contains(Pte::NO_EXECUTE)
        }),
    ];
    let mut pages = [0u64; 3];
    let mut bad: Option<(&str, u64, Option<Pte>)> = None;
    for (i, (name, (start, end), ok)) in sections.iter().enumerate() {
        let mut a = mm::align_down(*start, PAGE_SIZE);
        while a < *end {
            let f = space::effective_flags(a);
            if bad.is_none() && !f.is_some_and(ok) {
                bad = Some((name, a, f));
            }
            pages[i] += 1;
            a += PAGE_SIZE;
        }
    }
    let mut leaves = 0u64;
    let mut wx: Option<(u64, u64)> = None;
    let walked = space::for_each_page(|a, size, f| {
        leaves += 1;
        if wx.is_none() && write(f) && exec(f) {
            wx = Some((a, size));
        }
    });
    let null = space::flags_of(0);
    if let Some((name, a, f)) = bad {
        log::error!("paging: W^X self-check failed: {name} page {a:#x} has flags {f:?}");
        exit::exit(ExitCode::Failure)
    }
    if let Some((a, size)) = wx {
        log::error!(
            "paging: W^X self-check failed: page {a:#x} ({size:#x} bytes) is writable and executable"
        );
        exit::exit(ExitCode::Failure)
    }
    if null.is_some() || !walked {
        log::error!("paging: W^X self-check failed: page 0 {null:?}, tables walked: {walked}");
        exit::exit(ExitCode::Failure)
    }
    log::info!(
        "paging: W^X enforced on every page (text {} pages RX, rodata {} R+NX, data {} RW+NX; none of {leaves} mapped pages W+X; page 0 unmapped)",
        pages[0],
        pages[1],
        pages[2]
    );
}

fn run_selftest(
    t: SelfTest,
    dmar: Option<&moat_dmar::Dmar<'_>>,
    platform: &crate::acpi::Platform,
    devices: &[crate::discovery::PciDevice],
) {
    // x2apic acted at boot, before the APIC was first used.
    if matches!(t, SelfTest::None | SelfTest::X2apic) {
        return;
    }
    if t == SelfTest::VmxEntry {
        #[cfg(feature = "selftest")]
        crate::vm::vmx::selftest_break_entries();
        #[cfg(not(feature = "selftest"))]
        log::warn!("selftest=vmx-entry ignored: it exists only in selftest builds");
        return;
    }
    if matches!(t, SelfTest::Vtd | SelfTest::VtdStorm) {
        // SAFETY: the MCFG's windows, mapped by `report_pci` during discovery.
        let cfg = unsafe { crate::discovery::EcamAccess::new(platform.ecam()) };
        if !crate::iommu::selftest::run(t == SelfTest::VtdStorm, dmar, &cfg, devices) {
            exit::exit(ExitCode::Failure);
        }
        return;
    }
    if !cfg!(feature = "selftest") {
        log::warn!("selftest={t:?} ignored: deliberate faults exist only in selftest builds");
        return;
    }
    log::info!("selftest: raising {t:?} on purpose");
    #[cfg(feature = "selftest")]
    selftest_fault(t);
}

#[cfg(feature = "selftest")]
fn selftest_fault(t: SelfTest) {
    // SAFETY: these deliberately fault; the exception handler ends the run.
    unsafe {
        match t {
            SelfTest::Ud => core::arch::asm!("ud2"),
            SelfTest::Pf => {
                core::ptr::read_volatile(0x10 as *const u64);
            }
            SelfTest::Gp => {
                // A non-canonical address raises #GP.
                core::ptr::read_volatile(0x8000_0000_0000_0000 as *const u64);
            }
            SelfTest::De => {
                core::arch::asm!("xor edx, edx", "xor eax, eax", "div eax", out("eax") _, out("edx") _)
            }
            SelfTest::Bp => core::arch::asm!("int3"),
            SelfTest::Panic => panic!("selftest: deliberate panic"),
            SelfTest::Overflow => {
                // The compiler cannot see the values: only an overflow check catches this.
                let a = core::hint::black_box(u64::MAX - 1);
                let b = core::hint::black_box(3u64);
                let sum = a + b;
                log::error!("selftest: u64 overflow wrapped to {sum}: the kernel was built without overflow checks");
                exit::exit(ExitCode::Failure)
            }
            SelfTest::Wx => {
                let k = mm::kernel_image();
                let mid = mm::align_down((k.text.0 + k.text.1) / 2, PAGE_SIZE);
                match space::break_wx_for_selftest(mid) {
                    Ok(()) => {
                        log::info!(
                            "selftest: text page {mid:#x} made writable, checking W^X again"
                        );
                        wx_self_check();
                        log::error!(
                            "selftest: the W^X self-check missed the writable text page {mid:#x}"
                        );
                        exit::exit(ExitCode::Failure)
                    }
                    Err(e) => log::error!("selftest: cannot remap {mid:#x}: {e:?}"),
                }
            }
            SelfTest::None
            | SelfTest::Vtd
            | SelfTest::VtdStorm
            | SelfTest::X2apic
            | SelfTest::VmxEntry => {}
        }
    }
}
