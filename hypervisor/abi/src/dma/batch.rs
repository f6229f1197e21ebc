//! The batch area (header + fixed-size entries), single MAP/UNMAP in registers, MULTICALL
//! returns, and the pure validation the hypervisor runs on its copy of each entry.

use super::{is_page_aligned, DmaFlags, Limits, Op, PAGE_SIZE};
use crate::hypercall::{Args, Return};
use crate::status::Status;
use core::mem::offset_of;
use zerocopy::little_endian::{I64, U16, U32, U64};

/// `magic` of a [`BatchHeader`]: the bytes `"MDMA"`.
pub const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"MDMA");
/// `version` of a [`BatchHeader`] this ABI defines.
pub const BATCH_VERSION: u16 = 1;
/// Bytes of a [`BatchHeader`]; the first entry starts at this offset of the batch area.
pub const BATCH_HEADER_SIZE: usize = 64;
/// Bytes of an [`Entry`] (`entry_size` of the header).
pub const ENTRY_SIZE: usize = 48;
/// Most pages one batch area may span (`DMA_BATCH_REGISTER` RSI).
pub const MAX_BATCH_PAGES: u64 = 16;
/// The value a guest puts in `status` of an entry it submits: positive, so never a status the
/// hypervisor writes. An entry still holding it after a MULTICALL was not run.
pub const STATUS_PENDING: i64 = 1;

/// How many entries a batch area of `pages` pages holds, also capped by `max_batch`.
/// 0 for 0 pages.
pub const fn batch_capacity(pages: u64, max_batch: u32) -> u32 {
    if pages == 0 {
        return 0;
    }
    let pages = if pages > MAX_BATCH_PAGES {
        MAX_BATCH_PAGES
    } else {
        pages
    };
    let fit = (pages * PAGE_SIZE - BATCH_HEADER_SIZE as u64) / ENTRY_SIZE as u64;
    if fit < max_batch as u64 {
        fit as u32
    } else {
        max_batch
    }
}

abi_struct! {
    /// The header at offset 0 of a batch area (64 bytes, little-endian). Written by the guest
    /// before each MULTICALL; the hypervisor copies it once per call and never writes it.
    ///
    /// | offset | size | field | meaning |
    /// |---|---|---|---|
    /// | 0 | 4 | `magic` | [`BATCH_MAGIC`] (`"MDMA"`) |
    /// | 4 | 2 | `version` | [`BATCH_VERSION`] |
    /// | 6 | 2 | `entry_size` | [`ENTRY_SIZE`] (48) |
    /// | 8 | 4 | `count` | entries in this batch, at offsets `64 + i*48`, `i < count` |
    /// | 12 | 4 | `reserved0` | must be 0 |
    /// | 16 | 48 | `reserved` | must be 0 |
    pub struct BatchHeader: BATCH_HEADER_SIZE {
        /// [`BATCH_MAGIC`].
        pub magic: U32 @ 0,
        /// [`BATCH_VERSION`].
        pub version: U16 @ 4,
        /// [`ENTRY_SIZE`].
        pub entry_size: U16 @ 6,
        /// Number of entries.
        pub count: U32 @ 8,
        /// Must be 0.
        pub reserved0: U32 @ 12,
        /// Must be 0.
        pub reserved: [U64; 6] @ 16,
    }
}

impl BatchHeader {
    /// A valid header for `count` entries.
    pub const fn new(count: u32) -> BatchHeader {
        BatchHeader {
            magic: U32::new(BATCH_MAGIC),
            version: U16::new(BATCH_VERSION),
            entry_size: U16::new(ENTRY_SIZE as u16),
            count: U32::new(count),
            reserved0: U32::ZERO,
            reserved: [U64::ZERO; 6],
        }
    }
}

/// What [`validate_batch`] accepted: run entries `cursor..count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchInfo {
    /// Entries in the batch.
    pub count: u32,
    /// First entry to run.
    pub cursor: u32,
}

/// Validates a MULTICALL: the hypervisor's copy of the header, the cursor from RDI and the
/// registered area's `capacity` (from [`batch_capacity`]).
///
/// Checks, in this order (first failure wins):
/// 1. `magic != BATCH_MAGIC` → INVAL;
/// 2. `version != BATCH_VERSION` → UNSUPP;
/// 3. `entry_size != ENTRY_SIZE` → INVAL;
/// 4. a reserved field non-zero → INVAL;
/// 5. `count > capacity` or `count > limits.max_batch` → RANGE;
/// 6. `cursor > count` → RANGE (`cursor == count` is accepted and runs nothing).
pub fn validate_batch(
    header: &BatchHeader,
    cursor: u64,
    capacity: u32,
    limits: &Limits,
) -> Result<BatchInfo, Status> {
    if header.magic.get() != BATCH_MAGIC {
        return Err(Status::Inval);
    }
    if header.version.get() != BATCH_VERSION {
        return Err(Status::Unsupp);
    }
    if header.entry_size.get() as usize != ENTRY_SIZE {
        return Err(Status::Inval);
    }
    if header.reserved0.get() != 0 || header.reserved.iter().any(|r| r.get() != 0) {
        return Err(Status::Inval);
    }
    let count = header.count.get();
    if count > capacity || count > limits.max_batch {
        return Err(Status::Range);
    }
    if cursor > count as u64 {
        return Err(Status::Range);
    }
    Ok(BatchInfo {
        count,
        cursor: cursor as u32,
    })
}

