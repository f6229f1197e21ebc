//! The paravirtual DMA service (`moat-abi` calls 16..=23): one VT-d domain per guest with
//! devices, the guest's mapping state (`moat-dma`), its IOVA allocator (`moat-iova`, one
//! per-CPU handle per vCPU) and the hypercall handlers.
//!
//! Every guest-supplied value is copied into hypervisor memory once and checked there
//! (`moat_abi::dma::validate_entry` for the ABI's rules, then `moat_dma` for the guest- and
//! hardware-dependent ones); guest memory is only read and written through [`Partition`]'s
//! bounds-checked accessors.

mod areas;
pub mod backend;
mod fault_ring;
mod guest_mem;
mod info;
mod multicall;

use fault_ring::FaultRing;
use guest_mem::CallRam;

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use moat_abi::dma::{
    self as wire, BatchHeader, DmaFlags, Entry, EntryOutcome, MulticallReturn, MulticallStop,
    QueryHeader, Request,
};
use moat_abi::{Args, Call, FromZeros, IntoBytes, Return, Status};
use moat_dma::{Access, DmaState, Limits, Policy, Unmapped};
use moat_iova::{IovaAllocator, PerCpu};
use moat_pci::Bdf;
use moat_vtd::{Access as VtdAccess, SourceId};
use spin::Mutex;

use crate::arch::{tsc, x86};
use crate::iommu::with_unit;
use backend::{IovaHandle, Partition, Tsc, VtdDomain, VtdPending};

/// Vector of the periodic timer that bounds the deferred flush queue in time.
pub const TIMER_VECTOR: u8 = 0x41;
/// Its period: a tenth of the default deferred bound.
pub const TIMER_PERIOD_US: u32 = 1_000;

/// The timer interrupt does nothing itself: its exit lets the vCPU loop run `tick`.
fn timer_interrupt() {}

/// Installs the timer handler (once, at boot).
pub fn init() {
    crate::arch::idt::register(TIMER_VECTOR, timer_interrupt);
}

const PAGE: u64 = wire::PAGE_SIZE;
/// Most entries one MULTICALL runs.
pub const MAX_BATCH: u32 = 1024;
/// Time budget of one MULTICALL before it returns AGAIN with a cursor (µs). Generous because
/// under QEMU's emulator one entry costs tens of microseconds; on hardware a 1024-entry batch
/// takes well under a millisecond.
const MULTICALL_BUDGET_US: u64 = 20_000;
/// Quota of live mappings per guest (QUERY's `max_mappings`, or fewer when the IOVA window
/// is smaller).
const MAX_MAPPINGS: usize = 16384;
/// Ranges the IOVA allocator tracks per vCPU beyond the quota, for its magazines and depot.
const IOVA_CACHE_RANGES_PER_VCPU: usize = 4096;
/// IOVAs start at 1 MiB (page 0 and the low MiB are never handed out).
const IOVA_BASE_PFN: u64 = 0x100;

/// Why DMA could not be set up for a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupError {
    /// A device is not translated by an enabled VT-d unit (no IOMMU, `iommu=off`).
    NoUnit(Bdf),
    /// The devices are behind different units (one domain per guest per unit: not yet).
    SeveralUnits,
    /// The VT-d driver refused.
    Vtd(moat_vtd::Error),
    /// The IOVA allocator could not be built.
    Iova(moat_iova::Error),
}

impl core::fmt::Display for SetupError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoUnit(b) => write!(f, "{b} is not behind an enabled VT-d unit"),
            Self::SeveralUnits => {
                f.write_str("devices behind different VT-d units are not supported yet")
            }
            Self::Vtd(e) => write!(f, "VT-d: {e}"),
            Self::Iova(e) => write!(f, "IOVA allocator: {e:?}"),
        }
    }
}

struct Inner {
    st: DmaState<VtdPending>,
    dom: VtdDomain,
}

