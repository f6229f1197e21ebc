//! Arbitrary call sequences from several vCPUs against `moat-dma` and a model IOMMU; see
//! the crate documentation (`src/lib.rs`) for the model and the invariants checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    moat_dma_fuzz::run(data);
});
