//! [`PvDma`]: one vCPU's driver instance.

use crate::discovery::{discover, Discovery};
use crate::{Error, Hypervisor};
use moat_abi::dma::{
    batch_capacity, fault_ring_capacity, validate_entry, BatchHeader, DmaFlags, Entry, FaultRecord,
    FaultRingHeader, MulticallReturn, MulticallStop, Op, Policy, Request, Stats, StatsFlags,
    FAULT_RECORD_SIZE, FAULT_RING_MAGIC, FAULT_RING_VERSION, STATS_SIZE,
};
use moat_abi::{Args, Call, FromZeros, IntoBytes, Return, Status};

/// A buffer of guest memory given to the driver, by guest-physical address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestBuffer {
    /// First byte (8-byte aligned for QUERY and STATS).
    pub gpa: u64,
    /// Bytes.
    pub len: u64,
}

/// The pages given to the driver as this vCPU's batch area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchArea {
    /// First byte, page aligned.
    pub gpa: u64,
    /// Pages (1..=`max_batch_pages`).
    pub pages: u64,
}

/// The pages given to the driver as the guest's fault ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRingArea {
    /// First byte, page aligned.
    pub gpa: u64,
    /// Pages.
    pub pages: u64,
    /// Interrupt vector raised when the ring becomes non-empty (0: polled only).
    pub vector: u8,
}

/// One element of a scatter-gather list: `len` bytes at `addr` (a GPA for
/// [`PvDma::map_sg`], an IOVA for [`PvDma::unmap_sg`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First byte, page aligned.
    pub addr: u64,
    /// Bytes, a non-zero page multiple.
    pub len: u64,
}

/// Names one queued request; completions carry it. Tickets increase by one per queued
/// request over the driver's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(pub u64);

/// The outcome of one queued request, delivered exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The request's ticket.
    pub ticket: Ticket,
    /// What was asked.
    pub request: Request,
    /// `Ok(iova)`: for a MAP the new mapping's IOVA, for an UNMAP the IOVA unmapped. On an
    /// error the request changed nothing.
    pub result: Result<u64, Error>,
}

/// What one flush did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// Entries submitted.
    pub submitted: u32,
    /// Entries that completed OK.
    pub ok: u32,
    /// Entries that failed (each reported to the sink with its error).
    pub failed: u32,
    /// MULTICALL hypercalls issued.
    pub multicalls: u32,
    /// Times the hypervisor preempted the batch and the driver resumed it.
    pub preemptions: u32,
    /// Whether a multicall reported its invalidation unconfirmed (`unsynced`).
    pub unsynced: bool,
    /// Whether [`PvDma::sync`] issued DMA_SYNC, and the invalidations it reported.
    pub sync_invalidations: Option<u64>,
}

/// What one [`PvDma::poll_faults`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultPoll {
    /// Records consumed.
    pub records: u32,
    /// Faults the hypervisor dropped since the previous poll (ring full).
    pub dropped: u64,
}

#[derive(Debug, Clone, Copy)]
struct BatchState {
    gpa: u64,
    capacity: u32,
    pending: u32,
    /// Ticket of entry 0.
    base: u64,
}

#[derive(Debug, Clone, Copy)]
struct RingState {
    gpa: u64,
    capacity: u32,
    consumer: u32,
    dropped_seen: u64,
}

/// A completion sink: called once per queued request.
pub type Sink<'a> = &'a mut dyn FnMut(Completion);

/// Sentinel for "not mapped" in [`PvDma::map_sg`]'s output (IOVAs are page aligned).
const NOT_MAPPED: u64 = u64::MAX;

/// One vCPU's paravirtual DMA driver.
pub struct PvDma<H> {
    hv: H,
    info: Discovery,
    scratch: GuestBuffer,
    batch: Option<BatchState>,
    ring: Option<RingState>,
    next_ticket: u64,
    unsynced: bool,
}

