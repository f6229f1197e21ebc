//! The physical frame allocator: one bitmap over the usable set of a [`MemoryMap`].

use core::fmt;

use crate::addr::{Frame, PhysAddr, PhysRange, PAGE_SHIFT, PAGE_SIZE};
use crate::map::{MapError, MemoryMap, MAX_USABLE};

/// Errors of [`FrameAllocator`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The bitmap handed to [`FrameAllocator::new`] is shorter than
    /// [`FrameAllocator::bitmap_words`].
    BitmapTooSmall {
        /// Words needed.
        needed: usize,
        /// Words given.
        given: usize,
    },
    /// No free frame left.
    OutOfMemory,
    /// No run of `count` free frames with that alignment (in the range asked for).
    NoContiguousRange {
        /// Frames asked for.
        count: u64,
        /// Alignment asked for, in bytes.
        align: u64,
    },
    /// A request for zero frames.
    ZeroCount,
    /// An alignment that is not a power of two.
    BadAlignment {
        /// The alignment asked for.
        align: u64,
    },
    /// A frame the allocator does not manage (reserved, not RAM, or outside the map).
    NotOwned {
        /// The frame.
        frame: Frame,
    },
    /// A frame that is already free.
    DoubleFree {
        /// The frame.
        frame: Frame,
    },
    /// [`FrameAllocator::from_map`] could not take the bitmap's memory from the map.
    Map(MapError),
    /// [`FrameAllocator::from_map`]'s address translation returned a null or misaligned
    /// pointer.
    BadMapping {
        /// The physical address that was translated.
        addr: PhysAddr,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::BitmapTooSmall { needed, given } => write!(
                f,
                "frame bitmap too small: {given} words given, {needed} needed"
            ),
            FrameError::OutOfMemory => f.write_str("out of physical memory"),
            FrameError::NoContiguousRange { count, align } => {
                write!(f, "no {count} contiguous free frames aligned to {align:#x}")
            }
            FrameError::ZeroCount => f.write_str("request for zero frames"),
            FrameError::BadAlignment { align } => {
                write!(f, "alignment {align:#x} is not a power of two")
            }
            FrameError::NotOwned { frame } => write!(
                f,
                "frame {:#x} is not managed by the frame allocator",
                frame.start()
            ),
            FrameError::DoubleFree { frame } => {
                write!(f, "frame {:#x} freed twice", frame.start())
            }
            FrameError::Map(e) => write!(f, "cannot place the frame bitmap: {e}"),
            FrameError::BadMapping { addr } => {
                write!(f, "physical address {addr} translated to a bad pointer")
            }
        }
    }
}

impl core::error::Error for FrameError {}

impl From<MapError> for FrameError {
    fn from(e: MapError) -> Self {
        FrameError::Map(e)
    }
}

/// One usable range and where its frames sit in the bitmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Zone {
    /// First frame number.
    first_frame: u64,
    /// Number of frames.
    frames: u64,
    /// Bitmap index of `first_frame`; zones are packed back to back.
    first_bit: u64,
}

impl Zone {
    const EMPTY: Zone = Zone {
        first_frame: 0,
        frames: 0,
        first_bit: 0,
    };

    fn end_frame(&self) -> u64 {
        self.first_frame + self.frames
    }
}

/// Allocates 4 KiB physical frames from the usable set of a [`MemoryMap`].
///
/// One bit per usable frame (1 = free), the usable ranges packed back to back, in memory the
/// caller provides (`&mut [u64]`, [`bitmap_words`](Self::bitmap_words) long): the allocator
/// needs no heap. Single frames come from a rotating hint (the word of the last allocation or
/// free), so the common case looks at one word; contiguous runs are searched lowest address
/// first, a word at a time.
///
/// Every frame it hands out lies in the usable set of the map it was built from, and is handed
/// out again only after it was freed. Freeing a frame it does not manage, or one that is
/// already free, is an error that changes nothing.
pub struct FrameAllocator<'b> {
    zones: [Zone; MAX_USABLE],
    zone_count: usize,
    bitmap: &'b mut [u64],
    /// Words of `bitmap` in use (`ceil(total / 64)`).
    words: usize,
    total: u64,
    free: u64,
    /// Word index where the next single-frame search starts.
    hint: usize,
}

