//! The local APIC: enable, id, EOI, timer and the INIT / start-up IPIs used to bring up
//! application processors. In xAPIC mode through MMIO at the address in `IA32_APIC_BASE`; in
//! x2APIC mode (the firmware handed over with `IA32_APIC_BASE.EXTD` set, as real machines with
//! many CPUs or interrupt remapping do) through the MSRs `0x800 + offset / 16`, where the
//! MMIO page no longer answers.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{tsc, x86};
use crate::mm::mmio::Mmio;
use crate::mm::PhysAddr;

const REG_ID: usize = 0x20;
const REG_EOI: usize = 0xB0;
const REG_SVR: usize = 0xF0;
const REG_ICR_LO: usize = 0x300;
const REG_LVT_TIMER: usize = 0x320;
const REG_TIMER_INIT: usize = 0x380;
const REG_TIMER_CURRENT: usize = 0x390;
const REG_TIMER_DIVIDE: usize = 0x3E0;
const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
/// Divide configuration 0b0011: divide the bus clock by 16.
const DIVIDE_BY_16: u32 = 0x3;
const REG_ICR_HI: usize = 0x310;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;

static BASE: AtomicU64 = AtomicU64::new(0xFEE0_0000);
/// Set when the BSP found its APIC in x2APIC mode: every CPU then runs in x2APIC mode.
static X2APIC: AtomicBool = AtomicBool::new(false);

/// `IA32_APIC_BASE` bits: x2APIC mode enable (EXTD) and global enable (EN).
const APIC_BASE_EXTD: u64 = 1 << 10;
const APIC_BASE_EN: u64 = 1 << 11;
/// First x2APIC MSR: register at xAPIC offset `o` is MSR `X2APIC_MSR_BASE + o / 16`.
const X2APIC_MSR_BASE: u32 = 0x800;
/// The x2APIC ICR: one 64-bit MSR, destination in bits 63:32.
const X2APIC_ICR: u32 = 0x830;

/// Whether the local APICs run in x2APIC mode.
pub fn x2apic() -> bool {
    X2APIC.load(Ordering::Relaxed)
}

/// The MSR of the x2APIC register at xAPIC offset `reg`.
const fn x2apic_msr(reg: usize) -> u32 {
    X2APIC_MSR_BASE + (reg >> 4) as u32
}

/// The xAPIC MMIO base from `IA32_APIC_BASE`.
pub fn base() -> u64 {
    BASE.load(Ordering::Relaxed)
}

/// This CPU's local APIC register page.
fn regs() -> Mmio {
    // SAFETY: the page at IA32_APIC_BASE is the local APIC's MMIO (identity mapped uncached:
    // by the boot map, then by platform setup), it only affects this CPU's APIC, and only
    // this module drives the APIC.
    unsafe { Mmio::new(PhysAddr::new(base()), 0x1000) }
}

fn read(reg: usize) -> u32 {
    if x2apic() {
        // SAFETY: in x2APIC mode the APIC registers are these MSRs; only this module drives
        // the APIC and only readable registers are read.
        unsafe { x86::rdmsr(x2apic_msr(reg)) as u32 }
    } else {
        regs().read32(reg)
    }
}

fn write(reg: usize, v: u32) {
    if x2apic() {
        // SAFETY: as in `read`; only writable registers are written.
        unsafe { x86::wrmsr(x2apic_msr(reg), u64::from(v)) }
    } else {
        regs().write32(reg, v)
    }
}

/// Enables this CPU's local APIC (spurious vector 0xFF). The BSP (first caller) keeps the
/// mode the firmware handed over: x2APIC if `IA32_APIC_BASE.EXTD` is set, else xAPIC; every
/// AP is put in the BSP's mode.
pub fn init_this_cpu() {
    // SAFETY: IA32_APIC_BASE exists on every x86_64 CPU with an APIC; setting the global
    // enable bit keeps the base unchanged.
    let msr = unsafe { x86::rdmsr(x86::msr::APIC_BASE) };
    BASE.store(msr & 0x000F_FFFF_FFFF_F000, Ordering::Relaxed);
    static DECIDED: AtomicBool = AtomicBool::new(false);
    if !DECIDED.swap(true, Ordering::SeqCst) {
        X2APIC.store(msr & APIC_BASE_EXTD != 0, Ordering::SeqCst);
    }
    let mut want = msr | APIC_BASE_EN;
    if x2apic() {
        // xAPIC -> x2APIC is a legal transition from the enabled state (EN first).
        // SAFETY: as above.
        unsafe { x86::wrmsr(x86::msr::APIC_BASE, want) };
        want |= APIC_BASE_EXTD;
    }
    // SAFETY: as above; EXTD is only set when the BSP runs in x2APIC mode, which implies
    // the CPU model supports it.
    unsafe { x86::wrmsr(x86::msr::APIC_BASE, want) };
    write(REG_SVR, (1 << 8) | super::idt::SPURIOUS_VECTOR as u32);
}

/// Puts this CPU's APIC in x2APIC mode the way firmware does before it hands over (for the
/// `selftest=x2apic` scenario; call before [`init_this_cpu`]). Returns false when the CPU has
/// no x2APIC (CPUID.1:ECX bit 21).
pub fn enter_x2apic_as_firmware() -> bool {
    if x86::cpuid(1, 0).ecx & (1 << 21) == 0 {
        return false;
    }
    // SAFETY: the CPU offers x2APIC; EN then EN|EXTD is the architectural way in, and the
    // hypervisor has not used the APIC yet.
    unsafe {
        let msr = x86::rdmsr(x86::msr::APIC_BASE);
        x86::wrmsr(x86::msr::APIC_BASE, msr | APIC_BASE_EN);
        x86::wrmsr(x86::msr::APIC_BASE, msr | APIC_BASE_EN | APIC_BASE_EXTD);
    }
    true
}

