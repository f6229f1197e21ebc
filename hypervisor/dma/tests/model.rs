//! The service against a model IOMMU that behaves like QEMU's VT-d: a device keeps using a
//! translation it has cached until the flush that covers it, so a missing or late
//! invalidation is visible here as a stale device access.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};

use moat_dma::{
    Access, Clock, DmaState, Error, GuestRam, Iommu, IovaSource, Limits, Policy, PAGE_SIZE,
};
use proptest::prelude::*;

#[derive(Default)]
struct FakeIommu {
    ptes: BTreeMap<u64, u64>,
    cached: BTreeMap<u64, u64>,
    fail_next_flush: bool,
    flushes: u32,
    /// The last flush attempt failed (pending invalidations are owed).
    owed: bool,
}

impl FakeIommu {
    /// What a device reaches at `iova`: its cached translation, else the tables (and caches it).
    fn device(&mut self, iova: u64) -> Option<u64> {
        if let Some(&h) = self.cached.get(&iova) {
            return Some(h);
        }
        let h = *self.ptes.get(&iova)?;
        self.cached.insert(iova, h);
        Some(h)
    }
}

impl Iommu for FakeIommu {
    type Pending = Vec<(u64, u64)>;
    fn map(&mut self, iova: u64, hpa: u64, len: u64, _a: Access) -> Result<(), Error> {
        let pages = len / PAGE_SIZE;
        if (0..pages).any(|i| self.ptes.contains_key(&(iova + i * PAGE_SIZE))) {
            return Err(Error::Exist);
        }
        for i in 0..pages {
            self.ptes.insert(iova + i * PAGE_SIZE, hpa + i * PAGE_SIZE);
        }
        Ok(())
    }
    fn unmap(&mut self, iova: u64, len: u64, pending: &mut Self::Pending) -> Result<(), Error> {
        let pages = len / PAGE_SIZE;
        if (0..pages).any(|i| !self.ptes.contains_key(&(iova + i * PAGE_SIZE))) {
            return Err(Error::Noent);
        }
        for i in 0..pages {
            self.ptes.remove(&(iova + i * PAGE_SIZE));
        }
        pending.push((iova, len));
        Ok(())
    }
    fn flush(&mut self, pending: &mut Self::Pending) -> Result<u32, Error> {
        if std::mem::take(&mut self.fail_next_flush) {
            self.owed = true;
            return Err(Error::Busy);
        }
        self.owed = false;
        for (iova, len) in pending.drain(..) {
            for i in 0..len / PAGE_SIZE {
                self.cached.remove(&(iova + i * PAGE_SIZE));
            }
        }
        self.flushes += 1;
        Ok(1)
    }
    fn table_pages(&self) -> usize {
        1 + self
            .ptes
            .keys()
            .map(|k| k >> 21)
            .collect::<BTreeSet<_>>()
            .len()
    }
}

/// Lowest-fit page allocator over [1 MiB, 64 MiB) that refuses double frees.
#[derive(Default)]
struct FakeIovas {
    used: BTreeMap<u64, u64>,
}

impl IovaSource for FakeIovas {
    fn alloc(&mut self, pages: u64) -> Option<u64> {
        let mut at = 0x10_0000;
        for (&s, &p) in &self.used {
            if at + pages * PAGE_SIZE <= s {
                break;
            }
            at = at.max(s + p * PAGE_SIZE);
        }
        (at + pages * PAGE_SIZE <= 0x400_0000).then(|| {
            self.used.insert(at, pages);
            at
        })
    }
    fn free(&mut self, iova: u64, pages: u64) {
        assert_eq!(
            self.used.remove(&iova),
            Some(pages),
            "free of {iova:#x} that was not allocated"
        );
    }
}

struct Ram;
impl GuestRam for Ram {
    fn size(&self) -> u64 {
        16 << 20
    }
    fn host_base(&self) -> u64 {
        0x1000_0000
    }
    fn forbidden(&self, gpa: std::ops::Range<u64>) -> bool {
        gpa.start < 0xF000 + PAGE_SIZE && gpa.end > 0xF000
    }
}

struct FakeClock(Cell<u64>);
impl Clock for FakeClock {
    fn cycles(&self) -> u64 {
        self.0.get()
    }
    fn now_ns(&self) -> u64 {
        self.0.get()
    }
}

struct World {
    st: DmaState<Vec<(u64, u64)>>,
    dom: FakeIommu,
    iovas: FakeIovas,
    clock: FakeClock,
}

