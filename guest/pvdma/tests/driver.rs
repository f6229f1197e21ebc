//! The driver against the reference model: discovery, every status, batching, resumption,
//! policies, scatter-gather, fault ring, stats, and a hypervisor that breaks the ABI.

mod model;

use moat_abi::dma::*;
use moat_abi::*;
use moat_pvdma::*;
use moat_pvdma::{moat_abi::Error as AbiError, Error};
use model::{Config, Model, MSI, RAM};
use std::vec::Vec;

const SCRATCH: GuestBuffer = GuestBuffer {
    gpa: 0x1000,
    len: 0x1000,
};
const AREA: u64 = 0x10000;
const AREA2: u64 = 0x20000;
const RING: u64 = 0x30000;
const BUF: u64 = 0x10_0000;
const PG: u64 = PAGE_SIZE;
const RW: DmaFlags = DmaFlags::READ_WRITE;

fn probe(cfg: Config) -> (Model, PvDma<Model>) {
    let m = Model::new(cfg);
    let d = PvDma::probe(m.clone(), SCRATCH).expect("probe");
    (m, d)
}

fn area(gpa: u64, pages: u64) -> BatchArea {
    BatchArea { gpa, pages }
}

fn with_batch(cfg: Config, pages: u64) -> (Model, PvDma<Model>) {
    let (m, mut d) = probe(cfg);
    d.attach_batch(area(AREA, pages)).unwrap();
    (m, d)
}

/// A scatter-gather list: one segment of `len` bytes at each address.
fn segments(addrs: impl IntoIterator<Item = u64>, len: u64) -> Vec<Segment> {
    addrs
        .into_iter()
        .map(|addr| Segment { addr, len })
        .collect()
}

// ------------------------------------------------------------------ discovery

#[test]
fn discovery_reports_the_query() {
    let mut cfg = Config::new(Policy::Deferred);
    cfg.max_map_pages = 512;
    let (_, d) = probe(cfg);
    let i = d.info();
    assert_eq!(i.abi_version, ABI_VERSION);
    assert_eq!(i.instruction, Instruction::Vmmcall);
    assert_eq!(i.policy, Policy::Deferred);
    assert_eq!(i.limits.iova_width, 39);
    assert_eq!(i.limits.max_map_pages, 512);
    assert_eq!(i.deferred_max_entries, 8);
    assert_eq!(i.deferred_max_us, 1000);
    assert_eq!(i.regions(), &[MSI]);
    assert_eq!(i.regions_total, 1);
    assert!(i.has_call(Call::DmaMulticall));
    assert!(i.features.has(Features::STATS));
}

#[test]
fn discovery_refusals() {
    // Old ABI.
    let mut cfg = Config::new(Policy::Strict);
    cfg.abi_version = 1;
    let r = PvDma::probe(Model::new(cfg), SCRATCH).err();
    assert_eq!(r, Some(Error::OldAbi { version: 1 }));
    // No DMA calls for this guest.
    let mut cfg = Config::new(Policy::Strict);
    cfg.calls = CALLS_BASE;
    assert_eq!(
        PvDma::probe(Model::new(cfg), SCRATCH).err(),
        Some(Error::NoDma)
    );
    // Scratch too small / outside the guest.
    let tiny = GuestBuffer {
        gpa: 0x1000,
        len: 63,
    };
    let m = Model::new(Config::new(Policy::Strict));
    assert_eq!(
        PvDma::probe(m.clone(), tiny).err(),
        Some(Error::BufferTooSmall)
    );
    let outside = GuestBuffer {
        gpa: RAM,
        len: 4096,
    };
    assert_eq!(
        PvDma::probe(m, outside).err(),
        Some(Error::Status(AbiError::Fault))
    );
    // Not Moat.
    struct Other;
    impl Hypervisor for Other {
        fn cpuid(&mut self, _: u32) -> [u32; 4] {
            [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d]
        }
        fn hypercall(&mut self, _: Call, _: Args) -> Return {
            unreachable!("no hypercall on a foreign hypervisor")
        }
        fn read(&mut self, _: u64, _: &mut [u8]) {}
        fn write(&mut self, _: u64, _: &[u8]) {}
    }
    assert_eq!(PvDma::probe(Other, SCRATCH).err(), Some(Error::NotMoat));
}

