//! Physical addresses, 4 KiB frames and half-open physical ranges.
//!
//! [`PhysAddr`] is Moat's one host-physical address type and [`PAGE_SIZE`] its one hardware
//! page size: the page-table engine (`moat-ptab`), the VT-d driver and the kernel re-export
//! or use these. Guest-physical addresses and IOVAs are not host-physical and stay `u64`.

use core::fmt;

/// Size of a hardware base page (a frame) in bytes: 4 KiB, the one page size of Moat.
pub const PAGE_SIZE: u64 = 4096;
/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u32 = 12;

/// A host-physical address (what a CPU or a device behind the IOMMU's translation puts on
/// the bus). Guest-physical addresses and IOVAs are not host-physical: they stay integers.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct PhysAddr(u64);

impl PhysAddr {
    /// The address `addr`.
    pub const fn new(addr: u64) -> Self {
        PhysAddr(addr)
    }

    /// The address as an integer.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Whether the address is a multiple of `align` (a power of two).
    pub const fn is_aligned(self, align: u64) -> bool {
        self.0 & align.wrapping_sub(1) == 0
    }

    /// The address rounded down to a multiple of `align` (a power of two).
    pub const fn align_down(self, align: u64) -> Self {
        PhysAddr(self.0 & !align.wrapping_sub(1))
    }

    /// The address rounded up to a multiple of `align` (a power of two); `None` on overflow.
    pub const fn checked_align_up(self, align: u64) -> Option<Self> {
        match self.0.checked_add(align.wrapping_sub(1)) {
            Some(v) => Some(PhysAddr(v & !align.wrapping_sub(1))),
            None => None,
        }
    }

    /// `self + offset`; `None` on overflow.
    pub const fn checked_add(self, offset: u64) -> Option<Self> {
        match self.0.checked_add(offset) {
            Some(v) => Some(PhysAddr(v)),
            None => None,
        }
    }

    /// The offset of the address within its 4 KiB page.
    pub const fn page_offset(self) -> u64 {
        self.0 & (PAGE_SIZE - 1)
    }

    /// Whether the address is the first byte of a 4 KiB page.
    pub const fn is_page_aligned(self) -> bool {
        self.page_offset() == 0
    }

    /// The address of 64-bit entry `index` of the table (or array) starting at `self`:
    /// `self + index * 8`. Table addresses come from the frame allocator and indices are
    /// below 512, so this never overflows for a real table; it wraps rather than panics.
    pub const fn entry(self, index: u64) -> Self {
        PhysAddr(self.0.wrapping_add(index.wrapping_mul(8)))
    }
}

/// `addr + offset`, for a field or an entry inside a table, queue or frame (overflow is a bug
/// in the caller, as for integer addition).
impl core::ops::Add<u64> for PhysAddr {
    type Output = PhysAddr;

    fn add(self, offset: u64) -> PhysAddr {
        PhysAddr(self.0 + offset)
    }
}

impl fmt::Debug for PhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PhysAddr({:#x})", self.0)
    }
}

impl fmt::Display for PhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::LowerHex for PhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

/// A 4 KiB physical frame, identified by its number (`start / 4096`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct Frame(u64);

impl Frame {
    /// The frame containing `addr`.
    pub const fn containing(addr: PhysAddr) -> Self {
        Frame(addr.0 >> PAGE_SHIFT)
    }

    /// The frame starting at `addr`; `None` when `addr` is not 4 KiB aligned.
    pub const fn from_start(addr: PhysAddr) -> Option<Self> {
        if addr.is_aligned(PAGE_SIZE) {
            Some(Frame(addr.0 >> PAGE_SHIFT))
        } else {
            None
        }
    }

    /// The frame with number `number`; `None` when its address would not fit in 64 bits.
    pub const fn from_number(number: u64) -> Option<Self> {
        if number <= u64::MAX >> PAGE_SHIFT {
            Some(Frame(number))
        } else {
            None
        }
    }

    /// The frame number.
    pub const fn number(self) -> u64 {
        self.0
    }

    /// The first byte of the frame.
    pub const fn start(self) -> PhysAddr {
        PhysAddr(self.0 << PAGE_SHIFT)
    }

    /// The bytes of the frame (ends at `u64::MAX` for the very last frame).
    pub const fn range(self) -> PhysRange {
        PhysRange::from_start_len(self.start(), PAGE_SIZE)
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Frame({:#x})", self.start().0)
    }
}

/// A half-open range of physical addresses `[start, end)`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PhysRange {
    start: u64,
    end: u64,
}

impl PhysRange {
    /// The empty range at 0.
    pub const EMPTY: PhysRange = PhysRange { start: 0, end: 0 };
    /// Every address (but the very last byte, which no frame can use whole anyway).
    pub const ALL: PhysRange = PhysRange {
        start: 0,
        end: u64::MAX,
    };

