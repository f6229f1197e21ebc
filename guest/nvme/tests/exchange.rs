//! [`Mapper::exchange`] against the PV DMA reference model (`guest/pvdma/tests/model`): a poll
//! cycle's unmaps and maps in one MULTICALL under `batched`, the unmaps first and
//! invalidated when the call returns; all-or-nothing maps; every unmap tried.

#[path = "../../pvdma/tests/model/mod.rs"]
mod model;

use moat_abi::dma::{Policy, Request};
use moat_nvme::{Buffer, Error, Mapper, Mode};
use moat_pvdma::{BatchArea, GuestBuffer, PvDma};
use model::{Config, Model};

const SCRATCH: GuestBuffer = GuestBuffer {
    gpa: 0x1000,
    len: 0x1000,
};
const AREA: BatchArea = BatchArea {
    gpa: 0x10000,
    pages: 2,
};
const PG: u64 = 4096;

fn mapper(cfg: Config) -> (Model, Mapper<Model>) {
    let m = Model::new(cfg);
    let pv = PvDma::probe(m.clone(), SCRATCH).expect("probe");
    let mp = Mapper::new(pv, Some(AREA)).expect("mapper");
    (m, mp)
}

/// `n` one-page buffers the device writes, from `gpa` on.
fn bufs(gpa: u64, n: u64) -> Vec<Buffer> {
    (0..n)
        .map(|k| Buffer {
            gpa: gpa + k * PG,
            len: PG,
            device_writes: true,
        })
        .collect()
}

/// Maps `b` in one burst: their IOVAs.
fn mapped(mp: &mut Mapper<Model>, b: &[Buffer]) -> Vec<u64> {
    let mut iovas = vec![0; b.len()];
    mp.map_burst(b, &mut iovas).expect("map_burst");
    iovas
}

/// The model, the mapper, the IOVAs in flight and their unmaps.
type InFlight = (Model, Mapper<Model>, Vec<u64>, Vec<(u64, u64)>);

/// A mapper in `mode` under `policy` with `n` buffers mapped (a burst in flight): their
/// IOVAs and the unmaps a cycle reaping them makes.
fn in_flight(policy: Policy, mode: Mode, n: u64) -> InFlight {
    let (m, mut mp) = mapper(Config::new(policy));
    assert_eq!(mp.mode(), mode);
    let old = mapped(&mut mp, &bufs(0x10_0000, n));
    let unmaps = old.iter().map(|&i| (i, PG)).collect();
    (m, mp, old, unmaps)
}

#[test]
fn batched_unmaps_then_maps_in_one_multicall_invalidated_on_return() {
    let (m, mut mp, old, unmaps) = in_flight(Policy::Batched, Mode::Multicall, 3);
    let next = bufs(0x20_0000, 2);
    let (calls0, log0) = {
        let st = m.state();
        (st.stats.multicalls.get(), st.log.len())
    };
    let mut iovas = [0u64; 2];
    let x = mp.exchange(&unmaps, &next, &mut iovas);
    assert_eq!((x.unmap, x.map), (Ok(()), Ok(())));
    let st = m.state();
    assert_eq!(st.stats.multicalls.get() - calls0, 1, "one MULTICALL");
    let ops: Vec<(bool, Option<Request>)> = st.log[log0..]
        .iter()
        .map(|e| (e.via_batch, e.request))
        .collect();
    assert_eq!(ops.len(), 5);
    for (k, (via_batch, req)) in ops.iter().enumerate() {
        assert!(via_batch);
        match req {
            Some(Request::Unmap { iova, .. }) => assert!(k < 3 && *iova == old[k]),
            Some(Request::Map { gpa, .. }) => assert!(k >= 3 && *gpa == next[k - 3].gpa),
            None => panic!("entry {k} unreadable"),
        }
    }
    for i in &old {
        assert!(!st.device_reaches(*i), "{i:#x} reachable after the call");
    }
    for i in &iovas {
        assert!(st.device_reaches(*i));
    }
    assert_eq!(st.live.len(), 2);
}

#[test]
fn a_failed_map_maps_nothing_and_the_unmaps_still_happen() {
    let mut cfg = Config::new(Policy::Batched);
    // MAP executions 0..=1 map the first burst; 3 is the second map of the exchange.
    cfg.nomem_at.insert(3);
    let (m, mut mp) = mapper(cfg);
    let old = mapped(&mut mp, &bufs(0x10_0000, 2));
    let unmaps: Vec<(u64, u64)> = old.iter().map(|&i| (i, PG)).collect();
    let mut iovas = [0u64; 3];
    let x = mp.exchange(&unmaps, &bufs(0x20_0000, 3), &mut iovas);
    assert_eq!(x.unmap, Ok(()));
    assert!(matches!(x.map, Err(Error::Dma(_))), "{:?}", x.map);
    assert_eq!(iovas, [u64::MAX; 3]);
    let st = m.state();
    assert!(st.live.is_empty(), "nothing stays mapped: {:?}", st.live);
    for i in &old {
        assert!(!st.device_reaches(*i));
    }
}

#[test]
fn a_failed_unmap_is_reported_and_the_rest_is_done() {
    let (m, mut mp) = mapper(Config::new(Policy::Batched));
    let old = mapped(&mut mp, &bufs(0x10_0000, 2));
    // The middle one was never mapped.
    let unmaps = [(old[0], PG), (0x7000_0000, PG), (old[1], PG)];
    let mut iovas = [0u64; 1];
    let x = mp.exchange(&unmaps, &bufs(0x20_0000, 1), &mut iovas);
    assert!(matches!(x.unmap, Err(Error::Dma(_))), "{:?}", x.unmap);
    assert_eq!(x.map, Ok(()));
    let st = m.state();
    // The failed entry ended the first MULTICALL (its unmap invalidated, its IOVA free); the
    // resumed one may hand that IOVA to the new map.
    for i in &old {
        assert!(!st.device_reaches(*i) || iovas.contains(i), "{i:#x}");
    }
    assert!(st.device_reaches(iovas[0]));
    assert_eq!(st.live.len(), 1);
}

#[test]
fn strict_unmaps_then_maps_one_call_each() {
    let (m, mut mp, old, unmaps) = in_flight(Policy::Strict, Mode::Single, 2);
    let log0 = m.state().log.len();
    let mut iovas = [0u64; 2];
    let x = mp.exchange(&unmaps, &bufs(0x20_0000, 2), &mut iovas);
    assert_eq!((x.unmap, x.map), (Ok(()), Ok(())));
    let st = m.state();
    let kinds: Vec<&str> = st.log[log0..]
        .iter()
        .map(|e| match (e.via_batch, e.request) {
            (false, Some(Request::Unmap { .. })) => "unmap",
            (false, Some(Request::Map { .. })) => "map",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["unmap", "unmap", "map", "map"]);
    for i in &old {
        // Strict may hand the IOVA out again at once: only what is live now is reachable.
        assert!(!st.device_reaches(*i) || iovas.contains(i));
    }
    assert_eq!(mp.stats().unmap_calls, 2);
}
