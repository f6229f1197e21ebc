//! A host-side reference model of the hypervisor's DMA service, implementing the ABI of
//! `moat-abi` (its checks in the specified order, per-entry statuses, early stops, policies)
//! on plain data, with knobs to force preemption, NOMEM, unconfirmed invalidations and
//! ABI violations.

#![allow(dead_code)]

use moat_abi::dma::*;
use moat_abi::zerocopy::little_endian::{U32, U64};
use moat_abi::*;
use moat_pvdma::Hypervisor;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::vec::Vec;

/// Guest RAM size of the model.
pub const RAM: u64 = 16 << 20;
/// The MSI window, a reserved region.
pub const MSI: ReservedRegion = ReservedRegion {
    start: U64::new(0xfee0_0000),
    length: U64::new(0x10_0000),
    kind: U32::new(RegionKind::Msi as u32),
    reserved: U32::ZERO,
};

#[derive(Clone, Debug)]
pub struct Config {
    pub policy: Policy,
    pub iova_width: u8,
    pub max_batch: u32,
    pub max_mappings: u32,
    pub max_map_pages: u32,
    pub deferred_max_entries: u32,
    /// Preempt a MULTICALL once this many entries ran in the call (and more remain).
    pub preempt_after: Option<u32>,
    /// Global MAP execution numbers (0-based, counting every MAP the model runs) that fail
    /// with NOMEM.
    pub nomem_at: BTreeSet<u64>,
    pub regions: Vec<ReservedRegion>,
    pub features: u64,
    pub abi_version: u32,
    pub calls: u32,
    /// Invalidations never confirm (BUSY / unsynced) while set.
    pub iommu_stuck: bool,
}

impl Config {
    pub fn new(policy: Policy) -> Config {
        Config {
            policy,
            iova_width: 39,
            max_batch: 256,
            max_mappings: 1 << 16,
            max_map_pages: 0,
            deferred_max_entries: 8,
            preempt_after: None,
            nomem_at: BTreeSet::new(),
            regions: std::vec![MSI],
            features: Features::FAULT_RING | Features::STATS,
            abi_version: ABI_VERSION,
            calls: CALLS_ALL,
            iommu_stuck: false,
        }
    }

    pub fn limits(&self) -> Limits {
        Limits {
            iova_width: self.iova_width,
            max_batch: self.max_batch,
            max_map_pages: self.max_map_pages,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Live {
    pub gpa: u64,
    pub len: u64,
    pub flags: DmaFlags,
}

/// One executed request (entry or single call), in execution order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exec {
    pub via_batch: bool,
    pub request: Option<Request>,
    pub status: Status,
    pub iova: u64,
}

#[derive(Clone, Copy, Debug)]
pub struct Ring {
    pub gpa: u64,
    pub pages: u64,
    pub capacity: u32,
    pub producer: u32,
    pub dropped: u64,
    pub seq: u64,
    pub vector: u8,
}

pub type Tamper = Box<dyn FnMut(Return) -> Return>;

pub struct State {
    pub cfg: Config,
    pub ram: Vec<u8>,
    pub live: BTreeMap<u64, Live>,
    /// Unmapped, invalidation outstanding: (iova, len). Still reachable by the device.
    pub pending: Vec<(u64, u64)>,
    pub areas: BTreeMap<usize, (u64, u64, u32)>,
    pub ring: Option<Ring>,
    pub log: Vec<Exec>,
    pub map_execs: u64,
    pub stats: Stats,
    pub injected_irqs: u64,
    /// Applied to the next MULTICALL return, then cleared.
    pub tamper: Option<Tamper>,
}

/// One vCPU's view of the shared model: what the driver is given.
#[derive(Clone)]
pub struct Model {
    pub st: Rc<RefCell<State>>,
    pub vcpu: usize,
}

impl Model {
    pub fn new(cfg: Config) -> Model {
        Model {
            st: Rc::new(RefCell::new(State {
                cfg,
                ram: std::vec![0; RAM as usize],
                live: BTreeMap::new(),
                pending: Vec::new(),
                areas: BTreeMap::new(),
                ring: None,
                log: Vec::new(),
                map_execs: 0,
                stats: Stats::from_counters([0; 18]),
                injected_irqs: 0,
                tamper: None,
            })),
            vcpu: 0,
        }
    }

    /// Another vCPU of the same guest.
    pub fn vcpu(&self, vcpu: usize) -> Model {
        Model {
            st: self.st.clone(),
            vcpu,
        }
    }

    pub fn state(&self) -> std::cell::RefMut<'_, State> {
        self.st.borrow_mut()
    }
}

fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

fn rejected(s: Status, cursor: u64) -> Return {
    Return::new(s, [cursor, 0, MulticallStop::Rejected as u64])
}

impl State {
    fn in_ram(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len).is_some_and(|end| end <= RAM)
    }

