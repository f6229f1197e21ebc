//! Configuration space access and the typed fields of the common header.

use core::fmt;

use bitflags::bitflags;

use crate::bdf::Bdf;

/// Register offsets in the configuration header.
pub mod regs {
    /// Vendor id (low 16 bits) and device id (high 16 bits).
    pub const ID: u16 = 0x00;
    /// Command (low 16 bits) and status (high 16 bits).
    pub const COMMAND_STATUS: u16 = 0x04;
    /// Revision id (7:0), prog-if (15:8), subclass (23:16), class (31:24).
    pub const CLASS_REVISION: u16 = 0x08;
    /// Cache line size, latency timer, header type (23:16), BIST.
    pub const HEADER_TYPE_DWORD: u16 = 0x0c;
    /// First base address register; BAR n is at `BAR0 + 4 * n`.
    pub const BAR0: u16 = 0x10;
    /// Type 1 (bridge): primary (7:0), secondary (15:8), subordinate (23:16) bus.
    pub const BRIDGE_BUSES: u16 = 0x18;
    /// Type 0: subsystem vendor id (15:0) and subsystem id (31:16).
    pub const SUBSYSTEM: u16 = 0x2c;
    /// Type 0 and 1: capabilities pointer (7:0).
    pub const CAPABILITIES_POINTER: u16 = 0x34;
    /// Interrupt line (7:0) and pin (15:8).
    pub const INTERRUPT: u16 = 0x3c;
}

/// Reads and writes a function's configuration space, 32 bits at a time.
///
/// `offset` is always dword-aligned and below 4096; callers in this crate keep
/// to that. The kernel implements this over identity-mapped ECAM with volatile
/// MMIO. Reading a function that does not exist returns all ones, as hardware does.
///
/// Writes take `&self` like the MMIO they stand for, so a function found while
/// enumerating can be probed (which writes its BARs) inside the same loop.
pub trait ConfigAccess {
    /// Reads the dword at `offset`.
    fn read32(&self, bdf: Bdf, offset: u16) -> u32;

    /// Writes the dword at `offset`.
    fn write32(&self, bdf: Bdf, offset: u16, value: u32);

    /// Reads the 16 bits at `offset` (2-byte aligned) out of their dword.
    fn read16(&self, bdf: Bdf, offset: u16) -> u16 {
        (self.read32(bdf, offset & !3) >> ((offset & 2) * 8)) as u16
    }

    /// Reads the byte at `offset` out of its dword.
    fn read8(&self, bdf: Bdf, offset: u16) -> u8 {
        (self.read32(bdf, offset & !3) >> ((offset & 3) * 8)) as u8
    }
}

bitflags! {
    /// The command register (offset 0x04, 16 bits).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Command: u16 {
        /// Respond to I/O space accesses (I/O BARs decode).
        const IO_SPACE = 1 << 0;
        /// Respond to memory space accesses (memory BARs decode).
        const MEMORY_SPACE = 1 << 1;
        /// May issue memory requests (DMA) and MSIs.
        const BUS_MASTER = 1 << 2;
        /// Monitor special cycles.
        const SPECIAL_CYCLES = 1 << 3;
        /// Memory write and invalidate enable.
        const MEMORY_WRITE_INVALIDATE = 1 << 4;
        /// VGA palette snoop.
        const VGA_PALETTE_SNOOP = 1 << 5;
        /// Parity error response.
        const PARITY_ERROR_RESPONSE = 1 << 6;
        /// SERR# enable.
        const SERR_ENABLE = 1 << 8;
        /// Fast back-to-back enable.
        const FAST_BACK_TO_BACK = 1 << 9;
        /// INTx emulation disabled.
        const INTERRUPT_DISABLE = 1 << 10;
    }
}

