//! A register-level model of one VT-d unit, modelled on QEMU 7.2's intel-iommu, for host
//! tests of the driver: GCMD/GSTS with persistent bits (a GCMD write without QIE turns QI
//! off), SRTP latching, register-based invalidation refused while QI is on, the invalidation
//! queue with QEMU's reserved-bit checks (IQE on a bad descriptor, assertion on SW|IF), a
//! context cache and an IOTLB that keep stale translations until invalidated, hardware
//! page walks over the driver's tables (in the shared fake memory), and fault recording
//! with PPF/PFO/FRI and QEMU's same-source suppression.
//!
//! Beyond QEMU, it behaves like real hardware in three ways QEMU does not show:
//! - a paging-structure cache: every walk caches the directory (non-leaf) entries it used,
//!   per domain and IOVA span, and later walks use the cached entry instead of the table in
//!   memory. A page-selective IOTLB invalidation with IH = 1 keeps them; with IH = 0 it drops
//!   those whose span meets the range; domain and global invalidations drop them all;
//! - asynchronous queued invalidation: descriptors are fetched and executed one per
//!   `queue_delay` register reads (the driver's polls), so a wait's status write, the
//!   invalidations before it and IQH reaching IQT all happen some time after the IQT write;
//! - hardware accesses to freed (poisoned) frames panic (see `testing`);
//! - interrupt remapping as the VT-d specification has it (QEMU 7.2 lets
//!   compatibility-format interrupts through and records no interrupt-remapping faults):
//!   IRTA latched by SIRTP, CFI and IRE persistent, an interrupt entry cache kept until an
//!   interrupt entry cache invalidation, and [`FakeUnit::msi`] translating an MSI write
//!   (remappable format -> IRTE lookup -> present, reserved-bit and source-id checks;
//!   compatibility format blocked unless CFIS is set and EIME clear) with faults 0x20-0x26
//!   recorded against the requester.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

use crate::entry::{ContextEntry, SourceId};
use crate::hw::RegisterWindow;
use crate::intremap::{irta_entries, Irte, MsiFormat, MsiMessage, IRTA_EIME};
use crate::regs::{
    offset, Capability, ExtCapability, FaultStatus, GlobalCommand, GlobalStatus, Readable, Reg,
    Writable,
};
use crate::testing::FakeMemory;

pub const QEMU_CAP: u64 = 0xd2_008c_2226_0206;
pub const QEMU_ECAP: u64 = 0xf0_0f4a;

/// Events the model saw, in order (for bring-up sequence checks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Gcmd(u32),
    RtAddr(u64),
    Ccmd(u64),
    Iotlb(u64),
    Iqa(u64),
    Iqt(u64),
    /// A descriptor executed from the queue (lo, hi).
    Desc(u64, u64),
    Fsts(u32),
    Fectl(u32),
    /// A fault recorded (source, reason).
    Fault(u16, u8),
    Irta(u64),
}

pub struct State {
    pub mem: FakeMemory,
    pub cap: u64,
    pub ecap: u64,
    pub gsts: u32,
    pub rtaddr: u64,
    pub latched_root: Option<u64>,
    pub fsts: u32,
    pub fectl: u32,
    pub fedata: u32,
    pub feaddr: u32,
    pub feuaddr: u32,
    pub pmen: u32,
    pub iqa: u64,
    pub iqh: usize,
    pub iqt: usize,
    pub ccmd: u64,
    pub iotlb: u64,
    pub iva: u64,
    pub records: Vec<(u64, u32, u32)>,
    pub events: Vec<Event>,
    pub context_cache: BTreeMap<u16, ContextEntry>,
    /// (did, page) -> (phys page, R, W)
    pub iotlb_cache: BTreeMap<(u16, u64), (u64, bool, bool)>,
    /// Caching mode: (did, page) of failed lookups, cached as not-present.
    pub negative_cache: BTreeMap<(u16, u64), ()>,
    /// Paging-structure cache: (did, level of the table holding the entry, IOVA >> shift of
    /// that level) -> the present non-leaf entry.
    pub dir_cache: BTreeMap<(u16, u8, u64), u64>,
    /// Walk steps served from `dir_cache`.
    pub dir_cache_hits: u64,
    /// Register reads between two descriptors fetched from the queue (0: the whole queue
    /// runs at the IQT write, as in QEMU).
    pub queue_delay: u32,
    queue_countdown: u32,
    /// GSTS status changes take effect after this many GSTS reads.
    pub gsts_delay: u32,
    pending_gsts: Option<(u32, u32)>,
    /// Never complete waits (a hung queue).
    pub ignore_waits: bool,
    /// Reads of IQH so far.
    pub iqh_reads: u64,
    /// Treat the next descriptor of this type as invalid (IQE).
    pub reject_type: Option<u8>,
    /// Never clear register-command busy bits.
    pub dead_registers: bool,
    pub errors: Vec<String>,
    pub faults_recorded: u64,
    pub faults_overflowed: u64,
    pub faults_suppressed: u64,
    /// IRTA as written.
    pub irta: u64,
    /// IRTA latched by SIRTP.
    pub latched_irta: Option<u64>,
    /// Interrupt entry cache: index -> (lo, hi) read from the table.
    pub irte_cache: BTreeMap<u32, (u64, u64)>,
}

