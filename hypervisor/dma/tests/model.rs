//! The service against a model IOMMU that behaves like QEMU's VT-d: a device keeps using a
//! translation it has cached until the flush that covers it, so a missing or late
//! invalidation is visible here as a stale device access.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use moat_dma::{
    Access, DmaState, Error, Iommu, IovaSource, Limits, Mapping, Phase, Policy, Unmapped, PAGE_SIZE,
};
use proptest::prelude::*;

mod support;
use support::{FlatRam, SetClock};

#[derive(Default)]
struct FakeIommu {
    ptes: BTreeMap<u64, u64>,
    cached: BTreeMap<u64, u64>,
    /// Caching mode: the device may cache "not present" too (`absent`), so a new mapping is
    /// usable only after a flush covering it.
    caching_mode: bool,
    absent: BTreeSet<u64>,
    fail_next_flush: bool,
    /// The next map writes this many pages, then fails with NOMEM and rolls them back (a
    /// device walked them meanwhile: they are cached until invalidated).
    fail_map_after: Option<u64>,
    flushes: u32,
    /// The last flush attempt failed (pending invalidations are owed).
    owed: bool,
    /// Every range handed to `pending` and not flushed yet (what a flush must invalidate).
    unflushed: Vec<(u64, u64)>,
    /// A clock each call moves on by a known time (see `phases_are_charged_their_own_time`).
    timer: Option<Rc<SetClock>>,
}

/// Moves `timer` (if any) on by `t`.
fn tick(timer: &Option<Rc<SetClock>>, t: u64) {
    if let Some(c) = timer {
        c.advance(t);
    }
}

impl FakeIommu {
    /// What a device reaches at `iova`: its cached translation, else the tables (and caches it).
    fn device(&mut self, iova: u64) -> Option<u64> {
        if let Some(&h) = self.cached.get(&iova) {
            return Some(h);
        }
        if self.absent.contains(&iova) {
            return None;
        }
        match self.ptes.get(&iova) {
            Some(&h) => {
                self.cached.insert(iova, h);
                Some(h)
            }
            None => {
                if self.caching_mode {
                    self.absent.insert(iova);
                }
                None
            }
        }
    }
}