    /// `[start, end)`; `None` when `end < start`.
    pub const fn new(start: PhysAddr, end: PhysAddr) -> Option<Self> {
        if start.0 <= end.0 {
            Some(PhysRange {
                start: start.0,
                end: end.0,
            })
        } else {
            None
        }
    }

    /// `[start, start + len)`, the end clamped to `u64::MAX` when it would overflow (as a
    /// firmware table with a bogus length could ask). Clamping only loses the last byte of
    /// the address space, which never belongs to a usable whole frame.
    pub const fn from_start_len(start: PhysAddr, len: u64) -> Self {
        PhysRange {
            start: start.0,
            end: start.0.saturating_add(len),
        }
    }

    /// First address.
    pub const fn start(self) -> PhysAddr {
        PhysAddr(self.start)
    }

    /// One past the last address.
    pub const fn end(self) -> PhysAddr {
        PhysAddr(self.end)
    }

    /// Length in bytes.
    pub const fn len(self) -> u64 {
        self.end - self.start
    }

    /// Whether the range has no address.
    pub const fn is_empty(self) -> bool {
        self.start == self.end
    }

    /// Whether `addr` is in the range.
    pub const fn contains(self, addr: PhysAddr) -> bool {
        self.start <= addr.0 && addr.0 < self.end
    }

    /// Whether every address of `other` is in the range (an empty `other` always is).
    pub const fn contains_range(self, other: PhysRange) -> bool {
        other.start == other.end || (self.start <= other.start && other.end <= self.end)
    }

    /// Whether the two ranges share an address.
    pub const fn overlaps(self, other: PhysRange) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// The common part (empty when disjoint).
    pub const fn intersect(self, other: PhysRange) -> PhysRange {
        let start = if self.start > other.start {
            self.start
        } else {
            other.start
        };
        let end = if self.end < other.end {
            self.end
        } else {
            other.end
        };
        if start < end {
            PhysRange { start, end }
        } else {
            PhysRange::EMPTY
        }
    }

    /// The largest sub-range whose ends are multiples of `align` (a power of two); empty when
    /// there is none.
    pub const fn align_inward(self, align: u64) -> PhysRange {
        let Some(start) = PhysAddr(self.start).checked_align_up(align) else {
            return PhysRange::EMPTY;
        };
        let end = PhysAddr(self.end).align_down(align);
        if start.0 < end.0 {
            PhysRange {
                start: start.0,
                end: end.0,
            }
        } else {
            PhysRange::EMPTY
        }
    }

    /// The frames wholly inside the range, as frame numbers `first..end`.
    pub const fn whole_frames(self) -> core::ops::Range<u64> {
        let r = self.align_inward(PAGE_SIZE);
        (r.start >> PAGE_SHIFT)..(r.end >> PAGE_SHIFT)
    }
}

impl fmt::Debug for PhysRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end)
    }
}

impl fmt::Display for PhysRange {
    /// `[0x0000000000100000-0x0000000007fe0000)`, fixed width for aligned log columns.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#018x}-{:#018x})", self.start, self.end)
    }
}

/// Formats a byte count for humans: `127.9 MiB`, `4 KiB`, `17 B`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    /// Honours width and alignment (`{:>10}`), for log columns.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        let mut unit = 0;
        let mut whole = self.0;
        let mut rest = 0;
        while whole >= 1024 && unit + 1 < UNITS.len() {
            rest = whole % 1024;
            whole /= 1024;
            unit += 1;
        }
        let tenths = rest * 10 / 1024;
        let mut buf = StackStr::default();
        if tenths == 0 {
            fmt::write(&mut buf, format_args!("{whole} {}", UNITS[unit]))?;
        } else {
            fmt::write(&mut buf, format_args!("{whole}.{tenths} {}", UNITS[unit]))?;
        }
        f.pad(buf.as_str())
    }
}

/// A small string buffer on the stack (enough for any [`Bytes`] text).
#[derive(Default)]
struct StackStr {
    buf: [u8; 32],
    len: usize,
}

impl StackStr {
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl fmt::Write for StackStr {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len.checked_add(s.len()).ok_or(fmt::Error)?;
        self.buf
            .get_mut(self.len..end)
            .ok_or(fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}
