//! An I/O queue pair: submission of read and write bursts (data buffers mapped per I/O),
//! completion by polling the phase tag (buffers unmapped per completion burst).

use moat_pvdma::Hypervisor;

use crate::command::Command;
use crate::controller::{read_completion, Namespace};
use crate::dma::{Buffer, Mapper};
use crate::error::Wait;
use crate::platform::Platform;
use crate::prp::{self, LIST_ENTRIES, PAGE};
use crate::queue::{claim, Cids, CqCursor, SqRing};
use crate::{regs, Error};

/// Entries of each I/O submission and completion queue.
pub const IO_ENTRIES: u16 = 64;
/// Commands a queue has outstanding at most (each has its own PRP list page).
pub const MAX_DEPTH: usize = 32;
/// Pages of [`QueueMemory`]: submission queue, completion queue, one PRP list page per
/// command slot.
pub const QUEUE_PAGES: u64 = 2 + MAX_DEPTH as u64;

/// Memory for one I/O queue pair: [`QUEUE_PAGES`] pages of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueMemory {
    /// First byte, page aligned.
    pub gpa: u64,
}

/// One read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Write to the disk (the device reads the buffer); else read (the device writes it).
    pub write: bool,
    /// First logical block.
    pub lba: u64,
    /// The buffer: guest-physical, page aligned.
    pub gpa: u64,
    /// Bytes: whole blocks, at most [`prp::MAX_TRANSFER`].
    pub len: u64,
    /// Returned with the completion.
    pub tag: u64,
}

impl Request {
    /// Bytes its buffer's mapping covers: `len` rounded up to whole pages.
    const fn mapped_len(&self) -> u64 {
        self.len.div_ceil(PAGE) * PAGE
    }
}

/// What one [`IoQueue::cycle`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cycle {
    /// Commands completed (reported to `done`).
    pub completed: usize,
    /// Commands submitted.
    pub submitted: usize,
}

/// The buffers of a burst of requests and their block counts.
struct Burst {
    bufs: [Buffer; MAX_DEPTH],
    blocks: [u32; MAX_DEPTH],
}

impl Burst {
    const fn empty() -> Self {
        Burst {
            bufs: [Buffer {
                gpa: 0,
                len: 0,
                device_writes: false,
            }; MAX_DEPTH],
            blocks: [0u32; MAX_DEPTH],
        }
    }
}

/// Requests whose buffers are mapped and that wait for room in the queue (see
/// [`IoQueue::wait_pipelined`]): the first `n` of each array, oldest first. Owned by the
/// caller of pipelined cycles (not by the queue: only they need its ~1.5 KiB).
pub struct Staged {
    reqs: [Request; MAX_DEPTH],
    iovas: [u64; MAX_DEPTH],
    n: usize,
}

impl Staged {
    const NONE: Request = Request {
        write: false,
        lba: 0,
        gpa: 0,
        len: 0,
        tag: 0,
    };

    /// Nothing staged.
    pub const fn empty() -> Self {
        Staged {
            reqs: [Self::NONE; MAX_DEPTH],
            iovas: [0; MAX_DEPTH],
            n: 0,
        }
    }

    /// Requests staged (mapped, not submitted yet).
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Drops the first `k` (submitted).
    fn consume(&mut self, k: usize) {
        let n = self.n;
        self.reqs.copy_within(k..n, 0);
        self.iovas.copy_within(k..n, 0);
        self.n = n - k;
    }

    /// Appends `reqs` (their buffers mapped at `iovas`).
    fn extend(&mut self, reqs: &[Request], iovas: &[u64]) {
        let (n, k) = (self.n, reqs.len());
        self.reqs[n..n + k].copy_from_slice(reqs);
        self.iovas[n..n + k].copy_from_slice(&iovas[..k]);
        self.n = n + k;
    }
}

/// Completions one cycle took: (tag, IOVA, verdict) each, the buffers to unmap, and whether
/// an identifier that was not outstanding came back.
struct Taken {
    got: [(u64, u64, Result<(), Error>); MAX_DEPTH],
    n: usize,
    unmaps: [(u64, u64); MAX_DEPTH],
    u: usize,
    stray: bool,
}

/// What [`IoQueue::exchange_for`] did: the new requests (the first `k`), their IOVAs and
/// buffers, and the outcomes of the unmaps and of the maps.
struct Exchanged {
    reqs: [Request; MAX_DEPTH],
    k: usize,
    iovas: [u64; MAX_DEPTH],
    burst: Burst,
    unmapped: Result<(), Error>,
    mapped: Result<(), Error>,
}