impl Iommu for FakeIommu {
    type Pending = Vec<(u64, u64)>;
    fn map(
        &mut self,
        iova: u64,
        hpa: moat_dma::PhysAddr,
        len: u64,
        _a: Access,
        pending: &mut Self::Pending,
    ) -> Result<(), Error> {
        tick(&self.timer, 1);
        let hpa = hpa.as_u64();
        let pages = len / PAGE_SIZE;
        if (0..pages).any(|i| self.ptes.contains_key(&(iova + i * PAGE_SIZE))) {
            return Err(Error::Exist);
        }
        if let Some(k) = self.fail_map_after.take() {
            let k = k.min(pages);
            for i in 0..k {
                // Written, walked by the device, rolled back: cached until invalidated.
                self.cached
                    .insert(iova + i * PAGE_SIZE, hpa + i * PAGE_SIZE);
            }
            if k > 0 {
                pending.push((iova, k * PAGE_SIZE));
                self.unflushed.push((iova, k * PAGE_SIZE));
            }
            return Err(Error::Nomem);
        }
        for i in 0..pages {
            self.ptes.insert(iova + i * PAGE_SIZE, hpa + i * PAGE_SIZE);
        }
        if self.caching_mode {
            pending.push((iova, len));
            self.unflushed.push((iova, len));
        }
        Ok(())
    }
    fn map_needs_flush(&self) -> bool {
        self.caching_mode
    }
    fn unmap(&mut self, iova: u64, len: u64, pending: &mut Self::Pending) -> Result<(), Error> {
        tick(&self.timer, 10);
        let pages = len / PAGE_SIZE;
        if (0..pages).any(|i| !self.ptes.contains_key(&(iova + i * PAGE_SIZE))) {
            return Err(Error::Noent);
        }
        for i in 0..pages {
            self.ptes.remove(&(iova + i * PAGE_SIZE));
        }
        pending.push((iova, len));
        self.unflushed.push((iova, len));
        Ok(())
    }
    fn flush(&mut self, pending: &mut Self::Pending) -> Result<u32, Error> {
        tick(&self.timer, 100);
        if std::mem::take(&mut self.fail_next_flush) {
            self.owed = true;
            return Err(Error::Busy);
        }
        self.owed = false;
        for (iova, len) in pending.drain(..) {
            for i in 0..len / PAGE_SIZE {
                self.cached.remove(&(iova + i * PAGE_SIZE));
                self.absent.remove(&(iova + i * PAGE_SIZE));
            }
        }
        let n = self.unflushed.len() as u32;
        self.unflushed.clear();
        self.flushes += 1;
        Ok(n)
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
    /// At most this many ranges.
    room: Option<usize>,
    /// As [`FakeIommu::timer`].
    timer: Option<Rc<SetClock>>,
}

impl IovaSource for FakeIovas {
    fn alloc(&mut self, pages: u64) -> Option<u64> {
        tick(&self.timer, 1000);
        if self.room.is_some_and(|r| self.used.len() >= r) {
            return None;
        }
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
        tick(&self.timer, 10000);
        assert_eq!(
            self.used.remove(&iova),
            Some(pages),
            "free of {iova:#x} that was not allocated"
        );
    }
}

/// 16 MiB at host 0x1000_0000; page 0xF000 is the forbidden window.
const RAM: FlatRam = FlatRam {
    size: 16 << 20,
    host_base: 0x1000_0000,
    forbidden_page: Some(0xF000),
};

struct World {
    st: DmaState<Vec<(u64, u64)>>,
    dom: FakeIommu,
    iovas: FakeIovas,
    clock: SetClock,
}

impl World {
    fn new(policy: Policy, limits: Limits) -> Self {
        World {
            st: DmaState::new(policy, limits),
            dom: FakeIommu::default(),
            iovas: FakeIovas::default(),
            clock: SetClock::default(),
        }
    }
    fn map(&mut self, gpa: u64, len: u64, a: Access) -> Result<u64, Error> {
        self.st.map(
            &mut self.dom,
            &mut self.iovas,
            &RAM,
            &self.clock,
            gpa,
            len,
            a,
        )
    }
    fn unmap(&mut self, iova: u64, len: u64) -> Result<Unmapped, Error> {
        self.st
            .unmap(&mut self.dom, &mut self.iovas, &RAM, &self.clock, iova, len)
    }
    fn end_batch(&mut self) -> Result<(), Error> {
        self.st
            .end_batch(&mut self.dom, &mut self.iovas, &self.clock)
    }
    fn sync(&mut self) -> Result<(), Error> {
        self.st.sync(&mut self.dom, &mut self.iovas, &self.clock)
    }
    fn tick(&mut self) {
        self.st.tick(&mut self.dom, &mut self.iovas, &self.clock)
    }
    fn teardown(&mut self) -> Result<(), Error> {
        self.st
            .teardown(&mut self.dom, &mut self.iovas, &self.clock)
    }
    fn now(&self) -> u64 {
        self.clock.0.get()
    }
    fn advance(&mut self, ns: u64) {
        self.clock.advance(ns);
    }

