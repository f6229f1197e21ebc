//! Host stress test: threads allocate here and free there for a bounded time, while a shared
//! page-ownership table catches any IOVA handed to two owners at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use moat_iova::{Config, Error, Iova, IovaAllocator, PerCpu};

const WINDOW: u64 = 1 << 14;
const BASE: u64 = 16;

struct Owners(Vec<AtomicBool>);

impl Owners {
    fn take(&self, i: Iova) {
        for p in i.pfn()..i.pfn() + i.pages() {
            let was = self.0[(p - BASE) as usize].swap(true, Ordering::AcqRel);
            assert!(!was, "page {p} of {i:?} handed out while live");
        }
    }
    fn give(&self, i: Iova) {
        for p in i.pfn()..i.pfn() + i.pages() {
            let was = self.0[(p - BASE) as usize].swap(false, Ordering::AcqRel);
            assert!(was, "page {p} of {i:?} not owned at free");
        }
    }
}

fn worker(
    mut h: PerCpu<'_>,
    owners: &Owners,
    tx: SyncSender<Vec<Iova>>,
    rx: Receiver<Vec<Iova>>,
    stop: &AtomicBool,
    ops: &AtomicU64,
    seed: u64,
) {
    let mut x = seed | 1;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut local: Vec<Iova> = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let r = rnd();
        let order = match r % 16 {
            0..=9 => 0,
            10..=12 => 1,
            13 | 14 => 3,
            _ => 10,
        } as u8;
        let limit = if r & 0x100 == 0 {
            u64::MAX
        } else {
            BASE + WINDOW / 2
        };
        match h.alloc(order, limit) {
            Ok(i) => {
                assert!(i.pfn() + i.pages() <= limit.min(BASE + WINDOW));
                owners.take(i);
                local.push(i);
            }
            Err(Error::NoSpace) => {}
            Err(e) => panic!("alloc: {e:?}"),
        }
        if local.len() >= 32 {
            let batch = std::mem::take(&mut local);
            match tx.try_send(batch) {
                Ok(()) => {}
                Err(TrySendError::Full(b) | TrySendError::Disconnected(b)) => {
                    for i in b {
                        owners.give(i);
                        h.free(i).unwrap();
                    }
                }
            }
        }
        while let Ok(batch) = rx.try_recv() {
            for i in batch {
                owners.give(i);
                h.free(i).unwrap();
            }
        }
        n += 1;
    }
    for i in local {
        owners.give(i);
        h.free(i).unwrap();
    }
    drop(tx);
    // Keep draining until the previous thread has hung up.
    for batch in rx.iter() {
        for i in batch {
            owners.give(i);
            h.free(i).unwrap();
        }
    }
    ops.fetch_add(n, Ordering::Relaxed);
}

fn stress(threads: usize, strict: bool, duration: Duration) {
    let a = IovaAllocator::new(
        Config::new(BASE, BASE + WINDOW, threads)
            .with_strict(strict)
            .with_max_ranges(WINDOW as usize),
    )
    .unwrap();
    let owners = Owners((0..WINDOW).map(|_| AtomicBool::new(false)).collect());
    let stop = AtomicBool::new(false);
    let ops = AtomicU64::new(0);
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..threads).map(|_| sync_channel::<Vec<Iova>>(8)).unzip();
    std::thread::scope(|s| {
        let mut rxs: Vec<Option<_>> = rxs.into_iter().map(Some).collect();
        for (t, tx) in txs.into_iter().enumerate() {
            // Thread t sends to thread t+1 and receives from thread t-1.
            let rx = rxs[(t + threads - 1) % threads].take().unwrap();
            let h = a.claim(t).unwrap();
            let (owners, stop, ops) = (&owners, &stop, &ops);
            let seed = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(t as u64 + 1);
            s.spawn(move || worker(h, owners, tx, rx, stop, ops, seed));
        }
        let start = Instant::now();
        while start.elapsed() < duration {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert!(ops.load(Ordering::Relaxed) > 1000);
    assert!(owners.0.iter().all(|o| !o.load(Ordering::Relaxed)));
    a.drain_depot();
    let s = a.stats();
    assert_eq!(
        (
            s.free_pages,
            s.free_ranges,
            s.allocated_ranges,
            s.late_misuse
        ),
        (WINDOW, 1, 0, 0),
        "{s:?}"
    );
    a.verify().unwrap();
}

#[test]
fn alloc_here_free_there_release_checks() {
    stress(4, false, Duration::from_secs(3));
}

#[test]
fn alloc_here_free_there_strict_checks() {
    stress(2, true, Duration::from_secs(2));
}
