//! Guests: a contiguous memory partition from the frame allocator mapped at guest-physical 0 by
//! the second stage (plus the BARs of assigned devices, at their host addresses), an ELF image
//! from a multiboot2 module loaded into it, hypervisor-built boot page tables so every vCPU
//! starts in 64-bit long mode, and the exit loop each vCPU runs on its own physical CPU.
//!
//! # Guest-physical layout (shared with the test guest)
//!
//! | GPA | what |
//! |---|---|
//! | `0x1000` | [`BootInfo`] (RDI at entry), the command line at `0x1100` |
//! | `0x2000` | GDT: null, 64-bit code (`0x08`), data (`0x10`) |
//! | `0x3000` | PML4, then PDPT at `0x4000` and four PDs at `0x5000..0x9000`: the first 4 GiB identity-mapped with 2 MiB pages (the top GiB uncached, for BARs) |
//! | `0x10_0000` | lowest address an ELF segment may load at |
//! | `mem - 64 KiB * (i + 1)` | vCPU `i`'s 64 KiB stack (RSP at its top) |
//!
//! RSI holds the vCPU index at entry.

use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU32, AtomicU8, AtomicUsize, Ordering};

use moat_config::GuestConfig;
use moat_image::{Image, ImageError};
use moat_pci::Bdf;
use spin::Mutex;

use super::hypercall::{self, Outcome};
use super::msi::DeviceMsi;
use super::msix::{self, DeviceMsix};
use super::pci::{self, AssignedDevice, Ecams};
use super::vcpu::{
    Access, Backend, EntryState, Event, Exit, IoAccess, MemKind, Reg, Stage2, Vcpu, VcpuError,
};
use super::virq::{HostTimer, VcpuApic, VirtualInterrupts};
use crate::mm::{frames, PhysAddr, PAGE_SIZE};

/// Guest-physical address of [`BootInfo`].
pub const BOOT_INFO_GPA: u64 = 0x1000;
/// Guest-physical address of the command line copy.
pub const CMDLINE_GPA: u64 = 0x1100;
/// Longest command line passed.
pub const CMDLINE_MAX: usize = 0xf00;
/// Guest-physical address of the GDT.
pub const GDT_GPA: u64 = 0x2000;
/// Guest-physical address of the PML4.
pub const PML4_GPA: u64 = 0x3000;
/// Lowest guest-physical address an ELF segment may use.
pub const LOAD_MIN: u64 = 0x10_0000;
/// Stack bytes per vCPU.
pub const STACK_SIZE: u64 = 64 << 10;
/// Partition alignment (2 MiB, so the second stage uses large pages).
const PARTITION_ALIGN: u64 = 2 << 20;
pub use moat_abi::boot::{BootInfo, BOOT_MAGIC};

/// Why a guest could not be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestError {
    /// The ELF image was refused (malformed, or a segment outside `[LOAD_MIN, mem - stacks)`,
    /// or the entry point outside every segment).
    Elf(ImageError),
    /// Too little memory for the boot structures, one segment and the stacks.
    TooSmall,
    /// No contiguous run of frames that large.
    NoMemory,
    /// From the vCPU layer.
    Vcpu(VcpuError),
    /// An assigned device cannot be given to the guest.
    Device(Bdf, pci::AssignError),
    /// The DMA service (VT-d domain, IOVA allocator) could not be set up.
    Dma(crate::dma::SetupError),
    /// An assigned device's IOMMU unit does not remap interrupts (and the command line does
    /// not say `unsafe-interrupts`).
    NoInterruptRemapping(Bdf),
    /// An assigned device is behind no IOMMU at all (and the command line does not say
    /// `unsafe-interrupts`).
    NoIommu(Bdf),
}

impl fmt::Display for GuestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Elf(e) => write!(f, "{e}"),
            Self::TooSmall => f.write_str("memory too small (at least 2 MiB)"),
            Self::NoMemory => f.write_str("no contiguous host memory for the partition"),
            Self::Vcpu(e) => write!(f, "{e}"),
            Self::Device(b, e) => write!(f, "device {b}: {e}"),
            Self::Dma(e) => write!(f, "DMA: {e}"),
            Self::NoInterruptRemapping(b) => write!(
                f,
                "device {b}: its IOMMU unit does not remap interrupts, so the device could raise any interrupt on the host; refused (`unsafe-interrupts` on the command line assigns it anyway)"
            ),
            Self::NoIommu(b) => write!(
                f,
                "device {b}: no IOMMU translates it (no VT-d unit, or `iommu=off`), so the device could write any host memory and raise any interrupt; refused (`unsafe-interrupts` on the command line assigns it anyway, with `policy=passthrough` only)"
            ),
        }
    }
}

impl From<VcpuError> for GuestError {
    fn from(e: VcpuError) -> Self {
        GuestError::Vcpu(e)
    }
}

/// Why a vCPU stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The exit hypercall, with the guest's code.
    Exited(u64),
    /// An access to a trapped MMIO page (an MSI-X table or PBA) whose instruction the
    /// hypervisor could not emulate.
    MmioRefused {
        /// Guest-physical address.
        gpa: u64,
        /// Where.
        rip: u64,
        /// Why.
        why: MmioError,
    },
    /// An access outside the guest's memory and devices.
    NestedPageFault {
        /// Guest-physical address.
        gpa: u64,
        /// What kind of access.
        access: Access,
        /// Where.
        rip: u64,
    },
    /// Shutdown (triple fault).
    TripleFault {
        /// Last RIP.
        rip: u64,
    },
    /// HLT with no interrupt source to wake it.
    Halted {
        /// RIP after the HLT.
        rip: u64,
    },
    /// Something the hypervisor does not emulate.
    Unsupported {
        /// What.
        what: &'static str,
        /// Raw exit code.
        code: u64,
        /// Where.
        rip: u64,
    },
    /// An intercepted exception (machine check).
    Exception {
        /// Vector.
        vector: u8,
        /// Where.
        rip: u64,
    },
    /// The hardware refused the guest state.
    InvalidState,
    /// The vCPU could not run.
    Failed(&'static str),
    /// Another vCPU of the guest stopped it.
    WithGuest,
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Exited(c) => write!(f, "exited with code {c}"),
            Self::NestedPageFault { gpa, access, rip } => write!(
                f,
                "nested page fault at GPA {gpa:#x} ({access}) rip={rip:#x}: outside its memory and devices"
            ),
            Self::MmioRefused { gpa, rip, why } => write!(
                f,
                "access to the trapped MSI-X page at GPA {gpa:#x} rip={rip:#x} not emulated: {why}"
            ),
            Self::TripleFault { rip } => write!(f, "triple fault (shutdown) rip={rip:#x}"),
            Self::Halted { rip } => write!(
                f,
                "halted with no interrupt source (no virtual interrupts yet) rip={rip:#x}"
            ),
            Self::Unsupported { what, code, rip } => {
                write!(f, "unsupported: {what} (exit code {code:#x}) rip={rip:#x}")
            }
            Self::Exception { vector, rip } => {
                write!(f, "exception vector {vector} rip={rip:#x}")
            }
            Self::InvalidState => f.write_str("invalid guest state refused by the VM entry"),
            Self::Failed(why) => write!(f, "could not run: {why}"),
            Self::WithGuest => f.write_str("stopped with its guest"),
        }
    }
}