/// An interrupt the model delivered to a CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivered {
    pub vector: u8,
    pub apic_id: u32,
    /// Came through an IRTE (else passed through in compatibility format).
    pub remapped: bool,
}

#[derive(Clone)]
pub struct FakeUnit(pub Rc<RefCell<State>>);

impl FakeUnit {
    pub fn new(mem: &FakeMemory, cap: u64, ecap: u64) -> Self {
        let nfr = Capability(cap).num_fault_records();
        Self(Rc::new(RefCell::new(State {
            mem: mem.clone(),
            cap,
            ecap,
            gsts: 0,
            rtaddr: 0,
            latched_root: None,
            fsts: 0,
            fectl: 0,
            fedata: 0,
            feaddr: 0,
            feuaddr: 0,
            pmen: 0,
            iqa: 0,
            iqh: 0,
            iqt: 0,
            ccmd: 0,
            iotlb: 0,
            iva: 0,
            records: vec![(0, 0, 0); nfr],
            events: Vec::new(),
            context_cache: BTreeMap::new(),
            iotlb_cache: BTreeMap::new(),
            negative_cache: BTreeMap::new(),
            dir_cache: BTreeMap::new(),
            dir_cache_hits: 0,
            queue_delay: 2,
            queue_countdown: 0,
            gsts_delay: 0,
            pending_gsts: None,
            ignore_waits: false,
            iqh_reads: 0,
            reject_type: None,
            dead_registers: false,
            errors: Vec::new(),
            faults_recorded: 0,
            faults_overflowed: 0,
            faults_suppressed: 0,
            irta: 0,
            latched_irta: None,
            irte_cache: BTreeMap::new(),
        })))
    }

    pub fn qemu(mem: &FakeMemory) -> Self {
        Self::new(mem, QEMU_CAP, QEMU_ECAP)
    }

    pub fn state(&self) -> std::cell::RefMut<'_, State> {
        self.0.borrow_mut()
    }

    /// An MSI write (`address`, `data`) by requester `sid`, as interrupt remapping sees it:
    /// the interrupt delivered or the fault reason (recorded like a DMA fault, with the
    /// interrupt index in fault-info bits 63:48).
    pub fn msi(&self, sid: u16, address: u64, data: u32) -> Result<Delivered, u8> {
        let r = self.0.borrow_mut().remap_interrupt(sid, address, data);
        if let Err((reason, index)) = r {
            self.0
                .borrow_mut()
                .record_fault(sid, (index as u64) << 48, true, reason);
            return Err(reason);
        }
        r.map_err(|e| e.0)
    }

    /// A DMA of one byte at `iova` by `sid`: the physical address or the fault reason.
    pub fn dma(&self, sid: u16, iova: u64, write: bool) -> Result<u64, u8> {
        let r = self.0.borrow_mut().translate(sid, iova, write);
        if let Err(reason) = r {
            self.0.borrow_mut().record_fault(sid, iova, write, reason);
        }
        r
    }
}