fn status_of(ret: &Return) -> Result<(), Error> {
    Error::check_raw(ret.rax as i64)
}

fn err_of(s: Status) -> Error {
    Error::from_status(s).unwrap_or(Error::Protocol)
}

/// The request an entry carried, from its input fields (the MAP `iova` is an output).
fn request_of(e: &Entry) -> Option<Request> {
    let flags = DmaFlags::from_bits(e.flags.get())?;
    match Op::from_raw(e.op.get())? {
        Op::Map => Some(Request::Map {
            gpa: e.gpa.get(),
            length: e.length.get(),
            flags,
        }),
        Op::Unmap => Some(Request::Unmap {
            iova: e.iova.get(),
            length: e.length.get(),
        }),
    }
}

impl<H: Hypervisor> PvDma<H> {
    /// Discovers the interface ([`discover`]) and builds a driver for the calling vCPU.
    /// `scratch` is guest memory the driver may overwrite for QUERY and STATS (at least
    /// [`moat_abi::dma::STATS_SIZE`] bytes for [`PvDma::stats`]); it must not be the batch
    /// area or the fault ring.
    pub fn probe(mut hv: H, scratch: GuestBuffer) -> Result<PvDma<H>, Error> {
        let info = discover(&mut hv, scratch)?;
        Ok(PvDma::new(hv, info, scratch))
    }

    /// A driver for another vCPU from an earlier discovery.
    pub fn new(hv: H, info: Discovery, scratch: GuestBuffer) -> PvDma<H> {
        PvDma {
            hv,
            info,
            scratch,
            batch: None,
            ring: None,
            next_ticket: 0,
            unsynced: false,
        }
    }

    /// What discovery found.
    pub fn info(&self) -> &Discovery {
        &self.info
    }

    /// The hypervisor handle (e.g. for raw calls in tests).
    pub fn hypervisor(&mut self) -> &mut H {
        &mut self.hv
    }

    /// Whether an invalidation the hypervisor owes is unconfirmed (a BUSY UNMAP or an
    /// `unsynced` multicall); [`PvDma::sync`] retries it.
    pub fn is_unsynced(&self) -> bool {
        self.unsynced
    }

    fn call(&mut self, call: Call, args: [u64; 6]) -> Return {
        self.hv.hypercall(call, Args(args))
    }

    fn check(&self, req: &Request) -> Result<(), Error> {
        validate_entry(&req.to_entry(), &self.info.limits)
            .map(|_| ())
            .map_err(err_of)
    }

    // ------------------------------------------------------------ single calls

    /// Maps `[gpa, gpa+len)` with one DMA_MAP hypercall and returns its IOVA. Not ordered
    /// with requests still queued in the batch.
    pub fn map(&mut self, gpa: u64, len: u64, flags: DmaFlags) -> Result<u64, Error> {
        self.check(&Request::Map {
            gpa,
            length: len,
            flags,
        })?;
        let ret = self.call(Call::DmaMap, [gpa, len, flags.bits() as u64, 0, 0, 0]);
        status_of(&ret)?;
        Ok(ret.values[0])
    }

    /// Unmaps the mapping `[iova, iova+len)` with one DMA_UNMAP hypercall. Under `strict` and
    /// `batched` the device can no longer use it when this returns `Ok`. `Err(Busy)`: the
    /// mapping is gone but its invalidation is unconfirmed; call [`PvDma::sync`].
    pub fn unmap(&mut self, iova: u64, len: u64) -> Result<(), Error> {
        self.check(&Request::Unmap { iova, length: len })?;
        let ret = self.call(Call::DmaUnmap, [iova, len, 0, 0, 0, 0]);
        let r = status_of(&ret);
        if r == Err(Error::Status(moat_abi::Error::Busy)) {
            self.unsynced = true;
        }
        r
    }

