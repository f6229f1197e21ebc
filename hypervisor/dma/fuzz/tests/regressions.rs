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
