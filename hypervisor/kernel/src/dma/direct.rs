//! The PV DMA calls for a guest whose devices no IOMMU translates (no VT-d unit, or
//! `iommu=off`): only `policy=passthrough`, and honestly so.
//!
//! Without an IOMMU a device's DMA addresses are host-physical: nothing translates them and
//! nothing stops the device from reaching any memory (which is why assigning such a device
//! needs `unsafe-interrupts` and is logged as a RISK, see `vm::guest`). The calls still give
//! the guest a correct bus address: MAP checks the guest range exactly as under the IOMMU
//! (inside the partition, not the MSI window, within the per-call page limit) and returns
//! the **host-physical** address of the guest pages as the IOVA (the partition is one
//! contiguous, pinned run of frames for the guest's lifetime, so a guest range is a host
//! range). A range the device cannot address (beyond its DMA width) is RANGE. UNMAP checks
//! that the IOVA lies in the guest's partition and changes nothing (the device could reach
//! the pages before and still can: passthrough). QUERY reports `passthrough` without
//! `IOVA_IS_GPA` (the IOVA is not the GPA) and without a fault ring or fault interrupt
//! (there is no unit to record faults); MULTICALL, batch areas and the fault ring are
//! UNSUPP. The remapping policies need page tables a device walks: they are refused when
//! the guest is created ([`super::SetupError::NoIommu`]).

use core::sync::atomic::{AtomicU64, Ordering};

use moat_abi::dma::{self as wire, QueryHeader, Request};
use moat_abi::{Args, Call, IntoBytes, Return, Status};

use super::backend::Partition;
use super::PAGE;

/// The PV DMA service of a guest whose devices are not behind an IOMMU (passthrough only).
pub struct DirectDma {
    part: Partition,
    limits: wire::Limits,
    devices: usize,
    maps: AtomicU64,
    unmaps: AtomicU64,
    errors: AtomicU64,
    exits: AtomicU64,
    cycles_exit: AtomicU64,
}

impl DirectDma {
    /// The service for a guest at host `hpa` with `mem` bytes and `devices` devices whose
    /// DMA reaches `bits` address bits.
    pub fn new(hpa: u64, mem: u64, devices: usize, bits: u8) -> Self {
        Self {
            part: Partition {
                base: hpa,
                size: mem,
            },
            limits: wire::Limits {
                iova_width: bits,
                // MULTICALL is UNSUPP here; QUERY must still state a non-zero batch size.
                max_batch: 1,
                max_map_pages: moat_dma::Limits::DEFAULT.max_pages_per_map as u32,
            },
            devices,
            maps: AtomicU64::new(0),
            unmaps: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            exits: AtomicU64::new(0),
            cycles_exit: AtomicU64::new(0),
        }
    }

    /// One line for the boot log.
    pub fn describe(&self) -> alloc::string::String {
        alloc::format!(
            "policy Passthrough WITHOUT an IOMMU: the device(s) are not translated; MAP returns the host-physical address (host [{:#x}, {:#x}), device DMA width {} bits), {} device(s)",
            self.part.base,
            self.part.base + self.part.size,
            self.limits.iova_width,
            self.devices
        )
    }

    /// The bus address of guest range `[gpa, gpa + len)` (page-aligned, non-empty: checked
    /// by the ABI layer), or why not.
    fn bus_address(&self, gpa: u64, len: u64) -> Result<u64, Status> {
        let end = gpa.checked_add(len).ok_or(Status::Fault)?;
        if end > self.part.size {
            return Err(Status::Fault);
        }
        if gpa < wire::MSI_WINDOW_END && end > wire::MSI_WINDOW_START {
            return Err(Status::Fault);
        }
        if len / PAGE > u64::from(self.limits.max_map_pages) {
            return Err(Status::Range);
        }
        let bus = self.part.base + gpa;
        if bus + len > 1u64 << self.limits.iova_width {
            return Err(Status::Range);
        }
        Ok(bus)
    }

    fn fail(&self, s: Status) -> Return {
        self.errors.fetch_add(1, Ordering::Relaxed);
        Return::err(s)
    }