    /// Whether the pages overlap a registered batch area or the fault ring.
    fn in_driver_areas(&self, gpa: u64, len: u64, skip_vcpu: Option<usize>) -> bool {
        self.areas
            .iter()
            .filter(|(v, _)| Some(**v) != skip_vcpu)
            .any(|(_, &(g, p, _))| overlaps(gpa, len, g, p * PAGE_SIZE))
            || self
                .ring
                .is_some_and(|r| overlaps(gpa, len, r.gpa, r.pages * PAGE_SIZE))
    }

    fn gpa_mapped(&self, gpa: u64, len: u64) -> bool {
        self.live.values().any(|m| overlaps(gpa, len, m.gpa, m.len))
    }

    /// Lowest free IOVA range of `len` bytes (not live, not pending, not reserved, not 0).
    fn alloc_iova(&self, len: u64) -> Option<u64> {
        let mut busy: Vec<(u64, u64)> = self
            .live
            .iter()
            .map(|(&i, m)| (i, m.len))
            .chain(self.pending.iter().copied())
            .chain(
                self.cfg
                    .regions
                    .iter()
                    .map(|r| (r.start.get(), r.length.get())),
            )
            .chain([(0, PAGE_SIZE)])
            .collect();
        busy.sort();
        let space = self.cfg.limits().iova_space();
        let mut at = 0u64;
        for (s, l) in busy {
            if s >= at && s - at >= len {
                return Some(at);
            }
            at = at.max(s.saturating_add(l));
        }
        (space - at.min(space) >= len).then_some(at)
    }

    /// Invalidate + wait for everything pending. `false` if the IOMMU did not confirm.
    fn flush(&mut self) -> bool {
        if self.pending.is_empty() {
            return true;
        }
        self.stats.invalidations += 1;
        self.stats.waits += 1;
        if self.cfg.iommu_stuck {
            return false;
        }
        self.pending.clear();
        true
    }

