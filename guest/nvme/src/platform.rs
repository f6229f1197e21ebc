//! What the driver needs from its environment: the controller's registers, the memory it
//! shares with the controller (by guest-physical address), and a clock.

/// The controller's environment.
pub trait Platform {
    /// Reads the 32-bit register at `offset` of BAR0.
    fn read32(&mut self, offset: usize) -> u32;
    /// Writes the 32-bit register at `offset` of BAR0.
    fn write32(&mut self, offset: usize, value: u32);
    /// Reads the dword at `gpa` of memory shared with the controller.
    fn mem_read32(&mut self, gpa: u64) -> u32;
    /// Writes the dword at `gpa` of memory shared with the controller.
    fn mem_write32(&mut self, gpa: u64, value: u32);
    /// Microseconds since some fixed point.
    fn now_us(&mut self) -> u64;

    /// Reads a 64-bit register as two dwords (low first).
    fn read64(&mut self, offset: usize) -> u64 {
        let lo = self.read32(offset) as u64;
        let hi = self.read32(offset + 4) as u64;
        hi << 32 | lo
    }

    /// Writes a 64-bit register as two dwords (low first).
    fn write64(&mut self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }

    /// Writes `bytes` (a multiple of 4) at `gpa`.
    fn mem_write(&mut self, gpa: u64, bytes: &[u8]) {
        for (i, w) in bytes.chunks_exact(4).enumerate() {
            self.mem_write32(
                gpa + 4 * i as u64,
                u32::from_le_bytes([w[0], w[1], w[2], w[3]]),
            );
        }
    }

    /// Fills `len` bytes (a multiple of 4) at `gpa` with zeros.
    fn mem_zero(&mut self, gpa: u64, len: u64) {
        for i in 0..len / 4 {
            self.mem_write32(gpa + 4 * i, 0);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub use native::Native;

#[cfg(target_arch = "x86_64")]
mod native {
    use super::Platform;
    use core::sync::atomic::{fence, Ordering};

    /// The controller inside a Moat guest: BAR0 and the shared memory identity-mapped
    /// (virtual address = guest-physical address), the BAR uncached; time from the TSC.
    #[derive(Debug, Clone, Copy)]
    pub struct Native {
        bar: u64,
        tsc_khz: u64,
    }

    impl Native {
        /// The controller whose BAR0 is at `bar`; `tsc_khz` converts TSC ticks to time.
        ///
        /// # Safety
        /// `bar` is the controller's BAR0 (at least 8 KiB), identity-mapped and uncached; every
        /// address the driver is given (queue memory, data buffers) is identity-mapped guest
        /// RAM that nothing else accesses while the driver or the controller owns it.
        pub unsafe fn new(bar: u64, tsc_khz: u64) -> Native {
            Native {
                bar,
                tsc_khz: tsc_khz.max(1),
            }
        }
    }

    impl Platform for Native {
        fn read32(&mut self, offset: usize) -> u32 {
            // SAFETY: `new`'s contract: BAR0 is mapped; registers are dword aligned.
            unsafe { core::ptr::read_volatile((self.bar as usize + offset) as *const u32) }
        }

        fn write32(&mut self, offset: usize, value: u32) {
            // Queue entries written before a doorbell reach memory first.
            fence(Ordering::SeqCst);
            // SAFETY: as in read32.
            unsafe { core::ptr::write_volatile((self.bar as usize + offset) as *mut u32, value) }
        }

        fn mem_read32(&mut self, gpa: u64) -> u32 {
            // SAFETY: `new`'s contract: shared memory is identity-mapped RAM; volatile
            // because the controller writes it behind the compiler.
            let v = unsafe { core::ptr::read_volatile(gpa as usize as *const u32) };
            fence(Ordering::Acquire);
            v
        }

        fn mem_write32(&mut self, gpa: u64, value: u32) {
            // SAFETY: as in mem_read32; the controller reads it.
            unsafe { core::ptr::write_volatile(gpa as usize as *mut u32, value) }
        }

        fn now_us(&mut self) -> u64 {
            // SAFETY: RDTSC has no side effects.
            let t = unsafe { core::arch::x86_64::_rdtsc() };
            t / (self.tsc_khz / 1000).max(1)
        }
    }
}
