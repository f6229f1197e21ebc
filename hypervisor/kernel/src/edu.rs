//! The QEMU `edu` device (1234:11e8): a deterministic DMA engine with a 4 KiB device-side
//! buffer at device address 0x40000. Used by the hypervisor's hardware self-tests.
//!
//! Registers (BAR0): 0x00 id, 0x04 liveness (returns the complement), 0x80 DMA source,
//! 0x88 DMA destination, 0x90 count, 0x98 command (bit 0 start/busy, bit 1 direction
//! 1 = device->RAM, bit 2 raise an interrupt). A DMA completes after a 100 ms timer.

use moat_pci::{Bdf, ConfigAccess};

use crate::arch::tsc;
use crate::mm::mmio::Mmio;
use crate::mm::space;
use crate::mm::PhysAddr;

/// PCI vendor and device id of edu.
pub const ID: (u16, u16) = (0x1234, 0x11e8);
/// Device address of edu's DMA buffer.
pub const BUFFER: u64 = 0x40000;
/// Size of edu's DMA buffer.
pub const BUFFER_SIZE: u64 = 0x1000;

const REG_ID: usize = 0x00;
const REG_LIVENESS: usize = 0x04;
const REG_DMA_SRC: usize = 0x80;
const REG_DMA_DST: usize = 0x88;
const REG_DMA_COUNT: usize = 0x90;
const REG_DMA_CMD: usize = 0x98;
const CMD_START: u64 = 1;
const CMD_TO_RAM: u64 = 2;

/// Direction of a DMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The device reads RAM (RAM -> device buffer).
    FromRam,
    /// The device writes RAM (device buffer -> RAM).
    ToRam,
}

/// Errors driving edu.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EduError {
    /// The device-side range would reach the end of the 4 KiB buffer (QEMU aborts on that:
    /// refused).
    OutsideBuffer,
    /// The DMA did not complete in time.
    Timeout,
    /// The device did not answer as edu does.
    NotEdu(u32),
}

/// One edu device.
pub struct Edu {
    /// Its PCI address.
    pub bdf: Bdf,
    regs: Mmio,
}

impl Edu {
    /// Takes the edu at `bdf` with memory BAR0 at `bar0`: maps the BAR, enables memory decode
    /// and bus mastering, checks the id and liveness registers.
    ///
    /// # Safety
    ///
    /// `bar0` is the address assigned to memory BAR0 of the function at `bdf` (as probed from
    /// its configuration space), and the caller owns that function (no guest has it).
    pub unsafe fn new(cfg: &impl ConfigAccess, bdf: Bdf, bar0: PhysAddr) -> Result<Self, EduError> {
        space::map_mmio(bar0, 0x1000).map_err(|_| EduError::NotEdu(0))?;
        moat_pci::update_command(cfg, bdf, |c| {
            c | moat_pci::Command::MEMORY_SPACE | moat_pci::Command::BUS_MASTER
        });
        // SAFETY: by the caller's contract the page at `bar0` is this function's register
        // page (device MMIO the caller owns), mapped uncached just above.
        let regs = unsafe { Mmio::new(bar0, 0x1000) };
        let e = Edu { bdf, regs };
        let id = e.regs.read32(REG_ID);
        if id & 0xff != 0xed {
            return Err(EduError::NotEdu(id));
        }
        e.regs.write32(REG_LIVENESS, 0x1234_5678);
        if e.regs.read32(REG_LIVENESS) != !0x1234_5678 {
            return Err(EduError::NotEdu(id));
        }
        Ok(e)
    }

    /// Starts a DMA of `len` bytes between bus address `bus` and device buffer offset
    /// `offset`; does not wait.
    pub fn start(&self, dir: Direction, bus: u64, offset: u64, len: u64) -> Result<(), EduError> {
        // QEMU 7.2 requires the end of the device-side range to lie strictly inside the
        // buffer (a DMA ending exactly at 0x41000 hits hw_error and kills the VM): refuse it.
        if offset.checked_add(len).is_none_or(|end| end >= BUFFER_SIZE) || len == 0 {
            return Err(EduError::OutsideBuffer);
        }
        let dev = BUFFER + offset;
        let (src, dst, cmd) = match dir {
            Direction::FromRam => (bus, dev, CMD_START),
            Direction::ToRam => (dev, bus, CMD_START | CMD_TO_RAM),
        };
        self.regs.write64(REG_DMA_SRC, src);
        self.regs.write64(REG_DMA_DST, dst);
        self.regs.write64(REG_DMA_COUNT, len);
        self.regs.write64(REG_DMA_CMD, cmd);
        Ok(())
    }

    /// Whether a DMA is in flight.
    pub fn busy(&self) -> bool {
        self.regs.read64(REG_DMA_CMD) & CMD_START != 0
    }

    /// Waits for the DMA in flight (at most `timeout_ms`), with interrupts enabled so that
    /// the VT-d fault event interrupt a bad DMA raises is taken while waiting.
    pub fn wait(&self, timeout_ms: u64) -> Result<(), EduError> {
        let d = tsc::deadline_us(timeout_ms * 1000);
        crate::arch::x86::with_interrupts(|| {
            while self.busy() {
                if tsc::expired(d) {
                    return Err(EduError::Timeout);
                }
                core::hint::spin_loop();
            }
            Ok(())
        })
    }

    /// A whole DMA: start and wait (edu takes ~100 ms of virtual time).
    pub fn dma(&self, dir: Direction, bus: u64, offset: u64, len: u64) -> Result<(), EduError> {
        self.start(dir, bus, offset, len)?;
        self.wait(5_000)
    }
}