#[test]
fn discovery_truncated_regions() {
    let mut cfg = Config::new(Policy::Strict);
    cfg.regions = (0..20)
        .map(|k| ReservedRegion {
            start: (0x1_0000_0000 + k * 0x10_0000).into(),
            length: 0x1000.into(),
            kind: (RegionKind::Reserved as u32).into(),
            reserved: 0.into(),
        })
        .collect();
    // 64 + 2 regions fit.
    let small = GuestBuffer {
        gpa: 0x1000,
        len: 64 + 2 * 24 + 10,
    };
    let d = PvDma::probe(Model::new(cfg.clone()), small).unwrap();
    assert_eq!(d.info().regions().len(), 2);
    assert_eq!(d.info().regions_total, 20);
    let d = PvDma::probe(Model::new(cfg), SCRATCH).unwrap();
    assert_eq!(d.info().regions().len(), MAX_REGIONS);
}

// ------------------------------------------------------------------ single calls: every status

#[test]
fn single_calls_statuses() {
    let (m, mut d) = probe(Config::new(Policy::Strict));
    let a = d.map(BUF, 2 * PG, RW).unwrap();
    assert!(is_page_aligned(a) && a != 0);
    assert!(!MSI.intersects(a, 2 * PG));
    // Overlapping guest pages.
    assert_eq!(
        d.map(BUF + PG, PG, DmaFlags::READ),
        Err(Error::Status(AbiError::Exist))
    );
    // Outside the guest.
    assert_eq!(
        d.map(RAM - PG, 2 * PG, RW),
        Err(Error::Status(AbiError::Fault))
    );
    // The scratch buffer is fine to map, a registered batch area is not.
    d.attach_batch(area(AREA, 1)).unwrap();
    assert_eq!(d.map(AREA, PG, RW), Err(Error::Status(AbiError::Perm)));
    // Partial unmap, never-mapped unmap, reserved region.
    assert_eq!(d.unmap(a, PG), Err(Error::Status(AbiError::Inval)));
    assert_eq!(
        d.unmap(a + 0x10_0000, PG),
        Err(Error::Status(AbiError::Noent))
    );
    assert_eq!(
        d.unmap(MSI.start.get(), PG),
        Err(Error::Status(AbiError::Perm))
    );
    d.unmap(a, 2 * PG).unwrap();
    assert!(
        !m.state().device_reaches(a),
        "strict: unusable once UNMAP returned"
    );
    assert_eq!(
        d.unmap(a, 2 * PG),
        Err(Error::Status(AbiError::Noent)),
        "double unmap"
    );
    assert!(m.state().live.is_empty());
}

#[test]
fn driver_refuses_malformed_requests_without_a_hypercall() {
    let (m, mut d) = probe(Config::new(Policy::Strict));
    let exits = m.state().stats.exits;
    assert_eq!(d.map(BUF, 0, RW), Err(Error::Status(AbiError::Inval)));
    assert_eq!(d.map(BUF + 1, PG, RW), Err(Error::Status(AbiError::Inval)));
    assert_eq!(d.map(BUF, PG + 1, RW), Err(Error::Status(AbiError::Inval)));
    assert_eq!(
        d.map(BUF, PG, DmaFlags::EMPTY),
        Err(Error::Status(AbiError::Inval))
    );
    assert_eq!(
        d.map(!0xfff, 2 * PG, RW),
        Err(Error::Status(AbiError::Range))
    );
    assert_eq!(d.map(0, 1 << 40, RW), Err(Error::Status(AbiError::Range)));
    assert_eq!(d.unmap(1 << 39, PG), Err(Error::Status(AbiError::Range)));
    assert_eq!(m.state().stats.exits, exits);
}

