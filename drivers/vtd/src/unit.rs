//! One DMA remapping hardware unit (a DRHD): bring-up, disable, context entries, flushes
//! and fault draining.

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use core::ops::Range;

use crate::domain::{Domain, DomainIdAllocator};
use crate::entry::{ContextEntry, PagingLevels, RootEntry, SourceId, TranslationType};
use crate::error::{Error, Operation};
use crate::fault::{FaultCounters, FaultPoll, FaultRecord};
use crate::gather::{Gather, PlanRef};
use crate::hw::{poll_until, Clock, DmaMemory, PhysAddr, RegisterWindow, PAGE_SIZE};
use crate::intremap::{
    irta_value, IecGranularity, Irte, IRTE_SIZE, TABLE_ENTRIES, TABLE_SIZE_FIELD,
};
use crate::inval::{
    register_invalidate, Invalidation, InvalidationQueue, InvalidationStats, QUEUE_ENTRIES,
};
use crate::paging::{PageTable, TableConfig};
use crate::regs::{
    frcd, gcmd_value, iqa_value, queue_index, queue_pointer, rtaddr_legacy, Capability,
    ContextGranularity, ExtCapability, FaultEventControl, FaultRecordRegs, FaultStatus,
    GlobalCommand, GlobalStatus, IotlbGranularity, IotlbRegs, ProtectedMemoryEnable, Version, CAP,
    ECAP, FEADDR, FECTL, FEDATA, FEUADDR, FSTS, GCMD, GSTS, IQA, IQH, IQT, IRTA, PMEN, RTADDR, VER,
};

/// Driver policy for one unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnitConfig {
    /// An id the kernel gives the unit (e.g. its DRHD index); domains remember it so they
    /// cannot be used with another unit.
    pub id: u32,
    /// Timeout of every hardware poll, in nanoseconds of [`Clock::now_ns`].
    pub timeout_ns: u64,
    /// Use queued invalidation when `ECAP.QI` is set (register-based otherwise).
    pub queued_invalidation: bool,
    /// Force a table depth (must be in SAGAW); `None` picks one from SAGAW and MGAW.
    pub levels: Option<PagingLevels>,
    /// Set SNP in leaf entries when the unit has `ECAP.SC`.
    pub snoop: bool,
    /// Most page-selective IOTLB invalidations per flush before one domain-selective
    /// invalidation is used instead.
    pub max_psi_blocks: usize,
    /// The CPUs' local APICs run in x2APIC mode: interrupt remapping then uses extended
    /// interrupt mode (IRTA.EIME, 32-bit destinations) when the unit offers it (`ECAP.EIM`).
    /// In xAPIC mode EIME stays clear (8-bit destinations).
    pub x2apic: bool,
}

impl UnitConfig {
    /// Defaults: 100 ms timeouts, QI when available, automatic depth, snoop when
    /// supported, at most 16 PSI descriptors per flush.
    pub const fn new(id: u32) -> Self {
        Self {
            id,
            timeout_ns: 100_000_000,
            queued_invalidation: true,
            levels: None,
            snoop: true,
            max_psi_blocks: 16,
            x2apic: false,
        }
    }
}

/// What a successful [`Unit::flush`] released.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Flushed {
    /// Unmapped IOVA ranges, one per successful unmap in the order of the unmaps: the
    /// invalidation covering them completed, so the caller may reuse them (and unpin the
    /// memory they pointed to).
    pub unmapped: Vec<Range<u64>>,
    /// Page-table pages returned to [`DmaMemory::free_frame`].
    pub tables_freed: usize,
    /// IOTLB invalidations issued (not counting the wait descriptor).
    pub invalidations: usize,
    /// The flush used one domain-selective invalidation.
    pub domain_selective: bool,
}

/// What [`Unit::flush_submit`] did.
#[derive(Debug)]
pub enum Submitted {
    /// Everything is done (nothing to invalidate, translation off, or register-based
    /// invalidation, which waits under the caller's lock): as [`Unit::flush`].
    Done(Flushed),
    /// The invalidations and a wait descriptor for the caller's status word are queued:
    /// the caller polls its status word ([`Queued::status`] == [`Queued::seq`]) outside
    /// the unit's lock, calls [`Unit::queue_check`] under it now and then, and once the
    /// status is written calls [`Unit::flush_release`].
    Queued(Queued),
}

/// A queued flush waiting for its status word (see [`Submitted::Queued`]).
#[derive(Debug, Clone, Copy)]
pub struct Queued {
    /// The caller's status word.
    pub status: PhysAddr,
    /// The value the hardware writes there when everything before it completed.
    pub seq: u32,
    /// Index of the wait descriptor (for [`Unit::queue_check`]).
    pub wait_idx: usize,
    /// Drop the status word's cache line before each read (non-coherent queue).
    pub flush_status: bool,
    /// How long to wait before giving up (the unit's timeout).
    pub timeout_ns: u64,
    /// IOTLB invalidations queued (not counting the wait descriptor).
    pub invalidations: usize,
    /// One domain-selective invalidation was used.
    pub domain_selective: bool,
}

