//! Invalidation: queued-invalidation descriptors, the queue manager and register-based
//! invalidation.
//!
//! Descriptor formats (VT-d 6.5.2, 128-bit legacy descriptors), all reserved bits zero:
//! - context-cache (type 1): G (5:4), DID (31:16), SID (47:32), FM (49:48);
//! - IOTLB (type 2): G (5:4), DW (6), DR (7), DID (31:16); high: AM (5:0), IH (6), ADDR (63:12);
//! - interrupt entry cache (type 4): G (4: 0 global, 1 index-selective), IM (31:27), IIDX
//!   (47:32); queued invalidation only;
//! - invalidation wait (type 5): SW (5), status data (63:32); high: status address (63:2).
//!   The driver only ever uses SW alone: QEMU 7.2 asserts on SW together with IF, and a
//!   fence-only wait stalls its queue.

use crate::error::{Error, Operation};
use crate::hw::{poll_until, Clock, DmaMemory, PhysAddr, RegisterWindow, PAGE_SIZE};
use crate::intremap::IecGranularity;
use crate::regs::{
    ccmd, iotlb_reg, queue_index, queue_pointer, ContextGranularity, FaultStatus, IotlbGranularity,
    IotlbRegs, CCMD, FSTS, IQH, IQT,
};

/// One invalidation request, independent of how it is delivered (queue or registers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalidation {
    /// Context-cache invalidation.
    Context(ContextGranularity),
    /// IOTLB invalidation (and the paging-structure caches unless `ih` is set).
    Iotlb(IotlbGranularity),
    /// Interrupt entry cache invalidation (queued invalidation only).
    InterruptEntry(IecGranularity),
}

/// A 128-bit queued-invalidation descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(C)]
pub struct Descriptor {
    /// Bits 63:0.
    pub lo: u64,
    /// Bits 127:64.
    pub hi: u64,
}

const _: () = assert!(core::mem::size_of::<Descriptor>() == 16);

/// Descriptor type codes.
pub mod desc_type {
    /// Context-cache invalidate.
    pub const CONTEXT_CACHE: u8 = 1;
    /// IOTLB invalidate.
    pub const IOTLB: u8 = 2;
    /// Device-TLB invalidate (not used by this driver).
    pub const DEVICE_TLB: u8 = 3;
    /// Interrupt entry cache invalidate.
    pub const INTERRUPT_ENTRY_CACHE: u8 = 4;
    /// Invalidation wait.
    pub const WAIT: u8 = 5;
}

/// Wait descriptor status-write bit.
pub const WAIT_SW: u64 = 1 << 5;
/// Wait descriptor interrupt-flag bit (never set by this driver, see the module docs).
pub const WAIT_IF: u64 = 1 << 4;

impl Descriptor {
    /// A context-cache invalidation descriptor.
    pub const fn context_cache(g: ContextGranularity) -> Self {
        let (did, sid, fm) = match g {
            ContextGranularity::Global => (0, 0, 0),
            ContextGranularity::Domain(d) => (d, 0, 0),
            ContextGranularity::Device { did, sid, fm } => (did, sid, fm & 3),
        };
        Self {
            lo: desc_type::CONTEXT_CACHE as u64
                | (g.code() << 4)
                | ((did as u64) << 16)
                | ((sid as u64) << 32)
                | ((fm as u64) << 48),
            hi: 0,
        }
    }

    /// An IOTLB invalidation descriptor; `drain_reads`/`drain_writes` only when the unit
    /// reports `CAP.DRD`/`CAP.DWD`.
    pub const fn iotlb(g: IotlbGranularity, drain_reads: bool, drain_writes: bool) -> Self {
        Self {
            lo: desc_type::IOTLB as u64
                | (g.code() << 4)
                | ((drain_writes as u64) << 6)
                | ((drain_reads as u64) << 7)
                | ((g.did() as u64) << 16),
            hi: g.address_word(),
        }
    }

    /// An interrupt entry cache invalidation descriptor.
    pub const fn interrupt_entry(g: IecGranularity) -> Self {
        Self {
            lo: desc_type::INTERRUPT_ENTRY_CACHE as u64 | g.descriptor_bits(),
            hi: 0,
        }
    }

    /// An invalidation wait descriptor that writes `data` to `status` (4-byte aligned) once
    /// every earlier descriptor completed.
    pub const fn wait(status: PhysAddr, data: u32) -> Self {
        Self {
            lo: desc_type::WAIT as u64 | WAIT_SW | ((data as u64) << 32),
            hi: status.as_u64() & !3,
        }
    }