    /// The invariants that hold after every call, whatever happened:
    /// - no IOVA held twice: live mappings and waiting ranges are disjoint, and together they
    ///   are exactly what the allocator has handed out (the counters add up);
    /// - nothing released before its invalidation: every translation a device may still use
    ///   (cached) and every range still owed an invalidation lies in an IOVA the service
    ///   holds; a cached translation of a range that is not live is in a waiting range;
    /// - live mappings are in the tables, waiting ranges are not.
    fn check(&self) -> Result<(), TestCaseError> {
        let waiting: Vec<Mapping> = self.st.waiting().collect();
        let mut held: BTreeMap<u64, u64> = BTreeMap::new();
        let mut live_pages = BTreeSet::new();
        for m in self.st.mappings() {
            prop_assert!(
                held.insert(m.iova, m.pages).is_none(),
                "IOVA {:#x} held twice",
                m.iova
            );
            for i in 0..m.pages {
                let a = m.iova + i * PAGE_SIZE;
                prop_assert_eq!(
                    self.dom.ptes.get(&a),
                    Some(&(0x1000_0000 + m.gpa + i * PAGE_SIZE))
                );
                live_pages.insert(a);
            }
        }
        let mut waiting_pages = BTreeSet::new();
        for m in &waiting {
            prop_assert!(
                held.insert(m.iova, m.pages).is_none(),
                "IOVA {:#x} held twice",
                m.iova
            );
            for i in 0..m.pages {
                let a = m.iova + i * PAGE_SIZE;
                prop_assert!(
                    !self.dom.ptes.contains_key(&a),
                    "waiting range still mapped"
                );
                waiting_pages.insert(a);
            }
        }
        // Disjoint ranges: no page in two of them.
        let mut all = held
            .iter()
            .map(|(&i, &p)| (i, i + p * PAGE_SIZE))
            .collect::<Vec<_>>();
        all.sort();
        for w in all.windows(2) {
            prop_assert!(w[0].1 <= w[1].0, "held IOVA ranges overlap");
        }
        prop_assert_eq!(&held, &self.iovas.used, "held by the service == handed out");
        let c = self.st.counts(&self.dom);
        prop_assert_eq!(c.iova_pages, self.iovas.used.values().sum::<u64>());
        prop_assert_eq!(c.pinned_pages, c.iova_pages);
        prop_assert_eq!(c.pending + c.rolled_back, waiting.len());
        for &a in self.dom.cached.keys() {
            prop_assert!(
                live_pages.contains(&a) || waiting_pages.contains(&a),
                "device still reaches {:#x}, released before its invalidation",
                a
            );
            if live_pages.contains(&a) {
                prop_assert_eq!(
                    self.dom.cached.get(&a),
                    self.dom.ptes.get(&a),
                    "stale translation of an earlier mapping at a live IOVA"
                );
            }
        }
        for &(iova, len) in &self.dom.unflushed {
            for i in 0..len / PAGE_SIZE {
                let a = iova + i * PAGE_SIZE;
                prop_assert!(
                    live_pages.contains(&a) || waiting_pages.contains(&a),
                    "{:#x} owed an invalidation but released",
                    a
                );
            }
        }
        Ok(())
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
    slack_ns: 0,
};

#[test]
fn strict_unmap_is_unreachable_when_it_returns() {
    let mut w = World::new(Policy::Strict, L);
    let iova = w.map(0x2000, 0x2000, Access::RW).unwrap();
    assert_eq!(w.dom.device(iova), Some(0x1000_2000));
    assert_eq!(w.unmap(iova, 0x2000), Ok(Unmapped::Done));
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
        assert_eq!(w.unmap(i, 0x1000), Ok(Unmapped::Done));
    }
    assert!(
        a.iter().all(|&i| w.dom.cached.contains_key(&i)),
        "inside the batch nothing is flushed yet"
    );
    assert_eq!(w.st.counts(&w.dom).pending, 8);
    w.end_batch().unwrap();
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
        assert_eq!(w.unmap(i, 0x1000), Ok(Unmapped::Done));
    }
    assert_eq!(w.st.counts(&w.dom).pending, 3);
    assert_eq!(w.dom.flushes, 0);
    assert_eq!(w.unmap(a[3], 0x1000), Ok(Unmapped::Done));
    assert_eq!(
        (w.st.counts(&w.dom).pending, w.dom.flushes),
        (0, 1),
        "4th unmap reaches the entry bound"
    );
    let b = w.map(0x30000, 0x1000, Access::W).unwrap();
    w.dom.device(b);
    assert_eq!(w.unmap(b, 0x1000), Ok(Unmapped::Done));
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
        (
            "never mapped",
            w.unmap(0x90_0000, 0x1000).map(|_| ()),
            Error::Noent,
        ),
        ("partial", w.unmap(iova, 0x1000).map(|_| ()), Error::Inval),
        (
            "inside",
            w.unmap(iova + 0x1000, 0x1000).map(|_| ()),
            Error::Noent,
        ),
        ("zero unmap", w.unmap(iova, 0).map(|_| ()), Error::Inval),
    ];
    for (what, got, want) in cases {
        assert_eq!(got, Err(want), "{what}");
    }
    assert_eq!(w.snapshot(), before, "state unchanged");
    assert_eq!(w.st.stats().errors, 15, "every refusal counted");
    assert_eq!(w.unmap(iova, 0x2000), Ok(Unmapped::Done));
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
    assert_eq!(
        w.unmap(iova, 0x1000),
        Ok(Unmapped::Unsynced),
        "took effect, invalidation unconfirmed"
    );
    assert_eq!(w.unmap(iova, 0x1000), Err(Error::Noent), "it is gone");
    let c = w.st.counts(&w.dom);
    assert_eq!(
        (c.mappings, c.pending, c.iova_pages),
        (0, 1, 1),
        "IOVA still held"
    );
    assert!(w.iovas.used.contains_key(&iova));
    w.sync().unwrap();
    assert!(w.dom.device(iova).is_none());
    assert!(w.iovas.used.is_empty());
}