    /// Executes a validated request. `in_multicall`: under `batched` the flush waits for the
    /// end of the call. `Err(Busy)` from an UNMAP means done but unconfirmed.
    fn apply(&mut self, req: Request, in_multicall: bool) -> Result<u64, Status> {
        match req {
            Request::Map { gpa, length, flags } => {
                let n = self.map_execs;
                self.map_execs += 1;
                if !self.in_ram(gpa, length) {
                    return Err(Status::Fault);
                }
                if self.in_driver_areas(gpa, length, None) {
                    return Err(Status::Perm);
                }
                if self.cfg.policy == Policy::Passthrough {
                    return Ok(gpa);
                }
                if self.live.len() as u64 >= u64::from(self.cfg.max_mappings)
                    || self.cfg.nomem_at.contains(&n)
                {
                    return Err(Status::Nomem);
                }
                if self.gpa_mapped(gpa, length) {
                    return Err(Status::Exist);
                }
                let iova = match self.alloc_iova(length) {
                    Some(i) => i,
                    None if !self.pending.is_empty() && self.flush() => {
                        self.alloc_iova(length).ok_or(Status::Nomem)?
                    }
                    None => return Err(Status::Nomem),
                };
                self.live.insert(
                    iova,
                    Live {
                        gpa,
                        len: length,
                        flags,
                    },
                );
                Ok(iova)
            }
            Request::Unmap { iova, length } => {
                if self.cfg.policy == Policy::Passthrough {
                    if !self.in_ram(iova, length) {
                        return Err(Status::Fault);
                    }
                    if self.in_driver_areas(iova, length, None) {
                        return Err(Status::Perm);
                    }
                    return Ok(iova);
                }
                if self.cfg.regions.iter().any(|r| r.intersects(iova, length)) {
                    return Err(Status::Perm);
                }
                let m = *self.live.get(&iova).ok_or(Status::Noent)?;
                if m.len != length {
                    return Err(Status::Inval);
                }
                self.live.remove(&iova);
                self.pending.push((iova, length));
                let flush_now = match self.cfg.policy {
                    Policy::Strict => true,
                    Policy::Batched => !in_multicall,
                    Policy::Deferred => {
                        self.pending.len() as u64 >= u64::from(self.cfg.deferred_max_entries)
                    }
                    Policy::Passthrough => false,
                };
                if flush_now && !self.flush() && self.cfg.policy != Policy::Deferred {
                    return Err(Status::Busy);
                }
                Ok(iova)
            }
        }
    }

    fn record(&mut self, via_batch: bool, request: Option<Request>, r: Result<u64, Status>) {
        match (r, request) {
            (Ok(_), Some(Request::Map { .. })) => self.stats.maps += 1,
            (Ok(_), Some(Request::Unmap { .. })) => self.stats.unmaps += 1,
            _ => self.stats.errors += 1,
        }
        self.log.push(Exec {
            via_batch,
            request,
            status: r.err().unwrap_or(Status::Ok),
            iova: r.unwrap_or(0),
        });
    }

    fn multicall(&mut self, vcpu: usize, a: [u64; 6]) -> Return {
        let Some(&(area, _, capacity)) = self.areas.get(&vcpu) else {
            return rejected(Status::Noent, a[0]);
        };
        if a[1] != 0 {
            return rejected(Status::Inval, a[0]);
        }
        self.stats.multicalls += 1;
        let header =
            BatchHeader::read_from_bytes(&self.ram[area as usize..][..BATCH_HEADER_SIZE]).unwrap();
        let info = match validate_batch(&header, a[0], capacity, &self.cfg.limits()) {
            Ok(i) => i,
            Err(s) => return rejected(s, a[0]),
        };
        let start = info.cursor;
        let mut i = start;
        let mut stop = (Status::Ok, MulticallStop::Done);
        while i < info.count {
            if let Some(n) = self.cfg.preempt_after
                && i - start >= n.max(1)
            {
                stop = (Status::Again, MulticallStop::Preempted);
                break;
            }
            let at = area as usize + Entry::offset_of_index(i);
            let e = Entry::read_from_bytes(&self.ram[at..at + ENTRY_SIZE]).unwrap();
            let v = validate_entry(&e, &self.cfg.limits());
            let r = v.and_then(|req| self.apply(req, true));
            // An unconfirmed invalidation inside a multicall is reported by `unsynced`.
            let r = match r {
                Err(Status::Busy) => Ok(e.iova.get()),
                r => r,
            };
            self.record(true, v.ok(), r);
            let out = EntryOutcome {
                status: r.err().unwrap_or(Status::Ok),
                done: if r.is_ok() { e.length.get() } else { 0 },
                iova: (e.op == Op::Map as u16).then(|| r.unwrap_or(0)),
            };
            self.ram[at + Entry::STATUS_OFFSET..at + ENTRY_SIZE]
                .copy_from_slice(&out.status_done_bytes());
            if let Some(iova) = out.iova {
                self.ram[at + Entry::IOVA_OFFSET..at + Entry::IOVA_OFFSET + 8]
                    .copy_from_slice(&iova.to_le_bytes());
            }
            if let Err(s) = r {
                stop = (s, MulticallStop::EntryFailed);
                break;
            }
            i += 1;
        }
        let owes = self.cfg.policy == Policy::Batched
            || (self.cfg.policy == Policy::Strict && !self.pending.is_empty());
        let unsynced = owes && !self.flush();
        MulticallReturn {
            status: stop.0,
            cursor: i,
            completed: i - start,
            stop: stop.1,
            unsynced,
        }
        .to_return()
    }

