//! Primary fault records: decoding and counting.
//!
//! A fault recording register is 128 bits: fault info / page address (63:12), SID (79:64),
//! reason (103:96), T (126: 0 = write, 1 = read) and F (127, write 1 to clear).

use alloc::collections::BTreeMap;

use crate::entry::SourceId;
use crate::regs::frcd;

/// Direction of the faulting request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAccess {
    /// The device tried to read memory (DMA to the device).
    Read,
    /// The device tried to write memory.
    Write,
}

/// The fault reason codes of legacy-mode DMA remapping (VT-d appendix A).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultReason {
    /// 1: the root entry of the bus is not present.
    RootEntryNotPresent,
    /// 2: the context entry of the device is not present.
    ContextEntryNotPresent,
    /// 3: the context entry is invalid (bad AW or TT).
    ContextEntryInvalid,
    /// 4: the address is beyond the domain's address width.
    AddressBeyondMgaw,
    /// 5: write to a page without write permission.
    WriteDenied,
    /// 6: read from a page without read permission (or not present).
    ReadDenied,
    /// 7: a page-table entry address could not be accessed.
    PagingEntryInvalid,
    /// 8: the root table address could not be accessed.
    RootTableInvalid,
    /// 9: the context table address could not be accessed.
    ContextTableInvalid,
    /// 0xA: reserved bits set in a root entry.
    RootEntryReserved,
    /// 0xB: reserved bits set in a context entry.
    ContextEntryReserved,
    /// 0xC: reserved bits set in a page-table entry.
    PagingEntryReserved,
    /// 0xD: the request type is blocked by the context entry's TT.
    TranslationTypeBlocked,
    /// 0x20: reserved fields set in a remappable interrupt request.
    IrRequestReserved,
    /// 0x21: the interrupt index is past the table size IRTA.S configures.
    IrIndexOutOfRange,
    /// 0x22: the IRTE the index names is not present.
    IrEntryNotPresent,
    /// 0x23: the interrupt remapping table could not be accessed.
    IrTableInvalid,
    /// 0x24: reserved fields (or invalid mode values) in a present IRTE.
    IrEntryReserved,
    /// 0x25: a compatibility-format interrupt blocked (CFIS clear, or EIME set).
    IrCompatibilityBlocked,
    /// 0x26: the requester failed the IRTE's source-id validation (SVT/SQ/SID).
    IrSourceIdInvalid,
    /// 0x27: a posted-interrupt descriptor could not be accessed.
    IrPostedDescriptorInvalid,
    /// Any other code (scalable-mode reasons).
    Other(u8),
}

impl FaultReason {
    /// Decodes a reason code.
    pub const fn from_code(code: u8) -> Self {
        match code {
            1 => Self::RootEntryNotPresent,
            2 => Self::ContextEntryNotPresent,
            3 => Self::ContextEntryInvalid,
            4 => Self::AddressBeyondMgaw,
            5 => Self::WriteDenied,
            6 => Self::ReadDenied,
            7 => Self::PagingEntryInvalid,
            8 => Self::RootTableInvalid,
            9 => Self::ContextTableInvalid,
            0xa => Self::RootEntryReserved,
            0xb => Self::ContextEntryReserved,
            0xc => Self::PagingEntryReserved,
            0xd => Self::TranslationTypeBlocked,
            0x20 => Self::IrRequestReserved,
            0x21 => Self::IrIndexOutOfRange,
            0x22 => Self::IrEntryNotPresent,
            0x23 => Self::IrTableInvalid,
            0x24 => Self::IrEntryReserved,
            0x25 => Self::IrCompatibilityBlocked,
            0x26 => Self::IrSourceIdInvalid,
            0x27 => Self::IrPostedDescriptorInvalid,
            c => Self::Other(c),
        }
    }

    /// The raw code.
    pub const fn code(self) -> u8 {
        match self {
            Self::RootEntryNotPresent => 1,
            Self::ContextEntryNotPresent => 2,
            Self::ContextEntryInvalid => 3,
            Self::AddressBeyondMgaw => 4,
            Self::WriteDenied => 5,
            Self::ReadDenied => 6,
            Self::PagingEntryInvalid => 7,
            Self::RootTableInvalid => 8,
            Self::ContextTableInvalid => 9,
            Self::RootEntryReserved => 0xa,
            Self::ContextEntryReserved => 0xb,
            Self::PagingEntryReserved => 0xc,
            Self::TranslationTypeBlocked => 0xd,
            Self::IrRequestReserved => 0x20,
            Self::IrIndexOutOfRange => 0x21,
            Self::IrEntryNotPresent => 0x22,
            Self::IrTableInvalid => 0x23,
            Self::IrEntryReserved => 0x24,
            Self::IrCompatibilityBlocked => 0x25,
            Self::IrSourceIdInvalid => 0x26,
            Self::IrPostedDescriptorInvalid => 0x27,
            Self::Other(c) => c,
        }
    }

    /// An interrupt-remapping fault (codes 0x20-0x27) rather than a DMA one.
    pub const fn is_interrupt_remapping(self) -> bool {
        matches!(self.code(), 0x20..=0x27)
    }
}

