//! `dma-race`: another vCPU flips MAP entries during the MULTICALL; no double fetch.

use super::*;

static RACE_GO: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
static RACE_STOP: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
static RACE_WRITES: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
/// Odd while vCPU 0 is inside a MULTICALL over the race batch (bumped before and after).
static RACE_SEQ: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
/// Rewrites vCPU 1 made entirely inside one MULTICALL (SEQ odd and unchanged around it).
static RACE_OVERLAP: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
/// First GPA of the in-guest pages and of the out-of-guest range (set before RACE_GO).
static RACE_IN: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
static RACE_OUT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
/// Entries in the race batch.
const RACE_N: usize = 32;
/// Most MULTICALL rounds `dma-race` runs to see rewrites during a call, OK and FAULT entries
/// (it stops at the first round that saw all three). A fast MULTICALL is a short window for
/// vCPU 1's rewrites, which under a busy host's scheduling of the vCPU threads may miss
/// several rounds in a row: 6 rounds were not always enough once the hot path got faster.
const RACE_ROUNDS: usize = 24;
static mut RACE_BATCH: BatchPages = BatchPages([[0; PAGE]; 8]);

fn race_entry(i: usize) -> *mut u8 {
    (core::ptr::addr_of_mut!(RACE_BATCH) as *mut u8).wrapping_add(BATCH_HEADER_SIZE + i * 48)
}

/// vCPU 1 of `dma-race`: rewrites the `gpa` of vCPU 0's MAP entries, flipping each between
/// its own page inside the guest and a page outside the guest (both otherwise valid MAPs),
/// until told to stop, and counts the rewrites that happened entirely during one MULTICALL.
/// A hypervisor that validated one read of `gpa` and mapped another would map memory
/// outside the guest for an entry it reports OK: vCPU 0 sees that with a DMA through it.
pub fn race_scribbler() {
    use core::sync::atomic::Ordering::SeqCst;
    while !RACE_GO.load(SeqCst) {
        core::hint::spin_loop();
    }
    let (inside, outside) = (RACE_IN.load(SeqCst), RACE_OUT.load(SeqCst));
    let mut k = 0u64;
    while !RACE_STOP.load(SeqCst) {
        let i = (k as usize * 7) % RACE_N;
        let out = (k / RACE_N as u64) & 1 == 0;
        let gpa = if out { outside } else { inside } + (i * PAGE) as u64;
        let before = RACE_SEQ.load(SeqCst);
        // SAFETY: the entry is in this guest's memory; the write races with the hypervisor's
        // reads on purpose (that is the test); no Rust reference to it exists. An aligned
        // 8-byte store: the hypervisor sees the old or the new GPA, never a mix.
        unsafe { core::ptr::write_volatile(race_entry(i).add(8) as *mut u64, gpa) };
        if before & 1 == 1 && RACE_SEQ.load(SeqCst) == before {
            RACE_OVERLAP.fetch_add(1, SeqCst);
        }
        k += 1;
    }
    RACE_WRITES.store(k, SeqCst);
}