impl Taken {
    /// Reports each completion to `done`, with `unmapped` (the outcome of its buffer's
    /// unmap) folded into its verdict.
    fn report(&self, unmapped: Result<(), Error>, done: &mut dyn FnMut(Done)) {
        for &(tag, iova, result) in &self.got[..self.n] {
            done(Done {
                tag,
                iova,
                result: result.and(unmapped),
            });
        }
    }

    /// The tags of the completions.
    fn tags(&self) -> [u64; MAX_DEPTH] {
        let mut tags = [0u64; MAX_DEPTH];
        for (t, g) in tags.iter_mut().zip(&self.got[..self.n]) {
            *t = g.0;
        }
        tags
    }
}

/// A finished command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// The request's tag.
    pub tag: u64,
    /// The IOVA its buffer had (unmapped by now; 0 for a command submitted raw).
    pub iova: u64,
    /// The controller's verdict (and, if the buffer's unmap failed, that error).
    pub result: Result<(), Error>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    tag: u64,
    iova: u64,
    len: u64,
    /// Whether the buffer was mapped by the queue (unmapped on completion).
    mapped: bool,
}

/// One I/O submission/completion queue pair. Owned by one vCPU at a time; every call takes
/// that vCPU's [`Mapper`].
pub struct IoQueue {
    qid: u16,
    stride: usize,
    ns: Namespace,
    mem: QueueMemory,
    sq_iova: u64,
    cq_iova: u64,
    lists_iova: u64,
    sq: SqRing,
    cq: CqCursor,
    cids: Cids,
    slots: [Slot; MAX_DEPTH],
    /// Completions past the head known to be posted (see [`IoQueue::ready`]).
    seen: u16,
    /// Time a command may take before [`IoQueue::wait`] gives up, microseconds.
    pub timeout_us: u64,
    /// How long [`IoQueue::wait_cycle`] waits for its `min` completions when fewer (but at
    /// least one) are posted, microseconds from the start of the wait: a slow controller
    /// is not held to the burst size.
    pub patience_us: u64,
}

impl IoQueue {
    /// Zeroes and maps the queue memory (the controller side is created by
    /// [`crate::Controller::create_io_queue`]).
    pub(crate) fn map<P: Platform, H: Hypervisor>(
        p: &mut P,
        m: &mut Mapper<H>,
        qid: u16,
        mem: QueueMemory,
        stride: usize,
        ns: Namespace,
    ) -> Result<IoQueue, Error> {
        p.mem_zero(mem.gpa, 2 * PAGE);
        let parts = [
            Buffer {
                gpa: mem.gpa,
                len: PAGE,
                device_writes: false,
            },
            Buffer {
                gpa: mem.gpa + PAGE,
                len: PAGE,
                device_writes: true,
            },
            Buffer {
                gpa: mem.gpa + 2 * PAGE,
                len: MAX_DEPTH as u64 * PAGE,
                device_writes: false,
            },
        ];
        let mut iovas = [0u64; 3];
        for (k, b) in parts.iter().enumerate() {
            match m.map_static(*b) {
                Ok(i) => iovas[k] = i,
                Err(e) => {
                    for j in 0..k {
                        let _ = m.unmap_static(iovas[j], parts[j].len);
                    }
                    return Err(e);
                }
            }
        }
        Ok(IoQueue {
            qid,
            stride,
            ns,
            mem,
            sq_iova: iovas[0],
            cq_iova: iovas[1],
            lists_iova: iovas[2],
            sq: SqRing::new(IO_ENTRIES),
            cq: CqCursor::new(IO_ENTRIES),
            cids: Cids::new(MAX_DEPTH as u16),
            slots: [Slot::default(); MAX_DEPTH],
            seen: 0,
            timeout_us: 5_000_000,
            patience_us: 1000,
        })
    }

    /// Unmaps the queue memory.
    pub(crate) fn unmap<H: Hypervisor>(&mut self, m: &mut Mapper<H>) -> Result<(), Error> {
        let a = m.unmap_static(self.sq_iova, PAGE);
        let b = m.unmap_static(self.cq_iova, PAGE);
        let c = m.unmap_static(self.lists_iova, MAX_DEPTH as u64 * PAGE);
        a.and(b).and(c)
    }

    /// The queue identifier.
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// The namespace the queue reads and writes.
    pub fn namespace(&self) -> Namespace {
        self.ns
    }

    pub(crate) fn sq_iova(&self) -> u64 {
        self.sq_iova
    }