impl World {
    fn new(policy: Policy, limits: Limits) -> Self {
        World {
            st: DmaState::new(policy, limits),
            dom: FakeIommu::default(),
            iovas: FakeIovas::default(),
            clock: FakeClock(Cell::new(0)),
        }
    }
    fn map(&mut self, gpa: u64, len: u64, a: Access) -> Result<u64, Error> {
        self.st.map(
            &mut self.dom,
            &mut self.iovas,
            &Ram,
            &self.clock,
            gpa,
            len,
            a,
        )
    }
    fn unmap(&mut self, iova: u64, len: u64) -> Result<(), Error> {
        self.st
            .unmap(&mut self.dom, &mut self.iovas, &Ram, &self.clock, iova, len)
    }
    fn snapshot(&self) -> (moat_dma::Counts, BTreeMap<u64, u64>, BTreeMap<u64, u64>) {
        (
            self.st.counts(&self.dom),
            self.dom.ptes.clone(),
            self.iovas.used.clone(),
        )
    }
}

const L: Limits = Limits {
    max_mappings: 64,
    max_mapped_pages: 512,
    max_table_pages: 64,
    max_pages_per_map: 16,
    deferred_entries: 4,
    deferred_ns: 1000,
};

#[test]
fn strict_unmap_is_unreachable_when_it_returns() {
    let mut w = World::new(Policy::Strict, L);
    let iova = w.map(0x2000, 0x2000, Access::RW).unwrap();
    assert_eq!(w.dom.device(iova), Some(0x1000_2000));
    w.unmap(iova, 0x2000).unwrap();
    assert_eq!(
        w.dom.device(iova),
        None,
        "strict: the cached translation is gone"
    );
    assert_eq!(w.st.counts(&w.dom).pinned_pages, 0);
    assert!(w.iovas.used.is_empty());
}

#[test]
fn batched_flushes_once_per_batch() {
    let mut w = World::new(Policy::Batched, L);
    let a: Vec<u64> = (0..8)
        .map(|i| w.map(0x10000 + i * 0x1000, 0x1000, Access::R).unwrap())
        .collect();
    for &i in &a {
        w.dom.device(i);
    }
    w.st.begin_batch();
    for &i in &a {
        w.unmap(i, 0x1000).unwrap();
    }
    assert!(
        a.iter().all(|&i| w.dom.cached.contains_key(&i)),
        "inside the batch nothing is flushed yet"
    );
    assert_eq!(w.st.counts(&w.dom).pending, 8);
    w.st.end_batch(&mut w.dom, &mut w.iovas, &w.clock).unwrap();
    assert!(a.iter().all(|&i| w.dom.device(i).is_none()));
    assert_eq!(w.dom.flushes, 1);
    assert_eq!(w.st.stats().flushes, 1);
}

#[test]
fn deferred_flushes_by_count_and_by_time() {
    let mut w = World::new(Policy::Deferred, L);
    let a: Vec<u64> = (0..4)
        .map(|i| w.map(i * 0x1000 + 0x20000, 0x1000, Access::W).unwrap())
        .collect();
    for &i in &a[..3] {
        w.unmap(i, 0x1000).unwrap();
    }
    assert_eq!(w.st.counts(&w.dom).pending, 3);
    assert_eq!(w.dom.flushes, 0);
    w.unmap(a[3], 0x1000).unwrap();
    assert_eq!(
        (w.st.counts(&w.dom).pending, w.dom.flushes),
        (0, 1),
        "4th unmap reaches the entry bound"
    );
    let b = w.map(0x30000, 0x1000, Access::W).unwrap();
    w.dom.device(b);
    w.unmap(b, 0x1000).unwrap();
    w.clock.0.set(999);
    w.st.tick(&mut w.dom, &mut w.iovas, &w.clock);
    assert!(
        w.dom.device(b).is_some(),
        "inside the time bound the device may still use it"
    );
    w.clock.0.set(1000);
    w.st.tick(&mut w.dom, &mut w.iovas, &w.clock);
    assert!(w.dom.device(b).is_none(), "the time bound flushed it");
    assert_eq!(w.st.stats().deferred_flushes, 2);
}

