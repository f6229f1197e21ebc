//! The controller: reset and enable, the admin queue, identify, I/O queue creation.

use moat_pvdma::Hypervisor;

use crate::command::{cns, Command, Completion};
use crate::dma::{Buffer, Mapper};
use crate::error::Wait;
use crate::io::IoQueue;
use crate::platform::Platform;
use crate::prp::PAGE;
use crate::queue::{claim, Cids, CqCursor, SqRing};
use crate::regs::{self, Cap, Cc, Csts};
use crate::Error;

/// Entries of the admin submission and completion queues.
pub const ADMIN_ENTRIES: u16 = 16;
/// Pages of [`AdminMemory`]: submission queue, completion queue, identify buffer.
pub const ADMIN_PAGES: u64 = 3;
/// Most I/O queue pairs the driver creates.
pub const MAX_IO_QUEUES: u16 = 8;

/// Memory for the admin queues and the identify buffer: [`ADMIN_PAGES`] pages of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminMemory {
    /// First byte, page aligned.
    pub gpa: u64,
}

/// The namespace the driver uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Namespace {
    /// Its identifier.
    pub nsid: u32,
    /// Size in logical blocks.
    pub blocks: u64,
    /// Bytes per logical block.
    pub block_size: u32,
}

/// What Identify Controller reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// PCI vendor id.
    pub vid: u16,
    /// Serial number (ASCII, space padded).
    pub serial: [u8; 20],
    /// Model number (ASCII, space padded).
    pub model: [u8; 40],
    /// Maximum data transfer size in bytes (0: no limit).
    pub max_transfer: u64,
    /// Namespaces.
    pub namespaces: u32,
    /// Version register.
    pub version: u32,
}

impl Identity {
    /// The serial number without padding.
    pub fn serial(&self) -> &str {
        trim(&self.serial)
    }
    /// The model number without padding.
    pub fn model(&self) -> &str {
        trim(&self.model)
    }
}

fn trim(b: &[u8]) -> &str {
    core::str::from_utf8(b)
        .unwrap_or("?")
        .trim_end_matches([' ', '\0'])
}

/// The controller and its admin queue.
pub struct Controller {
    cap: Cap,
    stride: usize,
    mem: AdminMemory,
    sq_iova: u64,
    cq_iova: u64,
    sq: SqRing,
    cq: CqCursor,
    cids: Cids,
    identity: Identity,
    namespace: Namespace,
    io_queues: u16,
    live: bool,
    /// Time an admin command may take, microseconds.
    pub admin_timeout_us: u64,
}

impl Controller {
    /// Resets and enables the controller at `p` with its admin queues in `mem` (mapped
    /// through `m` for the controller's lifetime), identifies it and namespace 1, and asks
    /// for `io_queues` I/O queue pairs.
    pub fn init<P: Platform, H: Hypervisor>(
        p: &mut P,
        m: &mut Mapper<H>,
        mem: AdminMemory,
        io_queues: u16,
    ) -> Result<Controller, Error> {
        if io_queues == 0 || io_queues > MAX_IO_QUEUES {
            return Err(Error::TooManyQueues);
        }
        let cap = Cap(p.read64(regs::CAP));
        if Csts(p.read32(regs::CSTS)).absent() {
            return Err(Error::Absent);
        }
        if !cap.nvm_command_set() {
            return Err(Error::Unsupported("the NVM command set"));
        }
        if cap.min_page_size() > PAGE || cap.max_page_size() < PAGE {
            return Err(Error::Unsupported("4 KiB memory pages"));
        }
        if cap.max_queue_entries() < u32::from(crate::io::IO_ENTRIES) {
            return Err(Error::Unsupported("queues of 64 entries"));
        }
        disable(p, cap)?;
        let sq_gpa = mem.gpa;
        let cq_gpa = mem.gpa + PAGE;
        p.mem_zero(sq_gpa, 2 * PAGE);
        let sq_iova = m.map_static(Buffer {
            gpa: sq_gpa,
            len: PAGE,
            device_writes: false,
        })?;
        let cq_iova = match m.map_static(Buffer {
            gpa: cq_gpa,
            len: PAGE,
            device_writes: true,
        }) {
            Ok(i) => i,
            Err(e) => {
                let _ = m.unmap_static(sq_iova, PAGE);
                return Err(e);
            }
        };
        let mut c = Controller {
            cap,
            stride: cap.doorbell_stride(),
            mem,
            sq_iova,
            cq_iova,
            sq: SqRing::new(ADMIN_ENTRIES),
            cq: CqCursor::new(ADMIN_ENTRIES),
            cids: Cids::new(ADMIN_ENTRIES - 1),
            identity: Identity {
                vid: 0,
                serial: [0; 20],
                model: [0; 40],
                max_transfer: 0,
                namespaces: 0,
                version: 0,
            },
            namespace: Namespace {
                nsid: 0,
                blocks: 0,
                block_size: 0,
            },
            io_queues: 0,
            live: true,
            admin_timeout_us: 5_000_000,
        };
        match c.bring_up(p, m, io_queues) {
            Ok(()) => Ok(c),
            Err(e) => {
                let _ = disable(p, cap);
                let _ = m.unmap_static(sq_iova, PAGE);
                let _ = m.unmap_static(cq_iova, PAGE);
                Err(e)
            }
        }
    }

