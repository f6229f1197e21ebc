//! `dma-smp`: vCPUs map IOVAs and the next vCPU unmaps them: none held twice, none leaked.

use super::*;

/// `dma-smp` hand-over slots: vCPU v publishes the IOVAs it mapped in `SMP_SLOTS[v]`; vCPU
/// v+1 (mod n) unmaps them. A slot holds the IOVA from MAP's return until the UNMAP of it has
/// returned (then 0); bit 0 set means "UNMAP in progress" (the hypervisor may or may not have
/// released it yet).
static SMP_SLOTS: [[core::sync::atomic::AtomicU64; 4]; 4] =
    [const { [const { core::sync::atomic::AtomicU64::new(0) }; 4] }; 4];
/// Last vCPU that was handed each IOVA page (index (iova - 1 MiB) / 4 KiB), + 1; 0 = never.
static SMP_LAST: [core::sync::atomic::AtomicU8; 4096] =
    [const { core::sync::atomic::AtomicU8::new(0) }; 4096];
const SMP_UNMAPPING: u64 = 1;
/// The test's workers.
static SMP_CREW: Crew = Crew::new();
static SMP_DUPS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
static SMP_OPS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
/// MAPs that returned an IOVA another vCPU was handed before (reuse across vCPUs).
static SMP_CROSS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

#[repr(C, align(4096))]
struct Scratch([[u8; PAGE]; 4]);
static mut SMP_SCRATCH: Scratch = Scratch([[0; PAGE]; 4]);

/// Waits until `cond` holds, another worker failed, or about 60 s passed.
fn smp_wait(tsc_khz: u64, cond: impl FnMut() -> bool) -> Result<(), &'static str> {
    SMP_CREW.wait_until(tsc_khz, cond, "another dma-smp worker failed")
}

/// One vCPU's part of `dma-smp=N` on `vcpus` vCPUs: N rounds of mapping 4 pages and handing
/// the IOVAs to the next vCPU, which unmaps them, so every IOVA is freed on another vCPU
/// than the one it was allocated on (and the allocator's per-vCPU caches move IOVAs between
/// vCPUs). After each MAP: no slot may hold the same IOVA unless that slot's UNMAP is in
/// progress (a definite double hand-out). Returns the duplicates seen.
pub fn smp_worker(
    vcpu: usize,
    vcpus: usize,
    rounds: u64,
    tsc_khz: u64,
) -> Result<u64, &'static str> {
    let r = SMP_CREW.note(smp_work(vcpu, vcpus, rounds, tsc_khz));
    SMP_CREW.finish();
    r
}

fn smp_work(vcpu: usize, vcpus: usize, rounds: u64, tsc_khz: u64) -> Result<u64, &'static str> {
    use core::sync::atomic::Ordering::SeqCst;
    let n = vcpus.clamp(1, 4);
    let v = vcpu % n;
    let prev = (v + n - 1) % n;
    let scratch = core::ptr::addr_of!(SMP_SCRATCH) as u64 + (v * PAGE) as u64;
    // Each vCPU has its own scratch page.
    let mut d = driver_at(scratch)?;
    // 8 pages per vCPU: the 4 it maps now and the 4 still waiting to be unmapped.
    let base = (48u64 << 20) + (v as u64) * (64 << 10);
    let mut dups = 0;
    for r in 0..rounds {
        let half = (r & 1) * 4;
        for (k, slot) in SMP_SLOTS[v].iter().enumerate() {
            // The next vCPU has unmapped what this slot held last round.
            smp_wait(tsc_khz, || slot.load(SeqCst) == 0)?;
            let iova = d
                .map(
                    base + (half + k as u64) * PAGE as u64,
                    PAGE as u64,
                    DmaFlags::READ_WRITE,
                )
                .map_err(|_| "MAP failed")?;
            for slots in SMP_SLOTS.iter() {
                if slots.iter().any(|s| s.load(SeqCst) == iova) {
                    dups += 1;
                }
            }
            if let Some(last) = iova
                .checked_sub(1 << 20)
                .and_then(|o| SMP_LAST.get((o / PAGE as u64) as usize))
            {
                let before = last.swap(v as u8 + 1, SeqCst);
                if before != 0 && before != v as u8 + 1 {
                    SMP_CROSS.fetch_add(1, SeqCst);
                }
            }
            slot.store(iova, SeqCst);
        }
        // Unmap what the previous vCPU handed over this round.
        for slot in SMP_SLOTS[prev].iter() {
            let mut iova = 0;
            smp_wait(tsc_khz, || {
                iova = slot.load(SeqCst);
                iova != 0 && iova & SMP_UNMAPPING == 0
            })?;
            slot.store(iova | SMP_UNMAPPING, SeqCst);
            let r = d.unmap(iova, PAGE as u64);
            // Only now is the IOVA free: clear the slot after UNMAP returned.
            slot.store(0, SeqCst);
            r.map_err(|_| "UNMAP failed")?;
        }
        SMP_OPS.fetch_add(4, SeqCst);
    }
    SMP_DUPS.fetch_add(dups, SeqCst);
    Ok(dups)
}

/// `dma-smp=N` on vCPU 0: runs its own worker, waits for the others, reports.
pub fn smp(boot: &BootInfo, rounds: u64) -> Outcome {
    use core::sync::atomic::Ordering::SeqCst;
    let vcpus = u64::from(boot.vcpus.get()).min(4);
    let mine = smp_worker(0, vcpus as usize, rounds, boot.tsc_khz.get());
    let limit = Some((boot.tsc_khz.get(), 120_000));
    SMP_CREW.join(mine, vcpus, limit, "a dma-smp worker failed")?;
    let mut d = driver()?;
    let s = d.stats(false).map_err(|_| "STATS failed")?;
    let held = SMP_SLOTS
        .iter()
        .flatten()
        .filter(|s| s.load(SeqCst) != 0)
        .count();
    println!(
        "dma-smp: {vcpus} vCPUs, {} map+unmap operations (each IOVA unmapped by the next vCPU), IOVAs reused across vCPUs: {}, IOVA held by two vCPUs at once: {} time(s); slots still held: {held}; live mappings after: {}",
        SMP_OPS.load(SeqCst),
        SMP_CROSS.load(SeqCst),
        SMP_DUPS.load(SeqCst),
        s.live_mappings
    );
    if SMP_DUPS.load(SeqCst) != 0 || s.live_mappings != 0 || held != 0 {
        return Err("an IOVA was handed out twice or mappings were left");
    }
    if vcpus > 1 && SMP_CROSS.load(SeqCst) == 0 {
        return Err("no IOVA moved between vCPUs: the workload did not force reuse");
    }
    Ok(())
}