    pub(crate) fn cq_iova(&self) -> u64 {
        self.cq_iova
    }

    /// Commands submitted and not completed.
    pub fn outstanding(&self) -> u32 {
        self.cids.outstanding()
    }

    /// Commands that can still be submitted.
    pub fn room(&self) -> usize {
        MAX_DEPTH - self.cids.outstanding() as usize
    }

    fn check(&self, r: &Request) -> Result<u32, Error> {
        let bs = u64::from(self.ns.block_size);
        if r.len == 0
            || !r.len.is_multiple_of(bs)
            || r.len > prp::MAX_TRANSFER
            || !r.gpa.is_multiple_of(PAGE)
        {
            return Err(Error::BadTransfer);
        }
        Ok((r.len / bs) as u32)
    }

    /// Submits every request of `reqs` (at most [`IoQueue::room`]): maps their buffers as one
    /// burst, writes the commands and rings the doorbell once. All or nothing: on an error
    /// nothing was submitted and nothing stays mapped.
    pub fn submit<P: Platform, H: Hypervisor>(
        &mut self,
        p: &mut P,
        m: &mut Mapper<H>,
        reqs: &[Request],
    ) -> Result<(), Error> {
        if reqs.len() > self.room() {
            return Err(Error::QueueFull);
        }
        let burst = self.prepare(reqs)?;
        let mut iovas = [0u64; MAX_DEPTH];
        m.map_burst(&burst.bufs[..reqs.len()], &mut iovas[..reqs.len()])?;
        self.post(p, reqs, &burst, &iovas)
    }

    /// Checks every request of `reqs` and describes its buffer.
    fn prepare(&self, reqs: &[Request]) -> Result<Burst, Error> {
        let mut b = Burst::empty();
        for (k, r) in reqs.iter().enumerate() {
            b.blocks[k] = self.check(r)?;
            b.bufs[k] = Buffer {
                gpa: r.gpa,
                len: r.mapped_len(),
                device_writes: !r.write,
            };
        }
        Ok(b)
    }

    /// Writes the commands of `reqs` (their buffers mapped at `iovas`) and rings the
    /// submission doorbell once.
    fn post<P: Platform>(
        &mut self,
        p: &mut P,
        reqs: &[Request],
        burst: &Burst,
        iovas: &[u64],
    ) -> Result<(), Error> {
        for (k, r) in reqs.iter().enumerate() {
            let cmd = Command::rw(r.write, self.ns.nsid, r.lba, burst.blocks[k]);
            // Room was checked: a slot and a ring entry are free.
            let cid = self.cids.alloc().ok_or(Error::QueueFull)?;
            self.slots[cid as usize] = Slot {
                tag: r.tag,
                iova: iovas[k],
                len: burst.bufs[k].len,
                mapped: true,
            };
            self.push(p, cid, cmd, iovas[k], burst.bufs[k].len)?;
        }
        if !reqs.is_empty() {
            p.write32(
                regs::sq_doorbell(self.qid, self.stride),
                u32::from(self.sq.tail()),
            );
        }
        Ok(())
    }
    /// Builds the PRPs of command slot `cid` for `len` bytes at `iova` and writes the command
    /// at the submission tail (without ringing the doorbell).
    fn push<P: Platform>(
        &mut self,
        p: &mut P,
        cid: u16,
        cmd: Command,
        iova: u64,
        len: u64,
    ) -> Result<(), Error> {
        let mut list = [0u64; LIST_ENTRIES];
        let list_gpa = self.mem.gpa + (2 + u64::from(cid)) * PAGE;
        let list_iova = self.lists_iova + u64::from(cid) * PAGE;
        let prps = prp::build(iova, len, &mut list, list_iova)?;
        for (i, e) in list.iter().take(prps.list_entries).enumerate() {
            p.mem_write32(list_gpa + 8 * i as u64, *e as u32);
            p.mem_write32(list_gpa + 8 * i as u64 + 4, (*e >> 32) as u32);
        }
        let slot = self.sq.push().ok_or(Error::QueueFull)?;
        p.mem_write(
            self.mem.gpa + u64::from(slot) * 64,
            &cmd.with_cid(cid).with_prps(prps.prp1, prps.prp2).to_bytes(),
        );
        Ok(())
    }

