//! Virtual machines: guests loaded from multiboot2 modules, run on hardware virtualisation
//! behind a backend-neutral vCPU layer, one vCPU per physical CPU.
//!
//! * [`vcpu`]: the boundary the rest of the hypervisor uses ([`vcpu::Backend`],
//!   [`vcpu::Stage2`], [`vcpu::Vcpu`], [`vcpu::Exit`]); [`svm`] (AMD) and [`vmx`] (Intel) are
//!   the backends behind it.
//! * [`guest`]: partition, ELF loading, boot page tables, the exit loop.
//! * [`hypercall`]: VMMCALL dispatch and the hypervisor CPUID leaves.
//! * [`pci`]: the guests' filtered view of PCI configuration space.
//!
//! The BSP calls [`run`] at the end of boot: it builds every configured guest, hands each vCPU
//! to a physical CPU through that CPU's mailbox (APs wait in [`ap_wait`], polling with `pause`:
//! there are no interrupts yet), runs its own vCPU if it has one, and returns once every guest
//! has stopped. See `README.md` next to this file.

pub mod guest;
pub mod hypercall;
pub mod msi;
pub mod msix;
pub mod pci;
pub mod route;
pub mod svm;
pub mod vcpu;
pub mod virq;
pub mod vmx;

use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use moat_boot::BootInfo;
use moat_config::Config;
use spin::{Mutex, Once};

use crate::acpi::Platform;
use crate::arch::{cpu, x86};
use guest::Guest;
use vcpu::{Backend, Vcpu};

/// A vCPU handed to a physical CPU.
struct Job {
    guest: &'static Guest,
    index: usize,
    vcpu: Vcpu,
}

const IDLE: u8 = 0;
const POSTED: u8 = 1;
const RUNNING: u8 = 2;
const DONE: u8 = 3;

/// One CPU's mailbox: the BSP posts a job, the CPU takes it, runs it, and reports done.
struct Mailbox {
    state: AtomicU8,
    job: Mutex<Option<Job>>,
}

static MAILBOXES: [Mailbox; cpu::MAX_CPUS] = [const {
    Mailbox {
        state: AtomicU8::new(IDLE),
        job: Mutex::new(None),
    }
}; cpu::MAX_CPUS];

/// Set when no more vCPUs will be handed out: waiting APs halt.
static NO_MORE_WORK: AtomicBool = AtomicBool::new(false);
static BACKEND: Once<Backend> = Once::new();

/// Where an AP goes after it reported in: waits for a vCPU to run, runs it, waits again; halts
/// once the BSP says there is no more work.
pub fn ap_wait(index: usize) -> ! {
    let Some(mb) = MAILBOXES.get(index) else {
        x86::halt_forever()
    };
    loop {
        if mb.state.load(Ordering::Acquire) == POSTED {
            let job = mb.job.lock().take();
            mb.state.store(RUNNING, Ordering::Release);
            if let (Some(job), Some(backend)) = (job, BACKEND.get()) {
                job.guest.run_vcpu(backend, job.index, job.vcpu);
            }
            mb.state.store(DONE, Ordering::Release);
            continue;
        }
        // A job posted before the flag was raised is seen by the state load after it.
        if NO_MORE_WORK.load(Ordering::Acquire) && mb.state.load(Ordering::Acquire) != POSTED {
            x86::halt_forever()
        }
        x86::pause();
    }
}

/// The hypercall instruction of this machine's backend, as CPUID `0x4000_0001` ECX reports
/// it (1 VMMCALL, 2 VMCALL).
pub fn hypercall_instruction() -> moat_abi::Instruction {
    BACKEND.get().map_or(moat_abi::Instruction::Vmmcall, |b| {
        b.hypercall_instruction()
    })
}

fn release_aps() {
    NO_MORE_WORK.store(true, Ordering::Release);
}

