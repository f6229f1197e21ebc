//! Paravirtual DMA tests: the guest maps its own pages through `moat-pvdma` and drives the
//! assigned edu device's DMA engine through the IOVAs it gets back, then checks in its own
//! memory what the device could and could not reach.

use moat_abi::dma::{DmaFlags, Entry, Policy, Request, BATCH_HEADER_SIZE};
use moat_abi::zerocopy::little_endian::U64;
use moat_abi::{Args, Call, FromBytes, FromZeros, IntoBytes, Status};
use moat_pvdma::{BatchArea, Error, GuestBuffer, Hypervisor, Native, PvDma};

use crate::abi::BootInfo;
use crate::{pci, println, Outcome};

mod bad;
mod batch;
mod bench;
mod calls;
mod concurrent;
mod demo;
mod edu;
mod faults;
mod isolation;
mod race;
mod smp;

pub use bad::bad;
pub use batch::batch;
pub use bench::bench;
pub use bench::bench_worker;
pub use bench::select_bench_cell;
pub(crate) use bench::PhaseCycles;
pub use calls::calls;
pub use concurrent::{concurrent, concurrent_worker};
pub use demo::demo;
pub use edu::edu;
pub use faults::faults;
pub use isolation::foreign;
pub use isolation::hold;
pub use race::race;
pub use race::race_scribbler;
pub use smp::smp;
pub use smp::smp_worker;

pub(crate) const PAGE: usize = moat_abi::dma::PAGE_SIZE as usize;
/// Bytes per edu DMA (QEMU refuses a range that ends exactly at the end of edu's buffer).
pub(crate) const LEN: u64 = 2048;

#[repr(C, align(4096))]
struct Pages([[u8; PAGE]; 8]);

/// Pages the tests use: 0 scratch, 1-2 batch area, 3 source, 4 destination, 5 spare.
static mut PAGES: Pages = Pages([[0; PAGE]; 8]);

pub(crate) fn page(i: usize) -> &'static mut [u8; PAGE] {
    // SAFETY: single-threaded test code on vCPU 0; each test takes the pages it uses, and
    // the hypervisor or device only touches them while the test waits for it.
    unsafe { &mut (*core::ptr::addr_of_mut!(PAGES)).0[i] }
}

pub(crate) fn gpa(i: usize) -> u64 {
    page(i).as_ptr() as u64
}

