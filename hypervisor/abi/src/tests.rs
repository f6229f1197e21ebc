//! Unit and property tests of the ABI: numbers, layouts, round trips, validation.

use crate::dma::*;
use crate::*;
use proptest::prelude::*;
use std::vec::Vec;
use zerocopy::little_endian::U64;
use zerocopy::{FromBytes, IntoBytes};

const LIMITS: Limits = Limits {
    iova_width: 39,
    max_batch: 256,
    max_map_pages: 0,
};

// ---------------------------------------------------------------- numbers

#[test]
fn status_numbers_are_the_version_1_numbers() {
    let expected = [0, -1, -2, -3, -4, -5, -6, -7, -8, -9, -10];
    for (s, n) in Status::ALL.iter().zip(expected) {
        assert_eq!(s.raw(), n, "{s:?}");
        assert_eq!(Status::from_raw(n), Some(*s));
        assert_eq!(Status::from_rax(n as u64), Some(*s));
    }
    for n in [1, 2, -11, i64::MIN, i64::MAX, STATUS_PENDING] {
        assert_eq!(Status::from_raw(n), None, "{n}");
    }
    assert_eq!(Status::Nomem.name(), "NOMEM");
    assert_eq!(std::format!("{}", Status::Busy), "BUSY (-10)");
    assert_eq!(Status::Ok.result(), Ok(()));
    assert_eq!(Status::Fault.result(), Err(Status::Fault));
}

#[test]
fn errors_are_the_non_ok_statuses() {
    assert_eq!(Error::ALL.len() + 1, Status::ALL.len());
    for (e, s) in Error::ALL.iter().zip(&Status::ALL[1..]) {
        assert_eq!(e.status(), *s);
        assert_eq!(Status::from(*e), *s);
        assert_eq!(s.error(), Some(*e));
        assert_eq!(e.raw(), s.raw());
        assert_eq!(e.name(), s.name());
        assert_eq!(std::format!("{e:?}"), std::format!("{s:?}"));
    }
    assert_eq!(Status::Ok.error(), None);
    assert_eq!(std::format!("{}", Error::Busy), "BUSY (-10)");
}

#[test]
fn call_numbers_and_bitmap() {
    let expected = [0u64, 1, 2, 3, 16, 17, 18, 19, 20, 21, 22, 23];
    for (c, n) in Call::ALL.iter().zip(expected) {
        assert_eq!(c.number(), n);
        assert_eq!(Call::from_number(n), Some(*c));
        assert_eq!(c.bit(), 1 << n);
    }
    for n in (4..16).chain(24..300).chain([u64::MAX]) {
        assert_eq!(Call::from_number(n), None);
    }
    assert_eq!(CALLS_BASE, 0b1111);
    assert_eq!(CALLS_ALL, 0xff_000f);
    for c in Call::DMA_REQUIRED {
        assert_ne!(CALLS_ALL & c.bit(), 0);
        assert_eq!(CALLS_BASE & c.bit(), 0);
    }
}

#[test]
fn cpuid_signature_and_instruction() {
    // "Moat" little-endian.
    assert_eq!(signature_regs(), [0x7461_6f4d; 3]);
    assert!(is_moat_signature(0x7461_6f4d, 0x7461_6f4d, 0x7461_6f4d));
    assert!(!is_moat_signature(0x7461_6f4d, 0x7461_6f4d, 0));
    assert_eq!(CPUID_SIGNATURE_LEAF, 0x4000_0000);
    assert_eq!(CPUID_FEATURES_LEAF, 0x4000_0001);
    assert_eq!(CPUID_MAX_LEAF, 0x4000_0001);
    assert_eq!(Instruction::from_raw(1), Some(Instruction::Vmmcall));
    assert_eq!(Instruction::from_raw(2), Some(Instruction::Vmcall));
    assert_eq!(Instruction::from_raw(0), None);
    assert_eq!(Instruction::from_raw(3), None);
}

#[test]
fn small_enums_round_trip() {
    for p in Policy::ALL {
        assert_eq!(Policy::from_raw(p as u8), Some(p));
    }
    assert_eq!(Policy::from_raw(4), None);
    assert!(Policy::Strict.unmap_is_synchronous() && Policy::Batched.unmap_is_synchronous());
    assert!(!Policy::Deferred.unmap_is_synchronous());
    assert!(!Policy::Passthrough.unmap_is_synchronous());
    assert_eq!(Op::from_raw(0), None);
    assert_eq!(Op::from_raw(1), Some(Op::Map));
    assert_eq!(Op::from_raw(2), Some(Op::Unmap));
    assert_eq!(Op::from_raw(3), None);
    for k in [RegionKind::Reserved, RegionKind::Msi, RegionKind::Identity] {
        assert_eq!(RegionKind::from_raw(k as u32), Some(k));
    }
    assert_eq!(RegionKind::from_raw(0), None);
    for d in [Direction::Read, Direction::Write] {
        assert_eq!(Direction::from_raw(d as u8), Some(d));
    }
    assert_eq!(Direction::from_raw(0), None);
    for s in [
        MulticallStop::Done,
        MulticallStop::EntryFailed,
        MulticallStop::Preempted,
        MulticallStop::Rejected,
    ] {
        assert_eq!(MulticallStop::from_raw(s as u64), Some(s));
    }
    assert_eq!(MulticallStop::from_raw(4), None);
}