impl StopReason {
    /// Whether this is the guest's own orderly exit.
    pub fn is_exit(&self) -> bool {
        matches!(self, Self::Exited(_))
    }
}

/// Why an access to a trapped MMIO page was not emulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmioError {
    /// The vCPU is not in 64-bit mode with paging (the decoder knows 64-bit code only).
    NotLongMode,
    /// The instruction bytes could not be read through the guest's page tables.
    Fetch(moat_x86arch::walk::WalkError),
    /// The instruction is not one of the emulated forms (`MOV`, `MOVZX`, an ALU operation
    /// into a register, `CMP`, `TEST`).
    Decode(moat_x86arch::insn::DecodeError),
    /// The instruction's direction is not the fault's (a read decoded for a write fault).
    Direction,
}

impl fmt::Display for MmioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotLongMode => f.write_str("the vCPU is not in 64-bit mode with paging"),
            Self::Fetch(e) => write!(
                f,
                "instruction fetch through the guest's page tables failed: {e}"
            ),
            Self::Decode(e) => write!(f, "instruction not emulated: {e}"),
            Self::Direction => {
                f.write_str("the instruction's direction does not match the fault's")
            }
        }
    }
}

/// Per-vCPU exit counts and where the time went, logged when the vCPU stops.
#[derive(Debug, Default, Clone, Copy)]
struct ExitStats {
    exits: u64,
    hypercalls: u64,
    cpuid: u64,
    io: u64,
    msr: u64,
    other: u64,
    /// TSC cycles from the VM entry to the VM exit coming back (guest time + world switch).
    run_cycles: u64,
    /// TSC cycles from an exit to the next VM entry (the hypervisor's exit handling).
    handler_cycles: u64,
}

impl ExitStats {
    fn count(&mut self, exit: &Exit, cycles: u64) {
        self.exits += 1;
        self.run_cycles += cycles;
        match exit {
            Exit::Hypercall => self.hypercalls += 1,
            Exit::Cpuid => self.cpuid += 1,
            Exit::Io(_) => self.io += 1,
            Exit::Msr { .. } => self.msr += 1,
            _ => self.other += 1,
        }
    }
}

impl fmt::Display for ExitStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.exits.max(1);
        let handled = self.exits.saturating_sub(1).max(1);
        let ns = crate::arch::tsc::cycles_to_ns;
        write!(
            f,
            "{} exits (hypercall {}, cpuid {}, io {}, msr {}, other {}); per exit: {} cycles ({} ns) from VM entry to VM exit, {} cycles ({} ns) handling in the hypervisor",
            self.exits,
            self.hypercalls,
            self.cpuid,
            self.io,
            self.msr,
            self.other,
            self.run_cycles / n,
            ns(self.run_cycles / n),
            self.handler_cycles / handled,
            ns(self.handler_cycles / handled),
        )
    }
}

/// Longest guest console line printed as one log line.
const LINE_MAX: usize = 512;

const STATE_RUNNING: u8 = 0;
const STATE_STOPPED: u8 = 1;

/// A console line being assembled for one vCPU.
struct Line {
    /// Up to [`LINE_MAX`] bytes of the line being assembled (longer lines are split).
    bytes: [u8; LINE_MAX],
    len: usize,
}

/// Rate limit of the MSI programming lines (guests choose how often they reprogram).
static MSI_LOG: crate::ratelimit::RateLimit = crate::ratelimit::RateLimit::new();
/// Rate limit of the lines for ICR writes the virtual APIC ignored.
static IPI_IGNORED_LOG: crate::ratelimit::RateLimit = crate::ratelimit::RateLimit::new();

/// One guest.
pub struct Guest {
    name: moat_config::GuestName,
    mem_hpa: u64,
    mem_size: u64,
    vcpus: usize,
    space: Stage2,
    ecams: Ecams,
    devices: Mutex<Vec<AssignedDevice>>,
    cf8: AtomicU32,
    state: AtomicU8,
    running: AtomicUsize,
    lines: Vec<Mutex<Line>>,
    outcome: Mutex<Option<StopReason>>,
    dma: Option<crate::dma::GuestDma>,
    /// Each vCPU's pending virtual interrupts (raised by host handlers on any CPU).
    virqs: Vec<VirtualInterrupts>,
    /// The APIC id of the CPU each vCPU runs on (device MSIs for it are sent there).
    vcpu_apic: Vec<AtomicU32>,
    /// The assigned functions' MSIs (functions with an MSI capability on a unit that
    /// remaps interrupts).
    msis: Vec<DeviceMsi>,
    /// The assigned functions' MSI-X (functions with an MSI-X capability on a unit that
    /// remaps interrupts): their table and PBA pages are trapped.
    msix: Vec<DeviceMsix>,
}

