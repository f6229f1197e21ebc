//! PCI configuration filtering for guests: what a guest's `0xCF8`/`0xCFC` accesses (configuration
//! mechanism #1, intercepted by the hypervisor) may see and change of the functions assigned to
//! it, over any [`ConfigAccess`] to the real configuration space.
//!
//! A guest reaches only its assigned functions, at their real BDF. Of each it sees the type-0
//! header: identity, class, header type and interrupt pin pass through; the command register
//! accepts I/O, memory, bus-master and INTx-disable ([`GUEST_COMMAND`]); BARs read back their
//! real address and answer the all-ones sizing protocol without the device ever being
//! re-programmed (the BAR is mapped at that address by the second stage); the expansion ROM
//! and everything past 0x40 read as zero, except the function's MSI and MSI-X capabilities,
//! the only ones the guest sees (MSI first, then MSI-X, linked to each other; the others stay
//! hidden). MSI is a virtual copy ([`VirtualMsi`]); of MSI-X the guest reads the device's
//! table size (clamped), table and PBA locations, while Enable and Function Mask are virtual
//! ([`VirtualMsixControl`]). The guest never writes the device's registers: each change is
//! returned to the hypervisor ([`ConfigUpdate`]), which programs the device itself. Other
//! functions read as all ones and ignore writes.

use crate::msi::{MsiCapability, MsiRegister, VirtualMsi};
use crate::msix::{MsixCapability, VirtualMsixControl};
use crate::{probe_bars, regs, Bar, BarKind, Bars, Bdf, ConfigAccess};

/// Configuration address port.
pub const PORT_ADDRESS: u16 = 0xcf8;
/// First configuration data port; the data ports are `0xCFC..=0xCFF`.
pub const PORT_DATA: u16 = 0xcfc;
/// Last configuration data port.
pub const PORT_DATA_LAST: u16 = 0xcff;

/// Command register bits a guest may change: I/O space, memory space, bus master, INTx disable.
pub const GUEST_COMMAND: u16 = 0x0001 | 0x0002 | 0x0004 | 0x0400;
/// Status bit: capability list present.
const STATUS_CAP_LIST: u32 = 1 << 20;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignedDevice {
    /// Where it is (the guest sees it at the same BDF).
    pub bdf: Bdf,
    /// Its BARs as probed at assignment.
    pub bars: Bars,
    /// Its MSI capability, if it has one (the only capability the guest sees).
    pub msi: Option<MsiCapability>,
    /// The guest's MSI state.
    pub vmsi: VirtualMsi,
    /// Its MSI-X capability, if it has one whose table and PBA lie in its memory BARs.
    pub msix: Option<MsixCapability>,
    /// The guest's MSI-X message control.
    pub vmsix: VirtualMsixControl,
    sizing: [bool; 6],
}

/// A guest's write changed the virtual MSI or MSI-X state of a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigUpdate {
    /// MSI: program the device (or turn its MSI off).
    Msi(MsiUpdate),
    /// MSI-X's Enable or Function Mask: re-evaluate every table entry.
    Msix(MsixUpdate),
}

/// A guest's write changed a function's virtual MSI-X message control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixUpdate {
    /// The function.
    pub bdf: Bdf,
    /// The guest's control now.
    pub control: VirtualMsixControl,
}

/// A guest's write changed the virtual MSI state of a function: the hypervisor must program
/// the device (or turn its MSI off) accordingly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiUpdate {
    /// The function.
    pub bdf: Bdf,
    /// Its capability.
    pub cap: MsiCapability,
    /// What the guest programmed now.
    pub state: VirtualMsi,
}

impl AssignedDevice {
    /// Probes `bdf` for assignment (sizing its BARs, with decode off meanwhile).
    pub fn probe<C: ConfigAccess + ?Sized>(cfg: &C, bdf: Bdf) -> Result<Self, AssignError> {
        if cfg.read32(bdf, regs::ID) & 0xffff == 0xffff {
            return Err(AssignError::Absent);
        }
        if (cfg.read32(bdf, regs::HEADER_TYPE_DWORD) >> 16) & 0x7f != 0 {
            return Err(AssignError::NotEndpoint);
        }
        let bars = probe_bars(cfg, bdf).ok_or(AssignError::Absent)?;
        let msi = MsiCapability::find(cfg, bdf);
        if let Some(m) = &msi {
            // Nothing the firmware or a previous owner left enabled survives assignment.
            m.disable(cfg, bdf);
        }
        // MSI-X off until the hypervisor programs it (it then runs the device's table).
        let msix = MsixCapability::find(cfg, bdf);
        if let Some(x) = &msix {
            x.disable(cfg, bdf);
        }
        // A table or PBA outside the memory BARs cannot be trapped: not offered.
        let msix = msix.filter(|x| x.trapped(&bars).is_some());
        Ok(AssignedDevice {
            bdf,
            bars,
            msi,
            vmsi: VirtualMsi::default(),
            msix,
            vmsix: VirtualMsixControl::default(),
            sizing: [false; 6],
        })
    }

    /// The BAR whose lower or upper register is `reg` (0..6), and whether `reg` is the upper.
    fn bar_at(&self, reg: usize) -> Option<(Bar, bool)> {
        if let Some(b) = self.bars.get(reg) {
            return Some((b, false));
        }
        let lower = reg.checked_sub(1)?;
        match self.bars.get(lower) {
            Some(b) if b.kind == BarKind::Memory64 => Some((b, true)),
            _ => None,
        }
    }

