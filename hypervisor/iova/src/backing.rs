//! The backing allocator: exact, O(log n) allocation of naturally aligned power-of-two ranges.
//!
//! Everything is allocated when the allocator is built, so no path through here allocates
//! memory:
//!
//! * the **free tree**, an AVL tree over a fixed node arena, holds the free ranges of the window, keyed by start, coalesced (no two
//!   free ranges touch). Each node is augmented with the largest order `k` such that some range
//!   in its subtree contains a `2^k`-aligned block of `2^k` pages. Because a fit of order `j`
//!   implies a fit of every order below `j`, the augmentation is exact, and a descent finds the
//!   lowest free range that fits an order in O(height) without ever walking ranges linearly;
//! * the **registry** (a fixed-size hash table, see [`crate::registry`]) holds every range handed
//!   out (to a caller, or sitting in a per-CPU or depot magazine) by start, with its order and
//!   [`State`]. It is what lets a bad free be rejected instead of corrupting the free tree, in
//!   O(1) expected time.
//!
//! Allocation is lowest-address first. The lowest fitting free range also has the lowest
//! fitting block, so a caller limit (DMA mask) is honoured by one comparison after the descent.
//! AVL height is at most 1.44 log2(n + 2), so every operation, including the recursion depth,
//! is bounded by about 46 levels even at 2^32 ranges.

use crate::Error;
use alloc::vec::Vec;

const NONE: u32 = u32::MAX;

use crate::registry::Registry;
pub(crate) use crate::registry::State;

#[derive(Clone, Copy, Debug)]
struct Node {
    start: u64,
    end: u64,
    left: u32,
    right: u32,
    height: u8,
    /// 1 + the largest order that fits in this subtree (0: none).
    fit: u8,
}

/// Counters kept by the backing allocator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub free_pages: u64,
    pub free_ranges: u64,
    pub allocated_ranges: u64,
    pub live_pages: u64,
    pub cached_pages: u64,
}

/// The backing allocator state (protected by the allocator's spin lock).
#[derive(Debug)]
pub(crate) struct Backing {
    nodes: Vec<Node>,
    spare: u32,
    spare_count: usize,
    free_root: u32,
    reg: Registry,
    end: u64,
    max_ranges: u64,
    /// Disjoint reserved ranges (never free, never allocated); each counts as a range
    /// against `max_ranges`, since it separates free ranges like an allocated one.
    reserved: Vec<(u64, u64)>,
    counts: Counts,
}

/// `a` rounded up to a multiple of the power of two `size`, if representable.
#[inline]
fn align_up(a: u64, size: u64) -> Option<u64> {
    a.checked_add(size - 1).map(|x| x & !(size - 1))
}

/// 1 + the largest order `k` such that `[a, b)` contains a `2^k`-aligned block of `2^k` pages.
#[inline]
fn own_fit(a: u64, b: u64) -> u8 {
    let len = b.saturating_sub(a);
    if len == 0 {
        return 0;
    }
    let k = 63 - len.leading_zeros();
    let size = 1u64 << k;
    match align_up(a, size).and_then(|s| s.checked_add(size)) {
        Some(e) if e <= b => k as u8 + 1,
        // A range of at least 2^k pages always holds an aligned block of 2^(k-1); k >= 1 here
        // because an order-0 block always fits a non-empty range.
        _ => k as u8,
    }
}

impl Backing {
    /// A backing allocator for the window `[base, end)` able to track `max_ranges` allocated
    /// ranges (allocates its node arena; construction only).
    pub(crate) fn new(base: u64, end: u64, max_ranges: usize) -> Result<Self, Error> {
        // Free ranges are separated by allocated ones, so there is at most one more of them
        // (and one more transiently while a free splits nothing and merges nothing).
        let cap = max_ranges
            .checked_add(2)
            .filter(|&n| n < NONE as usize)
            .ok_or(Error::InvalidConfig)?;
        let mut nodes = Vec::new();
        nodes
            .try_reserve_exact(cap)
            .map_err(|_| Error::OutOfMemory)?;
        nodes.extend((0..cap).map(|i| Node {
            start: 0,
            end: 0,
            left: if i + 1 < cap { (i + 1) as u32 } else { NONE },
            right: NONE,
            height: 0,
            fit: 0,
        }));
        let mut b = Self {
            nodes,
            spare: 0,
            spare_count: cap,
            free_root: NONE,
            reg: Registry::new(max_ranges)?,
            end,
            max_ranges: max_ranges as u64,
            reserved: Vec::new(),
            counts: Counts::default(),
        };
        let n = b.new_node(base, end).ok_or(Error::InvalidConfig)?;
        b.free_root = b.insert(NONE, n, true);
        b.counts.free_pages = end - base;
        b.counts.free_ranges = 1;
        Ok(b)
    }