impl Guest {
    /// Builds a guest from its configuration and its ELF image; returns it with its vCPUs.
    /// A device whose IOMMU unit does not remap interrupts is refused unless
    /// `unsafe_interrupts`.
    pub fn create(
        backend: &Backend,
        config: &GuestConfig,
        image: &[u8],
        cmdline: &str,
        ecams: Ecams,
        unsafe_interrupts: bool,
    ) -> Result<(&'static Guest, Vec<Vcpu>), GuestError> {
        let mem = config.mem;
        let vcpus = usize::from(config.cpus.max(1));
        let stacks = STACK_SIZE * vcpus as u64;
        if mem < PARTITION_ALIGN || mem < LOAD_MIN + stacks + PAGE_SIZE {
            return Err(GuestError::TooSmall);
        }
        let elf = Image::load(image, LOAD_MIN..mem - stacks).map_err(GuestError::Elf)?;
        // Devices first: nothing is allocated if one cannot be assigned.
        let mut devices = Vec::new();
        for &bdf in config.devices() {
            devices
                .push(AssignedDevice::probe(&ecams, bdf).map_err(|e| GuestError::Device(bdf, e))?);
            match crate::iommu::unit_for(bdf) {
                Some(unit) if !crate::iommu::remaps_interrupts(unit) => {
                    if !unsafe_interrupts {
                        return Err(GuestError::NoInterruptRemapping(bdf));
                    }
                    log::warn!(
                        "guest {}: RISK: device {bdf} assigned although its IOMMU unit does not remap interrupts (unsafe-interrupts): it can raise any interrupt on the host",
                        config.name
                    );
                }
                Some(_) => {}
                // No IOMMU: only passthrough can work (nothing translates IOVAs), and only
                // with the command line's consent: nothing confines the device at all.
                None => {
                    if config.policy != moat_config::DmaPolicy::Passthrough {
                        return Err(GuestError::Dma(crate::dma::SetupError::NoIommu(
                            bdf,
                            crate::dma::to_policy(config.policy),
                        )));
                    }
                    if !unsafe_interrupts {
                        return Err(GuestError::NoIommu(bdf));
                    }
                    log::warn!(
                        "guest {}: RISK: device {bdf} assigned with no IOMMU (unsafe-interrupts, policy passthrough): it can write any host memory and raise any interrupt on the host",
                        config.name
                    );
                }
            }
        }

        // MSI-X is offered (its table emulated) only behind a unit that remaps interrupts;
        // otherwise its capability stays hidden and the device's MSI-X off.
        for d in devices.iter_mut() {
            if !crate::iommu::unit_for(d.bdf).is_some_and(crate::iommu::remaps_interrupts) {
                d.msix = None;
            }
        }

        let hpa = frames::alloc_contiguous(mem / PAGE_SIZE, PARTITION_ALIGN)
            .ok_or(GuestError::NoMemory)?;
        // SAFETY: the frames were just allocated for this partition alone and are identity
        // mapped RW; zeroing them keeps hypervisor data from leaking into the guest.
        unsafe { core::ptr::write_bytes(hpa.as_u64() as *mut u8, 0, mem as usize) };
        let built = Self::populate(backend, config, &elf, devices, cmdline, ecams, hpa.as_u64());
        if built.is_err() {
            frames::free_contiguous(hpa, mem / PAGE_SIZE);
        }
        built
    }

    /// Second half of [`Guest::create`]: everything after the partition at `hpa` exists.
    fn populate(
        backend: &Backend,
        config: &GuestConfig,
        elf: &Image<'_>,
        devices: Vec<AssignedDevice>,
        cmdline: &str,
        ecams: Ecams,
        hpa: u64,
    ) -> Result<(&'static Guest, Vec<Vcpu>), GuestError> {
        let mem = config.mem;
        let vcpus = usize::from(config.cpus.max(1));
        let ids: Vec<(Bdf, u16, u16)> = devices
            .iter()
            .map(|d| {
                let h = moat_pci::Header::read(&ecams, d.bdf);
                (
                    d.bdf,
                    h.map_or(0, |h| h.vendor_id),
                    h.map_or(0, |h| h.device_id),
                )
            })
            .collect();
        let dma = crate::dma::GuestDma::create(config.policy, vcpus, &ids, hpa, mem)
            .map_err(GuestError::Dma)?;
        let mut space = backend.new_stage2()?;
        space.map(0, PhysAddr::new(hpa), mem, MemKind::Ram)?;
        for d in &devices {
            for bar in d.bars.iter().filter(|b| b.is_memory()) {
                if bar.address == 0 || bar.size < PAGE_SIZE || bar.address % PAGE_SIZE != 0 {
                    log::warn!(
                        "guest {}: {} BAR{} at {:#x} size {:#x} not mapped (unassigned or smaller than a page)",
                        config.name,
                        d.bdf,
                        bar.index,
                        bar.address,
                        bar.size
                    );
                    continue;
                }
                // The MSI-X table and PBA pages stay unmapped (emulated); the rest of the BAR
                // is mapped for speed.
                let end = bar.address + bar.size;
                let mut holes: Vec<_> = d
                    .msix
                    .and_then(|x| x.trapped(&d.bars))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|h| h.start >= bar.address && h.start < end)
                    .collect();
                holes.sort_by_key(|h| h.start);
                let mut at = bar.address;
                for h in holes.iter().map(|h| Some(*h)).chain([None]) {
                    let stop = h.map_or(end, |h| h.start);
                    space.map(at, PhysAddr::new(at), stop - at, MemKind::Mmio)?;
                    if let Some(h) = h {
                        log::info!(
                            "guest {}: {} BAR{} [{:#x}-{:#x}) left unmapped: MSI-X table/PBA, emulated",
                            config.name,
                            d.bdf,
                            bar.index,
                            h.start,
                            h.start + h.len
                        );
                        at = (h.start + h.len).min(end);
                    }
                }
                log::info!(
                    "guest {}: {} BAR{} [{:#x}-{:#x}) mapped at the same guest-physical address",
                    config.name,
                    d.bdf,
                    bar.index,
                    bar.address,
                    bar.address + bar.size
                );
            }
        }

