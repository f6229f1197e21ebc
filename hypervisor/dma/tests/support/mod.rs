//! Test doubles that the `moat-dma` integration tests and the fuzz harness
//! (`fuzz/src/lib.rs`, which takes this file by `#[path]`) share: guest RAM given by values,
//! and a clock the test sets.

// Each user takes the part it needs (the threaded shards test runs without a clock).
#![allow(dead_code)]

use std::cell::Cell;
use std::ops::Range;

use moat_dma::{Clock, GuestRam, PhysAddr, PAGE_SIZE};

/// Guest RAM of `size` bytes whose guest-physical 0 is host-physical `host_base`, with the
/// page at guest-physical `forbidden_page` (if any) never mappable (it stands for the MSI
/// window).
pub struct FlatRam {
    pub size: u64,
    pub host_base: u64,
    pub forbidden_page: Option<u64>,
}

impl GuestRam for FlatRam {
    fn size(&self) -> u64 {
        self.size
    }
    fn host_base(&self) -> PhysAddr {
        PhysAddr::new(self.host_base)
    }
    fn forbidden(&self, gpa: Range<u64>) -> bool {
        self.forbidden_page
            .is_some_and(|f| gpa.start < f + PAGE_SIZE && gpa.end > f)
    }
}

/// A clock that reads what the test last set: cycles and nanoseconds are the same count.
#[derive(Default)]
pub struct SetClock(pub Cell<u64>);

impl SetClock {
    /// Moves the clock on by `by`.
    pub fn advance(&self, by: u64) {
        self.0.set(self.0.get() + by);
    }
}

impl Clock for SetClock {
    fn cycles(&self) -> u64 {
        self.0.get()
    }
    fn now_ns(&self) -> u64 {
        self.0.get()
    }
}