/// One remapping unit and the state the driver keeps for it.
#[derive(Debug)]
pub struct Unit<R: RegisterWindow, C: Clock> {
    regs: R,
    clock: C,
    cfg: UnitConfig,
    version: Version,
    cap: Capability,
    ecap: ExtCapability,
    levels: PagingLevels,
    enabled: bool,
    root: Option<PhysAddr>,
    context_tables: Vec<Option<PhysAddr>>,
    queue: Option<InvalidationQueue>,
    qi_on: bool,
    dids: DomainIdAllocator,
    attached: BTreeMap<SourceId, u16>,
    faults: FaultCounters,
    inv_stats: InvalidationStats,
    ir: Option<IrTable>,
    /// The invalidations of the flush being issued (see `plan_invalidations`).
    invs: Vec<Invalidation>,
}

/// The unit's interrupt remapping table: one page of [`TABLE_ENTRIES`] IRTEs and which of
/// them are handed out.
#[derive(Debug)]
struct IrTable {
    base: PhysAddr,
    eime: bool,
    /// GSTS.IRES is set (cleared by [`Unit::disable`]; the table stays for a re-enable).
    on: bool,
    used: [u64; TABLE_ENTRIES / 64],
}

impl<R: RegisterWindow, C: Clock> Unit<R, C> {
    /// Reads the unit's capabilities. Writes nothing to the hardware.
    pub fn new(mut regs: R, clock: C, cfg: UnitConfig) -> Result<Self, Error> {
        let version = Version(regs.read32(VER));
        let cap = Capability(regs.read64(CAP));
        let ecap = ExtCapability(regs.read64(ECAP));
        let levels = match cfg.levels {
            Some(l) if cap.supports_levels(l.count()) => l,
            Some(_) => return Err(Error::Unsupported("requested table depth not in SAGAW")),
            None => PagingLevels::choose(cap).ok_or(Error::Unsupported(
                "SAGAW has neither 3- nor 4-level tables",
            ))?,
        };
        Ok(Self {
            regs,
            clock,
            cfg,
            version,
            cap,
            ecap,
            levels,
            enabled: false,
            root: None,
            context_tables: vec![None; 256],
            queue: None,
            qi_on: false,
            dids: DomainIdAllocator::new(cap.domain_id_bits()),
            attached: BTreeMap::new(),
            faults: FaultCounters::default(),
            inv_stats: InvalidationStats::default(),
            ir: None,
            invs: Vec::new(),
        })
    }

    /// Version register.
    pub fn version(&self) -> Version {
        self.version
    }
    /// Capability register.
    pub fn capability(&self) -> Capability {
        self.cap
    }
    /// Extended capability register.
    pub fn ext_capability(&self) -> ExtCapability {
        self.ecap
    }
    /// Table depth used for this unit's domains.
    pub fn levels(&self) -> PagingLevels {
        self.levels
    }
    /// Driver configuration.
    pub fn config(&self) -> &UnitConfig {
        &self.cfg
    }
    /// Translation is enabled.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }
    /// Queued invalidation is in use.
    pub fn queued_invalidation(&self) -> bool {
        self.qi_on
    }
    /// Physical address of the root table, once allocated.
    pub fn root_table(&self) -> Option<PhysAddr> {
        self.root
    }
    /// Invalidation counters.
    pub fn invalidation_stats(&self) -> &InvalidationStats {
        &self.inv_stats
    }
    /// Fault counters.
    pub fn fault_counters(&self) -> &FaultCounters {
        &self.faults
    }
    /// Domain the device is attached to.
    pub fn attached_domain(&self, sid: SourceId) -> Option<u16> {
        self.attached.get(&sid).copied()
    }
    /// Direct access to the register window (diagnostics).
    pub fn registers(&mut self) -> &mut R {
        &mut self.regs
    }

    /// The table configuration this unit's capabilities allow.
    pub fn table_config(&self) -> TableConfig {
        TableConfig {
            levels: self.levels,
            iova_bits: self.levels.width().min(self.cap.mgaw()),
            superpage_2m: self.cap.superpage_2m(),
            superpage_1g: self.cap.superpage_1g(),
            snoop: self.cfg.snoop && self.ecap.snoop_control(),
            coherent: self.ecap.coherent(),
            caching_mode: self.cap.caching_mode(),
        }
    }

    fn gsts(&mut self) -> GlobalStatus {
        GlobalStatus::from_bits_retain(self.regs.read32(GSTS))
    }

    /// Issues one GCMD command, carrying the persistent bits of GSTS, and polls GSTS until
    /// the command took effect.
    fn global_command(&mut self, cmd: GlobalCommand, enable: bool) -> Result<(), Error> {
        let (status, want_set, op) = match cmd {
            GlobalCommand::TE => (GlobalStatus::TES, enable, Operation::TranslationEnable),
            GlobalCommand::QIE => (
                GlobalStatus::QIES,
                enable,
                Operation::QueuedInvalidationEnable,
            ),
            GlobalCommand::SRTP => (GlobalStatus::RTPS, true, Operation::SetRootTablePointer),
            GlobalCommand::WBF => (GlobalStatus::WBFS, false, Operation::WriteBufferFlush),
            GlobalCommand::SIRTP => (
                GlobalStatus::IRTPS,
                true,
                Operation::SetInterruptRemapTablePointer,
            ),
            GlobalCommand::IRE => (
                GlobalStatus::IRES,
                enable,
                Operation::InterruptRemappingEnable,
            ),
            GlobalCommand::CFI => (
                GlobalStatus::CFIS,
                enable,
                Operation::CompatibilityFormatInterrupts,
            ),
            _ => return Err(Error::Unsupported("global command not used by this driver")),
        };
        let gsts = self.regs.read32(GSTS);
        self.regs.write32(GCMD, gcmd_value(gsts, cmd, enable));
        let regs = &mut self.regs;
        poll_until(&self.clock, self.cfg.timeout_ns, || {
            let s = GlobalStatus::from_bits_retain(regs.read32(GSTS));
            (s.contains(status) == want_set).then_some(())
        })
        .ok_or(Error::Timeout(op))
    }