bitflags! {
    /// The status register (offset 0x06, 16 bits). Error bits are write-1-to-clear.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Status: u16 {
        /// An INTx interrupt is pending.
        const INTERRUPT_STATUS = 1 << 3;
        /// The capabilities pointer at 0x34 is valid.
        const CAPABILITIES_LIST = 1 << 4;
        /// 66 MHz capable (conventional PCI).
        const MHZ_66 = 1 << 5;
        /// Fast back-to-back capable.
        const FAST_BACK_TO_BACK = 1 << 7;
        /// Master data parity error.
        const MASTER_DATA_PARITY_ERROR = 1 << 8;
        /// DEVSEL timing (2 bits).
        const DEVSEL_TIMING = 0b11 << 9;
        /// Signaled target abort.
        const SIGNALED_TARGET_ABORT = 1 << 11;
        /// Received target abort.
        const RECEIVED_TARGET_ABORT = 1 << 12;
        /// Received master abort.
        const RECEIVED_MASTER_ABORT = 1 << 13;
        /// Signaled system error.
        const SIGNALED_SYSTEM_ERROR = 1 << 14;
        /// Detected parity error.
        const DETECTED_PARITY_ERROR = 1 << 15;
    }
}

/// The layout of the rest of the header, from the header type's low 7 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderLayout {
    /// Type 0: an endpoint, 6 BARs.
    Endpoint,
    /// Type 1: a PCI-PCI bridge, 2 BARs and bus numbers.
    PciBridge,
    /// Type 2: a CardBus bridge.
    CardBusBridge,
    /// A layout this crate does not know.
    Unknown(u8),
}

/// The header type byte (offset 0x0e).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderType(pub u8);

impl HeaderType {
    /// The header layout.
    pub const fn layout(self) -> HeaderLayout {
        match self.0 & 0x7f {
            0 => HeaderLayout::Endpoint,
            1 => HeaderLayout::PciBridge,
            2 => HeaderLayout::CardBusBridge,
            other => HeaderLayout::Unknown(other),
        }
    }

    /// Bit 7: the device has functions other than 0 (only meaningful on function 0).
    pub const fn multi_function(self) -> bool {
        self.0 & 0x80 != 0
    }

    /// How many base address registers the layout has: 6 for endpoints, 2 for
    /// PCI-PCI bridges, none for the others.
    pub const fn bar_count(self) -> u8 {
        match self.layout() {
            HeaderLayout::Endpoint => 6,
            HeaderLayout::PciBridge => 2,
            _ => 0,
        }
    }
}

/// Class code: class, subclass and programming interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClassCode {
    /// Base class (e.g. 0x06 bridge).
    pub class: u8,
    /// Subclass (e.g. 0x04 PCI-PCI bridge).
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
}

impl ClassCode {
    /// Base class 0x06, subclass 0x04: a PCI-PCI bridge.
    pub const fn is_pci_bridge(self) -> bool {
        self.class == 0x06 && self.subclass == 0x04
    }

    /// A short name for the common classes, for boot logs.
    pub const fn name(self) -> &'static str {
        match (self.class, self.subclass) {
            (0x00, 0xff) | (0xff, _) => "unclassified",
            (0x00, _) => "legacy device",
            (0x01, 0x01) => "IDE controller",
            (0x01, 0x06) => "SATA controller",
            (0x01, 0x08) => "NVMe controller",
            (0x01, _) => "storage controller",
            (0x02, 0x00) => "Ethernet controller",
            (0x02, _) => "network controller",
            (0x03, 0x00) => "VGA controller",
            (0x03, _) => "display controller",
            (0x04, _) => "multimedia controller",
            (0x05, _) => "memory controller",
            (0x06, 0x00) => "host bridge",
            (0x06, 0x01) => "ISA bridge",
            (0x06, 0x04) => "PCI bridge",
            (0x06, _) => "bridge",
            (0x07, _) => "communication controller",
            (0x08, _) => "system peripheral",
            (0x0c, 0x03) => "USB controller",
            (0x0c, 0x05) => "SMBus controller",
            (0x0c, _) => "serial bus controller",
            _ => "other",
        }
    }
}

impl fmt::Display for ClassCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02x}{:02x}{:02x}",
            self.class, self.subclass, self.prog_if
        )
    }
}