    /// Descriptor for an [`Invalidation`].
    pub const fn from_invalidation(
        inv: Invalidation,
        drain_reads: bool,
        drain_writes: bool,
    ) -> Self {
        match inv {
            Invalidation::Context(g) => Self::context_cache(g),
            Invalidation::Iotlb(g) => Self::iotlb(g, drain_reads, drain_writes),
            Invalidation::InterruptEntry(g) => Self::interrupt_entry(g),
        }
    }

    /// Type code (bits 3:0; bits 11:9 are the high type bits of newer descriptors).
    pub const fn kind(self) -> u8 {
        (self.lo & 0xf) as u8
    }
}

/// Counters of the invalidation machinery.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InvalidationStats {
    /// Descriptors submitted (wait descriptors included).
    pub descriptors: u64,
    /// Wait descriptors that completed.
    pub waits: u64,
    /// Register-based invalidations performed.
    pub register_invalidations: u64,
    /// IQE errors recovered by replacing the bad descriptor.
    pub iqe_recovered: u64,
    /// ICE errors seen and cleared.
    pub ice: u64,
    /// ITE errors seen and cleared.
    pub ite: u64,
    /// Waits that timed out.
    pub timeouts: u64,
}

/// The invalidation queue of one unit: one 4 KiB page of 256 descriptors plus a status page.
#[derive(Debug)]
pub struct InvalidationQueue {
    base: PhysAddr,
    status: PhysAddr,
    tail: usize,
    /// The last head read from IQH: the hardware's head is at or past it (it only moves
    /// forward, up to the tail), so the slots from the tail up to it are free without
    /// another register read (see [`Self::wait_for_space`]).
    head_seen: usize,
    seq: u32,
    coherent: bool,
    drain_reads: bool,
    drain_writes: bool,
}

/// Descriptors in the one-page queue.
pub const QUEUE_ENTRIES: usize = (PAGE_SIZE as usize) / 16;

impl InvalidationQueue {
    /// Allocates the queue and status pages.
    pub fn new<M: DmaMemory>(
        mem: &mut M,
        coherent: bool,
        drain_reads: bool,
        drain_writes: bool,
    ) -> Result<Self, Error> {
        let base = mem.alloc_frame().ok_or(Error::NoMemory)?;
        let Some(status) = mem.alloc_frame() else {
            mem.free_frame(base);
            return Err(Error::NoMemory);
        };
        Ok(Self {
            base,
            status,
            tail: 0,
            head_seen: 0,
            seq: 0,
            coherent,
            drain_reads,
            drain_writes,
        })
    }

    /// Physical address of the queue page (for IQA).
    pub fn base(&self) -> PhysAddr {
        self.base
    }

    /// Physical address of the status word the wait descriptors write.
    pub fn status_addr(&self) -> PhysAddr {
        self.status
    }

    /// Software tail index.
    pub fn tail(&self) -> usize {
        self.tail
    }

    /// Resets the software tail (the queue is being (re-)enabled with IQT = 0).
    pub fn reset(&mut self) {
        self.tail = 0;
        self.head_seen = 0;
    }

    /// Frees the queue pages (the queue must be disabled).
    pub fn free<M: DmaMemory>(self, mem: &mut M) {
        mem.free_frame(self.base);
        mem.free_frame(self.status);
    }

    fn write_desc<M: DmaMemory>(&mut self, mem: &mut M, d: Descriptor) -> usize {
        let idx = self.tail;
        let at = self.base + (idx as u64) * 16;
        mem.write_u64(at, d.lo);
        mem.write_u64(at + 8, d.hi);
        if !self.coherent {
            mem.flush_cache(at, 16);
        }
        self.tail = (self.tail + 1) % QUEUE_ENTRIES;
        idx
    }

    /// Submits `invs` followed by one wait descriptor and polls the status word until the
    /// hardware wrote it, or `timeout_ns` passed.
    ///
    /// More than `QUEUE_ENTRIES - 2` invalidations are sent in several rounds, each ending
    /// with its own wait, so the queue never overflows (the caller always waits, so the queue
    /// is empty when a submission starts). IQE/ICE/ITE are detected while polling: an IQE
    /// is recovered by replacing the descriptor at IQH with a global invalidation of the
    /// same cache (a superset of what was asked), clearing IQE and restarting the queue.
    pub fn submit_and_wait<R: RegisterWindow, M: DmaMemory, C: Clock>(
        &mut self,
        regs: &mut R,
        mem: &mut M,
        clock: &C,
        timeout_ns: u64,
        invs: &[Invalidation],
        stats: &mut InvalidationStats,
    ) -> Result<(), Error> {
        let round = QUEUE_ENTRIES - 2;
        let mut rest = invs;
        loop {
            let (now, later) = rest.split_at(rest.len().min(round));
            self.wait_for_space(regs, clock, timeout_ns, now.len() + 1)?;
            self.seq = self.seq.wrapping_add(1).max(1);
            let seq = self.seq;
            let wait_idx = self.queue(regs, mem, now, Descriptor::wait(self.status, seq), stats);
            self.wait_status(regs, mem, clock, timeout_ns, seq, wait_idx, stats)?;
            stats.waits += 1;
            if later.is_empty() {
                return Ok(());
            }
            rest = later;
        }
    }