    /// Issues DMA_SYNC: completes every pending invalidation; returns how many were issued.
    pub fn sync_iotlb(&mut self) -> Result<u64, Error> {
        let ret = self.call(Call::DmaSync, [0; 6]);
        status_of(&ret)?;
        self.unsynced = false;
        Ok(ret.values[0])
    }

    /// Reads the guest's DMA counters (through the scratch buffer), resetting them if
    /// `reset`.
    pub fn stats(&mut self, reset: bool) -> Result<Stats, Error> {
        if self.scratch.len < STATS_SIZE as u64 {
            return Err(Error::BufferTooSmall);
        }
        let flags = if reset { StatsFlags::RESET } else { 0 };
        let ret = self.call(
            Call::DmaStats,
            [self.scratch.gpa, self.scratch.len, flags, 0, 0, 0],
        );
        status_of(&ret)?;
        let mut s = Stats::new_zeroed();
        self.hv.read(self.scratch.gpa, s.as_mut_bytes());
        if ret.values[0] != STATS_SIZE as u64 || s.size.get() as usize != STATS_SIZE {
            return Err(Error::Protocol);
        }
        Ok(s)
    }

    // ------------------------------------------------------------ the batch

    /// Registers `area` as this vCPU's batch area; returns its capacity in entries.
    pub fn attach_batch(&mut self, area: BatchArea) -> Result<u32, Error> {
        if self.batch.is_some_and(|b| b.pending != 0) {
            return Err(Error::BatchNotEmpty);
        }
        let ret = self.call(Call::DmaBatchRegister, [area.gpa, area.pages, 0, 0, 0, 0]);
        status_of(&ret)?;
        let want = batch_capacity(area.pages, self.info.limits.max_batch);
        let capacity = ret.values[0];
        if capacity == 0 || capacity > u64::from(want) {
            self.batch = None;
            return Err(Error::Protocol);
        }
        self.batch = Some(BatchState {
            gpa: area.gpa,
            capacity: capacity as u32,
            pending: 0,
            base: self.next_ticket,
        });
        Ok(capacity as u32)
    }

    /// Unregisters the batch area (it must be empty).
    pub fn detach_batch(&mut self) -> Result<(), Error> {
        let b = self.batch.ok_or(Error::NoBatch)?;
        if b.pending != 0 {
            return Err(Error::BatchNotEmpty);
        }
        let ret = self.call(Call::DmaBatchRegister, [0; 6]);
        self.batch = None;
        status_of(&ret)
    }

    /// Entries the batch holds (0 without a batch area).
    pub fn capacity(&self) -> u32 {
        self.batch.map_or(0, |b| b.capacity)
    }

    /// Entries queued and not yet submitted.
    pub fn pending(&self) -> u32 {
        self.batch.map_or(0, |b| b.pending)
    }

    /// Queues a MAP. If the batch is full it is submitted first (completions to `sink`); if
    /// that submission fails, the error is returned and this request is not queued. A request
    /// the ABI would refuse is refused here, without a hypercall.
    pub fn queue_map(
        &mut self,
        gpa: u64,
        len: u64,
        flags: DmaFlags,
        sink: Sink<'_>,
    ) -> Result<Ticket, Error> {
        self.queue(
            Request::Map {
                gpa,
                length: len,
                flags,
            },
            sink,
        )
    }

    /// Queues an UNMAP (see [`PvDma::queue_map`]).
    pub fn queue_unmap(&mut self, iova: u64, len: u64, sink: Sink<'_>) -> Result<Ticket, Error> {
        self.queue(Request::Unmap { iova, length: len }, sink)
    }

    /// Queues a request (see [`PvDma::queue_map`]).
    pub fn queue(&mut self, req: Request, sink: Sink<'_>) -> Result<Ticket, Error> {
        let b = self.batch.ok_or(Error::NoBatch)?;
        // Built once: the entry checked is the entry written.
        let entry = req.to_entry();
        validate_entry(&entry, &self.info.limits).map_err(err_of)?;
        if b.pending >= b.capacity {
            self.flush(sink)?;
        }
        let b = self.batch.as_mut().ok_or(Error::NoBatch)?;
        let index = b.pending;
        let gpa = b.gpa + Entry::offset_of_index(index) as u64;
        b.pending += 1;
        let ticket = Ticket(b.base + u64::from(index));
        self.next_ticket = ticket.0 + 1;
        self.hv.write(gpa, entry.as_bytes());
        Ok(ticket)
    }