        let write = |gpa: u64, bytes: &[u8]| {
            // SAFETY: every caller writes inside [0, mem) of the partition (checked above for
            // segments; fixed boot structures lie below LOAD_MIN), which this guest owns.
            unsafe {
                core::ptr::copy_nonoverlapping(bytes.as_ptr(), (hpa + gpa) as *mut u8, bytes.len())
            }
        };
        for s in elf.segments() {
            write(s.paddr, elf.data(&s));
        }
        // Boot page tables: PML4 -> PDPT -> 4 PDs of 2 MiB pages over the first 4 GiB.
        const P: u64 = 1;
        const RW: u64 = 2;
        const PS: u64 = 1 << 7;
        const PWT_PCD: u64 = 3 << 3;
        write(PML4_GPA, &((PML4_GPA + 0x1000) | P | RW).to_le_bytes());
        for g in 0..4u64 {
            let pd = PML4_GPA + 0x2000 + g * 0x1000;
            write(PML4_GPA + 0x1000 + g * 8, &(pd | P | RW).to_le_bytes());
            let mut table = [0u8; 4096];
            for (i, e) in table.chunks_exact_mut(8).enumerate() {
                let addr = (g << 30) + ((i as u64) << 21);
                let cache = if g == 3 { PWT_PCD } else { 0 };
                e.copy_from_slice(&(addr | P | RW | PS | cache).to_le_bytes());
            }
            write(pd, &table);
        }
        let gdt: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
        for (i, d) in gdt.iter().enumerate() {
            write(GDT_GPA + i as u64 * 8, &d.to_le_bytes());
        }
        let cmd = &cmdline.as_bytes()[..cmdline.len().min(CMDLINE_MAX)];
        write(CMDLINE_GPA, cmd);
        let mut name = [0u8; 16];
        let n = config.name.as_str().as_bytes();
        name[..n.len().min(16)].copy_from_slice(&n[..n.len().min(16)]);
        let info = BootInfo {
            magic: BOOT_MAGIC.into(),
            version: 1u32.into(),
            vcpus: (vcpus as u32).into(),
            mem_size: mem.into(),
            tsc_khz: crate::arch::tsc::khz().into(),
            cmdline_gpa: CMDLINE_GPA.into(),
            cmdline_len: (cmd.len() as u64).into(),
            name,
        };
        write(BOOT_INFO_GPA, moat_abi::IntoBytes::as_bytes(&info));

