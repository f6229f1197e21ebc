//! [`LiveMap`]: a shard's live mappings keyed by their first IOVA, an open-addressing hash
//! table (linear probing, backward-shift deletion, no tombstones).
//!
//! It replaces an ordered map on the hot path: a lookup, insert or remove is one hash and a
//! short probe, and nothing is allocated once the table has grown to the shard's working set
//! (an ordered map allocates and frees nodes as it splits and merges them, and every kernel
//! allocation takes the heap's global lock). It grows when half full and never shrinks, so
//! probes stay short and a steady workload does not reallocate.

use alloc::vec::Vec;

use crate::state::{Mapping, PAGE_SIZE};

/// Smallest table (slots).
const MIN_SLOTS: usize = 16;

/// The hash multiplier (odd): see [`LiveMap::home`].
const HASH_MUL: u64 = 0xD25C_8062_0522_1A0F;

/// Live mappings by first IOVA (page aligned).
#[derive(Debug, Default)]
pub(crate) struct LiveMap {
    slots: Vec<Option<Mapping>>,
    len: usize,
}

impl LiveMap {
    /// Number of mappings.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The home slot of `iova` in a table of `n` slots (a power of two).
    #[inline]
    fn home(iova: u64, n: usize) -> usize {
        // Multiplicative hashing of the page number, top bits. The IOVA allocator aligns each
        // range to its power-of-two size, so a workload of equal-size mappings has keys at a
        // stride of 2^k pages; the multiplier was searched so that such keys spread evenly
        // for every k up to 10 (Fibonacci hashing's 2^64/phi does only for small k: at a
        // stride of 16 pages, 64 KiB mappings, its keys cluster; see the test).
        let h = (iova / PAGE_SIZE).wrapping_mul(HASH_MUL);
        (h >> (64 - n.trailing_zeros())) as usize
    }

    /// The slot holding `iova`, if any.
    #[inline]
    fn find(&self, iova: u64) -> Option<usize> {
        let n = self.slots.len();
        if n == 0 {
            return None;
        }
        let mut i = Self::home(iova, n);
        loop {
            match &self.slots[i] {
                None => return None,
                Some(m) if m.iova == iova => return Some(i),
                Some(_) => i = (i + 1) & (n - 1),
            }
        }
    }

    /// The mapping starting at `iova`.
    pub(crate) fn get(&self, iova: u64) -> Option<&Mapping> {
        self.find(iova).and_then(|i| self.slots[i].as_ref())
    }

    /// Adds `m` (no mapping starts at `m.iova` yet: the IOVA allocator hands each range out
    /// once). Replaces one that does.
    #[inline]
    pub(crate) fn insert(&mut self, m: Mapping) {
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let n = self.slots.len();
        let mut i = Self::home(m.iova, n);
        loop {
            match &self.slots[i] {
                Some(o) if o.iova != m.iova => i = (i + 1) & (n - 1),
                Some(_) => {
                    self.slots[i] = Some(m);
                    return;
                }
                None => {
                    self.slots[i] = Some(m);
                    self.len += 1;
                    return;
                }
            }
        }
    }

    /// The slot of the mapping starting at `iova` and a copy of it, for a later
    /// [`Self::remove_slot`] (one probe where a lookup and a removal would take two).
    #[inline]
    pub(crate) fn lookup(&self, iova: u64) -> Option<(usize, Mapping)> {
        let i = self.find(iova)?;
        self.slots[i].map(|m| (i, m))
    }

    /// Removes and returns the mapping starting at `iova`.
    pub(crate) fn remove(&mut self, iova: u64) -> Option<Mapping> {
        let slot = self.find(iova)?;
        self.remove_slot(slot)
    }

    /// Removes and returns the mapping in `slot` (from [`Self::lookup`], with no insert or
    /// removal since).
    #[inline]
    pub(crate) fn remove_slot(&mut self, slot: usize) -> Option<Mapping> {
        let mut hole = slot;
        let out = self.slots[hole].take()?;
        self.len -= 1;
        // Backward shift: move later entries of the probe run into the hole when their home
        // slot does not lie (cyclically) after the hole.
        let n = self.slots.len();
        let mut i = (hole + 1) & (n - 1);
        while let Some(m) = self.slots[i] {
            let home = Self::home(m.iova, n);
            // Distance from home to i versus from home to the hole (cyclic).
            if (i.wrapping_sub(home) & (n - 1)) >= (i.wrapping_sub(hole) & (n - 1)) {
                self.slots[hole] = self.slots[i].take();
                hole = i;
            }
            i = (i + 1) & (n - 1);
        }
        Some(out)
    }

