//! Host-test doubles: fake physical memory and a fake clock.
//!
//! `FakeMemory` is a shared handle (so the fake remapping unit can read the tables and the
//! queue the driver writes, like hardware does). It panics on any access outside a live
//! frame, which turns use-after-free of table pages into test failures, and it tracks which
//! 64-byte lines were written but not flushed, to check the `ECAP.C = 0` discipline.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::vec;
use std::vec::Vec;

use crate::hw::{Clock, DmaMemory, PhysAddr};

/// Physical address of frame 0 of the fake memory.
pub const FAKE_BASE: u64 = 0x1000_0000;

#[derive(Default)]
pub struct MemInner {
    frames: BTreeMap<u64, Vec<u8>>,
    free: Vec<u64>,
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
    /// A write by the (fake) hardware: not a CPU write, so no cache line becomes dirty.
    pub fn hw_write_u32(&self, addr: u64, v: u32) {
        self.with_bytes(addr, 4, |b| b.copy_from_slice(&v.to_le_bytes()));
    }
    pub fn peek_u64(&self, addr: u64) -> u64 {
        self.with_bytes(addr, 8, |b| u64::from_le_bytes(b.try_into().unwrap()))
    }
}

impl DmaMemory for FakeMemory {
    fn alloc_frame(&mut self) -> Option<PhysAddr> {
        let mut inner = self.0.borrow_mut();
        if inner.frames.len() >= inner.max_frames {
            return None;
        }
        let pa = match inner.free.pop() {
            Some(pa) => pa,
            None => {
                let pa = inner.next;
                inner.next += 0x1000;
                pa
            }
        };
        inner.frames.insert(pa, vec![0; 4096]);
        inner.allocs += 1;
        Some(pa)
    }
    fn free_frame(&mut self, frame: PhysAddr) {
        let mut inner = self.0.borrow_mut();
        assert!(
            inner.frames.remove(&frame).is_some(),
            "double free of {frame:#x}"
        );
        inner.dirty_lines.retain(|l| l & !0xfff != frame);
        inner.free.push(frame);
    }
    fn read_u64(&self, addr: PhysAddr) -> u64 {
        self.peek_u64(addr)
    }
    fn write_u64(&mut self, addr: PhysAddr, value: u64) {
        self.with_bytes(addr, 8, |b| b.copy_from_slice(&value.to_le_bytes()));
        self.0.borrow_mut().dirty_lines.insert(addr & !63);
    }
    fn read_u32(&self, addr: PhysAddr) -> u32 {
        self.with_bytes(addr, 4, |b| u32::from_le_bytes(b.try_into().unwrap()))
    }
    fn write_u32(&mut self, addr: PhysAddr, value: u32) {
        self.with_bytes(addr, 4, |b| b.copy_from_slice(&value.to_le_bytes()));
        self.0.borrow_mut().dirty_lines.insert(addr & !63);
    }
    fn flush_cache(&mut self, addr: PhysAddr, len: usize) {
        let mut inner = self.0.borrow_mut();
        inner.flush_calls += 1;
        let mut line = addr & !63;
        while line < addr + len as u64 {
            inner.dirty_lines.remove(&line);
            line += 64;
        }
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
