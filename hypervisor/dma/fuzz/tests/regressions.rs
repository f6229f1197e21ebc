//! Replays every checked-in input under `regressions/dma_state/` (inputs the fuzzer once
//! crashed on, and hand-made ones) through the same harness the fuzz target runs. Runs on the
//! stable toolchain: `cd hypervisor/dma/fuzz && cargo test`.

use std::path::Path;

use moat_dma_fuzz::{encode, Addr, Len, Op, Setup, Target};

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

fn replay(name: &str, setup: Setup, ops: &[Op]) {
    let data = load(&format!("regressions/dma_state/{name}"), setup, ops);
    moat_dma_fuzz::run(&data);
}

/// The checked-in input at `path` (relative to this crate), which must be `setup` + `ops`.
fn load(path: &str, setup: Setup, ops: &[Op]) -> Vec<u8> {
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let want = encode(&setup, ops);
    if std::env::var_os("WRITE_REGRESSIONS").is_some() {
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, &want).unwrap();
    }
    let data = std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    eprintln!("{}", moat_dma_fuzz::describe(&data));
    assert!(
        data == want,
        "{} is not the input described here (rewrite it with WRITE_REGRESSIONS=1 cargo test)",
        f.display()
    );
    data
}

/// Issue 9, defect 1. Deferred policy, caching mode (`map_needs_flush`); the next flush
/// fails; MAP of 15 pages. The model IOMMU writes the entries (a racing device caches them),
/// the service's flush after the map fails. On the old code (then with `--features
/// cm-map-flush`) MAP returned BUSY and gave the IOVA back to the allocator although it still
/// translated ("IOVA 0x100000 released while its page-table entry is present"). Now the
/// harness requires BUSY with nothing visible: the entries cleared into the pending set, the
/// IOVA held (as rolled back) until the teardown's flush invalidated them.
#[test]
fn defect1_map_whose_flush_fails_releases_a_translating_iova() {
    let setup = Setup {
        policy: 0x0a,
        max_mappings: 6,
        max_mapped_pages: 0xff,
        max_table_pages: 0xff,
        max_pages_per_map: 0xff,
        deferred_entries: 0xd2,
        deferred_ns: 0x06d2,
        map_needs_flush: true,
        slack_ns: 0,
    };
    let ops = [
        Op::FailFlushes { n: 1 },
        Op::Map {
            vcpu: 0,
            gpa: Addr::Page(6),
            len: Len::Pages(255),
            access: 255,
        },
    ];
    replay("defect1-cm-map-flush-fails", setup, &ops);
}

/// Issue 9, defect 4. Deferred policy (bound 1393 ns, no slack); MAP, UNMAP (queued at
/// t = 0), MAP, BEGIN_BATCH, 30069 ns pass, the next unmap fails, TEARDOWN fails on it. On the
/// old code (then with `--features deferred-bound`) the bound was not enforced inside a batch
/// and the failed TEARDOWN returned without flushing: the queued unmap was 30069 ns old with
/// no flush owed. Now the tick inside the batch must flush it (the harness checks the bound
/// after every step, inside batches too).
#[test]
fn defect4_deferred_bound_overrun_after_a_batch() {
    let setup = Setup {
        policy: 0x66,
        max_mappings: 0x9d,
        max_mapped_pages: 0x7c,
        max_table_pages: 0x0a,
        max_pages_per_map: 0x9d,
        deferred_entries: 0x0a,
        deferred_ns: 0xff70,
        map_needs_flush: false,
        slack_ns: 0,
    };
    let ops = [
        Op::Map {
            vcpu: 0,
            gpa: Addr::Page(32),
            len: Len::Pages(157),
            access: 157,
        },
        Op::Unmap {
            vcpu: 43,
            target: Target::Live(48),
        },
        Op::Map {
            vcpu: 157,
            gpa: Addr::Page(43),
            len: Len::Pages(43),
            access: 43,
        },
        Op::BeginBatch,
        Op::Tick {
            vcpu: 117,
            ns: 30069,
        },
        Op::FailUnmap { skip: 0 },
        Op::Teardown { vcpu: 0 },
    ];
    replay("defect4-deferred-bound-after-batch", setup, &ops);
}

/// Found by this fuzz target after the issue-9 fixes (fixed since in `DmaState::teardown`):
/// Deferred policy, entry bound 1; two MAPs; the second unmap of a TEARDOWN fails. Teardown
/// returned BUSY at once with the first unmap queued and no flush attempted (1 range waited
/// with an entry bound of 1 and no flush failure owed). Now a teardown that stops half-way
/// flushes what it unmapped.
#[test]
fn failed_teardown_keeps_the_deferred_entry_bound() {
    let setup = Setup {
        policy: 2,
        max_mappings: 20,
        max_mapped_pages: 60,
        max_table_pages: 15,
        max_pages_per_map: 10,
        deferred_entries: 0,
        deferred_ns: 1000,
        map_needs_flush: false,
        slack_ns: 0,
    };
    let ops = [
        Op::Map {
            vcpu: 0,
            gpa: Addr::Page(1),
            len: Len::Pages(1),
            access: 3,
        },
        Op::Map {
            vcpu: 0,
            gpa: Addr::Page(2),
            len: Len::Pages(1),
            access: 3,
        },
        Op::FailUnmap { skip: 1 },
        Op::Teardown { vcpu: 0 },
    ];
    let data = load(
        "regressions/dma_state/teardown-unmap-fails-entry-bound",
        setup,
        &ops,
    );
    moat_dma_fuzz::run_with(&data, false);
}
