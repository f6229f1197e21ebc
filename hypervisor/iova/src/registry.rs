//! The registry of allocated ranges: an open-addressing hash table keyed by start pfn.
//!
//! Every range handed out by the backing allocator (to a caller, or now sitting in a magazine)
//! has one entry holding its order and [`State`]; a free is checked against it, so a bad free is
//! rejected instead of corrupting the free tree. The table is allocated at construction with at
//! least twice as many slots as ranges it may hold (load factor <= 1/2), uses linear probing
//! with a multiplicative hash, and deletes by backward shifting (no tombstones), so a lookup
//! touches one or two cache lines on average and probe sequences never degrade with churn.

use alloc::vec::Vec;

use crate::Error;

/// Who holds an allocated range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// Handed to a caller.
    Live,
    /// Back in a magazine (tracked only when strict checking is on).
    Cached,
}

/// One slot: `key` is `pfn + 1` (0 = empty).
#[derive(Clone, Copy, Debug)]
struct Slot {
    key: u64,
    order: u8,
    state: State,
}

const EMPTY: Slot = Slot {
    key: 0,
    order: 0,
    state: State::Live,
};

/// Allocated ranges by start pfn.
#[derive(Debug)]
pub(crate) struct Registry {
    slots: Vec<Slot>,
    shift: u32,
    len: usize,
}

/// A found entry (slot index).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry(usize);

impl Registry {
    /// A registry for up to `max` ranges (allocates; construction only).
    pub(crate) fn new(max: usize) -> Result<Self, Error> {
        let cap = max
            .checked_mul(2)
            .and_then(|n| n.max(16).checked_next_power_of_two())
            .ok_or(Error::InvalidConfig)?;
        let mut slots = Vec::new();
        slots
            .try_reserve_exact(cap)
            .map_err(|_| Error::OutOfMemory)?;
        slots.resize(cap, EMPTY);
        Ok(Self {
            slots,
            shift: 64 - cap.trailing_zeros(),
            len: 0,
        })
    }

    /// Number of ranges registered.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    fn home(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize
    }

    #[inline]
    fn next(&self, i: usize) -> usize {
        (i + 1) & (self.slots.len() - 1)
    }

    /// The entry for the range starting at `pfn`.
    pub(crate) fn find(&self, pfn: u64) -> Option<Entry> {
        let key = pfn.wrapping_add(1);
        let mut i = self.home(key);
        loop {
            let s = self.slots.get(i)?;
            if s.key == key {
                return Some(Entry(i));
            }
            if s.key == 0 {
                return None;
            }
            i = self.next(i);
        }
    }

    /// (order, state) of an entry.
    pub(crate) fn get(&self, e: Entry) -> (u8, State) {
        self.slots
            .get(e.0)
            .map_or((0, State::Live), |s| (s.order, s.state))
    }

    /// Changes the state of an entry.
    pub(crate) fn set_state(&mut self, e: Entry, state: State) {
        if let Some(s) = self.slots.get_mut(e.0) {
            s.state = state;
        }
    }

    /// Registers a range starting at `pfn` (which must not be registered). Fails only if the
    /// table is over its sizing, which the caller's range limit prevents.
    pub(crate) fn insert(&mut self, pfn: u64, order: u8, state: State) -> Result<(), Error> {
        if self.len * 2 >= self.slots.len() {
            return Err(Error::NoSpace);
        }
        let key = pfn.wrapping_add(1);
        let mut i = self.home(key);
        loop {
            let s = self.slots.get_mut(i).ok_or(Error::Inconsistent)?;
            if s.key == 0 {
                *s = Slot { key, order, state };
                self.len += 1;
                return Ok(());
            }
            if s.key == key {
                return Err(Error::Inconsistent);
            }
            i = self.next(i);
        }
    }

    /// Removes an entry, shifting later members of its probe run back (no tombstones).
    pub(crate) fn remove(&mut self, e: Entry) {
        let mut hole = e.0;
        if self.slots.get(hole).is_none_or(|s| s.key == 0) {
            return;
        }
        let mut i = self.next(hole);
        loop {
            let Some(&s) = self.slots.get(i) else { return };
            if s.key == 0 {
                break;
            }
            let home = self.home(s.key);
            // `s` may move into the hole unless its home lies cyclically in (hole, i].
            let stays = if hole <= i {
                hole < home && home <= i
            } else {
                hole < home || home <= i
            };
            if !stays {
                self.slots[hole] = s;
                hole = i;
            }
            i = self.next(i);
        }
        self.slots[hole] = EMPTY;
        self.len -= 1;
    }

    /// Every registered range as (pfn, order, state), in table order (for verification).
    pub(crate) fn entries(&self) -> impl Iterator<Item = (u64, u8, State)> + '_ {
        self.slots
            .iter()
            .filter(|s| s.key != 0)
            .map(|s| (s.key - 1, s.order, s.state))
    }

    /// Every entry is reachable from its home slot (for verification).
    pub(crate) fn probe_runs_intact(&self) -> bool {
        self.slots.iter().filter(|s| s.key != 0).all(|s| {
            self.find(s.key - 1)
                .is_some_and(|e| self.slots[e.0].key == s.key)
        })
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn behaves_like_a_map_under_churn() {
        let mut r = Registry::new(64).unwrap();
        let mut m: HashMap<u64, u8> = HashMap::new();
        let mut x = 12345u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Clustered keys, like aligned IOVAs.
            let pfn = (x % 200) * 8;
            match r.find(pfn) {
                Some(e) => {
                    assert_eq!(m.remove(&pfn), Some(r.get(e).0));
                    r.remove(e);
                }
                None if m.len() < 64 => {
                    r.insert(pfn, (x % 10) as u8, State::Live).unwrap();
                    m.insert(pfn, (x % 10) as u8);
                }
                None => {}
            }
            assert_eq!(r.len(), m.len());
        }
        assert!(r.probe_runs_intact());
        for (&pfn, &o) in &m {
            assert_eq!(r.get(r.find(pfn).unwrap()).0, o);
        }
    }
}
