//! The paravirtual DMA service (`moat-abi` calls 16..=23): one VT-d domain per guest with
//! devices, the guest's mapping state (`moat-dma`), its IOVA allocator (`moat-iova`, one
//! per-CPU handle per vCPU) and the hypercall handlers.
//!
//! Every guest-supplied value is copied into hypervisor memory once and checked there
//! (`moat_abi::dma::validate_entry` for the ABI's rules, then `moat_dma` for the guest- and
//! hardware-dependent ones); guest memory is only read and written through [`Partition`]'s
//! bounds-checked accessors.

pub mod backend;

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

const PAGE: u64 = 4096;
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
    faults: AtomicU64,
    /// When the oldest deferred unmap must have been flushed (ns; `u64::MAX`: nothing
    /// waits), as the last DMA call left it.
    deadline_ns: AtomicU64,
}

/// The guest's registered fault ring: the producer side is kept here and never read back.
struct FaultRing {
    gpa: u64,
    pages: u64,
    capacity: u32,
    producer: u32,
    seq: u64,
    dropped: u64,
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

/// Guest RAM plus the pages the guest may not hand to a device right now (its batch areas).
struct CallRam<'a> {
    part: &'a Partition,
    areas: &'a [(u64, u64)],
}

impl moat_dma::GuestRam for CallRam<'_> {
    fn size(&self) -> u64 {
        self.part.size
    }
    fn host_base(&self) -> u64 {
        self.part.base
    }
    fn forbidden(&self, gpa: core::ops::Range<u64>) -> bool {
        moat_dma::GuestRam::forbidden(self.part, gpa.clone())
            || self
                .areas
                .iter()
                .any(|&(a, p)| gpa.start < a + p * PAGE && gpa.end > a)
    }
}

impl Partition {
    fn check(&self, gpa: u64, len: usize) -> Result<u64, Status> {
        let end = gpa.checked_add(len as u64).ok_or(Status::Fault)?;
        if end > self.size {
            return Err(Status::Fault);
        }
        Ok(self.base + gpa)
    }

