//! The allocators Moat is compared with, behind one interface.
//!
//! * `moat`: this project's per-CPU magazine allocator.
//! * `global-lock-tree`: one lock around an ordered tree of allocated ranges, searched top-down
//!   from a cached node, as Linux's `iova.c` did before per-CPU caches (Linux 4.6 and earlier).
//! * `eiovar-freelist`: the same tree and lock with a per-size free list in front of it, as in
//!   EiovaR (Malka et al., FAST'15).
//! * `vm-allocator`: rust-vmm's `AddressAllocator` (crates.io), the allocator a Rust VMM user
//!   would pick, behind a mutex (it takes `&mut self`).

use std::collections::BTreeMap;
use std::sync::Mutex;

use moat_iova::{Config, Iova, IovaAllocator, PerCpu};
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

/// First pfn of every window (page 0 stays unused, as in a VT-d domain).
pub const BASE: u64 = 1;

/// An allocator under test.
pub trait Subject: Sync + Sized {
    /// Name in the table and the JSON.
    const NAME: &'static str;
    /// A per-thread handle.
    type Handle<'a>: Handle
    where
        Self: 'a;
    /// An allocator for the window `[BASE, end)` used by `cpus` threads.
    fn new(end: u64, cpus: usize, max_ranges: usize) -> Self;
    /// The handle for thread `cpu`.
    fn handle(&self, cpu: usize) -> Self::Handle<'_>;
    /// Allocation on the miss path (no cache).
    fn slow_alloc(&self, order: u8) -> u64;
    /// Free on the miss path (no cache).
    fn slow_free(&self, pfn: u64, order: u8);
    /// Fills the allocator with `n` live order-0 ranges through the miss path.
    fn populate(&self, n: usize) -> Vec<u64> {
        (0..n).map(|_| self.slow_alloc(0)).collect()
    }
}

/// Per-thread operations.
pub trait Handle: Send {
    /// Allocates `2^order` pages.
    fn alloc(&mut self, order: u8) -> u64;
    /// Frees what `alloc` returned.
    fn free(&mut self, pfn: u64, order: u8);
}

// ----- Moat -----

pub struct Moat(IovaAllocator);

impl Subject for Moat {
    const NAME: &'static str = "moat";
    type Handle<'a> = PerCpu<'a>;
    fn new(end: u64, cpus: usize, max_ranges: usize) -> Self {
        let cfg = Config::new(BASE, end, cpus)
            .with_strict(false)
            .with_max_ranges(max_ranges);
        Moat(IovaAllocator::new(cfg).expect("moat allocator"))
    }
    fn handle(&self, cpu: usize) -> PerCpu<'_> {
        self.0.claim(cpu).expect("claim")
    }
    fn slow_alloc(&self, order: u8) -> u64 {
        self.0
            .alloc_uncached(order, u64::MAX)
            .expect("moat slow alloc")
            .pfn()
    }
    fn slow_free(&self, pfn: u64, order: u8) {
        self.0
            .free_uncached(Iova::new(pfn, order))
            .expect("moat slow free")
    }
}

impl Handle for PerCpu<'_> {
    #[inline(always)]
    fn alloc(&mut self, order: u8) -> u64 {
        match PerCpu::alloc(self, order, u64::MAX) {
            Ok(i) => i.pfn(),
            Err(e) => panic!("moat alloc: {e}"),
        }
    }
    #[inline(always)]
    fn free(&mut self, pfn: u64, order: u8) {
        if let Err(e) = PerCpu::free(self, Iova::new(pfn, order)) {
            panic!("moat free: {e}")
        }
    }
}

// ----- Global-lock ordered tree (Linux before magazines) -----

/// Allocated ranges (start -> end) with Linux's cached-node search hint.
pub struct Tree {
    ranges: BTreeMap<u64, u64>,
    /// Start of the node the next search begins below (`None`: the top of the window).
    cached: Option<u64>,
    end: u64,
}

impl Tree {
    fn new(end: u64) -> Self {
        Tree {
            ranges: BTreeMap::new(),
            cached: None,
            end,
        }
    }

    /// Highest size-aligned fit below `hi`, walking allocated ranges downwards.
    fn search(&self, hi: u64, size: u64) -> Option<u64> {
        let mut hi = hi;
        for (&s, &e) in self.ranges.range(..hi).rev() {
            if let Some(c) = hi.checked_sub(size).map(|c| c & !(size - 1))
                && c >= e
            {
                return Some(c);
            }
            hi = s;
        }
        hi.checked_sub(size)
            .map(|c| c & !(size - 1))
            .filter(|&c| c >= BASE)
    }

    fn alloc(&mut self, order: u8) -> u64 {
        let size = 1u64 << order;
        let start_hi = self.cached.unwrap_or(self.end);
        let pfn = self
            .search(start_hi, size)
            .or_else(|| self.search(self.end, size))
            .expect("global tree: no space");
        self.ranges.insert(pfn, pfn + size);
        self.cached = Some(pfn);
        pfn
    }