/// Counters the hypercall layer keeps (the service keeps the rest).
#[derive(Default)]
struct CallCounters {
    cycles_exit: AtomicU64,
    multicalls: AtomicU64,
    exits: AtomicU64,
    cycles_validate: AtomicU64,
    /// The unit's fault count for the domain at the last STATS RESET.
    faults_base: AtomicU64,
}

impl CallCounters {
    /// STATS RESET: zero the counters; `faults_now` becomes the new fault baseline.
    fn reset(&self, faults_now: u64) {
        for c in [
            &self.cycles_exit,
            &self.multicalls,
            &self.exits,
            &self.cycles_validate,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        self.faults_base.store(faults_now, Ordering::Relaxed);
    }
}

/// One guest's DMA service.
pub struct GuestDma {
    policy: Policy,
    limits: wire::Limits,
    svc: Limits,
    inner: Mutex<Inner>,
    iova: &'static IovaAllocator,
    cpus: Vec<Mutex<PerCpu<'static>>>,
    limit_pfn: u64,
    /// The reserved IOVA regions QUERY reports (the MSI window when the IOVA window reaches
    /// it, the devices' RMRRs): never handed out by MAP, UNMAP there is PERM.
    regions: Vec<wire::ReservedRegion>,
    part: Partition,
    batch: Vec<Mutex<Option<(u64, u64)>>>,
    calls: CallCounters,
    sources: Vec<SourceId>,
    baseline_tables: usize,
    unit: u64,
    did: u16,
    ring: Mutex<Option<FaultRing>>,
    /// A FAULT_IRQ due: `1 << 63 | vcpu << 8 | vector` (0: none), taken by the vCPU loop.
    fault_irq: AtomicU64,
    faults: AtomicU64,
    /// When the oldest deferred unmap must have been flushed (ns; `u64::MAX`: nothing
    /// waits), as the last DMA call left it.
    deadline_ns: AtomicU64,
}

/// DMA address bits of a device: QEMU's edu masks DMA addresses to 28 bits; anything else
/// gets the 32-bit default of the Linux DMA API.
fn dma_bits(vendor: u16, device: u16) -> u8 {
    if (vendor, device) == crate::edu::ID {
        28
    } else {
        32
    }
}

fn to_policy(p: moat_config::DmaPolicy) -> Policy {
    match p {
        moat_config::DmaPolicy::Passthrough => Policy::Passthrough,
        moat_config::DmaPolicy::Strict => Policy::Strict,
        moat_config::DmaPolicy::Batched => Policy::Batched,
        moat_config::DmaPolicy::Deferred => Policy::Deferred,
    }
}

fn wire_policy(p: Policy) -> wire::Policy {
    match p {
        Policy::Passthrough => wire::Policy::Passthrough,
        Policy::Strict => wire::Policy::Strict,
        Policy::Batched => wire::Policy::Batched,
        Policy::Deferred => wire::Policy::Deferred,
    }
}

impl GuestDma {
    /// Sets up DMA for a guest with `devices` ((bdf, vendor, device) each): a VT-d domain with
    /// the devices' RMRRs identity-mapped (and, under passthrough, all guest RAM at IOVA =
    /// GPA), the devices attached, an IOVA allocator with one handle per vCPU. All or nothing.
    pub fn create(
        policy: moat_config::DmaPolicy,
        vcpus: usize,
        devices: &[(Bdf, u16, u16)],
        hpa: u64,
        mem: u64,
    ) -> Result<Option<GuestDma>, SetupError> {
        let Some(&(first, _, _)) = devices.first() else {
            return Ok(None);
        };
        let unit = crate::iommu::unit_for(first).ok_or(SetupError::NoUnit(first))?;
        for &(b, _, _) in devices {
            if crate::iommu::unit_for(b).ok_or(SetupError::NoUnit(b))? != unit {
                return Err(SetupError::SeveralUnits);
            }
        }
        let policy = to_policy(policy);
        let bits = devices
            .iter()
            .map(|&(_, v, d)| dma_bits(v, d))
            .min()
            .unwrap_or(32);
        let limit_pfn = 1u64 << (bits - 12);
        let mut regions = Vec::new();
        if wire::MSI_WINDOW_START < limit_pfn * PAGE {
            regions.push(wire::ReservedRegion {
                start: wire::MSI_WINDOW_START.into(),
                length: (wire::MSI_WINDOW_END - wire::MSI_WINDOW_START).into(),
                kind: (wire::RegionKind::Msi as u32).into(),
                reserved: 0.into(),
            });
        }
        for &(b, _, _) in devices {
            for (base, end) in crate::iommu::rmrrs_for(b) {
                regions.push(wire::ReservedRegion {
                    start: base.into(),
                    length: (end - base).into(),
                    kind: (wire::RegionKind::Identity as u32).into(),
                    reserved: 0.into(),
                });
            }
        }
        // The allocator tracks every range it hands out or caches (about 100 bytes each, from
        // the heap): room for every mapping the quota allows plus what the magazines may
        // cache. Strict misuse checking, as the allocator's documentation asks of the
        // hypervisor (a double or foreign free is refused, never absorbed).
        let svc = Limits {
            max_mappings: MAX_MAPPINGS,
            // Deferred unmaps are flushed once half the bound has passed: the other half
            // covers the timer's period (TIMER_PERIOD_US), a flush, and a vCPU that is late
            // to take its timer interrupt (under emulation its thread may be descheduled for
            // milliseconds on a busy host).
            slack_ns: Limits::DEFAULT.deferred_ns / 2,
            ..Limits::DEFAULT
        };
        let mut iova = IovaAllocator::new(
            moat_iova::Config::new(IOVA_BASE_PFN, limit_pfn, vcpus.max(1))
                .with_max_ranges(MAX_MAPPINGS + IOVA_CACHE_RANGES_PER_VCPU * vcpus.max(1))
                .with_strict(true),
        )
        .map_err(SetupError::Iova)?;
        // Reserved regions inside the window (the MSI window, RMRRs) are never handed out.
        for r in &regions {
            let (start, end) = (r.start.get(), r.start.get().saturating_add(r.length.get()));
            iova.reserve(start / PAGE, end.div_ceil(PAGE))
                .map_err(SetupError::Iova)?;
        }
        let iova: &'static IovaAllocator = alloc::boxed::Box::leak(alloc::boxed::Box::new(iova));
        let mut cpus = Vec::new();
        for i in 0..vcpus.max(1) {
            cpus.push(Mutex::new(iova.claim(i).map_err(SetupError::Iova)?));
        }
        let sources: Vec<SourceId> = devices
            .iter()
            .map(|&(b, _, _)| SourceId::new(b.bus(), b.device(), b.function()))
            .collect();
        let domain = with_unit(unit, |u, m| -> Result<moat_vtd::Domain, moat_vtd::Error> {
            let mut dom = u.create_domain(m)?;
            let built = (|| {
                let mut g = dom.gather();
                for &(b, _, _) in devices {
                    for (base, end) in crate::iommu::rmrrs_for(b) {
                        dom.map_identity(
                            m,
                            base,
                            end - base,
                            VtdAccess::READ | VtdAccess::WRITE,
                            &mut g,
                        )?;
                    }
                }
                if policy == Policy::Passthrough {
                    dom.map(m, 0, hpa, mem, VtdAccess::READ | VtdAccess::WRITE, &mut g)?;
                }
                for &s in &sources {
                    u.attach(m, &mut dom, s)?;
                }
                u.flush(m, &mut g).map(|_| ())
            })();
            match built {
                Ok(()) => Ok(dom),
                Err(e) => {
                    for &s in &sources {
                        let _ = u.detach(m, &mut dom, s);
                    }
                    let _ = u.destroy_domain(m, dom);
                    Err(e)
                }
            }
        })
        .ok_or(SetupError::NoUnit(first))?
        .map_err(SetupError::Vtd)?;
        let baseline_tables = domain.tables().table_pages();
        // The domain keeps emptied tables for reuse until teardown (a table is unlinked
        // only when an unmap covers its whole span), so the quota covers every table the
        // IOVA window can need (a leaf table per 2 MiB, one per 1 GiB, the levels above)
        // beyond the tables setup built.
        let svc = Limits {
            max_table_pages: baseline_tables
                + limit_pfn.div_ceil(512) as usize
                + limit_pfn.div_ceil(512 * 512) as usize
                + 4,
            ..svc
        };
        let map_needs_flush = with_unit(unit, |u, _| {
            let cap = u.capability();
            cap.caching_mode() || cap.rwbf()
        })
        .unwrap_or(true);
        let did = domain.id();
        Ok(Some(GuestDma {
            policy,
            limits: wire::Limits {
                iova_width: bits,
                max_batch: MAX_BATCH,
                max_map_pages: svc.max_pages_per_map as u32,
            },
            svc,
            inner: Mutex::new(Inner {
                st: DmaState::new(policy, svc),
                dom: VtdDomain {
                    unit,
                    domain,
                    map_needs_flush,
                },
            }),
            iova,
            cpus,
            limit_pfn,
            regions,
            part: Partition {
                base: hpa,
                size: mem,
            },
            batch: (0..vcpus.max(1)).map(|_| Mutex::new(None)).collect(),
            calls: CallCounters::default(),
            sources,
            baseline_tables,
            unit,
            did,
            ring: Mutex::new(None),
            fault_irq: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            deadline_ns: AtomicU64::new(u64::MAX),
        }))
    }