abi_struct! {
    /// One batch entry (48 bytes, little-endian), at offset `64 + 48*i` of the batch area.
    ///
    /// | offset | size | field | dir | MAP | UNMAP |
    /// |---|---|---|---|---|---|
    /// | 0 | 2 | `op` | in | 1 | 2 |
    /// | 2 | 2 | `flags` | in | [`DmaFlags`], non-empty | must be 0 |
    /// | 4 | 4 | `reserved` | in | must be 0 | must be 0 |
    /// | 8 | 8 | `gpa` | in | first guest-physical byte | must be 0 |
    /// | 16 | 8 | `iova` | in/out | in: must be 0; out: the IOVA (0 on failure) | in: the mapping's IOVA; not written |
    /// | 24 | 8 | `length` | in | bytes | bytes (the whole mapping) |
    /// | 32 | 8 | `status` | out | [`Status`] as `i64` | same |
    /// | 40 | 8 | `done` | out | bytes mapped: `length` on OK, else 0 | bytes unmapped, same rule |
    ///
    /// The hypervisor ignores the input values of `status` and `done` (a guest writes
    /// [`STATUS_PENDING`] and 0) and writes `status`, `done` (and `iova` for MAP) of every entry
    /// it runs, whether it succeeds or fails. It never writes an entry it did not run.
    pub struct Entry: ENTRY_SIZE {
        /// [`Op`] as `u16`.
        pub op: U16 @ 0,
        /// [`DmaFlags`] bits.
        pub flags: U16 @ 2,
        /// Must be 0.
        pub reserved: U32 @ 4,
        /// MAP: first guest-physical byte. UNMAP: must be 0.
        pub gpa: U64 @ 8,
        /// MAP: in 0, out the IOVA. UNMAP: the IOVA the mapping starts at.
        pub iova: U64 @ 16,
        /// Bytes, a non-zero multiple of [`PAGE_SIZE`].
        pub length: U64 @ 24,
        /// Out: the entry's [`Status`] (raw).
        pub status: I64 @ 32,
        /// Out: bytes done.
        pub done: U64 @ 40,
    }
}

impl Entry {
    /// Byte offset of `iova` inside an entry (the MAP write-back).
    pub const IOVA_OFFSET: usize = offset_of!(Entry, iova);
    /// Byte offset of `status`; `status` and `done` are written back together as 16 bytes.
    pub const STATUS_OFFSET: usize = offset_of!(Entry, status);

    /// A MAP entry as a guest submits it.
    pub const fn map(gpa: u64, length: u64, flags: DmaFlags) -> Entry {
        Entry {
            op: U16::new(Op::Map as u16),
            flags: U16::new(flags.bits()),
            reserved: U32::ZERO,
            gpa: U64::new(gpa),
            iova: U64::ZERO,
            length: U64::new(length),
            status: I64::new(STATUS_PENDING),
            done: U64::ZERO,
        }
    }

    /// An UNMAP entry as a guest submits it.
    pub const fn unmap(iova: u64, length: u64) -> Entry {
        Entry {
            op: U16::new(Op::Unmap as u16),
            flags: U16::ZERO,
            reserved: U32::ZERO,
            gpa: U64::ZERO,
            iova: U64::new(iova),
            length: U64::new(length),
            status: I64::new(STATUS_PENDING),
            done: U64::ZERO,
        }
    }

    /// The byte offset of entry `index` in a batch area.
    pub const fn offset_of_index(index: u32) -> usize {
        BATCH_HEADER_SIZE + index as usize * ENTRY_SIZE
    }

    /// The raw status as a [`Status`]; `None` for [`STATUS_PENDING`] or garbage.
    pub const fn outcome_status(&self) -> Option<Status> {
        Status::from_raw(self.status.get())
    }
}