    fn free(&mut self, pfn: u64, order: u8) {
        let end = self
            .ranges
            .remove(&pfn)
            .expect("global tree: free of unallocated range");
        debug_assert_eq!(end - pfn, 1 << order);
        if self.cached.is_some_and(|c| pfn >= c) {
            // Like Linux: the next search starts just above the hole that was freed.
            self.cached = self.ranges.range(pfn..).next().map(|(&s, _)| s);
        }
    }
}

pub struct GlobalTree(Mutex<Tree>);

impl Subject for GlobalTree {
    const NAME: &'static str = "global-lock-tree";
    type Handle<'a> = &'a GlobalTree;
    fn new(end: u64, _cpus: usize, _max: usize) -> Self {
        GlobalTree(Mutex::new(Tree::new(end)))
    }
    fn handle(&self, _cpu: usize) -> &GlobalTree {
        self
    }
    fn slow_alloc(&self, order: u8) -> u64 {
        self.0.lock().unwrap().alloc(order)
    }
    fn slow_free(&self, pfn: u64, order: u8) {
        self.0.lock().unwrap().free(pfn, order)
    }
}

impl Handle for &GlobalTree {
    fn alloc(&mut self, order: u8) -> u64 {
        self.slow_alloc(order)
    }
    fn free(&mut self, pfn: u64, order: u8) {
        self.slow_free(pfn, order)
    }
}

// ----- EiovaR-style free-list cache -----

pub struct EiovarState {
    tree: Tree,
    free_lists: Vec<Vec<u64>>,
}

pub struct Eiovar(Mutex<EiovarState>);

impl Subject for Eiovar {
    const NAME: &'static str = "eiovar-freelist";
    type Handle<'a> = &'a Eiovar;
    fn new(end: u64, _cpus: usize, _max: usize) -> Self {
        Eiovar(Mutex::new(EiovarState {
            tree: Tree::new(end),
            free_lists: vec![Vec::new(); 64],
        }))
    }
    fn handle(&self, _cpu: usize) -> &Eiovar {
        self
    }
    fn slow_alloc(&self, order: u8) -> u64 {
        self.0.lock().unwrap().tree.alloc(order)
    }
    fn slow_free(&self, pfn: u64, order: u8) {
        self.0.lock().unwrap().tree.free(pfn, order)
    }
}

impl Handle for &Eiovar {
    fn alloc(&mut self, order: u8) -> u64 {
        let mut s = self.0.lock().unwrap();
        match s.free_lists[order as usize].pop() {
            Some(pfn) => pfn,
            None => s.tree.alloc(order),
        }
    }
    fn free(&mut self, pfn: u64, order: u8) {
        self.0.lock().unwrap().free_lists[order as usize].push(pfn)
    }
}

// ----- rust-vmm vm-allocator -----

pub struct VmAllocator(Mutex<AddressAllocator>);

/// Bytes per IOVA page (vm-allocator works in bytes).
const PAGE: u64 = 1 << moat_iova::PAGE_SHIFT;

impl Subject for VmAllocator {
    const NAME: &'static str = "vm-allocator";
    type Handle<'a> = &'a VmAllocator;
    fn new(end: u64, _cpus: usize, _max: usize) -> Self {
        let a = AddressAllocator::new(BASE * PAGE, (end - BASE) * PAGE).expect("vm-allocator");
        VmAllocator(Mutex::new(a))
    }
    fn handle(&self, _cpu: usize) -> &VmAllocator {
        self
    }
    fn slow_alloc(&self, order: u8) -> u64 {
        let size = PAGE << order;
        let r = self
            .0
            .lock()
            .unwrap()
            .allocate(size, size, AllocPolicy::FirstMatch);
        r.expect("vm-allocator alloc").start() / PAGE
    }
    fn slow_free(&self, pfn: u64, order: u8) {
        let r = RangeInclusive::new(pfn * PAGE, pfn * PAGE + (PAGE << order) - 1).expect("range");
        self.0.lock().unwrap().free(&r).expect("vm-allocator free")
    }
    /// FirstMatch walks the tree in order, so filling 300k ranges that way is quadratic;
    /// place them with ExactMatch (O(log n) each) instead. Only the fill is done this way.
    fn populate(&self, n: usize) -> Vec<u64> {
        let mut a = self.0.lock().unwrap();
        (0..n as u64)
            .map(|i| {
                let pfn = BASE + i;
                a.allocate(PAGE, PAGE, AllocPolicy::ExactMatch(pfn * PAGE))
                    .expect("exact");
                pfn
            })
            .collect()
    }
}

impl Handle for &VmAllocator {
    fn alloc(&mut self, order: u8) -> u64 {
        self.slow_alloc(order)
    }
    fn free(&mut self, pfn: u64, order: u8) {
        self.slow_free(pfn, order)
    }
}