#[test]
fn hypervisor_side_validation_matches() {
    // The same malformed requests sent raw reach the model's copy of the ABI checks.
    let (_, mut d) = probe(Config::new(Policy::Strict));
    let hv = d.hypervisor();
    let call = |hv: &mut Model, c: Call, a: [u64; 3]| {
        hv.hypercall(c, Args([a[0], a[1], a[2], 0, 0, 0]))
            .status()
            .unwrap()
    };
    assert_eq!(call(hv, Call::DmaMap, [BUF, PG, 1 << 2]), Status::Inval);
    assert_eq!(call(hv, Call::DmaMap, [BUF, PG, 1 << 16]), Status::Inval);
    assert_eq!(call(hv, Call::DmaMap, [BUF, 0, 1]), Status::Inval);
    assert_eq!(call(hv, Call::DmaMap, [!0xfff, 2 * PG, 1]), Status::Range);
    assert_eq!(call(hv, Call::DmaUnmap, [PG, PG, 1]), Status::Inval);
    assert_eq!(call(hv, Call::DmaSync, [1, 0, 0]), Status::Inval);
    assert_eq!(
        hv.hypercall(Call::DmaMulticall, Args::default()).status(),
        Some(Status::Noent),
        "no batch area"
    );
}

#[test]
fn quota_gives_nomem_and_changes_nothing() {
    let mut cfg = Config::new(Policy::Strict);
    cfg.max_mappings = 2;
    let (m, mut d) = probe(cfg);
    let a = d.map(BUF, PG, RW).unwrap();
    d.map(BUF + PG, PG, RW).unwrap();
    let before = m.state().live.clone();
    assert_eq!(
        d.map(BUF + 2 * PG, PG, RW),
        Err(Error::Status(AbiError::Nomem))
    );
    assert_eq!(m.state().live, before);
    d.unmap(a, PG).unwrap();
    d.map(BUF + 2 * PG, PG, RW).unwrap();
}

#[test]
fn max_map_pages_is_range() {
    let mut cfg = Config::new(Policy::Strict);
    cfg.max_map_pages = 4;
    let (_, mut d) = probe(cfg);
    assert_eq!(d.map(BUF, 5 * PG, RW), Err(Error::Status(AbiError::Range)));
    d.map(BUF, 4 * PG, RW).unwrap();
}

// ------------------------------------------------------------------ batches

#[test]
fn batch_completions_in_order_with_distinct_iovas() {
    let (m, mut d) = with_batch(Config::new(Policy::Batched), 1);
    let mut got = Vec::new();
    let mut sink = |c: Completion| got.push(c);
    let mut tickets = Vec::new();
    for k in 0..10 {
        tickets.push(d.queue_map(BUF + k * 2 * PG, PG, RW, &mut sink).unwrap());
    }
    assert_eq!(d.pending(), 10);
    let rep = d.flush(&mut sink).unwrap();
    assert_eq!(
        (rep.submitted, rep.ok, rep.failed, rep.multicalls),
        (10, 10, 0, 1)
    );
    assert_eq!(got.iter().map(|c| c.ticket).collect::<Vec<_>>(), tickets);
    let mut iovas: Vec<u64> = got.iter().map(|c| c.result.unwrap()).collect();
    for (c, k) in got.iter().zip(0..) {
        assert_eq!(
            c.request,
            Request::Map {
                gpa: BUF + k * 2 * PG,
                length: PG,
                flags: RW
            }
        );
        assert_eq!(m.state().live[&c.result.unwrap()].gpa, BUF + k * 2 * PG);
    }
    iovas.sort();
    iovas.dedup();
    assert_eq!(iovas.len(), 10);
    // Unmap them all in one batch: one invalidation, one wait.
    let inv0 = m.state().stats.invalidations;
    got.clear();
    for &i in &iovas {
        d.queue_unmap(i, PG, &mut |c| got.push(c)).unwrap();
    }
    d.flush(&mut |c| got.push(c)).unwrap();
    assert!(got.iter().all(|c| c.result.is_ok()));
    assert_eq!(m.state().stats.invalidations - inv0, 1);
    assert!(
        m.state().pending.is_empty(),
        "batched: flushed before the call returned"
    );
    assert!(m.state().live.is_empty());
}

#[test]
fn preempted_batches_resume_without_reexecution() {
    for after in [1, 2, 3, 7] {
        let mut cfg = Config::new(Policy::Strict);
        cfg.preempt_after = Some(after);
        let (m, mut d) = with_batch(cfg, 1);
        let mut got = Vec::new();
        for k in 0..20 {
            d.queue_map(BUF + k * PG, PG, RW, &mut |c| got.push(c))
                .unwrap();
        }
        let rep = d.flush(&mut |c| got.push(c)).unwrap();
        let calls = 20u32.div_ceil(after);
        assert_eq!(rep.multicalls, calls, "after {after}");
        assert_eq!(rep.preemptions, calls - 1);
        assert_eq!(rep.ok, 20);
        assert_eq!(m.state().log.len(), 20, "each entry ran exactly once");
        assert_eq!(m.state().live.len(), 20);
        assert_eq!(got.len(), 20);
    }
}