    fn write_buffer_flush(&mut self) -> Result<(), Error> {
        if self.cap.rwbf() {
            self.global_command(GlobalCommand::WBF, true)?;
        }
        Ok(())
    }

    fn flush_lines<M: DmaMemory>(&self, mem: &mut M, addr: PhysAddr, len: usize) {
        if !self.ecap.coherent() {
            mem.flush_cache(addr, len);
        }
    }

    fn ensure_root<M: DmaMemory>(&mut self, mem: &mut M) -> Result<PhysAddr, Error> {
        if let Some(r) = self.root {
            return Ok(r);
        }
        let r = mem.alloc_frame().ok_or(Error::NoMemory)?;
        self.flush_lines(mem, r, PAGE_SIZE as usize);
        self.root = Some(r);
        Ok(r)
    }

    /// Runs invalidations and waits for them: through the queue when it is enabled,
    /// otherwise through the registers.
    fn invalidate<M: DmaMemory>(
        &mut self,
        mem: &mut M,
        invs: &[Invalidation],
    ) -> Result<(), Error> {
        let (dr, dw) = (self.cap.drd(), self.cap.dwd());
        if self.qi_on {
            let Some(q) = self.queue.as_mut() else {
                return Err(Error::InvalidState(
                    "queued invalidation on without a queue",
                ));
            };
            q.submit_and_wait(
                &mut self.regs,
                mem,
                &self.clock,
                self.cfg.timeout_ns,
                invs,
                &mut self.inv_stats,
            )
        } else {
            let iotlb = IotlbRegs::new(self.ecap);
            for inv in invs {
                register_invalidate(
                    &mut self.regs,
                    &self.clock,
                    self.cfg.timeout_ns,
                    iotlb,
                    dr,
                    dw,
                    *inv,
                )?;
                self.inv_stats.register_invalidations += 1;
            }
            Ok(())
        }
    }

    /// Brings the unit up: root table, SRTP, global context-cache and IOTLB invalidation
    /// (QEMU 7.2 has no ESRTPS), queued invalidation (when used), write-buffer flush,
    /// stale faults cleared with the fault interrupt masked, TE, protected memory regions
    /// off. Every GCMD write carries the persistent GSTS bits.
    ///
    /// If firmware left translation or queued invalidation on, they are turned off first.
    /// Devices may be attached before or after `enable`.
    pub fn enable<M: DmaMemory>(&mut self, mem: &mut M) -> Result<(), Error> {
        if self.enabled {
            return Err(Error::InvalidState("unit already enabled"));
        }
        let gsts = self.gsts();
        if gsts.contains(GlobalStatus::TES) {
            log::warn!(
                "vt-d unit {}: translation left on by firmware, turning it off",
                self.cfg.id
            );
            self.global_command(GlobalCommand::TE, false)?;
        }
        if gsts.contains(GlobalStatus::QIES) {
            log::warn!(
                "vt-d unit {}: queued invalidation left on, turning it off",
                self.cfg.id
            );
            if self.wait_queue_drained().is_err() {
                // Not our queue: nothing of ours waits in it, so turn it off regardless.
                log::warn!(
                    "vt-d unit {}: firmware's invalidation queue did not drain",
                    self.cfg.id
                );
            }
            self.global_command(GlobalCommand::QIE, false)?;
        }
        self.qi_on = false;

        let root = self.ensure_root(mem)?;
        self.regs.write64(RTADDR, rtaddr_legacy(root));
        self.global_command(GlobalCommand::SRTP, true)?;
        self.invalidate(
            mem,
            &[
                Invalidation::Context(ContextGranularity::Global),
                Invalidation::Iotlb(IotlbGranularity::Global),
            ],
        )?;

        if self.cfg.queued_invalidation && self.ecap.queued_invalidation() {
            if self.queue.is_none() {
                self.queue = Some(InvalidationQueue::new(
                    mem,
                    self.ecap.coherent(),
                    self.cap.drd(),
                    self.cap.dwd(),
                )?);
            }
            let base = match self.queue.as_mut() {
                Some(q) => {
                    q.reset();
                    q.base()
                }
                None => return Err(Error::NoMemory),
            };
            self.regs.write64(IQT, queue_pointer(0));
            self.regs.write64(IQA, iqa_value(base, 0));
            self.global_command(GlobalCommand::QIE, true)?;
            self.qi_on = true;
            // Prove the queue works (a wait round-trip) before translation depends on it.
            self.invalidate(
                mem,
                &[
                    Invalidation::Context(ContextGranularity::Global),
                    Invalidation::Iotlb(IotlbGranularity::Global),
                ],
            )?;
        }
        self.write_buffer_flush()?;

        self.regs.write32(FECTL, FaultEventControl::IM.bits());
        self.clear_stale_faults();

        self.global_command(GlobalCommand::TE, true)?;
        self.enabled = true;

        let pmen = ProtectedMemoryEnable::from_bits_retain(self.regs.read32(PMEN));
        if pmen.contains(ProtectedMemoryEnable::EPM) || pmen.contains(ProtectedMemoryEnable::PRS) {
            self.regs.write32(PMEN, 0);
            let regs = &mut self.regs;
            poll_until(&self.clock, self.cfg.timeout_ns, || {
                (regs.read32(PMEN) & ProtectedMemoryEnable::PRS.bits() == 0).then_some(())
            })
            .ok_or(Error::Timeout(Operation::ProtectedMemoryDisable))?;
        }
        log::info!(
            "vt-d unit {}: enabled, {}-level tables, {} invalidation, CAP={:#x} ECAP={:#x}",
            self.cfg.id,
            self.levels.count(),
            if self.qi_on { "queued" } else { "register" },
            self.cap.0,
            self.ecap.0
        );
        Ok(())
    }