    fn query(&mut self, a: [u64; 6]) -> Return {
        let n = self.cfg.regions.len() as u32;
        let full = QueryHeader::full_size(n);
        if !a[0].is_multiple_of(8) {
            return Return::err(Status::Inval);
        }
        if a[1] < QUERY_HEADER_SIZE as u64 {
            return Return::new(Status::Range, [full, 0, 0]);
        }
        if !self.in_ram(a[0], a[1]) {
            return Return::err(Status::Fault);
        }
        let fit = QueryHeader::regions_fitting(a[1]).min(u64::from(n)) as u32;
        let c = &self.cfg;
        let h = QueryHeader {
            abi_version: c.abi_version.into(),
            header_size: (QUERY_HEADER_SIZE as u32).into(),
            page_sizes: (1 << 12).into(),
            iova_width: c.iova_width,
            policy: c.policy as u8,
            reserved0: 0.into(),
            max_batch: c.max_batch.into(),
            features: (c.features
                | if c.policy == Policy::Passthrough {
                    Features::IOVA_IS_GPA
                } else {
                    0
                })
            .into(),
            max_mappings: c.max_mappings.into(),
            max_pt_pages: 1024.into(),
            deferred_max_entries: if c.policy == Policy::Deferred {
                c.deferred_max_entries
            } else {
                0
            }
            .into(),
            deferred_max_us: if c.policy == Policy::Deferred {
                1000
            } else {
                0
            }
            .into(),
            nr_regions: n.into(),
            regions_written: fit.into(),
            max_batch_pages: (MAX_BATCH_PAGES as u32).into(),
            max_map_pages: c.max_map_pages.into(),
        };
        let regions: Vec<ReservedRegion> = c.regions.clone();
        let g = a[0] as usize;
        self.ram[g..g + QUERY_HEADER_SIZE].copy_from_slice(h.as_bytes());
        for (k, r) in regions.iter().take(fit as usize).enumerate() {
            let at = g + QUERY_HEADER_SIZE + k * REGION_SIZE;
            self.ram[at..at + REGION_SIZE].copy_from_slice(r.as_bytes());
        }
        Return::ok(full)
    }

    /// The checks both registrations make on an area of `pages` pages at `gpa`, in order:
    /// too many pages (RANGE), not guest RAM (FAULT), over another registered area (EXIST;
    /// `vcpu`'s own batch area excepted), over mapped pages (BUSY).
    fn check_area(
        &self,
        gpa: u64,
        pages: u64,
        max_pages: u64,
        vcpu: Option<usize>,
    ) -> Result<(), Status> {
        if pages > max_pages {
            return Err(Status::Range);
        }
        let len = pages * PAGE_SIZE;
        if !self.in_ram(gpa, len) {
            Err(Status::Fault)
        } else if self.in_driver_areas(gpa, len, vcpu) {
            Err(Status::Exist)
        } else if self.gpa_mapped(gpa, len) {
            Err(Status::Busy)
        } else {
            Ok(())
        }
    }

    fn register_area(&mut self, vcpu: usize, a: [u64; 6]) -> Return {
        let (gpa, pages) = (a[0], a[1]);
        if pages == 0 {
            return unregistered(self.areas.remove(&vcpu));
        }
        if !is_page_aligned(gpa) {
            return Return::err(Status::Inval);
        }
        if let Err(s) = self.check_area(gpa, pages, MAX_BATCH_PAGES, Some(vcpu)) {
            return Return::err(s);
        }
        let cap = batch_capacity(pages, self.cfg.max_batch);
        self.areas.insert(vcpu, (gpa, pages, cap));
        Return::ok(u64::from(cap))
    }

