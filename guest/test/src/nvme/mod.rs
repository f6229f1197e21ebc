//! NVMe tests: the guest drives its assigned NVMe controller with `moat-nvme`, one I/O queue
//! pair per vCPU, every buffer mapped through `moat-pvdma` under the guest's policy.
//!
//! vCPU 0 brings the controller up, creates a queue pair per vCPU and posts a job to the
//! other vCPUs (which run [`worker`]); each vCPU runs the job on its own queue with its own
//! PV DMA driver; vCPU 0 collects the results, deletes the queues, disables the controller
//! and checks that no mapping is left.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};

use moat_nvme::{
    AdminMemory, Controller, IoQueue, Mapper, Native, QueueMemory, ADMIN_PAGES, QUEUE_PAGES,
};
use moat_pvdma::{BatchArea, GuestBuffer, PvDma};

use crate::abi::BootInfo;
use crate::{pci, println, Outcome};

mod bench;
mod faults;
mod pattern;

pub use bench::{bench, set_burst};
pub use faults::{errors, faults};
pub(crate) use pattern::complete;
pub use pattern::pattern;

const PAGE: u64 = 4096;
/// vCPUs the NVMe tests use at most.
pub const MAX_VCPUS: usize = 4;

#[repr(C, align(4096))]
struct Pages<const N: usize>([[u8; 4096]; N]);

static mut ADMIN: Pages<{ ADMIN_PAGES as usize }> = Pages([[0; 4096]; ADMIN_PAGES as usize]);
/// I/O queue memory (each vCPU's QUEUE_PAGES from here; the driver zeroes them): guest RAM
/// past the image, like the data buffers, so the image stays below 2 MiB (`dma-bad` needs
/// that).
const QUEUE_BASE: u64 = 12 << 20;
const _: () = assert!(QUEUE_BASE + QUEUE_PAGES * PAGE * MAX_VCPUS as u64 <= DATA_BASE);
/// Per vCPU: a scratch page and a 2-page batch area.
static mut PVDMA: Pages<{ 3 * MAX_VCPUS }> = Pages([[0; 4096]; 3 * MAX_VCPUS]);

/// Data buffers: vCPU v owns [DATA_BASE + v * DATA_PER_VCPU, + DATA_PER_VCPU).
pub(crate) const DATA_BASE: u64 = 16 << 20;
/// Bytes of data buffers per vCPU (64 buffers of 64 KiB: 32 commands outstanding and 32
/// mapped ahead by the benchmark's pipelined cycles).
pub(crate) const DATA_PER_VCPU: u64 = 4 << 20;

fn pages_gpa<const N: usize>(p: *const Pages<N>, i: usize) -> u64 {
    p as u64 + (i as u64) * PAGE
}

/// vCPU `v`'s data area.
pub(crate) fn data(v: usize) -> u64 {
    DATA_BASE + v as u64 * DATA_PER_VCPU
}

/// The bytes at `gpa` (identity mapped).
pub(crate) fn bytes(gpa: u64, len: u64) -> &'static mut [u8] {
    // SAFETY: `gpa` is inside this vCPU's data area or a test page, identity-mapped RAM of
    // this guest that only this vCPU (and its device, while a command runs) uses.
    unsafe { core::slice::from_raw_parts_mut(gpa as *mut u8, len as usize) }
}

/// The assigned NVMe controller: its BAR0 with memory decode and bus mastering on.
pub(crate) fn find() -> Result<(u64, u16), &'static str> {
    let mut found = None;
    pci::scan(|f| {
        if pci::read32(f.bus, f.dev, f.func, 0x08) >> 8 == 0x01_08_02 && found.is_none() {
            found = Some(f);
        }
    });
    let f = found.ok_or("no NVMe controller visible")?;
    let cmd = pci::read32(f.bus, f.dev, f.func, 0x04) as u16;
    pci::write16(f.bus, f.dev, f.func, 0x04, cmd | 0x6);
    let lo = pci::read32(f.bus, f.dev, f.func, 0x10);
    let mut bar = u64::from(lo & !0xf);
    if lo & 0x6 == 0x4 {
        bar |= u64::from(pci::read32(f.bus, f.dev, f.func, 0x14)) << 32;
    }
    let sid = u16::from(f.bus) << 8 | u16::from(f.dev) << 3 | u16::from(f.func);
    crate::paging::map_mmio(bar, 16 << 10)?;
    Ok((bar, sid))
}

