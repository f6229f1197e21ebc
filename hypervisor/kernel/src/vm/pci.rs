//! PCI configuration filtering for guests: the guest's `0xCF8`/`0xCFC` accesses (intercepted)
//! reach only the functions assigned to it, at their real BDF. Of each assigned function the
//! guest sees the type-0 header: identity, class, header type and interrupt pin pass through;
//! the command register accepts I/O, memory, bus-master and INTx-disable; BARs read back their
//! real address and answer the all-ones sizing protocol without the device ever being
//! re-programmed (the BAR is mapped at that address by the second stage); the capability list,
//! expansion ROM and everything past 0x40 read as zero. Other functions read as all ones and
//! ignore writes.

use moat_pci::{probe_bars, regs, BarKind, Bars, Bdf, ConfigAccess};

/// Configuration address port.
pub const PORT_ADDRESS: u16 = 0xcf8;
/// Configuration data ports `0xCFC..=0xCFF`.
pub const PORT_DATA: u16 = 0xcfc;

/// Command register bits a guest may change.
const GUEST_COMMAND: u16 = 0x0001 | 0x0002 | 0x0004 | 0x0400;
/// Status bit: capability list present.
const STATUS_CAP_LIST: u32 = 1 << 20;

/// Configuration access over the ECAM windows ACPI reported (the PCI discovery accessor).
pub type Ecams = crate::discovery::EcamAccess<'static>;

/// Why a device cannot be assigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssignError {
    /// No function answers at that BDF.
    Absent,
    /// Only endpoints (type-0 headers) can be assigned.
    NotEndpoint,
}

impl core::fmt::Display for AssignError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Absent => "no such PCI function",
            Self::NotEndpoint => "not an endpoint (only type-0 headers can be assigned)",
        })
    }
}

/// One function assigned to a guest, with its virtual BAR sizing state.
pub struct AssignedDevice {
    /// Where it is (the guest sees it at the same BDF).
    pub bdf: Bdf,
    /// Its BARs as probed at assignment.
    pub bars: Bars,
    sizing: [bool; 6],
}

impl AssignedDevice {
    /// Probes `bdf` for assignment.
    pub fn probe(cfg: &Ecams, bdf: Bdf) -> Result<Self, AssignError> {
        if cfg.read32(bdf, regs::ID) & 0xffff == 0xffff {
            return Err(AssignError::Absent);
        }
        if (cfg.read32(bdf, regs::HEADER_TYPE_DWORD) >> 16) & 0x7f != 0 {
            return Err(AssignError::NotEndpoint);
        }
        let bars = probe_bars(cfg, bdf).ok_or(AssignError::Absent)?;
        Ok(AssignedDevice {
            bdf,
            bars,
            sizing: [false; 6],
        })
    }

    /// The BAR whose lower or upper register is `reg` (0..6), and whether `reg` is the upper.
    fn bar_at(&self, reg: usize) -> Option<(moat_pci::Bar, bool)> {
        if let Some(b) = self.bars.get(reg) {
            return Some((b, false));
        }
        let lower = reg.checked_sub(1)?;
        match self.bars.get(lower) {
            Some(b) if b.kind == BarKind::Memory64 => Some((b, true)),
            _ => None,
        }
    }

    /// What the guest reads from the dword at `offset`.
    pub fn read(&self, cfg: &Ecams, offset: u16) -> u32 {
        let real = || cfg.read32(self.bdf, offset);
        match offset {
            0x00 | 0x08 | 0x0c | 0x2c => real(),
            0x04 => real() & !STATUS_CAP_LIST,
            0x10..=0x24 => {
                let reg = usize::from((offset - 0x10) / 4);
                let Some((bar, upper)) = self.bar_at(reg) else {
                    return 0;
                };
                let flags =
                    cfg.read32(self.bdf, bar.register()) & if bar.is_memory() { 0xf } else { 0x3 };
                let value = if self.sizing[reg] {
                    !(bar.size.wrapping_sub(1))
                } else {
                    bar.address
                };
                if upper {
                    (value >> 32) as u32
                } else {
                    (value as u32 & if bar.is_memory() { !0xf } else { !0x3 }) | flags
                }
            }
            // Interrupt line and pin; min grant and max latency.
            0x3c => real(),
            _ => 0,
        }
    }

    /// The guest writes `value` under byte mask `mask` to the dword at `offset`.
    pub fn write(&mut self, cfg: &Ecams, offset: u16, value: u32, mask: u32) {
        match offset {
            0x04 if mask & 0xffff != 0 => {
                let real = cfg.read32(self.bdf, 0x04) as u16;
                let allowed = GUEST_COMMAND & mask as u16;
                let command = (real & !allowed) | (value as u16 & allowed);
                // Status bits are write-one-to-clear: write zeros to leave them alone.
                cfg.write32(self.bdf, 0x04, u32::from(command));
            }
            0x10..=0x24 => {
                let reg = usize::from((offset - 0x10) / 4);
                if self.bar_at(reg).is_none() {
                    return;
                }
                let current = self.read(cfg, offset);
                let merged = (current & !mask) | (value & mask);
                // All address bits written as ones starts sizing; anything else ends it (the
                // BAR itself stays where firmware put it: relocation is not supported).
                self.sizing[reg] = merged | 0xf == u32::MAX;
            }
            _ => {}
        }
    }
}

/// Decodes a `0xCF8` value: (BDF, dword offset) when the enable bit is set.
pub fn decode_address(address: u32) -> Option<(Bdf, u16)> {
    if address & (1 << 31) == 0 {
        return None;
    }
    let bdf = Bdf::new(
        (address >> 16) as u8,
        ((address >> 11) & 0x1f) as u8,
        ((address >> 8) & 7) as u8,
    )?;
    Some((bdf, (address & 0xfc) as u16))
}