impl State {
    fn iro(&self) -> usize {
        ExtCapability(self.ecap).iotlb_register_offset()
    }
    fn fro(&self) -> usize {
        Capability(self.cap).fault_record_offset()
    }
    fn qi_on(&self) -> bool {
        self.gsts & GlobalStatus::QIES.bits() != 0
    }

    fn set_gsts(&mut self, new: u32) {
        if self.gsts_delay == 0 {
            self.gsts = new;
        } else {
            self.pending_gsts = Some((new, self.gsts_delay));
        }
    }

    fn gcmd(&mut self, v: u32) {
        self.events.push(Event::Gcmd(v));
        let cmd = GlobalCommand::from_bits_retain(v);
        let mut new = self.gsts;
        // Persistent state follows the written value, as in QEMU 7.2.
        for (c, s) in [
            (GlobalCommand::TE, GlobalStatus::TES),
            (GlobalCommand::QIE, GlobalStatus::QIES),
            (GlobalCommand::IRE, GlobalStatus::IRES),
            (GlobalCommand::CFI, GlobalStatus::CFIS),
        ] {
            if cmd.contains(c) {
                new |= s.bits();
            } else {
                new &= !s.bits();
            }
        }
        if cmd.contains(GlobalCommand::SRTP) {
            self.latched_root = Some(self.rtaddr & !0xfff);
            new |= GlobalStatus::RTPS.bits();
        }
        if cmd.contains(GlobalCommand::SIRTP) {
            self.latched_irta = Some(self.irta);
            new |= GlobalStatus::IRTPS.bits();
        }
        if cmd.contains(GlobalCommand::IRE) && self.latched_irta.is_none() {
            self.errors
                .push("IRE set before SIRTP latched a table".to_string());
        }
        if cmd.contains(GlobalCommand::IRE) && !self.qi_on() {
            self.errors.push("IRE set with QI off".to_string());
        }
        if cmd.contains(GlobalCommand::WBF) {
            new &= !GlobalStatus::WBFS.bits();
        }
        let was_qi = self.qi_on();
        let qi = new & GlobalStatus::QIES.bits() != 0;
        if qi && !was_qi {
            if self.iqt != 0 {
                self.errors.push("QI enabled with IQT != 0".to_string());
            }
            self.iqh = 0;
        }
        if !qi && was_qi && self.iqh != self.iqt {
            self.errors
                .push("QI disabled with a non-empty queue".to_string());
            new |= GlobalStatus::QIES.bits();
        }
        self.set_gsts(new);
    }

    fn register_invalidate_context(&mut self, v: u64) {
        self.events.push(Event::Ccmd(v));
        if self.qi_on() || self.dead_registers {
            self.ccmd = v; // refused: ICC stays set
            return;
        }
        self.apply_context_inv(((v >> 61) & 3) as u8, v as u16, (v >> 16) as u16);
        self.ccmd = (v & !(1 << 63)) | (((v >> 61) & 3) << 59);
    }

    fn register_invalidate_iotlb(&mut self, v: u64) {
        self.events.push(Event::Iotlb(v));
        if self.qi_on() || self.dead_registers {
            self.iotlb = v;
            return;
        }
        let g = ((v >> 60) & 3) as u8;
        let did = (v >> 32) as u16;
        let ih = self.iva & (1 << 6) != 0;
        self.apply_iotlb_inv(g, did, self.iva & !0xfff, (self.iva & 0x3f) as u8, ih);
        self.iotlb = (v & !(1 << 63)) | ((g as u64) << 57);
    }

    fn apply_context_inv(&mut self, g: u8, did: u16, sid: u16) {
        match g {
            1 => self.context_cache.clear(),
            2 => self.context_cache.retain(|_, c| c.domain_id() != did),
            3 => {
                self.context_cache.remove(&sid);
            }
            _ => self.errors.push("bad context granularity".to_string()),
        }
    }