/// One decoded primary fault record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    /// Index of the fault recording register it came from.
    pub index: usize,
    /// Requester.
    pub source: SourceId,
    /// Page address of the faulting request (bits 11:0 are not reported).
    pub address: u64,
    /// Read or write (meaningless for interrupt-remapping faults).
    pub access: FaultAccess,
    /// Why it faulted.
    pub reason: FaultReason,
    /// Domain the source was attached to when the record was drained, if any.
    pub domain: Option<u16>,
}

impl FaultRecord {
    /// For an interrupt-remapping fault, the interrupt index of the request (fault info
    /// bits 63:48); `None` for DMA faults.
    pub const fn interrupt_index(&self) -> Option<u16> {
        if self.reason.is_interrupt_remapping() {
            Some((self.address >> 48) as u16)
        } else {
            None
        }
    }

    /// Decodes a record from its low qword and its SID and high dwords (the F bit is not
    /// checked here).
    pub const fn decode(index: usize, lo: u64, sid_dword: u32, high_dword: u32) -> Self {
        Self {
            index,
            source: SourceId(sid_dword as u16),
            address: lo & !0xfff,
            access: if high_dword & frcd::T != 0 {
                FaultAccess::Read
            } else {
                FaultAccess::Write
            },
            reason: FaultReason::from_code(high_dword as u8),
            domain: None,
        }
    }
}

/// Fault counters of one unit.
#[derive(Debug, Default, Clone)]
pub struct FaultCounters {
    /// Fault records drained.
    pub recorded: u64,
    /// Faults lost to primary fault overflow (each PFO observation counts 1: the hardware
    /// does not say how many were dropped, so this is a lower bound).
    pub dropped: u64,
    /// Records whose source was not attached to any domain.
    pub unattached: u64,
    /// Interrupt-remapping faults (reasons 0x20-0x27) among `recorded`.
    pub interrupt_remapping: u64,
    per_domain: BTreeMap<u16, u64>,
    per_source: BTreeMap<SourceId, u64>,
    ir_per_source: BTreeMap<SourceId, u64>,
}

impl FaultCounters {
    /// Faults recorded for domain `did`.
    pub fn domain(&self, did: u16) -> u64 {
        self.per_domain.get(&did).copied().unwrap_or(0)
    }
    /// Faults recorded for source `sid`.
    pub fn source(&self, sid: SourceId) -> u64 {
        self.per_source.get(&sid).copied().unwrap_or(0)
    }
    /// Interrupt-remapping faults recorded for source `sid`.
    pub fn interrupt_source(&self, sid: SourceId) -> u64 {
        self.ir_per_source.get(&sid).copied().unwrap_or(0)
    }
    /// Iterator over `(source, count)`.
    pub fn sources(&self) -> impl Iterator<Item = (SourceId, u64)> + '_ {
        self.per_source.iter().map(|(s, c)| (*s, *c))
    }
    pub(crate) fn count(&mut self, r: &FaultRecord) {
        self.recorded += 1;
        *self.per_source.entry(r.source).or_insert(0) += 1;
        if r.reason.is_interrupt_remapping() {
            self.interrupt_remapping += 1;
            *self.ir_per_source.entry(r.source).or_insert(0) += 1;
        }
        match r.domain {
            Some(d) => *self.per_domain.entry(d).or_insert(0) += 1,
            None => self.unattached += 1,
        }
    }
}

/// What one call of [`crate::Unit::poll_faults`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultPoll {
    /// Records drained and cleared in this call.
    pub drained: usize,
    /// A primary fault overflow was seen (and cleared) in this call.
    pub overflow: bool,
    /// Records were still pending when the budget ran out: call again.
    pub more: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_record() {
        let r = FaultRecord::decode(0, 0x1234_5678_9abc, 0x0018, frcd::F | frcd::T | 6);
        assert_eq!(r.source, SourceId::new(0, 3, 0));
        assert_eq!(r.address, 0x1234_5678_9000);
        assert_eq!(r.access, FaultAccess::Read);
        assert_eq!(r.reason, FaultReason::ReadDenied);
        let w = FaultRecord::decode(1, 0x4000, 0x0120, frcd::F | 5);
        assert_eq!(w.access, FaultAccess::Write);
        assert_eq!(w.reason, FaultReason::WriteDenied);
        assert_eq!(w.source, SourceId::new(1, 4, 0));
        for c in 0..=255u8 {
            assert_eq!(FaultReason::from_code(c).code(), c);
        }
    }

    #[test]
    fn counters() {
        let mut c = FaultCounters::default();
        let mut r = FaultRecord::decode(0, 0, 0x10, 5);
        c.count(&r);
        r.domain = Some(3);
        c.count(&r);
        assert_eq!(c.recorded, 2);
        assert_eq!(c.unattached, 1);
        assert_eq!(c.domain(3), 1);
        assert_eq!(c.source(SourceId(0x10)), 2);
        assert_eq!(c.sources().count(), 1);
    }
}