    /// Polls until the hardware fetched every queued descriptor (IQH == IQT). A wait that
    /// timed out earlier can leave descriptors in the queue; queued invalidation must not be
    /// turned off before they were consumed.
    fn wait_queue_drained(&mut self) -> Result<(), Error> {
        let regs = &mut self.regs;
        poll_until(&self.clock, self.cfg.timeout_ns, || {
            let head = queue_index(regs.read64(IQH));
            let tail = queue_index(regs.read64(IQT));
            (head == tail).then_some(())
        })
        .ok_or_else(|| {
            log::error!(
                "vt-d unit {}: invalidation queue not drained (IQH={:#x}, IQT={:#x})",
                self.cfg.id,
                self.regs.read64(IQH),
                self.regs.read64(IQT)
            );
            Error::Timeout(Operation::InvalidationQueueDrain)
        })
    }

    /// Turns translation off, then waits (bounded by the unit's timeout) until the
    /// invalidation queue drained (IQH == IQT: an earlier timed-out wait may have left
    /// descriptors in it) and turns queued invalidation off. If the queue does not drain,
    /// returns [`Error::Timeout`]`(`[`Operation::InvalidationQueueDrain`]`)` with queued
    /// invalidation still on (translation is off); `disable` may be retried. Tables and
    /// domains stay; `enable` may be called again.
    pub fn disable(&mut self) -> Result<(), Error> {
        if self.gsts().contains(GlobalStatus::TES) {
            self.global_command(GlobalCommand::TE, false)?;
        }
        self.enabled = false;
        if self.gsts().contains(GlobalStatus::IRES) {
            self.global_command(GlobalCommand::IRE, false)?;
        }
        if let Some(t) = self.ir.as_mut() {
            t.on = false;
        }
        if self.qi_on || self.gsts().contains(GlobalStatus::QIES) {
            self.wait_queue_drained()?;
            self.global_command(GlobalCommand::QIE, false)?;
            self.qi_on = false;
        }
        log::info!("vt-d unit {}: disabled", self.cfg.id);
        Ok(())
    }

    /// Frees the root table, the context tables and the queue. Only when the unit is
    /// disabled and no device is attached.
    pub fn free_tables<M: DmaMemory>(&mut self, mem: &mut M) -> Result<(), Error> {
        if self.enabled || self.qi_on {
            return Err(Error::InvalidState("unit still enabled"));
        }
        if !self.attached.is_empty() {
            return Err(Error::DomainInUse {
                devices: self.attached.len(),
            });
        }
        for slot in self.context_tables.iter_mut() {
            if let Some(t) = slot.take() {
                mem.free_frame(t);
            }
        }
        if let Some(r) = self.root.take() {
            mem.free_frame(r);
        }
        if let Some(q) = self.queue.take() {
            q.free(mem);
        }
        if let Some(t) = self.ir.take() {
            mem.free_frame(t.base);
        }
        Ok(())
    }

    /// Whether interrupt remapping is on (GSTS.IRES, set by
    /// [`Unit::enable_interrupt_remapping`]).
    pub fn interrupt_remapping(&self) -> bool {
        self.ir.as_ref().is_some_and(|t| t.on)
    }

    /// Whether the table uses extended interrupt mode (x2APIC destinations).
    pub fn extended_interrupt_mode(&self) -> bool {
        self.ir.as_ref().is_some_and(|t| t.eime)
    }

