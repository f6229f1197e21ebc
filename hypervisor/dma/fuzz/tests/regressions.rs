//! Replays every checked-in input under `regressions/dma_state/` (inputs the fuzzer once
//! crashed on, and hand-made ones) through the same harness the fuzz target runs. Runs on the
//! stable toolchain: `cd hypervisor/dma/fuzz && cargo test`.

use std::path::Path;

#[test]
fn replay_regressions() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions/dma_state");
    let mut n = 0;
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_none_or(|x| x != "md"))
        .collect();
    files.sort();
    for f in files {
        let data = std::fs::read(&f).unwrap();
        eprintln!(
            "replaying {}:\n{}",
            f.display(),
            moat_dma_fuzz::describe(&data)
        );
        moat_dma_fuzz::run(&data);
        n += 1;
    }
    assert!(n > 0, "no regression inputs in {}", dir.display());
}

fn replay(name: &str) {
    let f = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("regressions/dma_state")
        .join(name);
    let data = std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    eprintln!("{}", moat_dma_fuzz::describe(&data));
    moat_dma_fuzz::run(&data);
}

/// Issue 9, defect 1. Deferred policy; the next flush fails; MAP of 15 pages. With
/// `--features cm-map-flush` the model IOMMU maps like the kernel's VtdDomain under caching
/// mode (entries written, then a flush that fails: BUSY with the entries in place), and
/// `DmaState::map` then returns the IOVA to the allocator although it still translates: the
/// harness panics "IOVA 0x100000 released while its page-table entry is present". Fails with
/// the feature until a failed map can leave its entries under a pending invalidation (or
/// reports the map as done); passes without it.
#[test]
fn defect1_map_whose_flush_fails_releases_a_translating_iova() {
    replay("defect1-cm-map-flush-fails");
}

/// Issue 9, defect 4. Deferred policy (bound 1393 ns); MAP, UNMAP (queued at t = 0), MAP,
/// BEGIN_BATCH, 30069 ns pass (the bound is not enforced inside a batch), the next unmap
/// fails, TEARDOWN fails on it and returns BUSY without flushing: the queued unmap is now
/// 30069 ns old with no flush owed. With `--features deferred-bound` the harness panics "a
/// deferred unmap waits 30069 ns, the bound is 1393 ns". END_BATCH does not re-check the bound
/// either (by reading `DmaState::end_batch`; this input ends through TEARDOWN). Fails with the feature until the bound is re-checked
/// when a batch ends (by END_BATCH or TEARDOWN); passes without it.
#[test]
fn defect4_deferred_bound_overrun_after_a_batch() {
    replay("defect4-deferred-bound-after-batch");
}
