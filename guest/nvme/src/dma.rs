//! How the driver makes memory reachable for the controller: every buffer through the
//! paravirtual DMA driver ([`moat_pvdma`]).
//!
//! Queues are mapped once for their lifetime ([`Mapper::map_static`]). Data buffers are
//! mapped per I/O before submission and unmapped after completion, a burst at a time
//! ([`Mapper::map_burst`], [`Mapper::unmap_burst`]), in the way the guest's policy calls for:
//!
//! * `batched`: the maps of a burst in one MULTICALL, the unmaps of a burst in another (one
//!   invalidation for the whole burst);
//! * `strict` and `deferred`: one DMA_MAP and one DMA_UNMAP hypercall per buffer (as Linux's
//!   block layer does per request);
//! * `passthrough` (the hypervisor reports IOVA = GPA): data buffers are used at their GPA
//!   without a call, as a guest without an IOMMU would (Linux's direct mapping). This is the
//!   baseline the other policies are measured against.

use moat_pvdma::moat_abi::dma::{DmaFlags, Features, Policy, Request};
use moat_pvdma::{BatchArea, Completion, Hypervisor, PvDma};

use crate::Error;

/// How data buffers are mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// IOVA = GPA, no call (passthrough).
    Direct,
    /// One MAP / UNMAP hypercall per buffer.
    Single,
    /// One MULTICALL per burst.
    Multicall,
}

/// One buffer of a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Guest-physical address, page aligned.
    pub gpa: u64,
    /// Bytes, a page multiple.
    pub len: u64,
    /// Whether the device writes it (a read from the disk); else the device reads it.
    pub device_writes: bool,
}

impl Buffer {
    fn flags(&self) -> DmaFlags {
        if self.device_writes {
            DmaFlags::WRITE
        } else {
            DmaFlags::READ
        }
    }
}

/// Counters of what the mapper did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MapperStats {
    /// Buffers mapped (through a call or directly).
    pub maps: u64,
    /// Buffers unmapped.
    pub unmaps: u64,
    /// Bursts submitted with MULTICALL.
    pub multicalls: u64,
    /// Hypercalls that mapped data buffers (DMA_MAP, or MULTICALL including resumptions
    /// after preemption).
    pub map_calls: u64,
    /// Hypercalls that unmapped data buffers (DMA_UNMAP or MULTICALL as above).
    pub unmap_calls: u64,
}

/// One vCPU's mapper over its [`PvDma`] instance.
pub struct Mapper<H> {
    pv: PvDma<H>,
    mode: Mode,
    stats: MapperStats,
}

impl<H: Hypervisor> Mapper<H> {
    /// A mapper in the mode the guest's policy calls for. Under `batched`, `batch` is
    /// registered as this vCPU's batch area (it must be given). Under `passthrough` data
    /// buffers are used directly only if the hypervisor reports IOVA = GPA.
    pub fn new(mut pv: PvDma<H>, batch: Option<BatchArea>) -> Result<Mapper<H>, Error> {
        let info = *pv.info();
        let mode = match info.policy {
            Policy::Passthrough if info.features.has(Features::IOVA_IS_GPA) => Mode::Direct,
            Policy::Batched => {
                let area = batch.ok_or(Error::Dma(moat_pvdma::Error::NoBatch))?;
                pv.attach_batch(area)?;
                Mode::Multicall
            }
            _ => Mode::Single,
        };
        Ok(Mapper {
            pv,
            mode,
            stats: MapperStats::default(),
        })
    }