    /// Queues `invs` followed by one wait descriptor that writes `seq` to the caller's own
    /// status word at `status`, moves the tail and returns at once: the caller polls its
    /// status word itself, outside whatever lock serializes the queue, and calls
    /// [`Self::check_errors`] now and then while it waits. Returns the wait descriptor's
    /// index. At most `QUEUE_ENTRIES - 2` invalidations ([`Error::InvalidState`] otherwise).
    ///
    /// Several submissions may be outstanding at once: each waits for its own status word,
    /// and the queue runs in order, so a status write means everything queued before it
    /// completed.
    #[allow(clippy::too_many_arguments)]
    pub fn submit<R: RegisterWindow, M: DmaMemory, C: Clock>(
        &mut self,
        regs: &mut R,
        mem: &mut M,
        clock: &C,
        timeout_ns: u64,
        invs: &[Invalidation],
        status: PhysAddr,
        seq: u32,
        stats: &mut InvalidationStats,
    ) -> Result<usize, Error> {
        if invs.len() > QUEUE_ENTRIES - 2 {
            return Err(Error::InvalidState(
                "too many invalidations for one submission",
            ));
        }
        self.wait_for_space(regs, clock, timeout_ns, invs.len() + 1)?;
        let wait_idx = self.queue(regs, mem, invs, Descriptor::wait(status, seq), stats);
        stats.waits += 1;
        Ok(wait_idx)
    }

    /// Writes `invs` and then `wait` (the caller made room for all of them), counts them and
    /// moves the tail. Returns the wait descriptor's index.
    fn queue<R: RegisterWindow, M: DmaMemory>(
        &mut self,
        regs: &mut R,
        mem: &mut M,
        invs: &[Invalidation],
        wait: Descriptor,
        stats: &mut InvalidationStats,
    ) -> usize {
        for inv in invs {
            let d = Descriptor::from_invalidation(*inv, self.drain_reads, self.drain_writes);
            self.write_desc(mem, d);
        }
        let wait_idx = self.write_desc(mem, wait);
        stats.descriptors += invs.len() as u64 + 1;
        regs.write64(IQT, queue_pointer(self.tail));
        wait_idx
    }

    /// Whether the queue's status writes bypass the CPU caches (then a waiter drops its
    /// status word's cache line before each read).
    pub fn coherent(&self) -> bool {
        self.coherent
    }

    /// The queue's error state, for a waiter whose status word has not been written yet:
    /// recovers an invalidation queue error (IQE) at another descriptor (replaced by a global
    /// invalidation of the same cache, a superset) and device-TLB errors (ICE/ITE), and
    /// fails when the refused descriptor is the waiter's own wait descriptor `wait_idx`
    /// (nothing will write its status).
    pub fn check_errors<R: RegisterWindow, M: DmaMemory>(
        &mut self,
        regs: &mut R,
        mem: &mut M,
        wait_idx: usize,
        stats: &mut InvalidationStats,
    ) -> Result<(), Error> {
        let coherent = self.coherent;
        let tail = self.tail;
        let fsts = FaultStatus::from_bits_retain(regs.read32(FSTS));
        if fsts.contains(FaultStatus::IQE) {
            let head = queue_index(regs.read64(IQH)) % QUEUE_ENTRIES;
            let at = self.base + head as u64 * 16;
            let bad = Descriptor {
                lo: mem.read_u64(at),
                hi: mem.read_u64(at + 8),
            };
            log::error!(
                "vt-d: invalidation queue error (IQE) at descriptor {head}: {:#018x}_{:016x}",
                bad.hi,
                bad.lo
            );
            let replacement = match bad.kind() {
                desc_type::CONTEXT_CACHE => Descriptor::context_cache(ContextGranularity::Global),
                _ => Descriptor::iotlb(IotlbGranularity::Global, false, false),
            };
            mem.write_u64(at, replacement.lo);
            mem.write_u64(at + 8, replacement.hi);
            if !coherent {
                mem.flush_cache(at, 16);
            }
            regs.write32(FSTS, FaultStatus::IQE.bits());
            regs.write64(IQT, queue_pointer(tail));
            stats.iqe_recovered += 1;
            if head == wait_idx {
                // Our own wait descriptor was refused: nothing will write the status.
                return Err(Error::InvalidationQueue {
                    index: head,
                    lo: bad.lo,
                    hi: bad.hi,
                });
            }
            log::warn!("vt-d: replaced it with a global invalidation and resumed the queue");
        }
        if fsts.intersects(FaultStatus::ICE | FaultStatus::ITE) {
            log::error!(
                "vt-d: device-TLB invalidation error, FSTS={:#x}",
                fsts.bits()
            );
            if fsts.contains(FaultStatus::ICE) {
                stats.ice += 1;
            }
            if fsts.contains(FaultStatus::ITE) {
                stats.ite += 1;
            }
            regs.write32(FSTS, (fsts & (FaultStatus::ICE | FaultStatus::ITE)).bits());
            regs.write64(IQT, queue_pointer(tail));
        }
        Ok(())
    }