impl fmt::Debug for FrameAllocator<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameAllocator")
            .field("zones", &&self.zones[..self.zone_count])
            .field("total", &self.total)
            .field("free", &self.free)
            .finish_non_exhaustive()
    }
}

impl<'b> FrameAllocator<'b> {
    /// Number of `u64` words of bitmap an allocator for `map` needs.
    ///
    /// Reserving more memory in the map afterwards (including the bitmap's own memory) never
    /// raises this number, so the bitmap may be carved from the map after asking.
    pub fn bitmap_words(map: &MemoryMap) -> usize {
        let frames: u64 = map.usable().iter().map(|r| r.len() >> PAGE_SHIFT).sum();
        usize::try_from(frames.div_ceil(64)).unwrap_or(usize::MAX)
    }

    /// Number of bytes of bitmap an allocator for `map` needs (`bitmap_words * 8`).
    pub fn bitmap_bytes(map: &MemoryMap) -> usize {
        Self::bitmap_words(map).saturating_mul(8)
    }

    /// Builds an allocator managing every frame of `map`'s usable set, all free, keeping its
    /// bitmap in `bitmap` (whose previous contents do not matter).
    ///
    /// `map` must already exclude the bitmap's own memory (reserve it, or use
    /// [`MemoryMap::carve`]).
    pub fn new(map: &MemoryMap, bitmap: &'b mut [u64]) -> Result<Self, FrameError> {
        let needed = Self::bitmap_words(map);
        if bitmap.len() < needed {
            return Err(FrameError::BitmapTooSmall {
                needed,
                given: bitmap.len(),
            });
        }
        let mut zones = [Zone::EMPTY; MAX_USABLE];
        let mut zone_count = 0;
        let mut next_bit = 0u64;
        for (slot, range) in zones.iter_mut().zip(map.usable()) {
            let frames = range.whole_frames();
            *slot = Zone {
                first_frame: frames.start,
                frames: frames.end - frames.start,
                first_bit: next_bit,
            };
            next_bit += slot.frames;
            zone_count += 1;
        }
        let mut allocator = FrameAllocator {
            zones,
            zone_count,
            bitmap,
            words: needed,
            total: next_bit,
            free: 0,
            hint: 0,
        };
        allocator.bitmap.fill(0);
        allocator.set_bits(0, next_bit, true);
        allocator.free = next_bit;
        Ok(allocator)
    }