    /// A mapper in an explicit mode (`Multicall` needs a batch area attached to `pv`).
    pub fn with_mode(pv: PvDma<H>, mode: Mode) -> Mapper<H> {
        Mapper {
            pv,
            mode,
            stats: MapperStats::default(),
        }
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// What the mapper did so far.
    pub fn stats(&self) -> MapperStats {
        self.stats
    }

    /// The PV DMA driver (for STATS, faults, raw calls).
    pub fn pvdma(&mut self) -> &mut PvDma<H> {
        &mut self.pv
    }

    /// Gives the PV DMA driver back (the batch area, if any, stays registered).
    pub fn into_inner(self) -> PvDma<H> {
        self.pv
    }

    /// Maps memory for the lifetime of a queue: always one DMA_MAP hypercall.
    pub fn map_static(&mut self, b: Buffer) -> Result<u64, Error> {
        Ok(self.pv.map(b.gpa, b.len, b.flags())?)
    }

    /// Unmaps what [`Mapper::map_static`] mapped.
    pub fn unmap_static(&mut self, iova: u64, len: u64) -> Result<(), Error> {
        Ok(self.pv.unmap(iova, len)?)
    }

    /// Maps every buffer of `bufs`, writing their IOVAs into `iovas`: all or nothing (on an
    /// error the buffers already mapped are unmapped again).
    pub fn map_burst(&mut self, bufs: &[Buffer], iovas: &mut [u64]) -> Result<(), Error> {
        if iovas.len() < bufs.len() {
            return Err(Error::BadTransfer);
        }
        let iovas = &mut iovas[..bufs.len()];
        iovas.fill(u64::MAX);
        let mut first_err: Option<Error> = None;
        match self.mode {
            Mode::Direct => {
                for (b, i) in bufs.iter().zip(iovas.iter_mut()) {
                    *i = b.gpa;
                }
            }
            Mode::Single => {
                for (b, i) in bufs.iter().zip(iovas.iter_mut()) {
                    self.stats.map_calls += 1;
                    match self.pv.map(b.gpa, b.len, b.flags()) {
                        Ok(iova) => *i = iova,
                        Err(e) => {
                            first_err = Some(e.into());
                            break;
                        }
                    }
                }
            }
            Mode::Multicall => {
                if self.pv.pending() != 0 {
                    return Err(Error::Dma(moat_pvdma::Error::BatchNotEmpty));
                }
                let first_ticket = core::cell::Cell::new(None::<u64>);
                let mut entry_err = None;
                let mut call_err = None;
                let mut sink = |c: Completion| {
                    let Some(f) = first_ticket.get() else { return };
                    let k = (c.ticket.0 - f) as usize;
                    match (c.request, c.result) {
                        (Request::Map { .. }, Ok(iova)) if k < iovas.len() => iovas[k] = iova,
                        (_, Err(e)) => {
                            entry_err.get_or_insert(Error::Dma(e));
                        }
                        _ => {}
                    }
                };
                for b in bufs {
                    // A burst larger than the batch is flushed in parts by queue_map.
                    match self.pv.queue_map(b.gpa, b.len, b.flags(), &mut sink) {
                        Ok(t) => {
                            if first_ticket.get().is_none() {
                                first_ticket.set(Some(t.0));
                            }
                        }
                        Err(e) => {
                            call_err = Some(Error::Dma(e));
                            break;
                        }
                    }
                }
                let flushed = self.pv.flush(&mut sink);
                self.stats.multicalls += 1;
                match flushed {
                    Ok(rep) => self.stats.map_calls += u64::from(rep.multicalls),
                    Err(e) => {
                        call_err.get_or_insert(Error::Dma(e));
                    }
                }
                first_err = entry_err.or(call_err);
            }
        }
        let Some(err) = first_err else {
            self.stats.maps += bufs.len() as u64;
            return Ok(());
        };
        for (b, i) in bufs.iter().zip(iovas.iter_mut()) {
            if *i != u64::MAX && self.mode != Mode::Direct {
                let _ = self.pv.unmap(*i, b.len);
            }
            *i = u64::MAX;
        }
        Err(err)
    }

    /// Unmaps every `(iova, len)` of `maps` (each a whole mapping from
    /// [`Mapper::map_burst`]). Tries all of them; returns the first error.
    pub fn unmap_burst(&mut self, maps: &[(u64, u64)]) -> Result<(), Error> {
        let mut first_err: Option<Error> = None;
        match self.mode {
            Mode::Direct => {}
            Mode::Single => {
                for &(iova, len) in maps {
                    self.stats.unmap_calls += 1;
                    if let Err(e) = self.pv.unmap(iova, len) {
                        first_err.get_or_insert(e.into());
                    }
                }
            }
            Mode::Multicall => {
                let mut sink = |c: Completion| {
                    if let Err(e) = c.result {
                        first_err.get_or_insert(Error::Dma(e));
                    }
                };
                let mut call_err = None;
                for &(iova, len) in maps {
                    if let Err(e) = self.pv.queue_unmap(iova, len, &mut sink) {
                        call_err.get_or_insert(Error::Dma(e));
                    }
                }
                match self.pv.flush(&mut sink) {
                    Ok(rep) => self.stats.unmap_calls += u64::from(rep.multicalls),
                    Err(e) => {
                        call_err.get_or_insert(Error::Dma(e));
                    }
                }
                self.stats.multicalls += 1;
                if let Some(e) = call_err {
                    first_err.get_or_insert(e);
                }
            }
        }
        self.stats.unmaps += maps.len() as u64;
        first_err.map_or(Ok(()), Err)
    }
}
