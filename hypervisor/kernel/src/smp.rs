//! Bringing up the application processors: INIT-SIPI-SIPI to each CPU the MADT lists, one at a
//! time, each on its own stack; every AP sets up its own GDT/TSS/IDT/GS base and local APIC and
//! reports in.

use core::sync::atomic::{AtomicUsize, Ordering};

use crate::acpi::Platform;
use crate::arch::{apic, cpu, tsc};
use crate::mm::{frames, PAGE_SIZE};

/// Pages per AP stack.
const AP_STACK_PAGES: u64 = 16;

static STARTED: AtomicUsize = AtomicUsize::new(0);

/// Result of [`start_aps`].
#[derive(Debug, Clone, Copy)]
pub struct SmpReport {
    /// CPUs online, BSP included.
    pub online: usize,
    /// CPUs the hypervisor tried to use (MADT count capped by `smp=`).
    pub wanted: usize,
    /// CPUs the MADT lists.
    pub listed: usize,
}

/// Starts every AP listed in `platform` (at most `limit` CPUs in all) through the trampoline
/// page at `trampoline` (already installed).
pub fn start_aps(platform: &Platform, limit: Option<u16>, trampoline: u64) -> SmpReport {
    let bsp = apic::id();
    let listed = platform.cpus().len().max(1);
    let wanted = limit
        .map_or(listed, |l| (l as usize).clamp(1, listed))
        .min(cpu::MAX_CPUS);
    let vector = moat_boot::ap::sipi_vector(trampoline);
    let mut index = 1;
    for c in platform.cpus().iter().filter(|c| c.apic_id != bsp) {
        if index >= wanted {
            break;
        }
        let Some(stack) = frames::alloc_contiguous(AP_STACK_PAGES, PAGE_SIZE) else {
            log::error!("no memory for the stack of cpu{index}: not started");
            break;
        };
        moat_boot::ap::publish(index as u64, (stack + AP_STACK_PAGES * PAGE_SIZE).as_u64());
        let before = STARTED.load(Ordering::SeqCst);
        let ok = apic::send_init(c.apic_id) && {
            tsc::delay_us(10_000);
            apic::send_startup(c.apic_id, vector)
        };
        let mut up = ok && wait_started(before, 2_000);
        if ok && !up {
            apic::send_startup(c.apic_id, vector);
            up = wait_started(before, 2_000_000);
        }
        if up {
            index += 1;
        } else {
            // The AP may still start later and would then run on this stack: keep it.
            log::error!(
                "cpu with APIC id {} did not start (IPI ok: {ok})",
                c.apic_id
            );
        }
    }
    SmpReport {
        online: cpu::online_count(),
        wanted,
        listed,
    }
}

fn wait_started(before: usize, us: u64) -> bool {
    let d = tsc::deadline_us(us);
    while STARTED.load(Ordering::SeqCst) == before {
        if tsc::expired(d) {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// Rust entry of every AP (called from `moat_ap_entry64` on its own stack).
pub fn ap_main(index: usize) -> ! {
    let apic_id = crate::arch::x86::initial_apic_id();
    cpu::init_this_cpu(index, apic_id);
    apic::init_this_cpu();
    log::info!("cpu{index} online (APIC id {})", apic::id());
    STARTED.fetch_add(1, Ordering::SeqCst);
    crate::vm::ap_wait(index)
}
