//! A host-test [`TableMemory`]: a fixed arena of frames, shareable between threads.
//!
//! Every access outside a live frame panics (use after free, stray address); freed frames are
//! quarantined (not handed out again before every never-used frame was), so a table freed too
//! early shows up as a panic instead of silently aliasing a new table. Writes not followed by
//! [`TableMemory::flush_entries`] are tracked per 64-byte line.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::vec::Vec;

use crate::{PhysAddr, TableMemory, PAGE_SIZE};

/// Physical address of the arena's first frame.
pub const ARENA_BASE: u64 = 0x4000_0000;

struct Frame {
    entries: Vec<AtomicU64>,
    live: AtomicBool,
    ever_freed: AtomicBool,
}

/// An arena of `n` frames.
pub struct ArenaMemory {
    frames: Vec<Frame>,
    free: Mutex<(Vec<usize>, std::collections::VecDeque<usize>)>,
    live: AtomicUsize,
    allocs: AtomicUsize,
    dirty: Mutex<BTreeSet<u64>>,
    track_dirty: bool,
    /// Yield the thread inside `alloc_table` (widens race windows in concurrency tests).
    pub yield_in_alloc: AtomicBool,
}

impl ArenaMemory {
    /// An arena of `n` frames.
    pub fn new(n: usize) -> Self {
        Self::with_dirty_tracking(n, false)
    }

    /// An arena that records written-but-not-flushed lines (slower).
    pub fn with_dirty_tracking(n: usize, track_dirty: bool) -> Self {
        let frames = (0..n)
            .map(|_| Frame {
                entries: (0..512).map(|_| AtomicU64::new(0)).collect(),
                live: AtomicBool::new(false),
                ever_freed: AtomicBool::new(false),
            })
            .collect();
        Self {
            frames,
            free: Mutex::new(((0..n).rev().collect(), Default::default())),
            live: AtomicUsize::new(0),
            allocs: AtomicUsize::new(0),
            dirty: Mutex::new(BTreeSet::new()),
            track_dirty,
            yield_in_alloc: AtomicBool::new(false),
        }
    }

    /// Frames currently allocated.
    pub fn live_frames(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Allocations so far.
    pub fn allocs(&self) -> usize {
        self.allocs.load(Ordering::SeqCst)
    }

    /// Whether `frame` is allocated.
    pub fn is_live(&self, frame: PhysAddr) -> bool {
        self.frame_index(frame)
            .is_some_and(|i| self.frames[i].live.load(Ordering::SeqCst))
    }

    /// Lines written and not flushed since.
    pub fn unflushed(&self) -> Vec<u64> {
        self.dirty.lock().unwrap().iter().copied().collect()
    }

    fn frame_index(&self, addr: PhysAddr) -> Option<usize> {
        let i = addr.as_u64().checked_sub(ARENA_BASE)? / PAGE_SIZE;
        (i < self.frames.len() as u64).then_some(i as usize)
    }

    fn entry(&self, addr: PhysAddr) -> &AtomicU64 {
        assert_eq!(addr.as_u64() % 8, 0, "unaligned entry access at {addr:#x}");
        let i = self
            .frame_index(addr)
            .unwrap_or_else(|| panic!("access to {addr:#x} outside the arena"));
        let f = &self.frames[i];
        assert!(
            f.live.load(Ordering::SeqCst),
            "access to {addr:#x} in a free frame (freed before: {})",
            f.ever_freed.load(Ordering::SeqCst)
        );
        &f.entries[(addr.page_offset() / 8) as usize]
    }

    fn dirty(&self, addr: PhysAddr) {
        if self.track_dirty {
            self.dirty.lock().unwrap().insert(addr.as_u64() & !63);
        }
    }
}

impl TableMemory for ArenaMemory {
    fn alloc_table(&self) -> Option<PhysAddr> {
        if self.yield_in_alloc.load(Ordering::Relaxed) {
            std::thread::yield_now();
        }
        let i = {
            let mut free = self.free.lock().unwrap();
            // Never-used frames first, then the quarantine, oldest first.
            match free.0.pop() {
                Some(i) => i,
                None => free.1.pop_front()?,
            }
        };
        let f = &self.frames[i];
        for e in &f.entries {
            e.store(0, Ordering::SeqCst);
        }
        assert!(!f.live.swap(true, Ordering::SeqCst));
        self.live.fetch_add(1, Ordering::SeqCst);
        self.allocs.fetch_add(1, Ordering::SeqCst);
        Some(PhysAddr::new(ARENA_BASE + i as u64 * PAGE_SIZE))
    }

    fn free_table(&self, table: PhysAddr) {
        assert!(table.is_page_aligned());
        let i = self.frame_index(table).expect("free outside the arena");
        let f = &self.frames[i];
        assert!(
            f.live.swap(false, Ordering::SeqCst),
            "double free of {table:#x}"
        );
        f.ever_freed.store(true, Ordering::SeqCst);
        self.live.fetch_sub(1, Ordering::SeqCst);
        if self.track_dirty {
            self.dirty
                .lock()
                .unwrap()
                .retain(|l| l & !0xfff != table.as_u64());
        }
        self.free.lock().unwrap().1.push_back(i);
    }

    fn load_entry(&self, entry: PhysAddr) -> u64 {
        self.entry(entry).load(Ordering::Acquire)
    }

    fn store_entry(&self, entry: PhysAddr, value: u64) {
        self.entry(entry).store(value, Ordering::Release);
        self.dirty(entry);
    }

    fn cas_entry(&self, entry: PhysAddr, current: u64, new: u64) -> Result<u64, u64> {
        let r =
            self.entry(entry)
                .compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire);
        if r.is_ok() {
            self.dirty(entry);
        }
        r
    }

    fn table(&self, table: PhysAddr) -> Option<&[AtomicU64; 512]> {
        // Lent only without dirty tracking: stores through the slice would not be tracked
        // (so the non-coherent tests take the single-entry path, the others this one).
        if self.track_dirty || !table.is_page_aligned() {
            return None;
        }
        let f = &self.frames[self.frame_index(table)?];
        self.entry(table);
        f.entries.as_slice().try_into().ok()
    }

    fn flush_entries(&self, addr: PhysAddr, len: usize) {
        if self.track_dirty {
            let mut d = self.dirty.lock().unwrap();
            let mut line = addr.as_u64() & !63;
            while line < addr.as_u64() + len as u64 {
                d.remove(&line);
                line += 64;
            }
        }
    }
}