    pub(crate) fn counts(&self) -> Counts {
        self.counts
    }

    /// The reserved ranges, sorted and disjoint (not touching).
    pub(crate) fn reserved(&self) -> &[(u64, u64)] {
        &self.reserved
    }

    /// Free pages of the free tree inside `[s, e)`.
    fn free_in(&self, s: u64, e: u64) -> u64 {
        let mut sum = 0;
        if e <= s {
            return 0;
        }
        let mut t = self.floor(self.free_root, e - 1);
        while t != NONE {
            let n = *self.n(t);
            if n.end <= s {
                break;
            }
            sum += n.end.min(e) - n.start.max(s);
            if n.start == 0 {
                break;
            }
            t = self.floor(self.free_root, n.start - 1);
        }
        sum
    }

    /// Reserves `[s, e)` (inside the window): its pages are never handed out. Pages already
    /// reserved stay so; a page that is allocated (handed out or cached) fails the call with
    /// [`Error::InUse`], and a reservation that would exceed the range capacity with
    /// [`Error::NoSpace`], both changing nothing.
    pub(crate) fn reserve(&mut self, s: u64, e: u64) -> Result<(), Error> {
        if e <= s {
            return Ok(());
        }
        // The parts of [s, e) not reserved yet, and the reserved list once merged.
        let mut pieces: Vec<(u64, u64)> = Vec::new();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        let mut cur = s;
        for &(a, b) in &self.reserved {
            if b < s || a > e {
                merged.push((a, b));
                continue;
            }
            if a > cur {
                pieces.push((cur, a.min(e)));
            }
            cur = cur.max(b);
        }
        if cur < e {
            pieces.push((cur, e));
        }
        let lo = self
            .reserved
            .iter()
            .filter(|&&(a, b)| !(b < s || a > e))
            .map(|r| r.0)
            .fold(s, u64::min);
        let hi = self
            .reserved
            .iter()
            .filter(|&&(a, b)| !(b < s || a > e))
            .map(|r| r.1)
            .fold(e, u64::max);
        merged.push((lo, hi));
        merged.sort_unstable();
        for &(a, b) in &pieces {
            if self.free_in(a, b) != b - a {
                return Err(Error::InUse);
            }
        }
        if self.reg.len() as u64 + merged.len() as u64 > self.max_ranges
            || self.spare_count < pieces.len()
        {
            return Err(Error::NoSpace);
        }
        for &(a, b) in &pieces {
            self.carve(a, b)?;
        }
        self.reserved = merged;
        Ok(())
    }

    /// Removes `[s, e)`, entirely free, from the free tree.
    fn carve(&mut self, s: u64, e: u64) -> Result<(), Error> {
        let t = self.floor(self.free_root, s);
        if t == NONE || self.n(t).end < e {
            return Err(Error::Inconsistent);
        }
        let Node {
            start: a, end: b, ..
        } = *self.n(t);
        let (root, _) = self.remove(self.free_root, a, true);
        self.free_root = root;
        self.counts.free_ranges -= 1;
        self.counts.free_pages -= e - s;
        let mut reuse = Some(t);
        if a < s {
            self.nm(t).end = s;
            self.free_root = self.insert(self.free_root, t, true);
            self.counts.free_ranges += 1;
            reuse = None;
        }
        if e < b {
            let n = match reuse.take() {
                Some(n) => n,
                None => self.new_node(e, b).ok_or(Error::Inconsistent)?,
            };
            let node = self.nm(n);
            node.start = e;
            node.end = b;
            node.left = NONE;
            node.right = NONE;
            node.height = 1;
            self.free_root = self.insert(self.free_root, n, true);
            self.counts.free_ranges += 1;
        }
        if let Some(n) = reuse {
            self.release_node(n);
        }
        Ok(())
    }

    // ----- node arena -----

    fn new_node(&mut self, start: u64, end: u64) -> Option<u32> {
        let n = self.spare;
        let node = self.nodes.get_mut(n as usize)?;
        self.spare = node.left;
        self.spare_count -= 1;
        *node = Node {
            start,
            end,
            left: NONE,
            right: NONE,
            height: 1,
            fit: 0,
        };
        Some(n)
    }