pub(crate) fn pattern(i: usize, seed: u8) -> u8 {
    (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8
}

pub(crate) fn fill(i: usize, seed: u8) {
    for (k, b) in page(i).iter_mut().enumerate() {
        *b = pattern(k, seed);
    }
}

pub(crate) fn holds(i: usize, seed: u8) -> bool {
    page(i)[..LEN as usize]
        .iter()
        .enumerate()
        .all(|(k, &b)| b == pattern(k, seed))
}

pub(crate) fn zero(i: usize) -> bool {
    page(i)[..LEN as usize].iter().all(|&b| b == 0)
}

/// The edu device through its BAR.
pub(crate) struct Edu(u64);

impl Edu {
    /// The first edu device the guest sees, with memory decode and bus mastering on.
    pub(crate) fn find() -> Option<Edu> {
        let mut found = None;
        pci::scan(|f| {
            if f.vendor == 0x1234 && f.device == 0x11e8 && found.is_none() {
                found = Some(f);
            }
        });
        let f = found?;
        // Memory decode and bus mastering.
        let cmd = pci::read32(f.bus, f.dev, f.func, 0x04) as u16;
        pci::write16(f.bus, f.dev, f.func, 0x04, cmd | 0x6);
        Some(Edu(u64::from(
            pci::read32(f.bus, f.dev, f.func, 0x10) & !0xf,
        )))
    }

    fn reg(&self, off: u64) -> *mut u64 {
        (self.0 + off) as *mut u64
    }

    /// Starts one DMA of LEN bytes and returns at once: `to_ram` = device buffer -> `iova`,
    /// else `iova` -> device buffer. edu runs it on a timer about 100 ms later.
    pub(crate) fn start(&self, iova: u64, to_ram: bool) {
        self.program(iova, LEN, to_ram);
    }

    /// One DMA of `count` bytes between edu's buffer at 0x40000 and `addr` (any bus address,
    /// e.g. the interrupt window 0xFEEx_xxxx), waited for; false if it never finishes.
    pub(crate) fn dma_raw(&self, addr: u64, count: u64, to_ram: bool) -> bool {
        self.program(addr, count, to_ram);
        self.wait()
    }

    /// Starts one DMA of `count` bytes (at most LEN) between edu's buffer at 0x40000 and
    /// `addr`: to `addr` when `to_ram`, from it otherwise.
    fn program(&self, addr: u64, count: u64, to_ram: bool) {
        let (src, dst) = if to_ram {
            (0x40000, addr)
        } else {
            (addr, 0x40000)
        };
        // SAFETY: edu's BAR is mapped into this guest (identity, uncached); these are its
        // 64-bit DMA registers; the device-side range [0x40000, 0x40000 + LEN) is inside its
        // buffer, and `count` is clamped to LEN.
        unsafe {
            core::ptr::write_volatile(self.reg(0x80), src);
            core::ptr::write_volatile(self.reg(0x88), dst);
            core::ptr::write_volatile(self.reg(0x90), count.min(LEN));
            core::ptr::write_volatile(self.reg(0x98), 1 | if to_ram { 2 } else { 0 });
        }
    }

    /// One DMA of LEN bytes from `iova` into the device, with edu's completion interrupt
    /// (command bit 2) requested; waited for.
    pub(crate) fn dma_irq(&self, iova: u64) -> bool {
        // SAFETY: as in `start`.
        unsafe {
            core::ptr::write_volatile(self.reg(0x80), iova);
            core::ptr::write_volatile(self.reg(0x88), 0x40000);
            core::ptr::write_volatile(self.reg(0x90), LEN);
            core::ptr::write_volatile(self.reg(0x98), 1 | 4);
        }
        self.wait()
    }

    /// Writes edu's interrupt-raise register: one interrupt with status `bits`.
    pub(crate) fn raise_irq(&self, bits: u32) {
        // SAFETY: edu's 32-bit interrupt-raise register (0x60) in its mapped BAR.
        unsafe { core::ptr::write_volatile((self.0 + 0x60) as *mut u32, bits) };
    }

    /// Writes edu's interrupt-acknowledge register.
    pub(crate) fn ack_irq(&self, bits: u32) {
        // SAFETY: edu's 32-bit interrupt-acknowledge register (0x64).
        unsafe { core::ptr::write_volatile((self.0 + 0x64) as *mut u32, bits) };
    }

    /// Whether the DMA started last is still running.
    pub(crate) fn busy(&self) -> bool {
        // SAFETY: as in `start`: edu's DMA command register.
        unsafe { core::ptr::read_volatile(self.reg(0x98)) & 1 != 0 }
    }

    /// Waits for the running DMA to finish; false if it never does.
    pub(crate) fn wait(&self) -> bool {
        for _ in 0..2_000_000_000u64 {
            if !self.busy() {
                return true;
            }
            core::hint::spin_loop();
        }
        false
    }

    /// One DMA of LEN bytes, waited for: `to_ram` = device buffer -> `iova`, else `iova` ->
    /// device.
    pub(crate) fn dma(&self, iova: u64, to_ram: bool) -> bool {
        self.start(iova, to_ram);
        self.wait()
    }
}

/// The workers of a test that runs on several vCPUs at once: how many finished, and whether
/// one failed (the others then stop waiting for it).
pub(crate) struct Crew {
    done: core::sync::atomic::AtomicU64,
    failed: core::sync::atomic::AtomicBool,
}

impl Crew {
    pub(crate) const fn new() -> Self {
        Crew {
            done: core::sync::atomic::AtomicU64::new(0),
            failed: core::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Passes a worker's result on; a failure tells the others.
    pub(crate) fn note<T>(&self, r: Result<T, &'static str>) -> Result<T, &'static str> {
        if r.is_err() {
            self.failed
                .store(true, core::sync::atomic::Ordering::SeqCst);
        }
        r
    }

    /// Counts one more worker finished (ok or not).
    pub(crate) fn finish(&self) {
        self.done.fetch_add(1, core::sync::atomic::Ordering::SeqCst);
    }

    /// Workers finished so far.
    pub(crate) fn done(&self) -> u64 {
        self.done.load(core::sync::atomic::Ordering::SeqCst)
    }

    /// Whether a worker failed.
    pub(crate) fn failed(&self) -> bool {
        self.failed.load(core::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until `cond` holds: `another_failed` if a worker failed first, an error if about
    /// 60 s (at `tsc_khz`) passed.
    pub(crate) fn wait_until(
        &self,
        tsc_khz: u64,
        mut cond: impl FnMut() -> bool,
        another_failed: &'static str,
    ) -> Result<(), &'static str> {
        let t0 = crate::abi::rdtsc();
        while !cond() {
            if self.failed() {
                return Err(another_failed);
            }
            if crate::abi::rdtsc() - t0 > 60_000 * tsc_khz {
                return Err("timed out waiting for another vCPU");
            }
            core::hint::spin_loop();
        }
        Ok(())
    }

    /// vCPU 0's end of the test, its own worker (already counted) having returned `mine`:
    /// waits until `n` workers finished (for at most `limit_ms` ms at `tsc_khz`, when given),
    /// then returns its own error, else `another_failed` if another worker failed.
    pub(crate) fn join<T>(
        &self,
        mine: Result<T, &'static str>,
        n: u64,
        limit: Option<(u64, u64)>,
        another_failed: &'static str,
    ) -> Result<T, &'static str> {
        let t0 = crate::abi::rdtsc();
        while self.done() < n {
            if let Some((tsc_khz, limit_ms)) = limit
                && crate::abi::rdtsc() - t0 > limit_ms * tsc_khz
            {
                return Err("the other vCPUs did not finish");
            }
            core::hint::spin_loop();
        }
        let mine = mine?;
        if self.failed() {
            return Err(another_failed);
        }
        Ok(mine)
    }
}

/// Page 3 filled with `seed`'s pattern and mapped for the device to read, page 4 zeroed and
/// mapped for it to write: their IOVAs (source, destination).
pub(crate) fn map_source_and_destination(
    d: &mut PvDma<Native>,
    seed: u8,
) -> Result<(u64, u64), &'static str> {
    fill(3, seed);
    page(4).fill(0);
    let src = d
        .map(gpa(3), PAGE as u64, DmaFlags::READ)
        .map_err(|_| "MAP of the source failed")?;
    let dst = d
        .map(gpa(4), PAGE as u64, DmaFlags::WRITE)
        .map_err(|_| "MAP of the destination failed")?;
    Ok((src, dst))
}

pub(crate) fn driver() -> Result<PvDma<Native>, &'static str> {
    driver_at(gpa(0))
}

/// The PV DMA driver with its discovery scratch page at `scratch` (a page only it uses: one
/// per vCPU where several vCPUs drive it at once).
pub(crate) fn driver_at(scratch: u64) -> Result<PvDma<Native>, &'static str> {
    // SAFETY: a Moat guest at CPL 0 with all memory identity mapped; the scratch page is
    // only used by the driver.
    let hv = unsafe { Native::new() };
    PvDma::probe(
        hv,
        GuestBuffer {
            gpa: scratch,
            len: PAGE as u64,
        },
    )
    .map_err(|e| {
        println!("dma: discovery failed: {e:?}");
        "PV DMA discovery failed"
    })
}

/// Loads edu's device buffer with pattern `seed` (page 3 mapped for the device to read,
/// one RAM -> device DMA, unmapped again).
pub(crate) fn load_pattern(d: &mut PvDma<Native>, edu: &Edu, seed: u8) -> Outcome {
    fill(3, seed);
    let src = d
        .map(gpa(3), PAGE as u64, DmaFlags::READ)
        .map_err(|_| "MAP of the source failed")?;
    if !edu.dma(src, false) {
        return Err("edu DMA did not finish");
    }
    d.unmap(src, PAGE as u64).map_err(|_| "UNMAP failed")?;
    Ok(())
}

pub(crate) fn policy_name(p: Policy) -> &'static str {
    match p {
        Policy::Passthrough => "passthrough",
        Policy::Strict => "strict",
        Policy::Batched => "batched",
        Policy::Deferred => "deferred",
    }
}

pub(crate) fn raw(call: Call, a: [u64; 6]) -> (Option<Status>, [u64; 3]) {
    // SAFETY: as in `driver`.
    let mut hv = unsafe { Native::new() };
    let r = hv.hypercall(call, Args(a));
    (r.status(), r.values)
}

#[repr(C, align(4096))]
struct BatchPages([[u8; PAGE]; 8]);

/// `N` page-aligned pages (batch areas, scratch pages of the multi-vCPU tests).
#[repr(C, align(4096))]
pub(crate) struct PageArray<const N: usize>(pub(crate) [[u8; PAGE]; N]);

pub(crate) fn delay_ms(boot: &BootInfo, ms: u64) {
    let t0 = crate::abi::rdtsc();
    while crate::abi::rdtsc() - t0 < ms * boot.tsc_khz.get() {
        core::hint::spin_loop();
    }
}
