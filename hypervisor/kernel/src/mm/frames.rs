//! The global physical frame allocator (temporary early implementation: usable ranges minus
//! reservations, bump allocation plus a free stack; to be replaced by `moat-frames`).

use moat_boot::{BootInfo, MemoryKind};
use spin::Mutex;

use super::{align_down, align_up, PAGE_SIZE};

/// A range the allocator must never hand out.
#[derive(Debug, Clone, Copy)]
pub struct Reservation {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Why (for the boot log).
    pub what: &'static str,
}

const MAX_RANGES: usize = 128;
const MAX_FREED: usize = 4096;

struct Early {
    ranges: [(u64, u64); MAX_RANGES],
    count: usize,
    cursor: usize,
    next: u64,
    freed: [u64; MAX_FREED],
    nfreed: usize,
    total: u64,
    used: u64,
}

static FRAMES: Mutex<Early> = Mutex::new(Early {
    ranges: [(0, 0); MAX_RANGES],
    count: 0,
    cursor: 0,
    next: 0,
    freed: [0; MAX_FREED],
    nfreed: 0,
    total: 0,
    used: 0,
});

/// Builds the allocator from the memory map minus `reserved`. Returns (total, free) frames.
pub fn init(boot: &BootInfo, reserved: &[Reservation]) -> (u64, u64) {
    let mut f = FRAMES.lock();
    for r in boot
        .memory_map()
        .iter()
        .filter(|r| r.kind == MemoryKind::Usable)
    {
        let (mut s, e) = (align_up(r.start, PAGE_SIZE), align_down(r.end(), PAGE_SIZE));
        // Cut reservations out, in address order.
        let mut cuts: [(u64, u64); 64] = [(0, 0); 64];
        let mut n = 0;
        for res in reserved {
            if res.end > s && res.start < e && n < 64 {
                cuts[n] = (
                    align_down(res.start, PAGE_SIZE),
                    align_up(res.end, PAGE_SIZE),
                );
                n += 1;
            }
        }
        cuts[..n].sort_unstable();
        for &(cs, ce) in &cuts[..n] {
            if cs > s && f.count < MAX_RANGES {
                let c = f.count;
                f.ranges[c] = (s, cs.min(e));
                f.count += 1;
            }
            s = s.max(ce);
        }
        if s < e && f.count < MAX_RANGES {
            let c = f.count;
            f.ranges[c] = (s, e);
            f.count += 1;
        }
    }
    let total: u64 = f.ranges[..f.count]
        .iter()
        .map(|(s, e)| (e - s) / PAGE_SIZE)
        .sum();
    f.total = total;
    f.next = f.ranges[0].0;
    (total, total)
}

impl Early {
    fn bump(&mut self, count: u64, align: u64) -> Option<u64> {
        while self.cursor < self.count {
            let (_, end) = self.ranges[self.cursor];
            let start = align_up(self.next.max(self.ranges[self.cursor].0), align);
            if start + count * PAGE_SIZE <= end {
                self.next = start + count * PAGE_SIZE;
                return Some(start);
            }
            self.cursor += 1;
            if self.cursor < self.count {
                self.next = self.ranges[self.cursor].0;
            }
        }
        None
    }
}

/// Allocates one frame.
pub fn alloc() -> Option<u64> {
    let mut f = FRAMES.lock();
    let p = if f.nfreed > 0 {
        f.nfreed -= 1;
        Some(f.freed[f.nfreed])
    } else {
        f.bump(1, PAGE_SIZE)
    };
    if p.is_some() {
        f.used += 1;
    }
    p
}

/// Allocates one zeroed frame.
pub fn alloc_zeroed() -> Option<u64> {
    let p = alloc()?;
    // SAFETY: the frame is identity mapped RAM now owned by the caller.
    unsafe { core::ptr::write_bytes(p as *mut u8, 0, PAGE_SIZE as usize) };
    Some(p)
}

/// Allocates `count` contiguous frames aligned to `align` bytes.
pub fn alloc_contiguous(count: u64, align: u64) -> Option<u64> {
    let mut f = FRAMES.lock();
    let p = f.bump(count, align.max(PAGE_SIZE));
    if p.is_some() {
        f.used += count;
    }
    p
}

/// Frees one frame.
pub fn free(phys: u64) {
    let mut f = FRAMES.lock();
    if f.nfreed < MAX_FREED {
        let n = f.nfreed;
        f.freed[n] = phys;
        f.nfreed += 1;
        f.used -= 1;
    }
}

/// (total, free) frames.
pub fn stats() -> (u64, u64) {
    let f = FRAMES.lock();
    (f.total, f.total - f.used)
}
