//! The physical memory map: firmware regions, reservations, and the usable set they leave.

use core::fmt;

use crate::addr::{Bytes, PhysAddr, PhysRange, PAGE_SIZE};

/// Maximum number of firmware regions a [`MemoryMap`] holds.
pub const MAX_REGIONS: usize = 128;
/// Maximum number of reservations a [`MemoryMap`] holds.
pub const MAX_RESERVATIONS: usize = 64;
/// Maximum number of disjoint usable ranges: every hole (a non-usable region or a
/// reservation) splits at most one usable piece in two, so the count never exceeds
/// `MAX_REGIONS + MAX_RESERVATIONS`.
pub const MAX_USABLE: usize = MAX_REGIONS + MAX_RESERVATIONS;

/// What the firmware says a region of physical memory is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RegionKind {
    /// RAM free for the operating system (multiboot2 type 1, e820 type 1).
    Usable,
    /// Reserved by the firmware or the platform (type 2).
    Reserved,
    /// ACPI tables; usable once they have been read (type 3). Moat keeps them.
    AcpiReclaimable,
    /// ACPI non-volatile storage (type 4).
    AcpiNvs,
    /// Defective RAM (type 5).
    Bad,
    /// A type this code does not know; treated as reserved.
    Other(u32),
}

impl RegionKind {
    /// The kind for a multiboot2 memory map entry type (the same numbers as e820).
    pub const fn from_multiboot(kind: u32) -> Self {
        match kind {
            1 => RegionKind::Usable,
            2 => RegionKind::Reserved,
            3 => RegionKind::AcpiReclaimable,
            4 => RegionKind::AcpiNvs,
            5 => RegionKind::Bad,
            other => RegionKind::Other(other),
        }
    }

    /// Whether frames of this kind may be handed out.
    pub const fn is_usable(self) -> bool {
        matches!(self, RegionKind::Usable)
    }
}

impl fmt::Display for RegionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegionKind::Usable => f.write_str("usable"),
            RegionKind::Reserved => f.write_str("reserved"),
            RegionKind::AcpiReclaimable => f.write_str("ACPI reclaimable"),
            RegionKind::AcpiNvs => f.write_str("ACPI NVS"),
            RegionKind::Bad => f.write_str("bad"),
            RegionKind::Other(t) => write!(f, "type {t}"),
        }
    }
}

/// A firmware memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// The addresses.
    pub range: PhysRange,
    /// What they are.
    pub kind: RegionKind,
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_entry(f, self.range, &self.kind)
    }
}

/// One line of the boot log's memory map: the range, its size and what it is.
fn write_entry(
    f: &mut fmt::Formatter<'_>,
    range: PhysRange,
    what: &dyn fmt::Display,
) -> fmt::Result {
    write!(f, "{} {:>10} {}", range, Bytes(range.len()), what)
}

/// Memory the kernel took out of the usable set, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The addresses (as given; frames partly inside are excluded whole).
    pub range: PhysRange,
    /// Why, for the boot log (`"kernel image"`, `"multiboot2 info"`, ...).
    pub why: &'static str,
}

impl fmt::Display for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_entry(f, self.range, &self.why)
    }
}

/// Errors of [`MemoryMap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// More than [`MAX_REGIONS`] non-empty firmware regions.
    TooManyRegions {
        /// The capacity.
        max: usize,
    },
    /// More than [`MAX_RESERVATIONS`] non-empty reservations.
    TooManyReservations {
        /// The capacity.
        max: usize,
    },
    /// An alignment that is not a power of two.
    BadAlignment {
        /// The alignment asked for.
        align: u64,
    },
    /// [`MemoryMap::carve`] found no usable block of that size and alignment in the range.
    NoSpace {
        /// Bytes asked for (rounded up to whole frames).
        size: u64,
        /// Alignment asked for.
        align: u64,
    },
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapError::TooManyRegions { max } => {
                write!(f, "memory map has more than {max} regions")
            }
            MapError::TooManyReservations { max } => {
                write!(f, "more than {max} memory reservations")
            }
            MapError::BadAlignment { align } => {
                write!(f, "alignment {align:#x} is not a power of two")
            }
            MapError::NoSpace { size, align } => write!(
                f,
                "no usable memory block of {} aligned to {:#x}",
                Bytes(*size),
                align
            ),
        }
    }
}

impl core::error::Error for MapError {}