    fn bring_up<P: Platform, H: Hypervisor>(
        &mut self,
        p: &mut P,
        m: &mut Mapper<H>,
        io_queues: u16,
    ) -> Result<(), Error> {
        p.write32(regs::INTMS, u32::MAX);
        p.write32(
            regs::AQA,
            regs::aqa(u32::from(ADMIN_ENTRIES), u32::from(ADMIN_ENTRIES)),
        );
        p.write64(regs::ASQ, self.sq_iova);
        p.write64(regs::ACQ, self.cq_iova);
        p.write32(regs::CC, Cc::enabled_4k().0);
        wait_ready(p, self.cap, true)?;
        self.identity.version = p.read32(regs::VS);
        // Identify Controller.
        let buf = self.mem.gpa + 2 * PAGE;
        self.identify(p, m, cns::CONTROLLER, 0)?;
        let w = |p: &mut P, off: u64| p.mem_read32(buf + off);
        self.identity.vid = w(p, 0) as u16;
        for (i, b) in self.identity.serial.iter_mut().enumerate() {
            *b = (w(p, (4 + i as u64) & !3) >> (8 * ((4 + i) % 4))) as u8;
        }
        for (i, b) in self.identity.model.iter_mut().enumerate() {
            *b = (w(p, (24 + i as u64) & !3) >> (8 * ((24 + i) % 4))) as u8;
        }
        let mdts = (w(p, 76) >> 8) as u8;
        self.identity.max_transfer = if mdts == 0 {
            0
        } else {
            self.cap.min_page_size() << mdts
        };
        self.identity.namespaces = w(p, 516);
        if self.identity.namespaces == 0 {
            return Err(Error::NoNamespace);
        }
        // Identify Namespace 1.
        self.identify(p, m, cns::NAMESPACE, 1)?;
        let blocks = u64::from(w(p, 0)) | u64::from(w(p, 4)) << 32;
        let flbas = (w(p, 24) >> 16) as u8 & 0xf;
        let lbaf = w(p, 128 + 4 * u64::from(flbas));
        let lbads = (lbaf >> 16) as u8;
        let metadata = lbaf as u16;
        if blocks == 0 || !(9..=12).contains(&lbads) || metadata != 0 {
            return Err(Error::NoNamespace);
        }
        self.namespace = Namespace {
            nsid: 1,
            blocks,
            block_size: 1 << lbads,
        };
        // Number of Queues: the controller may grant fewer.
        let granted = self.admin(p, Command::set_queue_count(io_queues, io_queues))?;
        let (sq, cq) = ((granted & 0xffff) + 1, (granted >> 16) + 1);
        self.io_queues = io_queues.min(sq as u16).min(cq as u16);
        Ok(())
    }