#[test]
fn bad_inputs_get_their_status_and_change_nothing() {
    let mut w = World::new(Policy::Strict, L);
    let iova = w.map(0x4000, 0x2000, Access::RW).unwrap();
    let before = w.snapshot();
    let cases: Vec<(&str, Result<(), Error>, Error)> = vec![
        (
            "zero length",
            w.map(0x8000, 0, Access::R).map(|_| ()),
            Error::Inval,
        ),
        (
            "unaligned gpa",
            w.map(0x8001, 0x1000, Access::R).map(|_| ()),
            Error::Inval,
        ),
        (
            "unaligned length",
            w.map(0x8000, 0x1001, Access::R).map(|_| ()),
            Error::Inval,
        ),
        (
            "no access",
            w.map(
                0x8000,
                0x1000,
                Access {
                    read: false,
                    write: false,
                },
            )
            .map(|_| ()),
            Error::Inval,
        ),
        (
            "outside RAM",
            w.map(16 << 20, 0x1000, Access::R).map(|_| ()),
            Error::Fault,
        ),
        (
            "straddles the end",
            w.map((16 << 20) - 0x1000, 0x2000, Access::R).map(|_| ()),
            Error::Fault,
        ),
        (
            "wraps",
            w.map(!0xfff, 0x2000, Access::R).map(|_| ()),
            Error::Range,
        ),
        (
            "forbidden window",
            w.map(0xE000, 0x2000, Access::R).map(|_| ()),
            Error::Perm,
        ),
        (
            "too big",
            w.map(0x100000, 17 * 0x1000, Access::R).map(|_| ()),
            Error::Range,
        ),
        (
            "overlap",
            w.map(0x5000, 0x1000, Access::R).map(|_| ()),
            Error::Exist,
        ),
        (
            "overlap start",
            w.map(0x3000, 0x2000, Access::R).map(|_| ()),
            Error::Exist,
        ),
        ("never mapped", w.unmap(0x90_0000, 0x1000), Error::Noent),
        ("partial", w.unmap(iova, 0x1000), Error::Inval),
        ("inside", w.unmap(iova + 0x1000, 0x1000), Error::Noent),
        ("zero unmap", w.unmap(iova, 0), Error::Inval),
    ];
    for (what, got, want) in cases {
        assert_eq!(got, Err(want), "{what}");
    }
    assert_eq!(w.snapshot(), before, "state unchanged");
    w.unmap(iova, 0x2000).unwrap();
    assert_eq!(w.unmap(iova, 0x2000), Err(Error::Noent), "double unmap");
}

#[test]
fn quotas() {
    let mut w = World::new(
        Policy::Strict,
        Limits {
            max_mappings: 2,
            ..L
        },
    );
    w.map(0x1_0000, 0x1000, Access::R).unwrap();
    w.map(0x2_0000, 0x1000, Access::R).unwrap();
    let before = w.snapshot();
    assert_eq!(w.map(0x3_0000, 0x1000, Access::R), Err(Error::Nomem));
    assert_eq!(w.snapshot(), before);
}

#[test]
fn failed_flush_keeps_everything_held_and_is_retried() {
    let mut w = World::new(Policy::Strict, L);
    let iova = w.map(0x1_0000, 0x1000, Access::R).unwrap();
    w.dom.device(iova);
    w.dom.fail_next_flush = true;
    assert_eq!(w.unmap(iova, 0x1000), Err(Error::Busy));
    let c = w.st.counts(&w.dom);
    assert_eq!(
        (c.mappings, c.pending, c.iova_pages),
        (0, 1, 1),
        "IOVA still held"
    );
    assert!(w.iovas.used.contains_key(&iova));
    w.st.sync(&mut w.dom, &mut w.iovas, &w.clock).unwrap();
    assert!(w.dom.device(iova).is_none());
    assert!(w.iovas.used.is_empty());
}

#[test]
fn passthrough_is_identity_and_checks_only() {
    let mut w = World::new(Policy::Passthrough, L);
    assert_eq!(w.map(0x3000, 0x1000, Access::R), Ok(0x3000));
    assert_eq!(w.map(16 << 20, 0x1000, Access::R), Err(Error::Fault));
    assert_eq!(w.unmap(0x3000, 0x1000), Ok(()));
    assert!(w.dom.ptes.is_empty() && w.iovas.used.is_empty());
}

#[derive(Debug, Clone)]
enum Op {
    Map { page: u64, pages: u64, access: u8 },
    Unmap { pick: usize },
    UnmapBad { iova: u64, len: u64 },
    Touch { pick: usize },
    Batch { n: usize },
    Tick { ns: u64 },
    Sync,
    FailFlush,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..4000, 1u64..20, 0u8..4).prop_map(|(page, pages, access)| Op::Map { page, pages, access }),
        3 => any::<usize>().prop_map(|pick| Op::Unmap { pick }),
        1 => (any::<u64>(), any::<u64>()).prop_map(|(iova, len)| Op::UnmapBad { iova, len }),
        3 => any::<usize>().prop_map(|pick| Op::Touch { pick }),
        1 => (1usize..6).prop_map(|n| Op::Batch { n }),
        1 => (0u64..2000).prop_map(|ns| Op::Tick { ns }),
        1 => Just(Op::Sync),
        1 => Just(Op::FailFlush),
    ]
}