    /// Submits `cmd` as it is (its PRPs untouched, no buffer mapped for it): for tests that
    /// point the device at memory on purpose. Returns the command identifier.
    pub fn submit_raw<P: Platform>(
        &mut self,
        p: &mut P,
        cmd: Command,
        tag: u64,
    ) -> Result<u16, Error> {
        let (cid, slot) = claim(&mut self.cids, &mut self.sq).ok_or(Error::QueueFull)?;
        self.slots[cid as usize] = Slot {
            tag,
            ..Slot::default()
        };
        p.mem_write(
            self.mem.gpa + u64::from(slot) * 64,
            &cmd.with_cid(cid).to_bytes(),
        );
        p.write32(
            regs::sq_doorbell(self.qid, self.stride),
            u32::from(self.sq.tail()),
        );
        Ok(cid)
    }

    /// Completions the controller has posted and [`IoQueue::reap`] has not taken yet (the
    /// ring is only read, nothing consumed).
    pub fn ready<P: Platform>(&mut self, p: &mut P) -> usize {
        let outstanding = self.outstanding() as usize;
        let mut c = self.cq;
        for _ in 0..self.seen {
            c.advance();
        }
        while (self.seen as usize) < outstanding
            && read_completion(p, self.mem.gpa + PAGE, c.head(), &c).is_some()
        {
            c.advance();
            self.seen += 1;
        }
        self.seen as usize
    }

    /// Takes every completion the controller has posted, unmaps their buffers as one burst,
    /// and reports each to `done`. Returns how many completed.
    pub fn reap<P: Platform, H: Hypervisor>(
        &mut self,
        p: &mut P,
        m: &mut Mapper<H>,
        done: &mut dyn FnMut(Done),
    ) -> Result<usize, Error> {
        Ok(self.cycle(p, m, MAX_DEPTH, &mut |_, _| 0, done)?.completed)
    }

    /// One poll cycle with one hypercall: takes the completions the controller has posted
    /// (at most `max`, oldest first; the rest stay for the next cycle), asks `refill` for the next burst (given the completed requests' tags and room for as
    /// many requests as the queue then holds; it returns how many it wrote), unmaps the
    /// completed buffers and maps the burst's buffers in one [`Mapper::exchange`] (one
    /// MULTICALL under `batched`, the unmaps first), submits the burst (one doorbell), and
    /// only then reports each completion to `done`: when `done` sees a completion, its
    /// buffer's unmap has returned (under `strict` and `batched`: invalidated), so the
    /// device cannot reach it any more.
    ///
    /// The burst is all or nothing: on an error (a bad request, a failed map) nothing of it
    /// was submitted and nothing of it stays mapped; the completions are still reported.
    /// `refill` is not asked after a completion for an identifier that was not outstanding
    /// (the cycle then fails with [`Error::BadCompletion`]).
    pub fn cycle<P: Platform, H: Hypervisor>(
        &mut self,
        p: &mut P,
        m: &mut Mapper<H>,
        max: usize,
        refill: &mut dyn FnMut(&[u64], &mut [Request]) -> usize,
        done: &mut dyn FnMut(Done),
    ) -> Result<Cycle, Error> {
        let t = self.take(p, max);
        // After a stray completion (an identifier not outstanding) nothing more is submitted:
        // the cycle fails with BadCompletion once the completions are reported.
        let x = self.exchange_for(m, &t, self.room(), t.stray, refill);
        let k = x.k;
        let submitted = x
            .mapped
            .and_then(|()| self.post(p, &x.reqs[..k], &x.burst, &x.iovas));
        let unmapped = x.unmapped;
        t.report(unmapped, done);
        if t.stray {
            return Err(Error::BadCompletion);
        }
        submitted?;
        Ok(Cycle {
            completed: t.n,
            submitted: k,
        })
    }

    /// Takes the completions the controller has posted (at most `max`, oldest first) and
    /// moves the completion doorbell past them.
    fn take<P: Platform>(&mut self, p: &mut P, max: usize) -> Taken {
        let max = max.clamp(1, MAX_DEPTH);
        let mut t = Taken {
            got: [(0u64, 0u64, Ok(())); MAX_DEPTH],
            n: 0,
            unmaps: [(0u64, 0u64); MAX_DEPTH],
            u: 0,
            stray: false,
        };
        while t.n < max {
            let Some(c) = read_completion(p, self.mem.gpa + PAGE, self.cq.head(), &self.cq) else {
                break;
            };
            self.cq.advance();
            self.seen = self.seen.saturating_sub(1);
            self.sq.set_head(c.sq_head);
            if !self.cids.free(c.cid) {
                t.stray = true;
                continue;
            }
            let s = self.slots[c.cid as usize];
            if s.mapped {
                t.unmaps[t.u] = (s.iova, s.len);
                t.u += 1;
            }
            t.got[t.n] = (s.tag, s.iova, c.result().map_err(Error::Controller));
            t.n += 1;
        }
        if t.n != 0 || t.stray {
            p.write32(
                regs::cq_doorbell(self.qid, self.stride),
                u32::from(self.cq.head()),
            );
        }
        t
    }

