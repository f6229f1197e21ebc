//! Magazines (fixed-size stacks of cached IOVAs), their type-stable pool and the depot.
//!
//! Every magazine lives in one pool allocated when the allocator is built and is never freed
//! while the allocator exists. At any time each magazine has exactly one owner: either one
//! lock-free stack of the depot (the shared empty stack, or the full stack of one size class) or
//! one [`MagRef`] held by a CPU. A `MagRef` is only created by popping a stack and only given up
//! by pushing it back, so the owner of a `MagRef` may touch the contents without atomics.

use crate::stack::{Links, TaggedStack, NIL};
use crate::sync::{AtomicU32, AtomicUsize, Cell, Ordering};
use crate::NUM_CLASSES;

/// IOVAs per magazine: 126 makes a magazine exactly 1 KiB (smaller under loom to keep the
/// model small while still exercising full/empty exchanges).
pub const MAG_SIZE: usize = if cfg!(loom) { 3 } else { 126 };

#[derive(Debug)]
struct MagData {
    count: u32,
    slots: [u64; MAG_SIZE],
}

/// One magazine: a link word for the depot stacks and the contents, owned as described above.
#[derive(Debug)]
#[repr(C, align(64))]
pub(crate) struct Magazine {
    link: AtomicU32,
    data: Cell<MagData>,
}

#[cfg(not(loom))]
const _: () = assert!(core::mem::size_of::<Magazine>() == 1024);

// SAFETY: the contents (`data`) are only accessed through the unique `MagRef` owning the
// magazine (see the module documentation); ownership moves between threads through the depot
// stacks, whose push (Release) / pop (Acquire) order the accesses.
unsafe impl Sync for Magazine {}

impl Magazine {
    fn new() -> Self {
        Self {
            link: AtomicU32::new(NIL),
            data: Cell::new(MagData {
                count: 0,
                slots: [0; MAG_SIZE],
            }),
        }
    }
}

/// The type-stable magazine pool.
#[derive(Debug)]
pub(crate) struct Pool {
    mags: alloc::boxed::Box<[Magazine]>,
}

impl Links for Pool {
    #[inline]
    fn link(&self, index: u32) -> Option<&AtomicU32> {
        self.mags.get(index as usize).map(|m| &m.link)
    }
}

/// Exclusive ownership of one magazine (not `Clone`; created by a depot pop only).
#[derive(Debug)]
pub(crate) struct MagRef<'a> {
    mag: &'a Magazine,
    index: u32,
}

impl MagRef<'_> {
    /// Runs `f` on the count and slots.
    #[inline(always)]
    fn with<R>(&mut self, f: impl FnOnce(&mut u32, &mut [u64; MAG_SIZE]) -> R) -> R {
        self.mag.data.with_mut(|p| {
            // SAFETY: `self` is the unique owner of this magazine (module invariant) and is
            // borrowed mutably, so no other reference to the contents exists.
            let d = unsafe { &mut *p };
            f(&mut d.count, &mut d.slots)
        })
    }

    /// Number of cached IOVAs.
    #[inline(always)]
    pub(crate) fn len(&mut self) -> usize {
        self.with(|c, _| *c as usize)
    }

    #[inline(always)]
    pub(crate) fn is_empty(&mut self) -> bool {
        self.len() == 0
    }

    #[inline(always)]
    pub(crate) fn is_full(&mut self) -> bool {
        self.len() >= MAG_SIZE
    }

    /// The most recently pushed IOVA.
    #[inline(always)]
    pub(crate) fn top(&mut self) -> Option<u64> {
        self.with(|c, s| {
            if *c == 0 {
                None
            } else {
                s.get(*c as usize - 1).copied()
            }
        })
    }

    /// Pushes `pfn`; `false` when full.
    #[inline(always)]
    pub(crate) fn push(&mut self, pfn: u64) -> bool {
        self.with(|c, s| match s.get_mut(*c as usize) {
            Some(slot) => {
                *slot = pfn;
                *c += 1;
                true
            }
            None => false,
        })
    }

    /// Pops the top IOVA when a block of `2^order` pages there ends at or below `limit`
    /// (exclusive pfn); `None` (nothing popped) otherwise, or when empty.
    #[inline(always)]
    pub(crate) fn pop_top_below(&mut self, limit: u64, order: u8) -> Option<u64> {
        self.with(|c, s| {
            let top = (*c as usize).checked_sub(1)?;
            let v = *s.get(top)?;
            if v.checked_add(1u64.checked_shl(order as u32)?)? > limit {
                return None;
            }
            *c -= 1;
            Some(v)
        })
    }

    /// Pops the most recent IOVA whose start is `<= max_start`, looking past the top (a bounded
    /// scan of at most [`MAG_SIZE`] entries) only when the top is above the limit.
    #[inline(always)]
    pub(crate) fn pop_at_most(&mut self, max_start: u64) -> Option<u64> {
        self.with(|c, s| {
            let n = *c as usize;
            let top = n.checked_sub(1)?;
            let v = *s.get(top)?;
            if v <= max_start {
                *c -= 1;
                return Some(v);
            }
            let i = s.get(..top)?.iter().rposition(|&p| p <= max_start)?;
            s.swap(i, top);
            *c -= 1;
            Some(s[top])
        })
    }

    /// Removes every IOVA, handing each to `f`.
    pub(crate) fn drain(&mut self, mut f: impl FnMut(u64)) {
        self.with(|c, s| {
            for &pfn in s.iter().take(*c as usize) {
                f(pfn);
            }
            *c = 0;
        })
    }
}

