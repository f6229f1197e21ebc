//! PCI function addresses and the ECAM (memory-mapped configuration) layout.

use core::fmt;

/// Highest device number on a bus.
pub const MAX_DEVICE: u8 = 31;
/// Highest function number of a device.
pub const MAX_FUNCTION: u8 = 7;
/// Size of one function's configuration space under ECAM (PCI Express).
pub const CONFIG_SPACE_SIZE: u16 = 4096;

/// A PCI function address: segment (ECAM domain), bus, device, function.
///
/// Displays as `00:05.0`, with the segment in front (`0001:00:05.0`) when it is
/// not 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bdf {
    segment: u16,
    bus: u8,
    device: u8,
    function: u8,
}

impl Bdf {
    /// A function on segment 0; `None` when `device > 31` or `function > 7`.
    pub const fn new(bus: u8, device: u8, function: u8) -> Option<Self> {
        Self::with_segment(0, bus, device, function)
    }

    /// A function on `segment`; `None` when `device > 31` or `function > 7`.
    pub const fn with_segment(segment: u16, bus: u8, device: u8, function: u8) -> Option<Self> {
        if device > MAX_DEVICE || function > MAX_FUNCTION {
            return None;
        }
        Some(Self {
            segment,
            bus,
            device,
            function,
        })
    }

    /// The segment (ECAM domain).
    pub const fn segment(self) -> u16 {
        self.segment
    }

    /// The bus number.
    pub const fn bus(self) -> u8 {
        self.bus
    }

    /// The device number (0..=31).
    pub const fn device(self) -> u8 {
        self.device
    }

    /// The function number (0..=7).
    pub const fn function(self) -> u8 {
        self.function
    }

    /// The 16-bit requester id (`bus << 8 | device << 3 | function`), as VT-d
    /// context entries and fault records name a source.
    pub const fn requester_id(self) -> u16 {
        (self.bus as u16) << 8 | (self.device as u16) << 3 | self.function as u16
    }

    /// The same device's function `function`; `None` when `function > 7`.
    pub const fn with_function(self, function: u8) -> Option<Self> {
        Self::with_segment(self.segment, self.bus, self.device, function)
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.segment != 0 {
            write!(f, "{:04x}:", self.segment)?;
        }
        write!(
            f,
            "{:02x}:{:02x}.{:x}",
            self.bus, self.device, self.function
        )
    }
}

/// The byte offset of `bdf`'s register `offset` from an ECAM region's base:
/// `bus << 20 | device << 15 | function << 12 | offset`.
pub const fn ecam_offset(bdf: Bdf, offset: u16) -> u64 {
    (bdf.bus as u64) << 20
        | (bdf.device as u64) << 15
        | (bdf.function as u64) << 12
        | (offset & (CONFIG_SPACE_SIZE - 1)) as u64
}

/// The legacy configuration mechanism #1 (I/O ports `0xCF8` address, `0xCFC` data), used when
/// the firmware describes no ECAM (no MCFG, e.g. Bochs's i440fx): the value to write to port
/// `0xCF8` to reach the dword holding `offset` of `bdf`: enable bit 31, bus, device, function,
/// register. It reaches segment 0 and the first 256 bytes only: `None` otherwise.
pub const fn port_io_address(bdf: Bdf, offset: u16) -> Option<u32> {
    if bdf.segment != 0 || offset >= 256 {
        return None;
    }
    Some(
        1 << 31
            | (bdf.bus as u32) << 16
            | (bdf.device as u32) << 11
            | (bdf.function as u32) << 8
            | (offset as u32 & 0xfc),
    )
}

/// I/O port of [`port_io_address`]'s address register.
pub const PORT_IO_ADDRESS: u16 = 0xcf8;
/// I/O port of the configuration mechanism #1 data register.
pub const PORT_IO_DATA: u16 = 0xcfc;

/// One ECAM region, as an MCFG entry describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ecam {
    /// Physical address of bus 0's configuration space in this region (MCFG
    /// gives it so even when `start_bus` is not 0).
    pub base: u64,
    /// PCI segment.
    pub segment: u16,
    /// First bus decoded.
    pub start_bus: u8,
    /// Last bus decoded (inclusive).
    pub end_bus: u8,
}

impl Ecam {
    /// Physical address of `bdf`'s register `offset`, or `None` when the
    /// function is not in this region or `offset` is past 4 KiB.
    pub const fn address(&self, bdf: Bdf, offset: u16) -> Option<u64> {
        if bdf.segment != self.segment
            || bdf.bus < self.start_bus
            || bdf.bus > self.end_bus
            || offset >= CONFIG_SPACE_SIZE
        {
            return None;
        }
        self.base.checked_add(ecam_offset(bdf, offset))
    }

    /// Whether the region covers `bdf`.
    pub const fn contains(&self, bdf: Bdf) -> bool {
        bdf.segment == self.segment && bdf.bus >= self.start_bus && bdf.bus <= self.end_bus
    }

    /// Size in bytes of the part of the region that decodes start..=end bus.
    pub const fn size(&self) -> u64 {
        if self.end_bus < self.start_bus {
            return 0;
        }
        ((self.end_bus - self.start_bus) as u64 + 1) << 20
    }
}