/// A validated request: what one entry, or one MAP/UNMAP call, asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Request {
    /// Map `[gpa, gpa+length)` with `flags`.
    Map {
        /// Page-aligned guest-physical address.
        gpa: u64,
        /// Non-zero page-multiple length; `gpa + length` does not overflow.
        length: u64,
        /// Non-empty rights.
        flags: DmaFlags,
    },
    /// Unmap the mapping `[iova, iova+length)`.
    Unmap {
        /// Page-aligned IOVA; `iova + length` fits the IOVA width.
        iova: u64,
        /// Non-zero page-multiple length.
        length: u64,
    },
}

impl Request {
    /// The entry a guest submits for this request.
    pub const fn to_entry(&self) -> Entry {
        match *self {
            Request::Map { gpa, length, flags } => Entry::map(gpa, length, flags),
            Request::Unmap { iova, length } => Entry::unmap(iova, length),
        }
    }

    /// The length in bytes.
    pub const fn length(&self) -> u64 {
        match *self {
            Request::Map { length, .. } | Request::Unmap { length, .. } => length,
        }
    }
}

/// Validates the hypervisor's copy of an entry: the ABI's share of the checks.
///
/// Checks, in this order (first failure wins):
/// 1. `op` not [`Op::Map`] or [`Op::Unmap`] → INVAL;
/// 2. `reserved != 0` → INVAL;
/// 3. a `flags` bit outside [`DmaFlags::KNOWN`] → INVAL;
/// 4. MAP with empty `flags`, or UNMAP with non-zero `flags` → INVAL;
/// 5. MAP with `iova != 0`, or UNMAP with `gpa != 0` → INVAL;
/// 6. `length == 0` → INVAL;
/// 7. the address (MAP: `gpa`, UNMAP: `iova`) or `length` not a multiple of [`PAGE_SIZE`]
///    → INVAL;
/// 8. `address + length` overflows 64 bits → RANGE;
/// 9. `length` larger than the IOVA space (`2^iova_width`), or for UNMAP
///    `iova + length > 2^iova_width` → RANGE;
/// 10. MAP longer than `max_map_pages` pages (when non-zero) → RANGE.
///
/// `status` and `done` are not looked at. The hypervisor's own checks follow (see the crate
/// docs, *Status codes*).
pub fn validate_entry(e: &Entry, limits: &Limits) -> Result<Request, Status> {
    let (gpa, iova, length) = (e.gpa.get(), e.iova.get(), e.length.get());
    let op = Op::from_raw(e.op.get()).ok_or(Status::Inval)?;
    if e.reserved.get() != 0 {
        return Err(Status::Inval);
    }
    let flags = DmaFlags::from_bits(e.flags.get()).ok_or(Status::Inval)?;
    let addr = match op {
        Op::Map => {
            if flags.is_empty() || iova != 0 {
                return Err(Status::Inval);
            }
            gpa
        }
        Op::Unmap => {
            if !flags.is_empty() || gpa != 0 {
                return Err(Status::Inval);
            }
            iova
        }
    };
    check_range(addr, length, limits, op == Op::Unmap)?;
    if op == Op::Map
        && limits.max_map_pages != 0
        && length / PAGE_SIZE > limits.max_map_pages as u64
    {
        return Err(Status::Range);
    }
    Ok(match op {
        Op::Map => Request::Map { gpa, length, flags },
        Op::Unmap => Request::Unmap { iova, length },
    })
}

fn check_range(addr: u64, length: u64, limits: &Limits, is_iova: bool) -> Result<(), Status> {
    if length == 0 || !is_page_aligned(addr) || !is_page_aligned(length) {
        return Err(Status::Inval);
    }
    let end = addr.checked_add(length).ok_or(Status::Range)?;
    let space = limits.iova_space();
    if length > space || (is_iova && end > space) {
        return Err(Status::Range);
    }
    Ok(())
}

/// Decodes and validates `DMA_MAP` registers: RDI = `gpa`, RSI = `length`, RDX = `flags`,
/// R10, R8, R9 ignored. A `flags` value above `u16::MAX` → INVAL; otherwise exactly the checks
/// of [`validate_entry`] on the equivalent MAP entry.
pub fn decode_map_regs(args: &Args, limits: &Limits) -> Result<Request, Status> {
    let [gpa, length, flags, ..] = args.0;
    let flags = u16::try_from(flags).map_err(|_| Status::Inval)?;
    let entry = Entry {
        flags: U16::new(flags),
        ..Entry::map(gpa, length, DmaFlags::EMPTY)
    };
    validate_entry(&entry, limits)
}

/// Decodes and validates `DMA_UNMAP` registers: RDI = `iova`, RSI = `length`, RDX must be 0
/// (INVAL otherwise; it is the `flags` of the equivalent entry), R10, R8, R9 ignored.
pub fn decode_unmap_regs(args: &Args, limits: &Limits) -> Result<Request, Status> {
    let [iova, length, flags, ..] = args.0;
    let flags = u16::try_from(flags).map_err(|_| Status::Inval)?;
    let entry = Entry {
        flags: U16::new(flags),
        ..Entry::unmap(iova, length)
    };
    validate_entry(&entry, limits)
}