/// The physical memory map.
///
/// Fed with the firmware regions ([`add_region`](Self::add_region), any order, overlapping and
/// unaligned entries allowed) and the kernel's reservations ([`reserve`](Self::reserve)), it
/// maintains the **usable set**: every address inside a `Usable` region, outside every other
/// region and every reservation, cut to whole 4 KiB frames. Where firmware regions overlap,
/// the non-usable kind wins.
///
/// Fixed capacity, no heap: about 8 KiB. Keep it in a `static` or on a roomy stack.
#[derive(Clone)]
pub struct MemoryMap {
    regions: [Region; MAX_REGIONS],
    region_count: usize,
    reservations: [Reservation; MAX_RESERVATIONS],
    reservation_count: usize,
    usable: [PhysRange; MAX_USABLE],
    usable_count: usize,
}

impl Default for MemoryMap {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryMap")
            .field("regions", &self.regions())
            .field("reservations", &self.reservations())
            .field("usable", &self.usable())
            .finish()
    }
}

const NO_REGION: Region = Region {
    range: PhysRange::EMPTY,
    kind: RegionKind::Reserved,
};
const NO_RESERVATION: Reservation = Reservation {
    range: PhysRange::EMPTY,
    why: "",
};

impl MemoryMap {
    /// An empty map (nothing usable).
    pub const fn new() -> Self {
        MemoryMap {
            regions: [NO_REGION; MAX_REGIONS],
            region_count: 0,
            reservations: [NO_RESERVATION; MAX_RESERVATIONS],
            reservation_count: 0,
            usable: [PhysRange::EMPTY; MAX_USABLE],
            usable_count: 0,
        }
    }

    /// Adds a firmware region. Empty regions are ignored.
    pub fn add_region(&mut self, range: PhysRange, kind: RegionKind) -> Result<(), MapError> {
        if range.is_empty() {
            return Ok(());
        }
        let region = Region { range, kind };
        insert_sorted(&mut self.regions, &mut self.region_count, region, |r| {
            (r.range.start(), r.range.end())
        })
        .map_err(|()| MapError::TooManyRegions { max: MAX_REGIONS })?;
        self.recompute();
        Ok(())
    }

    /// Takes `range` out of the usable set for good, recording `why`. Frames only partly
    /// inside are excluded whole. Reserving memory that is not usable is allowed (and
    /// recorded). Empty ranges are ignored.
    pub fn reserve(&mut self, range: PhysRange, why: &'static str) -> Result<(), MapError> {
        if range.is_empty() {
            return Ok(());
        }
        insert_sorted(
            &mut self.reservations,
            &mut self.reservation_count,
            Reservation { range, why },
            |r| (r.range.start(), r.range.end()),
        )
        .map_err(|()| MapError::TooManyReservations {
            max: MAX_RESERVATIONS,
        })?;
        self.recompute();
        Ok(())
    }

    /// Finds `size` bytes (rounded up to whole frames) of usable memory aligned to `align`
    /// (a power of two; at least 4 KiB is used) inside `within`, at the highest such address,
    /// reserves it for `why` and returns it.
    ///
    /// For memory the kernel needs before the frame allocator exists: the AP trampoline page
    /// below 1 MiB (`within` = `[0x1000, 0x100000)`, taken *before* the first MiB is
    /// reserved), the allocator's own bitmap, an early stack.
    pub fn carve(
        &mut self,
        size: u64,
        align: u64,
        within: PhysRange,
        why: &'static str,
    ) -> Result<PhysRange, MapError> {
        if !align.is_power_of_two() {
            return Err(MapError::BadAlignment { align });
        }
        let align = align.max(PAGE_SIZE);
        let size = PhysAddr::new(size.max(1))
            .checked_align_up(PAGE_SIZE)
            .ok_or(MapError::NoSpace { size, align })?
            .as_u64();
        let found = self.usable().iter().rev().find_map(|piece| {
            let part = piece.intersect(within);
            let top = part.end().as_u64().checked_sub(size)?;
            let start = PhysAddr::new(top).align_down(align);
            (start >= part.start()).then(|| PhysRange::from_start_len(start, size))
        });
        let block = found.ok_or(MapError::NoSpace { size, align })?;
        self.reserve(block, why)?;
        Ok(block)
    }

