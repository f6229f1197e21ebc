//! Drained fault records waiting for their consumer: one bounded queue per (unit, domain) and
//! one per unit for records of no domain (unattached sources: the hypervisor's own queue).
//!
//! A full queue drops the new record and counts it in that queue's `dropped`, so a fault
//! storm from one domain can only lose that domain's records, never push out another's. The
//! consumer takes its records together with the drops since its last take (a guest's fault
//! ring adds them to its own `dropped` count).

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;

/// What one consumer takes: its records, oldest first, and how many were dropped since its
/// previous take because its queue was full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken<T> {
    /// The records, oldest first.
    pub records: Vec<T>,
    /// Records that arrived while the queue was full (lost), since the previous take.
    pub dropped: u64,
}

impl<T> Default for Taken<T> {
    fn default() -> Self {
        Self {
            records: Vec::new(),
            dropped: 0,
        }
    }
}

#[derive(Debug)]
struct Queue<T> {
    items: VecDeque<T>,
    dropped: u64,
}

/// The fault queues of every unit. `unit` is any key naming a unit (the kernel uses the
/// register base); `domain` is the domain the source was attached to (`None`: no domain,
/// the hypervisor's queue).
#[derive(Debug)]
pub struct FaultQueues<T> {
    queues: BTreeMap<(u64, Option<u16>), Queue<T>>,
    capacity: usize,
    dropped_total: u64,
}

impl<T> FaultQueues<T> {
    /// No queues yet; each queue holds at most `capacity` records.
    pub const fn new(capacity: usize) -> Self {
        Self {
            queues: BTreeMap::new(),
            capacity,
            dropped_total: 0,
        }
    }

    /// Records per queue at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Appends `rec` to the queue of (`unit`, `domain`). Returns `false` when that queue was
    /// full: the record is dropped and counted there (the other queues are not touched).
    pub fn push(&mut self, unit: u64, domain: Option<u16>, rec: T) -> bool {
        let q = self.queues.entry((unit, domain)).or_insert_with(|| Queue {
            items: VecDeque::new(),
            dropped: 0,
        });
        if q.items.len() >= self.capacity {
            q.dropped = q.dropped.saturating_add(1);
            self.dropped_total = self.dropped_total.saturating_add(1);
            return false;
        }
        q.items.push_back(rec);
        true
    }

    /// Takes the records of (`unit`, `domain`) and its drops since the last take.
    pub fn take(&mut self, unit: u64, domain: Option<u16>) -> Taken<T> {
        match self.queues.remove(&(unit, domain)) {
            Some(q) => Taken {
                records: q.items.into(),
                dropped: q.dropped,
            },
            None => Taken::default(),
        }
    }

    /// Takes the records of every queue of `unit` (the hypervisor's and every domain's), in
    /// queue order: for the hypervisor's self-tests, which own every domain they make.
    pub fn take_unit(&mut self, unit: u64) -> Taken<T> {
        let keys: Vec<_> = self
            .queues
            .range((unit, None)..=(unit, Some(u16::MAX)))
            .map(|(k, _)| *k)
            .collect();
        let mut out = Taken::default();
        for k in keys {
            if let Some(q) = self.queues.remove(&k) {
                out.records.extend(q.items);
                out.dropped = out.dropped.saturating_add(q.dropped);
            }
        }
        out
    }

    /// Whether (`unit`, `domain`) has records or drops waiting.
    pub fn has(&self, unit: u64, domain: Option<u16>) -> bool {
        self.queues.contains_key(&(unit, domain))
    }

    /// Records waiting in every queue.
    pub fn len(&self) -> usize {
        self.queues.values().map(|q| q.items.len()).sum()
    }

    /// Whether no queue holds a record or a drop.
    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// Records ever dropped because their queue was full (all queues).
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_domains_storm_does_not_evict_anothers_records() {
        let mut q = FaultQueues::new(4);
        assert!(q.push(1, Some(7), 100));
        assert!(q.push(1, None, 200));
        for i in 0..1000 {
            let kept = q.push(1, Some(9), i);
            assert_eq!(kept, i < 4);
        }
        let a = q.take(1, Some(7));
        assert_eq!(a.records, [100]);
        assert_eq!(a.dropped, 0);
        let h = q.take(1, None);
        assert_eq!(h.records, [200]);
        assert_eq!(h.dropped, 0);
        let b = q.take(1, Some(9));
        assert_eq!(b.records, [0, 1, 2, 3]);
        assert_eq!(b.dropped, 996);
        assert_eq!(q.dropped_total(), 996);
        // Taking resets the queue and its drop count.
        assert_eq!(q.take(1, Some(9)), Taken::default());
        assert!(q.is_empty());
    }

    #[test]
    fn units_are_separate_and_take_unit_takes_only_its_own() {
        let mut q = FaultQueues::new(8);
        q.push(1, Some(7), 1);
        q.push(2, Some(7), 2);
        q.push(1, None, 3);
        q.push(1, Some(u16::MAX), 4);
        q.push(2, None, 5);
        let t = q.take_unit(1);
        let mut r = t.records.clone();
        r.sort();
        assert_eq!(r, [1, 3, 4]);
        assert_eq!(q.take(2, Some(7)).records, [2]);
        assert_eq!(q.take(2, None).records, [5]);
        assert!(q.is_empty());
    }

    #[test]
    fn drops_survive_until_taken_even_with_an_empty_queue() {
        let mut q = FaultQueues::new(0);
        assert!(!q.push(1, Some(3), 0u8));
        assert!(q.has(1, Some(3)));
        assert_eq!(q.take(1, Some(3)).dropped, 1);
    }

    proptest! {
        /// Whatever the interleaving, each consumer gets exactly its own records in order up
        /// to the capacity, and the rest are counted as its drops.
        #[test]
        fn every_record_is_delivered_to_its_owner_or_counted(
            ops in proptest::collection::vec((0u64..2, proptest::option::of(0u16..3), any::<bool>()), 0..300),
            cap in 0usize..6,
        ) {
            let mut q = FaultQueues::new(cap);
            let mut sent: BTreeMap<(u64, Option<u16>), Vec<usize>> = BTreeMap::new();
            let mut got: BTreeMap<(u64, Option<u16>), (Vec<usize>, u64)> = BTreeMap::new();
            for (i, &(unit, dom, take)) in ops.iter().enumerate() {
                if take {
                    let t = q.take(unit, dom);
                    prop_assert!(t.records.len() <= cap);
                    let e = got.entry((unit, dom)).or_default();
                    e.0.extend(t.records);
                    e.1 += t.dropped;
                } else {
                    q.push(unit, dom, i);
                    sent.entry((unit, dom)).or_default().push(i);
                }
            }
            for (k, v) in sent {
                let t = q.take(k.0, k.1);
                let e = got.entry(k).or_default();
                e.0.extend(t.records);
                e.1 += t.dropped;
                // Delivered records are a subsequence of what was sent, in order.
                let mut it = v.iter();
                for r in &e.0 {
                    prop_assert!(it.any(|x| x == r));
                }
                prop_assert_eq!(e.0.len() as u64 + e.1, v.len() as u64);
            }
            prop_assert!(q.is_empty());
        }
    }
}