#[test]
fn failed_entry_is_reported_and_skipped() {
    let (m, mut d) = with_batch(Config::new(Policy::Batched), 1);
    let mut got = Vec::new();
    d.queue_map(BUF, PG, RW, &mut |c| got.push(c)).unwrap();
    d.queue_map(BUF, PG, RW, &mut |c| got.push(c)).unwrap(); // EXIST
    d.queue_map(RAM, PG, RW, &mut |c| got.push(c)).unwrap(); // FAULT
    d.queue_unmap(0x7000_0000, PG, &mut |c| got.push(c))
        .unwrap(); // NOENT
    d.queue_map(BUF + PG, PG, RW, &mut |c| got.push(c)).unwrap();
    let rep = d.flush(&mut |c| got.push(c)).unwrap();
    assert_eq!((rep.ok, rep.failed, rep.multicalls), (2, 3, 4));
    let results: Vec<_> = got.iter().map(|c| c.result.map(|_| ())).collect();
    assert_eq!(
        results,
        [
            Ok(()),
            Err(Error::Status(AbiError::Exist)),
            Err(Error::Status(AbiError::Fault)),
            Err(Error::Status(AbiError::Noent)),
            Ok(())
        ]
    );
    assert_eq!(m.state().live.len(), 2);
}

#[test]
fn nomem_entry_changes_nothing_and_later_entries_run() {
    let mut cfg = Config::new(Policy::Batched);
    cfg.nomem_at = [1u64].into_iter().collect();
    let (m, mut d) = with_batch(cfg, 1);
    let mut got = Vec::new();
    for k in 0..3 {
        d.queue_map(BUF + k * PG, PG, RW, &mut |c| got.push(c))
            .unwrap();
    }
    d.flush(&mut |c| got.push(c)).unwrap();
    assert_eq!(got[1].result, Err(Error::Status(AbiError::Nomem)));
    assert!(got[0].result.is_ok() && got[2].result.is_ok());
    assert_eq!(m.state().live.len(), 2);
    assert!(!m.state().live.values().any(|l| l.gpa == BUF + PG));
    // Retry it: works now.
    d.queue_map(BUF + PG, PG, RW, &mut |c| got.push(c)).unwrap();
    d.flush(&mut |c| got.push(c)).unwrap();
    assert!(got[3].result.is_ok());
}

#[test]
fn full_batch_is_submitted_automatically() {
    let mut cfg = Config::new(Policy::Strict);
    cfg.max_batch = 4;
    let (m, mut d) = with_batch(cfg, 1);
    assert_eq!(d.capacity(), 4);
    let mut got = Vec::new();
    for k in 0..10 {
        d.queue_map(BUF + k * PG, PG, RW, &mut |c| got.push(c))
            .unwrap();
    }
    assert_eq!(got.len(), 8, "two full batches went out");
    assert_eq!(d.pending(), 2);
    assert_eq!(m.state().stats.multicalls, 2);
    d.flush(&mut |c| got.push(c)).unwrap();
    assert_eq!(got.len(), 10);
    let t: Vec<u64> = got.iter().map(|c| c.ticket.0).collect();
    assert_eq!(t, (0..10).collect::<Vec<_>>());
}