/// Per size class: the stack of full magazines and its (approximate) length.
#[derive(Debug)]
struct ClassDepot {
    full: TaggedStack,
    full_count: AtomicUsize,
}

/// The depot: full magazines per size class and one shared stack of empty magazines.
#[derive(Debug)]
pub(crate) struct Depot {
    pool: Pool,
    empty: TaggedStack,
    classes: [ClassDepot; NUM_CLASSES],
    /// Trim target: full magazines per class that trimming leaves in place.
    target: usize,
}

impl Depot {
    /// A depot with `magazines` empty magazines (allocates; construction only).
    pub(crate) fn new(magazines: usize, target: usize) -> Result<Self, crate::Error> {
        let mut v = alloc::vec::Vec::new();
        v.try_reserve_exact(magazines)
            .map_err(|_| crate::Error::OutOfMemory)?;
        v.extend((0..magazines).map(|_| Magazine::new()));
        let depot = Self {
            pool: Pool {
                mags: v.into_boxed_slice(),
            },
            empty: TaggedStack::new(),
            classes: core::array::from_fn(|_| ClassDepot {
                full: TaggedStack::new(),
                full_count: AtomicUsize::new(0),
            }),
            target,
        };
        for i in (0..magazines).rev() {
            let index = u32::try_from(i).map_err(|_| crate::Error::InvalidConfig)?;
            depot.empty.push(&depot.pool, index);
        }
        Ok(depot)
    }

    fn make_ref(&self, index: u32) -> Option<MagRef<'_>> {
        self.pool
            .mags
            .get(index as usize)
            .map(|mag| MagRef { mag, index })
    }

    /// Takes an empty magazine.
    pub(crate) fn pop_empty(&self) -> Option<MagRef<'_>> {
        self.empty.pop(&self.pool).and_then(|i| self.make_ref(i))
    }

    /// Returns an (emptied) magazine.
    pub(crate) fn push_empty(&self, mut mag: MagRef<'_>) {
        debug_assert!(mag.is_empty());
        self.empty.push(&self.pool, mag.index);
    }

    /// Takes a full magazine of `class`.
    pub(crate) fn pop_full(&self, class: usize) -> Option<MagRef<'_>> {
        let c = self.classes.get(class)?;
        let index = c.full.pop(&self.pool)?;
        c.full_count.fetch_sub(1, Ordering::Relaxed);
        self.make_ref(index)
    }

    /// Stores a full magazine of `class`.
    pub(crate) fn push_full(&self, class: usize, mag: MagRef<'_>) {
        let Some(c) = self.classes.get(class) else {
            // Unreachable for callers inside the crate; keep the magazine rather than leak it.
            self.empty.push(&self.pool, mag.index);
            return;
        };
        c.full_count.fetch_add(1, Ordering::Relaxed);
        c.full.push(&self.pool, mag.index);
    }

    /// Full magazines per class the depot trims toward.
    pub(crate) fn target(&self) -> usize {
        self.target
    }

    /// Full magazines currently in the depot, per class (a racy snapshot).
    pub(crate) fn full_counts(&self) -> [usize; NUM_CLASSES] {
        core::array::from_fn(|i| self.classes[i].full_count.load(Ordering::Relaxed))
    }
}