/// One vCPU's PV DMA driver and mapper (its own scratch page and batch area).
pub(crate) fn mapper(v: usize) -> Result<Mapper<moat_pvdma::Native>, &'static str> {
    let base = core::ptr::addr_of!(PVDMA);
    // SAFETY: a Moat guest at CPL 0 with all memory identity mapped; vCPU v's pages are used
    // only by its driver.
    let hv = unsafe { moat_pvdma::Native::new() };
    let pv = PvDma::probe(
        hv,
        GuestBuffer {
            gpa: pages_gpa(base, 3 * v),
            len: PAGE,
        },
    )
    .map_err(|_| "PV DMA discovery failed")?;
    Mapper::new(
        pv,
        Some(BatchArea {
            gpa: pages_gpa(base, 3 * v + 1),
            pages: 2,
        }),
    )
    .map_err(|e| {
        println!("nvme: mapper: {e}");
        "the NVMe mapper could not be set up"
    })
}

/// Gives a mapper's batch area back (so a later test can register it again).
pub(crate) fn release(m: Mapper<moat_pvdma::Native>) {
    let mut pv = m.into_inner();
    if pv.capacity() != 0 {
        let _ = pv.detach_batch();
    }
}

/// A queue handed between vCPUs through [`SLOTS`].
struct Slot(UnsafeCell<Option<IoQueue>>);
// SAFETY: a slot is written by vCPU 0 before it posts the job (SeqCst store of JOB) and read
// by vCPU v only after it saw the job; vCPU v writes it back before it stores DONE, which
// vCPU 0 reads before it takes the queue again. Never two vCPUs at once.
unsafe impl Sync for Slot {}
static SLOTS: [Slot; MAX_VCPUS] = [const { Slot(UnsafeCell::new(None)) }; MAX_VCPUS];

/// Job posted to vCPU v (0: none; [`QUIT`]: stop).
static JOB: [AtomicU32; MAX_VCPUS] = [const { AtomicU32::new(0) }; MAX_VCPUS];
/// A job's parameter.
static ARG: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];
/// Result of vCPU v's last job: 0 running, 1 ok, 2 failed.
static DONE: [AtomicU32; MAX_VCPUS] = [const { AtomicU32::new(0) }; MAX_VCPUS];
/// Numbers a job reports: 0-1 and 4-5 the job's own, 2-3 its map and unmap hypercalls.
pub(crate) const OUTS: usize = 6;
/// A job's numeric result (operations done, cycles).
static OUT: [[AtomicU64; OUTS]; MAX_VCPUS] =
    [const { [const { AtomicU64::new(0) }; OUTS] }; MAX_VCPUS];
/// Start barrier of a timed job.
static GO: AtomicU32 = AtomicU32::new(0);
const QUIT: u32 = u32::MAX;

/// What a job runs with on vCPU `v`: the controller's registers, the vCPU's mapper and its
/// queue pair.
pub(crate) struct Worker<'a> {
    pub v: usize,
    pub p: &'a mut Native,
    pub m: &'a mut Mapper<moat_pvdma::Native>,
    pub q: &'a mut IoQueue,
}

/// A job: what each vCPU runs on its queue, given the job's parameter; fills `out`.
pub(crate) type Job = fn(w: Worker<'_>, arg: u64, out: &mut [u64; OUTS]) -> Outcome;

pub(crate) const JOBS: [Job; 3] = [pattern::job, bench::job, pattern::pipelined_job];

/// The NVMe worker on vCPUs other than 0: runs posted jobs until told to stop.
pub fn worker(v: usize, info: &BootInfo) {
    if v >= MAX_VCPUS {
        return;
    }
    let t0 = crate::abi::rdtsc();
    loop {
        let job = JOB[v].load(SeqCst);
        if job == QUIT {
            return;
        }
        if job == 0 {
            if crate::abi::rdtsc() - t0 > 600_000 * info.tsc_khz.get() {
                return;
            }
            core::hint::spin_loop();
            continue;
        }
        let r = run_job(v, info, job);
        if let Err(why) = r {
            println!("vcpu {v}: nvme job {job} FAILED: {why}");
        }
        JOB[v].store(0, SeqCst);
        DONE[v].store(if r.is_ok() { 1 } else { 2 }, SeqCst);
    }
}

fn run_job(v: usize, info: &BootInfo, job: u32) -> Outcome {
    let (bar, _) = find_quiet()?;
    // SAFETY: the BAR is identity-mapped uncached (mapped by vCPU 0's `find`); data
    // buffers and queue memory are identity-mapped RAM this vCPU owns for the job.
    let mut p = unsafe { Native::new(bar, info.tsc_khz.get()) };
    let mut m = mapper(v)?;
    // SAFETY: see `Slot`.
    let mut q = unsafe { (*SLOTS[v].0.get()).take() }.ok_or("no queue for this vCPU")?;
    let mut out = [0u64; OUTS];
    let f = JOBS[(job - 1) as usize];
    let s0 = m.stats();
    let w = Worker {
        v,
        p: &mut p,
        m: &mut m,
        q: &mut q,
    };
    let r = f(w, ARG[v].load(SeqCst), &mut out);
    out[2] = m.stats().map_calls - s0.map_calls;
    out[3] = m.stats().unmap_calls - s0.unmap_calls;
    for (o, x) in OUT[v].iter().zip(out) {
        o.store(x, SeqCst);
    }
    // SAFETY: see `Slot`.
    unsafe { *SLOTS[v].0.get() = Some(q) };
    release(m);
    r
}

/// BAR0 of the controller without touching the command register (for workers).
fn find_quiet() -> Result<(u64, u16), &'static str> {
    let mut found = None;
    pci::scan(|f| {
        if pci::read32(f.bus, f.dev, f.func, 0x08) >> 8 == 0x01_08_02 && found.is_none() {
            found = Some(f);
        }
    });
    let f = found.ok_or("no NVMe controller visible")?;
    let lo = pci::read32(f.bus, f.dev, f.func, 0x10);
    let mut bar = u64::from(lo & !0xf);
    if lo & 0x6 == 0x4 {
        bar |= u64::from(pci::read32(f.bus, f.dev, f.func, 0x14)) << 32;
    }
    Ok((bar, 0))
}

