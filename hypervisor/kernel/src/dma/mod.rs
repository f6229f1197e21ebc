//! The paravirtual DMA service (`moat-abi` calls 16..=23): one VT-d domain per guest with
//! devices, the guest's mapping state (`moat-dma`), its IOVA allocator (`moat-iova`, one
//! per-CPU handle per vCPU) and the hypercall handlers.
//!
//! **No shared lock on the common path.** Each vCPU has a [`Shard`]: its IOVA magazines, the
//! records of the mappings it made, its pending set and flush queue, its counters and its
//! copy of the registered areas. A MAP or UNMAP of the vCPU's own mappings takes only its
//! own shard's lock, which nobody else takes on the common path (it is there for the rare
//! cross-vCPU paths below), writes the page tables without a lock (the domain's tables
//! take atomic entry writes and link new tables by compare-and-swap), and accounts quotas
//! and guest pages in [`moat_dma::Shared`] with atomics. Only a flush takes the VT-d
//! unit's lock. The cross-vCPU paths, each taking another vCPU's shard lock:
//! - an UNMAP of a mapping another vCPU made moves its record into the caller's shard
//!   first ([`DmaState::take_mapping`], [`DmaState::adopt`]);
//! - an exhausted IOVA allocation empties the magazines of vCPUs not in a DMA call;
//! - the deferred time bound: a vCPU's timer check also flushes another vCPU's overdue
//!   queue (that vCPU may be halted);
//! - registrations of guest pages, STATS, SYNC and shutdown hold every shard (in index
//!   order, never while holding one).
//!
//! Every guest-supplied value is copied into hypervisor memory once and checked there
//! (`moat_abi::dma::validate_entry` for the ABI's rules, then `moat_dma` for the guest- and
//! hardware-dependent ones); guest memory is only read and written through [`Partition`]'s
//! bounds-checked accessors.

mod areas;
pub mod backend;
mod direct;
mod fault_ring;
mod guest_mem;
mod info;
mod multicall;

use fault_ring::FaultRing;
use guest_mem::CallRam;

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use moat_abi::dma::{
    self as wire, BatchHeader, DmaFlags, Entry, EntryOutcome, MulticallReturn, MulticallStop,
    QueryHeader, Request,
};
use moat_abi::{Args, Call, FromZeros, IntoBytes, Return, Status};
use moat_dma::{Access, DmaState, Limits, Policy, Shared, Unmapped};
use moat_iova::{IovaAllocator, PerCpu};
use moat_pci::Bdf;
use moat_vtd::{Access as VtdAccess, PhysAddr, SourceId};
use spin::{Mutex, MutexGuard};

use crate::arch::{tsc, x86};
use crate::iommu::with_unit;
use backend::{IovaHandle, Partition, Tsc, VtdDomain, VtdPending};
pub use direct::DirectDma;

/// One vCPU's part of a guest's DMA service. Its lock is taken by its own vCPU on every DMA
/// call and by other vCPUs only on the cross-vCPU paths (see the module docs).
pub struct Shard {
    /// The records of the mappings this vCPU made (or took over), its pending set and flush
    /// queue, its counters.
    st: DmaState<VtdPending>,
    /// This vCPU's IOVA magazines.
    iova: PerCpu<'static>,
    /// The registered areas (batch areas, fault ring), never DMA targets: a copy kept
    /// current by every registration, which holds every shard.
    areas: Vec<(u64, u64)>,
}

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
/// Bytes between two shards' invalidation status words (a cache line each).
const STATUS_STRIDE: usize = 64;
/// Shards whose status words fit in one frame.
const STATUS_SLOTS: usize = 4096 / STATUS_STRIDE;

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
    /// A remapping policy (strict, batched, deferred) for a device no IOMMU translates.
    NoIommu(Bdf, Policy),
    /// Devices behind a VT-d unit and devices behind none in one guest.
    Mixed,
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
            Self::NoIommu(b, p) => write!(
                f,
                "policy {} needs an IOMMU to translate the device's DMA, and {b} is not behind an enabled VT-d unit (no IOMMU, or `iommu=off`); only `policy=passthrough` works without one",
                wire_policy(*p).name()
            ),
            Self::Mixed => f.write_str(
                "devices behind a VT-d unit and devices behind none in one guest are not supported",
            ),
        }
    }
}