    /// Copies guest memory into `buf` (hypervisor memory). The guest's other vCPUs and its
    /// devices may write these bytes at the same time: every byte is read exactly once with a
    /// volatile load, so the copy is what the checks see (no time-of-check/time-of-use) and
    /// the compiler may not re-read guest memory. Naturally aligned 8-byte words are read
    /// with one 8-byte load, so a field the guest writes with one aligned store is seen old
    /// or new, never torn.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), Status> {
        let hpa = self.check(gpa, buf.len())?;
        let mut i = 0;
        while i < buf.len() {
            let at = hpa + i as u64;
            if at.is_multiple_of(8) && buf.len() - i >= 8 {
                // SAFETY: [hpa, hpa+len) lies inside the guest's partition (checked), which is
                // identity-mapped RAM the hypervisor owns for the guest's lifetime; `at` is
                // 8-byte aligned and the 8 bytes lie inside the range.
                let w = unsafe { core::ptr::read_volatile(at as *const u64) };
                buf[i..i + 8].copy_from_slice(&w.to_ne_bytes());
                i += 8;
            } else {
                // SAFETY: as above, one byte inside the range.
                buf[i] = unsafe { core::ptr::read_volatile(at as *const u8) };
                i += 1;
            }
        }
        Ok(())
    }

    /// Writes `bytes` into guest memory (volatile stores, aligned 8-byte words in one store:
    /// the guest may read them meanwhile and sees each word old or new).
    fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), Status> {
        let hpa = self.check(gpa, bytes.len())?;
        let mut i = 0;
        while i < bytes.len() {
            let at = hpa + i as u64;
            if at.is_multiple_of(8) && bytes.len() - i >= 8 {
                let mut w = [0u8; 8];
                w.copy_from_slice(&bytes[i..i + 8]);
                // SAFETY: as in `read`; the guest owns these bytes and expects the hypervisor
                // to write them (a reply buffer or a batch entry's output fields).
                unsafe { core::ptr::write_volatile(at as *mut u64, u64::from_ne_bytes(w)) };
                i += 8;
            } else {
                // SAFETY: as above, one byte inside the range.
                unsafe { core::ptr::write_volatile(at as *mut u8, bytes[i]) };
                i += 1;
            }
        }
        Ok(())
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

    /// Guest pages registered with the hypervisor (batch areas, the fault ring): never DMA
    /// targets.
    fn areas(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self.batch.iter().filter_map(|b| *b.lock()).collect();
        if let Some(r) = self.ring.lock().as_ref() {
            v.push((r.gpa, r.pages));
        }
        v
    }

    /// Moves the VT-d faults of this guest's domain from its queue in the hypervisor's fault
    /// log into the guest's fault ring (or only counts them when it has none); records the
    /// queue had to drop (it was full) count as the ring's drops. Called on the guest's exits
    /// and DMA calls (which also runs a fault drain an interrupt left pending).
    pub fn deliver_faults(&self) {
        let Some(taken) = crate::iommu::take_domain_faults(self.unit, self.did) else {
            return;
        };
        if taken.records.is_empty() && taken.dropped == 0 {
            return;
        }
        self.faults.fetch_add(
            taken.records.len() as u64 + taken.dropped,
            Ordering::Relaxed,
        );
        let mut ring = self.ring.lock();
        let Some(r) = ring.as_mut() else { return };
        r.dropped = r.dropped.wrapping_add(taken.dropped);
        let mut cb = [0u8; 4];
        if self
            .part
            .read(
                r.gpa + wire::FaultRingHeader::CONSUMER_OFFSET as u64,
                &mut cb,
            )
            .is_err()
        {
            return;
        }
        let consumer = u32::from_le_bytes(cb);
        for rec in taken.records {
            if r.producer.wrapping_sub(consumer) >= r.capacity {
                r.dropped += 1;
                continue;
            }
            let rec = wire::FaultRecord {
                iova: rec.address.into(),
                source_id: rec.source.0.into(),
                reason: rec.reason.code(),
                direction: match rec.access {
                    moat_vtd::fault::FaultAccess::Read => wire::Direction::Read as u8,
                    moat_vtd::fault::FaultAccess::Write => wire::Direction::Write as u8,
                },
                reserved0: 0.into(),
                seq: r.seq.into(),
                reserved1: 0.into(),
            };
            let slot = r.gpa
                + wire::FAULT_RING_HEADER_SIZE as u64
                + (r.producer % r.capacity) as u64 * wire::FAULT_RECORD_SIZE as u64;
            // The record first, then the index that publishes it (x86 keeps store order).
            let _ = self.part.write(slot, rec.as_bytes());
            r.seq += 1;
            r.producer = r.producer.wrapping_add(1);
        }
        let _ = self.part.write(
            r.gpa + wire::FaultRingHeader::DROPPED_OFFSET as u64,
            &r.dropped.to_le_bytes(),
        );
        let _ = self.part.write(
            r.gpa + wire::FaultRingHeader::PRODUCER_OFFSET as u64,
            &r.producer.to_le_bytes(),
        );
    }

    fn fault_ring_register(&self, a: &Args) -> Return {
        let (gpa, pages, vector) = (a.0[0], a.0[1], a.0[2]);
        if vector != 0 {
            // Only the polled ring is offered (no FAULT_IRQ feature yet).
            return Return::err(if (1..32).contains(&vector) || vector > 255 {
                Status::Inval
            } else {
                Status::Unsupp
            });
        }
        if pages == 0 {
            let _inner = self.inner.lock();
            return match self.ring.lock().take() {
                Some(_) => Return::ok(0),
                None => Return::err(Status::Noent),
            };
        }
        // Checks and publication under the guest's lock (see `check_area`).
        let inner = self.inner.lock();
        let others: Vec<(u64, u64)> = self.batch.iter().filter_map(|b| *b.lock()).collect();
        if let Err(st) = self.check_area(&inner, gpa, pages, wire::MAX_FAULT_RING_PAGES, &others) {
            return Return::err(st);
        }
        let capacity = wire::fault_ring_capacity(pages);
        if self
            .part
            .write(gpa, wire::FaultRingHeader::new(capacity).as_bytes())
            .is_err()
        {
            return Return::err(Status::Fault);
        }
        *self.ring.lock() = Some(FaultRing {
            gpa,
            pages,
            capacity,
            producer: 0,
            seq: 0,
            dropped: 0,
        });
        drop(inner);
        Return::ok(capacity as u64)
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
            Call::DmaFaultRingRegister => self.fault_ring_register(a),
            _ => Return::err(Status::Unsupp),
        }
    }

    fn query(&self, a: &Args) -> Return {
        let (gpa, len) = (a.0[0], a.0[1]);
        let header = QueryHeader {
            abi_version: moat_abi::ABI_VERSION.into(),
            header_size: (wire::QUERY_HEADER_SIZE as u32).into(),
            page_sizes: (1 << 12).into(),
            iova_width: self.limits.iova_width,
            policy: wire_policy(self.policy) as u8,
            reserved0: 0.into(),
            max_batch: self.limits.max_batch.into(),
            features: (wire::Features::STATS
                | wire::Features::FAULT_RING
                | if self.policy == Policy::Passthrough {
                    wire::Features::IOVA_IS_GPA
                } else {
                    0
                })
            .into(),
            // What can really be live at once: the quota, or every page of the IOVA window
            // outside the reserved regions when that is fewer.
            max_mappings: (self.max_mappings() as u32).into(),
            max_pt_pages: (self.svc.max_table_pages as u32).into(),
            deferred_max_entries: if self.policy == Policy::Deferred {
                self.svc.deferred_entries as u32
            } else {
                0
            }
            .into(),
            deferred_max_us: if self.policy == Policy::Deferred {
                (self.svc.deferred_ns / 1000) as u32
            } else {
                0
            }
            .into(),
            nr_regions: (self.regions.len() as u32).into(),
            regions_written: 0.into(),
            max_batch_pages: (wire::MAX_BATCH_PAGES as u32).into(),
            max_map_pages: self.limits.max_map_pages.into(),
        };
        let need = QueryHeader::full_size(self.regions.len() as u32);
        if gpa % 8 != 0 {
            return Return::err(Status::Inval);
        }
        if len < wire::QUERY_HEADER_SIZE as u64 {
            return Return::new(Status::Range, [need, 0, 0]);
        }
        let fit = (QueryHeader::regions_fitting(len) as usize).min(self.regions.len());
        let header = QueryHeader {
            regions_written: (fit as u32).into(),
            ..header
        };
        let mut out = Vec::with_capacity(wire::QUERY_HEADER_SIZE + fit * wire::REGION_SIZE);
        out.extend_from_slice(header.as_bytes());
        for r in &self.regions[..fit] {
            out.extend_from_slice(r.as_bytes());
        }
        match self.part.write(gpa, &out) {
            Ok(()) => Return::ok(need),
            Err(s) => Return::err(s),
        }
    }

    /// Live mappings the guest can really hold at once: the quota, or the pages of its IOVA
    /// window outside the reserved regions when that is fewer.
    fn max_mappings(&self) -> u64 {
        let (lo, hi) = (IOVA_BASE_PFN * PAGE, self.limit_pfn * PAGE);
        let reserved: u64 = (self.regions.iter())
            .map(|r| {
                let (start, len) = (r.start.get(), r.length.get());
                let (s, e) = (start.max(lo), start.saturating_add(len).min(hi));
                e.saturating_sub(s) / PAGE
            })
            .sum();
        let window = (self.limit_pfn - IOVA_BASE_PFN).saturating_sub(reserved);
        (self.svc.max_mappings as u64).min(window)
    }

    fn stats(&self, a: &Args) -> Return {
        let (gpa, len, flags) = (a.0[0], a.0[1], a.0[2]);
        if flags & !wire::StatsFlags::KNOWN != 0 || gpa % 8 != 0 {
            return Return::err(Status::Inval);
        }
        if len < wire::STATS_SIZE as u64 {
            return Return::err(Status::Range);
        }
        // While a guest runs the hypervisor's interrupts are masked (host IF = 0 at VMRUN),
        // so the fault event cannot be taken: drain the fault records here (polling path).
        crate::iommu::poll_faults(64);
        self.deliver_faults();
        let mut inner = self.inner.lock();
        let s = inner.st.stats();
        let c = inner.st.counts(&inner.dom);
        let faults_total = with_unit(inner.dom.unit, |u, _| {
            u.fault_counters().domain(inner.dom.domain.id())
        })
        .unwrap_or(0);
        let faults = faults_total.saturating_sub(self.calls.faults_base.load(Ordering::Relaxed));
        let out = wire::Stats {
            size: (wire::STATS_SIZE as u32).into(),
            reserved: 0.into(),
            maps: s.maps.into(),
            unmaps: s.unmaps.into(),
            errors: s.errors.into(),
            multicalls: self.calls.multicalls.load(Ordering::Relaxed).into(),
            invalidations: s.invalidations.into(),
            waits: s.waits.into(),
            faults: faults.into(),
            exits: self.calls.exits.load(Ordering::Relaxed).into(),
            cycles_exit: self.calls.cycles_exit.load(Ordering::Relaxed).into(),
            cycles_validate: self.calls.cycles_validate.load(Ordering::Relaxed).into(),
            cycles_iova_alloc: s.cycles[moat_dma::Phase::IovaAlloc as usize].into(),
            cycles_pte_write: s.cycles[moat_dma::Phase::PteWrite as usize].into(),
            cycles_invalidate: s.cycles[moat_dma::Phase::InvalidateWait as usize].into(),
            cycles_iova_free: s.cycles[moat_dma::Phase::IovaFree as usize].into(),
            live_mappings: (c.mappings as u64).into(),
            live_pages: c.pinned_pages.into(),
            pending_invalidations: (c.pending as u64).into(),
            pt_pages: (c.table_pages as u64).into(),
        };
        if let Err(s) = self.part.write(gpa, out.as_bytes()) {
            return Return::err(s);
        }
        if flags & wire::StatsFlags::RESET != 0 {
            // The counters, not the gauges, atomically with the read (under the guest's
            // lock, which every DMA call that counts holds).
            inner.st.reset_stats();
            self.calls.reset(faults_total);
        }
        drop(inner);
        Return::ok(wire::STATS_SIZE as u64)
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

    /// The checks of every registration of guest pages (batch area, fault ring), in the
    /// ABI's order: page aligned (INVAL), at most `max_pages` (RANGE), guest RAM (FAULT), no
    /// overlap with the `others` registered areas (EXIST), no page mapped for DMA or still
    /// waiting for the invalidation of its unmap (BUSY).
    ///
    /// The caller holds the guest's lock (`inner`) from these checks until it has published
    /// the area, so no MAP and no other registration can slip in between.
    fn check_area(
        &self,
        inner: &Inner,
        gpa: u64,
        pages: u64,
        max_pages: u64,
        others: &[(u64, u64)],
    ) -> Result<(), Status> {
        if !gpa.is_multiple_of(PAGE) {
            return Err(Status::Inval);
        }
        if pages > max_pages {
            return Err(Status::Range);
        }
        // `pages <= max_pages` keeps the length small; the end may still overflow.
        let len = pages * PAGE;
        let end = gpa.checked_add(len).ok_or(Status::Fault)?;
        self.part
            .check(gpa, len as usize)
            .map_err(|_| Status::Fault)?;
        if others
            .iter()
            .any(|&(o, op)| gpa < o.saturating_add(op * PAGE) && end > o)
        {
            return Err(Status::Exist);
        }
        if inner.st.gpa_busy(gpa, end) {
            return Err(Status::Busy);
        }
        Ok(())
    }

    fn batch_register(&self, vcpu: usize, a: &Args) -> Return {
        let (gpa, pages) = (a.0[0], a.0[1]);
        let slot = &self.batch[vcpu % self.batch.len()];
        if pages == 0 {
            let _inner = self.inner.lock();
            return match slot.lock().take() {
                Some(_) => Return::ok(0),
                None => Return::err(Status::Noent),
            };
        }
        let me = vcpu % self.batch.len();
        // Checks and publication under the guest's lock (see `check_area`).
        let inner = self.inner.lock();
        let mut others: Vec<(u64, u64)> = (self.batch.iter().enumerate())
            .filter(|&(i, _)| i != me)
            .filter_map(|(_, b)| *b.lock())
            .collect();
        others.extend(self.ring.lock().as_ref().map(|r| (r.gpa, r.pages)));
        if let Err(st) = self.check_area(&inner, gpa, pages, wire::MAX_BATCH_PAGES, &others) {
            return Return::err(st);
        }
        *slot.lock() = Some((gpa, pages));
        drop(inner);
        Return::ok(wire::batch_capacity(pages, self.limits.max_batch) as u64)
    }

    fn multicall(&self, vcpu: usize, a: &Args) -> Return {
        let (cursor, rsi) = (a.0[0], a.0[1]);
        // Refused before any entry ran: RDX is the cursor passed in, all 64 bits of it.
        let reject = |s: Status| Return::new(s, [cursor, 0, MulticallStop::Rejected as u64]);
        let Some((area, pages)) = *self.batch[vcpu % self.batch.len()].lock() else {
            return reject(Status::Noent);
        };
        if rsi != 0 {
            return reject(Status::Inval);
        }
        self.calls.multicalls.fetch_add(1, Ordering::Relaxed);
        let t0 = x86::rdtsc();
        // Copied once into the hypervisor's memory; only the copy is checked and used.
        let mut header = BatchHeader::new_zeroed();
        if let Err(s) = self.part.read(area, header.as_mut_bytes()) {
            return reject(s);
        }
        let capacity = wire::batch_capacity(pages, self.limits.max_batch);
        let info = match wire::validate_batch(&header, cursor, capacity, &self.limits) {
            Ok(i) => i,
            Err(s) => return reject(s),
        };
        self.calls
            .cycles_validate
            .fetch_add(x86::rdtsc() - t0, Ordering::Relaxed);
        // The budget; a deferred guest's MULTICALL also keeps within the deferred slack, so
        // the other vCPUs' timer checks are never held off longer than that (the call
        // checks the bound itself on every entry as well).
        let budget = if self.policy == Policy::Deferred {
            MULTICALL_BUDGET_US.min(self.svc.slack_ns / 1000 / 2)
        } else {
            MULTICALL_BUDGET_US
        };
        let deadline = tsc::deadline_us(budget);
        let mut inner = self.inner.lock();
        // Under the guest's lock, like every registration (see DMA_MAP).
        let areas = self.areas();
        inner.st.begin_batch();
        let mut i = info.cursor;
        let mut stop = MulticallStop::Done;
        let mut result = Status::Ok;
        while i < info.count {
            if i > info.cursor && tsc::expired(deadline) {
                stop = MulticallStop::Preempted;
                result = Status::Again;
                break;
            }
            let at = area + Entry::offset_of_index(i) as u64;
            let t0 = x86::rdtsc();
            let mut e = Entry::new_zeroed();
            // Copied once; only the copy is checked and used.
            let outcome = match self.part.read(at, e.as_mut_bytes()) {
                Err(s) => Err(s),
                Ok(()) => {
                    let v = wire::validate_entry(&e, &self.limits);
                    self.calls
                        .cycles_validate
                        .fetch_add(x86::rdtsc() - t0, Ordering::Relaxed);
                    match v {
                        Ok(req) => self.run(&mut inner, vcpu, &areas, req, false),
                        Err(s) => {
                            inner.st.note_error();
                            Err(s)
                        }
                    }
                }
            };
            // Only the output fields are written back (status and done, and a MAP's iova):
            // never the inputs, which the guest may have changed meanwhile.
            let (o, ok) = match outcome {
                Ok(o) => (o, true),
                Err(s) => {
                    let is_map = e.op == wire::Op::Map as u16;
                    let o = EntryOutcome {
                        status: s,
                        done: 0,
                        iova: is_map.then_some(0),
                    };
                    (o, false)
                }
            };
            let _ = self
                .part
                .write(at + Entry::STATUS_OFFSET as u64, &o.status_done_bytes());
            if let Some(iova) = o.iova {
                let _ = self
                    .part
                    .write(at + Entry::IOVA_OFFSET as u64, &iova.to_le_bytes());
            }
            if !ok {
                stop = MulticallStop::EntryFailed;
                result = o.status;
                break;
            }
            i += 1;
        }
        let Inner { st, dom } = &mut *inner;
        let unsynced = self
            .with_iovas(vcpu, |ivs| {
                let r = st.end_batch(dom, ivs, &Tsc);
                self.publish_deadline(st);
                r
            })
            .is_err();
        MulticallReturn {
            status: result,
            cursor: i,
            completed: i - info.cursor,
            stop,
            unsynced,
        }
        .to_return()
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

    /// After the guest stopped (its devices detached at [`Self::shutdown`]): logs every fault
    /// its devices caused since, i.e. DMA they still had in flight that the IOMMU blocked.
    /// Returns how many.
    pub fn report_faults_after_stop(&self, guest: &str) -> usize {
        while crate::iommu::poll_faults(64) > 0 {}
        let (unit, sources) = (self.unit, &self.sources);
        // Detached devices' faults are queued as the hypervisor's (no domain).
        let records = crate::iommu::take_unattached_faults(unit, |r| sources.contains(&r.source));
        for r in &records {
            log::info!(
                "vtd: fault after guest stop: unit {unit:#x} source {} ({guest}) {:?} at {:#x}, reason {}",
                r.source,
                r.access,
                r.address,
                r.reason.code()
            );
        }
        records.len()
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
