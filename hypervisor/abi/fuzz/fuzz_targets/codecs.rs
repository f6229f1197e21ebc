//! Feeds arbitrary bytes to every other codec of the ABI: QUERY's header and reserved regions,
//! the STATS block, the fault ring header and records, the boot info block, the MULTICALL
//! return registers, status and call numbers, and the capacity helpers. Decoding must never
//! panic, every fixed-size block must round-trip byte for byte, and what a decoder accepts
//! must satisfy the rules the ABI states for it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_abi::boot::{BootInfo, BOOT_INFO_SIZE};
use moat_abi::dma::{
    batch_capacity, fault_ring_capacity, Direction, Entry, EntryOutcome, FaultRecord,
    FaultRingHeader, MulticallReturn, MulticallStop, QueryHeader, RegionKind, ReservedRegion,
    Stats, BATCH_HEADER_SIZE, ENTRY_SIZE, FAULT_RECORD_SIZE, FAULT_RING_HEADER_SIZE,
    MAX_BATCH_PAGES, MAX_FAULT_RING_PAGES, MULTICALL_UNSYNCED, PAGE_SIZE, QUERY_HEADER_SIZE,
    REGION_SIZE, STATS_SIZE,
};
use moat_abi::{Call, FromBytes, IntoBytes, Return, Status};

/// `N` bytes from `data` at `at`, zero-padded past its end.
fn bytes<const N: usize>(data: &[u8], at: usize) -> [u8; N] {
    let mut b = [0u8; N];
    for (i, x) in b.iter_mut().enumerate() {
        *x = data.get(at.wrapping_add(i)).copied().unwrap_or(0);
    }
    b
}

fn u64_at(data: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes(data, at))
}

