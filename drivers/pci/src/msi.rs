//! MSI virtualization for assigned functions: the layout of a function's MSI capability
//! ([`MsiCapability`]), the guest's virtual copy of it ([`VirtualMsi`]) that the configuration
//! filter reads and writes instead of the device's, and the hypervisor's own programming of
//! the device ([`MsiCapability::program`]).
//!
//! The guest never writes the device's MSI registers: it sees one capability (MSI, its next
//! pointer 0) whose control, address, data and mask registers are the virtual copy; every
//! change is reported to the hypervisor, which programs the device with an address and data
//! of its own (a remappable-format MSI naming an IRTE it owns).

use crate::{caps::cap_id, find_capability, Bdf, ConfigAccess};

/// Message control: MSI enable.
const CONTROL_ENABLE: u16 = 1 << 0;
/// Message control: multiple message capable (3:1) and enable (6:4).
const CONTROL_MULTIPLE: u16 = 0x7e;
/// Message control: 64-bit address capable.
const CONTROL_64BIT: u16 = 1 << 7;
/// Message control: per-vector masking capable.
const CONTROL_MASKABLE: u16 = 1 << 8;

/// Where a function's MSI capability lies and what it can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiCapability {
    /// Offset of the capability header.
    pub offset: u16,
    /// 64-bit message address.
    pub is_64bit: bool,
    /// Per-vector masking (mask and pending registers).
    pub maskable: bool,
}

/// A register of the MSI capability, by its dword.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsiRegister {
    /// Header dword: id, next pointer, message control (bits 31:16).
    Control,
    /// Message address, low dword.
    AddressLow,
    /// Message address, high dword (64-bit capabilities).
    AddressHigh,
    /// Message data (bits 15:0).
    Data,
    /// Mask bits (maskable capabilities).
    Mask,
    /// Pending bits (maskable capabilities).
    Pending,
}

impl MsiCapability {
    /// Finds `bdf`'s MSI capability.
    pub fn find<C: ConfigAccess + ?Sized>(cfg: &C, bdf: Bdf) -> Option<Self> {
        let offset = u16::from(find_capability(cfg, bdf, cap_id::MSI)?);
        let control = (cfg.read32(bdf, offset) >> 16) as u16;
        Some(MsiCapability {
            offset,
            is_64bit: control & CONTROL_64BIT != 0,
            maskable: control & CONTROL_MASKABLE != 0,
        })
    }

    /// Bytes the capability spans.
    pub const fn len(&self) -> u16 {
        let base = if self.is_64bit { 14 } else { 10 };
        if self.maskable {
            base + 10
        } else {
            base
        }
    }

    /// Whether the capability spans no bytes (never: a header is always there).
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// Which register the dword at `offset` (dword-aligned) is, if it is one of the
    /// capability's.
    pub fn register(&self, offset: u16) -> Option<MsiRegister> {
        let rel = offset.checked_sub(self.offset)?;
        let data = if self.is_64bit { 12 } else { 8 };
        Some(match rel {
            0 => MsiRegister::Control,
            4 => MsiRegister::AddressLow,
            8 if self.is_64bit => MsiRegister::AddressHigh,
            r if r == data => MsiRegister::Data,
            r if self.maskable && r == data + 4 => MsiRegister::Mask,
            r if self.maskable && r == data + 8 => MsiRegister::Pending,
            _ => return None,
        })
    }

    fn reg_offset(&self, r: MsiRegister) -> u16 {
        let data = if self.is_64bit { 12 } else { 8 };
        self.offset
            + match r {
                MsiRegister::Control => 0,
                MsiRegister::AddressLow => 4,
                MsiRegister::AddressHigh => 8,
                MsiRegister::Data => data,
                MsiRegister::Mask => data + 4,
                MsiRegister::Pending => data + 8,
            }
    }

    /// The device's message control register.
    fn control<C: ConfigAccess + ?Sized>(&self, cfg: &C, bdf: Bdf) -> u16 {
        (cfg.read32(bdf, self.offset) >> 16) as u16
    }

    fn write_control<C: ConfigAccess + ?Sized>(&self, cfg: &C, bdf: Bdf, control: u16) {
        let header = cfg.read32(bdf, self.offset) & 0xffff;
        cfg.write32(bdf, self.offset, header | u32::from(control) << 16);
    }