    fn register_ring(&mut self, a: [u64; 6]) -> Return {
        if self.cfg.features & Features::FAULT_RING == 0 {
            return Return::err(Status::Unsupp);
        }
        let (gpa, pages, vector) = (a[0], a[1], a[2]);
        if pages == 0 {
            return unregistered(self.ring.take());
        }
        if (1..32).contains(&vector) || vector > 255 || !is_page_aligned(gpa) {
            return Return::err(Status::Inval);
        }
        if vector != 0 && self.cfg.features & Features::FAULT_IRQ == 0 {
            return Return::err(Status::Unsupp);
        }
        // The ring being replaced does not count as another area.
        let old = self.ring.take();
        if let Err(s) = self.check_area(gpa, pages, MAX_FAULT_RING_PAGES, None) {
            self.ring = old;
            return Return::err(s);
        }
        let capacity = fault_ring_capacity(pages);
        let g = gpa as usize;
        self.ram[g..g + FAULT_RING_HEADER_SIZE]
            .copy_from_slice(FaultRingHeader::new(capacity).as_bytes());
        self.ring = Some(Ring {
            gpa,
            pages,
            capacity,
            producer: 0,
            dropped: 0,
            seq: 0,
            vector: vector as u8,
        });
        Return::ok(u64::from(capacity))
    }

    /// The producer side of the fault ring, as specified.
    pub fn inject_fault(&mut self, iova: u64, source_id: u16, reason: u8, dir: Direction) {
        self.stats.faults += 1;
        let Some(mut r) = self.ring else {
            return;
        };
        let seq = r.seq;
        r.seq += 1;
        let g = r.gpa as usize;
        let co = g + FaultRingHeader::CONSUMER_OFFSET;
        let consumer = u32::from_le_bytes(self.ram[co..co + 4].try_into().unwrap());
        let used = r.producer.wrapping_sub(consumer);
        if used >= r.capacity {
            r.dropped += 1;
            let d = g + FaultRingHeader::DROPPED_OFFSET;
            self.ram[d..d + 8].copy_from_slice(&r.dropped.to_le_bytes());
        } else {
            let rec = FaultRecord {
                iova: (iova & !(PAGE_SIZE - 1)).into(),
                source_id: source_id.into(),
                reason,
                direction: dir as u8,
                reserved0: 0.into(),
                seq: seq.into(),
                reserved1: 0.into(),
            };
            let at = g + FaultRingHeader::record_offset(r.capacity, r.producer).unwrap();
            self.ram[at..at + FAULT_RECORD_SIZE].copy_from_slice(rec.as_bytes());
            if used == 0 && r.vector != 0 {
                self.injected_irqs += 1;
            }
            r.producer = r.producer.wrapping_add(1);
            let p = g + FaultRingHeader::PRODUCER_OFFSET;
            self.ram[p..p + 4].copy_from_slice(&r.producer.to_le_bytes());
        }
        self.ring = Some(r);
    }

    fn stats_call(&mut self, a: [u64; 6]) -> Return {
        if self.cfg.features & Features::STATS == 0 {
            return Return::err(Status::Unsupp);
        }
        if a[2] & !StatsFlags::KNOWN != 0 || !a[0].is_multiple_of(8) {
            return Return::err(Status::Inval);
        }
        if a[1] < STATS_SIZE as u64 {
            return Return::err(Status::Range);
        }
        if !self.in_ram(a[0], a[1]) {
            return Return::err(Status::Fault);
        }
        let mut s = self.stats;
        s.size = (STATS_SIZE as u32).into();
        s.live_mappings = (self.live.len() as u64).into();
        s.live_pages = self
            .live
            .values()
            .map(|m| m.len / PAGE_SIZE)
            .sum::<u64>()
            .into();
        s.pending_invalidations = (self.pending.len() as u64).into();
        let g = a[0] as usize;
        self.ram[g..g + STATS_SIZE].copy_from_slice(s.as_bytes());
        if a[2] & StatsFlags::RESET != 0 {
            self.stats = Stats::from_counters([0; 18]);
        }
        Return::ok(STATS_SIZE as u64)
    }