    /// Number of free descriptor slots given the hardware head (one slot always stays
    /// empty so that `head == tail` means empty).
    pub const fn free_slots(head: usize, tail: usize) -> usize {
        (head + QUEUE_ENTRIES - tail - 1) % QUEUE_ENTRIES
    }

    /// Waits until `needed` slots are free, so a submission never overwrites descriptors the
    /// hardware has not fetched (possible only after an earlier wait timed out). The head
    /// last read from IQH usually shows enough room already (it lags the hardware's, never
    /// leads it), so IQH is read only when it does not: about once per lap of the queue
    /// instead of once per submission (a register read is an exit, or a trip to the
    /// emulator's device lock, under virtualization).
    fn wait_for_space<R: RegisterWindow, C: Clock>(
        &mut self,
        regs: &mut R,
        clock: &C,
        timeout_ns: u64,
        needed: usize,
    ) -> Result<(), Error> {
        let tail = self.tail;
        if Self::free_slots(self.head_seen, tail) >= needed {
            return Ok(());
        }
        let seen = &mut self.head_seen;
        poll_until(clock, timeout_ns, || {
            *seen = queue_index(regs.read64(IQH)) % QUEUE_ENTRIES;
            (Self::free_slots(*seen, tail) >= needed).then_some(())
        })
        .ok_or_else(|| {
            log::error!("vt-d: invalidation queue full (hardware stalled?)");
            Error::Timeout(Operation::InvalidationQueueSpace)
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn wait_status<R: RegisterWindow, M: DmaMemory, C: Clock>(
        &mut self,
        regs: &mut R,
        mem: &mut M,
        clock: &C,
        timeout_ns: u64,
        seq: u32,
        wait_idx: usize,
        stats: &mut InvalidationStats,
    ) -> Result<(), Error> {
        let mut fatal: Option<Error> = None;
        let status = self.status;
        let coherent = self.coherent;
        let done = poll_until(clock, timeout_ns, || {
            if !coherent {
                // The status write may bypass the CPU caches: drop the stale line.
                mem.flush_cache(status, 4);
            }
            if mem.read_u32(status) == seq {
                return Some(Ok(()));
            }
            if let Err(e) = self.check_errors(regs, mem, wait_idx, stats) {
                fatal = Some(e);
                return Some(Err(()));
            }
            None
        });
        match done {
            Some(Ok(())) => Ok(()),
            Some(Err(())) => Err(fatal.unwrap_or(Error::Timeout(Operation::InvalidationWait))),
            None => {
                stats.timeouts += 1;
                log::error!(
                    "vt-d: invalidation wait {seq} timed out (IQH={:#x}, IQT={:#x})",
                    regs.read64(IQH),
                    regs.read64(IQT)
                );
                Err(Error::Timeout(Operation::InvalidationWait))
            }
        }
    }
}

/// Performs `inv` through the CCMD or IOTLB registers and polls for completion
/// (only while queued invalidation is off: hardware refuses register-based invalidation
/// once QI is enabled).
pub fn register_invalidate<R: RegisterWindow, C: Clock>(
    regs: &mut R,
    clock: &C,
    timeout_ns: u64,
    iotlb: IotlbRegs,
    drain_reads: bool,
    drain_writes: bool,
    inv: Invalidation,
) -> Result<(), Error> {
    match inv {
        Invalidation::Context(g) => {
            regs.write64(CCMD, ccmd::encode(g));
            poll_until(clock, timeout_ns, || {
                (regs.read64(CCMD) & ccmd::ICC == 0).then_some(())
            })
            .ok_or(Error::Timeout(Operation::ContextCommand))
        }
        Invalidation::Iotlb(g) => {
            if let IotlbGranularity::Page { .. } = g {
                regs.write64(iotlb.iva(), g.address_word());
            }
            let reg = iotlb.iotlb();
            regs.write64(reg, iotlb_reg::encode(g, drain_reads, drain_writes));
            let v = poll_until(clock, timeout_ns, || {
                let v = regs.read64(reg);
                (v & iotlb_reg::IVT == 0).then_some(v)
            })
            .ok_or(Error::Timeout(Operation::IotlbCommand))?;
            if iotlb_reg::actual_granularity(v) == 0 {
                return Err(Error::IotlbInvalidationRefused);
            }
            Ok(())
        }
        Invalidation::InterruptEntry(_) => Err(Error::Unsupported(
            "interrupt entry cache invalidation needs queued invalidation",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_cache_descriptor_encodings() {
        assert_eq!(
            Descriptor::context_cache(ContextGranularity::Global),
            Descriptor { lo: 0x11, hi: 0 }
        );
        assert_eq!(
            Descriptor::context_cache(ContextGranularity::Domain(0x42)),
            Descriptor {
                lo: 0x0042_0021,
                hi: 0
            }
        );
        let d = Descriptor::context_cache(ContextGranularity::Device {
            did: 3,
            sid: 0x0010,
            fm: 0,
        });
        assert_eq!(
            d,
            Descriptor {
                lo: (0x0010 << 32) | (3 << 16) | 0x31,
                hi: 0
            }
        );
        // Reserved bits (QEMU: 0xfffc_0000_0000_ffc0) stay zero even with an oversized FM.
        let d = Descriptor::context_cache(ContextGranularity::Device {
            did: 0xffff,
            sid: 0xffff,
            fm: 0xff,
        });
        assert_eq!(d.lo & 0xfffc_0000_0000_ffc0, 0);
        assert_eq!(d.kind(), desc_type::CONTEXT_CACHE);
    }

    #[test]
    fn iotlb_descriptor_encodings() {
        assert_eq!(
            Descriptor::iotlb(IotlbGranularity::Global, false, false),
            Descriptor { lo: 0x12, hi: 0 }
        );
        assert_eq!(
            Descriptor::iotlb(IotlbGranularity::Domain(7), true, true),
            Descriptor {
                lo: (7 << 16) | (1 << 7) | (1 << 6) | 0x22,
                hi: 0
            }
        );
        let d = Descriptor::iotlb(
            IotlbGranularity::Page {
                did: 9,
                addr: 0x7654_3000,
                am: 0,
                ih: true,
            },
            false,
            false,
        );
        assert_eq!(
            d,
            Descriptor {
                lo: (9 << 16) | 0x32,
                hi: 0x7654_3000 | (1 << 6)
            }
        );
        let d = Descriptor::iotlb(
            IotlbGranularity::Page {
                did: 0xffff,
                addr: 0x4000_0000,
                am: 18,
                ih: false,
            },
            true,
            true,
        );
        assert_eq!(d.hi, 0x4000_0000 | 18);
        // QEMU's reserved masks for IOTLB descriptors.
        assert_eq!(d.lo & 0xffff_ffff_0000_ff00, 0);
        assert_eq!(d.hi & 0xf80, 0);
    }

    #[test]
    fn free_slots_wrap() {
        assert_eq!(InvalidationQueue::free_slots(0, 0), QUEUE_ENTRIES - 1);
        assert_eq!(InvalidationQueue::free_slots(5, 4), 0);
        assert_eq!(InvalidationQueue::free_slots(4, 5), QUEUE_ENTRIES - 2);
        assert_eq!(InvalidationQueue::free_slots(0, QUEUE_ENTRIES - 1), 0);
        assert_eq!(InvalidationQueue::free_slots(10, 2), 7);
    }

    #[test]
    fn wait_descriptor_has_status_write_only() {
        let d = Descriptor::wait(PhysAddr::new(0x1234_5678), 0xdead_beef);
        assert_eq!(d.lo, 0xdead_beef_0000_0025);
        assert_eq!(d.hi, 0x1234_5678);
        assert_eq!(d.lo & WAIT_IF, 0);
        // QEMU 7.2 reserved bits: lo 31:7, hi 1:0.
        assert_eq!(d.lo & 0xffff_ff80, 0);
        assert_eq!(Descriptor::wait(PhysAddr::new(0x1003), 1).hi & 3, 0);
        assert_eq!(d.kind(), desc_type::WAIT);
    }
}
