//! Prints what an input does: `cargo run --example describe -- FILE...` (from this folder).
fn main() {
    for f in std::env::args().skip(1) {
        let data = std::fs::read(&f).unwrap_or_else(|e| panic!("{f}: {e}"));
        println!(
            "{f} ({} bytes):\n{}",
            data.len(),
            moat_dma_fuzz::describe(&data)
        );
    }
}