#[test]
fn passthrough_is_identity_and_checks_only() {
    let mut w = World::new(Policy::Passthrough, L);
    assert_eq!(w.map(0x3000, 0x1000, Access::R), Ok(0x3000));
    assert_eq!(w.map(16 << 20, 0x1000, Access::R), Err(Error::Fault));
    assert_eq!(w.unmap(0x3000, 0x1000), Ok(Unmapped::Done));
    assert!(w.dom.ptes.is_empty() && w.iovas.used.is_empty());
}

// ----- Issue 9, defect 1: a MAP whose flush fails must not release an IOVA that translates.

#[test]
fn map_whose_flush_fails_changes_nothing_and_holds_its_iova() {
    for p in [Policy::Strict, Policy::Batched, Policy::Deferred] {
        let mut w = World::new(p, L);
        w.dom.caching_mode = true;
        let before = w.snapshot();
        w.dom.fail_next_flush = true;
        assert_eq!(w.map(0x8000, 0x2000, Access::RW), Err(Error::Busy), "{p:?}");
        w.check().unwrap();
        let c = w.st.counts(&w.dom);
        assert_eq!((c.mappings, c.pending, c.rolled_back), (0, 0, 1), "{p:?}");
        assert_eq!(w.dom.ptes, before.1, "{p:?}: the entries are cleared again");
        let held: Vec<u64> = w.st.waiting().map(|m| m.iova).collect();
        assert_eq!(held.len(), 1);
        assert!(
            w.iovas.used.contains_key(&held[0]),
            "{p:?}: the IOVA is held until the invalidation completes"
        );
        // The guest page is not mapped: it can be mapped again, under another IOVA.
        let again = w.map(0x8000, 0x2000, Access::RW).unwrap();
        assert_eq!(w.dom.device(again), Some(0x1000_8000));
        w.check().unwrap();
        assert!(
            w.st.waiting().next().is_none(),
            "{p:?}: the map's flush released it"
        );
        assert_eq!(w.unmap(again, 0x2000), Ok(Unmapped::Done));
        w.teardown().unwrap();
        w.check().unwrap();
        assert!(w.iovas.used.is_empty() && w.dom.ptes.is_empty(), "{p:?}");
        assert_eq!(w.st.counts(&w.dom).pinned_pages, 0);
    }
}

#[test]
fn failed_map_holds_its_iova_until_the_rollback_is_invalidated() {
    let mut w = World::new(Policy::Deferred, L);
    w.dom.fail_map_after = Some(1);
    assert_eq!(w.map(0x8000, 0x2000, Access::RW), Err(Error::Nomem));
    w.check().unwrap();
    let held: Vec<Mapping> = w.st.waiting().collect();
    assert_eq!(held.len(), 1);
    let iova = held[0].iova;
    assert_eq!(
        w.dom.device(iova),
        Some(0x1000_8000),
        "the rolled-back entry is cached"
    );
    let other = w.map(0x20000, 0x2000, Access::RW).unwrap();
    assert_ne!(other, iova, "a held IOVA is not handed out again");
    assert!(
        w.st.gpa_busy(0x8000, 0x9000),
        "a device may still reach the page"
    );
    assert!(!w.st.gpa_mapped(0x8000, 0x9000));
    w.sync().unwrap();
    w.check().unwrap();
    assert_eq!(w.dom.device(iova), None);
    assert!(!w.st.gpa_busy(0x8000, 0x9000));
    assert_eq!(w.st.counts(&w.dom).rolled_back, 0);
    // Under strict the call itself flushes: the allocator is as before when it returns.
    let mut w = World::new(Policy::Strict, L);
    let before = w.snapshot();
    w.dom.fail_map_after = Some(1);
    assert_eq!(w.map(0x8000, 0x2000, Access::RW), Err(Error::Nomem));
    w.check().unwrap();
    assert_eq!(w.snapshot(), before);
    assert!(w.dom.cached.is_empty());
    // Nothing written: nothing to invalidate, one flush and no completion wait.
    w.dom.fail_map_after = Some(0);
    assert_eq!(w.map(0x8000, 0x2000, Access::RW), Err(Error::Nomem));
    assert_eq!(w.snapshot(), before);
    let s = w.st.stats();
    assert_eq!((s.flushes, s.waits, s.invalidations), (2, 1, 1));
}