    /// Every mapping, in no particular order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &Mapping> + '_ {
        self.slots.iter().flatten()
    }

    #[cold]
    #[inline(never)]
    fn grow(&mut self) {
        let n = (self.slots.len() * 2).max(MIN_SLOTS);
        let old = core::mem::replace(&mut self.slots, (0..n).map(|_| None).collect());
        self.len = 0;
        for m in old.into_iter().flatten() {
            self.insert(m);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::Access;
    use alloc::collections::BTreeMap;
    use proptest::prelude::*;

    fn m(iova: u64) -> Mapping {
        Mapping {
            iova,
            pages: 1,
            gpa: iova ^ 0x1000_0000,
            access: Access::RW,
        }
    }

    #[test]
    fn insert_get_remove() {
        let mut t = LiveMap::default();
        assert!(t.get(0x1000).is_none());
        assert!(t.remove(0x1000).is_none());
        for p in 0..100u64 {
            t.insert(m(p << 12));
        }
        assert_eq!(t.len(), 100);
        for p in (0..100u64).step_by(2) {
            assert_eq!(t.remove(p << 12), Some(m(p << 12)));
        }
        for p in 0..100u64 {
            assert_eq!(t.get(p << 12).is_some(), p % 2 == 1, "page {p}");
        }
        assert_eq!(t.values().count(), 50);
    }

    /// Displacement from the home slot, summed over the keys `base + j * stride` pages
    /// (`j < n / 2`) inserted in a table of `n` slots.
    fn displacement(base: u64, stride: u64, n: usize) -> usize {
        let mut t = LiveMap::default();
        for j in 0..n as u64 / 2 {
            t.insert(m((base + j * stride) * PAGE_SIZE));
        }
        assert_eq!(t.slots.len(), n);
        t.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|m| i.wrapping_sub(LiveMap::home(m.iova, n)) & (n - 1)))
            .sum()
    }

    /// Equal-size mappings (keys at a power-of-two stride of pages, as the IOVA allocator
    /// aligns them) stay close to home at any stride up to 1024 pages: on average less than
    /// a quarter slot away, where a random hash would give about half a slot (with the
    /// Fibonacci multiplier, stride 16 gives almost 2).
    #[test]
    fn strided_keys_stay_near_home() {
        for n in [128usize, 1024] {
            for k in 0..=10 {
                for base in [0x10_0000u64, 0x7_a3c1] {
                    let d = displacement(base << k, 1 << k, n);
                    assert!(d * 4 < n / 2, "stride 2^{k}, {n} slots: {d} in all");
                }
            }
        }
    }

    proptest! {
        /// Against an ordered map: any sequence of inserts and removes (keys from a small
        /// set, so probe runs collide and wrap) leaves the same contents.
        #[test]
        fn matches_an_ordered_map(ops in proptest::collection::vec((any::<bool>(), 0u64..64), 1..400)) {
            let mut t = LiveMap::default();
            let mut model = BTreeMap::new();
            for (ins, k) in ops {
                // Keys that share home slots: multiples of a large power of two.
                let iova = k << 30;
                if ins {
                    t.insert(m(iova));
                    model.insert(iova, m(iova));
                } else if k % 2 == 0 {
                    prop_assert_eq!(t.remove(iova), model.remove(&iova));
                } else {
                    // The UNMAP path: one probe, then the removal by slot.
                    let found = t.lookup(iova);
                    prop_assert_eq!(found.map(|(_, m)| m), model.get(&iova).copied());
                    let out = found.and_then(|(slot, _)| t.remove_slot(slot));
                    prop_assert_eq!(out, model.remove(&iova));
                }
                prop_assert_eq!(t.len(), model.len());
                for k in 0..64u64 {
                    prop_assert_eq!(t.get(k << 30), model.get(&(k << 30)));
                }
            }
            let mut all: Vec<u64> = t.values().map(|m| m.iova).collect();
            all.sort_unstable();
            prop_assert_eq!(all, model.keys().copied().collect::<Vec<_>>());
        }
    }
}