/// What the hypervisor writes back into an entry it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryOutcome {
    /// The entry's status.
    pub status: Status,
    /// Bytes done (`length` on OK, 0 otherwise).
    pub done: u64,
    /// For a MAP: the IOVA on OK, 0 on failure. `None` for UNMAP (`iova` is not written).
    pub iova: Option<u64>,
}

impl EntryOutcome {
    /// The 16 bytes written at [`Entry::STATUS_OFFSET`] (`status`, then `done`).
    pub fn status_done_bytes(&self) -> [u8; 16] {
        let fields = [U64::new(self.status.raw() as u64), U64::new(self.done)];
        zerocopy::transmute!(fields)
    }

    /// Applies the write-back to an entry (what the guest then reads).
    pub fn apply(&self, e: &mut Entry) {
        e.status = I64::new(self.status.raw());
        e.done = U64::new(self.done);
        if let Some(iova) = self.iova {
            e.iova = U64::new(iova);
        }
    }
}

abi_enum! {
    /// Why a MULTICALL returned (bits 0..=7 of R9; see [`MulticallReturn::unsynced`] for bit 8).
    pub enum MulticallStop: u64 {
        /// `0`: every entry from the cursor to `count` ran OK; RAX = OK, RDX = `count`.
        Done = 0,
        /// `1`: the entry at RDX failed; RAX = its status (also written in the entry); entries
        /// after it were not run.
        EntryFailed = 1,
        /// `2`: stopped before the entry at RDX because of the time budget or a pending event;
        /// RAX = AGAIN; at least one entry ran; the entry at RDX was not run.
        Preempted = 2,
        /// `3`: the call was refused before any entry ran (no batch area, bad header, bad
        /// cursor); RAX says why; RDX = the cursor passed in; nothing was written.
        Rejected = 3,
    }
}

/// A MULTICALL's return registers: RAX = `status`, RDX = `cursor`, R8 = `completed`,
/// R9 = `stop` | `unsynced << 8`. Bits 9..=63 of R9 are 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MulticallReturn {
    /// The call status.
    pub status: Status,
    /// Index of the first entry not completed (`count` when all ran): resume from here.
    pub cursor: u32,
    /// Entries this call completed with OK: always `cursor - start`.
    pub completed: u32,
    /// Why the call returned.
    pub stop: MulticallStop,
    /// R9 bit 8: the invalidation this call owed (under `strict` or `batched`) was issued but
    /// the IOMMU did not confirm it in time. Every entry reported completed did take effect in
    /// the page tables, but the device-side guarantee for its UNMAPs is not given yet: the
    /// IOVAs and pages stay held and DMA_SYNC retries (until it returns OK).
    pub unsynced: bool,
}

/// R9 bit of [`MulticallReturn::unsynced`].
pub const MULTICALL_UNSYNCED: u64 = 1 << 8;

impl MulticallReturn {
    /// The return registers.
    pub const fn to_return(&self) -> Return {
        Return::new(
            self.status,
            [
                self.cursor as u64,
                self.completed as u64,
                self.stop as u64 | if self.unsynced { MULTICALL_UNSYNCED } else { 0 },
            ],
        )
    }

    /// Decodes the return registers and checks them against the call's `start` cursor and
    /// the batch's `count`: the consistency rules of [`MulticallStop`] and
    /// `completed == cursor - start`. `None` if the hypervisor broke them.
    pub fn from_return(ret: &Return, start: u32, count: u32) -> Option<MulticallReturn> {
        let status = ret.status()?;
        let [cursor, completed, r9] = ret.values;
        if r9 & !(0xff | MULTICALL_UNSYNCED) != 0 {
            return None;
        }
        let unsynced = r9 & MULTICALL_UNSYNCED != 0;
        let stop = MulticallStop::from_raw(r9 & 0xff)?;
        let cursor = u32::try_from(cursor).ok()?;
        let completed = u32::try_from(completed).ok()?;
        if cursor < start || cursor > count || completed != cursor - start {
            return None;
        }
        let consistent = match stop {
            MulticallStop::Done => status == Status::Ok && cursor == count,
            MulticallStop::EntryFailed => {
                !matches!(status, Status::Ok | Status::Again) && cursor < count
            }
            MulticallStop::Preempted => status == Status::Again && cursor < count && completed > 0,
            MulticallStop::Rejected => status != Status::Ok && completed == 0 && !unsynced,
        };
        consistent.then_some(MulticallReturn {
            status,
            cursor,
            completed,
            stop,
            unsynced,
        })
    }
}