    fn apply_iotlb_inv(&mut self, g: u8, did: u16, addr: u64, am: u8, ih: bool) {
        let (lo, hi) = (addr >> 12, (addr >> 12) + (1u64 << am));
        let keep = |k: &(u16, u64)| match g {
            1 => false,
            2 => k.0 != did,
            3 => k.0 != did || k.1 < lo || k.1 >= hi,
            _ => true,
        };
        self.iotlb_cache.retain(|k, _| keep(k));
        self.negative_cache.retain(|k, _| keep(k));
        // Paging-structure caches: IH = 1 keeps them (only leaves changed); IH = 0 drops
        // every cached directory entry used to translate some address of the range.
        let (start, end) = (addr, addr + (4096u64 << am));
        self.dir_cache.retain(|&(d, level, idx), _| match g {
            1 => false,
            2 => d != did,
            3 => {
                let shift = 12 + 9 * (level as u32 - 1);
                let (s, e) = (idx << shift, (idx + 1) << shift);
                d != did || ih || e <= start || s >= end
            }
            _ => true,
        });
    }

    /// One register read went by: the queue makes progress.
    fn tick(&mut self) {
        if self.queue_delay == 0 || self.iqh == self.iqt {
            return;
        }
        self.queue_countdown = self.queue_countdown.saturating_sub(1);
        if self.queue_countdown == 0 {
            self.run_queue(1);
            self.queue_countdown = self.queue_delay;
        }
    }

    /// Processes up to `budget` descriptors of the queue from IQH towards IQT.
    fn run_queue(&mut self, budget: usize) {
        if !self.qi_on() || self.fsts & FaultStatus::IQE.bits() != 0 {
            return;
        }
        let base = self.iqa & !0xfff;
        let size = 256usize << (self.iqa & 7);
        let mut left = budget;
        while self.iqh != self.iqt && left > 0 {
            left -= 1;
            let at = base + self.iqh as u64 * 16;
            let lo = self.mem.hw_read_u64(at);
            let hi = self.mem.hw_read_u64(at + 8);
            let ty = (lo & 0xf) as u8;
            let mamv = Capability(self.cap).mamv();
            let mut bad = match ty {
                1 => lo & 0xfffc_0000_0000_ffc0 != 0 || hi != 0,
                2 => {
                    lo & 0xffff_ffff_0000_ff00 != 0
                        || hi & 0xf80 != 0
                        || (lo >> 4) & 3 == 0
                        || ((lo >> 4) & 3 == 3 && (hi & 0x3f) as u8 > mamv)
                }
                4 => lo & 0xffff_0000_07ff_ffe0 != 0 || hi != 0,
                5 => {
                    let (sw, iflag) = (lo & (1 << 5) != 0, lo & (1 << 4) != 0);
                    assert!(
                        !(sw && iflag),
                        "QEMU 7.2 asserts on a wait descriptor with SW and IF"
                    );
                    lo & 0xffff_ff80 != 0 || hi & 3 != 0 || !sw
                }
                _ => true,
            };
            if self.reject_type == Some(ty) {
                self.reject_type = None;
                bad = true;
            }
            if bad {
                self.fsts |= FaultStatus::IQE.bits();
                return;
            }
            if ty == 5 && self.ignore_waits {
                // A hung queue: stuck at the wait descriptor.
                return;
            }
            self.events.push(Event::Desc(lo, hi));
            match ty {
                1 => self.apply_context_inv(
                    ((lo >> 4) & 3) as u8,
                    (lo >> 16) as u16,
                    (lo >> 32) as u16,
                ),
                2 => self.apply_iotlb_inv(
                    ((lo >> 4) & 3) as u8,
                    (lo >> 16) as u16,
                    hi & !0xfff,
                    (hi & 0x3f) as u8,
                    hi & (1 << 6) != 0,
                ),
                4 => {
                    if lo & (1 << 4) == 0 {
                        self.irte_cache.clear();
                    } else {
                        let first = (lo >> 32) as u16 as u32;
                        let count = 1u32 << ((lo >> 27) & 0x1f);
                        self.irte_cache
                            .retain(|&i, _| i < first || i >= first.saturating_add(count));
                    }
                }
                5 => {
                    self.mem.hw_write_u32(hi & !3, (lo >> 32) as u32);
                }
                _ => unreachable!(),
            }
            self.iqh = (self.iqh + 1) % size;
        }
    }

