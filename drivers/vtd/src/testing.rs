//! Host-test doubles: fake physical memory and a fake clock.
//!
//! `FakeMemory` is a shared handle (so the fake remapping unit can read the tables and the
//! queue the driver writes, like hardware does). It panics on any access outside a live
//! frame, which turns use-after-free of table pages into test failures, and it tracks which
//! 64-byte lines were written but not flushed, to check the `ECAP.C = 0` discipline.
//!
//! Freed frames are poisoned: they go to a quarantine and are not handed out again before
//! [`QUARANTINE`] other frames were freed, and a hardware access ([`FakeMemory::hw_read_u64`],
//! [`FakeMemory::hw_write_u32`], used by the fake unit's page walks and queue) to a freed
//! frame panics with a message naming it, so a table freed while the hardware could still
//! walk it (stale paging-structure cache) fails the test loudly instead of reading whatever
//! the frame holds next.

use std::boxed::Box;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;
use std::vec;
use std::vec::Vec;

use crate::hw::{Clock, DmaMemory, PhysAddr};

/// Physical address of frame 0 of the fake memory.
pub const FAKE_BASE: u64 = 0x1000_0000;

/// Freed frames wait this long (in later frees) before they can be allocated again.
pub const QUARANTINE: usize = 1024;

#[derive(Default)]
pub struct MemInner {
    frames: BTreeMap<u64, Vec<u8>>,
    /// Freed frames, oldest first (the quarantine); all of them are poisoned.
    free: VecDeque<u64>,
    poisoned: BTreeSet<u64>,
    /// Called (with no borrow held) at the start of every `alloc_frame`; returning true makes
    /// that allocation fail. Lets a test run a device DMA in the middle of a driver call.
    pub alloc_hook: Option<Box<dyn FnMut() -> bool>>,
    next: u64,
    max_frames: usize,
    dirty_lines: BTreeSet<u64>,
    flush_calls: usize,
    pub allocs: usize,
}

/// Fake physical memory: a bounded set of 4 KiB frames.
#[derive(Clone)]
pub struct FakeMemory(pub Rc<RefCell<MemInner>>);

impl FakeMemory {
    pub fn new(max_frames: usize) -> Self {
        Self(Rc::new(RefCell::new(MemInner {
            max_frames,
            next: FAKE_BASE,
            ..Default::default()
        })))
    }
    pub fn live_frames(&self) -> usize {
        self.0.borrow().frames.len()
    }
    pub fn flush_calls(&self) -> usize {
        self.0.borrow().flush_calls
    }
    pub fn unflushed_writes(&self) -> Vec<u64> {
        self.0.borrow().dirty_lines.iter().copied().collect()
    }
    fn with_bytes<T>(&self, addr: u64, len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
        assert_eq!(addr % len as u64, 0, "unaligned access at {addr:#x}");
        let mut inner = self.0.borrow_mut();
        let frame = addr & !0xfff;
        let off = (addr & 0xfff) as usize;
        let bytes = inner
            .frames
            .get_mut(&frame)
            .unwrap_or_else(|| panic!("access to {addr:#x} outside a live frame"));
        f(&mut bytes[off..off + len])
    }
    pub fn is_live(&self, frame: u64) -> bool {
        self.0.borrow().frames.contains_key(&(frame & !0xfff))
    }
    pub fn is_poisoned(&self, frame: u64) -> bool {
        self.0.borrow().poisoned.contains(&(frame & !0xfff))
    }
    /// Installs the allocation hook (see [`MemInner::alloc_hook`]).
    pub fn set_alloc_hook(&self, hook: impl FnMut() -> bool + 'static) {
        self.0.borrow_mut().alloc_hook = Some(Box::new(hook));
    }
    fn check_hw_access(&self, addr: u64, what: &str) {
        assert!(
            !self.is_poisoned(addr),
            "fake VT-d hardware {what} of FREED frame {:#x} (address {addr:#x}): the driver \
             freed a page the hardware could still reach",
            addr & !0xfff
        );
    }
    /// A write by the (fake) hardware: not a CPU write, so no cache line becomes dirty.
    pub fn hw_write_u32(&self, addr: u64, v: u32) {
        self.check_hw_access(addr, "write");
        self.with_bytes(addr, 4, |b| b.copy_from_slice(&v.to_le_bytes()));
    }
    /// A read by the (fake) hardware (page walk, descriptor fetch).
    pub fn hw_read_u64(&self, addr: u64) -> u64 {
        self.check_hw_access(addr, "read");
        self.peek_u64(addr)
    }
    pub fn peek_u64(&self, addr: u64) -> u64 {
        self.with_bytes(addr, 8, |b| u64::from_le_bytes(b.try_into().unwrap()))
    }
}