    fn release_node(&mut self, n: u32) {
        let spare = self.spare;
        let node = &mut self.nodes[n as usize];
        node.left = spare;
        node.right = NONE;
        self.spare = n;
        self.spare_count += 1;
    }

    // ----- AVL machinery (shared by both trees; `aug` maintains the fit augmentation) -----

    #[inline]
    fn n(&self, t: u32) -> &Node {
        &self.nodes[t as usize]
    }

    #[inline]
    fn nm(&mut self, t: u32) -> &mut Node {
        &mut self.nodes[t as usize]
    }

    #[inline]
    fn height(&self, t: u32) -> u8 {
        if t == NONE {
            0
        } else {
            self.n(t).height
        }
    }

    #[inline]
    fn fit(&self, t: u32) -> u8 {
        if t == NONE {
            0
        } else {
            self.n(t).fit
        }
    }

    fn pull(&mut self, t: u32, aug: bool) {
        let Node {
            left,
            right,
            start,
            end,
            ..
        } = *self.n(t);
        let height = 1 + self.height(left).max(self.height(right));
        let fit = if aug {
            own_fit(start, end).max(self.fit(left)).max(self.fit(right))
        } else {
            0
        };
        let node = self.nm(t);
        node.height = height;
        node.fit = fit;
    }

    fn rotate_right(&mut self, t: u32, aug: bool) -> u32 {
        let l = self.n(t).left;
        let lr = self.n(l).right;
        self.nm(t).left = lr;
        self.nm(l).right = t;
        self.pull(t, aug);
        self.pull(l, aug);
        l
    }

    fn rotate_left(&mut self, t: u32, aug: bool) -> u32 {
        let r = self.n(t).right;
        let rl = self.n(r).left;
        self.nm(t).right = rl;
        self.nm(r).left = t;
        self.pull(t, aug);
        self.pull(r, aug);
        r
    }

    fn balance(&mut self, t: u32, aug: bool) -> u32 {
        self.pull(t, aug);
        let (l, r) = (self.n(t).left, self.n(t).right);
        let bf = i32::from(self.height(l)) - i32::from(self.height(r));
        if bf > 1 {
            if self.height(self.n(l).left) < self.height(self.n(l).right) {
                let nl = self.rotate_left(l, aug);
                self.nm(t).left = nl;
            }
            self.rotate_right(t, aug)
        } else if bf < -1 {
            if self.height(self.n(r).right) < self.height(self.n(r).left) {
                let nr = self.rotate_right(r, aug);
                self.nm(t).right = nr;
            }
            self.rotate_left(t, aug)
        } else {
            t
        }
    }

    /// (height, fit) of a subtree root, to tell whether a child changed in a way its parent sees.
    #[inline]
    fn shape(&self, t: u32) -> (u8, u8) {
        (self.height(t), self.fit(t))
    }

    /// After a child of `t` was replaced by `new` (previously `old` with shape `before`):
    /// rebalances `t` unless nothing its parent can see changed, in which case the walk back up
    /// stops touching nodes (no sibling loads on the common path).
    #[inline]
    fn fix(&mut self, t: u32, old: u32, new: u32, before: (u8, u8), aug: bool) -> u32 {
        if old == new && self.shape(new) == before {
            return t;
        }
        self.balance(t, aug)
    }

    /// Inserts node `n` (keyed by start) into the subtree `t`; returns the new subtree root.
    fn insert(&mut self, t: u32, n: u32, aug: bool) -> u32 {
        if t == NONE {
            let node = self.nm(n);
            node.left = NONE;
            node.right = NONE;
            self.pull(n, aug);
            return n;
        }
        if self.n(n).start < self.n(t).start {
            let old = self.n(t).left;
            let before = self.shape(old);
            let l = self.insert(old, n, aug);
            self.nm(t).left = l;
            self.fix(t, old, l, before, aug)
        } else {
            let old = self.n(t).right;
            let before = self.shape(old);
            let r = self.insert(old, n, aug);
            self.nm(t).right = r;
            self.fix(t, old, r, before, aug)
        }
    }

    /// Detaches the minimum of the non-empty subtree `t`: (new root, detached node).
    fn remove_min(&mut self, t: u32, aug: bool) -> (u32, u32) {
        let l = self.n(t).left;
        if l == NONE {
            return (self.n(t).right, t);
        }
        let before = self.shape(l);
        let (nl, min) = self.remove_min(l, aug);
        self.nm(t).left = nl;
        (self.fix(t, l, nl, before, aug), min)
    }

