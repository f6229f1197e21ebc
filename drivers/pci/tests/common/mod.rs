//! A model of PCI configuration space that behaves like hardware where it
//! matters here: absent functions read all ones, BARs keep only their writable
//! address bits (so writing all ones reveals the size), type bits are read-only,
//! status error bits are write-1-to-clear, and a BAR written while its decode is
//! enabled is recorded as a violation.
#![allow(dead_code)]

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use moat_pci::{Bdf, ConfigAccess};

pub const CMD_IO: u32 = 1 << 0;
pub const CMD_MEM: u32 = 1 << 1;
pub const CMD_BUS_MASTER: u32 = 1 << 2;
/// Command bits the model lets software change.
const COMMAND_WRITABLE: u32 = 0x07ff;
/// Status bits that are write-1-to-clear.
const STATUS_RW1C: u32 = 0xf900;

pub const fn bdf(bus: u8, device: u8, function: u8) -> Bdf {
    Bdf::new(bus, device, function).unwrap()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeFunction {
    regs: [u32; 1024],
    writable: [u32; 1024],
}

impl FakeFunction {
    /// A type 0 function.
    pub fn endpoint(vendor: u16, device: u16, class: u8, subclass: u8, prog_if: u8) -> Self {
        let mut f = Self {
            regs: [0; 1024],
            writable: [0; 1024],
        };
        f.regs[0] = u32::from(device) << 16 | u32::from(vendor);
        f.regs[2] = u32::from(class) << 24 | u32::from(subclass) << 16 | u32::from(prog_if) << 8;
        f.writable[1] = COMMAND_WRITABLE;
        f.writable[0x3c / 4] = 0xff; // interrupt line
        f
    }

    /// A type 1 PCI-PCI bridge with its bus numbers.
    pub fn bridge(vendor: u16, device: u16, primary: u8, secondary: u8, subordinate: u8) -> Self {
        let mut f = Self::endpoint(vendor, device, 0x06, 0x04, 0x00);
        f.regs[3] |= 1 << 16;
        f.regs[0x18 / 4] =
            u32::from(subordinate) << 16 | u32::from(secondary) << 8 | u32::from(primary);
        f.writable[0x18 / 4] = 0x00ff_ffff;
        f
    }

    /// A function whose first 256 bytes are `bytes` (a real capture); only the
    /// command register and interrupt line are writable until BAR sizes are given.
    pub fn captured(bytes: &[u8; 256]) -> Self {
        let mut f = Self {
            regs: [0; 1024],
            writable: [0; 1024],
        };
        for (r, dw) in f.regs.iter_mut().zip(bytes.chunks_exact(4)) {
            *r = u32::from_le_bytes(dw.try_into().unwrap());
        }
        f.writable[1] = COMMAND_WRITABLE;
        f.writable[0x3c / 4] = 0xff;
        f
    }

    /// Makes the (32-bit memory or 16-bit I/O) BAR `index` decode `size` bytes.
    pub fn bar_size(mut self, index: usize, size: u32) -> Self {
        let r = Self::bar_reg(index);
        self.writable[r] = if self.regs[r] & 1 != 0 {
            !(size - 1) & 0xfffc
        } else {
            !(size - 1) & !0xf
        };
        self
    }

    pub fn revision(mut self, rev: u8) -> Self {
        self.regs[2] = self.regs[2] & !0xff | u32::from(rev);
        self
    }

    pub fn multi_function(mut self) -> Self {
        self.regs[3] |= 0x80 << 16;
        self
    }

    pub fn command(mut self, bits: u32) -> Self {
        self.regs[1] = self.regs[1] & 0xffff_0000 | bits;
        self
    }

    pub fn status(mut self, bits: u16) -> Self {
        self.regs[1] = self.regs[1] & 0xffff | u32::from(bits) << 16;
        self
    }

    /// Sets the dword at `offset` (read only to the guest unless made writable).
    pub fn dword(mut self, offset: u16, value: u32) -> Self {
        self.regs[usize::from(offset) / 4] = value;
        self
    }

    fn bar_reg(index: usize) -> usize {
        4 + index
    }

    /// A 32-bit memory BAR of `size` bytes (a power of two >= 16) at `address`.
    pub fn mem32_bar(mut self, index: usize, address: u32, size: u32, prefetch: bool) -> Self {
        let r = Self::bar_reg(index);
        self.regs[r] = address | if prefetch { 1 << 3 } else { 0 };
        self.writable[r] = !(size - 1) & !0xf;
        self
    }

    /// A 64-bit memory BAR (registers `index` and `index + 1`).
    pub fn mem64_bar(mut self, index: usize, address: u64, size: u64, prefetch: bool) -> Self {
        let r = Self::bar_reg(index);
        let mask = !(size - 1);
        self.regs[r] = address as u32 | 0b100 | if prefetch { 1 << 3 } else { 0 };
        self.regs[r + 1] = (address >> 32) as u32;
        self.writable[r] = mask as u32 & !0xf;
        self.writable[r + 1] = (mask >> 32) as u32;
        self
    }

    /// An I/O BAR of `size` ports that decodes 16 address bits (upper half reads 0).
    pub fn io_bar(mut self, index: usize, port: u16, size: u32) -> Self {
        let r = Self::bar_reg(index);
        self.regs[r] = u32::from(port) | 1;
        self.writable[r] = !(size - 1) & 0xfffc;
        self
    }

    /// Points the capability list at `first` and sets the status bit.
    pub fn cap_pointer(mut self, first: u8) -> Self {
        self.regs[1] |= 1 << (16 + 4);
        self.regs[0x34 / 4] = u32::from(first);
        self
    }

    /// A classic capability header at `offset`.
    pub fn cap(mut self, offset: u8, id: u8, next: u8) -> Self {
        let r = usize::from(offset) / 4;
        self.regs[r] = self.regs[r] & 0xffff_0000 | u32::from(next) << 8 | u32::from(id);
        self
    }

    /// Makes `count` dwords from `offset` fully writable (e.g. an MSI capability's
    /// control, address and data registers).
    #[allow(dead_code)]
    pub fn writable_dwords(mut self, offset: u16, count: usize) -> Self {
        let r = usize::from(offset) / 4;
        for w in &mut self.writable[r..r + count] {
            *w = u32::MAX;
        }
        self
    }

    /// An extended capability header at `offset`.
    pub fn ext_cap(mut self, offset: u16, id: u16, version: u8, next: u16) -> Self {
        self.regs[usize::from(offset) / 4] =
            u32::from(next) << 20 | u32::from(version) << 16 | u32::from(id);
        self
    }

    pub fn reg(&self, offset: u16) -> u32 {
        self.regs[usize::from(offset) / 4]
    }
}

#[derive(Default)]
pub struct FakeSpace {
    functions: RefCell<BTreeMap<Bdf, FakeFunction>>,
    /// BAR registers written while the matching decode was enabled.
    pub violations: Cell<usize>,
    /// Configuration reads served (absent functions included).
    pub reads: Cell<usize>,
}

impl FakeSpace {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(self, at: Bdf, f: FakeFunction) -> Self {
        self.functions.borrow_mut().insert(at, f);
        self
    }

    pub fn function(&self, at: Bdf) -> FakeFunction {
        self.functions.borrow()[&at].clone()
    }

    /// The function at `at`, if there is one.
    pub fn function_or_none(&self, at: Bdf) -> Option<FakeFunction> {
        self.functions.borrow().get(&at).cloned()
    }
}

impl ConfigAccess for FakeSpace {
    fn read32(&self, bdf: Bdf, offset: u16) -> u32 {
        assert_eq!(offset % 4, 0, "unaligned config read at {offset:#x}");
        assert!(offset < 4096);
        self.reads.set(self.reads.get() + 1);
        self.functions
            .borrow()
            .get(&bdf)
            .map_or(u32::MAX, |f| f.regs[usize::from(offset) / 4])
    }

    fn write32(&self, bdf: Bdf, offset: u16, value: u32) {
        assert_eq!(offset % 4, 0, "unaligned config write at {offset:#x}");
        assert!(offset < 4096);
        let mut map = self.functions.borrow_mut();
        let Some(f) = map.get_mut(&bdf) else { return };
        let r = usize::from(offset) / 4;
        if r == 1 {
            let status = (f.regs[1] >> 16) & !((value >> 16) & STATUS_RW1C);
            let command = f.regs[1] & !COMMAND_WRITABLE | value & COMMAND_WRITABLE;
            f.regs[1] = status << 16 | command & 0xffff;
            return;
        }
        let header_type = (f.regs[3] >> 16) & 0x7f;
        let bars = if header_type == 0 { 6 } else { 2 };
        if (4..4 + bars).contains(&r) {
            let io = f.regs[r] & 1 != 0;
            let decode = if io { CMD_IO } else { CMD_MEM };
            if f.regs[1] & decode != 0 {
                self.violations.set(self.violations.get() + 1);
            }
        }
        f.regs[r] = f.regs[r] & !f.writable[r] | value & f.writable[r];
    }
}

/// Real configuration space (first 256 bytes) captured by data/capture.py.
macro_rules! captured {
    ($name:literal) => {
        include_bytes!(concat!("../data/qemu-7.2-q35-", $name, ".cfg"))
    };
}

/// QEMU 7.2 `-M q35 -nodefaults -device intel-iommu -device edu` as SeaBIOS
/// leaves it, from captured bytes: host bridge, edu at 00:01.0, and the ICH9
/// functions at 00:1f. The BAR sizes (which bits are writable) are those
/// QEMU's `info pci` reports for the same machine.
pub fn q35_with_edu() -> FakeSpace {
    FakeSpace::new()
        .with(bdf(0, 0, 0), FakeFunction::captured(captured!("00.00.0")))
        .with(
            bdf(0, 1, 0),
            FakeFunction::captured(captured!("00.01.0")).bar_size(0, 1 << 20),
        )
        .with(
            bdf(0, 0x1f, 0),
            FakeFunction::captured(captured!("00.1f.0")),
        )
        .with(
            bdf(0, 0x1f, 2),
            FakeFunction::captured(captured!("00.1f.2"))
                .bar_size(4, 0x20)
                .bar_size(5, 0x1000),
        )
        .with(
            bdf(0, 0x1f, 3),
            FakeFunction::captured(captured!("00.1f.3")).bar_size(4, 0x40),
        )
}
