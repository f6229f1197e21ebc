//! Per-vCPU shards on real threads: two vCPUs map and unmap at once, each on its own
//! `DmaState` shard sharing one `Shared`, and half of each one's mappings are unmapped by
//! the other vCPU (the cross-vCPU path: `take_mapping` from the owner's shard, `adopt` into
//! the caller's). Checked while running: no IOVA and no guest page is live twice; at the
//! end: the guest-wide accounting equals the shards' records, and teardown returns every
//! counter to zero.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use moat_dma::{
    Access, DmaState, Error, Iommu, IovaSource, Limits, NoClock, Policy, Shared, Unmapped,
    PAGE_SIZE,
};

mod support;
use support::FlatRam;

const RAM_PAGES: u64 = 512;
const HPA: u64 = 0x1000_0000;

/// One domain shared by the vCPUs: page -> host address (the test's stand-in for the
/// lock-free tables; its lock is the double's, not the service's).
#[derive(Clone, Default)]
struct Dom(Arc<Mutex<BTreeMap<u64, u64>>>);

impl Iommu for Dom {
    type Pending = Vec<(u64, u64)>;
    fn map(
        &mut self,
        iova: u64,
        hpa: moat_dma::PhysAddr,
        len: u64,
        _: Access,
        _: &mut Self::Pending,
    ) -> Result<(), Error> {
        let hpa = hpa.as_u64();
        let mut t = self.0.lock().unwrap();
        for i in 0..len / PAGE_SIZE {
            assert!(
                t.insert(iova + i * PAGE_SIZE, hpa + i * PAGE_SIZE)
                    .is_none(),
                "IOVA page {:#x} mapped twice",
                iova + i * PAGE_SIZE
            );
        }
        Ok(())
    }
    fn map_needs_flush(&self) -> bool {
        false
    }
    fn unmap(&mut self, iova: u64, len: u64, p: &mut Self::Pending) -> Result<(), Error> {
        let mut t = self.0.lock().unwrap();
        for i in 0..len / PAGE_SIZE {
            assert!(
                t.remove(&(iova + i * PAGE_SIZE)).is_some(),
                "unmap of a hole"
            );
        }
        p.push((iova, len));
        Ok(())
    }
    fn flush(&mut self, p: &mut Self::Pending) -> Result<u32, Error> {
        let n = p.len() as u32;
        p.clear();
        Ok(n)
    }
    fn table_pages(&self) -> usize {
        1
    }
}

/// The allocator, shared (the real one is per-CPU and lock-free; this double checks that
/// nothing it handed out is handed out again before it came back).
#[derive(Clone, Default)]
struct Iovas(Arc<Mutex<IovaState>>);

/// Bump pointer, ranges handed out (start -> pages), ranges given back.
type IovaState = (u64, BTreeMap<u64, u64>, Vec<(u64, u64)>);

impl IovaSource for Iovas {
    fn alloc(&mut self, pages: u64) -> Option<u64> {
        let mut g = self.0.lock().unwrap();
        let (next, live, free) = &mut *g;
        let iova = match free.iter().position(|&(_, p)| p == pages) {
            Some(i) => free.swap_remove(i).0,
            None => {
                let a = 0x10_0000 + *next;
                *next += pages * PAGE_SIZE;
                a
            }
        };
        assert!(
            live.insert(iova, pages).is_none(),
            "IOVA {iova:#x} handed out twice"
        );
        Some(iova)
    }
    fn free(&mut self, iova: u64, pages: u64) {
        let mut g = self.0.lock().unwrap();
        assert_eq!(
            g.1.remove(&iova),
            Some(pages),
            "free of {iova:#x} not handed out"
        );
        g.2.push((iova, pages));
    }
}

const RAM: FlatRam = FlatRam {
    size: RAM_PAGES * PAGE_SIZE,
    host_base: HPA,
    forbidden_page: None,
};

/// Per guest page: 0 free, 1 live (the test saw MAP return), 2 its UNMAP is in progress.
static GPA: [AtomicU8; RAM_PAGES as usize] = [const { AtomicU8::new(0) }; RAM_PAGES as usize];
/// vCPUs that made their maps.
static DONE: [AtomicBool; 2] = [const { AtomicBool::new(false) }; 2];

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

type Shard = Mutex<DmaState<Vec<(u64, u64)>>>;
/// Mappings `(iova, gpa, pages)` handed to a vCPU to unmap.
type Inbox = Mutex<Vec<(u64, u64, u64)>>;

