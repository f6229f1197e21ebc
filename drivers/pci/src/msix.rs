//! MSI-X virtualization for assigned functions, the pure state: where a function's MSI-X
//! table and pending-bit array (PBA) lie ([`MsixCapability`]: which BAR, which offset, and the
//! pages the hypervisor keeps out of the guest's second stage, [`MsixCapability::trapped`]),
//! the guest's virtual message control ([`VirtualMsixControl`], read and written through the
//! configuration filter instead of the device's), and the guest's virtual table
//! ([`VirtualMsixTable`]), which the hypervisor emulates on the guest's faulting accesses to
//! the unmapped table pages.
//!
//! The guest never writes the device's table: each change of an entry that makes it live or
//! not ([`VirtualMsixTable::target`]: MSI-X on, function not masked, entry not masked, a valid
//! fixed/lowest-priority, edge, physical message to a vector >= 32) is reported to the
//! hypervisor, which programs the device's entry with a remappable-format message naming an
//! IRTE it owns, or masks it. At most [`MAX_VECTORS`] vectors are offered (the table size the
//! guest reads is clamped).

use crate::msi::{msi_target, GuestMsiTarget};
use crate::{caps::cap_id, find_capability, Bars, Bdf, ConfigAccess};

/// Message control: MSI-X enable.
const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Message control: table size minus one (10:0).
const CONTROL_TABLE_SIZE: u16 = 0x7ff;
/// Bytes of one table entry.
pub const ENTRY_SIZE: u32 = 16;
/// Vector control: the entry's mask bit.
const VECTOR_MASKED: u32 = 1;
/// Vectors offered to a guest at most.
pub const MAX_VECTORS: usize = 64;
/// The granule the second stage maps (the trapped range is rounded to it).
const PAGE: u64 = 4096;

/// A structure (table or PBA) in one of the function's memory BARs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixRegion {
    /// BAR indicator: the BAR register (0..6) whose memory holds it.
    pub bir: u8,
    /// Offset in that BAR (8-byte aligned).
    pub offset: u32,
}

impl MsixRegion {
    const fn from_register(v: u32) -> Self {
        MsixRegion {
            bir: (v & 7) as u8,
            offset: v & !7,
        }
    }
}

/// Where a function's MSI-X capability, table and PBA lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixCapability {
    /// Offset of the capability header in configuration space.
    pub offset: u16,
    /// Entries of the device's table.
    pub entries: u16,
    /// The table.
    pub table: MsixRegion,
    /// The pending-bit array.
    pub pba: MsixRegion,
}

/// A register of the MSI-X capability, by its dword.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsixRegister {
    /// Header dword: id, next pointer, message control (bits 31:16).
    Control,
    /// Table offset and BIR (read only).
    TableLocation,
    /// PBA offset and BIR (read only).
    PbaLocation,
}

/// A range of guest-physical (= host-physical: BARs are mapped at their address) memory the
/// hypervisor keeps unmapped and emulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrappedRange {
    /// First byte (page aligned).
    pub start: u64,
    /// Bytes (whole pages).
    pub len: u64,
}

impl TrappedRange {
    /// Whether `address` lies in the range.
    pub const fn contains(&self, address: u64) -> bool {
        address >= self.start && address - self.start < self.len
    }
}

/// What a guest access to the trapped pages reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsixAccess {
    /// The table, at this byte offset.
    Table(u32),
    /// The PBA, at this byte offset.
    Pba(u32),
    /// Other registers of the BAR that share the trapped pages, at this byte offset in the
    /// BAR (the hypervisor forwards these to the device).
    Other(u64),
}

impl MsixCapability {
    /// Finds `bdf`'s MSI-X capability.
    pub fn find<C: ConfigAccess + ?Sized>(cfg: &C, bdf: Bdf) -> Option<Self> {
        let offset = u16::from(find_capability(cfg, bdf, cap_id::MSIX)?);
        Some(Self::from_registers(
            offset,
            cfg.read32(bdf, offset),
            cfg.read32(bdf, offset + 4),
            cfg.read32(bdf, offset + 8),
        ))
    }

    /// The capability at `offset` from its three dwords.
    pub const fn from_registers(offset: u16, header: u32, table: u32, pba: u32) -> Self {
        MsixCapability {
            offset,
            entries: ((header >> 16) as u16 & CONTROL_TABLE_SIZE) + 1,
            table: MsixRegion::from_register(table),
            pba: MsixRegion::from_register(pba),
        }
    }

    /// Entries the guest sees (the device's, at most [`MAX_VECTORS`]).
    pub const fn guest_entries(&self) -> u16 {
        if self.entries as usize > MAX_VECTORS {
            MAX_VECTORS as u16
        } else {
            self.entries
        }
    }

    /// Bytes of the device's table.
    pub const fn table_len(&self) -> u32 {
        self.entries as u32 * ENTRY_SIZE
    }