    /// Carves the bitmap out of `map` (the highest fitting block inside `within`, reserved as
    /// `"frame allocator bitmap"`), reaches it through `phys_to_virt`, and builds the allocator.
    ///
    /// # Safety
    ///
    /// For the block `map` hands out, `phys_to_virt` must return a pointer through which the
    /// kernel may read and write all of its bytes for `'static`, and nothing else may access
    /// that memory: it is usable RAM, and after this call it is reserved in `map`, so no
    /// allocator built from `map` will hand it out. `within` must only contain memory that
    /// `phys_to_virt` can translate (for example the identity-mapped low 4 GiB).
    pub unsafe fn from_map(
        map: &mut MemoryMap,
        within: PhysRange,
        phys_to_virt: impl FnOnce(PhysAddr) -> *mut u8,
    ) -> Result<FrameAllocator<'static>, FrameError> {
        let words = Self::bitmap_words(map);
        if words == 0 {
            return FrameAllocator::new(map, &mut []);
        }
        let bytes = (words as u64).saturating_mul(8);
        let block = map.carve(bytes, PAGE_SIZE, within, "frame allocator bitmap")?;
        let ptr = phys_to_virt(block.start()).cast::<u64>();
        if ptr.is_null() || !ptr.is_aligned() {
            return Err(FrameError::BadMapping {
                addr: block.start(),
            });
        }
        // SAFETY: the caller guarantees `ptr` is valid for reads and writes of the whole
        // block (at least `words * 8` bytes) and exclusively ours for 'static; it is non-null
        // and aligned (checked). Zeroing first makes every u64 initialised before a reference
        // to them exists.
        let bitmap = unsafe {
            core::ptr::write_bytes(ptr, 0, words);
            core::slice::from_raw_parts_mut(ptr, words)
        };
        FrameAllocator::new(map, bitmap)
    }

    /// Frames managed (free or allocated).
    pub fn total_frames(&self) -> u64 {
        self.total
    }

    /// Frames free now.
    pub fn free_frames(&self) -> u64 {
        self.free
    }

    /// Frames allocated now.
    pub fn used_frames(&self) -> u64 {
        self.total - self.free
    }

    /// The managed ranges (the map's usable set when the allocator was built).
    pub fn ranges(&self) -> impl Iterator<Item = PhysRange> + '_ {
        self.zones[..self.zone_count].iter().map(|z| {
            PhysRange::from_start_len(
                PhysAddr::new(z.first_frame << PAGE_SHIFT),
                z.frames << PAGE_SHIFT,
            )
        })
    }

    /// Whether `frame` is managed by this allocator.
    pub fn owns(&self, frame: Frame) -> bool {
        self.locate(frame).is_some()
    }

    /// `Some(true)` when `frame` is managed and free, `Some(false)` when managed and
    /// allocated, `None` when not managed.
    pub fn is_free(&self, frame: Frame) -> Option<bool> {
        self.locate(frame).map(|bit| self.bit(bit))
    }

    /// Allocates one frame.
    pub fn allocate(&mut self) -> Result<Frame, FrameError> {
        if self.free == 0 || self.words == 0 {
            return Err(FrameError::OutOfMemory);
        }
        let start = self.hint.min(self.words - 1);
        let order = (start..self.words).chain(0..start);
        for w in order {
            let word = self.bitmap[w];
            if word != 0 {
                let b = word.trailing_zeros();
                self.bitmap[w] = word & !(1u64 << b);
                self.free -= 1;
                self.hint = w;
                let bit = (w as u64) * 64 + u64::from(b);
                // Padding bits past `total` are never set, so `bit` is a managed frame.
                return self.frame_of_bit(bit).ok_or(FrameError::OutOfMemory);
            }
        }
        Err(FrameError::OutOfMemory)
    }

    /// Allocates `count` physically contiguous frames whose first address is a multiple of
    /// `align` bytes (a power of two; anything up to 4 KiB means frame alignment), at the
    /// lowest such address; returns the first frame.
    pub fn allocate_contiguous(&mut self, count: u64, align: u64) -> Result<Frame, FrameError> {
        self.allocate_contiguous_within(count, align, PhysRange::ALL)
    }

    /// Like [`allocate_contiguous`](Self::allocate_contiguous), with every frame inside
    /// `within` (for example below 4 GiB for a device with 32-bit DMA).
    pub fn allocate_contiguous_within(
        &mut self,
        count: u64,
        align: u64,
        within: PhysRange,
    ) -> Result<Frame, FrameError> {
        if count == 0 {
            return Err(FrameError::ZeroCount);
        }
        if !align.is_power_of_two() {
            return Err(FrameError::BadAlignment { align });
        }
        let align_frames = (align >> PAGE_SHIFT).max(1);
        let limit = within.whole_frames();
        for i in 0..self.zone_count {
            let zone = self.zones[i];
            let lo = zone.first_frame.max(limit.start);
            let hi = zone.end_frame().min(limit.end);
            let Some(mut first) = align_up(lo, align_frames) else {
                continue;
            };
            while first.checked_add(count).is_some_and(|end| end <= hi) {
                let bit = zone.first_bit + (first - zone.first_frame);
                match self.find_bit(bit, count, false) {
                    None => {
                        let frame = Frame::from_number(first).ok_or(FrameError::OutOfMemory)?;
                        self.set_bits(bit, count, false);
                        self.free -= count;
                        return Ok(frame);
                    }
                    Some(used) => {
                        let used_frame = zone.first_frame + (used - zone.first_bit);
                        match align_up(used_frame + 1, align_frames) {
                            Some(next) => first = next,
                            None => break,
                        }
                    }
                }
            }
        }
        Err(FrameError::NoContiguousRange { count, align })
    }

    /// Frees one frame.
    pub fn free(&mut self, frame: Frame) -> Result<(), FrameError> {
        self.free_contiguous(frame, 1)
    }

    /// Frees `count` contiguous frames starting at `first`. Either all of them are freed, or
    /// (on error) none: every frame must be managed and allocated.
    pub fn free_contiguous(&mut self, first: Frame, count: u64) -> Result<(), FrameError> {
        if count == 0 {
            return Ok(());
        }
        let bit = self
            .locate(first)
            .ok_or(FrameError::NotOwned { frame: first })?;
        let zone = self
            .zone_of_bit(bit)
            .ok_or(FrameError::NotOwned { frame: first })?;
        let available = zone.end_frame() - first.number();
        if count > available {
            let outside = Frame::from_number(zone.end_frame()).unwrap_or(first);
            return Err(FrameError::NotOwned { frame: outside });
        }
        if let Some(free_bit) = self.find_bit(bit, count, true) {
            let frame = Frame::from_number(first.number() + (free_bit - bit)).unwrap_or(first);
            return Err(FrameError::DoubleFree { frame });
        }
        self.set_bits(bit, count, true);
        self.free += count;
        self.hint = usize::try_from(bit / 64).unwrap_or(0);
        Ok(())
    }

    /// The bitmap index of `frame`, when managed.
    fn locate(&self, frame: Frame) -> Option<u64> {
        let zones = &self.zones[..self.zone_count];
        let n = frame.number();
        let i = zones
            .partition_point(|z| z.first_frame <= n)
            .checked_sub(1)?;
        let z = zones.get(i)?;
        (n < z.end_frame()).then(|| z.first_bit + (n - z.first_frame))
    }

    fn zone_of_bit(&self, bit: u64) -> Option<Zone> {
        let zones = &self.zones[..self.zone_count];
        let i = zones
            .partition_point(|z| z.first_bit <= bit)
            .checked_sub(1)?;
        zones
            .get(i)
            .copied()
            .filter(|z| bit < z.first_bit + z.frames)
    }

    fn frame_of_bit(&self, bit: u64) -> Option<Frame> {
        let z = self.zone_of_bit(bit)?;
        Frame::from_number(z.first_frame + (bit - z.first_bit))
    }

    fn bit(&self, bit: u64) -> bool {
        let w = (bit / 64) as usize;
        self.bitmap
            .get(w)
            .is_some_and(|word| word & (1u64 << (bit % 64)) != 0)
    }

    /// Calls `f(word_index, mask)` for the words covering bits `[start, start + len)`.
    fn for_words(start: u64, len: u64, mut f: impl FnMut(usize, u64) -> bool) {
        let end = start.saturating_add(len);
        let mut b = start;
        while b < end {
            let off = b % 64;
            let n = (64 - off).min(end - b);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << off
            };
            if !f((b / 64) as usize, mask) {
                return;
            }
            b += n;
        }
    }

    /// The first bit in `[start, start + len)` equal to `value`.
    fn find_bit(&self, start: u64, len: u64, value: bool) -> Option<u64> {
        let mut found = None;
        Self::for_words(start, len, |w, mask| {
            let word = self.bitmap.get(w).copied().unwrap_or(0);
            let hits = if value { word } else { !word } & mask;
            if hits != 0 {
                found = Some(w as u64 * 64 + u64::from(hits.trailing_zeros()));
                return false;
            }
            true
        });
        found
    }

    fn set_bits(&mut self, start: u64, len: u64, value: bool) {
        let bitmap = &mut *self.bitmap;
        Self::for_words(start, len, |w, mask| {
            if let Some(word) = bitmap.get_mut(w) {
                if value {
                    *word |= mask;
                } else {
                    *word &= !mask;
                }
            }
            true
        });
    }
}

/// `n` rounded up to a multiple of `align` (a power of two); `None` on overflow.
fn align_up(n: u64, align: u64) -> Option<u64> {
    Some(n.checked_add(align - 1)? & !(align - 1))
}