    /// Turns interrupt remapping on, in the order VT-d 6.5.2 / 10.4.4 gives: a zeroed table
    /// of [`TABLE_ENTRIES`] entries (every entry not present) in IRTA with its size (and
    /// EIME when [`UnitConfig::x2apic`] and `ECAP.EIM`), SIRTP until IRTPS, a global
    /// interrupt entry cache invalidation through the queue, compatibility format
    /// interrupts off (CFI clear), then IRE until IRES. Every GCMD write carries the
    /// persistent GSTS bits. Needs `ECAP.IR` and queued invalidation on (after
    /// [`Unit::enable`]).
    pub fn enable_interrupt_remapping<M: DmaMemory>(&mut self, mem: &mut M) -> Result<(), Error> {
        if !self.ecap.interrupt_remapping() {
            return Err(Error::Unsupported("no interrupt remapping (ECAP.IR clear)"));
        }
        if !self.qi_on {
            return Err(Error::Unsupported(
                "interrupt remapping needs queued invalidation",
            ));
        }
        if self.interrupt_remapping() {
            return Err(Error::InvalidState("interrupt remapping already on"));
        }
        if self.gsts().contains(GlobalStatus::IRES) {
            log::warn!(
                "vt-d unit {}: interrupt remapping left on by firmware, turning it off",
                self.cfg.id
            );
            self.global_command(GlobalCommand::IRE, false)?;
        }
        let eime = self.cfg.x2apic && self.ecap.eim();
        // A table kept from an earlier enable keeps its entries (and their owners).
        let (base, fresh) = match self.ir.as_ref() {
            Some(t) => (t.base, false),
            None => (mem.alloc_frame().ok_or(Error::NoMemory)?, true),
        };
        self.flush_lines(mem, base, PAGE_SIZE as usize);
        let result = (|| {
            self.regs
                .write64(IRTA, irta_value(base, eime, TABLE_SIZE_FIELD));
            self.global_command(GlobalCommand::SIRTP, true)?;
            self.invalidate(mem, &[Invalidation::InterruptEntry(IecGranularity::Global)])?;
            if self.gsts().contains(GlobalStatus::CFIS) {
                self.global_command(GlobalCommand::CFI, false)?;
            }
            self.global_command(GlobalCommand::IRE, true)
        })();
        if let Err(e) = result {
            if fresh {
                mem.free_frame(base);
            }
            return Err(e);
        }
        match self.ir.as_mut() {
            Some(t) => {
                t.on = true;
                t.eime = eime;
            }
            None => {
                self.ir = Some(IrTable {
                    base,
                    eime,
                    on: true,
                    used: [0; TABLE_ENTRIES / 64],
                })
            }
        }
        log::info!(
            "vt-d unit {}: interrupt remapping on, {} entries, {} destinations, CFI clear",
            self.cfg.id,
            TABLE_ENTRIES,
            if eime { "x2APIC" } else { "xAPIC" }
        );
        Ok(())
    }

    /// Hands out a free IRTE index (the entry stays not present until
    /// [`Unit::set_irte`]).
    pub fn alloc_irte(&mut self) -> Result<u16, Error> {
        let t = self
            .ir
            .as_mut()
            .filter(|t| t.on)
            .ok_or(Error::InvalidState("interrupt remapping is off"))?;
        for (w, word) in t.used.iter_mut().enumerate() {
            if *word != u64::MAX {
                let bit = (!*word).trailing_zeros() as usize;
                *word |= 1 << bit;
                return Ok((w * 64 + bit) as u16);
            }
        }
        Err(Error::Unsupported("every IRTE is in use"))
    }

    /// IRTEs handed out and not freed (0 when interrupt remapping is off).
    pub fn irtes_in_use(&self) -> usize {
        self.ir
            .as_ref()
            .map_or(0, |t| t.used.iter().map(|w| w.count_ones() as usize).sum())
    }

    fn irte_in_use(&self, index: u16) -> Result<&IrTable, Error> {
        let t = self
            .ir
            .as_ref()
            .filter(|t| t.on)
            .ok_or(Error::InvalidState("interrupt remapping is off"))?;
        let i = index as usize;
        if i >= TABLE_ENTRIES || t.used[i / 64] & (1 << (i % 64)) == 0 {
            return Err(Error::InvalidState("IRTE index not allocated"));
        }
        Ok(t)
    }

    /// Writes IRTE `index` (allocated by [`Unit::alloc_irte`]) and invalidates the interrupt
    /// entry cache for it (waited for). The present bit is written last when making an entry
    /// present and first when changing or clearing one, so the hardware never reads a
    /// present entry with half its fields.
    pub fn set_irte<M: DmaMemory>(
        &mut self,
        mem: &mut M,
        index: u16,
        irte: Irte,
    ) -> Result<(), Error> {
        let t = self.irte_in_use(index)?;
        if irte.present() && irte.reserved_bits_set(t.eime) {
            return Err(Error::InvalidState("IRTE with reserved bits set"));
        }
        let at = t.base + index as u64 * IRTE_SIZE as u64;
        if mem.read_u64(at) & 1 != 0 {
            mem.write_u64(at, 0);
            self.flush_lines(mem, at, IRTE_SIZE);
            self.invalidate_irte(mem, index)?;
        }
        mem.write_u64(at + 8, irte.hi);
        mem.write_u64(at, irte.lo);
        self.flush_lines(mem, at, IRTE_SIZE);
        self.invalidate_irte(mem, index)
    }

    /// Reads IRTE `index` back (allocated entries only).
    pub fn irte<M: DmaMemory>(&self, mem: &M, index: u16) -> Result<Irte, Error> {
        let t = self.irte_in_use(index)?;
        let at = t.base + index as u64 * IRTE_SIZE as u64;
        Ok(Irte {
            lo: mem.read_u64(at),
            hi: mem.read_u64(at + 8),
        })
    }

    /// Clears IRTE `index` (not present, invalidated) and returns it to the free set.
    pub fn free_irte<M: DmaMemory>(&mut self, mem: &mut M, index: u16) -> Result<(), Error> {
        self.set_irte(mem, index, Irte::NOT_PRESENT)?;
        if let Some(t) = self.ir.as_mut() {
            let i = index as usize;
            t.used[i / 64] &= !(1 << (i % 64));
        }
        Ok(())
    }

    fn invalidate_irte<M: DmaMemory>(&mut self, mem: &mut M, index: u16) -> Result<(), Error> {
        self.invalidate(
            mem,
            &[Invalidation::InterruptEntry(IecGranularity::Index {
                index,
                mask: 0,
            })],
        )
    }