fn policy() -> impl Strategy<Value = Policy> {
    prop_oneof![
        Just(Policy::Strict),
        Just(Policy::Batched),
        Just(Policy::Deferred)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Random sequences: live mappings never overlap (IOVA or guest pages), the device never
    /// reaches a strictly unmapped range, deferred waits stay within their bound, errors
    /// change nothing, and teardown returns everything.
    #[test]
    fn random_sequences(p in policy(), ops in proptest::collection::vec(op(), 1..80)) {
        let mut w = World::new(p, L);
        let mut live: Vec<(u64, u64)> = Vec::new();
        for o in ops {
            match o {
                Op::Map { page, pages, access } => {
                    let a = [Access::R, Access::W, Access::RW, Access { read: false, write: false }][access as usize];
                    let before = w.snapshot();
                    match w.map(page * PAGE_SIZE, pages * PAGE_SIZE, a) {
                        Ok(iova) => live.push((iova, pages * PAGE_SIZE)),
                        Err(Error::Busy) => {}
                        Err(_) => {
                            let after = w.snapshot();
                            // A failed map may only have flushed deferred work first.
                            prop_assert_eq!(after.0.mappings, before.0.mappings);
                            prop_assert_eq!(after.1, before.1);
                        }
                    }
                }
                Op::Unmap { pick } if !live.is_empty() => {
                    let (iova, len) = live.remove(pick % live.len());
                    match w.unmap(iova, len) {
                        Ok(()) => {
                            if p == Policy::Strict || p == Policy::Batched {
                                for i in 0..len / PAGE_SIZE {
                                    prop_assert!(w.dom.device(iova + i * PAGE_SIZE).is_none());
                                }
                            }
                        }
                        Err(Error::Busy) => {} // cleared, invalidation pending
                        Err(e) => prop_assert!(false, "unmap of a live mapping failed: {e}"),
                    }
                }
                Op::Unmap { .. } => {}
                Op::UnmapBad { iova, len } => {
                    if live.iter().any(|&(i, l)| i == iova && l == len) { continue; }
                    let before = w.snapshot();
                    prop_assert!(w.unmap(iova, len).is_err());
                    let after = w.snapshot();
                    prop_assert_eq!(after.1, before.1);
                    prop_assert_eq!(after.0.mappings, before.0.mappings);
                }
                Op::Touch { pick } if !live.is_empty() => {
                    let (iova, _) = live[pick % live.len()];
                    prop_assert!(w.dom.device(iova).is_some());
                }
                Op::Touch { .. } => {}
                Op::Batch { n } => {
                    w.st.begin_batch();
                    let mut done = Vec::new();
                    for _ in 0..n.min(live.len()) {
                        let (iova, len) = live.remove(0);
                        if w.unmap(iova, len).is_ok() { done.push((iova, len)); }
                    }
                    if w.st.end_batch(&mut w.dom, &mut w.iovas, &w.clock).is_ok() && p == Policy::Batched {
                        for (iova, _) in done {
                            prop_assert!(w.dom.device(iova).is_none());
                        }
                    }
                }
                Op::Tick { ns } => {
                    w.clock.0.set(w.clock.0.get() + ns);
                    w.st.tick(&mut w.dom, &mut w.iovas, &w.clock);
                }
                Op::Sync => {
                    if w.st.sync(&mut w.dom, &mut w.iovas, &w.clock).is_ok() {
                        prop_assert_eq!(w.st.counts(&w.dom).pending, 0);
                        prop_assert!(w.dom.cached.keys().all(|k| w.dom.ptes.contains_key(k)));
                    }
                }
                Op::FailFlush => w.dom.fail_next_flush = true,
            }
            // Live mappings: disjoint IOVAs, each one held by the allocator.
            let c = w.st.counts(&w.dom);
            prop_assert_eq!(c.mappings, live.len());
            for &(iova, _) in &live {
                prop_assert!(w.iovas.used.contains_key(&iova));
                prop_assert!(w.st.mapping(iova).is_some());
            }
            if p == Policy::Deferred {
                // Above the entry bound only while a failed flush is owed (the next call retries).
                prop_assert!(c.pending <= L.deferred_entries || w.dom.fail_next_flush || w.dom.owed);
            }
            // Nothing pending is ever released: every cached translation is live or pending.
            let pending_pages = c.pinned_pages;
            prop_assert_eq!(w.iovas.used.values().sum::<u64>(), pending_pages);
        }
        w.dom.fail_next_flush = false;
        w.st.teardown(&mut w.dom, &mut w.iovas, &w.clock).unwrap();
        let c = w.st.counts(&w.dom);
        prop_assert_eq!((c.mappings, c.pending, c.pinned_pages), (0, 0, 0));
        prop_assert!(w.iovas.used.is_empty());
        prop_assert!(w.dom.ptes.is_empty() && w.dom.cached.is_empty());
    }
}