        let mut cpus = Vec::new();
        for i in 0..vcpus {
            let entry = EntryState {
                rip: elf.entry(),
                rsp: mem - STACK_SIZE * i as u64,
                cr3: PML4_GPA,
                gdt_base: GDT_GPA,
                gdt_limit: (gdt.len() * 8 - 1) as u16,
                code_selector: 0x08,
                data_selector: 0x10,
                rdi: BOOT_INFO_GPA,
                rsi: i as u64,
            };
            cpus.push(backend.new_vcpu(&space, &entry)?);
        }
        // Last: nothing after this can fail, so no IRTE or host vector is left behind.
        let mut msis = Vec::new();
        for d in &devices {
            let (Some(cap), Some(unit)) = (d.msi, crate::iommu::unit_for(d.bdf)) else {
                continue;
            };
            if !crate::iommu::remaps_interrupts(unit) {
                log::warn!(
                    "guest {}: {}: MSI not offered (its IOMMU unit does not remap interrupts)",
                    config.name,
                    d.bdf
                );
                continue;
            }
            match DeviceMsi::new(d.bdf, cap, unit) {
                Some(m) => {
                    log::info!(
                        "guest {}: {}: MSI virtualized (host vector {:#x}, IRTE {})",
                        config.name,
                        d.bdf,
                        m.host_vector(),
                        m.irte()
                    );
                    msis.push(m);
                }
                None => log::warn!(
                    "guest {}: {}: MSI not offered (no host vector or IRTE left)",
                    config.name,
                    d.bdf
                ),
            }
        }
        let mut msix = Vec::new();
        for d in &devices {
            let (Some(cap), Some(unit)) = (d.msix, crate::iommu::unit_for(d.bdf)) else {
                continue;
            };
            match DeviceMsix::new(config.name, d.bdf, cap, &d.bars, unit, ecams) {
                Some(x) => {
                    log::info!(
                        "guest {}: {}: MSI-X virtualized: {} entries ({} offered), table BAR{} +{:#x}, PBA BAR{} +{:#x}; table/PBA pages trapped",
                        config.name,
                        d.bdf,
                        cap.entries,
                        cap.guest_entries(),
                        cap.table.bir,
                        cap.table.offset,
                        cap.pba.bir,
                        cap.pba.offset
                    );
                    msix.push(x);
                }
                None => log::warn!(
                    "guest {}: {}: MSI-X table could not be taken over: its accesses stop the guest",
                    config.name,
                    d.bdf
                ),
            }
        }
        let bsp_apic = crate::arch::apic::id();
        let guest = alloc::boxed::Box::leak(alloc::boxed::Box::new(Guest {
            name: config.name,
            mem_hpa: hpa,
            mem_size: mem,
            vcpus,
            space,
            ecams,
            devices: Mutex::new(devices),
            cf8: AtomicU32::new(0),
            state: AtomicU8::new(STATE_RUNNING),
            running: AtomicUsize::new(vcpus),
            lines: (0..vcpus)
                .map(|_| {
                    Mutex::new(Line {
                        bytes: [0; LINE_MAX],
                        len: 0,
                    })
                })
                .collect(),
            outcome: Mutex::new(None),
            dma,
            virqs: (0..vcpus).map(|_| VirtualInterrupts::new()).collect(),
            vcpu_apic: (0..vcpus).map(|_| AtomicU32::new(bsp_apic)).collect(),
            msis,
            msix,
        }));
        if let Some(d) = &guest.dma {
            log::info!("guest {}: DMA: {}", guest.name, d.describe());
        }
        log::info!(
            "guest {}: {} MiB at host {:#x}, {} vCPU(s), entry {:#x}, {} device(s)",
            guest.name,
            mem >> 20,
            hpa,
            vcpus,
            elf.entry(),
            guest.devices.lock().len()
        );
        Ok((guest, cpus))
    }

    /// The guest's DMA service (guests with assigned devices).
    pub fn dma(&self) -> Option<&crate::dma::GuestDma> {
        self.dma.as_ref()
    }

    /// The guest's name.
    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    /// How the guest ended (the first vCPU stop that was not an exit, else the last exit).
    pub fn outcome(&self) -> Option<StopReason> {
        *self.outcome.lock()
    }

    /// Copies guest-physical `[gpa, gpa + buf.len())` of the guest's RAM into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), ()> {
        let end = gpa.checked_add(buf.len() as u64).ok_or(())?;
        if end > self.mem_size {
            return Err(());
        }
        debug_assert_eq!(
            self.space.translate(gpa),
            Some(PhysAddr::new(self.mem_hpa + gpa))
        );
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: inside the guest's partition (checked above), identity mapped in the
            // hypervisor; volatile because the guest's other vCPUs may be writing it.
            *b = unsafe { core::ptr::read_volatile((self.mem_hpa + gpa + i as u64) as *const u8) };
        }
        Ok(())
    }

    /// Console output of vCPU `index`: printed line by line as `name> text`.
    pub fn console(&self, index: usize, bytes: &[u8]) {
        let Some(line) = self.lines.get(index) else {
            return;
        };
        let mut l = line.lock();
        for &b in bytes {
            if b == b'\n' || l.len == l.bytes.len() {
                self.flush_line(&mut l);
                if b == b'\n' {
                    continue;
                }
            }
            let c = if b == b'\t' || (0x20..0x7f).contains(&b) {
                b
            } else {
                b'?'
            };
            let n = l.len;
            l.bytes[n] = c;
            l.len += 1;
        }
    }

    fn flush_line(&self, l: &mut Line) {
        let text = core::str::from_utf8(&l.bytes[..l.len]).unwrap_or("?");
        log::info!("{}> {}", self.name, text);
        l.len = 0;
    }

    fn stop(&self, index: usize, reason: StopReason) {
        if let Some(line) = self.lines.get(index) {
            let mut l = line.lock();
            if l.len > 0 {
                self.flush_line(&mut l);
            }
        }
        if reason.is_exit() || reason == StopReason::WithGuest {
            log::info!("guest {} vcpu{index}: {reason}", self.name);
        } else {
            log::error!("guest {} vcpu{index}: {reason}; guest stopped", self.name);
            self.state.store(STATE_STOPPED, Ordering::SeqCst);
        }
        {
            let mut o = self.outcome.lock();
            if !matches!(*o, Some(r) if !r.is_exit()) && reason != StopReason::WithGuest {
                *o = Some(reason);
            }
        }
        if self.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            log::info!(
                "guest {}: all {} vCPU(s) stopped ({})",
                self.name,
                self.vcpus,
                self.outcome().map_or(StopReason::WithGuest, |r| r)
            );
            for m in &self.msis {
                let (taken, storms) = m.counts();
                log::info!(
                    "guest {}: MSI host vector {:#x}: {taken} interrupt(s) taken, {storms} storm(s) masked",
                    self.name,
                    m.host_vector()
                );
                m.release(&self.ecams);
            }
            for x in &self.msix {
                let (taken, storms, routes) = x.counts();
                log::info!(
                    "guest {}: {}: MSI-X: {taken} interrupt(s) taken over {routes} host vector(s), {storms} storm(s) masked; IRTEs and host vectors freed",
                    self.name,
                    x.bdf()
                );
                x.release();
            }
            if let Some(d) = &self.dma {
                d.shutdown(self.name.as_str());
            }
        }
    }

    /// Runs vCPU `index` on the calling CPU until it stops. The hypervisor never panics on
    /// anything the guest does: every exit ends in a return to the guest or a logged stop.
    pub fn run_vcpu(&self, backend: &Backend, index: usize, mut vcpu: Vcpu) {
        if let Err(e) = backend.enable_this_cpu() {
            log::error!(
                "guest {} vcpu{index}: cannot enable virtualisation: {e}",
                self.name
            );
            self.stop(
                index,
                StopReason::Failed("virtualisation could not be enabled"),
            );
            return;
        }
        log::info!("guest {} vcpu{index}: running", self.name);
        if let Some(a) = self.vcpu_apic.get(index) {
            a.store(crate::arch::apic::id(), Ordering::Relaxed);
        }
        let mut vapic = VcpuApic::new(index, self.vcpus);
        let irqs = &self.virqs[index];
        let timer = self.dma.as_ref().is_some_and(|d| d.needs_timer());
        // The CPU's local APIC timer serves one of two: the deferred DMA policy's periodic
        // tick, which also bounds how late the guest's APIC timer is noticed (1 ms), or else
        // a one-shot at the guest's APIC timer deadline.
        let mut host_timer = HostTimer::new();
        if timer {
            crate::arch::apic::start_periodic_timer(
                crate::dma::TIMER_VECTOR,
                crate::dma::TIMER_PERIOD_US,
            );
        }
        let mut stats = ExitStats::default();
        let mut handled_since = None;
        // A DMA hypercall's exit/entry cycles: (VM exit -> handler without `tick`, handler
        // end) until the next VM entry.
        let mut dma_exit: Option<(u64, u64)> = None;
        let reason = loop {
            if self.state.load(Ordering::SeqCst) == STATE_STOPPED {
                break StopReason::WithGuest;
            }
            if let Some(t) = handled_since {
                stats.handler_cycles += crate::arch::x86::rdtsc().wrapping_sub(t);
            }
            let entered = crate::arch::x86::rdtsc();
            if let (Some((pre, done)), Some(d)) = (dma_exit.take(), &self.dma) {
                d.add_exit_cycles(index, pre + entered.wrapping_sub(done));
            }
            // FAULT_IRQ: the DMA service published a batch of fault records (on an exit of
            // any vCPU); raise the vector on the vCPU that registered the ring.
            if let Some((target, vector)) = self.dma.as_ref().and_then(|d| d.take_fault_irq())
                && let Some(t) = self.virqs.get(target)
            {
                t.raise(vector, crate::arch::x86::rdtsc());
            }
            self.update_apic(&mut vapic, irqs, &host_timer);
            vcpu.request_interrupt(vapic.offer());
            vcpu.set_guest_cr8(vapic.cr8());
            if !timer {
                host_timer.set(vapic.deadline());
            }
            let exit = vcpu.run();
            let exited = crate::arch::x86::rdtsc();
            vapic.after_exit(vcpu.requested_interrupt(), irqs);
            if let Some(cr8) = vcpu.guest_cr8()
                && cr8 != vapic.cr8()
            {
                let _ = vapic.set_cr8(cr8);
            }
            stats.count(&exit, exited.wrapping_sub(entered));
            handled_since = Some(exited);
            let rip = vcpu.reg(Reg::Rip);
            // `tick` (fault delivery, the deferred flush) is work of its own, measured in its
            // own phases (a deferred flush in the invalidation phase): kept out of the exit
            // phase, which is only the way from the VM exit to the handler and back.
            let mut tick_cycles = 0u64;
            if let Some(d) = &self.dma {
                let t = crate::arch::x86::rdtsc();
                d.tick(index);
                tick_cycles = crate::arch::x86::rdtsc().wrapping_sub(t);
            }
            match exit {
                Exit::Hypercall => {
                    let is_dma = vcpu.reg(Reg::Rax) >= moat_abi::Call::DmaQuery.number();
                    let t0 = crate::arch::x86::rdtsc();
                    let outcome = hypercall::dispatch(self, index, &mut vcpu);
                    if is_dma {
                        let pre = t0.wrapping_sub(exited).saturating_sub(tick_cycles);
                        dma_exit = Some((pre, crate::arch::x86::rdtsc()));
                    }
                    match outcome {
                        Outcome::Return => {
                            vcpu.complete_instruction();
                        }
                        Outcome::Stop(r) => break r,
                    }
                }
                Exit::Cpuid => {
                    hypercall::cpuid(self, index, &mut vcpu);
                    vcpu.complete_instruction();
                }
                Exit::Msr { write } => self.msr(&mut vcpu, write, index, &mut vapic),
                Exit::Cr8 { write, gpr } => {
                    let r = Reg::from_gpr(gpr);
                    let done = if write {
                        vapic.set_cr8(vcpu.reg(r)).is_ok()
                    } else {
                        vcpu.set_reg(r, vapic.cr8());
                        true
                    };
                    if done {
                        vcpu.complete_instruction();
                    } else {
                        vcpu.inject(Event::Exception {
                            vector: 13,
                            error: Some(0),
                        });
                    }
                }
                Exit::Io(a) => {
                    if a.string {
                        break StopReason::Unsupported {
                            what: "string port I/O (INS/OUTS)",
                            code: vcpu.raw_exit().0,
                            rip,
                        };
                    }
                    self.io(&mut vcpu, a);
                    vcpu.complete_instruction();
                }
                Exit::Halt => {
                    vcpu.complete_instruction();
                    // HLT with interrupts enabled and an interrupt source waits for one;
                    // with interrupts off (or nothing that could wake it) it ends the vCPU.
                    // What was raised for it meanwhile (by a vCPU that has stopped since,
                    // say) is in its IRR first.
                    self.update_apic(&mut vapic, irqs, &host_timer);
                    if !(vcpu.interrupts_enabled()
                        && (self.can_be_woken() || vapic.has_work() || vapic.deadline().is_some()))
                    {
                        break StopReason::Halted {
                            rip: vcpu.reg(Reg::Rip),
                        };
                    }
                    self.wait_for_interrupt(&mut vapic, irqs, &host_timer);
                }
                Exit::NestedPageFault { gpa, access } => {
                    match self.emulate_mmio(&mut vcpu, gpa, access) {
                        Some(Ok(())) => {}
                        Some(Err(why)) => break StopReason::MmioRefused { gpa, rip, why },
                        None => break StopReason::NestedPageFault { gpa, access, rip },
                    }
                }
                Exit::TripleFault => break StopReason::TripleFault { rip },
                Exit::Exception { vector, .. } => break StopReason::Exception { vector, rip },
                // A physical interrupt (e.g. the VT-d fault event) is pending: take it now,
                // with interrupts briefly on, then go back to the guest.
                Exit::Interrupted => crate::arch::x86::take_pending_interrupts(),
                Exit::InvalidState => break StopReason::InvalidState,
                Exit::Unsupported { what, code } => {
                    break StopReason::Unsupported { what, code, rip }
                }
                Exit::Failed(why) => break StopReason::Failed(why),
            }
        };
        if timer {
            crate::arch::apic::stop_timer();
        }
        host_timer.stop();
        let c = vapic.counts();
        if irqs.raised() != 0 || c.delivered != 0 {
            log::info!(
                "guest {} vcpu{index}: interrupts: {} raised, {} delivered, {} EOI(s); APIC timer {} expiries ({} merged), {} self-IPI(s), {} dropped; IPIs: {} sent, {} ignored",
                self.name,
                irqs.raised(),
                c.delivered,
                c.eois,
                c.timer_expiries,
                c.timer_merged,
                c.self_ipis,
                c.dropped,
                c.ipis_sent,
                c.ipis_ignored
            );
        }
        log::info!("guest {} vcpu{index}: {stats}", self.name);
        self.stop(index, reason);
    }

    /// Brings the vCPU's APIC up to now; an APIC timer expiry is stamped with the host
    /// timer interrupt that announced it when there was one (else with now), for the
    /// delivery cost the guest can read.
    fn update_apic(&self, vapic: &mut VcpuApic, irqs: &VirtualInterrupts, host: &HostTimer) {
        let now = crate::arch::x86::rdtsc();
        let deadline = vapic.deadline();
        if vapic.update(irqs, now) {
            let fired = host.last_fired();
            let at = match deadline {
                Some(d) if fired >= d && fired <= now => fired,
                _ => now,
            };
            irqs.stamp(at);
        }
    }

    /// Whether something other than the vCPU's own APIC can raise an interrupt for it: an
    /// assigned device's MSI / MSI-X, or another vCPU still running (an IPI).
    fn can_be_woken(&self) -> bool {
        !self.msis.is_empty() || !self.msix.is_empty() || self.running.load(Ordering::SeqCst) > 1
    }

    /// A halted vCPU (interrupts on) waits until an interrupt can be delivered to it (raised
    /// by a device or another vCPU, or its APIC timer expired) or the guest stops; the
    /// physical CPU takes its interrupts meanwhile (the device's MSI for this vCPU is sent to
    /// this CPU). When nothing is left that could wake it (the other vCPUs stopped, no
    /// device, no timer) the wait ends and the guest goes on after its HLT.
    fn wait_for_interrupt(&self, vapic: &mut VcpuApic, irqs: &VirtualInterrupts, host: &HostTimer) {
        loop {
            self.update_apic(vapic, irqs, host);
            if vapic.has_work()
                || self.state.load(Ordering::SeqCst) == STATE_STOPPED
                || !(self.can_be_woken() || vapic.deadline().is_some())
            {
                break;
            }
            crate::arch::x86::take_pending_interrupts();
            crate::arch::x86::pause();
        }
    }

    fn msr(&self, vcpu: &mut Vcpu, write: bool, index: usize, vapic: &mut VcpuApic) {
        const EFER: u64 = 0xc000_0080;
        const TSC: u64 = 0x10;
        const SVME: u64 = 1 << 12;
        let msr = vcpu.reg(Reg::Rcx) as u32 as u64;
        // WRMSR takes EDX:EAX; the upper halves of RDX and RAX are ignored.
        let written = write
            .then(|| (vcpu.reg(Reg::Rdx) & 0xffff_ffff) << 32 | (vcpu.reg(Reg::Rax) & 0xffff_ffff));
        let now = crate::arch::x86::rdtsc();
        let ignored = vapic.counts().ipis_ignored;
        let value = match vapic.msr(msr as u32, written, &self.virqs[index], now) {
            Some(r) => {
                self.send_ipi(vapic, index, written, ignored, now);
                r.ok()
            }
            None => match (write, msr) {
                (false, EFER) => Some(vcpu.reg(Reg::Efer) & !SVME),
                (false, TSC) => Some(now),
                _ => None,
            },
        };
        match value {
            Some(v) => {
                if !write {
                    vcpu.set_reg(Reg::Rax, v & 0xffff_ffff);
                    vcpu.set_reg(Reg::Rdx, v >> 32);
                }
                vcpu.complete_instruction();
            }
            None => {
                log::debug!(
                    "guest {}: {} of MSR {msr:#x}: #GP injected",
                    self.name,
                    if write { "WRMSR" } else { "RDMSR" }
                );
                vcpu.inject(Event::Exception {
                    vector: 13,
                    error: Some(0),
                });
            }
        }
    }

    /// After an APIC MSR access of vCPU `index`: raises the IPI its ICR write sent on the
    /// other vCPUs named (which wakes a halted one) and kicks their CPUs with a host
    /// interrupt ([`super::virq::KICK_VECTOR`]) so that one running guest code exits and
    /// takes it; an ICR write the APIC ignored (`ignored`: its count before) is logged,
    /// rate-limited.
    fn send_ipi(
        &self,
        vapic: &mut VcpuApic,
        index: usize,
        written: Option<u64>,
        ignored: u64,
        now: u64,
    ) {
        if let Some(ipi) = vapic.take_ipi() {
            for t in ipi.targets() {
                if let Some(v) = self.virqs.get(t as usize) {
                    v.raise(ipi.vector, now);
                    let cpu = self.apic_of(t as usize);
                    if cpu != crate::arch::apic::id() {
                        crate::arch::apic::send_fixed(cpu, super::virq::KICK_VECTOR);
                    }
                }
            }
        }
        if vapic.counts().ipis_ignored != ignored
            && let crate::ratelimit::Verdict::Log { nth, suppressed } = IPI_IGNORED_LOG.event()
        {
            log::warn!(
                "guest {} vcpu{index}: ICR {:#x} ignored (a delivery mode other than fixed, or no vCPU of the guest named) (#{nth}, {suppressed} not logged)",
                self.name,
                written.unwrap_or(0)
            );
        }
    }

    fn io(&self, vcpu: &mut Vcpu, a: IoAccess) {
        let size_mask: u32 = match a.size {
            1 => 0xff,
            2 => 0xffff,
            _ => u32::MAX,
        };
        let rax = vcpu.reg(Reg::Rax);
        let value = if a.write {
            self.port_write(a.port, a.size, rax as u32 & size_mask);
            return;
        } else {
            self.port_read(a.port, a.size) & size_mask
        };
        let new = if a.size == 4 {
            u64::from(value)
        } else {
            (rax & !u64::from(size_mask)) | u64::from(value)
        };
        vcpu.set_reg(Reg::Rax, new);
    }

    fn port_read(&self, port: u16, size: u8) -> u32 {
        pci::port_read(&self.ecams, &self.devices, &self.cf8, port, size).unwrap_or(u32::MAX)
    }

    fn port_write(&self, port: u16, size: u8, value: u32) {
        match pci::port_write(&self.ecams, &self.devices, &self.cf8, port, size, value) {
            pci::PortWrite::NotConfig => log::debug!(
                "guest {}: write {value:#x} to port {port:#x} ignored",
                self.name
            ),
            pci::PortWrite::Done => {}
            pci::PortWrite::Msi(u) => self.program_msi(&u),
            pci::PortWrite::Msix(u) => {
                if let Some(x) = self.msix.iter().find(|x| x.bdf() == u.bdf) {
                    let apic_of = |v: usize| self.apic_of(v);
                    x.set_control(
                        u.control,
                        &msix::Targets {
                            virqs: &self.virqs,
                            apic_of: &apic_of,
                        },
                    );
                }
            }
        }
    }

    /// The APIC id of the CPU running vCPU `v`.
    fn apic_of(&self, v: usize) -> u32 {
        self.vcpu_apic
            .get(v)
            .map_or(0, |a| a.load(Ordering::Relaxed))
    }

    /// A nested page fault at `gpa`: if it lies in a trapped MSI-X page, decodes the
    /// instruction at RIP (from the hardware's bytes or through the guest's page tables),
    /// emulates it against the device's virtual table and moves RIP past it. `None` when
    /// `gpa` is not trapped (a real fault).
    fn emulate_mmio(
        &self,
        vcpu: &mut Vcpu,
        gpa: u64,
        access: Access,
    ) -> Option<Result<(), MmioError>> {
        use moat_x86arch::insn::{self, MmioOp, Source};
        let dev = self.msix.iter().find(|x| x.contains(gpa))?;
        let mut buf = [0u8; insn::MAX_LEN];
        let n = match vcpu.instruction_bytes() {
            Some(b) => {
                buf[..b.len()].copy_from_slice(b);
                b.len()
            }
            None => match self.fetch_instruction(vcpu, &mut buf) {
                Ok(n) => n,
                Err(e) => return Some(Err(e)),
            },
        };
        let d = match insn::decode(&buf[..n]) {
            Ok(d) => d,
            Err(e) => return Some(Err(MmioError::Decode(e))),
        };
        let apic_of = |v: usize| self.apic_of(v);
        let t = msix::Targets {
            virqs: &self.virqs,
            apic_of: &apic_of,
        };
        let operand = |vcpu: &Vcpu, src: Source, size: u8| match src {
            Source::Reg(g) => g.read(vcpu.reg(Reg::from_gpr(g.index)), size),
            Source::Imm(v) => v & insn::mask(size),
        };
        // An ignored read returns all ones.
        let load = |size: u8| match dev.access(gpa, size, None, &t) {
            msix::Access::Read(v) => v & insn::mask(size),
            _ => insn::mask(size),
        };
        if matches!(d.op, MmioOp::Store { .. }) != access.write {
            return Some(Err(MmioError::Direction));
        }
        match d.op {
            MmioOp::Store { size, src } => {
                let value = operand(vcpu, src, size);
                dev.access(gpa, size, Some(value), &t);
            }
            MmioOp::Load {
                size,
                dst,
                dst_size,
            } => {
                let value = load(size);
                let r = Reg::from_gpr(dst.index);
                let new = dst.merge(vcpu.reg(r), value, dst_size);
                vcpu.set_reg(r, new);
            }
            // A volatile load the compiler folded into an ALU operation on a register.
            MmioOp::Alu { size, op, dst } => {
                let r = Reg::from_gpr(dst.index);
                let carry = vcpu.reg(Reg::Rflags) & 1 != 0;
                let (value, flags) =
                    insn::alu(op, dst.read(vcpu.reg(r), size), load(size), carry, size);
                let new = dst.merge(vcpu.reg(r), value, size);
                vcpu.set_reg(r, new);
                let rflags = vcpu.reg(Reg::Rflags) & !insn::ARITH_FLAGS | flags;
                vcpu.set_reg(Reg::Rflags, rflags);
            }
            // A volatile load the compiler folded into CMP/TEST: only RFLAGS changes.
            MmioOp::Compare {
                size,
                src,
                mem_left,
                test,
            } => {
                let (mem, other) = (load(size), operand(vcpu, src, size));
                let (a, b) = if mem_left { (mem, other) } else { (other, mem) };
                let flags = insn::compare_flags(a, b, size, test);
                let rflags = vcpu.reg(Reg::Rflags) & !insn::ARITH_FLAGS | flags;
                vcpu.set_reg(Reg::Rflags, rflags);
            }
        }
        let rip = vcpu.reg(Reg::Rip);
        vcpu.set_reg(Reg::Rip, rip.wrapping_add(u64::from(d.len)));
        Some(Ok(()))
    }

    /// Reads the instruction bytes at RIP through the guest's own page tables (64-bit mode
    /// with paging only), every table and byte checked against the partition.
    fn fetch_instruction(
        &self,
        vcpu: &Vcpu,
        buf: &mut [u8; moat_x86arch::insn::MAX_LEN],
    ) -> Result<usize, MmioError> {
        const CR0_PG: u64 = 1 << 31;
        const EFER_LMA: u64 = 1 << 10;
        const CR4_LA57: u64 = 1 << 12;
        if vcpu.reg(Reg::Cr0) & CR0_PG == 0
            || vcpu.reg(Reg::Efer) & EFER_LMA == 0
            || vcpu.reg(Reg::Cr4) & CR4_LA57 != 0
        {
            return Err(MmioError::NotLongMode);
        }
        let mut qword = |gpa: u64| {
            let mut b = [0u8; 8];
            self.read(gpa, &mut b).ok().map(|_| u64::from_le_bytes(b))
        };
        let mut byte = |gpa: u64| {
            let mut b = [0u8; 1];
            self.read(gpa, &mut b).ok().map(|_| b[0])
        };
        moat_x86arch::walk::fetch(
            vcpu.reg(Reg::Cr3),
            vcpu.reg(Reg::Rip),
            buf,
            &mut qword,
            &mut byte,
        )
        .map_err(MmioError::Fetch)
    }

    /// The guest changed its virtual MSI capability: route it (or turn the device's MSI off).
    fn program_msi(&self, u: &moat_pci::MsiUpdate) {
        let Some(m) = self.msis.iter().find(|m| m.bdf() == u.bdf) else {
            log::debug!(
                "guest {}: {}: MSI programming ignored (MSI not offered)",
                self.name,
                u.bdf
            );
            return;
        };
        let apic_of = |v: usize| self.apic_of(v);
        let result = m.program(&self.ecams, u, &self.virqs, &apic_of);
        // The guest can reprogram its MSI at will: its log lines are rate-limited.
        let crate::ratelimit::Verdict::Log { suppressed, .. } = MSI_LOG.event() else {
            return;
        };
        if suppressed != 0 {
            log::info!(
                "guest {}: {suppressed} MSI programming line(s) not logged",
                self.name
            );
        }
        match result {
            Ok(Some((vcpu, vector))) => log::info!(
                "guest {}: {}: MSI vector {vector:#x} -> vcpu{vcpu} (host vector {:#x} on APIC {}, IRTE {})",
                self.name,
                u.bdf,
                m.host_vector(),
                apic_of(vcpu),
                m.irte()
            ),
            Ok(None) => log::info!("guest {}: {}: MSI off", self.name, u.bdf),
            Err(e) => log::warn!(
                "guest {}: {}: MSI address {:#x} data {:#x} refused ({e:?}): the device's MSI stays off",
                self.name,
                u.bdf,
                u.state.address,
                u.state.data
            ),
        }
    }
}