    /// Detaches the node with start `key` from subtree `t`: (new root, detached node or NONE).
    fn remove(&mut self, t: u32, key: u64, aug: bool) -> (u32, u32) {
        if t == NONE {
            return (NONE, NONE);
        }
        let Node {
            start, left, right, ..
        } = *self.n(t);
        if key < start {
            let before = self.shape(left);
            let (nl, x) = self.remove(left, key, aug);
            if x == NONE {
                return (t, NONE);
            }
            self.nm(t).left = nl;
            (self.fix(t, left, nl, before, aug), x)
        } else if key > start {
            let before = self.shape(right);
            let (nr, x) = self.remove(right, key, aug);
            if x == NONE {
                return (t, NONE);
            }
            self.nm(t).right = nr;
            (self.fix(t, right, nr, before, aug), x)
        } else if right == NONE {
            (left, t)
        } else {
            let (nr, m) = self.remove_min(right, aug);
            let node = self.nm(m);
            node.left = left;
            node.right = nr;
            (self.balance(m, aug), t)
        }
    }

    /// The node whose start is exactly `key`.
    fn find(&self, mut t: u32, key: u64) -> u32 {
        while t != NONE {
            let n = self.n(t);
            if key < n.start {
                t = n.left;
            } else if key > n.start {
                t = n.right;
            } else {
                return t;
            }
        }
        NONE
    }

    /// The node with the largest start `<= key`.
    fn floor(&self, mut t: u32, key: u64) -> u32 {
        let mut best = NONE;
        while t != NONE {
            let n = self.n(t);
            if n.start <= key {
                best = t;
                t = n.right;
            } else {
                t = n.left;
            }
        }
        best
    }

    /// The lowest free range that holds an aligned block of order `order`.
    fn find_fit(&self, order: u8) -> u32 {
        let need = order + 1;
        let mut t = self.free_root;
        if self.fit(t) < need {
            return NONE;
        }
        loop {
            let n = self.n(t);
            if self.fit(n.left) >= need {
                t = n.left;
            } else if own_fit(n.start, n.end) >= need {
                return t;
            } else {
                // The subtree fit is exact, so the right subtree must hold the fit.
                t = n.right;
                if t == NONE {
                    return NONE;
                }
            }
        }
    }

    // ----- the allocator operations -----

    /// Allocates `2^order` pages aligned to their size, ending at or below `limit`.
    pub(crate) fn alloc(&mut self, order: u8, limit: u64) -> Result<u64, Error> {
        if order >= 64 {
            return Err(Error::InvalidOrder);
        }
        let size = 1u64 << order;
        let limit = limit.min(self.end);
        if (self.reg.len() + self.reserved.len()) as u64 >= self.max_ranges {
            return Err(Error::NoSpace);
        }
        let t = self.find_fit(order);
        if t == NONE {
            return Err(Error::NoSpace);
        }
        let Node {
            start: a, end: b, ..
        } = *self.n(t);
        let blk = align_up(a, size).ok_or(Error::NoSpace)?;
        let blk_end = blk.checked_add(size).ok_or(Error::NoSpace)?;
        if blk_end > limit {
            return Err(Error::NoSpace);
        }
        // A split needs a second node; below `max_ranges` the arena always has one.
        if a < blk && blk_end < b && self.spare_count == 0 {
            return Err(Error::NoSpace);
        }
        self.reg.insert(blk, order, State::Live)?;
        let (root, x) = self.remove(self.free_root, a, true);
        debug_assert_eq!(x, t);
        self.free_root = root;
        self.counts.free_ranges -= 1;
        let mut reuse = Some(t);
        if a < blk {
            self.nm(t).end = blk;
            self.free_root = self.insert(self.free_root, t, true);
            self.counts.free_ranges += 1;
            reuse = None;
        }
        if blk_end < b {
            let n = match reuse.take() {
                Some(n) => n,
                None => self.new_node(blk_end, b).ok_or(Error::Inconsistent)?,
            };
            let node = self.nm(n);
            node.start = blk_end;
            node.end = b;
            self.free_root = self.insert(self.free_root, n, true);
            self.counts.free_ranges += 1;
        }
        if let Some(n) = reuse {
            self.release_node(n);
        }
        self.counts.allocated_ranges += 1;
        self.counts.free_pages -= size;
        self.counts.live_pages += size;
        Ok(blk)
    }