    fn context(&mut self, sid: u16) -> Result<ContextEntry, u8> {
        if let Some(c) = self.context_cache.get(&sid) {
            return Ok(*c);
        }
        let root = self.latched_root.ok_or(8u8)?;
        let re = self.mem.hw_read_u64(root + (sid >> 8) as u64 * 16);
        if re & 1 == 0 {
            return Err(1);
        }
        let at = (re & !0xfff) + (sid & 0xff) as u64 * 16;
        let ce = ContextEntry {
            lo: self.mem.hw_read_u64(at),
            hi: self.mem.hw_read_u64(at + 8),
        };
        if !ce.present() {
            return Err(2);
        }
        if ce.domain_id() == 0 {
            self.errors
                .push("context entry with domain id 0".to_string());
        }
        self.context_cache.insert(sid, ce);
        Ok(ce)
    }

    fn translate(&mut self, sid: u16, iova: u64, write: bool) -> Result<u64, u8> {
        if self.gsts & GlobalStatus::TES.bits() == 0 {
            return Ok(iova);
        }
        let ce = self.context(sid)?;
        let did = ce.domain_id();
        let page = iova >> 12;
        let deny = if write { 5 } else { 6 };
        if let Some(&(pp, r, w)) = self.iotlb_cache.get(&(did, page)) {
            return if (write && w) || (!write && r) {
                Ok((pp << 12) | (iova & 0xfff))
            } else {
                Err(deny)
            };
        }
        if self.negative_cache.contains_key(&(did, page)) {
            return Err(deny);
        }
        let levels = match ce.address_width() {
            1 => 3,
            2 => 4,
            _ => return Err(3),
        };
        if iova >> (12 + 9 * levels) != 0 {
            return Err(4);
        }
        let sc = ExtCapability(self.ecap).snoop_control();
        let mut table = ce.slptptr();
        let mut level = levels;
        loop {
            let shift = 12 + 9 * (level - 1);
            let idx = (iova >> shift) & 0x1ff;
            let key = (did, level as u8, iova >> shift);
            let e = match self.dir_cache.get(&key) {
                Some(&cached) => {
                    self.dir_cache_hits += 1;
                    cached
                }
                None => self.mem.hw_read_u64(table + idx * 8),
            };
            if e & 3 == 0 {
                if Capability(self.cap).caching_mode() {
                    self.negative_cache.insert((did, page), ());
                }
                return Err(deny);
            }
            if !sc && e & (1 << 11) != 0 {
                return Err(0xc);
            }
            let leaf = level == 1 || e & (1 << 7) != 0;
            if leaf {
                if level == 4 {
                    return Err(0xc);
                }
                let size_mask = (1u64 << (12 + 9 * (level - 1))) - 1;
                let phys = (e & 0x000f_ffff_ffff_f000 & !size_mask) | (iova & size_mask);
                let (r, w) = (e & 1 != 0, e & 2 != 0);
                self.iotlb_cache.insert((did, page), (phys >> 12, r, w));
                return if (write && w) || (!write && r) {
                    Ok(phys)
                } else {
                    Err(deny)
                };
            }
            self.dir_cache.insert(key, e);
            table = e & 0x000f_ffff_ffff_f000;
            level -= 1;
        }
    }