/// The common part of a function's configuration header, read once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Vendor id.
    pub vendor_id: u16,
    /// Device id.
    pub device_id: u16,
    /// Command register at the time of reading.
    pub command: Command,
    /// Status register at the time of reading.
    pub status: Status,
    /// Revision id.
    pub revision: u8,
    /// Class code.
    pub class: ClassCode,
    /// Header type (layout and multi-function bit).
    pub header_type: HeaderType,
    /// Interrupt pin (0 none, 1..=4 INTA#..INTD#).
    pub interrupt_pin: u8,
    /// Interrupt line (firmware's routing note).
    pub interrupt_line: u8,
}

impl Header {
    /// Reads `bdf`'s header, or `None` when no function answers there (vendor id
    /// all ones, or 0 as some broken hardware returns).
    pub fn read<C: ConfigAccess + ?Sized>(cfg: &C, bdf: Bdf) -> Option<Self> {
        let id = cfg.read32(bdf, regs::ID);
        let vendor_id = id as u16;
        if vendor_id == 0xffff || vendor_id == 0 {
            return None;
        }
        let cs = cfg.read32(bdf, regs::COMMAND_STATUS);
        let cr = cfg.read32(bdf, regs::CLASS_REVISION);
        let ht = cfg.read32(bdf, regs::HEADER_TYPE_DWORD);
        let int = cfg.read32(bdf, regs::INTERRUPT);
        Some(Self {
            vendor_id,
            device_id: (id >> 16) as u16,
            command: Command::from_bits_retain(cs as u16),
            status: Status::from_bits_retain((cs >> 16) as u16),
            revision: cr as u8,
            class: ClassCode {
                class: (cr >> 24) as u8,
                subclass: (cr >> 16) as u8,
                prog_if: (cr >> 8) as u8,
            },
            header_type: HeaderType((ht >> 16) as u8),
            interrupt_line: int as u8,
            interrupt_pin: (int >> 8) as u8,
        })
    }

    /// Whether this is a PCI-PCI bridge (type 1 header).
    pub fn is_bridge(&self) -> bool {
        self.header_type.layout() == HeaderLayout::PciBridge
    }
}

/// A bridge's bus numbers (type 1 header, offset 0x18).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BridgeBuses {
    /// The bus the bridge sits on.
    pub primary: u8,
    /// The bus directly behind it.
    pub secondary: u8,
    /// The highest bus behind it.
    pub subordinate: u8,
}

impl BridgeBuses {
    /// Reads the bus numbers of the bridge at `bdf`; `None` when `bdf` has no
    /// type 1 header.
    pub fn read<C: ConfigAccess + ?Sized>(cfg: &C, bdf: Bdf) -> Option<Self> {
        let header = Header::read(cfg, bdf)?;
        if !header.is_bridge() {
            return None;
        }
        let b = cfg.read32(bdf, regs::BRIDGE_BUSES);
        Some(Self {
            primary: b as u8,
            secondary: (b >> 8) as u8,
            subordinate: (b >> 16) as u8,
        })
    }
}

/// Reads the command register.
pub fn read_command<C: ConfigAccess + ?Sized>(cfg: &C, bdf: Bdf) -> Command {
    Command::from_bits_retain(cfg.read16(bdf, regs::COMMAND_STATUS))
}

/// Writes the command register. The status half of the dword is written as 0,
/// so no write-1-to-clear status bit is cleared by accident.
pub fn write_command<C: ConfigAccess + ?Sized>(cfg: &C, bdf: Bdf, command: Command) {
    cfg.write32(bdf, regs::COMMAND_STATUS, u32::from(command.bits()));
}

/// Read-modify-writes the command register (e.g. to set `BUS_MASTER |
/// MEMORY_SPACE` before using a device); returns the value written.
pub fn update_command<C: ConfigAccess + ?Sized>(
    cfg: &C,
    bdf: Bdf,
    f: impl FnOnce(Command) -> Command,
) -> Command {
    let new = f(read_command(cfg, bdf));
    write_command(cfg, bdf, new);
    new
}
