//! Queue bookkeeping, independent of memory: the submission ring's tail and head, the
//! completion ring's head and expected phase tag, and the table of outstanding command
//! identifiers.

use crate::command::Completion;

/// A submission queue's ring indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqRing {
    entries: u16,
    tail: u16,
    head: u16,
}

impl SqRing {
    /// An empty ring of `entries` (2..=65536; one entry always stays free).
    pub const fn new(entries: u16) -> SqRing {
        SqRing {
            entries,
            tail: 0,
            head: 0,
        }
    }

    /// Whether another entry fits.
    pub const fn has_room(&self) -> bool {
        (self.tail + 1) % self.entries != self.head
    }

    /// Claims the slot at the tail and advances it; `None` when full.
    pub fn push(&mut self) -> Option<u16> {
        if !self.has_room() {
            return None;
        }
        let slot = self.tail;
        self.tail = (self.tail + 1) % self.entries;
        Some(slot)
    }

    /// The tail (the value written to the doorbell).
    pub const fn tail(&self) -> u16 {
        self.tail
    }

    /// Records the head the controller reported in a completion (entries before it were
    /// consumed). A value outside the ring is ignored.
    pub fn set_head(&mut self, head: u16) {
        if head < self.entries {
            self.head = head;
        }
    }
}

/// A completion queue's head and the phase tag that marks a new entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CqCursor {
    entries: u16,
    head: u16,
    phase: bool,
}

impl CqCursor {
    /// A fresh queue of `entries`: the controller writes phase 1 on its first pass (the
    /// memory starts zeroed).
    pub const fn new(entries: u16) -> CqCursor {
        CqCursor {
            entries,
            head: 0,
            phase: true,
        }
    }

    /// Whether `c`, read at the head, is a new completion.
    pub const fn is_new(&self, c: &Completion) -> bool {
        c.phase() == self.phase
    }

    /// Consumes the head entry; the phase flips at each wrap.
    pub fn advance(&mut self) {
        self.head += 1;
        if self.head == self.entries {
            self.head = 0;
            self.phase = !self.phase;
        }
    }

    /// The head (the slot to read next, and the value written to the doorbell).
    pub const fn head(&self) -> u16 {
        self.head
    }
}

/// Outstanding command identifiers 0..64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cids {
    busy: u64,
    limit: u16,
}

impl Cids {
    /// Identifiers `0..limit` (at most 64).
    pub const fn new(limit: u16) -> Cids {
        Cids {
            busy: 0,
            limit: if limit > 64 { 64 } else { limit },
        }
    }

    /// A free identifier, now outstanding.
    pub fn alloc(&mut self) -> Option<u16> {
        let free = !self.busy & mask(self.limit);
        if free == 0 {
            return None;
        }
        let cid = free.trailing_zeros() as u16;
        self.busy |= 1 << cid;
        Some(cid)
    }

    /// Ends `cid`; false if it was not outstanding.
    pub fn free(&mut self, cid: u16) -> bool {
        if cid >= self.limit || self.busy & (1 << cid) == 0 {
            return false;
        }
        self.busy &= !(1 << cid);
        true
    }

    /// Whether `cid` is outstanding.
    pub const fn is_busy(&self, cid: u16) -> bool {
        cid < self.limit && self.busy & (1 << cid) != 0
    }

    /// Outstanding identifiers.
    pub const fn outstanding(&self) -> u32 {
        self.busy.count_ones()
    }
}

/// A free command identifier and the submission slot for its command, both now taken; none
/// (and nothing taken) if either has run out.
pub fn claim(cids: &mut Cids, sq: &mut SqRing) -> Option<(u16, u16)> {
    let cid = cids.alloc()?;
    let Some(slot) = sq.push() else {
        cids.free(cid);
        return None;
    };
    Some((cid, slot))
}

const fn mask(limit: u16) -> u64 {
    if limit >= 64 {
        u64::MAX
    } else {
        (1u64 << limit) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(cid: u16, phase: bool) -> Completion {
        Completion {
            cid,
            status: phase as u16,
            ..Completion::default()
        }
    }

    #[test]
    fn sq_ring_keeps_one_entry_free() {
        let mut sq = SqRing::new(4);
        assert_eq!(
            (sq.push(), sq.push(), sq.push()),
            (Some(0), Some(1), Some(2))
        );
        assert_eq!(sq.push(), None);
        sq.set_head(2);
        assert_eq!((sq.push(), sq.push()), (Some(3), Some(0)));
        assert_eq!(sq.push(), None);
        assert_eq!(sq.tail(), 1);
        sq.set_head(9);
        assert!(!sq.has_room());
    }

    #[test]
    fn cids_are_unique_until_freed() {
        let mut c = Cids::new(3);
        assert_eq!(
            (c.alloc(), c.alloc(), c.alloc(), c.alloc()),
            (Some(0), Some(1), Some(2), None)
        );
        assert!(c.free(1));
        assert!(!c.free(1));
        assert!(!c.free(7));
        assert_eq!(c.alloc(), Some(1));
        assert_eq!(c.outstanding(), 3);
        assert_eq!(Cids::new(200).limit, 64);
    }

    proptest! {
        /// A controller model posts completions in bursts of any size that fit the ring
        /// (memory starts zeroed; each post writes the pass's phase); the cursor consumes
        /// exactly the posted entries, in order, never a stale one.
        #[test]
        fn phase_tag_tracks_the_controller(entries in 2u16..40, bursts in proptest::collection::vec(0u16..64, 1..60)) {
            let mut ring = vec![Completion::default(); entries as usize];
            let (mut tail, mut dev_phase) = (0u16, true);
            let mut cq = CqCursor::new(entries);
            let (mut posted, mut seen) = (0u32, 0u32);
            for b in bursts {
                // The controller never overwrites an entry the driver has not consumed.
                let n = b % entries;
                for _ in 0..n {
                    ring[tail as usize] = entry((posted % 0xffff) as u16, dev_phase);
                    posted += 1;
                    tail += 1;
                    if tail == entries {
                        tail = 0;
                        dev_phase = !dev_phase;
                    }
                }
                while cq.is_new(&ring[cq.head() as usize]) {
                    prop_assert_eq!(ring[cq.head() as usize].cid, (seen % 0xffff) as u16);
                    seen += 1;
                    cq.advance();
                }
                prop_assert_eq!(seen, posted);
                prop_assert_eq!(cq.head(), tail);
            }
        }

        /// Outstanding identifiers never repeat.
        #[test]
        fn cid_table_matches_a_set(ops in proptest::collection::vec((any::<bool>(), 0u16..70), 1..200)) {
            let mut c = Cids::new(64);
            let mut set = std::collections::BTreeSet::new();
            for (alloc, cid) in ops {
                if alloc {
                    match c.alloc() {
                        Some(x) => prop_assert!(set.insert(x)),
                        None => prop_assert_eq!(set.len(), 64),
                    }
                } else {
                    prop_assert_eq!(c.free(cid), set.remove(&cid));
                }
                prop_assert_eq!(c.outstanding() as usize, set.len());
            }
        }
    }
}
