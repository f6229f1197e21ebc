//! Feeds arbitrary bytes to the hypervisor-side decoders and validators: a batch header with a
//! cursor and capacity, then as many entries as the input holds, each decoded from its bytes
//! and validated against limits taken from the input, plus the DMA_MAP/DMA_UNMAP register
//! forms. Nothing may panic, and whatever is accepted must satisfy the ABI's rules.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_abi::dma::{
    decode_map_regs, decode_unmap_regs, validate_batch, validate_entry, BatchHeader, Entry, Limits,
    Request, BATCH_HEADER_SIZE, ENTRY_SIZE,
};
use moat_abi::{Args, FromBytes, IntoBytes};

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    for (i, x) in w.iter_mut().enumerate() {
        *x = b.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(w)
}

fuzz_target!(|data: &[u8]| {
    // 16 control bytes: limits, cursor, capacity.
    let ctl = u64_at(data, 0);
    let cursor = u64_at(data, 8);
    let limits = Limits {
        iova_width: 12 + (ctl as u8) % 53,
        max_batch: (ctl >> 8) as u32,
        max_map_pages: (ctl >> 40) as u32 & 0xffff,
    };
    let capacity = (ctl >> 24) as u32 & 0xffff;
    let rest = data.get(16..).unwrap_or(&[]);

    if let Some(hb) = rest.get(..BATCH_HEADER_SIZE) {
        let h = BatchHeader::read_from_bytes(hb).unwrap();
        assert_eq!(h.as_bytes(), hb);
        if let Ok(info) = validate_batch(&h, cursor, capacity, &limits) {
            assert!(info.count <= capacity && info.count <= limits.max_batch);
            assert!(u64::from(info.cursor) == cursor && info.cursor <= info.count);
        }
    }

    for chunk in rest.chunks_exact(ENTRY_SIZE) {
        let e = Entry::read_from_bytes(chunk).unwrap();
        assert_eq!(e.as_bytes(), chunk);
        if let Ok(req) = validate_entry(&e, &limits) {
            let (addr, len) = match req {
                Request::Map { gpa, length, flags } => {
                    assert!(!flags.is_empty() && e.iova.get() == 0);
                    (gpa, length)
                }
                Request::Unmap { iova, length } => {
                    assert!(e.flags.get() == 0 && e.gpa.get() == 0);
                    assert!(u128::from(iova) + u128::from(length) <= 1u128 << limits.iova_width);
                    (iova, length)
                }
            };
            assert!(e.reserved.get() == 0 && len != 0 && (addr | len) & 0xfff == 0);
            assert!(addr.checked_add(len).is_some());
        }
        let args = Args([
            e.gpa.get(),
            e.length.get(),
            u64::from(e.flags.get()) | (e.done.get() << 16),
            e.iova.get(),
            0,
            0,
        ]);
        let _ = decode_map_regs(&args, &limits);
        let _ = decode_unmap_regs(&args, &limits);
    }
});