fuzz_target!(|data: &[u8]| {
    // QUERY: the header round-trips, its limits and policy decode, the size helpers agree.
    let qb: [u8; QUERY_HEADER_SIZE] = bytes(data, 0);
    let q = QueryHeader::read_from_bytes(&qb).unwrap();
    assert_eq!(q.as_bytes(), qb);
    let _ = (q.policy(), q.features(), q.limits().iova_space());
    let full = QueryHeader::full_size(q.nr_regions.get());
    assert_eq!(
        QueryHeader::regions_fitting(full),
        u64::from(q.nr_regions.get()),
        "a buffer of full_size holds every region"
    );
    let len = u64_at(data, 8);
    let fit = u128::from(QueryHeader::regions_fitting(len));
    if len >= QUERY_HEADER_SIZE as u64 {
        let (hdr, region, len) = (
            QUERY_HEADER_SIZE as u128,
            REGION_SIZE as u128,
            u128::from(len),
        );
        assert!(hdr + fit * region <= len);
        assert!(hdr + (fit + 1) * region > len);
    } else {
        assert_eq!(fit, 0);
    }

    // Reserved regions: round-trip, kind decode, `intersects` is symmetric and exact.
    let r1b: [u8; REGION_SIZE] = bytes(data, 16);
    let r1 = ReservedRegion::read_from_bytes(&r1b).unwrap();
    let r2 = ReservedRegion::read_from_bytes(&bytes::<REGION_SIZE>(data, 40)).unwrap();
    assert_eq!(r1.as_bytes(), r1b);
    let _ = RegionKind::from_raw(r1.kind.get());
    let as_region = |s: u64, l: u64| ReservedRegion {
        start: s.into(),
        length: l.into(),
        ..ReservedRegion::default()
    };
    let (s1, l1, s2, l2) = (
        r1.start.get(),
        r1.length.get(),
        r2.start.get(),
        r2.length.get(),
    );
    assert_eq!(
        r1.intersects(s2, l2),
        r2.intersects(s1, l1),
        "intersects is symmetric"
    );
    if r1.intersects(s2, l2) {
        // Some byte lies in both (saturating ends): the later start is below both ends.
        let s = s1.max(s2);
        assert!(s < s1.saturating_add(l1) && s < s2.saturating_add(l2));
        assert!(as_region(s, 1).intersects(s1, l1));
    }

    // STATS: round-trip through the bytes and through the counter array.
    let sb: [u8; STATS_SIZE] = bytes(data, 0);
    let s = Stats::read_from_bytes(&sb).unwrap();
    assert_eq!(s.as_bytes(), sb);
    let again = Stats {
        size: s.size,
        reserved: s.reserved,
        ..Stats::from_counters(s.counters())
    };
    assert_eq!(again, s);

    // Fault ring: header round-trip, `pending` within capacity, slots inside the area.
    let fb: [u8; FAULT_RING_HEADER_SIZE] = bytes(data, 0);
    let f = FaultRingHeader::read_from_bytes(&fb).unwrap();
    assert_eq!(f.as_bytes(), fb);
    if let Some(n) = f.pending() {
        assert!(n <= f.capacity.get());
    }
    let pages = u64_at(data, 24) % (MAX_FAULT_RING_PAGES + 4);
    let cap = fault_ring_capacity(pages);
    if pages == 0 {
        assert_eq!(cap, 0);
        assert_eq!(FaultRingHeader::record_offset(cap, f.producer.get()), None);
    } else {
        let area = pages.min(MAX_FAULT_RING_PAGES) * PAGE_SIZE;
        let off = FaultRingHeader::record_offset(cap, f.producer.get()).expect("a slot");
        assert!(off >= FAULT_RING_HEADER_SIZE);
        assert!(
            (off + FAULT_RECORD_SIZE) as u64 <= area,
            "slot {off} outside {area}"
        );
        assert!(
            FAULT_RING_HEADER_SIZE as u64 + (u64::from(cap) + 1) * FAULT_RECORD_SIZE as u64 > area
        );
    }
    let rb: [u8; FAULT_RECORD_SIZE] = bytes(data, 32);
    let rec = FaultRecord::read_from_bytes(&rb).unwrap();
    assert_eq!(rec.as_bytes(), rb);
    if let Some(d) = rec.direction() {
        assert_eq!(Direction::from_raw(rec.direction), Some(d));
    }

    // Batch capacity: the entries fit the area and the limit.
    let bpages = u64_at(data, 40) % (MAX_BATCH_PAGES + 4);
    let max_batch = u64_at(data, 48) as u32;
    let bcap = batch_capacity(bpages, max_batch);
    assert!(bcap <= max_batch);
    if bpages == 0 {
        assert_eq!(bcap, 0);
    } else {
        let area = bpages.min(MAX_BATCH_PAGES) * PAGE_SIZE;
        assert!(BATCH_HEADER_SIZE as u64 + u64::from(bcap) * ENTRY_SIZE as u64 <= area);
        assert_eq!(
            Entry::offset_of_index(bcap),
            BATCH_HEADER_SIZE + bcap as usize * ENTRY_SIZE
        );
    }

    // Boot info round-trip.
    let bb: [u8; BOOT_INFO_SIZE] = bytes(data, 0);
    assert_eq!(BootInfo::read_from_bytes(&bb).unwrap().as_bytes(), bb);

    // Status and call numbers: whatever decodes encodes back to the same number.
    let rax = u64_at(data, 56);
    if let Some(st) = Status::from_rax(rax) {
        assert_eq!(st.raw() as u64, rax);
        assert_eq!(Status::from_raw(st.raw()), Some(st));
        let _ = (st.name(), st.result());
    }
    if let Some(c) = Call::from_number(rax) {
        assert_eq!(c.number(), rax);
        let _ = c.bit();
    }

    // MULTICALL return registers: what the guest-side decoder accepts is self-consistent
    // and encodes back to the same registers.
    let ret = Return {
        rax,
        values: [u64_at(data, 64), u64_at(data, 72), u64_at(data, 80)],
    };
    let start = u64_at(data, 88) as u32;
    let count = (u64_at(data, 88) >> 32) as u32;
    if let Some(m) = MulticallReturn::from_return(&ret, start, count) {
        assert!(m.cursor >= start && m.cursor <= count);
        assert_eq!(m.completed, m.cursor - start);
        let back = m.to_return();
        assert_eq!(back.rax, ret.rax);
        assert_eq!(back.values, ret.values);
        match m.stop {
            MulticallStop::Done => assert!(m.status == Status::Ok && m.cursor == count),
            MulticallStop::Rejected => assert!(m.completed == 0 && !m.unsynced),
            MulticallStop::Preempted => assert!(m.status == Status::Again && m.completed > 0),
            MulticallStop::EntryFailed => assert!(m.status != Status::Ok && m.cursor < count),
        }
        assert!(ret.values[2] & !(0xff | MULTICALL_UNSYNCED) == 0);
    }

    // An entry outcome written back: status and done land where the guest reads them.
    let mut e = Entry::read_from_bytes(&bytes::<ENTRY_SIZE>(data, 8)).unwrap();
    if let Some(st) = Status::from_rax(rax) {
        let o = EntryOutcome {
            status: st,
            done: u64_at(data, 16),
            iova: (data.first().copied().unwrap_or(0) & 1 == 1).then_some(u64_at(data, 24)),
        };
        let before = e;
        o.apply(&mut e);
        assert_eq!(e.outcome_status(), Some(st));
        assert_eq!(e.done.get(), o.done);
        assert_eq!(e.iova.get(), o.iova.unwrap_or(before.iova.get()));
        assert_eq!(
            (e.gpa, e.length, e.flags),
            (before.gpa, before.length, before.flags)
        );
        let b = e.as_bytes();
        assert_eq!(
            &b[Entry::STATUS_OFFSET..Entry::STATUS_OFFSET + 16],
            &o.status_done_bytes()
        );
    }
});