#[test]
fn batch_registration_rules() {
    let (m, mut d) = probe(Config::new(Policy::Strict));
    let mut noop = |_c: Completion| {};
    assert_eq!(d.queue_map(BUF, PG, RW, &mut noop), Err(Error::NoBatch));
    assert_eq!(d.flush(&mut noop), Err(Error::NoBatch));
    assert_eq!(
        d.attach_batch(area(AREA + 8, 1)),
        Err(Error::Status(AbiError::Inval))
    );
    assert_eq!(
        d.attach_batch(area(AREA, 17)),
        Err(Error::Status(AbiError::Range))
    );
    assert_eq!(
        d.attach_batch(area(RAM, 1)),
        Err(Error::Status(AbiError::Fault))
    );
    let iova = d.map(AREA, PG, RW).unwrap();
    assert_eq!(
        d.attach_batch(area(AREA, 1)),
        Err(Error::Status(AbiError::Busy))
    );
    d.unmap(iova, PG).unwrap();
    assert_eq!(d.attach_batch(area(AREA, 4)), Ok(256));
    // Another vCPU may not take overlapping pages.
    let mut d2 = PvDma::new(
        m.vcpu(1),
        *d.info(),
        GuestBuffer {
            gpa: 0x2000,
            len: 0x1000,
        },
    );
    assert_eq!(
        d2.attach_batch(area(AREA + 3 * PG, 1)),
        Err(Error::Status(AbiError::Exist))
    );
    assert_eq!(d2.attach_batch(area(AREA2, 1)), Ok(84));
    d.queue_map(BUF, PG, RW, &mut noop).unwrap();
    assert_eq!(d.detach_batch(), Err(Error::BatchNotEmpty));
    d.flush(&mut noop).unwrap();
    d.detach_batch().unwrap();
    assert!(!m.state().areas.contains_key(&0));
}

#[test]
fn two_vcpus_batch_independently() {
    let (m, mut d0) = with_batch(Config::new(Policy::Batched), 1);
    let mut d1 = PvDma::new(
        m.vcpu(1),
        *d0.info(),
        GuestBuffer {
            gpa: 0x2000,
            len: 0x1000,
        },
    );
    d1.attach_batch(area(AREA2, 1)).unwrap();
    let (mut g0, mut g1) = (Vec::new(), Vec::new());
    for k in 0..5 {
        d0.queue_map(BUF + k * PG, PG, RW, &mut |c| g0.push(c))
            .unwrap();
        d1.queue_map(BUF + (10 + k) * PG, PG, RW, &mut |c| g1.push(c))
            .unwrap();
    }
    d1.flush(&mut |c| g1.push(c)).unwrap();
    d0.flush(&mut |c| g0.push(c)).unwrap();
    assert!(g0.iter().chain(&g1).all(|c| c.result.is_ok()));
    let mut all: Vec<u64> = g0.iter().chain(&g1).map(|c| c.result.unwrap()).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 10);
    assert_eq!(m.state().live.len(), 10);
}

// ------------------------------------------------------------------ policies

#[test]
fn deferred_holds_until_bound_or_sync() {
    let mut cfg = Config::new(Policy::Deferred);
    cfg.deferred_max_entries = 4;
    let (m, mut d) = with_batch(cfg, 1);
    let mut iovas = Vec::new();
    for k in 0..6 {
        iovas.push(d.map(BUF + k * PG, PG, RW).unwrap());
    }
    for &i in &iovas[..3] {
        d.unmap(i, PG).unwrap();
    }
    assert!(
        m.state().device_reaches(iovas[0]),
        "deferred: still reachable"
    );
    assert_eq!(m.state().pending.len(), 3);
    d.unmap(iovas[3], PG).unwrap();
    assert!(m.state().pending.is_empty(), "bound of 4 entries reached");
    d.unmap(iovas[4], PG).unwrap();
    let rep = d.sync(&mut |_| {}).unwrap();
    assert_eq!(rep.sync_invalidations, Some(1));
    assert!(!m.state().device_reaches(iovas[4]));
    // Nothing pending: SYNC reports 0.
    assert_eq!(d.sync(&mut |_| {}).unwrap().sync_invalidations, Some(0));
}

#[test]
fn strict_sync_issues_no_sync_call() {
    let (m, mut d) = with_batch(Config::new(Policy::Strict), 1);
    let i = d.map(BUF, PG, RW).unwrap();
    d.queue_unmap(i, PG, &mut |_| {}).unwrap();
    let exits = m.state().stats.exits;
    let rep = d.sync(&mut |_| {}).unwrap();
    assert_eq!(rep.sync_invalidations, None);
    assert_eq!(m.state().stats.exits - exits, 1, "one MULTICALL, no SYNC");
    assert!(!m.state().device_reaches(i));
}

