//! `dma-capacity`: the mapping quota QUERY announces is what the guest can really hold, even
//! when another vCPU's IOVA magazines are full of ranges it freed and it makes no DMA call
//! any more (the hypervisor must reclaim them: nothing else will).
//!
//! vCPU 1 maps and unmaps [`WORKER_PAGES`] pages (its magazines now cache those IOVAs), says
//! so, and then spins without a hypercall until vCPU 0 is done. vCPU 0 then maps one page at
//! a time, at distinct guest pages, in MULTICALLs until the hypervisor answers NOMEM, checks
//! that it got exactly QUERY's `max_mappings`, and unmaps everything.

use core::sync::atomic::{AtomicU32, Ordering::SeqCst};

use moat_abi::dma::{DmaFlags, Request};
use moat_pvdma::{BatchArea, Error, GuestBuffer, Native, PvDma};

use crate::abi::BootInfo;
use crate::{println, Outcome};

const PAGE: u64 = moat_abi::dma::PAGE_SIZE;
/// Pages vCPU 1 maps and unmaps first.
const WORKER_PAGES: u64 = 2000;
/// First guest page the test maps (above the test guest's image and static data).
const BASE: u64 = 16 << 20;
/// Most mappings the test can record (vCPU 1's pages start above them).
const MAX: usize = 20_000;
/// Batch area pages.
const BATCH_PAGES: usize = 8;

#[repr(C, align(4096))]
struct Area([[u8; PAGE as usize]; BATCH_PAGES + 1]);
/// Per vCPU: one scratch page and a batch area.
static mut AREAS: [Area; 2] = [
    Area([[0; PAGE as usize]; BATCH_PAGES + 1]),
    Area([[0; PAGE as usize]; BATCH_PAGES + 1]),
];
/// vCPU 0's IOVAs, in map order.
static mut IOVAS: [u64; MAX] = [0; MAX];

/// 0: not started; 1: vCPU 1 cached its IOVAs; 2: vCPU 0 done; 3: vCPU 1 failed.
static STAGE: AtomicU32 = AtomicU32::new(0);

fn driver(vcpu: usize) -> Result<PvDma<Native>, &'static str> {
    let base = core::ptr::addr_of!(AREAS) as u64 + vcpu as u64 * (BATCH_PAGES as u64 + 1) * PAGE;
    // SAFETY: a Moat guest at CPL 0 with all memory identity mapped; each vCPU uses its own
    // scratch page and batch area.
    let hv = unsafe { Native::new() };
    let mut d = PvDma::probe(
        hv,
        GuestBuffer {
            gpa: base,
            len: PAGE,
        },
    )
    .map_err(|_| "PV DMA discovery failed")?;
    d.attach_batch(BatchArea {
        gpa: base + PAGE,
        pages: BATCH_PAGES as u64,
    })
    .map_err(|_| "BATCH_REGISTER failed")?;
    Ok(d)
}

/// Maps `[first, first + n)` pages from `BASE + first * PAGE` in MULTICALLs; stores each
/// IOVA through `put`. Returns (mapped, NOMEM answers, other errors).
fn map_pages(
    d: &mut PvDma<Native>,
    first: u64,
    n: u64,
    put: &mut dyn FnMut(u64, u64),
) -> Result<(u64, u64, u64), &'static str> {
    let (mut ok, mut nomem, mut other) = (0, 0, 0);
    let mut next = first;
    while next < first + n {
        let chunk = (first + n - next).min(u64::from(d.capacity()));
        for i in 0..chunk {
            d.queue_map(
                BASE + (next + i) * PAGE,
                PAGE,
                DmaFlags::READ_WRITE,
                &mut |_| {},
            )
            .map_err(|_| "queue MAP failed")?;
        }
        d.flush(&mut |c| {
            if let Request::Map { gpa, .. } = c.request {
                match c.result {
                    Ok(iova) => {
                        ok += 1;
                        put((gpa - BASE) / PAGE, iova);
                    }
                    Err(Error::Status(moat_abi::Error::Nomem)) => nomem += 1,
                    Err(_) => other += 1,
                }
            }
        })
        .map_err(|_| "MULTICALL (maps) failed")?;
        next += chunk;
        if nomem > 0 {
            break;
        }
    }
    Ok((ok, nomem, other))
}

