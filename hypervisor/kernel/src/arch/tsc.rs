//! The time-stamp counter: its frequency from CPUID 0x15/0x16 when the CPU states it (checked
//! against the PIT when there is one), else measured against the PIT; then used for
//! timestamps, delays and timeouts.

use core::sync::atomic::{AtomicU64, Ordering};

use x86_64::instructions::port::{Port, PortWriteOnly};

use super::x86;

static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
static BOOT_TSC: AtomicU64 = AtomicU64::new(0);

/// Records the boot TSC (call first thing).
pub fn mark_boot() {
    BOOT_TSC.store(x86::rdtsc(), Ordering::Relaxed);
}

/// Sets the TSC frequency: from CPUID leaves 0x15/0x16 when stated, else (or when they
/// contradict the PIT) measured against the PIT. Returns the decision.
pub fn calibrate() -> moat_x86arch::tsc::Choice {
    let max_leaf = x86::cpuid(0, 0).eax;
    let l15 = x86::cpuid(0x15, 0);
    let l16 = x86::cpuid(0x16, 0);
    let stated = moat_x86arch::tsc::khz_from_cpuid(max_leaf, (l15.eax, l15.ebx, l15.ecx), l16.eax);
    let c = moat_x86arch::tsc::choose(stated, measure_pit());
    TSC_KHZ.store(c.khz, Ordering::Relaxed);
    c
}

/// Measures the TSC against PIT channel 2 over 10 ms. Returns kHz, or `None` when the PIT
/// channel never finished counting (no PIT).
fn measure_pit() -> Option<u64> {
    const PIT_HZ: u64 = 1_193_182;
    const MS: u64 = 10;
    let count = (PIT_HZ * MS / 1000) as u16;
    // Port 0x61: NMI status and speaker gate (bit 0 gates PIT channel 2, bit 1 drives the
    // speaker, bit 5 is channel 2's output); 0x43: PIT mode/command; 0x42: PIT channel 2.
    let mut gate_port = Port::<u8>::new(0x61);
    let mut command = PortWriteOnly::<u8>::new(0x43);
    let mut channel2 = Port::<u8>::new(0x42);
    // SAFETY: these ports belong to the platform timer, which the hypervisor owns; the
    // speaker output is kept off.
    let (t0, t1) = unsafe {
        let gate = gate_port.read();
        gate_port.write((gate & !0x02) | 0x01);
        command.write(0xB0); // channel 2, lobyte/hibyte, mode 0, binary
        channel2.write(count as u8);
        channel2.write((count >> 8) as u8);
        // restart the count: toggle the gate
        let g = gate_port.read();
        gate_port.write(g & !0x01);
        gate_port.write(g | 0x01);
        let t0 = x86::rdtsc();
        let mut spins = 0u64;
        let mut counted = true;
        while gate_port.read() & 0x20 == 0 {
            spins += 1;
            if spins > 100_000_000 {
                counted = false;
                break;
            }
        }
        let t1 = x86::rdtsc();
        gate_port.write(gate);
        (t0, if counted { Some(t1) } else { None })
    };
    t1.map(|t1| (t1.wrapping_sub(t0) / MS).max(1))
}

/// TSC frequency in kHz (0 before calibration).
pub fn khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

/// Microseconds since [`mark_boot`] (0 before calibration).
pub fn micros_since_boot() -> u64 {
    let khz = khz();
    if khz == 0 {
        return 0;
    }
    let d = x86::rdtsc().wrapping_sub(BOOT_TSC.load(Ordering::Relaxed));
    (d as u128 * 1000 / khz as u128) as u64
}

/// Converts cycles to nanoseconds.
pub fn cycles_to_ns(c: u64) -> u64 {
    let khz = khz().max(1);
    (c as u128 * 1_000_000 / khz as u128) as u64
}

/// A deadline `us` microseconds from now, in TSC cycles.
pub fn deadline_us(us: u64) -> u64 {
    x86::rdtsc().saturating_add(us.saturating_mul(khz().max(1)) / 1000)
}

/// Whether `deadline` (from [`deadline_us`]) has passed.
pub fn expired(deadline: u64) -> bool {
    x86::rdtsc() >= deadline
}

/// Busy-waits `us` microseconds.
pub fn delay_us(us: u64) {
    let d = deadline_us(us);
    while !expired(d) {
        x86::pause();
    }
}