#[test]
fn passthrough_maps_identity() {
    let (m, mut d) = with_batch(Config::new(Policy::Passthrough), 1);
    assert!(d.info().features.has(Features::IOVA_IS_GPA));
    assert_eq!(d.map(BUF, PG, RW), Ok(BUF));
    assert_eq!(
        d.map(BUF, PG, RW),
        Ok(BUF),
        "no bookkeeping under passthrough"
    );
    assert_eq!(d.map(AREA, PG, RW), Err(Error::Status(AbiError::Perm)));
    d.unmap(BUF, PG).unwrap();
    let mut out = [0u64; 2];
    let sg = [
        Segment { addr: BUF, len: PG },
        Segment {
            addr: BUF + 8 * PG,
            len: 2 * PG,
        },
    ];
    d.map_sg(&sg, RW, &mut out).unwrap();
    assert_eq!(out, [BUF, BUF + 8 * PG]);
    assert!(m.state().live.is_empty());
}

#[test]
fn unconfirmed_invalidation_is_retried_by_sync() {
    let (m, mut d) = with_batch(Config::new(Policy::Strict), 1);
    let a = d.map(BUF, PG, RW).unwrap();
    let b = d.map(BUF + PG, PG, RW).unwrap();
    m.state().cfg.iommu_stuck = true;
    assert_eq!(d.unmap(a, PG), Err(Error::Status(AbiError::Busy)));
    assert!(d.is_unsynced());
    assert_eq!(
        d.unmap(a, PG),
        Err(Error::Status(AbiError::Noent)),
        "the mapping is gone"
    );
    d.queue_unmap(b, PG, &mut |_| {}).unwrap();
    let mut got = Vec::new();
    assert_eq!(
        d.sync(&mut |c| got.push(c)).err(),
        Some(Error::Status(AbiError::Busy))
    );
    assert!(got[0].result.is_ok());
    assert!(m.state().device_reaches(a) && m.state().device_reaches(b));
    m.state().cfg.iommu_stuck = false;
    let rep = d.sync(&mut |_| {}).unwrap();
    assert_eq!(rep.sync_invalidations, Some(1));
    assert!(!d.is_unsynced());
    assert!(!m.state().device_reaches(a) && !m.state().device_reaches(b));
}

// ------------------------------------------------------------------ scatter-gather

#[test]
fn map_sg_with_and_without_batch() {
    for batch in [false, true] {
        let cfg = Config::new(Policy::Batched);
        let (m, mut d) = if batch {
            with_batch(cfg, 1)
        } else {
            probe(cfg)
        };
        let sg = segments((0..100).map(|k| BUF + k * 3 * PG), 2 * PG);
        let mut out = [0u64; 100];
        d.map_sg(&sg, DmaFlags::WRITE, &mut out).unwrap();
        for (s, &i) in sg.iter().zip(&out) {
            assert_eq!(m.state().live[&i].gpa, s.addr);
        }
        let exits = m.state().stats.exits;
        let back = segments(out, 2 * PG);
        d.unmap_sg(&back).unwrap();
        assert!(m.state().live.is_empty());
        let calls = m.state().stats.exits - exits;
        assert_eq!(
            calls,
            if batch { 2 } else { 100 },
            "84 + 16 entries per batch"
        );
        assert_eq!(d.unmap_sg(&back[..3]), Err(Error::Status(AbiError::Noent)));
    }
}

#[test]
fn map_sg_is_all_or_nothing() {
    for batch in [false, true] {
        let mut cfg = Config::new(Policy::Strict);
        cfg.max_mappings = 5;
        let (m, mut d) = if batch {
            with_batch(cfg, 1)
        } else {
            probe(cfg)
        };
        let sg = segments((0..8).map(|k| BUF + k * PG), PG);
        let mut out = [0u64; 8];
        assert_eq!(
            d.map_sg(&sg, RW, &mut out),
            Err(Error::Status(AbiError::Nomem))
        );
        assert!(m.state().live.is_empty(), "rolled back");
        assert_eq!(d.map_sg(&sg, RW, &mut out[..7]), Err(Error::BufferTooSmall));
        let bad = [Segment { addr: BUF, len: 0 }];
        assert_eq!(
            d.map_sg(&bad, RW, &mut out),
            Err(Error::Status(AbiError::Inval))
        );
    }
    let (_, mut d) = with_batch(Config::new(Policy::Strict), 1);
    d.queue_map(BUF, PG, RW, &mut |_| {}).unwrap();
    let mut out = [0u64; 1];
    assert_eq!(
        d.map_sg(
            &[Segment {
                addr: BUF + PG,
                len: PG
            }],
            RW,
            &mut out
        ),
        Err(Error::BatchNotEmpty)
    );
}