    /// Bytes of the device's PBA (one bit per entry, in quadwords).
    pub const fn pba_len(&self) -> u32 {
        (self.entries as u32).div_ceil(64) * 8
    }

    /// Which register the dword at `offset` (dword-aligned) is, if one of the capability's.
    pub fn register(&self, offset: u16) -> Option<MsixRegister> {
        match offset.checked_sub(self.offset)? {
            0 => Some(MsixRegister::Control),
            4 => Some(MsixRegister::TableLocation),
            8 => Some(MsixRegister::PbaLocation),
            _ => None,
        }
    }

    /// The page-aligned ranges of the table and the PBA (one when they share pages), which
    /// the hypervisor leaves unmapped in the guest; `None` when either does not lie inside a
    /// memory BAR of `bars` (a malformed device: not offered).
    pub fn trapped(&self, bars: &Bars) -> Option<[Option<TrappedRange>; 2]> {
        let range = |r: MsixRegion, len: u32| {
            let bar = bars.get(usize::from(r.bir)).filter(|b| b.is_memory())?;
            let end = u64::from(r.offset).checked_add(u64::from(len))?;
            if len == 0 || end > bar.size {
                return None;
            }
            let start = (bar.address + u64::from(r.offset)) & !(PAGE - 1);
            let stop = (bar.address + end).div_ceil(PAGE) * PAGE;
            Some(TrappedRange {
                start,
                len: stop - start,
            })
        };
        let t = range(self.table, self.table_len())?;
        let p = range(self.pba, self.pba_len())?;
        let overlap = t.start < p.start + p.len && p.start < t.start + t.len;
        Some(if overlap {
            let start = t.start.min(p.start);
            let end = (t.start + t.len).max(p.start + p.len);
            [
                Some(TrappedRange {
                    start,
                    len: end - start,
                }),
                None,
            ]
        } else {
            [Some(t), Some(p)]
        })
    }

    /// What the access at guest-physical `address` (inside a trapped range) reaches, given
    /// the BARs.
    pub fn classify(&self, bars: &Bars, address: u64) -> Option<MsixAccess> {
        let within = |r: MsixRegion, len: u32| {
            let bar = bars.get(usize::from(r.bir))?;
            let base = bar.address + u64::from(r.offset);
            (address >= base && address - base < u64::from(len)).then(|| (address - base) as u32)
        };
        if let Some(o) = within(self.table, self.table_len()) {
            return Some(MsixAccess::Table(o));
        }
        if let Some(o) = within(self.pba, self.pba_len()) {
            return Some(MsixAccess::Pba(o));
        }
        let bar = bars.get(usize::from(self.table.bir))?;
        (address >= bar.address && address - bar.address < bar.size)
            .then(|| MsixAccess::Other(address - bar.address))
    }

    /// Writes the device's message control: MSI-X `enable`, function `masked`.
    pub fn set_control<C: ConfigAccess + ?Sized>(
        &self,
        cfg: &C,
        bdf: Bdf,
        enable: bool,
        masked: bool,
    ) {
        let header = cfg.read32(bdf, self.offset);
        let control = (header >> 16) as u16 & !(CONTROL_ENABLE | CONTROL_FUNCTION_MASK)
            | if enable { CONTROL_ENABLE } else { 0 }
            | if masked { CONTROL_FUNCTION_MASK } else { 0 };
        cfg.write32(bdf, self.offset, header & 0xffff | u32::from(control) << 16);
    }

    /// Turns the device's MSI-X off.
    pub fn disable<C: ConfigAccess + ?Sized>(&self, cfg: &C, bdf: Bdf) {
        self.set_control(cfg, bdf, false, false);
    }
}

/// The guest's MSI-X message control.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VirtualMsixControl {
    /// MSI-X enable.
    pub enabled: bool,
    /// Function mask.
    pub function_masked: bool,
}

impl VirtualMsixControl {
    /// What the guest reads from register `r` of `cap`, whose next pointer it sees as
    /// `next`, given the device's real dword (the locations pass through: they are where
    /// the guest finds the trapped table and PBA).
    pub fn read(&self, cap: &MsixCapability, r: MsixRegister, next: u8, real: u32) -> u32 {
        match r {
            MsixRegister::Control => {
                let control = (cap.guest_entries() - 1)
                    | if self.enabled { CONTROL_ENABLE } else { 0 }
                    | if self.function_masked {
                        CONTROL_FUNCTION_MASK
                    } else {
                        0
                    };
                u32::from(control) << 16 | u32::from(next) << 8 | u32::from(cap_id::MSIX)
            }
            MsixRegister::TableLocation | MsixRegister::PbaLocation => real,
        }
    }