    /// What the guest reads from the dword at `offset` (dword-aligned).
    pub fn read<C: ConfigAccess + ?Sized>(&self, cfg: &C, offset: u16) -> u32 {
        let real = || cfg.read32(self.bdf, offset);
        let msix_at = self.msix.map_or(0, |x| x.offset as u8);
        if let Some(m) = &self.msi
            && let Some(r) = m.register(offset)
        {
            let pending = if r == MsiRegister::Pending { real() } else { 0 };
            let v = self.vmsi.read(r, cfg.read32(self.bdf, m.offset), pending);
            // MSI links to MSI-X (if offered), the only other capability shown.
            return if r == MsiRegister::Control {
                v | u32::from(msix_at) << 8
            } else {
                v
            };
        }
        // MSI-X ends the list the guest sees (next pointer 0).
        if let Some((x, r)) = self.msix.and_then(|x| Some((x, x.register(offset)?))) {
            return self.vmsix.read(&x, r, 0, real());
        }
        let listed = self.msi.is_some() || self.msix.is_some();
        match offset {
            0x00 | 0x08 | 0x0c | 0x2c => real(),
            0x04 if listed => real() | STATUS_CAP_LIST,
            0x04 => real() & !STATUS_CAP_LIST,
            // The capability pointer names MSI, else MSI-X (the only ones shown).
            0x34 => self.msi.map_or(u32::from(msix_at), |m| u32::from(m.offset)),
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

    /// The guest writes `value` under byte mask `mask` to the dword at `offset` (dword-aligned):
    /// only the [`GUEST_COMMAND`] bits reach the device; BAR writes only start or end sizing;
    /// MSI and MSI-X writes change the virtual state only, returned when it changed.
    pub fn write<C: ConfigAccess + ?Sized>(
        &mut self,
        cfg: &C,
        offset: u16,
        value: u32,
        mask: u32,
    ) -> Option<ConfigUpdate> {
        if let Some(m) = self.msi
            && let Some(r) = m.register(offset)
        {
            return self
                .vmsi
                .write(r, value, mask)
                .then_some(ConfigUpdate::Msi(MsiUpdate {
                    bdf: self.bdf,
                    cap: m,
                    state: self.vmsi,
                }));
        }
        if let Some(r) = self.msix.and_then(|x| x.register(offset)) {
            let changed = self.vmsix.write(r, value, mask);
            let control = self.vmsix;
            return changed.then_some(ConfigUpdate::Msix(MsixUpdate {
                bdf: self.bdf,
                control,
            }));
        }
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
                self.bar_at(reg)?;
                let current = self.read(cfg, offset);
                let merged = (current & !mask) | (value & mask);
                // All address bits written as ones starts sizing; anything else ends it (the
                // BAR itself stays where firmware put it: relocation is not supported).
                self.sizing[reg] = merged | 0xf == u32::MAX;
            }
            _ => {}
        }
        None
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

/// Which configuration port an I/O access is, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigPort {
    /// A dword access to `0xCF8`: the address latch.
    Address,
    /// An access to `0xCFC + byte` (byte 0..=3), at any size.
    Data {
        /// Byte offset inside the dword.
        byte: u8,
    },
}

impl ConfigPort {
    /// The configuration port `port` is for an access of `size` bytes; `None` for other ports
    /// and for `0xCF8` at a size other than 4.
    pub fn decode(port: u16, size: u8) -> Option<Self> {
        match port {
            PORT_ADDRESS if size == 4 => Some(Self::Address),
            PORT_DATA..=PORT_DATA_LAST => Some(Self::Data {
                byte: (port - PORT_DATA) as u8,
            }),
            _ => None,
        }
    }
}

/// A data port access resolved against the address latch: which function, which dword, and
/// where the accessed bytes lie in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// The function.
    pub bdf: Bdf,
    /// Dword-aligned register offset.
    pub offset: u16,
    /// Bit position of the accessed bytes in the dword (`8 * byte`).
    pub shift: u32,
}

impl Target {
    /// The target of a data access at `byte` (0..=3) with the latch at `address`; `None` when
    /// the latch's enable bit is clear.
    pub fn decode(address: u32, byte: u8) -> Option<Self> {
        let (bdf, offset) = decode_address(address)?;
        Some(Target {
            bdf,
            offset,
            shift: u32::from(byte & 3) * 8,
        })
    }

    /// What the guest reads: the dword shifted down to the accessed bytes (the caller keeps
    /// the low `size` bytes); all ones for a function not in `devices`.
    pub fn read<C: ConfigAccess + ?Sized>(&self, cfg: &C, devices: &[AssignedDevice]) -> u32 {
        match devices.iter().find(|d| d.bdf == self.bdf) {
            Some(d) => d.read(cfg, self.offset) >> self.shift,
            None => u32::MAX,
        }
    }

    /// The guest writes the low `size` bytes of `value`; ignored for a function not in
    /// `devices`. Returns the function's new MSI or MSI-X state when the write changed it.
    pub fn write<C: ConfigAccess + ?Sized>(
        &self,
        cfg: &C,
        devices: &mut [AssignedDevice],
        size: u8,
        value: u32,
    ) -> Option<ConfigUpdate> {
        let size_mask: u32 = match size {
            1 => 0xff,
            2 => 0xffff,
            _ => u32::MAX,
        };
        let mask = size_mask.checked_shl(self.shift).unwrap_or(0);
        let d = devices.iter_mut().find(|d| d.bdf == self.bdf)?;
        d.write(
            cfg,
            self.offset,
            value.checked_shl(self.shift).unwrap_or(0),
            mask,
        )
    }
}