/// The controller brought up by vCPU 0 with a queue pair per vCPU.
pub(crate) struct Setup {
    pub p: Native,
    pub m: Mapper<moat_pvdma::Native>,
    pub ctrl: Controller,
    pub queues: [Option<IoQueue>; MAX_VCPUS],
    pub vcpus: usize,
}

/// Brings the controller up with one queue pair per vCPU (at most [`MAX_VCPUS`]), completions
/// polled.
pub(crate) fn setup(info: &BootInfo) -> Result<Setup, &'static str> {
    setup_with(info, false)
}

/// [`setup`], with each queue pair's completions raising an interrupt when `interrupts`:
/// queue `q` (vCPU `q - 1`'s) at MSI-X table entry `q` (entry 0 is the admin queue's).
pub(crate) fn setup_with(info: &BootInfo, interrupts: bool) -> Result<Setup, &'static str> {
    let vcpus = (info.vcpus.get() as usize).clamp(1, MAX_VCPUS);
    let (bar, _) = find()?;
    // SAFETY: `find` mapped the BAR uncached; the admin and queue memory are statics of this
    // guest used only by the driver.
    let mut p = unsafe { Native::new(bar, info.tsc_khz.get()) };
    let mut m = mapper(0)?;
    let ctrl = Controller::init(
        &mut p,
        &mut m,
        AdminMemory {
            gpa: pages_gpa(core::ptr::addr_of!(ADMIN), 0),
        },
        vcpus as u16,
    );
    let mut ctrl = match ctrl {
        Ok(c) => c,
        Err(e) => {
            println!("nvme: controller bring-up failed: {e}");
            release(m);
            return Err("NVMe controller bring-up failed");
        }
    };
    let id = *ctrl.identity();
    let ns = ctrl.namespace();
    println!(
        "nvme: controller {:04x} model `{}` serial `{}` version {:#x}, max transfer {} KiB, {} namespace(s); namespace 1: {} blocks of {} bytes; {} I/O queue pair(s) granted; data buffers mapped {:?}",
        id.vid,
        id.model(),
        id.serial(),
        id.version,
        id.max_transfer >> 10,
        id.namespaces,
        ns.blocks,
        ns.block_size,
        ctrl.io_queues(),
        m.mode()
    );
    let mut queues = [const { None }; MAX_VCPUS];
    for (v, q) in queues.iter_mut().enumerate().take(vcpus) {
        let mem = QueueMemory {
            gpa: QUEUE_BASE + v as u64 * QUEUE_PAGES * PAGE,
        };
        let qid = v as u16 + 1;
        match ctrl.create_io_queue(&mut p, &mut m, qid, mem, interrupts.then_some(qid)) {
            Ok(io) => *q = Some(io),
            Err(e) => {
                println!("nvme: creating I/O queue {} failed: {e}", v + 1);
                let mut s = Setup {
                    p,
                    m,
                    ctrl,
                    queues,
                    vcpus,
                };
                let _ = s.teardown();
                return Err("I/O queue creation failed");
            }
        }
    }
    Ok(Setup {
        p,
        m,
        ctrl,
        queues,
        vcpus,
    })
}

