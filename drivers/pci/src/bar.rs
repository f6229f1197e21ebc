//! Base address registers: decoding and size probing.
//!
//! Sizing follows the PCI specification: with I/O and memory decode turned off
//! in the command register (so the device never decodes a half-written or
//! all-ones address), write all ones to the BAR, read back which address bits
//! stuck, restore the original value, and finally restore the command register.
//! The size is the lowest writable address bit; a 64-bit BAR is sized across
//! both of its registers. A BAR that reads back 0 is not implemented.

use core::fmt;

use crate::bdf::Bdf;
use crate::config::{read_command, regs, write_command, Command, ConfigAccess, Header};

/// Most BARs a header has (type 0).
pub const MAX_BARS: usize = 6;

/// Bit 0 of a BAR: it decodes I/O space.
const BAR_IO: u32 = 1 << 0;
/// Bits 2:1 of a memory BAR: its type.
const BAR_MEM_TYPE_MASK: u32 = 0b11 << 1;
/// Memory BAR type: 64-bit (two registers).
const BAR_MEM_TYPE_64: u32 = 0b10 << 1;
/// Memory BAR type: 32-bit, below 1 MiB (legacy).
const BAR_MEM_TYPE_1M: u32 = 0b01 << 1;
/// Bit 3 of a memory BAR: prefetchable.
const BAR_MEM_PREFETCH: u32 = 1 << 3;
/// Address bits of a memory BAR.
const BAR_MEM_ADDR_MASK: u32 = !0xf;
/// Address bits of an I/O BAR.
const BAR_IO_ADDR_MASK: u32 = !0x3;

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// I/O port space.
    Io,
    /// 32-bit memory space.
    Memory32,
    /// 32-bit memory space below 1 MiB (a legacy type).
    Memory1M,
    /// 64-bit memory space, spanning this register and the next.
    Memory64,
}

/// One probed base address register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// BAR number (0..=5); a 64-bit BAR is named by its lower register.
    pub index: u8,
    /// What it decodes.
    pub kind: BarKind,
    /// Prefetchable memory (always false for I/O).
    pub prefetchable: bool,
    /// The address firmware assigned (may be 0 when unassigned).
    pub address: u64,
    /// Size in bytes: a power of two.
    pub size: u64,
}

impl Bar {
    /// Whether this is a memory BAR (of any width).
    pub const fn is_memory(&self) -> bool {
        !matches!(self.kind, BarKind::Io)
    }

    /// The offset of the BAR's (lower) register in configuration space.
    pub const fn register(&self) -> u16 {
        regs::BAR0 + 4 * self.index as u16
    }
}

impl fmt::Display for Bar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            BarKind::Io => "io",
            BarKind::Memory32 => "mem32",
            BarKind::Memory1M => "mem1M",
            BarKind::Memory64 => "mem64",
        };
        write!(
            f,
            "BAR{} {kind}{} {:#x} size {:#x}",
            self.index,
            if self.prefetchable { " pref" } else { "" },
            self.address,
            self.size
        )
    }
}

/// The BARs of one function, by register index; unimplemented registers and
/// the upper halves of 64-bit BARs are `None`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bars {
    slots: [Option<Bar>; MAX_BARS],
}

impl Bars {
    /// The BAR whose (lower) register is number `index`.
    pub fn get(&self, index: usize) -> Option<Bar> {
        self.slots.get(index).copied().flatten()
    }

    /// The implemented BARs in register order.
    pub fn iter(&self) -> impl Iterator<Item = Bar> + '_ {
        self.slots.iter().filter_map(|b| *b)
    }
}

/// Lowest set bit of the writable address bits: the size of the decoded window.
const fn size_from_mask(mask: u64) -> u64 {
    mask & mask.wrapping_neg()
}

/// Writes all ones to a BAR register, returns what reads back, and restores it.
fn size_register<C: ConfigAccess + ?Sized>(cfg: &C, bdf: Bdf, reg: u16, original: u32) -> u32 {
    cfg.write32(bdf, reg, u32::MAX);
    let stuck = cfg.read32(bdf, reg);
    cfg.write32(bdf, reg, original);
    stuck
}

/// Probes every BAR of `bdf` (6 for an endpoint, 2 for a PCI-PCI bridge, none
/// for other layouts); `None` when no function answers at `bdf`.
///
/// Memory and I/O decode are off while sizing and the command register and
/// every BAR are restored afterwards. A 64-bit BAR in the last register (it has
/// no upper half) is malformed and left out.
pub fn probe_bars<C: ConfigAccess + ?Sized>(cfg: &C, bdf: Bdf) -> Option<Bars> {
    let header = Header::read(cfg, bdf)?;
    let count = header.header_type.bar_count();
    let mut bars = Bars::default();
    if count == 0 {
        return Some(bars);
    }
    let command = read_command(cfg, bdf);
    let decode = Command::IO_SPACE | Command::MEMORY_SPACE;
    if command.intersects(decode) {
        write_command(cfg, bdf, command.difference(decode));
    }

    let mut index = 0u8;
    while index < count {
        let reg = regs::BAR0 + 4 * u16::from(index);
        let lo = cfg.read32(bdf, reg);
        let mut next = index + 1;
        let bar = if lo & BAR_IO != 0 {
            let mask = size_register(cfg, bdf, reg, lo) & BAR_IO_ADDR_MASK;
            (mask != 0).then_some(Bar {
                index,
                kind: BarKind::Io,
                prefetchable: false,
                address: u64::from(lo & BAR_IO_ADDR_MASK),
                size: size_from_mask(u64::from(mask)),
            })
        } else {
            let prefetchable = lo & BAR_MEM_PREFETCH != 0;
            if lo & BAR_MEM_TYPE_MASK == BAR_MEM_TYPE_64 {
                next = index + 2;
                if next > count {
                    None
                } else {
                    let hi_reg = reg + 4;
                    let hi = cfg.read32(bdf, hi_reg);
                    let lo_mask = size_register(cfg, bdf, reg, lo) & BAR_MEM_ADDR_MASK;
                    let hi_mask = size_register(cfg, bdf, hi_reg, hi);
                    let mask = u64::from(hi_mask) << 32 | u64::from(lo_mask);
                    (mask != 0).then_some(Bar {
                        index,
                        kind: BarKind::Memory64,
                        prefetchable,
                        address: u64::from(hi) << 32 | u64::from(lo & BAR_MEM_ADDR_MASK),
                        size: size_from_mask(mask),
                    })
                }
            } else {
                let mask = size_register(cfg, bdf, reg, lo) & BAR_MEM_ADDR_MASK;
                (mask != 0).then_some(Bar {
                    index,
                    kind: if lo & BAR_MEM_TYPE_MASK == BAR_MEM_TYPE_1M {
                        BarKind::Memory1M
                    } else {
                        BarKind::Memory32
                    },
                    prefetchable,
                    address: u64::from(lo & BAR_MEM_ADDR_MASK),
                    size: size_from_mask(u64::from(mask)),
                })
            }
        };
        if let Some(slot) = bars.slots.get_mut(usize::from(index)) {
            *slot = bar;
        }
        index = next;
    }

    if command.intersects(decode) {
        write_command(cfg, bdf, command);
    }
    Some(bars)
}