// ------------------------------------------------------------------ fault ring and stats

#[test]
fn fault_ring_delivers_wraps_and_counts_drops() {
    let mut cfg = Config::new(Policy::Strict);
    cfg.features |= Features::FAULT_IRQ;
    let (m, mut d) = probe(cfg);
    let mut none = |_r: FaultRecord| {};
    assert_eq!(d.poll_faults(&mut none), Err(Error::NoFaultRing));
    let area = FaultRingArea {
        gpa: RING,
        pages: 1,
        vector: 40,
    };
    assert_eq!(d.attach_fault_ring(area), Ok(126));
    assert_eq!(d.map(RING, PG, RW), Err(Error::Status(AbiError::Perm)));
    let mut seen = Vec::new();
    let mut next = 0u64;
    for round in 0..5 {
        let n = 100 + round * 5;
        for _ in 0..n {
            m.state()
                .inject_fault(0x5000 + next * PG, 0x18, 6, Direction::Read);
            next += 1;
        }
        let p = d.poll_faults(&mut |r| seen.push(r)).unwrap();
        assert_eq!(p.records, n as u32);
        assert_eq!(p.dropped, 0);
    }
    assert_eq!(seen.len() as u64, next);
    for (k, r) in seen.iter().enumerate() {
        assert_eq!(r.seq, k as u64);
        assert_eq!(r.iova, 0x5000 + k as u64 * PG);
        assert_eq!(r.direction(), Some(Direction::Read));
        assert_eq!((r.source_id.get(), r.reason), (0x18, 6));
    }
    assert_eq!(
        m.state().injected_irqs,
        5,
        "one interrupt per empty-to-non-empty"
    );
    // Overflow: 130 faults into 126 slots.
    for _ in 0..130 {
        m.state().inject_fault(0x9000, 0x18, 5, Direction::Write);
    }
    seen.clear();
    let p = d.poll_faults(&mut |r| seen.push(r)).unwrap();
    assert_eq!((p.records, p.dropped), (126, 4));
    assert_eq!(d.poll_faults(&mut none).unwrap(), FaultPoll::default());
    d.detach_fault_ring().unwrap();
    assert_eq!(d.detach_fault_ring(), Err(Error::NoFaultRing));
}

#[test]
fn fault_ring_registration_rules() {
    let (_, mut d) = probe(Config::new(Policy::Strict));
    let r = |gpa, pages, vector| FaultRingArea { gpa, pages, vector };
    assert_eq!(
        d.attach_fault_ring(r(RING, 1, 40)),
        Err(Error::Status(AbiError::Unsupp)),
        "no FAULT_IRQ"
    );
    assert_eq!(
        d.attach_fault_ring(r(RING, 1, 5)),
        Err(Error::Status(AbiError::Inval))
    );
    assert_eq!(
        d.attach_fault_ring(r(RING, 17, 0)),
        Err(Error::Status(AbiError::Range))
    );
    d.attach_batch(area(AREA, 1)).unwrap();
    assert_eq!(
        d.attach_fault_ring(r(AREA, 1, 0)),
        Err(Error::Status(AbiError::Exist))
    );
    assert_eq!(d.attach_fault_ring(r(RING, 2, 0)), Ok(254));
    let mut cfg = Config::new(Policy::Strict);
    cfg.features = 0;
    let (_, mut d) = probe(cfg);
    assert_eq!(
        d.attach_fault_ring(r(RING, 1, 0)),
        Err(Error::Status(AbiError::Unsupp))
    );
    assert_eq!(d.stats(false), Err(Error::Status(AbiError::Unsupp)));
}