impl Setup {
    /// Runs job `job` (1-based index into [`JOBS`]) with `arg` on every vCPU at once (vCPU 0
    /// here, the others through [`worker`]); returns each vCPU's outputs (the job's two, then
    /// the hypercalls its mapper made for maps and for unmaps) and the TSC cycles from the
    /// start barrier until the last vCPU finished.
    pub(crate) fn run(
        &mut self,
        info: &BootInfo,
        job: u32,
        arg: u64,
    ) -> Result<([[u64; OUTS]; MAX_VCPUS], u64), &'static str> {
        GO.store(0, SeqCst);
        for v in 1..self.vcpus {
            // SAFETY: see `Slot`: the worker is idle (JOB is 0) and takes it after the store
            // of JOB below.
            unsafe { *SLOTS[v].0.get() = self.queues[v].take() };
            ARG[v].store(arg, SeqCst);
            DONE[v].store(0, SeqCst);
            JOB[v].store(job, SeqCst);
        }
        let q0 = self.queues[0].as_mut().ok_or("no queue 0")?;
        let mut out0 = [0u64; OUTS];
        let t0 = crate::abi::rdtsc();
        GO.store(1, SeqCst);
        let s0 = self.m.stats();
        let w = Worker {
            v: 0,
            p: &mut self.p,
            m: &mut self.m,
            q: q0,
        };
        let mine = JOBS[(job - 1) as usize](w, arg, &mut out0);
        out0[2] = self.m.stats().map_calls - s0.map_calls;
        out0[3] = self.m.stats().unmap_calls - s0.unmap_calls;
        let mut failed = mine.is_err();
        if let Err(why) = mine {
            println!("vcpu 0: nvme job {job} FAILED: {why}");
        }
        for v in 1..self.vcpus {
            let w0 = crate::abi::rdtsc();
            while DONE[v].load(SeqCst) == 0 {
                if crate::abi::rdtsc() - w0 > 300_000 * info.tsc_khz.get() {
                    return Err("a worker vCPU did not finish its NVMe job");
                }
                core::hint::spin_loop();
            }
            failed |= DONE[v].load(SeqCst) != 1;
            // SAFETY: see `Slot`: the worker stored DONE after it put the queue back.
            self.queues[v] = unsafe { (*SLOTS[v].0.get()).take() };
        }
        let cycles = crate::abi::rdtsc() - t0;
        let mut outs = [[0u64; OUTS]; MAX_VCPUS];
        outs[0] = out0;
        for v in 1..self.vcpus {
            for (o, x) in outs[v].iter_mut().zip(OUT[v].iter()) {
                *o = x.load(SeqCst);
            }
        }
        if failed {
            return Err("an NVMe job failed");
        }
        Ok((outs, cycles))
    }

    /// Deletes the queues, disables the controller, stops the workers; then checks that no
    /// mapping is left.
    pub(crate) fn teardown(&mut self) -> Outcome {
        let mut ok = true;
        for v in (0..MAX_VCPUS).rev() {
            if let Some(q) = self.queues[v].take()
                && let Err(e) = self.ctrl.release_io_queue(&mut self.p, &mut self.m, q)
            {
                println!("nvme: deleting I/O queue {} failed: {e}", v + 1);
                ok = false;
            }
        }
        ok &= self.ctrl_shutdown();
        // Deferred: the last unmaps' invalidations complete now.
        let _ = self.m.pvdma().sync_iotlb();
        // The batch area goes back, so that a later test can register it again.
        if self.m.pvdma().capacity() != 0 && self.m.pvdma().detach_batch().is_err() {
            println!("nvme: unregistering the batch area failed");
            ok = false;
        }
        let s = self.m.pvdma().stats(false).map_err(|_| "STATS failed")?;
        println!(
            "nvme: after teardown: {} maps, {} unmaps, {} invalidations, {} faults, live mappings {}, live pages {}",
            s.maps, s.unmaps, s.invalidations, s.faults, s.live_mappings, s.live_pages
        );
        if !ok {
            return Err("NVMe teardown failed");
        }
        if s.live_mappings.get() != 0 {
            return Err("mappings left after the NVMe test");
        }
        Ok(())
    }

    fn ctrl_shutdown(&mut self) -> bool {
        match self.ctrl.shutdown(&mut self.p, &mut self.m) {
            Ok(()) => true,
            Err(e) => {
                println!("nvme: shutdown failed: {e}");
                false
            }
        }
    }
}

/// Tells the worker vCPUs to stop (after the last NVMe test).
pub fn stop_workers() {
    for j in JOB.iter().skip(1) {
        j.store(QUIT, SeqCst);
    }
}