    /// Looks up the allocated range starting at `pfn` and checks its order and state.
    fn check(&self, pfn: u64, order: u8, expect: State) -> Result<crate::registry::Entry, Error> {
        let e = self.reg.find(pfn).ok_or(Error::NotAllocated)?;
        let (o, state) = self.reg.get(e);
        if o != order {
            return Err(Error::WrongSize { allocated_order: o });
        }
        match (state, expect) {
            (s, e2) if s == e2 => Ok(e),
            (State::Cached, State::Live) => Err(Error::DoubleFree),
            _ => Err(Error::Inconsistent),
        }
    }

    /// Moves the allocated range at `pfn` from state `from` to `to` (strict checking).
    pub(crate) fn mark(
        &mut self,
        pfn: u64,
        order: u8,
        from: State,
        to: State,
    ) -> Result<(), Error> {
        let e = self.check(pfn, order, from)?;
        self.reg.set_state(e, to);
        let size = 1u64 << order;
        match to {
            State::Live => {
                self.counts.cached_pages -= size;
                self.counts.live_pages += size;
            }
            State::Cached => {
                self.counts.live_pages -= size;
                self.counts.cached_pages += size;
            }
        }
        Ok(())
    }

    /// Frees the allocated range at `pfn`, which must have `order` and be in state `expect`.
    pub(crate) fn free(&mut self, pfn: u64, order: u8, expect: State) -> Result<(), Error> {
        let e = self.check(pfn, order, expect)?;
        let size = 1u64 << order;
        let (mut a, mut b) = (pfn, pfn + size);
        let p = self.floor(self.free_root, pfn);
        let p = if p != NONE && self.n(p).end == pfn {
            p
        } else {
            NONE
        };
        let q = self.find(self.free_root, b);
        // Merging nothing needs a node; the arena always has one below `max_ranges` ranges.
        if p == NONE && q == NONE && self.spare_count == 0 {
            return Err(Error::Inconsistent);
        }
        self.reg.remove(e);
        self.counts.allocated_ranges -= 1;
        match expect {
            State::Live => self.counts.live_pages -= size,
            State::Cached => self.counts.cached_pages -= size,
        }
        self.counts.free_pages += size;
        let mut keep = NONE;
        if p != NONE {
            a = self.n(p).start;
            let (root, _) = self.remove(self.free_root, a, true);
            self.free_root = root;
            self.counts.free_ranges -= 1;
            keep = p;
        }
        if q != NONE {
            b = self.n(q).end;
            let (root, _) = self.remove(self.free_root, self.n(q).start, true);
            self.free_root = root;
            self.counts.free_ranges -= 1;
            if keep == NONE {
                keep = q;
            } else {
                self.release_node(q);
            }
        }
        if keep == NONE {
            keep = self.new_node(a, b).ok_or(Error::Inconsistent)?;
        }
        let node = self.nm(keep);
        node.start = a;
        node.end = b;
        self.free_root = self.insert(self.free_root, keep, true);
        self.counts.free_ranges += 1;
        Ok(())
    }

