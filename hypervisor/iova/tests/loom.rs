//! Loom model checks of the depot stacks and of cross-CPU flows.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p moat-iova --release --test loom`.
#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::Arc;
use loom::thread;

use moat_iova::stack::{LinkArray, TaggedStack};
use moat_iova::{Config, Error, Iova, IovaAllocator, MAG_SIZE};

fn model(preemptions: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(preemptions);
    b.max_branches = 50_000;
    b.check(f);
}

struct Owned(Vec<AtomicBool>);

impl Owned {
    fn new(n: usize) -> Self {
        Self((0..n).map(|_| AtomicBool::new(false)).collect())
    }
    fn take(&self, i: usize) {
        assert!(
            !self.0[i].swap(true, Ordering::AcqRel),
            "element {i} owned twice"
        );
    }
    fn give(&self, i: usize) {
        assert!(
            self.0[i].swap(false, Ordering::AcqRel),
            "element {i} released while not owned"
        );
    }
}

/// A stack over `items.len()` links with `items` pushed in that order (the last one on top),
/// and an ownership tracker of as many elements, none owned.
fn stack_holding(items: &[u32]) -> (Arc<LinkArray>, Arc<TaggedStack>, Arc<Owned>) {
    let links = Arc::new(LinkArray::new(items.len()));
    let stack = Arc::new(TaggedStack::new());
    for &i in items {
        assert!(stack.push(&*links, i));
    }
    (links, stack, Arc::new(Owned::new(items.len())))
}

/// Two threads pop and push back concurrently: no element is ever owned twice and all come back.
#[test]
fn stack_push_pop_race() {
    model(3, || {
        let (links, stack, owned) = stack_holding(&[0, 1]);
        let th: Vec<_> = (0..2)
            .map(|_| {
                let (links, stack, owned) = (links.clone(), stack.clone(), owned.clone());
                thread::spawn(move || {
                    if let Some(i) = stack.pop(&*links) {
                        owned.take(i as usize);
                        owned.give(i as usize);
                        stack.push(&*links, i);
                    }
                })
            })
            .collect();
        for t in th {
            t.join().unwrap();
        }
        let mut seen = Vec::new();
        while let Some(i) = stack.pop(&*links) {
            seen.push(i);
        }
        seen.sort_unstable();
        assert_eq!(seen, vec![0, 1]);
    });
}

/// The classic ABA schedule: one thread pops A (reading next = B) while another pops A, pops B
/// and pushes A back. A plain CAS would install B as head while B is owned; the tag prevents it.
#[test]
fn stack_aba() {
    model(3, || {
        let (links, stack, owned) = stack_holding(&[2, 1, 0]);
        let t1 = {
            let (links, stack, owned) = (links.clone(), stack.clone(), owned.clone());
            thread::spawn(move || {
                let a = stack.pop(&*links);
                if let Some(a) = a {
                    owned.take(a as usize);
                }
                a
            })
        };
        let t2 = {
            let (links, stack, owned) = (links.clone(), stack.clone(), owned.clone());
            thread::spawn(move || {
                let a = stack.pop(&*links);
                let b = stack.pop(&*links);
                for x in [a, b].into_iter().flatten() {
                    owned.take(x as usize);
                }
                if let Some(a) = a {
                    owned.give(a as usize);
                    stack.push(&*links, a);
                }
                b
            })
        };
        let held1 = t1.join().unwrap();
        let held2 = t2.join().unwrap();
        let mut rest = Vec::new();
        while let Some(i) = stack.pop(&*links) {
            owned.take(i as usize);
            rest.push(i);
        }
        let mut all: Vec<u32> = rest.into_iter().chain(held1).chain(held2).collect();
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2]);
    });
}

fn small(window: u64, strict: bool) -> IovaAllocator {
    IovaAllocator::new(
        Config::new(0, window, 2)
            .with_strict(strict)
            .with_max_ranges(window as usize)
            .with_depot_target(1)
            .with_drain_spins(2),
    )
    .unwrap()
}