    /// One line for the boot log.
    pub fn describe(&self) -> alloc::string::String {
        let inner = self.inner.lock();
        alloc::format!(
            "policy {:?}, VT-d domain {} on unit {:#x}, IOVA window [{:#x}, {:#x}), {} device(s)",
            self.policy,
            inner.dom.domain.id(),
            inner.dom.unit,
            IOVA_BASE_PFN * PAGE,
            self.limit_pfn * PAGE,
            self.sources.len()
        )
    }

    /// Runs one validated request on the calling vCPU (`single`: a DMA_MAP/DMA_UNMAP call,
    /// else a MULTICALL entry).
    fn run(
        &self,
        inner: &mut Inner,
        vcpu: usize,
        areas: &[(u64, u64)],
        req: Request,
        single: bool,
    ) -> Result<EntryOutcome, Status> {
        let ram = CallRam {
            part: &self.part,
            areas,
        };
        let Inner { st, dom } = inner;
        match req {
            Request::Map { gpa, length, flags } => {
                let a = Access {
                    read: flags.bits() & DmaFlags::READ.bits() != 0,
                    write: flags.bits() & DmaFlags::WRITE.bits() != 0,
                };
                let iova = self
                    .with_iovas(vcpu, |ivs| st.map(dom, ivs, &ram, &Tsc, gpa, length, a))
                    .map_err(Status::from)?;
                Ok(EntryOutcome {
                    status: Status::Ok,
                    done: length,
                    iova: Some(iova),
                })
            }
            Request::Unmap { iova, length } => {
                // U1: reserved IOVA regions (the MSI window, RMRRs), as QUERY reports them.
                if self.regions.iter().any(|r| r.intersects(iova, length)) {
                    st.note_error();
                    return Err(Status::Perm);
                }
                let u = self
                    .with_iovas(vcpu, |ivs| st.unmap(dom, ivs, &ram, &Tsc, iova, length))
                    .map_err(Status::from)?;
                // Took effect but the invalidation was not confirmed (U4): BUSY for a single
                // UNMAP; inside a MULTICALL the entry is OK and `end_batch` reports the call
                // unsynced.
                if single && u == Unmapped::Unsynced {
                    return Err(Status::Busy);
                }
                Ok(EntryOutcome {
                    status: Status::Ok,
                    done: length,
                    iova: None,
                })
            }
        }
    }