    /// Creates a domain: allocates a domain id and an empty root page table.
    pub fn create_domain<M: DmaMemory>(&mut self, mem: &mut M) -> Result<Domain, Error> {
        let did = self.dids.alloc()?;
        match PageTable::new(mem, self.table_config()) {
            Ok(tables) => Ok(Domain {
                unit_id: self.cfg.id,
                did,
                tables,
                devices: core::sync::atomic::AtomicUsize::new(0),
            }),
            Err(e) => {
                // The id was allocated just above: freeing it cannot fail.
                let _ = self.dids.free(did);
                Err(e)
            }
        }
    }

    /// Destroys a domain with no device attached: frees all its page-table pages and its
    /// domain id. On error the domain is handed back unchanged.
    ///
    /// Safe without a flush: the last detach invalidated the domain's IOTLB entries and no
    /// device can walk its tables since. Pages still pending in a [`Gather`] are not part of
    /// the tree; flush that gather as usual.
    pub fn destroy_domain<M: DmaMemory>(
        &mut self,
        mem: &mut M,
        domain: Domain,
    ) -> Result<(), (Domain, Error)> {
        if domain.unit_id != self.cfg.id {
            return Err((domain, Error::WrongDomain));
        }
        if domain.device_count() != 0 {
            let devices = domain.device_count();
            return Err((domain, Error::DomainInUse { devices }));
        }
        if let Err(e) = self.dids.free(domain.did) {
            return Err((domain, e));
        }
        domain.tables.free_all(mem);
        Ok(())
    }

    fn context_slot<M: DmaMemory>(
        &mut self,
        mem: &mut M,
        sid: SourceId,
    ) -> Result<PhysAddr, Error> {
        let root = self.ensure_root(mem)?;
        let bus = sid.bus() as usize;
        let table = match self.context_tables[bus] {
            Some(t) => t,
            None => {
                let t = mem.alloc_frame().ok_or(Error::NoMemory)?;
                self.flush_lines(mem, t, PAGE_SIZE as usize);
                let re = RootEntry::new(t);
                let at = root + bus as u64 * 16;
                mem.write_u64(at + 8, re.hi);
                mem.write_u64(at, re.lo);
                self.flush_lines(mem, at, 16);
                self.context_tables[bus] = Some(t);
                t
            }
        };
        Ok(table + sid.devfn() as u64 * 16)
    }

    /// Attaches device `sid` to `domain`: writes its context entry (translation through the
    /// domain's second-level tables, AW from the table depth, DID of the domain).
    ///
    /// With caching mode, the not-present -> present change is invalidated (context cache
    /// device-selective with domain id 0, IOTLB domain-selective); otherwise the write buffer
    /// is flushed when `CAP.RWBF` asks for it.
    pub fn attach<M: DmaMemory>(
        &mut self,
        mem: &mut M,
        domain: &Domain,
        sid: SourceId,
    ) -> Result<(), Error> {
        if domain.unit_id != self.cfg.id {
            return Err(Error::WrongDomain);
        }
        if self.attached.contains_key(&sid) {
            return Err(Error::AlreadyAttached(sid));
        }
        let slot = self.context_slot(mem, sid)?;
        if mem.read_u64(slot) & 1 != 0 {
            return Err(Error::AlreadyAttached(sid));
        }
        let ce = ContextEntry::new(
            domain.tables.root(),
            self.levels,
            domain.did,
            TranslationType::Untranslated,
        );
        // High half first: the entry becomes present with the write of the low half.
        mem.write_u64(slot + 8, ce.hi);
        mem.write_u64(slot, ce.lo);
        self.flush_lines(mem, slot, 16);
        self.attached.insert(sid, domain.did);
        domain
            .devices
            .fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        if self.enabled {
            if self.cap.caching_mode() {
                self.invalidate(
                    mem,
                    &[
                        Invalidation::Context(ContextGranularity::Device {
                            did: 0,
                            sid: sid.0,
                            fm: 0,
                        }),
                        Invalidation::Iotlb(IotlbGranularity::Domain(domain.did)),
                    ],
                )?;
            } else {
                self.write_buffer_flush()?;
            }
        }
        Ok(())
    }

