//! Property test: random sequences of queued and immediate map/unmap, scatter-gather, flush
//! and sync against the reference model, under random preemption points, batch sizes, quotas,
//! injected NOMEM and policies. Invariants: every queued request completes exactly once, in
//! order; the hypervisor ran each batch entry exactly once (never re-executed on resumption);
//! the mappings the driver reported equal the model's live mappings after every flush; IOVAs
//! are never handed out twice; strict/batched leave nothing pending after a flush.

mod model;

use moat_abi::dma::*;
use moat_pvdma::Error;
use moat_pvdma::*;
use model::{Config, Model};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::vec::Vec;

const PG: u64 = PAGE_SIZE;
const BUF: u64 = 0x10_0000;
const AREA: u64 = 0x10000;

#[derive(Debug, Clone)]
enum Op {
    QueueMap { page: u64, pages: u64 },
    QueueUnmap { pick: usize },
    QueueUnmapBogus { page: u64 },
    Map { page: u64, pages: u64 },
    Unmap { pick: usize },
    MapSg { page: u64, n: usize },
    UnmapSg { pick: usize, n: usize },
    Flush,
    Sync,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u64..64, 1u64..4).prop_map(|(page, pages)| Op::QueueMap { page, pages }),
        5 => any::<usize>().prop_map(|pick| Op::QueueUnmap { pick }),
        1 => (0u64..4096).prop_map(|page| Op::QueueUnmapBogus { page }),
        2 => (0u64..64, 1u64..4).prop_map(|(page, pages)| Op::Map { page, pages }),
        2 => any::<usize>().prop_map(|pick| Op::Unmap { pick }),
        1 => (0u64..64, 1usize..6).prop_map(|(page, n)| Op::MapSg { page, n }),
        1 => (any::<usize>(), 1usize..4).prop_map(|(pick, n)| Op::UnmapSg { pick, n }),
        2 => Just(Op::Flush),
        1 => Just(Op::Sync),
    ]
}

fn config() -> impl Strategy<Value = Config> {
    (
        prop_oneof![
            Just(Policy::Strict),
            Just(Policy::Batched),
            Just(Policy::Deferred)
        ],
        prop::option::of(1u32..5),
        1u32..12,
        3u32..40,
        prop::collection::btree_set(0u64..200, 0..6),
        1u32..6,
    )
        .prop_map(|(policy, preempt, max_batch, max_mappings, nomem, bound)| {
            let mut c = Config::new(policy);
            c.preempt_after = preempt;
            c.max_batch = max_batch;
            c.max_mappings = max_mappings;
            c.nomem_at = nomem;
            c.deferred_max_entries = bound;
            c
        })
}

/// What the driver has told us.
#[derive(Default)]
struct Harness {
    live: BTreeMap<u64, (u64, u64)>,
    outstanding: BTreeMap<Ticket, Request>,
    completed: BTreeSet<Ticket>,
    /// Requests of batch completions, in delivery order.
    batch_order: Vec<Request>,
}

impl Harness {
    fn insert(&mut self, iova: u64, gpa: u64, len: u64) {
        let clash = self
            .live
            .iter()
            .any(|(&i, &(_, l))| iova < i + l && i < iova + len);
        assert!(!clash, "IOVA {iova:#x} handed out twice");
        self.live.insert(iova, (gpa, len));
    }

    fn remove(&mut self, iova: u64, len: u64) {
        let m = self.live.remove(&iova);
        assert_eq!(
            m.map(|m| m.1),
            Some(len),
            "unmap OK of {iova:#x} the driver never mapped"
        );
    }

    fn complete(&mut self, c: Completion) {
        assert!(
            self.completed.insert(c.ticket),
            "ticket {:?} completed twice",
            c.ticket
        );
        let req = self
            .outstanding
            .remove(&c.ticket)
            .expect("completion of an unknown ticket");
        assert_eq!(req, c.request);
        self.batch_order.push(req);
        match (c.result, req) {
            (Ok(iova), Request::Map { gpa, length, .. }) => self.insert(iova, gpa, length),
            (Ok(iova), Request::Unmap { iova: i, length }) => {
                assert_eq!(iova, i);
                self.remove(i, length);
            }
            (Err(e), _) => assert!(e.status().is_some(), "only ABI errors here: {e:?}"),
        }
    }

    fn pick(&self, k: usize) -> Option<(u64, u64)> {
        if self.live.is_empty() {
            return None;
        }
        let (&i, &(_, l)) = self.live.iter().nth(k % self.live.len())?;
        Some((i, l))
    }
}

/// Batch entries the model ran since `from` (an index into its batch-entry log).
fn batch_ran_since(m: &Model, from: usize) -> Vec<Request> {
    m.state()
        .log
        .iter()
        .filter(|e| e.via_batch)
        .skip(from)
        .map(|e| e.request.unwrap())
        .collect()
}

fn batch_ran(m: &Model) -> usize {
    m.state().log.iter().filter(|e| e.via_batch).count()
}