#[test]
fn flags() {
    assert_eq!(DmaFlags::from_bits(0), Some(DmaFlags::EMPTY));
    assert_eq!(DmaFlags::from_bits(3), Some(DmaFlags::READ_WRITE));
    for bit in 2..16 {
        assert_eq!(DmaFlags::from_bits(1 << bit), None);
    }
    assert!(DmaFlags::READ_WRITE.contains(DmaFlags::WRITE));
    assert!(!DmaFlags::READ.contains(DmaFlags::WRITE));
    assert_eq!(DmaFlags::READ.union(DmaFlags::WRITE), DmaFlags::READ_WRITE);
    assert_eq!(std::format!("{:?}", DmaFlags::READ), "DmaFlags(R-)");
    assert!(Features(Features::KNOWN).has(Features::STATS | Features::FAULT_RING));
    assert!(!Features(0).has(Features::STATS));
}

#[test]
fn capacities() {
    assert_eq!(batch_capacity(0, 1000), 0);
    assert_eq!(batch_capacity(1, 1000), 84);
    assert_eq!(batch_capacity(4, 1000), 340);
    assert_eq!(batch_capacity(16, 10_000), 1364);
    assert_eq!(batch_capacity(17, 10_000), 1364);
    assert_eq!(batch_capacity(16, 256), 256);
    assert_eq!(fault_ring_capacity(0), 0);
    assert_eq!(fault_ring_capacity(1), 126);
    assert_eq!(fault_ring_capacity(99), 2046);
    assert_eq!(Entry::offset_of_index(0), 64);
    assert_eq!(Entry::offset_of_index(83) + ENTRY_SIZE, 4096);
}

// ---------------------------------------------------------------- known-answer layouts