/// `dma-race` on vCPU 0: MULTICALLs over MAP entries whose GPA vCPU 1 keeps flipping between
/// a page inside the guest and one outside. Every entry reported OK must map exactly its
/// in-guest page (an edu DMA through its IOVA lands there) and be one live mapping (UNMAP of
/// its IOVA succeeds once); every other entry must be FAULT and create nothing; rewrites
/// during a MULTICALL must have happened (else the test showed nothing).
pub fn race(boot: &BootInfo) -> Outcome {
    use core::sync::atomic::Ordering::SeqCst;
    let mut d = driver()?;
    let edu = Edu::find().ok_or("no edu device")?;
    let inside = 56u64 << 20;
    if inside + (RACE_N * PAGE) as u64 > boot.mem_size.get() {
        return Err("dma-race needs 64 MiB of guest memory");
    }
    // Outside the guest, but host RAM a double fetch could really map.
    let outside = boot.mem_size.get() + (1 << 20);
    RACE_IN.store(inside, SeqCst);
    RACE_OUT.store(outside, SeqCst);
    let in_page = |i: usize| (inside + (i * PAGE) as u64) as *mut u8;
    // edu's buffer gets a known pattern once; every DMA below writes it to one IOVA.
    load_pattern(&mut d, &edu, 0x3c)?;
    let area = core::ptr::addr_of!(RACE_BATCH) as u64;
    let (st, _) = raw(Call::DmaBatchRegister, [area, 2, 0, 0, 0, 0]);
    if st != Some(Status::Ok) {
        return Err("BATCH_REGISTER failed");
    }
    let hdr = moat_abi::dma::BatchHeader::new(RACE_N as u32);
    let hdr = hdr.as_bytes();
    // SAFETY: the area is this test's; vCPU 1 only starts writing after RACE_GO.
    unsafe {
        core::ptr::copy_nonoverlapping(hdr.as_ptr(), area as *mut u8, BATCH_HEADER_SIZE);
        for i in 0..RACE_N {
            let e = Entry::map(
                inside + (i * PAGE) as u64,
                PAGE as u64,
                DmaFlags::READ_WRITE,
            );
            core::ptr::copy_nonoverlapping(e.as_bytes().as_ptr(), race_entry(i), 48);
        }
    }
    RACE_GO.store(true, SeqCst);
    let (mut ok, mut fault, mut other, mut landed, mut unmapped, mut stray) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut rounds = 0;
    let mut counted_live = true;
    while rounds < RACE_ROUNDS {
        rounds += 1;
        for i in 0..RACE_N {
            // SAFETY: the in-guest pages lie inside this guest's identity-mapped RAM, unused
            // by anything else; nothing maps them for the device at this point.
            unsafe { core::ptr::write_bytes(in_page(i), 0, PAGE) };
            // Reset the output fields; vCPU 1 only ever writes `gpa`.
            // SAFETY: as in the scribbler: plain guest memory, no reference exists.
            unsafe {
                let e = race_entry(i);
                core::ptr::write_volatile(e.add(16) as *mut u64, 0);
                core::ptr::write_volatile(e.add(32) as *mut i64, moat_abi::dma::STATUS_PENDING);
                core::ptr::write_volatile(e.add(40) as *mut u64, 0);
            }
        }
        let mut cursor = 0u64;
        let mut calls = 0;
        RACE_SEQ.fetch_add(1, SeqCst);
        while cursor < RACE_N as u64 && calls < 10 * RACE_N {
            calls += 1;
            let (_, v) = raw(Call::DmaMulticall, [cursor, 0, 0, 0, 0, 0]);
            cursor = match v[2] & 0xff {
                0 => break,
                1 => v[0] + 1,
                2 => v[0],
                _ => {
                    RACE_SEQ.fetch_add(1, SeqCst);
                    return Err("MULTICALL rejected");
                }
            };
        }
        RACE_SEQ.fetch_add(1, SeqCst);
        let mut iovas = [0u64; RACE_N];
        let mut round_ok = 0;
        for (i, iova) in iovas.iter_mut().enumerate() {
            let mut b = [0u8; 48];
            // SAFETY: the output fields are only written by the hypervisor, which is done
            // with this batch; plain guest memory.
            unsafe { core::ptr::copy_nonoverlapping(race_entry(i), b.as_mut_ptr(), 48) };
            let e: Entry = moat_abi::zerocopy::transmute!(b);
            let (e_iova, e_done) = (e.iova.get(), e.done.get());
            match e.outcome_status() {
                Some(Status::Ok) if e_iova != 0 && e_done == PAGE as u64 => {
                    ok += 1;
                    round_ok += 1;
                    *iova = e_iova;
                }
                Some(Status::Fault) if e_iova == 0 && e_done == 0 => fault += 1,
                _ => other += 1,
            }
        }
        let live = d.stats(false).map_err(|_| "STATS failed")?.live_mappings;
        counted_live &= live == round_ok;
        for (i, &iova) in iovas.iter().enumerate() {
            if iova == 0 {
                continue;
            }
            if !edu.dma(iova, true) {
                return Err("edu DMA did not finish");
            }
            // SAFETY: as above; the device wrote it and is done.
            let page = unsafe { core::slice::from_raw_parts(in_page(i), LEN as usize) };
            if page.iter().enumerate().all(|(k, &b)| b == pattern(k, 0x3c)) {
                landed += 1;
            }
        }
        for (i, &iova) in iovas.iter().enumerate() {
            if iova != 0 {
                if d.unmap(iova, PAGE as u64).is_ok() {
                    unmapped += 1;
                }
            } else {
                // SAFETY: as above.
                let page = unsafe { core::slice::from_raw_parts(in_page(i), PAGE) };
                if page.iter().any(|&b| b != 0) {
                    stray += 1;
                }
            }
        }
        // Enough once rewrites happened during a call and both outcomes were seen.
        if ok > 0 && fault > 0 && RACE_OVERLAP.load(SeqCst) > 0 {
            break;
        }
    }
    RACE_STOP.store(true, SeqCst);
    let t0 = crate::abi::rdtsc();
    while RACE_WRITES.load(SeqCst) == 0 && crate::abi::rdtsc() - t0 < 10_000 * boot.tsc_khz.get() {
        core::hint::spin_loop();
    }
    let s = d.stats(false).map_err(|_| "STATS failed")?;
    let overlap = RACE_OVERLAP.load(SeqCst);
    println!(
        "dma-race: {rounds} round(s) of {RACE_N} MAP entries while vCPU 1 flipped their GPA inside/outside the guest: {} rewrites, {overlap} during a MULTICALL; {ok} OK (DMA through the IOVA reached the entry's own page: {landed}, unmapped once: {unmapped}, live mappings matched: {counted_live}), {fault} FAULT (their pages untouched: {}), {other} other; live mappings after: {}",
        RACE_WRITES.load(SeqCst),
        fault - stray.min(fault),
        s.live_mappings
    );
    let _ = raw(Call::DmaBatchRegister, [0, 0, 0, 0, 0, 0]);
    if overlap == 0 {
        return Err("no rewrite happened during a MULTICALL: the race was not exercised");
    }
    if ok == 0 || fault == 0 {
        return Err("the race produced no OK or no FAULT entry");
    }
    if ok + fault != (rounds * RACE_N) as u64
        || other != 0
        || landed != ok
        || unmapped != ok
        || stray != 0
        || !counted_live
        || s.live_mappings != 0
    {
        return Err("the hypervisor acted on entries inconsistently with what it reported");
    }
    Ok(())
}