    /// The firmware regions, sorted by start address, as given (not merged).
    pub fn regions(&self) -> &[Region] {
        &self.regions[..self.region_count]
    }

    /// The reservations, sorted by start address.
    pub fn reservations(&self) -> &[Reservation] {
        &self.reservations[..self.reservation_count]
    }

    /// The usable set: sorted, disjoint, non-adjacent, non-empty ranges, each 4 KiB aligned at
    /// both ends.
    pub fn usable(&self) -> &[PhysRange] {
        &self.usable[..self.usable_count]
    }

    /// Total bytes in the usable set.
    pub fn usable_bytes(&self) -> u64 {
        self.usable().iter().map(|r| r.len()).sum()
    }

    /// Whether every byte of `range` is in the usable set.
    pub fn is_usable(&self, range: PhysRange) -> bool {
        range.is_empty() || self.usable().iter().any(|u| u.contains_range(range))
    }

    /// Recomputes the usable set from the regions and reservations.
    fn recompute(&mut self) {
        // Usable firmware regions, merged (regions are sorted by start).
        let mut usable = [PhysRange::EMPTY; MAX_REGIONS];
        let mut usable_count = 0;
        for r in self.regions().iter().filter(|r| r.kind.is_usable()) {
            push_merged(&mut usable, &mut usable_count, r.range);
        }
        // Holes: every other region and every reservation, sorted and merged.
        let mut holes = [PhysRange::EMPTY; MAX_USABLE];
        let mut hole_count = 0;
        let hole_ranges = self
            .regions()
            .iter()
            .filter(|r| !r.kind.is_usable())
            .map(|r| r.range)
            .chain(self.reservations().iter().map(|r| r.range));
        for (slot, range) in holes.iter_mut().zip(hole_ranges) {
            *slot = range;
            hole_count += 1;
        }
        holes[..hole_count].sort_unstable();
        // Merge in place: the write index never passes the read index.
        let mut merged_count = 0;
        for i in 0..hole_count {
            let h = holes[i];
            push_merged(&mut holes, &mut merged_count, h);
        }
        let holes = &holes[..merged_count];

        // Usable minus holes, each piece cut to whole frames.
        self.usable_count = 0;
        let mut first_hole = 0;
        for &u in &usable[..usable_count] {
            let mut cursor = u.start();
            while first_hole < holes.len() && holes[first_hole].end() <= u.start() {
                first_hole += 1;
            }
            for h in holes[first_hole..]
                .iter()
                .take_while(|h| h.start() < u.end())
            {
                if h.start() > cursor {
                    self.push_usable(PhysRange::new(cursor, h.start()).unwrap_or_default());
                }
                cursor = cursor.max(h.end());
            }
            if cursor < u.end() {
                self.push_usable(PhysRange::new(cursor, u.end()).unwrap_or_default());
            }
        }
    }

    fn push_usable(&mut self, piece: PhysRange) {
        let piece = piece.align_inward(PAGE_SIZE);
        if piece.is_empty() {
            return;
        }
        // Cannot overflow (see MAX_USABLE); if it ever did, memory would be lost, not misused.
        if let Some(slot) = self.usable.get_mut(self.usable_count) {
            *slot = piece;
            self.usable_count += 1;
        }
    }
}

/// Inserts `item` into the sorted prefix `items[..*count]`, keeping it sorted by `key`.
fn insert_sorted<T: Copy, K: Ord>(
    items: &mut [T],
    count: &mut usize,
    item: T,
    key: impl Fn(&T) -> K,
) -> Result<(), ()> {
    if *count >= items.len() {
        return Err(());
    }
    let k = key(&item);
    let at = items[..*count].partition_point(|x| key(x) <= k);
    items.copy_within(at..*count, at + 1);
    items[at] = item;
    *count += 1;
    Ok(())
}

/// Appends `range` to the merged list `out[..*count]` (ranges arrive sorted by start),
/// merging it with the last range when they overlap or touch.
fn push_merged(out: &mut [PhysRange], count: &mut usize, range: PhysRange) {
    if let Some(last) = count.checked_sub(1).and_then(|i| out.get_mut(i))
        && range.start() <= last.end()
    {
        if range.end() > last.end() {
            *last = PhysRange::new(last.start(), range.end()).unwrap_or(*last);
        }
        return;
    }
    if let Some(slot) = out.get_mut(*count) {
        *slot = range;
        *count += 1;
    }
}