/// Counters the hypercall layer keeps (the service keeps the rest), one set per vCPU (its
/// own cache line: vCPUs do not share a counter on the hot path); STATS sums them.
#[derive(Default)]
#[repr(align(64))]
struct CallCounters {
    cycles_exit: AtomicU64,
    multicalls: AtomicU64,
    exits: AtomicU64,
    cycles_validate: AtomicU64,
}

impl CallCounters {
    /// STATS RESET: zero the counters.
    fn reset(&self) {
        for c in [
            &self.cycles_exit,
            &self.multicalls,
            &self.exits,
            &self.cycles_validate,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// The sums of every vCPU's [`CallCounters`]: (cycles_exit, multicalls, exits,
/// cycles_validate).
fn sum_calls(calls: &[CallCounters]) -> (u64, u64, u64, u64) {
    calls.iter().fold((0, 0, 0, 0), |a, c| {
        (
            a.0 + c.cycles_exit.load(Ordering::Relaxed),
            a.1 + c.multicalls.load(Ordering::Relaxed),
            a.2 + c.exits.load(Ordering::Relaxed),
            a.3 + c.cycles_validate.load(Ordering::Relaxed),
        )
    })
}

/// One guest's DMA service: through its VT-d domain, or (passthrough only) straight to
/// host-physical addresses when no IOMMU translates its devices.
// One per guest, built once inside the guest (never moved afterwards): the size difference
// costs nothing, a box would cost an indirection on every DMA call.
#[allow(clippy::large_enum_variant)]
pub enum GuestDma {
    /// Behind a VT-d unit.
    Vtd(VtdDma),
    /// Behind no IOMMU (passthrough only).
    Direct(DirectDma),
}

impl GuestDma {
    /// Sets up DMA for a guest with `devices` ((bdf, vendor, device) each): behind a VT-d
    /// unit see [`VtdDma::create`]; behind none only passthrough, refused otherwise
    /// ([`SetupError::NoIommu`]). All or nothing.
    pub fn create(
        policy: moat_config::DmaPolicy,
        vcpus: usize,
        devices: &[(Bdf, u16, u16)],
        hpa: u64,
        mem: u64,
    ) -> Result<Option<GuestDma>, SetupError> {
        let untranslated: Vec<Bdf> = devices
            .iter()
            .map(|d| d.0)
            .filter(|&b| crate::iommu::unit_for(b).is_none())
            .collect();
        let Some(&first) = untranslated.first() else {
            return Ok(VtdDma::create(policy, vcpus, devices, hpa, mem)?.map(GuestDma::Vtd));
        };
        if untranslated.len() != devices.len() {
            return Err(SetupError::Mixed);
        }
        let policy = to_policy(policy);
        if policy != Policy::Passthrough {
            return Err(SetupError::NoIommu(first, policy));
        }
        let bits = devices
            .iter()
            .map(|&(_, v, d)| dma_bits(v, d))
            .min()
            .unwrap_or(32);
        Ok(Some(GuestDma::Direct(DirectDma::new(
            hpa,
            mem,
            devices.len(),
            bits,
        ))))
    }

    /// One line for the boot log.
    pub fn describe(&self) -> alloc::string::String {
        match self {
            Self::Vtd(d) => d.describe(),
            Self::Direct(d) => d.describe(),
        }
    }

    /// Handles DMA call `call` from vCPU `vcpu`.
    pub fn hypercall(&self, vcpu: usize, call: Call, a: &Args) -> Return {
        match self {
            Self::Vtd(d) => d.hypercall(vcpu, call, a),
            Self::Direct(d) => d.hypercall(call, a),
        }
    }

    /// Called when the guest has stopped (see [`VtdDma::shutdown`]).
    pub fn shutdown(&self, guest: &str) {
        match self {
            Self::Vtd(d) => d.shutdown(guest),
            Self::Direct(d) => d.shutdown(guest),
        }
    }

    /// Adds the hypervisor's exit/entry cycles of one DMA hypercall.
    pub fn add_exit_cycles(&self, vcpu: usize, c: u64) {
        match self {
            Self::Vtd(d) => d.add_exit_cycles(vcpu, c),
            Self::Direct(d) => d.add_exit_cycles(c),
        }
    }

    /// Whether the vCPUs need the periodic timer (deferred only).
    pub fn needs_timer(&self) -> bool {
        matches!(self, Self::Vtd(d) if d.needs_timer())
    }

    /// The deferred time bound, checked on the guest's exits (see [`VtdDma::tick`]).
    pub fn tick(&self, vcpu: usize) {
        if let Self::Vtd(d) = self {
            d.tick(vcpu);
        }
    }

    /// A FAULT_IRQ due: (vCPU, vector). None without an IOMMU (nothing records faults).
    pub fn take_fault_irq(&self) -> Option<(usize, u8)> {
        match self {
            Self::Vtd(d) => d.take_fault_irq(),
            Self::Direct(_) => None,
        }
    }

    /// After every guest stopped: the faults the IOMMU recorded for the stopped devices.
    pub fn report_faults_after_stop(&self, guest: &str) -> usize {
        match self {
            Self::Vtd(d) => d.report_faults_after_stop(guest),
            Self::Direct(_) => 0,
        }
    }
}

/// One guest's DMA service behind a VT-d unit.
pub struct VtdDma {
    policy: Policy,
    limits: wire::Limits,
    svc: Limits,
    /// The guest's domain: shared, map and unmap need no lock.
    dom: VtdDomain,
    /// One per vCPU.
    shards: Vec<Mutex<Shard>>,
    /// Per shard: when its oldest deferred unmap must have been flushed (ns; `u64::MAX`:
    /// nothing waits), as its last DMA call left it (read by every vCPU's timer check).
    deadlines: Vec<AtomicU64>,
    iova: &'static IovaAllocator,
    limit_pfn: u64,
    /// The reserved IOVA regions QUERY reports (the MSI window when the IOVA window reaches
    /// it, the devices' RMRRs): never handed out by MAP, UNMAP there is PERM.
    regions: Vec<wire::ReservedRegion>,
    part: Partition,
    batch: Vec<Mutex<Option<(u64, u64)>>>,
    /// Per vCPU.
    calls: Vec<CallCounters>,
    /// The unit's fault count for the domain at the last STATS RESET.
    faults_base: AtomicU64,
    sources: Vec<SourceId>,
    baseline_tables: usize,
    unit: u64,
    did: u16,
    ring: Mutex<Option<FaultRing>>,
    /// A FAULT_IRQ due: `1 << 63 | vcpu << 8 | vector` (0: none), taken by the vCPU loop.
    fault_irq: AtomicU64,
    faults: AtomicU64,
    /// The fault log's generation when this guest's queue was last found empty.
    fault_gen: AtomicU64,
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

pub(crate) fn to_policy(p: moat_config::DmaPolicy) -> Policy {
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

impl VtdDma {
    /// Sets up DMA for a guest with `devices` ((bdf, vendor, device) each): a VT-d domain with
    /// the devices' RMRRs identity-mapped (and, under passthrough, all guest RAM at IOVA =
    /// GPA), the devices attached, an IOVA allocator with one handle per vCPU. All or nothing.
    pub fn create(
        policy: moat_config::DmaPolicy,
        vcpus: usize,
        devices: &[(Bdf, u16, u16)],
        hpa: u64,
        mem: u64,
    ) -> Result<Option<VtdDma>, SetupError> {
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
        // cache. Strict misuse checking (every range's owner recorded, a double or foreign
        // free refused, never absorbed) in the scenario build only: it records each magazine
        // hit and free under the allocator's global lock, which would serialize the vCPUs
        // on every MAP and UNMAP. The service frees only what its own records hold (a range
        // goes back once, after the invalidation of its unmap or rolled-back map: the model
        // tests, the shard test and the scenarios check it, the latter with strict checking
        // on); the release build keeps the allocator's cheap checks (order, alignment,
        // window, the magazine's top).
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
                .with_strict(cfg!(feature = "selftest")),
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
            cpus.push(iova.claim(i).map_err(SetupError::Iova)?);
        }
        let sources: Vec<SourceId> = devices
            .iter()
            .map(|&(b, _, _)| SourceId::new(b.bus(), b.device(), b.function()))
            .collect();
        let domain = with_unit(unit, |u, m| -> Result<moat_vtd::Domain, moat_vtd::Error> {
            let dom = u.create_domain(m)?;
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
                    dom.map(
                        m,
                        0,
                        PhysAddr::new(hpa),
                        mem,
                        VtdAccess::READ | VtdAccess::WRITE,
                        &mut g,
                    )?;
                }
                for &s in &sources {
                    u.attach(m, &dom, s)?;
                }
                u.flush(m, &mut g).map(|_| ())
            })();
            match built {
                Ok(()) => Ok(dom),
                Err(e) => {
                    for &s in &sources {
                        let _ = u.detach(m, &dom, s);
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
        let shared = Arc::new(Shared::new(mem));
        // The shards' invalidation status words: one cache line each in a VT-d frame (no
        // frame: every flush waits under the unit's lock, as before).
        let status_frame = if cpus.len() <= STATUS_SLOTS {
            moat_vtd::DmaMemory::alloc_frame(&mut crate::iommu::hw::KernelMemory)
        } else {
            None
        };
        let shards: Vec<Mutex<Shard>> = cpus
            .into_iter()
            .enumerate()
            .map(|(i, iova)| {
                let pending = match status_frame {
                    Some(f) => VtdPending::with_status(f + (i * STATUS_STRIDE) as u64),
                    None => VtdPending::default(),
                };
                Mutex::new(Shard {
                    st: DmaState::with_shared(policy, svc, shared.clone(), pending),
                    iova,
                    areas: Vec::new(),
                })
            })
            .collect();
        Ok(Some(VtdDma {
            policy,
            limits: wire::Limits {
                iova_width: bits,
                max_batch: MAX_BATCH,
                max_map_pages: svc.max_pages_per_map as u32,
            },
            svc,
            dom: VtdDomain {
                unit,
                domain,
                map_needs_flush,
            },
            deadlines: shards.iter().map(|_| AtomicU64::new(u64::MAX)).collect(),
            shards,
            iova,
            limit_pfn,
            regions,
            part: Partition {
                base: hpa,
                size: mem,
            },
            batch: (0..vcpus.max(1)).map(|_| Mutex::new(None)).collect(),
            calls: (0..vcpus.max(1)).map(|_| CallCounters::default()).collect(),
            faults_base: AtomicU64::new(0),
            sources,
            baseline_tables,
            unit,
            did,
            ring: Mutex::new(None),
            fault_irq: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            fault_gen: AtomicU64::new(u64::MAX),
        }))
    }

    /// One line for the boot log.
    pub fn describe(&self) -> alloc::string::String {
        alloc::format!(
            "policy {:?}, VT-d domain {} on unit {:#x}, IOVA window [{:#x}, {:#x}), {} device(s), {} vCPU shard(s)",
            self.policy,
            self.dom.domain.id(),
            self.dom.unit,
            IOVA_BASE_PFN * PAGE,
            self.limit_pfn * PAGE,
            self.sources.len(),
            self.shards.len()
        )
    }

    /// The index of vCPU `vcpu`'s shard.
    fn me(&self, vcpu: usize) -> usize {
        vcpu % self.shards.len()
    }

    /// Every shard, held in index order: excludes every DMA call of the guest (registrations,
    /// STATS, SYNC, shutdown). Never called while holding a shard.
    fn all_shards(&self) -> Vec<MutexGuard<'_, Shard>> {
        self.shards.iter().map(|s| s.lock()).collect()
    }

    /// Runs `f` on shard `i` (held) with its IOVA magazines as the allocator handle.
    fn on<R>(
        &self,
        shard: &mut Shard,
        f: impl FnOnce(&mut DmaState<VtdPending>, &mut &VtdDomain, &mut IovaHandle<'_>) -> R,
    ) -> R {
        let Shard { st, iova, .. } = shard;
        // Answer another vCPU's drain request, if any (one load otherwise).
        iova.poll();
        f(
            st,
            &mut &self.dom,
            &mut IovaHandle {
                cpu: iova,
                limit_pfn: self.limit_pfn,
                all: &self.shards,
            },
        )
    }

    /// Moves the live mapping at `iova` into shard `me` when another shard holds it (an
    /// UNMAP on another vCPU than its MAP). Called without holding any shard; takes the
    /// others one at a time. Returns whether one was moved.
    fn adopt_from_others(&self, me: usize, iova: u64) -> bool {
        for (i, other) in self.shards.iter().enumerate() {
            if i == me {
                continue;
            }
            let taken = other.lock().st.take_mapping(iova);
            if let Some(m) = taken {
                self.shards[me].lock().st.adopt(m);
                return true;
            }
        }
        false
    }

    /// Runs one validated request on the calling vCPU (`single`: a DMA_MAP/DMA_UNMAP call,
    /// else a MULTICALL entry).
    fn run(&self, vcpu: usize, req: Request, single: bool) -> Result<EntryOutcome, Status> {
        let me = self.me(vcpu);
        let mut shard = self.shards[me].lock();
        let r = match self.run_on(&mut shard, req, single) {
            Some(r) => r,
            None => {
                let (held, r) = self.adopt_and_run(me, shard, req, single);
                shard = held;
                r
            }
        };
        self.publish_deadline(me, &shard.st);
        r
    }

    /// The cross-vCPU path of an UNMAP (`req`) of a mapping shard `me` (held by `shard`,
    /// released meanwhile and returned held) does not hold: its record moves here from
    /// another shard, then `req` runs again; a mapping nobody holds is NOENT. The common
    /// case, the caller's own mapping, costs one lookup ([`Self::run_on`]).
    #[cold]
    fn adopt_and_run<'a>(
        &'a self,
        me: usize,
        shard: MutexGuard<'a, Shard>,
        req: Request,
        single: bool,
    ) -> (MutexGuard<'a, Shard>, Result<EntryOutcome, Status>) {
        drop(shard);
        if let Request::Unmap { iova, .. } = req {
            self.adopt_from_others(me, iova);
        }
        let mut shard = self.shards[me].lock();
        let r = match self.run_on(&mut shard, req, single) {
            Some(r) => r,
            None => {
                shard.st.note_error();
                Err(Status::Noent)
            }
        };
        (shard, r)
    }

    /// Runs `req` on `shard`; `None`: an UNMAP of a mapping the shard does not hold (nothing
    /// changed or counted).
    fn run_on(
        &self,
        shard: &mut Shard,
        req: Request,
        single: bool,
    ) -> Option<Result<EntryOutcome, Status>> {
        let areas = core::mem::take(&mut shard.areas);
        let ram = CallRam {
            part: &self.part,
            areas: &areas,
        };
        let r = self.run_req(shard, &ram, req, single);
        shard.areas = areas;
        r
    }

    fn run_req(
        &self,
        shard: &mut Shard,
        ram: &CallRam<'_>,
        req: Request,
        single: bool,
    ) -> Option<Result<EntryOutcome, Status>> {
        Some(match req {
            Request::Map { gpa, length, flags } => {
                let a = Access {
                    read: flags.bits() & DmaFlags::READ.bits() != 0,
                    write: flags.bits() & DmaFlags::WRITE.bits() != 0,
                };
                let r = self.on(shard, |st, dom, ivs| {
                    st.map(dom, ivs, ram, &Tsc, gpa, length, a)
                });
                let iova = match r {
                    Ok(iova) => iova,
                    Err(e) => return Some(Err(Status::from(e))),
                };
                Ok(EntryOutcome {
                    status: Status::Ok,
                    done: length,
                    iova: Some(iova),
                })
            }
            Request::Unmap { iova, length } => {
                // U1: reserved IOVA regions (the MSI window, RMRRs), as QUERY reports them.
                if self.regions.iter().any(|r| r.intersects(iova, length)) {
                    shard.st.note_error();
                    return Some(Err(Status::Perm));
                }
                let r = self.on(shard, |st, dom, ivs| {
                    st.unmap_own(dom, ivs, ram, &Tsc, (iova, length))
                });
                let u = match r {
                    Ok(Some(u)) => u,
                    Ok(None) => return None,
                    Err(e) => return Some(Err(Status::from(e))),
                };
                // Took effect but the invalidation was not confirmed (U4): BUSY for a single
                // UNMAP; inside a MULTICALL the entry is OK and `end_batch` reports the call
                // unsynced.
                if single && u == Unmapped::Unsynced {
                    return Some(Err(Status::Busy));
                }
                Ok(EntryOutcome {
                    status: Status::Ok,
                    done: length,
                    iova: None,
                })
            }
        })
    }

    /// Handles DMA call `call` from vCPU `vcpu`.
    pub fn hypercall(&self, vcpu: usize, call: Call, a: &Args) -> Return {
        let calls = &self.calls[self.me(vcpu)];
        calls.exits.fetch_add(1, Ordering::Relaxed);
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
                calls
                    .cycles_validate
                    .fetch_add(x86::rdtsc() - t0, Ordering::Relaxed);
                let req = match req {
                    Ok(r) => r,
                    Err(s) => {
                        // A failed MAP/UNMAP is an error whether the ABI layer or the
                        // service found it.
                        self.shards[self.me(vcpu)].lock().st.note_error();
                        return Return::err(s);
                    }
                };
                // The registered areas are the shard's copy, read with the shard held;
                // every registration holds every shard from its checks to its
                // publication: a page cannot be registered and mapped for the device at
                // once.
                let r = self.run(vcpu, req, true);
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
                // Every vCPU's queue, one shard at a time (the caller's pending unmaps and
                // those of vCPUs that have not flushed theirs yet).
                let mut invalidations = 0;
                let mut result = Ok(());
                for i in 0..self.shards.len() {
                    let mut shard = self.shards[i].lock();
                    let before = shard.st.stats().invalidations;
                    let r = self.on(&mut shard, |st, dom, ivs| st.sync(dom, ivs, &Tsc));
                    invalidations += shard.st.stats().invalidations - before;
                    self.publish_deadline(i, &shard.st);
                    result = result.and(r);
                }
                let _ = vcpu;
                match result {
                    Ok(()) => Return::ok(invalidations),
                    Err(e) => Return::err(e.into()),
                }
            }
            Call::DmaStats => self.stats(a),
            Call::DmaFaultRingRegister => self.fault_ring_register(vcpu, a),
            _ => Return::err(Status::Unsupp),
        }
    }

    /// Called when the guest has stopped: reports what it still held, removes every mapping
    /// (flushing), and reports again: the leak check of every guest scenario.
    pub fn shutdown(&self, guest: &str) {
        let mut shards = self.all_shards();
        // First of all the devices: detached from the domain (context entries cleared, the
        // context cache and the domain's IOTLB entries invalidated), so nothing they still
        // have in flight reaches the stopped guest's memory, whatever its policy.
        let domain = &self.dom.domain;
        let blocked = with_unit(self.dom.unit, |u, m| {
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
        let dom = &self.dom;
        let before = sum_counts(shards.iter().map(|s| s.st.counts(&dom)));
        // Every shard's mappings, then (with the last) the tables kept for reuse.
        let mut torn = Ok(());
        for shard in shards.iter_mut() {
            torn = torn.and(self.on(shard, |st, dom, ivs| st.teardown(dom, ivs, &Tsc)));
        }
        let after = sum_counts(shards.iter().map(|s| s.st.counts(&dom)));
        // Every vCPU's magazines go back, so "live" counts only what is really held.
        let mut status_frame = None;
        let mut poisoned = false;
        for shard in shards.iter_mut() {
            shard.iova.flush();
            let (status, p) = shard.st.pending_mut().take_status();
            if let Some(status) = status {
                status_frame = Some(status.align_down(PAGE));
            }
            poisoned |= p;
        }
        // The status words' frame, unless the unit may still write one (a wait timed out).
        if let Some(f) = status_frame {
            if poisoned {
                log::warn!(
                    "guest {guest}: invalidation status frame {f:#x} kept (a wait on it timed out)"
                );
            } else {
                moat_vtd::DmaMemory::free_frame(&mut crate::iommu::hw::KernelMemory, f);
            }
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
        let s = sum_stats(shards.iter().map(|s| s.st.stats()));
        let (_, multicalls, exits, _) = sum_calls(&self.calls);
        let shared = shards[0].st.shared().clone();
        log::info!(
            "guest {guest}: dma stats: {} maps, {} unmaps, {} errors, {} multicalls, {} flushes with {} invalidations ({} deferred, oldest unmap at most {} us old when its flush completed), {} DMA hypercalls; {} shard(s), guest-wide accounting after teardown: {} mapping(s), {} page(s)",
            s.maps,
            s.unmaps,
            s.errors,
            multicalls,
            s.flushes,
            s.invalidations,
            s.deferred_flushes,
            s.deferred_max_age_ns / 1000,
            exits,
            shards.len(),
            shared.mappings(),
            shared.mapped_pages()
        );
        drop(shards);
        // Records of the domain nobody will deliver any more.
        let (n, dropped) = crate::iommu::discard_domain_faults(self.unit, self.did);
        if n > 0 || dropped > 0 {
            log::info!(
                "guest {guest}: {n} undelivered fault record(s) and {dropped} drop(s) of domain {} discarded",
                self.did
            );
        }
    }

    /// Adds the hypervisor's exit/entry cycles of one DMA hypercall (from the VM exit to the
    /// handler and from the handler back to the VM entry; the hardware world switch itself is not
    /// visible from the hypervisor).
    pub fn add_exit_cycles(&self, vcpu: usize, c: u64) {
        self.calls[self.me(vcpu)]
            .cycles_exit
            .fetch_add(c, Ordering::Relaxed);
    }

    /// Whether the vCPUs need the periodic timer (the deferred time bound must hold even when
    /// the guest makes no exits).
    pub fn needs_timer(&self) -> bool {
        self.policy == Policy::Deferred
    }

    /// The deferred time bound, checked on the guest's exits: vCPU `vcpu`'s own flush queue,
    /// and any other vCPU's that is due (that vCPU may be halted, or stuck in a long call:
    /// then this waits for its shard, which is never held longer than a MULTICALL's budget).
    pub fn tick(&self, vcpu: usize) {
        self.deliver_faults();
        let me = self.me(vcpu);
        if self.policy != Policy::Deferred {
            // Answer another vCPU's IOVA drain request (one load when there is none).
            if let Some(mut c) = self.shards[me].try_lock() {
                c.iova.poll();
            }
            return;
        }
        let now = tsc::cycles_to_ns(x86::rdtsc());
        for i in 0..self.shards.len() {
            let due = self.deadlines[i]
                .load(Ordering::Acquire)
                .saturating_sub(self.svc.slack_ns);
            // Our own queue is checked whenever it is free (cheap); another's only once due.
            let mut shard = if i == me {
                match self.shards[i].try_lock() {
                    Some(g) => g,
                    None if now < due => continue,
                    None => self.shards[i].lock(),
                }
            } else {
                if now < due {
                    continue;
                }
                self.shards[i].lock()
            };
            self.on(&mut shard, |st, dom, ivs| st.tick(dom, ivs, &Tsc));
            self.publish_deadline(i, &shard.st);
        }
    }

    /// Publishes when shard `i`'s oldest deferred unmap's flush is due (read by every vCPU's
    /// `tick` without the lock). Called with the shard held, after every call that may
    /// change it.
    fn publish_deadline(&self, i: usize, st: &DmaState<VtdPending>) {
        if self.policy == Policy::Deferred {
            self.deadlines[i].store(
                st.deferred_deadline().unwrap_or(u64::MAX),
                Ordering::Release,
            );
        }
    }
}

/// The guest-wide gauges: the shards' sums (the domain's table pages are the same in each).
fn sum_counts(it: impl Iterator<Item = moat_dma::Counts>) -> moat_dma::Counts {
    it.fold(moat_dma::Counts::default(), |a, c| moat_dma::Counts {
        mappings: a.mappings + c.mappings,
        pending: a.pending + c.pending,
        rolled_back: a.rolled_back + c.rolled_back,
        pinned_pages: a.pinned_pages + c.pinned_pages,
        iova_pages: a.iova_pages + c.iova_pages,
        table_pages: c.table_pages,
    })
}

/// The guest-wide counters: the shards' sums (the deferred age bound: their maximum).
fn sum_stats(it: impl Iterator<Item = moat_dma::Stats>) -> moat_dma::Stats {
    it.fold(moat_dma::Stats::default(), |a, s| moat_dma::Stats {
        maps: a.maps + s.maps,
        unmaps: a.unmaps + s.unmaps,
        errors: a.errors + s.errors,
        flushes: a.flushes + s.flushes,
        waits: a.waits + s.waits,
        flush_failures: a.flush_failures + s.flush_failures,
        invalidations: a.invalidations + s.invalidations,
        deferred_flushes: a.deferred_flushes + s.deferred_flushes,
        deferred_max_age_ns: a.deferred_max_age_ns.max(s.deferred_max_age_ns),
        cycles: core::array::from_fn(|k| a.cycles[k] + s.cycles[k]),
    })
}