    /// Asks `refill` for at most `room` requests after `t`'s completions (none when
    /// `skip`), then unmaps `t`'s buffers and maps the new requests' in one
    /// [`Mapper::exchange`] (all or nothing for the maps).
    fn exchange_for<H: Hypervisor>(
        &self,
        m: &mut Mapper<H>,
        t: &Taken,
        room: usize,
        skip: bool,
        refill: &mut dyn FnMut(&[u64], &mut [Request]) -> usize,
    ) -> Exchanged {
        let mut x = Exchanged {
            reqs: [Staged::NONE; MAX_DEPTH],
            k: 0,
            iovas: [0u64; MAX_DEPTH],
            burst: Burst::empty(),
            unmapped: Ok(()),
            mapped: Ok(()),
        };
        if !skip {
            x.k = refill(&t.tags()[..t.n], &mut x.reqs[..room]).min(room);
        }
        let k = x.k;
        match self.prepare(&x.reqs[..k]) {
            Ok(burst) => {
                let r = m.exchange(&t.unmaps[..t.u], &burst.bufs[..k], &mut x.iovas[..k]);
                (x.burst, x.unmapped, x.mapped) = (burst, r.unmap, r.map);
            }
            Err(e) => (x.unmapped, x.mapped) = (m.unmap_burst(&t.unmaps[..t.u]), Err(e)),
        }
        x
    }

    /// A poll cycle that keeps the protection work off the controller's path: the buffers of
    /// the next burst are mapped one cycle ahead. It waits for `min` completions as
    /// [`IoQueue::wait_cycle`] does, takes the completions the controller has posted (at
    /// most `max`; the pair `(min, max)`), submits the requests mapped by the previous cycle (while the
    /// queue holds fewer than `depth` commands; the rest stay staged), then asks `refill` for
    /// the next burst (given the completed tags and room for `depth` staged requests; it
    /// returns how many it wrote) and, in one [`Mapper::exchange`] (one MULTICALL under
    /// `batched`), unmaps the completed buffers and maps the new burst's, which stays staged
    /// until the next cycle; only then it reports each completion to `done` (its buffer's
    /// unmap has returned, as in [`IoQueue::cycle`]). So the controller works on the burst
    /// just submitted while the hypervisor unmaps and maps; every buffer is still mapped
    /// before its command is submitted and unmapped before its completion is reported.
    ///
    /// On an error of the new burst (a bad request, a failed map) nothing of it stays
    /// mapped and the completions are still reported; [`IoQueue::unstage`] unmaps what is
    /// staged (in `staged`, which the caller keeps across cycles).
    #[allow(clippy::too_many_arguments)]
    pub fn wait_pipelined<P: Platform, H: Hypervisor>(
        &mut self,
        p: &mut P,
        m: &mut Mapper<H>,
        staged: &mut Staged,
        depth: usize,
        (min, max): (usize, usize),
        refill: &mut dyn FnMut(&[u64], &mut [Request]) -> usize,
        done: &mut dyn FnMut(Done),
    ) -> Result<Cycle, Error> {
        let depth = depth.clamp(1, MAX_DEPTH);
        self.wait_ready(p, min)?;
        let t = self.take(p, max);
        let fits = depth.saturating_sub(self.outstanding() as usize);
        let k = if t.stray { 0 } else { staged.n.min(fits) };
        // The staged requests were checked when they were staged: their burst is rebuilt.
        let (reqs, iovas) = (staged.reqs, staged.iovas);
        let posted = self
            .prepare(&reqs[..k])
            .and_then(|b| self.post(p, &reqs[..k], &b, &iovas[..k]));
        let sent = if posted.is_ok() { k } else { 0 };
        staged.consume(sent);
        let want = depth - staged.n;
        let x = self.exchange_for(m, &t, want, t.stray || posted.is_err(), refill);
        if x.mapped.is_ok() {
            staged.extend(&x.reqs[..x.k], &x.iovas);
        }
        let (unmapped, mapped) = (x.unmapped, x.mapped);
        t.report(unmapped, done);
        if t.stray {
            return Err(Error::BadCompletion);
        }
        posted?;
        mapped?;
        Ok(Cycle {
            completed: t.n,
            submitted: sent,
        })
    }