// ----- Defect 4: the deferred time bound is kept inside batches, at their end, with slack.

#[test]
fn deferred_bound_holds_inside_a_batch() {
    let mut w = World::new(Policy::Deferred, L);
    let a = w.map(0x10000, 0x1000, Access::RW).unwrap();
    let b = w.map(0x20000, 0x1000, Access::RW).unwrap();
    w.dom.device(a);
    w.st.begin_batch();
    assert_eq!(w.unmap(a, 0x1000), Ok(Unmapped::Done));
    w.advance(1000);
    assert_eq!(w.unmap(b, 0x1000), Ok(Unmapped::Done));
    assert_eq!(
        w.dom.device(a),
        None,
        "the next entry of the batch flushed the expired unmap"
    );
    w.end_batch().unwrap();
    w.check().unwrap();
}

#[test]
fn end_batch_checks_the_deferred_bound() {
    let mut w = World::new(Policy::Deferred, L);
    let a = w.map(0x10000, 0x1000, Access::RW).unwrap();
    w.dom.device(a);
    w.st.begin_batch();
    assert_eq!(w.unmap(a, 0x1000), Ok(Unmapped::Done));
    w.advance(1000);
    w.end_batch().unwrap();
    assert_eq!(w.dom.device(a), None, "end_batch flushed the expired unmap");
    assert_eq!(w.st.stats().deferred_flushes, 1);
}

#[test]
fn deferred_slack_and_deadline() {
    let mut w = World::new(Policy::Deferred, Limits { slack_ns: 300, ..L });
    assert_eq!(w.st.deferred_deadline(), None);
    let a = w.map(0x10000, 0x1000, Access::RW).unwrap();
    w.advance(50);
    w.dom.device(a);
    assert_eq!(w.unmap(a, 0x1000), Ok(Unmapped::Done));
    assert_eq!(w.st.deferred_deadline(), Some(1050));
    w.advance(699);
    w.tick();
    assert_eq!(
        w.dom.device(a),
        Some(0x1001_0000),
        "not yet: 699 + 300 < 1000"
    );
    w.advance(1);
    w.tick();
    assert_eq!(w.dom.device(a), None, "700 + 300 >= 1000: flushed");
    assert_eq!(w.st.deferred_deadline(), None);
}

// ----- Defect 7: an unconfirmed invalidation inside a MULTICALL is not an entry failure.

#[test]
fn busy_flush_inside_a_multicall_is_unsynced_not_an_entry_failure() {
    // Strict: the entry took effect; the next flush (next entry, or end_batch) retries.
    let mut w = World::new(Policy::Strict, L);
    let a = w.map(0x10000, 0x1000, Access::RW).unwrap();
    let b = w.map(0x20000, 0x1000, Access::RW).unwrap();
    w.dom.device(a);
    w.st.begin_batch();
    w.dom.fail_next_flush = true;
    assert_eq!(w.unmap(a, 0x1000), Ok(Unmapped::Unsynced));
    assert_eq!(
        w.unmap(a, 0x1000),
        Err(Error::Noent),
        "a retry finds it gone"
    );
    assert_eq!(w.unmap(b, 0x1000), Ok(Unmapped::Done));
    assert_eq!(w.dom.device(a), None, "b's flush covered a");
    w.end_batch().unwrap();
    w.check().unwrap();
    assert!(w.iovas.used.is_empty());
    // Strict: a failure that persists to the end of the batch is reported by end_batch.
    let a = w.map(0x10000, 0x1000, Access::RW).unwrap();
    w.st.begin_batch();
    w.dom.fail_next_flush = true;
    assert_eq!(w.unmap(a, 0x1000), Ok(Unmapped::Unsynced));
    w.dom.fail_next_flush = true;
    assert_eq!(w.end_batch(), Err(Error::Busy));
    w.check().unwrap();
    w.sync().unwrap();
    assert!(w.iovas.used.is_empty());
    // Batched: entries are OK, end_batch says the batch is unsynced.
    let mut w = World::new(Policy::Batched, L);
    let a = w.map(0x10000, 0x1000, Access::RW).unwrap();
    let b = w.map(0x20000, 0x1000, Access::RW).unwrap();
    w.st.begin_batch();
    assert_eq!(w.unmap(a, 0x1000), Ok(Unmapped::Done));
    assert_eq!(w.unmap(b, 0x1000), Ok(Unmapped::Done));
    w.dom.fail_next_flush = true;
    assert_eq!(w.end_batch(), Err(Error::Busy));
    assert_eq!(w.st.counts(&w.dom).pending, 2);
    w.check().unwrap();
    w.sync().unwrap();
    assert!(w.iovas.used.is_empty());
    // Batched, single UNMAP (a batch of one): unsynced.
    let a = w.map(0x10000, 0x1000, Access::RW).unwrap();
    w.dom.fail_next_flush = true;
    assert_eq!(w.unmap(a, 0x1000), Ok(Unmapped::Unsynced));
    // Deferred: an unmap owes no invalidation; a failed entry-bound flush is retried later.
    let mut w = World::new(Policy::Deferred, L);
    let m: Vec<u64> = (0..4)
        .map(|i| w.map(0x10000 * (i + 1), 0x1000, Access::RW).unwrap())
        .collect();
    for &i in &m[..3] {
        assert_eq!(w.unmap(i, 0x1000), Ok(Unmapped::Done));
    }
    w.dom.fail_next_flush = true;
    assert_eq!(w.unmap(m[3], 0x1000), Ok(Unmapped::Done));
    assert_eq!(w.st.counts(&w.dom).pending, 4);
    assert_eq!(w.st.stats().flush_failures, 1);
}