fn check_settled(h: &Harness, m: &Model, policy: Policy) {
    assert!(h.outstanding.is_empty());
    let st = m.state();
    let model: BTreeMap<u64, (u64, u64)> =
        st.live.iter().map(|(&i, l)| (i, (l.gpa, l.len))).collect();
    assert_eq!(h.live, model, "driver view == hypervisor state");
    if policy.unmap_is_synchronous() {
        assert!(
            st.pending.is_empty(),
            "{policy:?}: nothing left to invalidate"
        );
    }
    let ran: Vec<Request> = st
        .log
        .iter()
        .filter(|e| e.via_batch)
        .map(|e| e.request.expect("driver only queues valid entries"))
        .collect();
    assert_eq!(ran, h.batch_order, "each entry ran once, in order");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn driver_never_loses_or_duplicates(cfg in config(), ops in prop::collection::vec(op(), 1..60), pages in 1u64..3) {
        let policy = cfg.policy;
        let m = Model::new(cfg);
        let mut d = PvDma::probe(m.clone(), GuestBuffer { gpa: 0x1000, len: 0x1000 }).unwrap();
        d.attach_batch(BatchArea { gpa: AREA, pages }).unwrap();
        let mut h = Harness::default();
        for op in ops {
            match op {
                Op::QueueMap { page, pages } => {
                    let req = Request::Map { gpa: BUF + page * PG, length: pages * PG, flags: DmaFlags::READ_WRITE };
                    let t = d.queue(req, &mut |c| h.complete(c)).unwrap();
                    h.outstanding.insert(t, req);
                }
                Op::QueueUnmap { pick } => {
                    if let Some((iova, len)) = h.pick(pick) {
                        let req = Request::Unmap { iova, length: len };
                        let t = d.queue(req, &mut |c| h.complete(c)).unwrap();
                        h.outstanding.insert(t, req);
                    }
                }
                Op::QueueUnmapBogus { page } => {
                    let req = Request::Unmap { iova: 0x4000_0000 + page * PG, length: PG };
                    let t = d.queue(req, &mut |c| h.complete(c)).unwrap();
                    h.outstanding.insert(t, req);
                }
                Op::Map { page, pages } => {
                    if let Ok(iova) = d.map(BUF + page * PG, pages * PG, DmaFlags::READ) {
                        h.insert(iova, BUF + page * PG, pages * PG);
                    }
                }
                Op::Unmap { pick } => {
                    if let Some((iova, len)) = h.pick(pick) {
                        match d.unmap(iova, len) {
                            Ok(()) => h.remove(iova, len),
                            Err(e) => prop_assert!(false, "unmap of a live mapping failed: {e:?}"),
                        }
                    }
                }
                Op::MapSg { page, n } => {
                    let sg: Vec<Segment> = (0..n as u64).map(|k| Segment { addr: BUF + (page + 2 * k) * PG, len: PG }).collect();
                    let mut out = [0u64; 8];
                    let pending = d.pending();
                    let from = batch_ran(&m);
                    let r = d.map_sg(&sg, DmaFlags::WRITE, &mut out);
                    match r {
                        Ok(()) => {
                            for (s, &i) in sg.iter().zip(&out) {
                                h.insert(i, s.addr, s.len);
                            }
                        }
                        Err(Error::BatchNotEmpty) => prop_assert!(pending > 0),
                        Err(e) => prop_assert!(e.status().is_some()),
                    }
                    // Its entries ran once each, in order (a prefix if one failed).
                    let ran = batch_ran_since(&m, from);
                    let want: Vec<Request> = sg.iter().map(|s| Request::Map { gpa: s.addr, length: s.len, flags: DmaFlags::WRITE }).collect();
                    prop_assert!(ran.len() <= want.len() && ran[..] == want[..ran.len()]);
                    if r.is_ok() {
                        prop_assert_eq!(ran.len(), want.len());
                    }
                    h.batch_order.extend(ran);
                    // All or nothing: map_sg submitted only its own entries.
                    if pending == 0 {
                        check_settled(&h, &m, policy);
                    }
                }
                Op::UnmapSg { pick, n } => {
                    let segs: Vec<Segment> = (0..n).filter_map(|k| h.pick(pick + k)).collect::<BTreeSet<_>>()
                        .into_iter().map(|(addr, len)| Segment { addr, len }).collect();
                    if d.pending() == 0 {
                        let from = batch_ran(&m);
                        prop_assert_eq!(d.unmap_sg(&segs), Ok(()));
                        let ran = batch_ran_since(&m, from);
                        let want: Vec<Request> = segs.iter().map(|s| Request::Unmap { iova: s.addr, length: s.len }).collect();
                        prop_assert_eq!(&ran, &want);
                        h.batch_order.extend(ran);
                        for s in &segs {
                            h.remove(s.addr, s.len);
                        }
                        check_settled(&h, &m, policy);
                    } else {
                        prop_assert_eq!(d.unmap_sg(&segs), Err(Error::BatchNotEmpty));
                    }
                }
                Op::Flush => {
                    let n = d.pending();
                    let rep = d.flush(&mut |c| h.complete(c)).unwrap();
                    prop_assert_eq!(rep.submitted, n);
                    prop_assert_eq!(rep.ok + rep.failed, n);
                    check_settled(&h, &m, policy);
                }
                Op::Sync => {
                    d.sync(&mut |c| h.complete(c)).unwrap();
                    check_settled(&h, &m, policy);
                    prop_assert!(m.state().pending.is_empty(), "after sync nothing is reachable");
                }
            }
        }
        d.sync(&mut |c| h.complete(c)).unwrap();
        check_settled(&h, &m, policy);
        // Tear down: everything unmaps, nothing leaks.
        let all: Vec<Segment> = h.live.iter().map(|(&addr, &(_, len))| Segment { addr, len }).collect();
        for chunk in all.chunks(7) {
            prop_assert_eq!(d.unmap_sg(chunk), Ok(()));
        }
        d.sync(&mut |_| {}).unwrap();
        prop_assert!(m.state().live.is_empty());
        prop_assert!(m.state().pending.is_empty());
    }
}