    /// Interrupt remapping of one request: `Err((reason, index))` on a fault.
    fn remap_interrupt(
        &mut self,
        sid: u16,
        address: u64,
        data: u32,
    ) -> Result<Delivered, (u8, u32)> {
        let gsts = GlobalStatus::from_bits_retain(self.gsts);
        let compat = |vector: u8, apic_id: u8| Delivered {
            vector,
            apic_id: apic_id as u32,
            remapped: false,
        };
        let msg = MsiMessage { address, data };
        if !gsts.contains(GlobalStatus::IRES) {
            return match msg.format() {
                MsiFormat::Compatibility { vector, apic_id } => Ok(compat(vector, apic_id)),
                // Without remapping a remappable-format write is just a malformed MSI.
                _ => Err((0x20, 0)),
            };
        }
        let irta = self.latched_irta.unwrap_or(0);
        let eime = irta & IRTA_EIME != 0;
        let index = match msg.format() {
            MsiFormat::Malformed => return Err((0x20, 0)),
            MsiFormat::Compatibility { vector, apic_id } => {
                if gsts.contains(GlobalStatus::CFIS) && !eime {
                    return Ok(compat(vector, apic_id));
                }
                return Err((0x25, 0));
            }
            MsiFormat::Remappable { index } => index,
        };
        if index as usize >= irta_entries(irta) {
            return Err((0x21, index));
        }
        let (lo, hi) = match self.irte_cache.get(&index) {
            Some(e) => *e,
            None => {
                let at = (irta & !0xfff) + index as u64 * 16;
                (self.mem.hw_read_u64(at), self.mem.hw_read_u64(at + 8))
            }
        };
        // Whatever was read is cached, not-present entries included (the strictest reading
        // of the specification: software invalidates after every IRTE change).
        self.irte_cache.insert(index, (lo, hi));
        let irte = Irte { lo, hi };
        if !irte.present() {
            return Err((0x22, index));
        }
        if irte.reserved_bits_set(eime) {
            return Err((0x24, index));
        }
        if !irte.admits(SourceId(sid)) {
            return Err((0x26, index));
        }
        Ok(Delivered {
            vector: irte.vector(),
            apic_id: irte.destination(eime),
            remapped: true,
        })
    }

    fn record_fault(&mut self, sid: u16, iova: u64, write: bool, reason: u8) {
        if self
            .records
            .iter()
            .any(|r| r.2 & (1 << 31) != 0 && r.1 as u16 == sid)
        {
            self.faults_suppressed += 1;
            return;
        }
        if self.fsts & FaultStatus::PFO.bits() != 0 {
            self.faults_overflowed += 1;
            return;
        }
        let n = self.records.len();
        let fri = ((self.fsts >> 8) & 0xff) as usize % n;
        if self.records[fri].2 & (1 << 31) != 0 {
            self.fsts |= FaultStatus::PFO.bits();
            self.faults_overflowed += 1;
            return;
        }
        let t = if write { 0 } else { 1 << 30 };
        self.records[fri] = (iova & !0xfff, sid as u32, (1 << 31) | t | reason as u32);
        self.events.push(Event::Fault(sid, reason));
        self.faults_recorded += 1;
        self.fsts =
            (self.fsts & !0xff00) | ((((fri + 1) % n) as u32) << 8) | FaultStatus::PPF.bits();
    }

    fn update_ppf(&mut self) {
        if self.records.iter().any(|r| r.2 & (1 << 31) != 0) {
            self.fsts |= FaultStatus::PPF.bits();
        } else {
            self.fsts &= !FaultStatus::PPF.bits();
        }
    }
}

/// The typed accesses, by offset: an access the model does not know is recorded as an error.
impl RegisterWindow for FakeUnit {
    fn read32<A: Readable>(&mut self, reg: Reg<u32, A>) -> u32 {
        self.read32_at(reg.offset())
    }
    fn read64<A: Readable>(&mut self, reg: Reg<u64, A>) -> u64 {
        self.read64_at(reg.offset())
    }
    fn write32<A: Writable>(&mut self, reg: Reg<u32, A>, value: u32) {
        self.write32_at(reg.offset(), value)
    }
    fn write64<A: Writable>(&mut self, reg: Reg<u64, A>, value: u64) {
        self.write64_at(reg.offset(), value)
    }
}

impl FakeUnit {
    fn read32_at(&mut self, off: usize) -> u32 {
        let mut s = self.0.borrow_mut();
        s.tick();
        let fro = s.fro();
        match off {
            offset::VER => 0x10,
            offset::GSTS => {
                if let Some((v, left)) = s.pending_gsts {
                    if left <= 1 {
                        s.gsts = v;
                        s.pending_gsts = None;
                    } else {
                        s.pending_gsts = Some((v, left - 1));
                    }
                }
                s.gsts
            }
            offset::FSTS => s.fsts,
            offset::FECTL => s.fectl,
            offset::PMEN => s.pmen,
            o if o >= fro && o < fro + 16 * s.records.len() => {
                let r = s.records[(o - fro) / 16];
                match (o - fro) % 16 {
                    0 => r.0 as u32,
                    4 => (r.0 >> 32) as u32,
                    8 => r.1,
                    _ => r.2,
                }
            }
            _ => {
                s.errors.push(std::format!("read32 of {off:#x}"));
                0
            }
        }
    }