    /// Submits the queued entries with MULTICALL, resuming from the returned cursor after
    /// preemption and after a failed entry (which is reported and skipped), until every entry
    /// has been run exactly once. Every queued request is reported to `sink` exactly once,
    /// in order. `Err` only if the call was refused as a whole (its entries are reported with
    /// that error and did nothing) or the hypervisor broke the ABI ([`Error::Protocol`]; the
    /// entries are reported from the statuses written into them).
    pub fn flush(&mut self, sink: Sink<'_>) -> Result<FlushReport, Error> {
        let mut b = self.batch.ok_or(Error::NoBatch)?;
        let count = b.pending;
        let mut rep = FlushReport {
            submitted: count,
            ..FlushReport::default()
        };
        if count == 0 {
            return Ok(rep);
        }
        // From here the batch is consumed: every entry gets its one completion below.
        let base = b.base;
        b.base += u64::from(count);
        b.pending = 0;
        self.batch = Some(b);
        self.hv.write(b.gpa, BatchHeader::new(count).as_bytes());

        let mut cursor = 0u32;
        let mut broken = false;
        while cursor < count {
            let ret = self.call(Call::DmaMulticall, [u64::from(cursor), 0, 0, 0, 0, 0]);
            rep.multicalls += 1;
            let Some(mr) = MulticallReturn::from_return(&ret, cursor, count) else {
                self.deliver_written(b.gpa, base, cursor..count, &mut rep, sink);
                return Err(Error::Protocol);
            };
            if mr.unsynced {
                self.unsynced = true;
                rep.unsynced = true;
            }
            for i in cursor..mr.cursor {
                let (e, req) = self.read_entry(b.gpa, i);
                let ok = e.status.get() == Status::Ok.raw() && e.done == e.length;
                let result = match req {
                    Some(_) if ok => Ok(e.iova.get()),
                    _ => {
                        broken = true;
                        Err(Error::Protocol)
                    }
                };
                self.emit(base, i, req, result, &mut rep, sink);
            }
            match mr.stop {
                MulticallStop::Done => cursor = count,
                MulticallStop::Preempted => {
                    rep.preemptions += 1;
                    cursor = mr.cursor;
                }
                MulticallStop::EntryFailed => {
                    let (_, req) = self.read_entry(b.gpa, mr.cursor);
                    self.emit(base, mr.cursor, req, Err(err_of(mr.status)), &mut rep, sink);
                    cursor = mr.cursor + 1;
                }
                MulticallStop::Rejected => {
                    let e = err_of(mr.status);
                    for i in cursor..count {
                        let (_, req) = self.read_entry(b.gpa, i);
                        self.emit(base, i, req, Err(e), &mut rep, sink);
                    }
                    return Err(e);
                }
            }
        }
        if broken {
            return Err(Error::Protocol);
        }
        Ok(rep)
    }

    /// [`PvDma::flush`], then, under the `deferred` policy or when an invalidation is
    /// unconfirmed, DMA_SYNC. When it returns `Ok`, every unmap completed so far is unusable
    /// by the device (except under `passthrough`, where guest memory stays reachable).
    pub fn sync(&mut self, sink: Sink<'_>) -> Result<FlushReport, Error> {
        let mut rep = if self.batch.is_some() {
            self.flush(sink)?
        } else {
            FlushReport::default()
        };
        if self.info.policy == Policy::Deferred || self.unsynced {
            rep.sync_invalidations = Some(self.sync_iotlb()?);
        }
        Ok(rep)
    }