    pub fn dispatch(&mut self, vcpu: usize, call: Call, a: [u64; 6]) -> Return {
        if self.cfg.calls & call.bit() == 0 {
            return Return::err(Status::Unsupp);
        }
        self.stats.exits += 1;
        let single = |st: &mut State, r: Result<Request, Status>| {
            let out = r.and_then(|req| st.apply(req, false));
            st.record(false, r.ok(), out);
            match out {
                Ok(v) => Return::ok(match r {
                    Ok(Request::Unmap { length, .. }) => length,
                    _ => v,
                }),
                Err(s) => Return::err(s),
            }
        };
        match call {
            Call::Version => Return::ok(u64::from(self.cfg.abi_version)),
            Call::Nop => Return::ok(0),
            Call::DmaQuery => self.query(a),
            Call::DmaMap => {
                let r = decode_map_regs(&Args(a), &self.cfg.limits());
                single(self, r)
            }
            Call::DmaUnmap => {
                let r = decode_unmap_regs(&Args(a), &self.cfg.limits());
                single(self, r)
            }
            Call::DmaMulticall => {
                let ret = self.multicall(vcpu, a);
                match self.tamper.take() {
                    Some(mut t) => t(ret),
                    None => ret,
                }
            }
            Call::DmaBatchRegister => self.register_area(vcpu, a),
            Call::DmaSync => {
                if a[0] != 0 {
                    return Return::err(Status::Inval);
                }
                let had = !self.pending.is_empty();
                if !self.flush() {
                    return Return::err(Status::Busy);
                }
                Return::ok(u64::from(had))
            }
            Call::DmaStats => self.stats_call(a),
            Call::DmaFaultRingRegister => self.register_ring(a),
            _ => Return::err(Status::Unsupp),
        }
    }

    /// Whether the device can still reach `iova` (live, or unmapped with the invalidation
    /// outstanding).
    pub fn device_reaches(&self, iova: u64) -> bool {
        self.live
            .iter()
            .any(|(&i, m)| iova >= i && iova < i + m.len)
            || self.pending.iter().any(|&(i, l)| iova >= i && iova < i + l)
    }
}

/// The answer to an unregistration (0 pages): OK when something was registered, else NOENT.
fn unregistered<T>(old: Option<T>) -> Return {
    match old {
        Some(_) => Return::ok(0),
        None => Return::err(Status::Noent),
    }
}

impl Hypervisor for Model {
    fn cpuid(&mut self, leaf: u32) -> [u32; 4] {
        let st = self.st.borrow();
        match leaf {
            CPUID_SIGNATURE_LEAF => {
                let s = signature_regs();
                [CPUID_MAX_LEAF, s[0], s[1], s[2]]
            }
            CPUID_FEATURES_LEAF => [st.cfg.abi_version, st.cfg.calls, 1, 0],
            _ => [0; 4],
        }
    }

    fn hypercall(&mut self, call: Call, args: Args) -> Return {
        self.st.borrow_mut().dispatch(self.vcpu, call, args.0)
    }

    fn read(&mut self, gpa: u64, buf: &mut [u8]) {
        let st = self.st.borrow();
        buf.copy_from_slice(&st.ram[gpa as usize..gpa as usize + buf.len()]);
    }

    fn write(&mut self, gpa: u64, data: &[u8]) {
        let mut st = self.st.borrow_mut();
        st.ram[gpa as usize..gpa as usize + data.len()].copy_from_slice(data);
    }
}