    /// Handles DMA call `call`.
    pub fn hypercall(&self, call: Call, a: &Args) -> Return {
        self.exits.fetch_add(1, Ordering::Relaxed);
        match call {
            Call::DmaQuery => self.query(a),
            Call::DmaMap => match wire::decode_map_regs(a, &self.limits) {
                Ok(Request::Map { gpa, length, .. }) => match self.bus_address(gpa, length) {
                    Ok(bus) => {
                        self.maps.fetch_add(1, Ordering::Relaxed);
                        Return::ok(bus)
                    }
                    Err(s) => self.fail(s),
                },
                Ok(_) => self.fail(Status::Inval),
                Err(s) => self.fail(s),
            },
            Call::DmaUnmap => match wire::decode_unmap_regs(a, &self.limits) {
                Ok(Request::Unmap { iova, length }) => {
                    let inside = iova >= self.part.base
                        && iova
                            .checked_add(length)
                            .is_some_and(|e| e <= self.part.base + self.part.size);
                    if !inside {
                        return self.fail(Status::Range);
                    }
                    self.unmaps.fetch_add(1, Ordering::Relaxed);
                    Return::ok(length)
                }
                Ok(_) => self.fail(Status::Inval),
                Err(s) => self.fail(s),
            },
            // Nothing is ever pending: no IOTLB.
            Call::DmaSync if a.0[0] == 0 => Return::ok(0),
            Call::DmaSync => self.fail(Status::Inval),
            Call::DmaStats => self.stats(a),
            _ => Return::err(Status::Unsupp),
        }
    }

    fn query(&self, a: &Args) -> Return {
        let (gpa, len) = (a.0[0], a.0[1]);
        let need = QueryHeader::full_size(0);
        if gpa % 8 != 0 {
            return Return::err(Status::Inval);
        }
        if len < wire::QUERY_HEADER_SIZE as u64 {
            return Return::new(Status::Range, [need, 0, 0]);
        }
        let header = QueryHeader {
            abi_version: moat_abi::ABI_VERSION.into(),
            header_size: (wire::QUERY_HEADER_SIZE as u32).into(),
            page_sizes: (1 << 12).into(),
            iova_width: self.limits.iova_width,
            policy: wire::Policy::Passthrough as u8,
            reserved0: 0.into(),
            max_batch: self.limits.max_batch.into(),
            features: wire::Features::STATS.into(),
            max_mappings: ((self.part.size / PAGE).min(u64::from(u32::MAX)) as u32).into(),
            max_pt_pages: 0.into(),
            deferred_max_entries: 0.into(),
            deferred_max_us: 0.into(),
            nr_regions: 0.into(),
            regions_written: 0.into(),
            max_batch_pages: 0.into(),
            max_map_pages: self.limits.max_map_pages.into(),
        };
        match self.part.write(gpa, header.as_bytes()) {
            Ok(()) => Return::ok(need),
            Err(s) => Return::err(s),
        }
    }

    fn stats(&self, a: &Args) -> Return {
        let (gpa, len, flags) = (a.0[0], a.0[1], a.0[2]);
        if flags & !wire::StatsFlags::KNOWN != 0 || gpa % 8 != 0 {
            return Return::err(Status::Inval);
        }
        if len < wire::STATS_SIZE as u64 {
            return Return::err(Status::Range);
        }
        let reset = flags & wire::StatsFlags::RESET != 0;
        let take = |c: &AtomicU64| {
            if reset {
                c.swap(0, Ordering::Relaxed)
            } else {
                c.load(Ordering::Relaxed)
            }
        };
        // Passthrough keeps no mapping records (as under the IOMMU) and makes no
        // invalidations: only the calls are counted.
        let out = wire::Stats {
            size: (wire::STATS_SIZE as u32).into(),
            maps: take(&self.maps).into(),
            unmaps: take(&self.unmaps).into(),
            errors: take(&self.errors).into(),
            exits: take(&self.exits).into(),
            cycles_exit: take(&self.cycles_exit).into(),
            ..wire::Stats::default()
        };
        match self.part.write(gpa, out.as_bytes()) {
            Ok(()) => Return::ok(wire::STATS_SIZE as u64),
            Err(s) => Return::err(s),
        }
    }

    /// Adds the hypervisor's exit/entry cycles of one DMA hypercall.
    pub fn add_exit_cycles(&self, c: u64) {
        self.cycles_exit.fetch_add(c, Ordering::Relaxed);
    }

    /// Called when the guest has stopped: there is nothing to tear down (no tables, no
    /// IOVAs, no pins beyond the partition) and nothing can block the devices.
    pub fn shutdown(&self, guest: &str) {
        log::warn!(
            "guest {guest}: no IOMMU: its device(s) cannot be blocked at stop (nothing translates them); no DMA state to tear down"
        );
        log::info!(
            "guest {guest}: dma stats: {} maps, {} unmaps, {} errors, no IOMMU ({} DMA hypercalls)",
            self.maps.load(Ordering::Relaxed),
            self.unmaps.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
            self.exits.load(Ordering::Relaxed)
        );
    }
}