    /// Programs the device (the hypervisor's values, one vector): MSI disabled while the
    /// address and data change, then enabled when `enable`.
    pub fn program<C: ConfigAccess + ?Sized>(
        &self,
        cfg: &C,
        bdf: Bdf,
        address: u64,
        data: u16,
        enable: bool,
    ) {
        let control = self.control(cfg, bdf) & !(CONTROL_ENABLE | CONTROL_MULTIPLE);
        self.write_control(cfg, bdf, control);
        cfg.write32(
            bdf,
            self.reg_offset(MsiRegister::AddressLow),
            address as u32,
        );
        if self.is_64bit {
            cfg.write32(
                bdf,
                self.reg_offset(MsiRegister::AddressHigh),
                (address >> 32) as u32,
            );
        }
        let d = self.reg_offset(MsiRegister::Data);
        let keep = cfg.read32(bdf, d) & 0xffff_0000;
        cfg.write32(bdf, d, keep | u32::from(data));
        if enable {
            self.write_control(cfg, bdf, control | CONTROL_ENABLE);
        }
    }

    /// Turns the device's MSI off.
    pub fn disable<C: ConfigAccess + ?Sized>(&self, cfg: &C, bdf: Bdf) {
        let control = self.control(cfg, bdf) & !(CONTROL_ENABLE | CONTROL_MULTIPLE);
        self.write_control(cfg, bdf, control);
    }

    /// Whether the device's MSI is on.
    pub fn enabled<C: ConfigAccess + ?Sized>(&self, cfg: &C, bdf: Bdf) -> bool {
        self.control(cfg, bdf) & CONTROL_ENABLE != 0
    }
}

/// The guest's MSI capability as it programmed it (one vector).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VirtualMsi {
    /// MSI enable.
    pub enabled: bool,
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u16,
    /// Mask bit of vector 0 (maskable capabilities).
    pub masked: bool,
}

/// What a guest's MSI message asks for, in x86 terms (compatibility format).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestMsiTarget {
    /// Destination APIC id (address bits 19:12).
    pub apic_id: u8,
    /// Vector (data bits 7:0).
    pub vector: u8,
}

/// The interrupt target of an MSI or MSI-X message, if it is a fixed or lowest-priority,
/// edge-triggered, physical-destination message to a vector >= 32 in the interrupt window
/// (compatibility format, data bits 31:16 zero).
pub const fn msi_target(address: u64, data: u32) -> Option<GuestMsiTarget> {
    let a = address;
    if a >> 32 != 0 || (a >> 20) & 0xfff != 0xfee || a & (1 << 4) != 0 || data >> 16 != 0 {
        return None;
    }
    let delivery = (data >> 8) & 7;
    let level = data & (1 << 15) != 0;
    let vector = data as u8;
    if delivery > 1 || level || a & (1 << 2) != 0 || vector < 32 {
        return None;
    }
    Some(GuestMsiTarget {
        apic_id: (a >> 12) as u8,
        vector,
    })
}

impl VirtualMsi {
    /// The guest's interrupt target, if its message is a fixed or lowest-priority,
    /// edge-triggered, physical-destination MSI to a vector >= 32 in the interrupt window.
    pub const fn target(&self) -> Option<GuestMsiTarget> {
        msi_target(self.address, self.data as u32)
    }

    /// What the guest reads from register `r`, given the device's real control word (its
    /// capability bits are shown, one vector only) and pending bits.
    pub fn read(&self, r: MsiRegister, real_header: u32, real_pending: u32) -> u32 {
        match r {
            MsiRegister::Control => {
                let control = (real_header >> 16) as u16 & !(CONTROL_ENABLE | CONTROL_MULTIPLE)
                    | if self.enabled { CONTROL_ENABLE } else { 0 };
                // Id MSI, next pointer 0: the only capability the guest sees.
                u32::from(control) << 16 | u32::from(cap_id::MSI)
            }
            MsiRegister::AddressLow => self.address as u32 & !3,
            MsiRegister::AddressHigh => (self.address >> 32) as u32,
            MsiRegister::Data => u32::from(self.data),
            MsiRegister::Mask => u32::from(self.masked),
            MsiRegister::Pending => real_pending & 1,
        }
    }

    /// The guest writes `value` under byte `mask` to register `r`; returns whether the
    /// virtual state changed.
    pub fn write(&mut self, r: MsiRegister, value: u32, mask: u32) -> bool {
        let before = *self;
        let merge = |old: u32| (old & !mask) | (value & mask);
        match r {
            MsiRegister::Control => {
                if mask & 0x00ff_0000 != 0 {
                    self.enabled = value & (1 << 16) != 0;
                }
            }
            MsiRegister::AddressLow => {
                let low = merge(self.address as u32) & !3;
                self.address = (self.address & !0xffff_ffff) | u64::from(low);
            }
            MsiRegister::AddressHigh => {
                let high = merge((self.address >> 32) as u32);
                self.address = (self.address & 0xffff_ffff) | u64::from(high) << 32;
            }
            MsiRegister::Data => self.data = merge(u32::from(self.data)) as u16,
            MsiRegister::Mask => self.masked = merge(u32::from(self.masked)) & 1 != 0,
            MsiRegister::Pending => {}
        }
        *self != before
    }
}