    fn read64_at(&mut self, off: usize) -> u64 {
        let mut s = self.0.borrow_mut();
        s.tick();
        let (iro, fro) = (s.iro(), s.fro());
        match off {
            offset::CAP => s.cap,
            offset::ECAP => s.ecap,
            offset::RTADDR => s.rtaddr,
            offset::CCMD => s.ccmd,
            offset::IQH => {
                s.iqh_reads += 1;
                (s.iqh as u64) << 4
            }
            offset::IQT => (s.iqt as u64) << 4,
            offset::IQA => s.iqa,
            offset::IRTA => s.irta,
            o if o == iro + 8 => s.iotlb,
            o if o >= fro && o < fro + 16 * s.records.len() && (o - fro) % 16 == 0 => {
                s.records[(o - fro) / 16].0
            }
            _ => {
                s.errors.push(std::format!("read64 of {off:#x}"));
                0
            }
        }
    }

    fn write32_at(&mut self, off: usize, v: u32) {
        let mut s = self.0.borrow_mut();
        let fro = s.fro();
        match off {
            offset::GCMD => s.gcmd(v),
            offset::FSTS => {
                s.events.push(Event::Fsts(v));
                let w1c = v & FaultStatus::W1C.bits();
                s.fsts &= !w1c;
            }
            offset::FECTL => {
                s.events.push(Event::Fectl(v));
                s.fectl = v & (1 << 31);
            }
            offset::FEDATA => s.fedata = v,
            offset::FEADDR => s.feaddr = v,
            offset::FEUADDR => s.feuaddr = v,
            offset::PMEN => s.pmen = v & (1 << 31),
            o if o >= fro && o < fro + 16 * s.records.len() && (o - fro) % 16 == 12 => {
                let i = (o - fro) / 16;
                if v & (1 << 31) != 0 {
                    s.records[i].2 &= !(1 << 31);
                }
                s.update_ppf();
            }
            _ => s.errors.push(std::format!("write32 of {off:#x}")),
        }
    }

    fn write64_at(&mut self, off: usize, v: u64) {
        let mut s = self.0.borrow_mut();
        let iro = s.iro();
        match off {
            offset::RTADDR => {
                s.events.push(Event::RtAddr(v));
                s.rtaddr = v;
            }
            offset::CCMD => s.register_invalidate_context(v),
            offset::IQT => {
                s.events.push(Event::Iqt(v));
                let was_idle = s.iqh == s.iqt;
                s.iqt = ((v >> 4) & 0x7fff) as usize;
                if s.queue_delay == 0 {
                    s.run_queue(usize::MAX);
                } else if was_idle {
                    // The first new descriptor is fetched `queue_delay` reads from now.
                    s.queue_countdown = s.queue_delay;
                }
            }
            offset::IQA => {
                s.events.push(Event::Iqa(v));
                s.iqa = v;
            }
            offset::IRTA => {
                s.events.push(Event::Irta(v));
                s.irta = v;
            }
            o if o == iro => s.iva = v,
            o if o == iro + 8 => s.register_invalidate_iotlb(v),
            _ => s.errors.push(std::format!("write64 of {off:#x}")),
        }
    }
}

/// The driver over the model, timed by a fake clock.
pub type TestUnit = crate::unit::Unit<FakeUnit, crate::testing::FakeClock>;

/// A model unit with `cap` and `ecap` over a fresh 4096-frame memory and the driver for it
/// (1 ms timeouts, the clock advancing 1 us per read), configured further by `configure`.
pub fn test_unit(
    cap: u64,
    ecap: u64,
    configure: impl FnOnce(&mut crate::unit::UnitConfig),
) -> (FakeMemory, FakeUnit, TestUnit) {
    let mem = FakeMemory::new(4096);
    let hw = FakeUnit::new(&mem, cap, ecap);
    let mut cfg = crate::unit::UnitConfig::new(0);
    cfg.timeout_ns = 1_000_000;
    configure(&mut cfg);
    let clock = crate::testing::FakeClock::new(1_000);
    let unit = crate::unit::Unit::new(hw.clone(), clock, cfg).unwrap();
    (mem, hw, unit)
}