    fn read_entry(&mut self, area: u64, index: u32) -> (Entry, Option<Request>) {
        let mut e = Entry::new_zeroed();
        self.hv.read(
            area + Entry::offset_of_index(index) as u64,
            e.as_mut_bytes(),
        );
        (e, request_of(&e))
    }

    fn emit(
        &mut self,
        base: u64,
        index: u32,
        req: Option<Request>,
        result: Result<u64, Error>,
        rep: &mut FlushReport,
        sink: Sink<'_>,
    ) {
        // An entry whose input fields were destroyed (only a broken hypervisor writes them)
        // is reported as a zero-length UNMAP with a protocol error.
        let (request, result) = match req {
            Some(r) => (r, result),
            None => (Request::Unmap { iova: 0, length: 0 }, Err(Error::Protocol)),
        };
        if result.is_ok() {
            rep.ok += 1;
        } else {
            rep.failed += 1;
        }
        sink(Completion {
            ticket: Ticket(base + u64::from(index)),
            request,
            result,
        });
    }

    /// After a protocol violation: reports entries from the statuses written into them.
    fn deliver_written(
        &mut self,
        area: u64,
        base: u64,
        range: core::ops::Range<u32>,
        rep: &mut FlushReport,
        sink: Sink<'_>,
    ) {
        for i in range {
            let (e, req) = self.read_entry(area, i);
            let result = match e.outcome_status() {
                Some(Status::Ok) if e.done == e.length => Ok(e.iova.get()),
                Some(s) if s != Status::Ok => Err(err_of(s)),
                _ => Err(Error::Protocol),
            };
            self.emit(base, i, req, result, rep, sink);
        }
    }

    // ------------------------------------------------------------ scatter-gather

