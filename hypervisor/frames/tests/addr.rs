//! Address, frame and range helpers.

mod common;

use common::span;
use moat_frames::{Bytes, Frame, PhysAddr, PhysRange};

#[test]
fn addresses_and_frames() {
    let a = PhysAddr::new(0x12345);
    assert_eq!(a.align_down(0x1000), PhysAddr::new(0x12000));
    assert_eq!(a.checked_align_up(0x1000), Some(PhysAddr::new(0x13000)));
    assert_eq!(PhysAddr::new(u64::MAX).checked_align_up(0x1000), None);
    assert_eq!(PhysAddr::new(u64::MAX).checked_add(1), None);
    assert!(PhysAddr::new(0x200000).is_aligned(0x200000));
    assert!(!a.is_aligned(2));
    assert_eq!(Frame::containing(a).start(), PhysAddr::new(0x12000));
    assert_eq!(Frame::from_start(a), None);
    assert_eq!(
        Frame::from_start(PhysAddr::new(0x5000)).unwrap().number(),
        5
    );
    assert_eq!(
        Frame::from_number(u64::MAX >> 12).unwrap().start(),
        PhysAddr::new(!0xfff)
    );
    assert_eq!(Frame::from_number((u64::MAX >> 12) + 1), None);
    assert_eq!(Frame::from_number(7).unwrap().range(), span(0x7000, 0x8000));
    assert_eq!(
        format!("{:?}", Frame::from_number(7).unwrap()),
        "Frame(0x7000)"
    );
}

#[test]
fn page_offsets_and_entries() {
    let a = PhysAddr::new(0x12345);
    assert_eq!(a.page_offset(), 0x345);
    assert!(!a.is_page_aligned());
    assert!(PhysAddr::new(0x7000).is_page_aligned());
    assert_eq!(PhysAddr::new(0x7fff).page_offset(), 0xfff);
    assert_eq!(PhysAddr::new(0x7000).entry(0), PhysAddr::new(0x7000));
    assert_eq!(PhysAddr::new(0x7000).entry(511), PhysAddr::new(0x7ff8));
    assert_eq!(
        PhysAddr::new(0x7000).checked_add(0x1000),
        Some(PhysAddr::new(0x8000))
    );
}

#[test]
fn ranges() {
    assert_eq!(PhysRange::new(PhysAddr::new(2), PhysAddr::new(1)), None);
    let r = span(0x1800, 0x5800);
    assert_eq!((r.len(), r.is_empty()), (0x4000, false));
    assert!(r.contains(PhysAddr::new(0x1800)) && !r.contains(PhysAddr::new(0x5800)));
    assert_eq!(r.align_inward(0x1000), span(0x2000, 0x5000));
    assert_eq!(r.whole_frames(), 2..5);
    assert!(span(0x1800, 0x2800).align_inward(0x1000).is_empty());
    assert!(PhysRange::from_start_len(PhysAddr::new(u64::MAX - 5), 100)
        .align_inward(0x1000)
        .is_empty());
    assert_eq!(
        PhysRange::from_start_len(PhysAddr::new(u64::MAX - 5), 100).end(),
        PhysAddr::new(u64::MAX)
    );
    assert_eq!(r.intersect(span(0x5000, 0x9000)), span(0x5000, 0x5800));
    assert!(r.intersect(span(0x5800, 0x9000)).is_empty());
    assert!(r.overlaps(span(0x5000, 0x9000)) && !r.overlaps(span(0x5800, 0x9000)));
    assert!(r.contains_range(span(0x2000, 0x3000)) && r.contains_range(PhysRange::EMPTY));
    assert!(!r.contains_range(span(0x1000, 0x3000)));
    assert_eq!(r.to_string(), "[0x0000000000001800-0x0000000000005800)");
}

#[test]
fn byte_counts() {
    assert_eq!(Bytes(17).to_string(), "17 B");
    assert_eq!(Bytes(4096).to_string(), "4 KiB");
    assert_eq!(Bytes(0x7ee0000).to_string(), "126.8 MiB");
    assert_eq!(Bytes(1 << 30).to_string(), "1 GiB");
    assert_eq!(Bytes(u64::MAX).to_string(), "15.9 EiB");
    assert_eq!(format!("[{:>8}]", Bytes(1536)), "[ 1.5 KiB]");
}