    fn identify<P: Platform, H: Hypervisor>(
        &mut self,
        p: &mut P,
        m: &mut Mapper<H>,
        cns: u32,
        nsid: u32,
    ) -> Result<(), Error> {
        let buf = Buffer {
            gpa: self.mem.gpa + 2 * PAGE,
            len: PAGE,
            device_writes: true,
        };
        let mut iova = [0u64];
        m.map_burst(&[buf], &mut iova)?;
        let r = self.admin(p, Command::identify(cns, nsid, iova[0]));
        let u = m.unmap_burst(&[(iova[0], PAGE)]);
        r.and(u).map(|_| ())
    }

    /// What Identify Controller reported.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The namespace in use.
    pub fn namespace(&self) -> Namespace {
        self.namespace
    }

    /// I/O queue pairs the controller granted (at most what [`Controller::init`] asked).
    pub fn io_queues(&self) -> u16 {
        self.io_queues
    }

    /// The capabilities register.
    pub fn cap(&self) -> Cap {
        self.cap
    }

    /// Submits `cmd` on the admin queue and waits for its completion at most
    /// `admin_timeout_us`: `Ok(dword 0)`, the controller's status, or a timeout (the command
    /// then stays outstanding: its identifier is not reused).
    pub fn admin<P: Platform>(&mut self, p: &mut P, cmd: Command) -> Result<u32, Error> {
        let timeout = self.admin_timeout_us;
        self.admin_within(p, cmd, timeout)
    }

    /// [`Controller::admin`] with an explicit time limit.
    pub fn admin_within<P: Platform>(
        &mut self,
        p: &mut P,
        cmd: Command,
        timeout_us: u64,
    ) -> Result<u32, Error> {
        let (cid, slot) = claim(&mut self.cids, &mut self.sq).ok_or(Error::QueueFull)?;
        p.mem_write(
            self.mem.gpa + u64::from(slot) * 64,
            &cmd.with_cid(cid).to_bytes(),
        );
        p.write32(regs::sq_doorbell(0, self.stride), u32::from(self.sq.tail()));
        let t0 = p.now_us();
        loop {
            while let Some(c) = self.next_completion(p) {
                self.sq.set_head(c.sq_head);
                if !self.cids.free(c.cid) {
                    continue;
                }
                if c.cid == cid {
                    return c.result().map(|_| c.dw0).map_err(Error::Controller);
                }
            }
            let csts = Csts(p.read32(regs::CSTS));
            if csts.fatal() || csts.absent() {
                return Err(Error::Fatal);
            }
            if p.now_us().wrapping_sub(t0) > timeout_us {
                return Err(Error::Timeout(Wait::Admin));
            }
            core::hint::spin_loop();
        }
    }

    fn next_completion<P: Platform>(&mut self, p: &mut P) -> Option<Completion> {
        let c = read_completion(p, self.mem.gpa + PAGE, self.cq.head(), &self.cq)?;
        self.cq.advance();
        p.write32(regs::cq_doorbell(0, self.stride), u32::from(self.cq.head()));
        Some(c)
    }

    /// Creates I/O queue pair `qid` (1..=[`Controller::io_queues`]) in `mem` (mapped through
    /// `m` for the queue's lifetime); its completions raise MSI-X table entry `interrupt`
    /// (`None`: no interrupts, completions are polled).
    pub fn create_io_queue<P: Platform, H: Hypervisor>(
        &mut self,
        p: &mut P,
        m: &mut Mapper<H>,
        qid: u16,
        mem: crate::io::QueueMemory,
        interrupt: Option<u16>,
    ) -> Result<IoQueue, Error> {
        if qid == 0 || qid > self.io_queues {
            return Err(Error::TooManyQueues);
        }
        let mut q = IoQueue::map(p, m, qid, mem, self.stride, self.namespace)?;
        let cq = Command::create_cq(qid, crate::io::IO_ENTRIES, q.cq_iova(), interrupt);
        let r = self.admin(p, cq).and_then(|_| {
            let sq = Command::create_sq(qid, crate::io::IO_ENTRIES, q.sq_iova(), qid);
            self.admin(p, sq).inspect_err(|_| {
                let _ = self.admin(p, Command::delete_cq(qid));
            })
        });
        match r {
            Ok(_) => Ok(q),
            Err(e) => {
                let _ = q.unmap(m);
                Err(e)
            }
        }
    }

