//! How the driver makes memory reachable for the controller: every buffer through the
//! paravirtual DMA driver ([`moat_pvdma`]).
//!
//! Queues are mapped once for their lifetime ([`Mapper::map_static`]). Data buffers are
//! mapped per I/O before submission and unmapped after completion, a burst at a time
//! ([`Mapper::map_burst`], [`Mapper::unmap_burst`]), in the way the guest's policy calls for:
//!
//! * `batched`: the unmaps of a completion burst and the maps of the next submission burst
//!   in one MULTICALL ([`Mapper::exchange`], the unmaps first; one exit and one invalidation
//!   wait for the whole cycle);
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
        self.exchange(&[], bufs, iovas).map
    }

    /// Unmaps every `(iova, len)` of `maps` (each a whole mapping from
    /// [`Mapper::map_burst`]). Tries all of them; returns the first error.
    pub fn unmap_burst(&mut self, maps: &[(u64, u64)]) -> Result<(), Error> {
        self.exchange(maps, &[], &mut []).unmap
    }

    /// Unmaps every `(iova, len)` of `unmaps` (each a whole mapping), then maps every buffer
    /// of `bufs` (their IOVAs into `iovas`): under `batched` in ONE MULTICALL, the unmaps
    /// first. The hypervisor runs a MULTICALL's entries in order and invalidates its unmaps
    /// before the call returns, so when this returns every unmapped IOVA is unreachable for
    /// the device (under `strict` and `batched`), as with [`Mapper::unmap_burst`]; an IOVA
    /// unmapped here is not handed out again before that invalidation (the hypervisor frees
    /// IOVAs only after it), so the new maps never alias a stale translation.
    ///
    /// The unmaps are all tried (their outcome is [`Exchange::unmap`], the first error); the
    /// maps are all or nothing ([`Exchange::map`]; on an error none stays mapped).
    pub fn exchange(
        &mut self,
        unmaps: &[(u64, u64)],
        bufs: &[Buffer],
        iovas: &mut [u64],
    ) -> Exchange {
        if iovas.len() < bufs.len() {
            let unmap = self.exchange(unmaps, &[], &mut []).unmap;
            return Exchange {
                unmap,
                map: Err(Error::BadTransfer),
            };
        }
        let iovas = &mut iovas[..bufs.len()];
        iovas.fill(u64::MAX);
        let (mut unmap_err, mut map_err) = (None, None);
        match self.mode {
            Mode::Direct => {
                for (b, i) in bufs.iter().zip(iovas.iter_mut()) {
                    *i = b.gpa;
                }
            }
            Mode::Single => {
                for &(iova, len) in unmaps {
                    self.stats.unmap_calls += 1;
                    if let Err(e) = self.pv.unmap(iova, len) {
                        unmap_err.get_or_insert(e.into());
                    }
                }
                for (b, i) in bufs.iter().zip(iovas.iter_mut()) {
                    self.stats.map_calls += 1;
                    match self.pv.map(b.gpa, b.len, b.flags()) {
                        Ok(iova) => *i = iova,
                        Err(e) => {
                            map_err = Some(e.into());
                            break;
                        }
                    }
                }
            }
            Mode::Multicall => {
                (unmap_err, map_err) = self.multicall(unmaps, bufs, iovas);
            }
        }
        self.stats.unmaps += unmaps.len() as u64;
        let map = match map_err {
            None => {
                self.stats.maps += bufs.len() as u64;
                Ok(())
            }
            Some(err) => {
                for (b, i) in bufs.iter().zip(iovas.iter_mut()) {
                    if *i != u64::MAX && self.mode != Mode::Direct {
                        let _ = self.pv.unmap(*i, b.len);
                    }
                    *i = u64::MAX;
                }
                Err(err)
            }
        };
        Exchange {
            unmap: unmap_err.map_or(Ok(()), Err),
            map,
        }
    }

    /// The MULTICALL of [`Mapper::exchange`]: the unmaps, then the maps, in one call (more
    /// only if they do not fit the batch area or the hypervisor preempted the call). The
    /// first unmap error and the first map error.
    fn multicall(
        &mut self,
        unmaps: &[(u64, u64)],
        bufs: &[Buffer],
        iovas: &mut [u64],
    ) -> (Option<Error>, Option<Error>) {
        if unmaps.is_empty() && bufs.is_empty() {
            return (None, None);
        }
        if self.pv.pending() != 0 {
            let e = Some(Error::Dma(moat_pvdma::Error::BatchNotEmpty));
            return (
                e.filter(|_| !unmaps.is_empty()),
                e.filter(|_| !bufs.is_empty()),
            );
        }
        let (mut unmap_err, mut map_err) = (None, None);
        let first_map = core::cell::Cell::new(None::<u64>);
        let mut sink = |c: Completion| match (c.request, c.result) {
            (Request::Map { .. }, Ok(iova)) => {
                if let Some(k) = first_map.get().map(|f| (c.ticket.0 - f) as usize)
                    && k < iovas.len()
                {
                    iovas[k] = iova;
                }
            }
            (Request::Map { .. }, Err(e)) => {
                map_err.get_or_insert(Error::Dma(e));
            }
            (Request::Unmap { .. }, Err(e)) => {
                unmap_err.get_or_insert(Error::Dma(e));
            }
            (Request::Unmap { .. }, Ok(_)) => {}
        };
        let (mut unmap_call_err, mut map_call_err) = (None, None);
        for &(iova, len) in unmaps {
            // A burst larger than the batch is flushed in parts by queue_unmap/queue_map.
            if let Err(e) = self.pv.queue_unmap(iova, len, &mut sink) {
                unmap_call_err.get_or_insert(Error::Dma(e));
            }
        }
        for b in bufs {
            match self.pv.queue_map(b.gpa, b.len, b.flags(), &mut sink) {
                Ok(t) => {
                    if first_map.get().is_none() {
                        first_map.set(Some(t.0));
                    }
                }
                Err(e) => {
                    map_call_err = Some(Error::Dma(e));
                    break;
                }
            }
        }
        let flushed = self.pv.flush(&mut sink);
        self.stats.multicalls += 1;
        match flushed {
            Ok(rep) => {
                let calls = u64::from(rep.multicalls);
                if !unmaps.is_empty() {
                    self.stats.unmap_calls += calls;
                }
                if !bufs.is_empty() {
                    self.stats.map_calls += calls;
                }
            }
            Err(e) => {
                let e = Some(Error::Dma(e));
                unmap_call_err = unmap_call_err.or(e.filter(|_| !unmaps.is_empty()));
                map_call_err = map_call_err.or(e.filter(|_| !bufs.is_empty()));
            }
        }
        (unmap_err.or(unmap_call_err), map_err.or(map_call_err))
    }
}

/// What [`Mapper::exchange`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct Exchange {
    /// The unmaps: the first error (each was tried).
    pub unmap: Result<(), Error>,
    /// The maps: all done, or the first error (and none stays mapped).
    pub map: Result<(), Error>,
}