/// Unmaps `(iova, gpa, pages)` from vCPU `me`, moving the record from the other shard first
/// when `me` does not hold it.
fn unmap(shards: &[Shard], me: usize, dom: &Dom, iovas: &Iovas, m: (u64, u64, u64)) {
    let (iova, gpa, pages) = m;
    let first = (gpa / PAGE_SIZE) as usize;
    for g in &GPA[first..first + pages as usize] {
        assert_eq!(g.swap(2, SeqCst), 1);
    }
    if shards[me].lock().unwrap().mapping(iova).is_none() {
        let other = 1 - me;
        let taken = shards[other].lock().unwrap().take_mapping(iova);
        shards[me]
            .lock()
            .unwrap()
            .adopt(taken.expect("the other shard holds it"));
    }
    let r = shards[me].lock().unwrap().unmap(
        &mut dom.clone(),
        &mut iovas.clone(),
        &RAM,
        &NoClock,
        iova,
        pages * PAGE_SIZE,
    );
    assert!(r.is_ok(), "{r:?}");
    for g in &GPA[first..first + pages as usize] {
        g.store(0, SeqCst);
    }
}

/// A guest's accounting with quotas of `maps` mappings and `pages` pages, and a shard of it
/// under `policy` (call again for each shard).
fn guest(maps: usize, pages: u64) -> (Arc<Shared>, Limits) {
    let limits = Limits {
        max_mappings: maps,
        max_mapped_pages: pages,
        ..Limits::DEFAULT
    };
    (Arc::new(Shared::new(RAM_PAGES * PAGE_SIZE)), limits)
}

fn shard(policy: Policy, g: &(Arc<Shared>, Limits)) -> DmaState<Vec<(u64, u64)>> {
    DmaState::with_shared(policy, g.1, g.0.clone(), Vec::new())
}