// ----- Issue item 5: pages whose unmap is pending count as mapped for registrations.

#[test]
fn pending_unmaps_are_busy() {
    let mut w = World::new(Policy::Deferred, L);
    let a = w.map(0x10000, 0x2000, Access::RW).unwrap();
    assert!(w.st.gpa_busy(0x11000, 0x12000) && w.st.gpa_mapped(0x11000, 0x12000));
    assert!(!w.st.gpa_busy(0x12000, 0x13000) && !w.st.gpa_busy(0xF000, 0x10000));
    assert_eq!(w.unmap(a, 0x2000), Ok(Unmapped::Done));
    assert!(!w.st.gpa_mapped(0x10000, 0x12000));
    assert!(w.st.gpa_busy(0x11000, 0x12000), "pending unmap: still busy");
    assert!(!w.st.gpa_busy(0x12000, 0x13000));
    w.sync().unwrap();
    assert!(!w.st.gpa_busy(0x10000, 0x12000));
}

// ----- STATS: RESET zeroes the counters, errors found before the service count too.

#[test]
fn stats_reset_and_external_errors() {
    let mut w = World::new(Policy::Strict, L);
    let a = w.map(0x10000, 0x1000, Access::RW).unwrap();
    let _ = w.map(0x10000, 0x1000, Access::RW);
    assert_eq!(w.unmap(a, 0x1000), Ok(Unmapped::Done));
    let b = w.map(0x20000, 0x1000, Access::RW).unwrap();
    w.st.note_error();
    let s = w.st.stats();
    assert_eq!(
        (s.maps, s.unmaps, s.errors, s.flushes, s.waits),
        (2, 1, 2, 1, 1)
    );
    let counts = w.st.counts(&w.dom);
    w.st.reset_stats();
    assert_eq!(
        w.st.stats(),
        moat_dma::Stats::default(),
        "every counter zeroed"
    );
    assert_eq!(w.st.counts(&w.dom), counts, "the gauges are not counters");
    assert_eq!(w.unmap(b, 0x1000), Ok(Unmapped::Done));
    assert_eq!((w.st.stats().unmaps, w.st.stats().flushes), (1, 1));
}

#[derive(Debug, Clone)]
enum Op {
    Map {
        page: u64,
        pages: u64,
        access: u8,
    },
    Unmap {
        pick: usize,
    },
    UnmapBad {
        iova: u64,
        len: u64,
    },
    Touch {
        pick: usize,
    },
    /// A MULTICALL of `n` unmaps, `ns` apart, with the device touching everything in between.
    Batch {
        n: usize,
        ns: u64,
    },
    Tick {
        ns: u64,
    },
    Sync,
    FailFlush,
    FailMap {
        after: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..4000, 1u64..20, 0u8..4).prop_map(|(page, pages, access)| Op::Map { page, pages, access }),
        3 => any::<usize>().prop_map(|pick| Op::Unmap { pick }),
        1 => (any::<u64>(), any::<u64>()).prop_map(|(iova, len)| Op::UnmapBad { iova, len }),
        3 => any::<usize>().prop_map(|pick| Op::Touch { pick }),
        1 => (1usize..6, 0u64..600).prop_map(|(n, ns)| Op::Batch { n, ns }),
        1 => (0u64..2000).prop_map(|ns| Op::Tick { ns }),
        1 => Just(Op::Sync),
        1 => Just(Op::FailFlush),
        1 => (0u64..4).prop_map(|after| Op::FailMap { after }),
    ]
}