    /// Handles DMA call `call` from vCPU `vcpu`.
    pub fn hypercall(&self, vcpu: usize, call: Call, a: &Args) -> Return {
        self.calls.exits.fetch_add(1, Ordering::Relaxed);
        self.deliver_faults();
        match call {
            Call::DmaQuery => self.query(a),
            Call::DmaMap | Call::DmaUnmap => {
                let t0 = x86::rdtsc();
                let req = if call == Call::DmaMap {
                    wire::decode_map_regs(a, &self.limits)
                } else {
                    wire::decode_unmap_regs(a, &self.limits)
                };
                self.calls
                    .cycles_validate
                    .fetch_add(x86::rdtsc() - t0, Ordering::Relaxed);
                let req = match req {
                    Ok(r) => r,
                    Err(s) => {
                        // A failed MAP/UNMAP is an error whether the ABI layer or the
                        // service found it.
                        self.inner.lock().st.note_error();
                        return Return::err(s);
                    }
                };
                // The registered areas are read under the guest's lock, which every
                // registration holds from its checks to its publication: a page cannot be
                // registered and mapped for the device at once.
                let mut inner = self.inner.lock();
                let areas = self.areas();
                let r = self.run(&mut inner, vcpu, &areas, req, true);
                self.publish_deadline(&inner.st);
                match r {
                    Ok(o) => Return::ok(o.iova.unwrap_or(o.done)),
                    Err(s) => Return::err(s),
                }
            }
            Call::DmaMulticall => self.multicall(vcpu, a),
            Call::DmaBatchRegister => self.batch_register(vcpu, a),
            Call::DmaSync => {
                if a.0[0] != 0 {
                    return Return::err(Status::Inval);
                }
                let mut inner = self.inner.lock();
                let before = inner.st.stats().invalidations;
                let Inner { st, dom } = &mut *inner;
                let r = self.with_iovas(vcpu, |ivs| st.sync(dom, ivs, &Tsc));
                self.publish_deadline(st);
                match r {
                    Ok(()) => Return::ok(st.stats().invalidations - before),
                    Err(e) => Return::err(e.into()),
                }
            }
            Call::DmaStats => self.stats(a),
            Call::DmaFaultRingRegister => self.fault_ring_register(vcpu, a),
            _ => Return::err(Status::Unsupp),
        }
    }