#[test]
fn two_vcpus_share_nothing_but_the_accounting() {
    let g = guest(48, 96);
    let shared = g.0.clone();
    let shards: Arc<Vec<Shard>> = Arc::new(
        (0..2)
            .map(|_| Mutex::new(shard(Policy::Strict, &g)))
            .collect(),
    );
    let (dom, iovas) = (Dom::default(), Iovas::default());
    // Mappings handed to each vCPU to unmap.
    let inbox: Arc<[Inbox; 2]> = Arc::new(Default::default());
    let threads: Vec<_> = (0..2)
        .map(|me| {
            let (shards, dom, iovas, inbox) =
                (shards.clone(), dom.clone(), iovas.clone(), inbox.clone());
            std::thread::spawn(move || {
                let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (me as u64 + 1);
                let mut mine: Vec<(u64, u64, u64)> = Vec::new();
                let (mut maps, mut exist, mut nomem) = (0, 0, 0);
                // Now and then a vCPU hoards its maps until the guest's quota refuses one
                // (NOMEM whatever the other vCPU's pace; EXIST comes from the random pages).
                let (mut hoard, mut next_hoard) = (false, 500);
                // Until both vCPUs made their maps: a vCPU that is done keeps unmapping what
                // the other hands over.
                while !(DONE[0].load(SeqCst) && DONE[1].load(SeqCst)) {
                    if maps >= 3000 {
                        DONE[me].store(true, SeqCst);
                        let handed: Vec<_> = inbox[me].lock().unwrap().drain(..).collect();
                        for m in handed {
                            unmap(&shards, me, &dom, &iovas, m);
                        }
                        continue;
                    }
                    if maps >= next_hoard {
                        (hoard, next_hoard) = (true, next_hoard + 1000);
                    }
                    let pages = 1 + rng(&mut seed) % 3;
                    let gpa = (rng(&mut seed) % (RAM_PAGES - pages)) * PAGE_SIZE;
                    let r = shards[me].lock().unwrap().map(
                        &mut dom.clone(),
                        &mut iovas.clone(),
                        &RAM,
                        &NoClock,
                        gpa,
                        pages * PAGE_SIZE,
                        Access::RW,
                    );
                    match r {
                        Ok(iova) => {
                            maps += 1;
                            let first = (gpa / PAGE_SIZE) as usize;
                            for (p, g) in GPA.iter().enumerate().skip(first).take(pages as usize) {
                                // A page whose UNMAP is in progress elsewhere is released by
                                // now (its unclaim came first); wait for that vCPU's mark.
                                loop {
                                    match g.compare_exchange(0, 1, SeqCst, SeqCst) {
                                        Ok(_) => break,
                                        Err(2) => std::thread::yield_now(),
                                        Err(_) => panic!("guest page {p} mapped twice"),
                                    }
                                }
                            }
                            if !hoard && rng(&mut seed).is_multiple_of(2) {
                                inbox[1 - me].lock().unwrap().push((iova, gpa, pages));
                            } else {
                                mine.push((iova, gpa, pages));
                            }
                        }
                        Err(Error::Exist) => exist += 1,
                        Err(Error::Nomem) => {
                            nomem += 1;
                            hoard = false;
                        }
                        Err(e) => panic!("unexpected {e:?}"),
                    }
                    if !hoard
                        && (mine.len() > 8 || rng(&mut seed).is_multiple_of(3))
                        && let Some(m) = mine.pop()
                    {
                        unmap(&shards, me, &dom, &iovas, m);
                    }
                    let handed: Vec<_> = inbox[me].lock().unwrap().drain(..).collect();
                    for m in handed {
                        unmap(&shards, me, &dom, &iovas, m);
                    }
                }
                (maps, exist, nomem)
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in threads {
        results.push(t.join().unwrap());
    }
    // Quiescent: the guest-wide accounting is exactly what the shards hold.
    let mut ivs = BTreeSet::new();
    let (mut n, mut pages) = (0, 0);
    for s in shards.iter() {
        let s = s.lock().unwrap();
        for m in s.mappings() {
            assert!(ivs.insert(m.iova), "IOVA {:#x} live in two shards", m.iova);
            assert!(s.gpa_mapped(m.gpa, m.gpa + m.pages * PAGE_SIZE));
            n += 1;
            pages += m.pages;
        }
    }
    assert_eq!((shared.mappings(), shared.mapped_pages()), (n, pages));
    for (maps, exist, nomem) in results {
        assert!(maps > 1000, "{maps} maps, {exist} EXIST, {nomem} NOMEM");
        assert!(
            exist > 0 && nomem > 0,
            "both refusals seen ({exist} EXIST, {nomem} NOMEM)"
        );
    }
    for s in shards.iter() {
        s.lock()
            .unwrap()
            .teardown(&mut dom.clone(), &mut iovas.clone(), &NoClock)
            .unwrap();
    }
    assert_eq!((shared.mappings(), shared.mapped_pages()), (0, 0));
    assert!(!shared.gpa_mapped(0, RAM_PAGES * PAGE_SIZE));
    assert!(dom.0.lock().unwrap().is_empty());
    assert!(iovas.0.lock().unwrap().1.is_empty(), "every IOVA came back");
}

/// A batch's quota credit: the first map of a batch reserves for the next ones too, an
/// unmap's quota goes back into the credit, the credit never makes its own shard refuse a
/// map that fits, and the end of the batch returns it (the counters exact again).
#[test]
fn batch_credit_is_returned_and_never_refuses_its_own_shard() {
    let g = guest(40, 300);
    let shared = g.0.clone();
    let (mut a, mut b) = (shard(Policy::Batched, &g), shard(Policy::Batched, &g));
    let (mut dom, mut iovas) = (Dom::default(), Iovas::default());
    let map = |s: &mut DmaState<Vec<(u64, u64)>>, page: u64, pages: u64| {
        s.map(
            &mut dom.clone(),
            &mut iovas.clone(),
            &RAM,
            &NoClock,
            page * PAGE_SIZE,
            pages * PAGE_SIZE,
            Access::RW,
        )
    };
    a.begin_batch();
    let first = map(&mut a, 0, 1).unwrap();
    assert_eq!(shared.mappings(), 32, "one reservation for 32 maps");
    for p in 1..8 {
        map(&mut a, p, 1).unwrap();
    }
    assert_eq!(shared.mappings(), 32, "the next maps use the credit");
    for p in 100..108 {
        map(&mut b, p, 1).unwrap();
    }
    // B outside a batch: 32 + 8 = 40, the quota; A's credit (24) makes B's next map wait.
    assert_eq!(map(&mut b, 108, 1), Err(Error::Nomem));
    // A needs more pages than its credit holds: it gives the credit back and reserves
    // exactly, so its own credit does not refuse it (8 + 8 + 1 mappings, 100 + 16 pages).
    map(&mut a, 200, 100).unwrap();
    assert_eq!(shared.mappings(), 17);
    assert_eq!(shared.mapped_pages(), 116);
    // An unmap inside the batch keeps its quota for the batch's later maps.
    let u = a.unmap(&mut dom, &mut iovas, &RAM, &NoClock, first, PAGE_SIZE);
    assert_eq!(u, Ok(Unmapped::Done));
    assert_eq!(shared.mappings(), 17);
    a.end_batch(&mut dom, &mut iovas, &NoClock).unwrap();
    // Exact again: A holds 8 (7 + the 100-page one), B 8.
    assert_eq!((shared.mappings(), shared.mapped_pages()), (16, 115));
    for s in [&mut a, &mut b] {
        s.teardown(&mut dom, &mut iovas, &NoClock).unwrap();
    }
    assert_eq!((shared.mappings(), shared.mapped_pages()), (0, 0));
}