    /// Deletes I/O queue pair `q` (which must have nothing outstanding) and unmaps its memory.
    pub fn delete_io_queue<P: Platform, H: Hypervisor>(
        &mut self,
        p: &mut P,
        m: &mut Mapper<H>,
        mut q: IoQueue,
    ) -> Result<(), Error> {
        let qid = q.qid();
        self.admin(p, Command::delete_sq(qid))?;
        self.admin(p, Command::delete_cq(qid))?;
        q.unmap(m)
    }

    /// Gives queue pair `q` up: deleted through the admin queue if the controller runs
    /// (CSTS.RDY), else (a stopped controller no longer touches memory) its outstanding
    /// commands are abandoned; then its memory is unmapped.
    pub fn release_io_queue<P: Platform, H: Hypervisor>(
        &mut self,
        p: &mut P,
        m: &mut Mapper<H>,
        mut q: IoQueue,
    ) -> Result<(), Error> {
        if self.live && Csts(p.read32(regs::CSTS)).ready() {
            return self.delete_io_queue(p, m, q);
        }
        let a = q.abandon(m).map(|_| ());
        a.and(q.unmap(m))
    }

    /// Disables the controller (it stops every queue and DMA) and unmaps the admin queues.
    /// Once done, later calls do nothing.
    pub fn shutdown<P: Platform, H: Hypervisor>(
        &mut self,
        p: &mut P,
        m: &mut Mapper<H>,
    ) -> Result<(), Error> {
        if !self.live {
            return Ok(());
        }
        self.live = false;
        let d = disable(p, self.cap);
        let a = m.unmap_static(self.sq_iova, PAGE);
        let b = m.unmap_static(self.cq_iova, PAGE);
        d.and(a).and(b)
    }
}

/// Reads the completion at `head` of the ring at `gpa` if the phase tag marks it new: the
/// status dword first, the rest only once it is.
pub(crate) fn read_completion<P: Platform>(
    p: &mut P,
    gpa: u64,
    head: u16,
    cq: &CqCursor,
) -> Option<Completion> {
    let at = gpa + u64::from(head) * 16;
    let dw3 = p.mem_read32(at + 12);
    let mut b = [0u8; 16];
    b[12..].copy_from_slice(&dw3.to_le_bytes());
    if !cq.is_new(&Completion::from_bytes(&b)) {
        return None;
    }
    for k in 0..3 {
        b[4 * k..4 * k + 4].copy_from_slice(&p.mem_read32(at + 4 * k as u64).to_le_bytes());
    }
    Some(Completion::from_bytes(&b))
}

/// Clears CC.EN and waits for CSTS.RDY to clear (CAP.TO).
fn disable<P: Platform>(p: &mut P, cap: Cap) -> Result<(), Error> {
    let cc = Cc(p.read32(regs::CC));
    let csts = Csts(p.read32(regs::CSTS));
    if !cc.enabled() && !csts.ready() {
        return Ok(());
    }
    if cc.enabled() && !csts.ready() && !csts.fatal() {
        // Enabling in progress: it must finish before the controller may be disabled.
        wait_ready(p, cap, true)?;
    }
    p.write32(regs::CC, cc.disabled().0);
    wait_ready(p, cap, false)
}

/// Waits for CSTS.RDY to become `ready` within CAP.TO.
fn wait_ready<P: Platform>(p: &mut P, cap: Cap, ready: bool) -> Result<(), Error> {
    let t0 = p.now_us();
    loop {
        let csts = Csts(p.read32(regs::CSTS));
        if csts.absent() {
            return Err(Error::Absent);
        }
        if csts.ready() == ready {
            return Ok(());
        }
        if csts.fatal() && ready {
            return Err(Error::Fatal);
        }
        if p.now_us().wrapping_sub(t0) > cap.timeout_ms() * 1000 {
            return Err(Error::Timeout(if ready {
                Wait::Enable
            } else {
                Wait::Disable
            }));
        }
        core::hint::spin_loop();
    }
}