/// CPU 0 allocates two IOVAs while `other` runs, then, once it has joined, frees them and
/// drains the depot: all 16 pages are back in one free range and nothing was misused.
fn alloc_two_while(a: &IovaAllocator, owned: &Owned, other: thread::JoinHandle<()>) {
    let mut h0 = a.claim(0).unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let i = h0.alloc(0, u64::MAX).unwrap();
        owned.take(i.pfn() as usize);
        got.push(i);
    }
    other.join().unwrap();
    for i in got {
        owned.give(i.pfn() as usize);
        h0.free(i).unwrap();
    }
    drop(h0);
    a.drain_depot();
    let s = a.stats();
    assert_eq!((s.free_pages, s.free_ranges, s.late_misuse), (16, 1, 0));
}

/// CPU 1 frees enough IOVAs to push a full magazine into the depot while CPU 0 allocates and
/// may take that magazine: every page has one owner at a time and everything adds up.
#[test]
fn cross_cpu_alloc_here_free_there() {
    model(2, || {
        let n = 2 * MAG_SIZE + 1;
        let a = Arc::new(small(16, false));
        let owned = Arc::new(Owned::new(16));
        let mut h1 = a.claim(1).unwrap();
        let given: Vec<Iova> = (0..n).map(|_| h1.alloc(0, u64::MAX).unwrap()).collect();
        for i in &given {
            owned.take(i.pfn() as usize);
        }
        drop(h1);
        let freer = {
            let (a, owned) = (a.clone(), owned.clone());
            thread::spawn(move || {
                let mut h1 = a.claim(1).unwrap();
                for i in given {
                    owned.give(i.pfn() as usize);
                    h1.free(i).unwrap();
                }
            })
        };
        alloc_two_while(&a, &owned, freer);
    });
}

/// CPU 0 runs out while CPU 1 caches the whole window: the drain request reaches CPU 1 without
/// any lock on CPU 1's magazines, and CPU 0 then gets the space (at once, or on its retry after
/// its bounded wait if CPU 1 answered late).
#[test]
fn exhaustion_drains_the_other_cpu() {
    model(2, || {
        let a = Arc::new(small(4, true));
        let ready = Arc::new(AtomicBool::new(false));
        let other = {
            let (a, ready) = (a.clone(), ready.clone());
            thread::spawn(move || {
                let mut h1 = a.claim(1).unwrap();
                let v: Vec<Iova> = (0..4).map(|_| h1.alloc(0, u64::MAX).unwrap()).collect();
                for i in v {
                    h1.free(i).unwrap();
                }
                ready.store(true, Ordering::Release);
                // Poll until a drain request has emptied this CPU's magazines.
                while h1.cached() != 0 {
                    h1.poll();
                    thread::yield_now();
                }
            })
        };
        while !ready.load(Ordering::Acquire) {
            thread::yield_now();
        }
        let mut h0 = a.claim(0).unwrap();
        let first = h0.alloc(2, u64::MAX);
        assert!(matches!(first, Ok(_) | Err(Error::NoSpace)), "{first:?}");
        other.join().unwrap();
        let got = match first {
            Ok(i) => i,
            Err(_) => h0.alloc(2, u64::MAX).unwrap(),
        };
        assert_eq!(got, Iova::new(0, 2));
        h0.free(got).unwrap();
        drop(h0);
        a.drain_depot();
        assert_eq!(a.stats().free_pages, 4);
        a.verify().unwrap();
    });
}

/// Trimming and draining the depot (another CPU, or a timer) race with a CPU that takes a full
/// magazine from it: each IOVA ends up either handed out once or back in the backing allocator.
#[test]
fn depot_trim_races_with_refill() {
    model(2, || {
        let a = Arc::new(small(16, false));
        let owned = Arc::new(Owned::new(16));
        {
            // Put two full magazines in the depot (target 1: one is surplus).
            let mut h = a.claim(1).unwrap();
            let v: Vec<Iova> = (0..4 * MAG_SIZE)
                .map(|_| h.alloc(0, u64::MAX).unwrap())
                .collect();
            for i in v {
                h.free(i).unwrap();
            }
            // Two magazines stay on CPU 1; flush them so only the depot holds IOVAs.
            h.flush();
        }
        assert_eq!(a.stats().depot_full[0], 2);
        let trimmer = {
            let a = a.clone();
            thread::spawn(move || {
                a.trim();
                a.drain_depot();
            })
        };
        alloc_two_while(&a, &owned, trimmer);
        a.verify().unwrap();
    });
}