    /// Detaches device `sid` from `domain`: clears its context entry, then invalidates the
    /// context cache (device-selective) and the domain's IOTLB entries and waits. If the
    /// invalidation fails the device stays listed as attached (the domain cannot be
    /// destroyed) and `detach` may be retried.
    pub fn detach<M: DmaMemory>(
        &mut self,
        mem: &mut M,
        domain: &Domain,
        sid: SourceId,
    ) -> Result<(), Error> {
        if domain.unit_id != self.cfg.id || self.attached.get(&sid) != Some(&domain.did) {
            return Err(Error::NotAttached(sid));
        }
        let slot = self.context_slot(mem, sid)?;
        mem.write_u64(slot, 0);
        mem.write_u64(slot + 8, 0);
        self.flush_lines(mem, slot, 16);
        if self.enabled {
            self.invalidate(
                mem,
                &[
                    Invalidation::Context(ContextGranularity::Device {
                        did: domain.did,
                        sid: sid.0,
                        fm: 0,
                    }),
                    Invalidation::Iotlb(IotlbGranularity::Domain(domain.did)),
                ],
            )?;
        }
        self.attached.remove(&sid);
        domain
            .devices
            .fetch_sub(1, core::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Makes the changes gathered in `gather` visible to the hardware and releases what the
    /// unmaps freed: write-buffer flush (for new mappings with `CAP.RWBF`), the planned IOTLB
    /// invalidations (fewest page-selective ones, or one domain-selective), one wait; then
    /// the page-table pages go back to [`DmaMemory::free_frame`] and the unmapped IOVA
    /// ranges are returned. On error the gather is left intact (nothing is released) and the
    /// flush may be retried. A gather of another unit's domain is refused
    /// ([`Error::WrongDomain`]).
    pub fn flush<M: DmaMemory>(
        &mut self,
        mem: &mut M,
        gather: &mut Gather,
    ) -> Result<Flushed, Error> {
        if gather.unit_id() != self.cfg.id {
            return Err(Error::WrongDomain);
        }
        if gather.is_empty() {
            return Ok(Flushed::default());
        }
        let mut out = Flushed::default();
        if self.enabled {
            if gather.has_new_mappings() && !self.cap.caching_mode() {
                self.write_buffer_flush()?;
            }
            out.domain_selective = self.plan_invalidations(gather);
            let invs = core::mem::take(&mut self.invs);
            let r = if invs.is_empty() {
                Ok(())
            } else {
                self.invalidate(mem, &invs)
            };
            out.invalidations = invs.len();
            self.invs = invs;
            r?;
        }
        // Translation off: nothing is cached that `enable`'s global invalidation would not
        // drop, so everything can be released at once.
        let (unmapped, tables) = gather.take();
        out.tables_freed = tables.len();
        for t in tables {
            mem.free_frame(t);
        }
        out.unmapped = unmapped;
        Ok(out)
    }

    /// [`Self::flush`] split for concurrent callers: queues `gather`'s invalidations and a
    /// wait descriptor that writes `seq` to the caller's own status word `status` (a 4-byte
    /// aligned word in a frame from [`DmaMemory::alloc_frame`] that the caller owns), and
    /// returns without waiting ([`Submitted::Queued`]), so the unit's lock is held only to
    /// write descriptors and move the tail. Falls back to [`Self::flush`] (waiting under the
    /// lock) without queued invalidation or with more invalidations than one submission
    /// holds. The gather is left intact until [`Self::flush_release`]; on error (and if the
    /// wait fails) it stays intact and the flush may be retried.
    pub fn flush_submit<M: DmaMemory>(
        &mut self,
        mem: &mut M,
        gather: &mut Gather,
        status: PhysAddr,
        seq: u32,
    ) -> Result<Submitted, Error> {
        if gather.unit_id() != self.cfg.id {
            return Err(Error::WrongDomain);
        }
        if gather.is_empty() || !self.enabled || !self.qi_on {
            return self.flush(mem, gather).map(Submitted::Done);
        }
        let domain_selective = self.plan_invalidations(gather);
        if self.invs.is_empty() || self.invs.len() > QUEUE_ENTRIES - 2 {
            return self.flush(mem, gather).map(Submitted::Done);
        }
        if gather.has_new_mappings() && !self.cap.caching_mode() {
            self.write_buffer_flush()?;
        }
        let Some(q) = self.queue.as_mut() else {
            return Err(Error::InvalidState(
                "queued invalidation on without a queue",
            ));
        };
        let wait_idx = q.submit(
            &mut self.regs,
            mem,
            &self.clock,
            self.cfg.timeout_ns,
            &self.invs,
            status,
            seq,
            &mut self.inv_stats,
        )?;
        Ok(Submitted::Queued(Queued {
            status,
            seq,
            wait_idx,
            flush_status: !q.coherent(),
            timeout_ns: self.cfg.timeout_ns,
            invalidations: self.invs.len(),
            domain_selective,
        }))
    }

    /// Plans the invalidations `gather`'s flush needs into `self.invs` (kept across flushes,
    /// so that planning allocates nothing once it has grown); whether they are one
    /// domain-selective invalidation.
    fn plan_invalidations(&mut self, gather: &mut Gather) -> bool {
        let did = gather.domain_id();
        let (psi, mamv) = (self.cap.psi(), self.cap.mamv());
        self.invs.clear();
        match gather.plan_in_place(psi, mamv, self.cfg.max_psi_blocks) {
            PlanRef::Nothing => false,
            PlanRef::Domain => {
                self.invs
                    .push(Invalidation::Iotlb(IotlbGranularity::Domain(did)));
                true
            }
            PlanRef::Pages { blocks, ih } => {
                self.invs.extend(blocks.iter().map(|b| {
                    Invalidation::Iotlb(IotlbGranularity::Page {
                        did,
                        addr: b.addr,
                        am: b.am,
                        ih,
                    })
                }));
                false
            }
        }
    }

    /// For a waiter of [`Submitted::Queued`] whose status word is not written yet: checks
    /// (and recovers) the queue's errors; `Err` when its own wait descriptor was refused.
    pub fn queue_check<M: DmaMemory>(&mut self, mem: &mut M, q: &Queued) -> Result<(), Error> {
        match self.queue.as_mut() {
            Some(queue) if self.qi_on => {
                queue.check_errors(&mut self.regs, mem, q.wait_idx, &mut self.inv_stats)
            }
            _ => Err(Error::InvalidState("no invalidation queue")),
        }
    }

    /// A waiter of [`Submitted::Queued`] gave up (its status word was not written in time):
    /// counted as a timeout.
    pub fn queue_timed_out(&mut self, q: &Queued) {
        self.inv_stats.timeouts += 1;
        log::error!(
            "vt-d: invalidation wait {} (descriptor {}) timed out",
            q.seq,
            q.wait_idx
        );
    }

    /// Completes a flush whose status word was written: releases what `gather` held (its
    /// table pages back to [`DmaMemory::free_frame`], its unmapped ranges returned). Needs
    /// no access to the unit: call it outside the unit's lock.
    pub fn flush_release<M: DmaMemory>(mem: &mut M, gather: &mut Gather, q: &Queued) -> Flushed {
        let (unmapped, tables) = gather.take();
        let tables_freed = tables.len();
        for t in tables {
            mem.free_frame(t);
        }
        Flushed {
            unmapped,
            tables_freed,
            invalidations: q.invalidations,
            domain_selective: q.domain_selective,
        }
    }

    /// Invalidates every IOTLB entry of domain `did` and waits (e.g. when a deferred flush
    /// queue overflows). Does not release anything: pending gathers still need [`Unit::flush`].
    pub fn invalidate_domain<M: DmaMemory>(&mut self, mem: &mut M, did: u16) -> Result<(), Error> {
        if !self.enabled {
            return Ok(());
        }
        self.invalidate(mem, &[Invalidation::Iotlb(IotlbGranularity::Domain(did))])
    }

    /// Invalidates the whole context cache and IOTLB of the unit and waits.
    pub fn invalidate_all<M: DmaMemory>(&mut self, mem: &mut M) -> Result<(), Error> {
        if !self.enabled {
            return Ok(());
        }
        self.invalidate(
            mem,
            &[
                Invalidation::Context(ContextGranularity::Global),
                Invalidation::Iotlb(IotlbGranularity::Global),
            ],
        )
    }

    /// Drains up to `budget` primary fault records: decodes each (the domain is looked up
    /// from the attached source id), counts it per domain and source, hands it to `sink`
    /// and clears it (F is write-1-to-clear). A primary fault overflow is counted as
    /// dropped and cleared. Work per call is bounded by `min(budget, NFR)` records, so a
    /// device that faults continuously cannot hang the caller; `more` says to call again.
    ///
    /// Call it from the fault-event interrupt handler and/or periodically.
    pub fn poll_faults(&mut self, budget: usize, mut sink: impl FnMut(&FaultRecord)) -> FaultPoll {
        let mut out = FaultPoll::default();
        let fsts = FaultStatus::from_bits_retain(self.regs.read32(FSTS));
        let nfr = self.cap.num_fault_records();
        if fsts.contains(FaultStatus::PPF) {
            let start = fsts.fault_record_index() % nfr;
            for k in 0..nfr {
                let idx = (start + k) % nfr;
                let Some(record) = FaultRecordRegs::new(self.cap, idx) else {
                    break;
                };
                let high = self.regs.read32(record.status());
                if high & frcd::F == 0 {
                    continue;
                }
                if out.drained >= budget {
                    out.more = true;
                    break;
                }
                let lo = self.regs.read64(record.info());
                let sid = self.regs.read32(record.source());
                let mut rec = FaultRecord::decode(idx, lo, sid, high);
                rec.domain = self.attached.get(&rec.source).copied();
                self.regs.write32(record.status(), frcd::F);
                self.faults.count(&rec);
                log::debug!(
                    "vt-d unit {}: fault {:?} {:?} from {} at {:#x} (domain {:?})",
                    self.cfg.id,
                    rec.reason,
                    rec.access,
                    rec.source,
                    rec.address,
                    rec.domain
                );
                sink(&rec);
                out.drained += 1;
            }
        }
        if fsts.contains(FaultStatus::PFO) {
            self.faults.dropped += 1;
            self.regs.write32(FSTS, FaultStatus::PFO.bits());
            out.overflow = true;
            log::warn!(
                "vt-d unit {}: primary fault overflow, faults dropped",
                self.cfg.id
            );
        }
        out
    }

    fn clear_stale_faults(&mut self) {
        let mut stale = 0;
        for idx in 0..self.cap.num_fault_records() {
            let Some(record) = FaultRecordRegs::new(self.cap, idx) else {
                break;
            };
            if self.regs.read32(record.status()) & frcd::F != 0 {
                self.regs.write32(record.status(), frcd::F);
                stale += 1;
            }
        }
        let fsts = FaultStatus::from_bits_retain(self.regs.read32(FSTS));
        let w1c = fsts & FaultStatus::W1C;
        if !w1c.is_empty() {
            self.regs.write32(FSTS, w1c.bits());
        }
        if stale != 0 || !w1c.is_empty() {
            log::warn!(
                "vt-d unit {}: cleared {stale} stale fault records, FSTS={:#x}",
                self.cfg.id,
                fsts.bits()
            );
        }
    }

    /// Programs the fault event MSI (address and data as for any MSI) and unmasks it.
    pub fn configure_fault_interrupt(&mut self, msi_address: u64, msi_data: u32) {
        self.regs.write32(FEDATA, msi_data);
        self.regs.write32(FEADDR, msi_address as u32);
        self.regs.write32(FEUADDR, (msi_address >> 32) as u32);
        self.regs.write32(FECTL, 0);
    }

    /// Masks (`true`) or unmasks the fault event interrupt.
    pub fn set_fault_interrupt_masked(&mut self, masked: bool) {
        let v = if masked {
            FaultEventControl::IM.bits()
        } else {
            0
        };
        self.regs.write32(FECTL, v);
    }
}