impl FakeMemory {
    fn alloc(&self) -> Option<PhysAddr> {
        let hook = self.0.borrow_mut().alloc_hook.take();
        if let Some(mut hook) = hook {
            let fail = hook();
            self.0.borrow_mut().alloc_hook = Some(hook);
            if fail {
                return None;
            }
        }
        let mut inner = self.0.borrow_mut();
        if inner.frames.len() >= inner.max_frames {
            return None;
        }
        let reuse = if inner.free.len() > QUARANTINE {
            inner.free.pop_front()
        } else {
            None
        };
        let pa = match reuse {
            Some(pa) => {
                inner.poisoned.remove(&pa);
                pa
            }
            None => {
                let pa = inner.next;
                inner.next += 0x1000;
                pa
            }
        };
        inner.frames.insert(pa, vec![0; 4096]);
        inner.allocs += 1;
        Some(PhysAddr::new(pa))
    }
    fn free(&self, frame: PhysAddr) {
        let frame = frame.as_u64();
        let mut inner = self.0.borrow_mut();
        assert!(
            inner.frames.remove(&frame).is_some(),
            "double free of {frame:#x}"
        );
        inner.dirty_lines.retain(|l| l & !0xfff != frame);
        inner.free.push_back(frame);
        inner.poisoned.insert(frame);
    }
    fn store(&self, addr: PhysAddr, value: u64) {
        let addr = addr.as_u64();
        self.with_bytes(addr, 8, |b| b.copy_from_slice(&value.to_le_bytes()));
        self.0.borrow_mut().dirty_lines.insert(addr & !63);
    }
    fn flush(&self, addr: PhysAddr, len: usize) {
        let addr = addr.as_u64();
        let mut inner = self.0.borrow_mut();
        inner.flush_calls += 1;
        let mut line = addr & !63;
        while line < addr + len as u64 {
            inner.dirty_lines.remove(&line);
            line += 64;
        }
    }
}

/// The page-table engine's view: the same frames and checks (single-threaded, so the
/// compare-and-swap is a load and a store).
impl moat_ptab::TableMemory for FakeMemory {
    fn alloc_table(&self) -> Option<PhysAddr> {
        self.alloc()
    }
    fn free_table(&self, table: PhysAddr) {
        self.free(table)
    }
    fn load_entry(&self, entry: PhysAddr) -> u64 {
        self.peek_u64(entry.as_u64())
    }
    fn store_entry(&self, entry: PhysAddr, value: u64) {
        self.store(entry, value)
    }
    fn cas_entry(&self, entry: PhysAddr, current: u64, new: u64) -> Result<u64, u64> {
        let v = self.peek_u64(entry.as_u64());
        if v != current {
            return Err(v);
        }
        self.store(entry, new);
        Ok(v)
    }
    fn flush_entries(&self, addr: PhysAddr, len: usize) {
        self.flush(addr, len)
    }
}

/// Frames, 64-bit words and cache flushes are the engine's ([`moat_ptab::TableMemory`]).
impl DmaMemory for FakeMemory {
    fn read_u32(&self, addr: PhysAddr) -> u32 {
        self.with_bytes(addr.as_u64(), 4, |b| {
            u32::from_le_bytes(b.try_into().unwrap())
        })
    }
    fn write_u32(&mut self, addr: PhysAddr, value: u32) {
        let addr = addr.as_u64();
        self.with_bytes(addr, 4, |b| b.copy_from_slice(&value.to_le_bytes()));
        self.0.borrow_mut().dirty_lines.insert(addr & !63);
    }
}

/// A clock that advances by `step` nanoseconds every time it is read.
pub struct FakeClock {
    now: Cell<u64>,
    step: u64,
}

impl FakeClock {
    pub fn new(step: u64) -> Self {
        Self {
            now: Cell::new(0),
            step,
        }
    }
}

impl Clock for FakeClock {
    fn now_ns(&self) -> u64 {
        let t = self.now.get();
        self.now.set(t + self.step);
        t
    }
    fn relax(&self) {}
}