/// Builds and runs every guest the command line configures; returns when all have stopped.
pub fn run(boot: &BootInfo, config: &Config, platform: &Platform) {
    let configs = config.guests();
    if configs.is_empty() {
        if !boot.modules().is_empty() {
            log::warn!(
                "vm: {} boot module(s) but no guest= configuration: nothing to run",
                boot.modules().len()
            );
        }
        release_aps();
        return;
    }
    let backend = match Backend::detect() {
        Ok(b) => *BACKEND.call_once(|| b),
        Err(e) => {
            log::error!("vm: cannot run guests: {e}");
            release_aps();
            return;
        }
    };
    log::info!("vm: {backend}");
    // SAFETY: the MCFG's windows, mapped by `report_pci` during discovery.
    let ecams = unsafe { pci::Ecams::new(Vec::leak(platform.ecam().to_vec())) };
    let online = cpu::online_count();
    for m in boot.modules() {
        let name = m.cmdline.split_ascii_whitespace().next().unwrap_or("");
        if !configs.iter().any(|c| c.name.as_str() == name) {
            log::warn!(
                "vm: boot module {:?} names no configured guest: ignored",
                m.cmdline
            );
        }
    }

    let mut next_cpu = 0usize;
    let mut jobs: Vec<(usize, Job)> = Vec::new();
    let mut guests: Vec<&'static Guest> = Vec::new();
    for c in configs {
        let Some(module) = boot
            .modules()
            .iter()
            .find(|m| m.cmdline.split_ascii_whitespace().next() == Some(c.name.as_str()))
        else {
            log::error!(
                "guest {}: no boot module whose command line starts with `{}`: not started",
                c.name,
                c.name
            );
            continue;
        };
        let cpus = usize::from(c.cpus.max(1));
        if next_cpu + cpus > online {
            log::error!(
                "guest {}: needs {cpus} CPU(s), {} of {online} left (one vCPU per physical CPU): not started",
                c.name,
                online - next_cpu
            );
            continue;
        }
        let cmdline = module.cmdline.trim_start();
        let args = cmdline
            .split_once(|ch: char| ch.is_ascii_whitespace())
            .map_or("", |(_, rest)| rest.trim());
        // SAFETY: GRUB loaded the module at [start, end); its frames are reserved from the
        // frame allocator at boot and never written; RAM is identity mapped.
        let image = unsafe {
            core::slice::from_raw_parts(
                module.start as *const u8,
                module.end.saturating_sub(module.start) as usize,
            )
        };
        match Guest::create(&backend, c, image, args, ecams, config.unsafe_interrupts) {
            Ok((g, vcpus)) => {
                guests.push(g);
                for (i, v) in vcpus.into_iter().enumerate() {
                    jobs.push((
                        next_cpu + i,
                        Job {
                            guest: g,
                            index: i,
                            vcpu: v,
                        },
                    ));
                }
                next_cpu += cpus;
            }
            Err(e) => log::error!("guest {}: not started: {e}", c.name),
        }
    }

    let mut own = None;
    let mut posted = Vec::new();
    for (cpu_index, job) in jobs {
        if cpu_index == 0 {
            own = Some(job);
            continue;
        }
        let mb = &MAILBOXES[cpu_index];
        *mb.job.lock() = Some(job);
        mb.state.store(POSTED, Ordering::Release);
        posted.push(cpu_index);
    }
    release_aps();
    if let Some(job) = own {
        job.guest.run_vcpu(&backend, job.index, job.vcpu);
    }
    for &c in &posted {
        while MAILBOXES[c].state.load(Ordering::Acquire) != DONE {
            x86::pause();
        }
        MAILBOXES[c].state.store(IDLE, Ordering::Release);
    }
    log::info!(
        "vm: all guests stopped ({} started of {} configured)",
        guests.len(),
        configs.len()
    );
    // DMA the stopped guests' devices still had in flight: blocked (they were detached at
    // stop); report what the IOMMU recorded.
    for g in &guests {
        if let Some(d) = g.dma() {
            d.report_faults_after_stop(g.name());
        }
    }
    for g in guests {
        match g.outcome() {
            Some(r) => log::info!("vm: guest {}: {r}", g.name()),
            None => log::info!("vm: guest {}: no vCPU ran", g.name()),
        }
    }
    crate::arch::idt::report_unowned();
    log::info!(
        "interrupts: after every guest stopped: {} device host vector(s) and {} IRTE(s) in use",
        route::host_vectors_in_use(),
        crate::iommu::irtes_in_use()
    );
    log::info!(
        "interrupts: VT-d fault event interrupts taken: {}",
        crate::iommu::fault_path_stats().interrupts
    );
}