/// Drains up to 64 fault records from the unit.
pub fn drain(unit: &mut TestUnit) -> Vec<crate::fault::FaultRecord> {
    let mut v = Vec::new();
    unit.poll_faults(64, |r| v.push(*r));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hw::DmaMemory;
    use crate::regs::{FSTS, GCMD, IQA, IQH, IQT};

    /// The paging-structure cache follows the IH rules: PSI with IH = 1 keeps it, PSI with
    /// IH = 0 drops the entries whose span meets the range (of that domain only), domain and
    /// global invalidations drop them all.
    #[test]
    fn directory_cache_invalidation_rules() {
        let mem = FakeMemory::new(8);
        let hw = FakeUnit::qemu(&mem);
        let fill = |s: &mut State| {
            s.dir_cache.clear();
            // Domain 1: level-3 entry for [0, 1G), level-2 entries for [0, 2M), [2M, 4M).
            s.dir_cache.insert((1, 3, 0), 0x1003);
            s.dir_cache.insert((1, 2, 0), 0x2003);
            s.dir_cache.insert((1, 2, 1), 0x3003);
            s.dir_cache.insert((2, 2, 0), 0x4003);
        };
        let mut s = hw.state();
        fill(&mut s);
        s.apply_iotlb_inv(3, 1, 0x1000, 0, true);
        assert_eq!(s.dir_cache.len(), 4, "IH = 1 keeps directory entries");
        s.apply_iotlb_inv(3, 1, 0x1000, 0, false);
        let keys: Vec<_> = s.dir_cache.keys().copied().collect();
        assert_eq!(
            keys,
            vec![(1, 2, 1), (2, 2, 0)],
            "IH = 0: those over 0x1000 go"
        );
        fill(&mut s);
        s.apply_iotlb_inv(2, 1, 0, 0, false);
        assert_eq!(
            s.dir_cache.keys().copied().collect::<Vec<_>>(),
            vec![(2, 2, 0)]
        );
        fill(&mut s);
        s.apply_iotlb_inv(1, 0, 0, 0, false);
        assert!(s.dir_cache.is_empty());
    }

    /// A wait descriptor's status write lands only after later register reads, not at the
    /// IQT write; with `queue_delay = 0` it lands at once (QEMU's behaviour).
    #[test]
    fn wait_completes_asynchronously() {
        for delay in [0u32, 5] {
            let mut mem = FakeMemory::new(8);
            let mut hw = FakeUnit::qemu(&mem);
            hw.state().queue_delay = delay;
            let q = mem.alloc_frame().unwrap();
            let status = mem.alloc_frame().unwrap();
            hw.write64(IQA, q.as_u64());
            hw.write32(GCMD, GlobalCommand::QIE.bits());
            let wait = crate::inval::Descriptor::wait(status, 7);
            mem.write_u64(q, wait.lo);
            mem.write_u64(q + 8, wait.hi);
            hw.write64(IQT, 1 << 4);
            let mut reads = 0;
            while mem.read_u32(status) != 7 {
                assert!(reads < 100);
                hw.read32(FSTS);
                reads += 1;
            }
            assert_eq!(reads, delay);
            assert_eq!(hw.read64(IQH), 1 << 4);
        }
    }

    /// A hardware read of a freed frame panics, even though the CPU side cannot tell.
    #[test]
    #[should_panic(expected = "hardware read of FREED frame")]
    fn hardware_read_of_a_freed_frame_fails_loudly() {
        let mut mem = FakeMemory::new(8);
        let f = mem.alloc_frame().unwrap();
        mem.free_frame(f);
        // Not reused at once (quarantine).
        let g = mem.alloc_frame().unwrap();
        assert_ne!(f, g);
        mem.hw_read_u64(f.as_u64());
    }
}