    /// The guest writes `value` under byte `mask` to register `r`; returns whether the
    /// virtual state changed (the locations are read only).
    pub fn write(&mut self, r: MsixRegister, value: u32, mask: u32) -> bool {
        let before = *self;
        if r == MsixRegister::Control && mask & 0xff00_0000 != 0 {
            let control = (value >> 16) as u16;
            self.enabled = control & CONTROL_ENABLE != 0;
            self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        }
        *self != before
    }
}

/// One entry of the guest's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixEntry {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
    /// The vector control's mask bit (set at reset).
    pub masked: bool,
}

impl Default for MsixEntry {
    fn default() -> Self {
        MsixEntry {
            address: 0,
            data: 0,
            masked: true,
        }
    }
}

/// Why a guest access to the table was not emulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableAccessError {
    /// Not a naturally aligned dword.
    Unaligned,
    /// Past the entries the guest sees.
    OutOfRange,
}

/// The dwords a guest access of `size` bytes at byte `offset` of the table or PBA covers:
/// `(first dword's offset, dwords)` for a naturally aligned dword or qword, the accesses the
/// PCI specification allows there; `None` for anything else (misaligned, 1 or 2 bytes,
/// wider), which the hypervisor ignores, as Xen does: writes are dropped, reads return all
/// ones.
pub const fn dwords(offset: u32, size: u8) -> Option<(u32, u32)> {
    match size {
        4 | 8 if offset.is_multiple_of(size as u32) => Some((offset, size as u32 / 4)),
        _ => None,
    }
}

/// The guest's virtual MSI-X table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualMsixTable {
    entries: [MsixEntry; MAX_VECTORS],
    len: u16,
}

impl VirtualMsixTable {
    /// The table of `cap` as at reset: every entry masked.
    pub fn new(cap: &MsixCapability) -> Self {
        VirtualMsixTable {
            entries: [MsixEntry::default(); MAX_VECTORS],
            len: cap.guest_entries(),
        }
    }

    /// Entries.
    pub const fn len(&self) -> u16 {
        self.len
    }

    /// Whether the table has no entries (never: a capability has at least one).
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entry `i`.
    pub fn entry(&self, i: u16) -> Option<MsixEntry> {
        (i < self.len).then(|| self.entries[usize::from(i)])
    }

    fn locate(&self, offset: u32) -> Result<(usize, u32), TableAccessError> {
        if !offset.is_multiple_of(4) {
            return Err(TableAccessError::Unaligned);
        }
        let i = offset / ENTRY_SIZE;
        if i >= u32::from(self.len) {
            return Err(TableAccessError::OutOfRange);
        }
        Ok((i as usize, (offset % ENTRY_SIZE) / 4))
    }

    /// The guest reads the dword at byte `offset` of the table.
    pub fn read(&self, offset: u32) -> Result<u32, TableAccessError> {
        let (i, word) = self.locate(offset)?;
        let e = &self.entries[i];
        Ok(match word {
            0 => e.address as u32,
            1 => (e.address >> 32) as u32,
            2 => e.data,
            _ => u32::from(e.masked),
        })
    }

    /// The guest writes `value` to the dword at byte `offset`: returns the entry's index
    /// when its state changed (the hypervisor then reprograms or masks the device's entry).
    pub fn write(&mut self, offset: u32, value: u32) -> Result<Option<u16>, TableAccessError> {
        let (i, word) = self.locate(offset)?;
        let e = &mut self.entries[i];
        let before = *e;
        match word {
            // The low two address bits are reserved: they read as zero.
            0 => e.address = e.address & !0xffff_ffff | u64::from(value & !3),
            1 => e.address = e.address & 0xffff_ffff | u64::from(value) << 32,
            2 => e.data = value,
            _ => e.masked = value & VECTOR_MASKED != 0,
        }
        Ok((*e != before).then_some(i as u16))
    }

    /// The guest reads the dword at byte `offset` of the PBA, the device's pending dword
    /// being `real`: bits of entries the guest does not see read as zero.
    pub fn read_pba(&self, offset: u32, real: u32) -> Result<u32, TableAccessError> {
        if !offset.is_multiple_of(4) {
            return Err(TableAccessError::Unaligned);
        }
        let first = offset * 8;
        if first >= u32::from(self.len) {
            return Ok(0);
        }
        let visible = u32::from(self.len) - first;
        Ok(if visible >= 32 {
            real
        } else {
            real & ((1u32 << visible) - 1)
        })
    }

    /// Where entry `i` sends its interrupts, when it is live under `control`: MSI-X on, the
    /// function and the entry unmasked, and a fixed or lowest-priority, edge, physical
    /// message to a vector >= 32 (data bits 31:16 zero). `None` otherwise: the hypervisor
    /// keeps the device's entry masked.
    pub fn target(&self, i: u16, control: &VirtualMsixControl) -> Option<GuestMsiTarget> {
        let e = self.entry(i)?;
        if !control.enabled || control.function_masked || e.masked {
            return None;
        }
        msi_target(e.address, e.data)
    }
}