#[test]
fn entry_known_bytes() {
    let e = Entry::map(0x1122_3344_5566_7000, 0x2000, DmaFlags::READ_WRITE);
    let b = e.as_bytes();
    let mut want = [0u8; ENTRY_SIZE];
    want[0] = 1; // op MAP
    want[2] = 3; // READ | WRITE
    want[8..16].copy_from_slice(&[0x00, 0x70, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
    want[24..32].copy_from_slice(&[0, 0x20, 0, 0, 0, 0, 0, 0]);
    want[32] = 1; // STATUS_PENDING
    assert_eq!(b, want);
    let out = EntryOutcome {
        status: Status::Exist,
        done: 0x2000,
        iova: Some(0xabc_d000),
    };
    let sd = out.status_done_bytes();
    assert_eq!(sd[..8], (-4i64).to_le_bytes());
    assert_eq!(sd[8..], 0x2000u64.to_le_bytes());
    let mut e2 = e;
    out.apply(&mut e2);
    let b2 = e2.as_bytes();
    assert_eq!(
        b2[Entry::IOVA_OFFSET..Entry::IOVA_OFFSET + 8],
        0xabc_d000u64.to_le_bytes()
    );
    assert_eq!(b2[Entry::STATUS_OFFSET..], sd);
    assert_eq!(e2.outcome_status(), Some(Status::Exist));
    assert_eq!(e.outcome_status(), None);
    let mut u = Entry::unmap(0x5000, 0x1000);
    EntryOutcome {
        status: Status::Ok,
        done: 0x1000,
        iova: None,
    }
    .apply(&mut u);
    assert_eq!(u.iova.get(), 0x5000);
}

#[test]
fn headers_known_bytes() {
    let h = BatchHeader::new(7);
    let h = h.as_bytes();
    assert_eq!(&h[0..4], b"MDMA");
    assert_eq!(h[4..6], 1u16.to_le_bytes());
    assert_eq!(h[6..8], 48u16.to_le_bytes());
    assert_eq!(h[8..12], 7u32.to_le_bytes());
    assert!(h[12..].iter().all(|&b| b == 0));

    let r = FaultRingHeader::new(126);
    let r = r.as_bytes();
    assert_eq!(&r[0..4], b"MFLT");
    assert_eq!(r[6..8], 32u16.to_le_bytes());
    assert_eq!(r[8..12], 126u32.to_le_bytes());
    assert!(r[12..].iter().all(|&b| b == 0));
    assert_eq!(FaultRingHeader::record_offset(126, 0), Some(64));
    assert_eq!(FaultRingHeader::record_offset(126, 127), Some(96));
    assert_eq!(FaultRingHeader::record_offset(0, 5), None);

    let f = FaultRecord {
        iova: 0x7000.into(),
        source_id: 0x0018.into(),
        reason: 5,
        direction: Direction::Write as u8,
        reserved0: 0.into(),
        seq: 9.into(),
        reserved1: 0.into(),
    };
    let f = f.as_bytes();
    assert_eq!(f[0..8], 0x7000u64.to_le_bytes());
    assert_eq!(f[8..10], [0x18, 0]);
    assert_eq!(f[10], 5);
    assert_eq!(f[11], 2);
    assert_eq!(f[16..24], 9u64.to_le_bytes());

    let s = Stats {
        maps: 1.into(),
        pt_pages: 2.into(),
        ..Stats::from_counters([0; 18])
    };
    let s = s.as_bytes();
    assert_eq!(s[0..4], (STATS_SIZE as u32).to_le_bytes());
    assert_eq!(s[8..16], 1u64.to_le_bytes());
    assert_eq!(s[144..152], 2u64.to_le_bytes());
}

#[test]
fn query_known_bytes_and_sizes() {
    let q = QueryHeader {
        abi_version: 2.into(),
        header_size: 64.into(),
        page_sizes: ((1 << 12) | (1 << 21)).into(),
        iova_width: 39,
        policy: Policy::Batched as u8,
        reserved0: 0.into(),
        max_batch: 256.into(),
        features: (Features::STATS).into(),
        max_mappings: 65536.into(),
        max_pt_pages: 1024.into(),
        deferred_max_entries: 0.into(),
        deferred_max_us: 0.into(),
        nr_regions: 2.into(),
        regions_written: 1.into(),
        max_batch_pages: 16.into(),
        max_map_pages: 512.into(),
    };
    let b = q.as_bytes();
    assert_eq!(b[60..64], 512u32.to_le_bytes());
    assert_eq!(b[16], 39);
    assert_eq!(b[17], 2);
    assert_eq!(b[20..24], 256u32.to_le_bytes());
    assert_eq!(b[48..52], 2u32.to_le_bytes());
    assert_eq!(QueryHeader::read_from_bytes(b).unwrap(), q);
    assert_eq!(q.policy(), Some(Policy::Batched));
    assert_eq!(
        q.limits(),
        Limits {
            iova_width: 39,
            max_batch: 256,
            max_map_pages: 512
        }
    );
    assert_eq!(QueryHeader::full_size(2), 64 + 48);
    assert_eq!(QueryHeader::regions_fitting(63), 0);
    assert_eq!(QueryHeader::regions_fitting(64 + 47), 1);
    let msi = ReservedRegion {
        start: 0xfee0_0000.into(),
        length: 0x10_0000.into(),
        kind: (RegionKind::Msi as u32).into(),
        reserved: 0.into(),
    };
    assert_eq!(msi.as_bytes()[16..20], 2u32.to_le_bytes());
    assert!(msi.intersects(0xfeef_f000, 0x1000));
    assert!(msi.intersects(0xfed0_0000, 0x10_1000));
    assert!(!msi.intersects(0xfed0_0000, 0x10_0000));
    assert!(!msi.intersects(0xfef0_0000, 0x1000));
    assert!(!msi.intersects(0xfee0_0000, 0));
    assert!(msi.intersects(0xfee0_0000, u64::MAX));
}

/// Every structure, every field set to a distinct value, against its literal bytes (the bytes
/// the field-by-field codecs of ABI version 2 produced): the wire format is pinned to the byte.
#[test]
#[rustfmt::skip]
fn every_structure_known_bytes() {
    let want_batch: [u8; 64] = [
        0x4d, 0x44, 0x4d, 0x41, 0x01, 0x00, 0x30, 0x00, 0x04, 0x03, 0x02, 0x01, 0x0d, 0x0c, 0x0b, 0x0a,
        0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x27, 0x26, 0x25, 0x24, 0x23, 0x22, 0x21, 0x20,
    ];
    let want_entry: [u8; 48] = [
        0x02, 0x00, 0x02, 0x01, 0x06, 0x05, 0x04, 0x03, 0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11,
        0x28, 0x27, 0x26, 0x25, 0x24, 0x23, 0x22, 0x21, 0x38, 0x37, 0x36, 0x35, 0x34, 0x33, 0x32, 0x31,
        0xfa, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x48, 0x47, 0x46, 0x45, 0x44, 0x43, 0x42, 0x41,
    ];
    let want_query: [u8; 64] = [
        0x02, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00, 0x00, 0x10, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x27, 0x03, 0x02, 0x01, 0x06, 0x05, 0x04, 0x03, 0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11,
        0x24, 0x23, 0x22, 0x21, 0x28, 0x27, 0x26, 0x25, 0x34, 0x33, 0x32, 0x31, 0x38, 0x37, 0x36, 0x35,
        0x44, 0x43, 0x42, 0x41, 0x48, 0x47, 0x46, 0x45, 0x54, 0x53, 0x52, 0x51, 0x58, 0x57, 0x56, 0x55,
    ];
    let want_region: [u8; 24] = [
        0x00, 0x00, 0xe0, 0xfe, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x02, 0x00, 0x00, 0x00, 0x04, 0x03, 0x02, 0x01,
    ];
    let want_stats: [u8; 152] = [
        0x98, 0x00, 0x00, 0x00, 0x04, 0x03, 0x02, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03,
        0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x05,
        0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x06, 0x06, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x07,
        0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x08, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x09,
        0x09, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0a, 0x0a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0b,
        0x0b, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0c, 0x0c, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0d,
        0x0d, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0e, 0x0e, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0f,
        0x0f, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x11,
        0x11, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x12,
    ];
    let want_ring: [u8; 64] = [
        0x4d, 0x46, 0x4c, 0x54, 0x01, 0x00, 0x20, 0x00, 0x7e, 0x00, 0x00, 0x00, 0x04, 0x03, 0x02, 0x01,
        0x14, 0x13, 0x12, 0x11, 0x08, 0x07, 0x06, 0x05, 0x24, 0x23, 0x22, 0x21, 0x0c, 0x0b, 0x0a, 0x09,
        0x38, 0x37, 0x36, 0x35, 0x34, 0x33, 0x32, 0x31, 0x41, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x42, 0x43, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];
    let want_record: [u8; 32] = [
        0x00, 0xf0, 0xff, 0xff, 0xff, 0x7f, 0x00, 0x00, 0x18, 0x00, 0x05, 0x02, 0x04, 0x03, 0x02, 0x01,
        0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11, 0x28, 0x27, 0x26, 0x25, 0x24, 0x23, 0x22, 0x21,
    ];
    let want_boot: [u8; 64] = [
        0x4d, 0x4f, 0x41, 0x54, 0x42, 0x4f, 0x4f, 0x54, 0x01, 0x00, 0x00, 0x00, 0x04, 0x03, 0x02, 0x01,
        0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11, 0x28, 0x27, 0x26, 0x25, 0x24, 0x23, 0x22, 0x21,
        0x38, 0x37, 0x36, 0x35, 0x34, 0x33, 0x32, 0x31, 0x48, 0x47, 0x46, 0x45, 0x44, 0x43, 0x42, 0x41,
        0x67, 0x75, 0x65, 0x73, 0x74, 0x2d, 0x6e, 0x61, 0x6d, 0x65, 0x2d, 0x31, 0x36, 0x62, 0x79, 0x74,
    ];

    fn check<T: FromBytes + IntoBytes + zerocopy::Immutable + PartialEq + core::fmt::Debug>(t: T, want: &[u8]) {
        assert_eq!(t.as_bytes(), want, "{t:?}");
        assert_eq!(T::read_from_bytes(want).unwrap(), t);
    }
    check(BatchHeader { count: 0x0102_0304.into(), reserved0: 0x0a0b_0c0d.into(),
        reserved: [0x1011_1213_1415_1617, 0, 0, 0, 0, 0x2021_2223_2425_2627].map(U64::new), ..BatchHeader::new(0) }, &want_batch);
    check(Entry { op: 2.into(), flags: 0x0102.into(), reserved: 0x0304_0506.into(), gpa: 0x1112_1314_1516_1718.into(),
        iova: 0x2122_2324_2526_2728.into(), length: 0x3132_3334_3536_3738.into(), status: Status::Nomem.raw().into(),
        done: 0x4142_4344_4546_4748.into() }, &want_entry);
    check(QueryHeader { abi_version: 2.into(), header_size: 64.into(), page_sizes: 0x20_1000.into(), iova_width: 39,
        policy: Policy::Deferred as u8, reserved0: 0x0102.into(), max_batch: 0x0304_0506.into(),
        features: 0x1112_1314_1516_1718.into(), max_mappings: 0x2122_2324.into(), max_pt_pages: 0x2526_2728.into(),
        deferred_max_entries: 0x3132_3334.into(), deferred_max_us: 0x3536_3738.into(), nr_regions: 0x4142_4344.into(),
        regions_written: 0x4546_4748.into(), max_batch_pages: 0x5152_5354.into(), max_map_pages: 0x5556_5758.into() }, &want_query);
    check(ReservedRegion { start: 0xfee0_0000.into(), length: 0x10_0000.into(), kind: (RegionKind::Msi as u32).into(),
        reserved: 0x0102_0304.into() }, &want_region);
    let mut c = [0u64; 18];
    for (i, v) in c.iter_mut().enumerate() {
        *v = 0x0100_0000_0000_0000 * (i as u64 + 1) + i as u64;
    }
    check(Stats { reserved: 0x0102_0304.into(), ..Stats::from_counters(c) }, &want_stats);
    check(FaultRingHeader { reserved0: 0x0102_0304.into(), producer: 0x1112_1314.into(), reserved1: 0x0506_0708.into(),
        consumer: 0x2122_2324.into(), reserved2: 0x090a_0b0c.into(), dropped: 0x3132_3334_3536_3738.into(),
        reserved: [0x41, 0x42 << 56, 0x43].map(U64::new), ..FaultRingHeader::new(126) }, &want_ring);
    check(FaultRecord { iova: 0x0000_7fff_ffff_f000.into(), source_id: 0x0018.into(), reason: 5,
        direction: Direction::Write as u8, reserved0: 0x0102_0304.into(), seq: 0x1112_1314_1516_1718.into(),
        reserved1: 0x2122_2324_2526_2728.into() }, &want_record);
    check(boot::BootInfo { magic: boot::BOOT_MAGIC.into(), version: boot::BOOT_VERSION.into(), vcpus: 0x0102_0304.into(),
        mem_size: 0x1112_1314_1516_1718.into(), tsc_khz: 0x2122_2324_2526_2728.into(),
        cmdline_gpa: 0x3132_3334_3536_3738.into(), cmdline_len: 0x4142_4344_4546_4748.into(),
        name: *b"guest-name-16byt" }, &want_boot);
    // The MULTICALL write-back of an entry's status and done.
    let out = EntryOutcome { status: Status::Nomem, done: 0x4142_4344_4546_4748, iova: None };
    assert_eq!(out.status_done_bytes()[..], want_entry[Entry::STATUS_OFFSET..]);
}

// ---------------------------------------------------------------- validation: examples

fn map_e(gpa: u64, len: u64) -> Entry {
    Entry::map(gpa, len, DmaFlags::READ)
}

#[test]
fn entry_validation_examples() {
    let v = |e: Entry| validate_entry(&e, &LIMITS);
    assert_eq!(
        v(map_e(0x1000, 0x2000)),
        Ok(Request::Map {
            gpa: 0x1000,
            length: 0x2000,
            flags: DmaFlags::READ
        })
    );
    assert_eq!(
        v(Entry::unmap(0x3000, 0x1000)),
        Ok(Request::Unmap {
            iova: 0x3000,
            length: 0x1000
        })
    );
    // op
    assert_eq!(
        v(Entry {
            op: 0.into(),
            ..map_e(0, 0x1000)
        }),
        Err(Status::Inval)
    );
    assert_eq!(
        v(Entry {
            op: 3.into(),
            ..map_e(0, 0x1000)
        }),
        Err(Status::Inval)
    );
    // reserved
    assert_eq!(
        v(Entry {
            reserved: (1 << 31).into(),
            ..map_e(0, 0x1000)
        }),
        Err(Status::Inval)
    );
    // flags
    assert_eq!(
        v(Entry {
            flags: 4.into(),
            ..map_e(0, 0x1000)
        }),
        Err(Status::Inval)
    );
    assert_eq!(
        v(Entry {
            flags: 0.into(),
            ..map_e(0, 0x1000)
        }),
        Err(Status::Inval)
    );
    assert_eq!(
        v(Entry {
            flags: 1.into(),
            ..Entry::unmap(0, 0x1000)
        }),
        Err(Status::Inval)
    );
    // wrong-direction address
    assert_eq!(
        v(Entry {
            iova: 0x1000.into(),
            ..map_e(0, 0x1000)
        }),
        Err(Status::Inval)
    );
    assert_eq!(
        v(Entry {
            gpa: 0x1000.into(),
            ..Entry::unmap(0, 0x1000)
        }),
        Err(Status::Inval)
    );
    // length and alignment
    assert_eq!(v(map_e(0x1000, 0)), Err(Status::Inval));
    assert_eq!(v(map_e(0x1001, 0x1000)), Err(Status::Inval));
    assert_eq!(v(map_e(0x1000, 0x1800)), Err(Status::Inval));
    assert_eq!(v(Entry::unmap(0x800, 0x1000)), Err(Status::Inval));
    // overflow and width
    assert_eq!(v(map_e(!0xfffu64, 0x1000)), Err(Status::Range));
    assert_eq!(v(map_e(!0xfffu64, 0x2000)), Err(Status::Range));
    assert_eq!(v(map_e(0, 1 << 40)), Err(Status::Range));
    assert!(v(map_e(0, 1 << 39)).is_ok());
    assert!(
        v(map_e(1 << 50, 0x1000)).is_ok(),
        "a GPA is judged by the hypervisor"
    );
    assert!(v(Entry::unmap((1 << 39) - 0x1000, 0x1000)).is_ok());
    assert_eq!(
        v(Entry::unmap((1 << 39) - 0x1000, 0x2000)),
        Err(Status::Range)
    );
    // max_map_pages (MAP only)
    let capped = Limits {
        max_map_pages: 512,
        ..LIMITS
    };
    assert!(validate_entry(&map_e(0, 512 << 12), &capped).is_ok());
    assert_eq!(
        validate_entry(&map_e(0, 513 << 12), &capped),
        Err(Status::Range)
    );
    assert!(validate_entry(&Entry::unmap(0, 513 << 12), &capped).is_ok());
    // status and done are outputs: never looked at
    assert!(v(Entry {
        status: (-99).into(),
        done: 7.into(),
        ..map_e(0, 0x1000)
    })
    .is_ok());
    // a 64-bit IOVA width
    let wide = Limits {
        iova_width: 64,
        max_batch: 1,
        max_map_pages: 0,
    };
    assert!(validate_entry(&Entry::unmap(u64::MAX - 0x1fff, 0x1000), &wide).is_ok());
    assert_eq!(
        validate_entry(&Entry::unmap(u64::MAX - 0xfff, 0x1000), &wide),
        Err(Status::Range)
    );
}

#[test]
fn register_forms() {
    let a = |v: [u64; 3]| Args([v[0], v[1], v[2], 0, 0, 0]);
    assert_eq!(
        decode_map_regs(&a([0x1000, 0x1000, 2]), &LIMITS),
        Ok(Request::Map {
            gpa: 0x1000,
            length: 0x1000,
            flags: DmaFlags::WRITE
        })
    );
    assert_eq!(
        decode_map_regs(&a([0x1000, 0x1000, 1 << 16]), &LIMITS),
        Err(Status::Inval)
    );
    assert_eq!(
        decode_map_regs(&a([0x1000, 0x1000, 0]), &LIMITS),
        Err(Status::Inval)
    );
    assert_eq!(
        decode_map_regs(&a([0x1000, 0, 1]), &LIMITS),
        Err(Status::Inval)
    );
    assert_eq!(
        decode_unmap_regs(&a([0x2000, 0x1000, 0]), &LIMITS),
        Ok(Request::Unmap {
            iova: 0x2000,
            length: 0x1000
        })
    );
    assert_eq!(
        decode_unmap_regs(&a([0x2000, 0x1000, 1]), &LIMITS),
        Err(Status::Inval)
    );
    assert_eq!(
        decode_unmap_regs(&a([0x2000, 0x1000, 1 << 40]), &LIMITS),
        Err(Status::Inval)
    );
    // R10, R8, R9 are ignored
    let full = Args([0x1000, 0x1000, 1, 5, 6, 7]);
    assert!(decode_map_regs(&full, &LIMITS).is_ok());
    assert_eq!(Return::ok(5).values, [5, 0, 0]);
    assert_eq!(Return::err(Status::Perm).status(), Some(Status::Perm));
    assert_eq!(
        Return {
            rax: 5,
            values: [0; 3]
        }
        .status(),
        None
    );
    assert_eq!(ARG_REGS.len(), 6);
    assert_eq!(RET_REGS[0], "rdx");
}

#[test]
fn batch_validation_examples() {
    let v = |h: BatchHeader, cursor: u64, cap: u32| validate_batch(&h, cursor, cap, &LIMITS);
    assert_eq!(
        v(BatchHeader::new(5), 0, 84),
        Ok(BatchInfo {
            count: 5,
            cursor: 0
        })
    );
    assert_eq!(
        v(BatchHeader::new(5), 5, 84),
        Ok(BatchInfo {
            count: 5,
            cursor: 5
        })
    );
    assert_eq!(
        v(BatchHeader::new(0), 0, 84),
        Ok(BatchInfo {
            count: 0,
            cursor: 0
        })
    );
    assert_eq!(v(BatchHeader::new(5), 6, 84), Err(Status::Range));
    assert_eq!(v(BatchHeader::new(5), u64::MAX, 84), Err(Status::Range));
    assert_eq!(v(BatchHeader::new(85), 0, 84), Err(Status::Range));
    assert_eq!(v(BatchHeader::new(257), 0, 1000), Err(Status::Range));
    assert_eq!(
        v(
            BatchHeader {
                magic: 0.into(),
                ..BatchHeader::new(1)
            },
            0,
            84
        ),
        Err(Status::Inval)
    );
    assert_eq!(
        v(
            BatchHeader {
                version: 2.into(),
                ..BatchHeader::new(1)
            },
            0,
            84
        ),
        Err(Status::Unsupp)
    );
    assert_eq!(
        v(
            BatchHeader {
                entry_size: 32.into(),
                ..BatchHeader::new(1)
            },
            0,
            84
        ),
        Err(Status::Inval)
    );
    assert_eq!(
        v(
            BatchHeader {
                reserved0: 1.into(),
                ..BatchHeader::new(1)
            },
            0,
            84
        ),
        Err(Status::Inval)
    );
    let mut h = BatchHeader::new(1);
    h.reserved[5] = U64::new(1 << 63);
    assert_eq!(v(h, 0, 84), Err(Status::Inval));
    // order: magic before count
    assert_eq!(
        v(
            BatchHeader {
                magic: 1.into(),
                ..BatchHeader::new(9999)
            },
            0,
            84
        ),
        Err(Status::Inval)
    );
}

#[test]
fn multicall_return_consistency() {
    let ok = |status: Status, cursor: u64, completed: u64, stop: u64| Return {
        rax: status.raw() as u64,
        values: [cursor, completed, stop],
    };
    let d = |r: Return, start, count| MulticallReturn::from_return(&r, start, count);
    let done = d(ok(Status::Ok, 10, 7, 0), 3, 10).unwrap();
    assert_eq!(
        (done.cursor, done.completed, done.stop),
        (10, 7, MulticallStop::Done)
    );
    assert_eq!(done.to_return(), ok(Status::Ok, 10, 7, 0));
    assert!(
        d(ok(Status::Ok, 9, 6, 0), 3, 10).is_none(),
        "Done before count"
    );
    assert!(
        d(ok(Status::Ok, 10, 6, 0), 3, 10).is_none(),
        "completed mismatch"
    );
    assert!(d(ok(Status::Exist, 5, 2, 1), 3, 10).is_some());
    assert!(
        d(ok(Status::Again, 5, 2, 1), 3, 10).is_none(),
        "AGAIN is not an entry status"
    );
    assert!(
        d(ok(Status::Exist, 10, 7, 1), 3, 10).is_none(),
        "failed entry past count"
    );
    assert!(d(ok(Status::Again, 5, 2, 2), 3, 10).is_some());
    assert!(
        d(ok(Status::Again, 3, 0, 2), 3, 10).is_none(),
        "preempted without progress"
    );
    assert!(d(ok(Status::Nomem, 5, 2, 2), 3, 10).is_none());
    assert!(d(ok(Status::Range, 3, 0, 3), 3, 10).is_some());
    assert!(d(ok(Status::Ok, 3, 0, 3), 3, 10).is_none());
    assert!(
        d(ok(Status::Range, 2, 0, 3), 3, 10).is_none(),
        "cursor went back"
    );
    assert!(d(ok(Status::Ok, 10, 7, 4), 3, 10).is_none(), "unknown stop");
    assert!(
        d(
            Return {
                rax: 3,
                values: [10, 7, 0]
            },
            3,
            10
        )
        .is_none(),
        "unknown status"
    );
    assert!(d(ok(Status::Ok, 1 << 32, 7, 0), 3, 10).is_none());
    // R9 bit 8: unsynced.
    let u = d(ok(Status::Ok, 10, 7, 0x100), 3, 10).unwrap();
    assert!(u.unsynced);
    assert_eq!(u.to_return().values[2], MULTICALL_UNSYNCED);
    assert!(d(ok(Status::Again, 5, 2, 0x102), 3, 10).unwrap().unsynced);
    assert!(
        d(ok(Status::Inval, 3, 0, 0x103), 3, 10).is_none(),
        "rejected owes nothing"
    );
    assert!(
        d(ok(Status::Ok, 10, 7, 0x200), 3, 10).is_none(),
        "bit 9 reserved"
    );
}

// ---------------------------------------------------------------- properties

/// Decodes `b` as a `T` and encodes it again.
fn reencode<T: FromBytes + IntoBytes + zerocopy::Immutable>(b: &[u8]) -> Vec<u8> {
    T::read_from_bytes(b).unwrap().as_bytes().to_vec()
}

fn any_entry() -> impl Strategy<Value = Entry> {
    (
        any::<u16>(),
        any::<u16>(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<i64>(),
        any::<u64>(),
    )
        .prop_map(
            |(op, flags, reserved, gpa, iova, length, status, done)| Entry {
                op: op.into(),
                flags: flags.into(),
                reserved: reserved.into(),
                gpa: gpa.into(),
                iova: iova.into(),
                length: length.into(),
                status: status.into(),
                done: done.into(),
            },
        )
}

/// A valid entry: MAP or UNMAP, aligned, in range for `LIMITS`.
fn valid_entry() -> impl Strategy<Value = Entry> {
    (any::<bool>(), 1u16..=3, 0u64..(1 << 26), 1u64..(1 << 20)).prop_map(
        |(map, flags, page, pages)| {
            let addr = page << 12;
            let len = pages << 12;
            if map {
                Entry::map(addr, len, DmaFlags::from_bits(flags).unwrap())
            } else {
                Entry::unmap(addr, len)
            }
        },
    )
}

fn any_limits() -> impl Strategy<Value = Limits> {
    (
        12u8..=64,
        any::<u32>(),
        prop_oneof![Just(0u32), any::<u32>(), 1u32..1024],
    )
        .prop_map(|(iova_width, max_batch, max_map_pages)| Limits {
            iova_width,
            max_batch,
            max_map_pages,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn entry_bytes_round_trip(bytes in proptest::array::uniform32(any::<u8>()), tail in proptest::array::uniform16(any::<u8>())) {
        let mut b = [0u8; ENTRY_SIZE];
        b[..32].copy_from_slice(&bytes);
        b[32..].copy_from_slice(&tail);
        prop_assert_eq!(reencode::<Entry>(&b), b.to_vec());
    }

    #[test]
    fn entry_struct_round_trip(e in any_entry()) {
        prop_assert_eq!(Entry::read_from_bytes(e.as_bytes()).unwrap(), e);
    }

    #[test]
    fn other_structs_round_trip(w in proptest::collection::vec(any::<u64>(), 19), bytes in proptest::collection::vec(any::<u8>(), 152)) {
        let h = BatchHeader { magic: (w[0] as u32).into(), version: (w[1] as u16).into(), entry_size: ((w[1] >> 16) as u16).into(),
            count: (w[2] as u32).into(), reserved0: ((w[2] >> 32) as u32).into(), reserved: [w[3], w[4], w[5], w[6], w[7], w[8]].map(U64::new) };
        prop_assert_eq!(BatchHeader::read_from_bytes(h.as_bytes()).unwrap(), h);
        let hb: [u8; 64] = bytes[..64].try_into().unwrap();
        prop_assert_eq!(reencode::<BatchHeader>(&hb), hb.to_vec());
        prop_assert_eq!(reencode::<QueryHeader>(&hb), hb.to_vec());
        prop_assert_eq!(reencode::<FaultRingHeader>(&hb), hb.to_vec());
        let rb: [u8; REGION_SIZE] = bytes[..REGION_SIZE].try_into().unwrap();
        prop_assert_eq!(reencode::<ReservedRegion>(&rb), rb.to_vec());
        let fb: [u8; FAULT_RECORD_SIZE] = bytes[..FAULT_RECORD_SIZE].try_into().unwrap();
        prop_assert_eq!(reencode::<FaultRecord>(&fb), fb.to_vec());
        let sb: [u8; STATS_SIZE] = bytes[..STATS_SIZE].try_into().unwrap();
        prop_assert_eq!(reencode::<Stats>(&sb), sb.to_vec());
        let mut c = [0u64; 18];
        c.copy_from_slice(&w[..18]);
        let s = Stats::from_counters(c);
        prop_assert_eq!(Stats::read_from_bytes(s.as_bytes()).unwrap(), s);
        prop_assert_eq!(s.counters(), c);
        let f = FaultRecord { iova: w[0].into(), source_id: (w[1] as u16).into(), reason: w[2] as u8, direction: w[3] as u8,
            reserved0: (w[4] as u32).into(), seq: w[5].into(), reserved1: w[6].into() };
        prop_assert_eq!(FaultRecord::read_from_bytes(f.as_bytes()).unwrap(), f);
        let r = ReservedRegion { start: w[7].into(), length: w[8].into(), kind: (w[9] as u32).into(), reserved: (w[10] as u32).into() };
        prop_assert_eq!(ReservedRegion::read_from_bytes(r.as_bytes()).unwrap(), r);
        let q = QueryHeader { abi_version: (w[0] as u32).into(), header_size: (w[1] as u32).into(), page_sizes: w[2].into(),
            iova_width: w[3] as u8, policy: w[4] as u8, reserved0: (w[5] as u16).into(), max_batch: (w[6] as u32).into(),
            features: w[7].into(), max_mappings: (w[8] as u32).into(), max_pt_pages: (w[9] as u32).into(),
            deferred_max_entries: (w[10] as u32).into(), deferred_max_us: (w[11] as u32).into(), nr_regions: (w[12] as u32).into(),
            regions_written: (w[13] as u32).into(), max_batch_pages: (w[14] as u32).into(), max_map_pages: (w[15] as u32).into() };
        prop_assert_eq!(QueryHeader::read_from_bytes(q.as_bytes()).unwrap(), q);
        let fr = FaultRingHeader { magic: (w[0] as u32).into(), version: (w[1] as u16).into(), record_size: (w[2] as u16).into(),
            capacity: (w[3] as u32).into(), reserved0: (w[4] as u32).into(), producer: (w[5] as u32).into(), reserved1: (w[6] as u32).into(),
            consumer: (w[7] as u32).into(), reserved2: (w[8] as u32).into(), dropped: w[9].into(), reserved: [w[10], w[11], w[12]].map(U64::new) };
        prop_assert_eq!(FaultRingHeader::read_from_bytes(fr.as_bytes()).unwrap(), fr);
    }

    /// Never panics; whatever it accepts satisfies every ABI rule.
    #[test]
    fn validation_total_and_sound(e in any_entry(), limits in any_limits()) {
        if let Ok(req) = validate_entry(&e, &limits) {
            let (addr, len) = match req {
                Request::Map { gpa, length, flags } => {
                    prop_assert!(!flags.is_empty());
                    prop_assert!(limits.max_map_pages == 0 || length / 4096 <= u64::from(limits.max_map_pages));
                    prop_assert_eq!(e.iova.get(), 0);
                    (gpa, length)
                }
                Request::Unmap { iova, length } => {
                    prop_assert_eq!(e.flags.get(), 0);
                    prop_assert_eq!(e.gpa.get(), 0);
                    prop_assert!(u128::from(iova) + u128::from(length) <= 1u128 << limits.iova_width);
                    (iova, length)
                }
            };
            prop_assert_eq!(e.reserved.get(), 0);
            prop_assert!(len > 0 && is_page_aligned(len) && is_page_aligned(addr));
            prop_assert!(addr.checked_add(len).is_some());
            prop_assert!(u128::from(len) <= 1u128 << limits.iova_width);
            // The request re-encodes to the same input fields.
            let back = req.to_entry();
            prop_assert_eq!((back.op, back.flags, back.gpa, back.iova, back.length), (e.op, e.flags, e.gpa, e.iova, e.length));
        }
    }

    #[test]
    fn valid_entries_accepted(e in valid_entry()) {
        let r = validate_entry(&e, &LIMITS);
        prop_assert!(r.is_ok(), "{:?} -> {:?}", e, r);
        prop_assert_eq!(r.unwrap().to_entry(), Entry { status: STATUS_PENDING.into(), done: 0.into(), ..e });
    }

    #[test]
    fn any_reserved_bit_is_inval(e in valid_entry(), bit in 0u32..32) {
        let bad = Entry { reserved: (1 << bit).into(), ..e };
        prop_assert_eq!(validate_entry(&bad, &LIMITS), Err(Status::Inval));
    }

    #[test]
    fn unknown_flag_is_inval(e in valid_entry(), bit in 2u32..16) {
        let bad = Entry { flags: (e.flags.get() | 1 << bit).into(), ..e };
        prop_assert_eq!(validate_entry(&bad, &LIMITS), Err(Status::Inval));
    }

    #[test]
    fn unknown_op_is_inval(e in valid_entry(), op in any::<u16>().prop_filter("unknown", |o| *o != 1 && *o != 2)) {
        prop_assert_eq!(validate_entry(&Entry { op: op.into(), ..e }, &LIMITS), Err(Status::Inval));
    }

    #[test]
    fn zero_or_unaligned_length_is_inval(e in valid_entry(), low in 0u64..4096) {
        prop_assert_eq!(validate_entry(&Entry { length: 0.into(), ..e }, &LIMITS), Err(Status::Inval));
        if low != 0 {
            let bad = Entry { length: (e.length.get() | low).into(), ..e };
            prop_assert_eq!(validate_entry(&bad, &LIMITS), Err(Status::Inval));
            let bad = if e.op == Op::Map as u16 { Entry { gpa: (e.gpa.get() | low).into(), ..e } } else { Entry { iova: (e.iova.get() | low).into(), ..e } };
            prop_assert_eq!(validate_entry(&bad, &LIMITS), Err(Status::Inval));
        }
    }

    #[test]
    fn overflowing_length_is_range(e in valid_entry(), page in 1u64..(1 << 52)) {
        // An aligned address so high that `addr + length` wraps.
        let addr = (!0xfffu64) - ((page - 1) << 12);
        let length = (page << 12).max(e.length.get()).into();
        let bad = if e.op == Op::Map as u16 { Entry { gpa: addr.into(), length, ..e } } else { Entry { iova: addr.into(), length, ..e } };
        prop_assert_eq!(validate_entry(&bad, &Limits { iova_width: 64, max_batch: 1, max_map_pages: 0 }), Err(Status::Range));
        prop_assert_eq!(validate_entry(&bad, &LIMITS), Err(Status::Range));
    }

    #[test]
    fn huge_length_is_range(e in valid_entry(), extra in 1u64..(1 << 20)) {
        let length = ((1u64 << 39) + (extra << 12)).into();
        let bad = if e.op == Op::Map as u16 { Entry { gpa: 0.into(), length, ..e } } else { Entry { iova: 0.into(), length, ..e } };
        prop_assert_eq!(validate_entry(&bad, &LIMITS), Err(Status::Range));
    }

    #[test]
    fn batch_validation_total(bytes in proptest::collection::vec(any::<u8>(), 64), cursor in any::<u64>(), cap in any::<u32>(), limits in any_limits()) {
        let h = BatchHeader::read_from_bytes(&bytes[..]).unwrap();
        if let Ok(info) = validate_batch(&h, cursor, cap, &limits) {
            prop_assert_eq!(h.magic.get(), BATCH_MAGIC);
            prop_assert!(info.count <= cap && info.count <= limits.max_batch);
            prop_assert!(info.cursor <= info.count);
        }
    }

    #[test]
    fn batch_count_and_cursor(count in 0u32..2000, cursor in 0u64..3000, cap in 0u32..2000) {
        let r = validate_batch(&BatchHeader::new(count), cursor, cap, &LIMITS);
        let want = if count > cap || count > LIMITS.max_batch || cursor > u64::from(count) {
            Err(Status::Range)
        } else {
            Ok(BatchInfo { count, cursor: cursor as u32 })
        };
        prop_assert_eq!(r, want);
    }

    #[test]
    fn map_regs_match_entry_validation(gpa in any::<u64>(), len in any::<u64>(), flags in 0u64..0x2_0000) {
        let regs = decode_map_regs(&Args([gpa, len, flags, 0, 0, 0]), &LIMITS);
        if flags > 0xffff {
            prop_assert_eq!(regs, Err(Status::Inval));
        } else {
            let e = Entry { flags: (flags as u16).into(), ..Entry::map(gpa, len, DmaFlags::EMPTY) };
            prop_assert_eq!(regs, validate_entry(&e, &LIMITS));
        }
    }

    #[test]
    fn fault_ring_pending(cap in 1u32..5000, consumer in any::<u32>(), n in 0u32..10_000) {
        let h = FaultRingHeader { producer: consumer.wrapping_add(n).into(), consumer: consumer.into(), ..FaultRingHeader::new(cap) };
        prop_assert_eq!(h.pending(), if n <= cap { Some(n) } else { None });
    }
}

#[test]
fn all_statuses_distinct() {
    let v: Vec<i64> = Status::ALL.iter().map(|s| s.raw()).collect();
    for (i, a) in v.iter().enumerate() {
        for b in &v[i + 1..] {
            assert_ne!(a, b);
        }
    }
}
