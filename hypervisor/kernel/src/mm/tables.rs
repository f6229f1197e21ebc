//! The memory behind hardware tables: frames handed out for one kind of table, and checked
//! accesses to them.
//!
//! [`FrameSet`] records which frames were handed out for a purpose (the hypervisor's and the
//! guests' translation tables, or VT-d's remapping structures). Every access through
//! [`HostTables`] (and the VT-d `KernelMemory`) is checked against its set, so the safe
//! accessors of `moat_ptab::TableMemory` and `moat_vtd::DmaMemory` are sound for any
//! argument: a stray address panics instead of writing memory that Rust code owns.

use core::sync::atomic::{AtomicU64, Ordering};

use moat_ptab::PhysAddr;

use super::{frames, PAGE_SIZE};

/// Frames the allocator manages lie below 4 GiB.
const FRAMES: u64 = 1 << 20;

/// A set of frames below 4 GiB (one bit each).
pub struct FrameSet {
    words: [AtomicU64; (FRAMES / 64) as usize],
    what: &'static str,
}

impl FrameSet {
    /// An empty set; `what` names it in panics.
    pub const fn new(what: &'static str) -> Self {
        Self {
            words: [const { AtomicU64::new(0) }; (FRAMES / 64) as usize],
            what,
        }
    }

    fn bit(pa: PhysAddr) -> Option<(usize, u64)> {
        let f = pa.as_u64() / PAGE_SIZE;
        (f < FRAMES).then(|| ((f / 64) as usize, 1u64 << (f % 64)))
    }

    /// Adds the frame at `frame` (a frame the caller just obtained from the allocator).
    fn insert(&self, frame: PhysAddr) {
        let (w, b) = Self::bit(frame).expect("frame beyond 4 GiB");
        let old = self.words[w].fetch_or(b, Ordering::AcqRel);
        assert!(
            old & b == 0,
            "{}: frame {frame:#x} handed out twice",
            self.what
        );
    }

    /// Removes the frame at `frame`; false when it was not in the set.
    fn remove(&self, frame: PhysAddr) -> bool {
        match Self::bit(frame) {
            Some((w, b)) if frame.is_page_aligned() => {
                self.words[w].fetch_and(!b, Ordering::AcqRel) & b != 0
            }
            _ => false,
        }
    }

    /// A zeroed frame from the allocator, added to the set.
    pub fn alloc(&self) -> Option<PhysAddr> {
        let f = frames::alloc_zeroed()?;
        self.insert(f);
        Some(f)
    }

    /// Gives `frame` back to the allocator; a frame not in the set is refused (and logged).
    pub fn free(&self, frame: PhysAddr) {
        if self.remove(frame) {
            frames::free(frame);
        } else {
            log::error!(
                "{}: free of {frame:#x}, not one of its frames, refused",
                self.what
            );
        }
    }

    /// Panics unless `[addr, addr + width)` is a naturally aligned access inside a frame of
    /// the set.
    #[inline(always)]
    pub fn check(&self, addr: PhysAddr, width: u64) {
        let f = addr.as_u64() >> 12;
        let ok = addr.is_aligned(width)
            && self
                .words
                .get((f >> 6) as usize)
                .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (f & 63)) != 0);
        if !ok {
            self.stray(addr);
        }
    }

    #[cold]
    #[inline(never)]
    fn stray(&self, addr: PhysAddr) -> ! {
        panic!("{}: access to {addr:#x} outside its frames", self.what)
    }

    /// The 64-bit word at `addr`, checked.
    #[inline(always)]
    pub fn word(&self, addr: PhysAddr) -> &AtomicU64 {
        self.check(addr, 8);
        // SAFETY: `addr` is 8-byte aligned inside a frame of this set: identity-mapped RAM
        // handed out by the allocator for hardware tables only, which no Rust reference points
        // to and which is only accessed atomically or volatilely through these sets.
        unsafe { AtomicU64::from_ptr(addr.as_u64() as *mut u64) }
    }

    /// The 512 entries of the table page at `table`, checked once (page aligned, a frame of
    /// this set): for a run of accesses to one table.
    #[inline(always)]
    pub fn table(&self, table: PhysAddr) -> &[AtomicU64; 512] {
        self.check(table, PAGE_SIZE);
        // SAFETY: `table` is a page-aligned frame of this set (checked): identity-mapped RAM
        // handed out by the allocator for hardware tables only, which no Rust reference points
        // to and which is only accessed atomically or volatilely through these sets (as in
        // `word`, for all 512 of its 8-byte words at once).
        unsafe { &*(table.as_u64() as *const [AtomicU64; 512]) }
    }

    /// Writes back and invalidates the cache lines of `[addr, addr + len)` (checked).
    pub fn flush(&self, addr: PhysAddr, len: usize) {
        if len == 0 {
            return;
        }
        // No check: a cache-line flush changes no memory contents (an unmapped address
        // faults, which panics).
        let addr = addr.as_u64();
        let mut line = addr & !63;
        while line < addr + len as u64 {
            // SAFETY: clflush only writes the line back (and faults if unmapped).
            unsafe {
                core::arch::asm!("clflush [{}]", in(reg) line, options(nostack, preserves_flags))
            };
            line += 64;
        }
        // SAFETY: a fence has no side effect beyond ordering.
        unsafe { core::arch::asm!("mfence", options(nostack, preserves_flags)) };
    }
}

/// Frames of the hypervisor's own page tables and the guests' nested page tables.
pub static HOST_TABLES: FrameSet = FrameSet::new("host page tables");

/// Frames of the VT-d remapping structures (root, context and page tables, queues).
pub static DMA_FRAMES: FrameSet = FrameSet::new("VT-d memory");

/// Table memory of the CPU's and the guests' translation tables ([`HOST_TABLES`]).
pub struct HostTables;

/// Implements [`moat_ptab::TableMemory`] for the unit type `$ty` over the frame set `$set`: tables come
/// from and go back to the set, entries are atomics in it (every access checked against it).
macro_rules! table_memory_in {
    ($ty:ty, $set:path) => {
        impl moat_ptab::TableMemory for $ty {
            fn alloc_table(&self) -> Option<moat_ptab::PhysAddr> {
                $set.alloc()
            }
            fn free_table(&self, table: moat_ptab::PhysAddr) {
                $set.free(table)
            }
            fn load_entry(&self, entry: moat_ptab::PhysAddr) -> u64 {
                $set.word(entry).load(core::sync::atomic::Ordering::Acquire)
            }
            fn store_entry(&self, entry: moat_ptab::PhysAddr, value: u64) {
                $set.word(entry)
                    .store(value, core::sync::atomic::Ordering::Release)
            }
            fn cas_entry(
                &self,
                entry: moat_ptab::PhysAddr,
                current: u64,
                new: u64,
            ) -> Result<u64, u64> {
                use core::sync::atomic::Ordering::{AcqRel, Acquire};
                $set.word(entry)
                    .compare_exchange(current, new, AcqRel, Acquire)
            }
            fn flush_entries(&self, addr: moat_ptab::PhysAddr, len: usize) {
                $set.flush(addr, len)
            }
            #[inline(always)]
            fn table(
                &self,
                table: moat_ptab::PhysAddr,
            ) -> Option<&[core::sync::atomic::AtomicU64; 512]> {
                Some($set.table(table))
            }
        }
    };
}
pub(crate) use table_memory_in;

table_memory_in!(HostTables, HOST_TABLES);