    /// Reaps until at least one command completed, or fails with a timeout after
    /// [`IoQueue::timeout_us`] without any (the commands then stay outstanding, their
    /// buffers mapped: the controller may still use them). Also fails at once on a fatal
    /// controller status.
    pub fn wait<P: Platform, H: Hypervisor>(
        &mut self,
        p: &mut P,
        m: &mut Mapper<H>,
        done: &mut dyn FnMut(Done),
    ) -> Result<usize, Error> {
        Ok(self
            .wait_cycle(p, m, 1, MAX_DEPTH, &mut |_, _| 0, done)?
            .completed)
    }

    /// Waits until `min` completions are posted (at most the commands outstanding; at
    /// least one), then runs one [`IoQueue::cycle`] that takes at most `max` of them. Once
    /// [`IoQueue::patience_us`] has passed with fewer than `min` but at least one posted,
    /// runs the cycle with those; once [`IoQueue::timeout_us`] has passed with none, fails
    /// with a timeout (the commands then stay outstanding, their buffers mapped: the controller may
    /// still use them). Fails at once on a fatal controller status. With nothing
    /// outstanding, runs the cycle at once (it only submits).
    pub fn wait_cycle<P: Platform, H: Hypervisor>(
        &mut self,
        p: &mut P,
        m: &mut Mapper<H>,
        min: usize,
        max: usize,
        refill: &mut dyn FnMut(&[u64], &mut [Request]) -> usize,
        done: &mut dyn FnMut(Done),
    ) -> Result<Cycle, Error> {
        self.wait_ready(p, min)?;
        self.cycle(p, m, max, refill, done)
    }

    /// Waits until `min` completions are posted (see [`IoQueue::wait_cycle`]); at once
    /// with nothing outstanding.
    fn wait_ready<P: Platform>(&mut self, p: &mut P, min: usize) -> Result<(), Error> {
        let want = min.clamp(1, (self.outstanding() as usize).max(1));
        if self.outstanding() == 0 {
            return Ok(());
        }
        let t0 = p.now_us();
        let mut checked = t0;
        let mut polls = 0u32;
        while self.ready(p) < want {
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(64) {
                let now = p.now_us();
                // CSTS is an MMIO read (slow on hardware, a device-lock round trip under
                // emulation): once a millisecond is enough to notice a fatal controller.
                if now.wrapping_sub(checked) >= 1000 {
                    checked = now;
                    let csts = regs::Csts(p.read32(regs::CSTS));
                    if csts.fatal() || csts.absent() {
                        return Err(Error::Fatal);
                    }
                }
                let waited = now.wrapping_sub(t0);
                if self.seen != 0 && waited > self.patience_us {
                    break;
                }
                if waited > self.timeout_us {
                    return Err(Error::Timeout(Wait::Io));
                }
            }
            core::hint::spin_loop();
        }
        Ok(())
    }

    /// Unmaps the buffers of the requests `staged` holds (dropped unsubmitted).
    pub fn unstage<H: Hypervisor>(m: &mut Mapper<H>, staged: &mut Staged) -> Result<(), Error> {
        let mut unmaps = [(0u64, 0u64); MAX_DEPTH];
        for (k, (r, &iova)) in staged
            .reqs
            .iter()
            .zip(&staged.iovas)
            .take(staged.n)
            .enumerate()
        {
            unmaps[k] = (iova, r.mapped_len());
        }
        let n = core::mem::take(&mut staged.n);
        m.unmap_burst(&unmaps[..n])
    }

    /// After the controller was disabled (it no longer touches memory), forgets every
    /// outstanding command and unmaps its buffer. Returns the commands forgotten (requests
    /// staged by [`IoQueue::wait_pipelined`]: [`IoQueue::unstage`]).
    pub fn abandon<H: Hypervisor>(&mut self, m: &mut Mapper<H>) -> Result<u32, Error> {
        let mut unmaps = [(0u64, 0u64); MAX_DEPTH];
        let mut u = 0;
        let mut n = 0;
        for cid in 0..MAX_DEPTH as u16 {
            if self.cids.free(cid) {
                n += 1;
                let s = self.slots[cid as usize];
                if s.mapped {
                    unmaps[u] = (s.iova, s.len);
                    u += 1;
                }
            }
        }
        m.unmap_burst(&unmaps[..u])?;
        Ok(n)
    }
}