#[test]
fn stats_count_and_reset() {
    let (m, mut d) = with_batch(Config::new(Policy::Batched), 1);
    let a = d.map(BUF, PG, RW).unwrap();
    let _ = d.map(BUF, PG, RW);
    d.queue_unmap(a, PG, &mut |_| {}).unwrap();
    d.flush(&mut |_| {}).unwrap();
    d.map(BUF, 3 * PG, RW).unwrap();
    let s = d.stats(true).unwrap();
    assert_eq!(
        (
            s.maps.get(),
            s.unmaps.get(),
            s.errors.get(),
            s.multicalls.get()
        ),
        (2, 1, 1, 1)
    );
    assert_eq!((s.invalidations.get(), s.waits.get()), (1, 1));
    assert_eq!((s.live_mappings.get(), s.live_pages.get()), (1, 3));
    assert_eq!(
        s.exits, 7,
        "QUERY, BATCH_REGISTER, 3 MAPs, MULTICALL, STATS"
    );
    let s = d.stats(false).unwrap();
    assert_eq!(
        (s.maps.get(), s.unmaps.get(), s.multicalls.get()),
        (0, 0, 0)
    );
    assert_eq!(s.live_mappings, 1, "gauges survive a reset");
    let mut small = PvDma::new(
        m.clone(),
        *d.info(),
        GuestBuffer {
            gpa: 0x1000,
            len: 100,
        },
    );
    assert_eq!(small.stats(false), Err(Error::BufferTooSmall));
}

// ------------------------------------------------------------------ a hypervisor that breaks the ABI

fn tampered(
    t: impl FnMut(Return) -> Return + 'static,
) -> (Vec<Completion>, Result<FlushReport, Error>, Model) {
    tampered_with(Config::new(Policy::Strict), t)
}

fn tampered_with(
    cfg: Config,
    t: impl FnMut(Return) -> Return + 'static,
) -> (Vec<Completion>, Result<FlushReport, Error>, Model) {
    let (m, mut d) = with_batch(cfg, 1);
    let mut got = Vec::new();
    for k in 0..6 {
        d.queue_map(BUF + k * PG, PG, RW, &mut |c| got.push(c))
            .unwrap();
    }
    m.state().tamper = Some(Box::new(t));
    let r = d.flush(&mut |c| got.push(c));
    // The driver is usable afterwards.
    d.queue_map(BUF + 100 * PG, PG, RW, &mut |_| {}).unwrap();
    d.flush(&mut |_| {}).unwrap();
    (got, r, m)
}

#[test]
fn protocol_violations_end_the_flush_and_report_every_entry_once() {
    // Preempted without progress (would loop forever if trusted).
    let (got, r, m) =
        tampered(|_| Return::new(Status::Again, [0, 0, MulticallStop::Preempted as u64]));
    assert_eq!(r, Err(Error::Protocol));
    assert_eq!(got.len(), 6);
    // The model did run them all; the driver reports them from the written statuses.
    assert!(got.iter().all(|c| c.result.is_ok()));
    assert_eq!(m.state().live.len(), 7);

    // Cursor beyond count.
    let (got, r, _) = tampered(|_| Return::new(Status::Ok, [7, 7, 0]));
    assert_eq!(r, Err(Error::Protocol));
    assert_eq!(got.len(), 6);

    // An undefined status.
    let (got, r, _) = tampered(|ret| Return { rax: 42, ..ret });
    assert_eq!(r, Err(Error::Protocol));
    assert_eq!(got.len(), 6);

    // Claims all six done after running one: the entries say otherwise.
    let mut cfg = Config::new(Policy::Strict);
    cfg.preempt_after = Some(1);
    let (got, r, m) = tampered_with(cfg, |_| Return::new(Status::Ok, [6, 6, 0]));
    assert_eq!(r, Err(Error::Protocol));
    assert_eq!(got.len(), 6);
    assert!(got[0].result.is_ok());
    assert!(got[1..].iter().all(|c| c.result == Err(Error::Protocol)));
    assert_eq!(
        m.state().live.len(),
        2,
        "entry 0 and the fresh map after the flush"
    );
}

#[test]
fn rejected_multicall_fails_every_entry() {
    let (got, r, m) =
        tampered(|_| Return::new(Status::Inval, [0, 0, MulticallStop::Rejected as u64]));
    assert_eq!(r, Err(Error::Status(AbiError::Inval)));
    assert_eq!(got.len(), 6);
    assert!(got
        .iter()
        .all(|c| c.result == Err(Error::Status(AbiError::Inval))));
    // (The tamper replaced the return of a call the model had run: only the fresh map after
    // it is live besides those.)
    assert_eq!(m.state().live.len(), 7);
}