    /// Full structural check (O(n)): AVL shape, augmentation, ordering, disjointness, counters.
    pub(crate) fn verify(&self, base: u64) -> Result<(), &'static str> {
        let mut free = Vec::new();
        self.walk(self.free_root, &mut free)?;
        let mut allocd: Vec<(u64, u64)> = Vec::new();
        let (mut live, mut cached) = (0u64, 0u64);
        for (pfn, order, state) in self.reg.entries() {
            if order >= 64 || pfn & ((1u64 << order) - 1) != 0 {
                return Err("allocated range is not a naturally aligned power of two");
            }
            allocd.push((pfn, pfn + (1u64 << order)));
            match state {
                State::Live => live += 1 << order,
                State::Cached => cached += 1 << order,
            }
        }
        if !self.reg.probe_runs_intact() {
            return Err("registry probe runs broken");
        }
        if (live, cached) != (self.counts.live_pages, self.counts.cached_pages) {
            return Err("live and cached counters disagree with the registry");
        }
        let free_pages: u64 = free.iter().map(|&(a, b)| b - a).sum();
        if free_pages != self.counts.free_pages || free.len() as u64 != self.counts.free_ranges {
            return Err("free counters disagree with the free tree");
        }
        if allocd.len() as u64 != self.counts.allocated_ranges {
            return Err("allocated counter disagrees with the registry");
        }
        let alloc_pages: u64 = allocd.iter().map(|&(a, b)| b - a).sum();
        let reserved_pages: u64 = self.reserved.iter().map(|&(a, b)| b - a).sum();
        if alloc_pages + free_pages + reserved_pages != self.end - base {
            return Err("free and allocated pages do not add up to the window");
        }
        for w in free.windows(2) {
            if w[0].1 >= w[1].0 {
                return Err("free ranges overlap or touch (not coalesced)");
            }
        }
        for w in self.reserved.windows(2) {
            if w[0].1 >= w[1].0 {
                return Err("reserved ranges overlap or touch (not merged)");
            }
        }
        let mut all: Vec<(u64, u64)> = free
            .iter()
            .chain(allocd.iter())
            .chain(self.reserved.iter())
            .copied()
            .collect();
        all.sort_unstable();
        if all.first().map(|r| r.0) != Some(base) && !all.is_empty() {
            return Err("ranges do not start at the window base");
        }
        for w in all.windows(2) {
            if w[0].1 != w[1].0 {
                return Err("ranges overlap or leave a gap");
            }
        }
        if self.nodes.len() - self.spare_count != free.len() {
            return Err("node arena accounting is off");
        }
        Ok(())
    }

    fn walk(&self, t: u32, out: &mut Vec<(u64, u64)>) -> Result<(u8, u8), &'static str> {
        if t == NONE {
            return Ok((0, 0));
        }
        let n = *self.n(t);
        let (hl, fl) = self.walk(n.left, out)?;
        if out.last().is_some_and(|&(a, _)| a >= n.start) {
            return Err("tree keys out of order");
        }
        if n.start >= n.end {
            return Err("empty range in a tree");
        }
        out.push((n.start, n.end));
        let (hr, fr) = self.walk(n.right, out)?;
        if hl.abs_diff(hr) > 1 || n.height != 1 + hl.max(hr) {
            return Err("AVL height or balance wrong");
        }
        let fit = own_fit(n.start, n.end).max(fl).max(fr);
        if n.fit != fit {
            return Err("fit augmentation wrong");
        }
        Ok((n.height, fit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_fit_matches_brute_force() {
        for a in 0..70u64 {
            for b in a..140u64 {
                let mut best = 0u8;
                for k in 0..8u8 {
                    let s = 1u64 << k;
                    if align_up(a, s).unwrap() + s <= b {
                        best = k + 1;
                    }
                }
                assert_eq!(own_fit(a, b), best, "[{a}, {b})");
            }
        }
    }

    #[test]
    fn lowest_fit_and_limit() {
        let mut b = Backing::new(1, 1 << 20, 64).unwrap();
        assert_eq!(b.alloc(0, u64::MAX), Ok(1));
        assert_eq!(b.alloc(3, u64::MAX), Ok(8));
        assert_eq!(b.alloc(0, u64::MAX), Ok(2));
        assert_eq!(b.alloc(2, u64::MAX), Ok(4));
        assert_eq!(b.alloc(4, 32), Ok(16));
        assert_eq!(b.alloc(4, 47), Err(Error::NoSpace));
        assert_eq!(b.alloc(4, 48), Ok(32));
        b.verify(1).unwrap();
        assert_eq!(
            b.free(8, 2, State::Live),
            Err(Error::WrongSize { allocated_order: 3 })
        );
        assert_eq!(b.free(9, 0, State::Live), Err(Error::NotAllocated));
        assert_eq!(b.free(8, 3, State::Live), Ok(()));
        assert_eq!(b.free(8, 3, State::Live), Err(Error::NotAllocated));
        b.verify(1).unwrap();
        for pfn in [1, 2, 4, 16, 32] {
            let order = match pfn {
                1 | 2 => 0,
                4 => 2,
                _ => 4,
            };
            b.free(pfn, order, State::Live).unwrap();
            b.verify(1).unwrap();
        }
        assert_eq!(b.counts().free_ranges, 1);
        assert_eq!(b.counts().free_pages, (1 << 20) - 1);
    }

    #[test]
    fn node_arena_exhaustion_is_no_space() {
        let mut b = Backing::new(0, 1 << 20, 2).unwrap();
        // Every second page: each allocation splits the free range.
        assert!(b.alloc(0, u64::MAX).is_ok());
        assert!(b.alloc(1, u64::MAX).is_ok());
        assert!(b.alloc(2, u64::MAX).is_ok() || b.counts().allocated_ranges == 2);
        let mut n = 0;
        while b.alloc(0, u64::MAX).is_ok() {
            n += 1;
            assert!(n < 10);
        }
        b.verify(0).unwrap();
    }
}