/// Unmaps `iovas` in MULTICALLs; returns how many failed.
fn unmap_all(d: &mut PvDma<Native>, iovas: &[u64]) -> Result<u64, &'static str> {
    let mut failed = 0;
    for chunk in iovas.chunks(d.capacity() as usize) {
        for &iova in chunk {
            d.queue_unmap(iova, PAGE, &mut |_| {})
                .map_err(|_| "queue UNMAP failed")?;
        }
        d.flush(&mut |c| {
            if c.result.is_err() {
                failed += 1;
            }
        })
        .map_err(|_| "MULTICALL (unmaps) failed")?;
    }
    Ok(failed)
}

/// vCPU 1's part.
pub fn worker() {
    let r = (|| -> Result<(), &'static str> {
        let mut d = driver(1)?;
        let mut iovas = [0u64; WORKER_PAGES as usize];
        // vCPU 1 uses the pages above vCPU 0's.
        let first = MAX as u64;
        let (ok, _, _) = map_pages(&mut d, first, WORKER_PAGES, &mut |i, iova| {
            if let Some(s) = iovas.get_mut((i - first) as usize) {
                *s = iova;
            }
        })?;
        if ok != WORKER_PAGES {
            return Err("vCPU 1 could not map its pages");
        }
        if unmap_all(&mut d, &iovas)? != 0 {
            return Err("vCPU 1 could not unmap its pages");
        }
        Ok(())
    })();
    match r {
        Ok(()) => {
            println!("dma-capacity: vCPU 1 mapped and unmapped {WORKER_PAGES} pages; now idle");
            STAGE.store(1, SeqCst);
        }
        Err(e) => {
            println!("dma-capacity: vCPU 1 FAILED: {e}");
            STAGE.store(3, SeqCst);
        }
    }
    // No hypercall from here on: only the hypervisor can reclaim this vCPU's cached IOVAs.
    while STAGE.load(SeqCst) != 2 {
        core::hint::spin_loop();
    }
}

/// vCPU 0's part.
pub fn run(boot: &BootInfo) -> Outcome {
    if boot.vcpus.get() < 2 {
        return Err("needs 2 vCPUs");
    }
    let need = BASE + (MAX as u64 + WORKER_PAGES) * PAGE;
    if boot.mem_size.get() < need {
        println!("dma-capacity: needs {} MiB of guest memory", need >> 20);
        return Err("guest memory too small");
    }
    let t0 = crate::abi::rdtsc();
    loop {
        match STAGE.load(SeqCst) {
            1 => break,
            3 => return Err("vCPU 1 failed"),
            _ if crate::abi::rdtsc() - t0 > 120_000 * boot.tsc_khz.get() => {
                return Err("vCPU 1 did not finish")
            }
            _ => core::hint::spin_loop(),
        }
    }
    let r = (|| -> Outcome {
        let mut d = driver(0)?;
        let promised = u64::from(d.info().max_mappings);
        if promised as usize >= MAX {
            println!("dma-capacity: QUERY promises {promised} mappings, the test holds {MAX}");
            return Err("quota larger than the test can check");
        }
        // SAFETY: only vCPU 0 touches IOVAS, and only in this test.
        let iovas = unsafe { &mut *core::ptr::addr_of_mut!(IOVAS) };
        // One more than promised: the last must be NOMEM.
        let (ok, nomem, other) = map_pages(&mut d, 0, promised + 1, &mut |i, iova| {
            if let Some(s) = iovas.get_mut(i as usize) {
                *s = iova;
            }
        })?;
        // No IOVA twice among the live mappings.
        let live = &mut iovas[..ok as usize];
        live.sort_unstable();
        let dups = live.windows(2).filter(|w| w[0] == w[1]).count();
        let failed = unmap_all(&mut d, live)?;
        let s = d.stats(false).map_err(|_| "STATS failed")?;
        println!(
            "dma-capacity: QUERY max_mappings {promised}; mapped {ok} before NOMEM ({nomem} NOMEM, {other} other error(s)), {dups} IOVA(s) twice; unmapped with {failed} failure(s); live mappings after: {}",
            s.live_mappings
        );
        if ok != promised || nomem != 1 || other != 0 {
            return Err("the guest could not hold the mappings QUERY promised");
        }
        if dups != 0 || failed != 0 || s.live_mappings != 0 {
            return Err("IOVA handed out twice or mappings left");
        }
        Ok(())
    })();
    STAGE.store(2, SeqCst);
    r
}