/// This CPU's APIC id (32 bits in x2APIC mode, 8 in xAPIC mode).
pub fn id() -> u32 {
    if x2apic() {
        read(REG_ID)
    } else {
        read(REG_ID) >> 24
    }
}

/// First in-service register (ISR bits 0-31); the next ones follow every 16 bytes.
const REG_ISR: usize = 0x100;

/// Whether `vector` is in service on this CPU: the local APIC delivered it and it has had no
/// EOI yet. An exception the CPU raises never sets it.
pub fn in_service(vector: u8) -> bool {
    let reg = REG_ISR + 0x10 * (vector as usize / 32);
    read(reg) & (1 << (vector % 32)) != 0
}

/// Signals end of interrupt.
pub fn eoi() {
    write(REG_EOI, 0);
}

fn wait_icr_idle() -> bool {
    if x2apic() {
        // The x2APIC ICR has no delivery-status bit: the write is the send.
        return true;
    }
    let deadline = tsc::deadline_us(100_000);
    while read(REG_ICR_LO) & ICR_DELIVERY_PENDING != 0 {
        if tsc::expired(deadline) {
            return false;
        }
        x86::pause();
    }
    true
}

fn send_ipi(apic_id: u32, icr: u32) -> bool {
    if x2apic() {
        // SAFETY: the x2APIC ICR; INIT, start-up and fixed IPIs to one APIC id are what the
        // callers send.
        unsafe { x86::wrmsr(X2APIC_ICR, (u64::from(apic_id) << 32) | u64::from(icr)) };
        return true;
    }
    write(REG_ICR_HI, apic_id << 24);
    write(REG_ICR_LO, icr);
    wait_icr_idle()
}

/// Sends a fixed interrupt on `vector` (edge, physical destination) to `apic_id`.
pub fn send_fixed(apic_id: u32, vector: u8) -> bool {
    send_ipi(apic_id, u32::from(vector))
}

/// Sends INIT (assert, level) to `apic_id`.
pub fn send_init(apic_id: u32) -> bool {
    send_ipi(apic_id, 0x0000_4500)
}

/// Sends a start-up IPI with `vector` (page number of the trampoline) to `apic_id`.
pub fn send_startup(apic_id: u32, vector: u8) -> bool {
    send_ipi(apic_id, 0x0000_4600 | vector as u32)
}

/// Masks every line of the legacy 8259 PICs (the firmware may have left the PIT's IRQ 0
/// routed to vector 8, which would look like a double fault once interrupts are enabled).
pub fn mask_legacy_pic() {
    // SAFETY: 0x21/0xA1 are the 8259 interrupt mask registers; masking all lines only stops
    // legacy interrupts, which the hypervisor does not use.
    unsafe {
        x86::outb(0x21, 0xFF);
        x86::outb(0xA1, 0xFF);
    }
}

/// Local APIC timer ticks per millisecond (divide by 16), from [`calibrate_timer`].
static TIMER_TICKS_PER_MS: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

/// Measures the local APIC timer against the TSC over 10 ms (on the BSP; every CPU's APIC
/// timer runs from the same bus clock). Returns ticks per millisecond.
pub fn calibrate_timer() -> u32 {
    write(REG_TIMER_DIVIDE, DIVIDE_BY_16);
    write(REG_LVT_TIMER, LVT_MASKED);
    write(REG_TIMER_INIT, u32::MAX);
    tsc::delay_us(10_000);
    let elapsed = u32::MAX - read(REG_TIMER_CURRENT);
    write(REG_TIMER_INIT, 0);
    let per_ms = (elapsed / 10).max(1);
    TIMER_TICKS_PER_MS.store(per_ms, Ordering::Relaxed);
    per_ms
}

/// Starts this CPU's APIC timer: `vector` every `period_us` microseconds.
pub fn start_periodic_timer(vector: u8, period_us: u32) {
    let per_ms = TIMER_TICKS_PER_MS.load(Ordering::Relaxed).max(1);
    let count = ((per_ms as u64 * period_us as u64) / 1000).clamp(1, u32::MAX as u64) as u32;
    write(REG_TIMER_DIVIDE, DIVIDE_BY_16);
    write(REG_LVT_TIMER, LVT_PERIODIC | vector as u32);
    write(REG_TIMER_INIT, count);
}

/// Arms this CPU's APIC timer once: `vector` at TSC `deadline` (at the next tick when it has
/// passed), rounded up to whole timer ticks so it never fires before the deadline by more
/// than the calibration error.
pub fn arm_oneshot_at(vector: u8, deadline: u64) {
    let per_ms = u64::from(TIMER_TICKS_PER_MS.load(Ordering::Relaxed).max(1));
    let khz = tsc::khz().max(1);
    let cycles = deadline.saturating_sub(x86::rdtsc());
    let count = cycles
        .saturating_mul(per_ms)
        .div_ceil(khz)
        .clamp(1, u64::from(u32::MAX)) as u32;
    write(REG_TIMER_DIVIDE, DIVIDE_BY_16);
    write(REG_LVT_TIMER, vector as u32);
    write(REG_TIMER_INIT, count);
}

/// Stops this CPU's APIC timer.
pub fn stop_timer() {
    write(REG_LVT_TIMER, LVT_MASKED);
    write(REG_TIMER_INIT, 0);
}