    /// Runs `f` with vCPU `vcpu`'s IOVA magazines (its own handle; uncontended).
    fn with_iovas<R>(&self, vcpu: usize, f: impl FnOnce(&mut IovaHandle<'_>) -> R) -> R {
        let mut cpu = self.cpus[vcpu % self.cpus.len()].lock();
        // Answer another vCPU's drain request, if any (one load otherwise).
        cpu.poll();
        f(&mut IovaHandle {
            cpu: &mut cpu,
            limit_pfn: self.limit_pfn,
            all: &self.cpus,
        })
    }

    /// Called when the guest has stopped: reports what it still held, removes every mapping
    /// (flushing), and reports again: the leak check of every guest scenario.
    pub fn shutdown(&self, guest: &str) {
        let mut inner = self.inner.lock();
        // First of all the devices: detached from the domain (context entries cleared, the
        // context cache and the domain's IOTLB entries invalidated), so nothing they still
        // have in flight reaches the stopped guest's memory, whatever its policy.
        let Inner { st, dom } = &mut *inner;
        let (unit, domain) = (dom.unit, &mut dom.domain);
        let blocked = with_unit(unit, |u, m| {
            self.sources
                .iter()
                .map(|&s| (s, u.detach(m, domain, s)))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
        for (s, r) in &blocked {
            match r {
                Ok(()) => log::info!(
                    "guest {guest}: device {s} blocked (detached from VT-d domain {})",
                    self.did
                ),
                Err(e) => log::error!("guest {guest}: device {s} could NOT be detached: {e}"),
            }
        }
        let before = st.counts(dom);
        let torn = self.with_iovas(0, |ivs| st.teardown(dom, ivs, &Tsc));
        let after = st.counts(dom);
        // Every vCPU's magazines go back, so "live" counts only what is really held.
        for c in &self.cpus {
            c.lock().flush();
        }
        let live = self.iova.stats().live_pages;
        log::info!(
            "guest {guest}: dma leak check: at stop {} mapping(s), {} pending, {} pinned page(s); after teardown ({}) {} mapping(s), {} pending, {} pinned page(s), {} IOVA page(s) live, {} table page(s) (baseline {})",
            before.mappings,
            before.pending,
            before.pinned_pages,
            if torn.is_ok() { "ok" } else { "FAILED" },
            after.mappings,
            after.pending,
            after.pinned_pages,
            live,
            after.table_pages,
            self.baseline_tables
        );
        let s = st.stats();
        log::info!(
            "guest {guest}: dma stats: {} maps, {} unmaps, {} errors, {} multicalls, {} flushes with {} invalidations ({} deferred, oldest unmap at most {} us old when its flush completed), {} DMA hypercalls",
            s.maps,
            s.unmaps,
            s.errors,
            self.calls.multicalls.load(Ordering::Relaxed),
            s.flushes,
            s.invalidations,
            s.deferred_flushes,
            s.deferred_max_age_ns / 1000,
            self.calls.exits.load(Ordering::Relaxed)
        );
        // Records of the domain nobody will deliver any more.
        let (n, dropped) = crate::iommu::discard_domain_faults(self.unit, self.did);
        if n > 0 || dropped > 0 {
            log::info!(
                "guest {guest}: {n} undelivered fault record(s) and {dropped} drop(s) of domain {} discarded",
                self.did
            );
        }
    }

    /// Adds the hypervisor's exit/entry cycles of one DMA hypercall (from #VMEXIT to the
    /// handler and from the handler back to VMRUN; the hardware world switch itself is not
    /// visible from the hypervisor).
    pub fn add_exit_cycles(&self, c: u64) {
        self.calls.cycles_exit.fetch_add(c, Ordering::Relaxed);
    }

    /// Whether the vCPUs need the periodic timer (the deferred time bound must hold even when
    /// the guest makes no exits).
    pub fn needs_timer(&self) -> bool {
        self.policy == Policy::Deferred
    }

    /// The deferred time bound, checked on the guest's exits.
    pub fn tick(&self, vcpu: usize) {
        self.deliver_faults();
        // Answer another vCPU's IOVA drain request (one load when there is none).
        if let Some(mut c) = self.cpus[vcpu % self.cpus.len()].try_lock() {
            c.poll();
        }
        if self.policy != Policy::Deferred {
            return;
        }
        // Uncontended: check here. Contended: the holder is another vCPU's DMA call, which
        // checks the bound itself on every entry; but a call may have started just before
        // the flush became due, so once it is due (by the deadline the last call
        // published) wait for the lock rather than skip the check. This runs in the vCPU
        // loop, never in an interrupt handler, so waiting cannot deadlock.
        let mut inner = match self.inner.try_lock() {
            Some(g) => g,
            None => {
                let due = self
                    .deadline_ns
                    .load(Ordering::Relaxed)
                    .saturating_sub(self.svc.slack_ns);
                if tsc::cycles_to_ns(x86::rdtsc()) < due {
                    return;
                }
                self.inner.lock()
            }
        };
        let Inner { st, dom } = &mut *inner;
        self.with_iovas(vcpu, |ivs| st.tick(dom, ivs, &Tsc));
        self.publish_deadline(st);
    }

    /// Publishes when the oldest deferred unmap's flush is due (read by `tick` without the
    /// lock). Called with the guest's lock held, after every call that may change it.
    fn publish_deadline(&self, st: &DmaState<VtdPending>) {
        self.deadline_ns.store(
            st.deferred_deadline().unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}