    /// Maps every segment of `sg` (GPAs) with `flags`, all or nothing, and writes their IOVAs
    /// into `out[..sg.len()]`. Uses the batch area if one is attached (it must be empty),
    /// else one DMA_MAP per segment. On failure every segment already mapped is unmapped
    /// again and the first error is returned.
    pub fn map_sg(
        &mut self,
        sg: &[Segment],
        flags: DmaFlags,
        out: &mut [u64],
    ) -> Result<(), Error> {
        if out.len() < sg.len() {
            return Err(Error::BufferTooSmall);
        }
        let out = &mut out[..sg.len()];
        for s in sg {
            self.check(&Request::Map {
                gpa: s.addr,
                length: s.len,
                flags,
            })?;
        }
        out.fill(NOT_MAPPED);
        let mut first_err = None;
        if self.batch.is_some() {
            if self.pending() != 0 {
                return Err(Error::BatchNotEmpty);
            }
            let first = self.next_ticket;
            let mut sink = |c: Completion| {
                let i = (c.ticket.0 - first) as usize;
                match c.result {
                    Ok(iova) if i < out.len() => out[i] = iova,
                    Ok(_) => {}
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            };
            let mut r = Ok(());
            for s in sg {
                if let Err(e) = self.queue_map(s.addr, s.len, flags, &mut sink) {
                    r = Err(e);
                    break;
                }
            }
            let flushed = self.flush(&mut sink).map(|_| ());
            if let Err(e) = r.and(flushed) {
                first_err.get_or_insert(e);
            }
        } else {
            for (s, o) in sg.iter().zip(out.iter_mut()) {
                match self.map(s.addr, s.len, flags) {
                    Ok(iova) => *o = iova,
                    Err(e) => {
                        first_err = Some(e);
                        break;
                    }
                }
            }
        }
        let Some(err) = first_err else {
            return Ok(());
        };
        // Roll back what was mapped; the original error is what the caller needs.
        for (s, o) in sg.iter().zip(out.iter_mut()) {
            if *o != NOT_MAPPED {
                let _ = self.unmap(*o, s.len);
                *o = NOT_MAPPED;
            }
        }
        Err(err)
    }

    /// Unmaps every segment of `sg` (IOVAs, each a whole mapping). Tries all of them and
    /// returns the first error. Uses the batch area if one is attached (it must be empty).
    pub fn unmap_sg(&mut self, sg: &[Segment]) -> Result<(), Error> {
        let mut first_err = None;
        if self.batch.is_some() {
            if self.pending() != 0 {
                return Err(Error::BatchNotEmpty);
            }
            let mut sink = |c: Completion| {
                if let Err(e) = c.result {
                    first_err.get_or_insert(e);
                }
            };
            let mut call_err = None;
            for s in sg {
                if let Err(e) = self.queue_unmap(s.addr, s.len, &mut sink) {
                    call_err.get_or_insert(e);
                }
            }
            if let Err(e) = self.flush(&mut sink) {
                call_err.get_or_insert(e);
            }
            if let Some(e) = call_err {
                first_err.get_or_insert(e);
            }
        } else {
            for s in sg {
                if let Err(e) = self.unmap(s.addr, s.len) {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    // ------------------------------------------------------------ faults

    /// Registers the guest's fault ring; returns its capacity in records.
    pub fn attach_fault_ring(&mut self, area: FaultRingArea) -> Result<u32, Error> {
        let ret = self.call(
            Call::DmaFaultRingRegister,
            [area.gpa, area.pages, u64::from(area.vector), 0, 0, 0],
        );
        status_of(&ret)?;
        let capacity = ret.values[0];
        let mut h = FaultRingHeader::new_zeroed();
        self.hv.read(area.gpa, h.as_mut_bytes());
        if capacity == 0
            || capacity > u64::from(fault_ring_capacity(area.pages))
            || h.magic.get() != FAULT_RING_MAGIC
            || h.version.get() != FAULT_RING_VERSION
            || h.record_size.get() as usize != FAULT_RECORD_SIZE
            || u64::from(h.capacity.get()) != capacity
            || h.pending() != Some(0)
        {
            self.ring = None;
            return Err(Error::Protocol);
        }
        self.ring = Some(RingState {
            gpa: area.gpa,
            capacity: h.capacity.get(),
            consumer: h.consumer.get(),
            dropped_seen: h.dropped.get(),
        });
        Ok(h.capacity.get())
    }

    /// Unregisters the fault ring.
    pub fn detach_fault_ring(&mut self) -> Result<(), Error> {
        self.ring.take().ok_or(Error::NoFaultRing)?;
        let ret = self.call(Call::DmaFaultRingRegister, [0; 6]);
        status_of(&ret)
    }

    /// Consumes the records the hypervisor produced since the last poll, oldest first.
    pub fn poll_faults(&mut self, f: &mut dyn FnMut(FaultRecord)) -> Result<FaultPoll, Error> {
        let mut r = self.ring.ok_or(Error::NoFaultRing)?;
        let mut h = FaultRingHeader::new_zeroed();
        self.hv.read(r.gpa, h.as_mut_bytes());
        let (producer, dropped) = (h.producer.get(), h.dropped.get());
        let n = producer.wrapping_sub(r.consumer);
        if n > r.capacity || dropped < r.dropped_seen {
            return Err(Error::Protocol);
        }
        for k in 0..n {
            let at = FaultRingHeader::record_offset(r.capacity, r.consumer.wrapping_add(k))
                .ok_or(Error::Protocol)?;
            let mut rec = FaultRecord::new_zeroed();
            self.hv.read(r.gpa + at as u64, rec.as_mut_bytes());
            f(rec);
        }
        r.consumer = producer;
        self.hv.write(
            r.gpa + FaultRingHeader::CONSUMER_OFFSET as u64,
            &r.consumer.to_le_bytes(),
        );
        let new_drops = dropped - r.dropped_seen;
        r.dropped_seen = dropped;
        self.ring = Some(r);
        Ok(FaultPoll {
            records: n,
            dropped: new_drops,
        })
    }
}