fn policy() -> impl Strategy<Value = Policy> {
    prop_oneof![
        Just(Policy::Strict),
        Just(Policy::Batched),
        Just(Policy::Deferred)
    ]
}

/// Limits of the random sequences: the deferred bound acted on `SLACK` early.
const SLACK: u64 = 200;
const LP: Limits = Limits {
    slack_ns: SLACK,
    ..L
};

/// Under `Deferred`, after a call: the oldest waiting unmap is younger than the bound minus
/// the slack (the call checked it), unless the flush it needed failed.
fn deferred_bound_kept(w: &World) -> Result<(), TestCaseError> {
    if let Some(deadline) = w.st.deferred_deadline() {
        prop_assert!(
            w.now() + SLACK < deadline || w.dom.owed,
            "oldest unmap due at {} not flushed at {}",
            deadline,
            w.now()
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Random sequences, with and without caching mode, with failing flushes and failing
    /// maps: after every step the invariants of [`World::check`] hold (no IOVA held twice,
    /// nothing released before its invalidation, counters add up), a failed call changes
    /// nothing the guest or a device can see, the device never reaches a strictly unmapped
    /// range, the deferred bounds hold (inside batches too), and teardown returns everything.
    #[test]
    fn random_sequences(
        p in policy(),
        cm in any::<bool>(),
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        let mut w = World::new(p, LP);
        w.dom.caching_mode = cm;
        let mut live: Vec<(u64, u64)> = Vec::new();
        for o in ops {
            match o {
                Op::Map { page, pages, access } => {
                    let a = [Access::R, Access::W, Access::RW, Access { read: false, write: false }][access as usize];
                    let before = w.snapshot();
                    let gpa = page * PAGE_SIZE;
                    match w.map(gpa, pages * PAGE_SIZE, a) {
                        Ok(iova) => {
                            live.push((iova, pages * PAGE_SIZE));
                            // Usable by the device at once, also in caching mode.
                            prop_assert_eq!(w.dom.device(iova), Some(0x1000_0000 + gpa));
                        }
                        Err(_) => {
                            // A failed map changed nothing visible: no mapping, no entry, and
                            // an IOVA it took is only held while its invalidation is owed.
                            let after = w.snapshot();
                            prop_assert_eq!(after.0.mappings, before.0.mappings);
                            prop_assert_eq!(after.1, before.1);
                            let waiting: Vec<Mapping> = w.st.waiting().collect();
                            for (iova, _) in after.2.iter().filter(|(i, _)| !before.2.contains_key(i)) {
                                prop_assert!(waiting.iter().any(|m| m.iova == *iova));
                            }
                        }
                    }
                }
                Op::Unmap { pick } if !live.is_empty() => {
                    let (iova, len) = live.remove(pick % live.len());
                    let owed_before = w.dom.owed || w.dom.fail_next_flush;
                    match w.unmap(iova, len) {
                        Ok(Unmapped::Done) => {
                            if p == Policy::Strict || p == Policy::Batched {
                                for i in 0..len / PAGE_SIZE {
                                    prop_assert!(w.dom.device(iova + i * PAGE_SIZE).is_none());
                                }
                            }
                        }
                        Ok(Unmapped::Unsynced) => {
                            prop_assert!(p != Policy::Deferred);
                            prop_assert!(owed_before, "unsynced without a failed flush");
                            prop_assert!(w.st.mapping(iova).is_none(), "took effect");
                        }
                        Err(e) => prop_assert!(false, "unmap of a live mapping failed: {}", e),
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
                Op::Batch { n, ns } => {
                    w.st.begin_batch();
                    let mut done = Vec::new();
                    for _ in 0..n.min(live.len()) {
                        let (iova, len) = live.remove(0);
                        for &(i, _) in &live { w.dom.device(i); }
                        for &(i, _) in &done { w.dom.device(i); }
                        w.advance(ns);
                        match w.unmap(iova, len) {
                            Ok(_) => done.push((iova, len)),
                            Err(e) => prop_assert!(false, "unmap in a batch failed: {}", e),
                        }
                        w.check()?;
                        if p == Policy::Deferred { deferred_bound_kept(&w)?; }
                    }
                    w.advance(ns);
                    if w.end_batch().is_ok() && p != Policy::Deferred {
                        for (iova, _) in done {
                            prop_assert!(w.dom.device(iova).is_none());
                        }
                    }
                }
                Op::Tick { ns } => {
                    w.advance(ns);
                    w.tick();
                }
                Op::Sync => {
                    if w.sync().is_ok() {
                        prop_assert_eq!(w.st.counts(&w.dom).pending, 0);
                        prop_assert_eq!(w.st.counts(&w.dom).rolled_back, 0);
                        prop_assert!(w.dom.cached.keys().all(|k| w.dom.ptes.contains_key(k)));
                    }
                }
                Op::FailFlush => w.dom.fail_next_flush = true,
                Op::FailMap { after } => w.dom.fail_map_after = Some(after),
            }
            w.check()?;
            let c = w.st.counts(&w.dom);
            prop_assert_eq!(c.mappings, live.len());
            for &(iova, _) in &live {
                prop_assert!(w.st.mapping(iova).is_some());
            }
            if p == Policy::Deferred {
                // Above the entry bound only while a failed flush is owed (the next call retries).
                prop_assert!(c.pending + c.rolled_back <= L.deferred_entries || w.dom.fail_next_flush || w.dom.owed);
                deferred_bound_kept(&w)?;
            }
        }
        w.dom.fail_next_flush = false;
        w.dom.fail_map_after = None;
        w.teardown().unwrap();
        w.check()?;
        let c = w.st.counts(&w.dom);
        prop_assert_eq!((c.mappings, c.pending, c.rolled_back, c.pinned_pages, c.iova_pages), (0, 0, 0, 0, 0));
        prop_assert!(w.iovas.used.is_empty());
        prop_assert!(w.dom.ptes.is_empty() && w.dom.cached.is_empty());
    }
}

/// Each phase is charged exactly the time of its own calls (the model's calls take known
/// times: map 1, unmap 10, flush 100, allocation 1000, free 10000): allocations (a failed one
/// and its retry included), page-table writes, the flushes (also the one a MAP makes when the
/// IOVAs ran out) and the frees.
#[test]
fn phases_are_charged_their_own_time() {
    let clock = Rc::new(SetClock::default());
    let mut dom = FakeIommu {
        timer: Some(clock.clone()),
        ..FakeIommu::default()
    };
    // Room for two ranges.
    let mut iovas = FakeIovas {
        timer: Some(clock.clone()),
        room: Some(2),
        ..FakeIovas::default()
    };
    let mut st: DmaState<Vec<(u64, u64)>> = DmaState::new(Policy::Batched, L);
    st.begin_batch();
    let map = |st: &mut DmaState<_>, dom: &mut FakeIommu, iovas: &mut FakeIovas, gpa| {
        st.map(dom, iovas, &RAM, &*clock, gpa, 0x1000, Access::RW)
    };
    let a = map(&mut st, &mut dom, &mut iovas, 0x1000).unwrap();
    let b = map(&mut st, &mut dom, &mut iovas, 0x2000).unwrap();
    for iova in [a, b] {
        let u = st.unmap(&mut dom, &mut iovas, &RAM, &*clock, iova, 0x1000);
        assert_eq!(u, Ok(Unmapped::Done));
    }
    // No room: the allocation fails, the waiting unmaps are flushed and freed, the retry
    // succeeds.
    map(&mut st, &mut dom, &mut iovas, 0x3000).unwrap();
    st.end_batch(&mut dom, &mut iovas, &*clock).unwrap();
    let c = st.stats().cycles;
    assert_eq!(c[Phase::IovaAlloc as usize], 4 * 1000, "{c:?}");
    assert_eq!(c[Phase::PteWrite as usize], 3 + 2 * 10, "{c:?}");
    assert_eq!(c[Phase::InvalidateWait as usize], 100, "{c:?}");
    assert_eq!(c[Phase::IovaFree as usize], 2 * 10000, "{c:?}");
    assert_eq!(clock.0.get(), c.iter().sum::<u64>());
}
