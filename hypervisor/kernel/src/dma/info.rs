//! The reporting calls: DMA_QUERY (parameters and reserved regions) and DMA_STATS.

use super::*;

impl VtdDma {
    pub(super) fn query(&self, a: &Args) -> Return {
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
                | wire::Features::FAULT_IRQ
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
    pub(super) fn max_mappings(&self) -> u64 {
        // The allocator holds the reserved regions, clipped to the window and merged.
        let (base, end) = self.iova.window();
        let reserved: u64 = self.iova.reserved().iter().map(|&(s, e)| e - s).sum();
        let window = (end - base).saturating_sub(reserved);
        (self.svc.max_mappings as u64).min(window)
    }

    pub(super) fn stats(&self, a: &Args) -> Return {
        let (gpa, len, flags) = (a.0[0], a.0[1], a.0[2]);
        if flags & !wire::StatsFlags::KNOWN != 0 || gpa % 8 != 0 {
            return Return::err(Status::Inval);
        }
        if len < wire::STATS_SIZE as u64 {
            return Return::err(Status::Range);
        }
        // While a guest runs the hypervisor's interrupts are masked (host IF = 0 at VM entry),
        // so the fault event cannot be taken: drain the fault records here (polling path).
        crate::iommu::poll_faults(64);
        self.deliver_faults();
        let mut shards = self.all_shards();
        let s = sum_stats(shards.iter().map(|sh| sh.st.stats()));
        let dom = &self.dom;
        let c = sum_counts(shards.iter().map(|sh| sh.st.counts(&dom)));
        let faults_total = with_unit(self.dom.unit, |u, _| {
            u.fault_counters().domain(self.dom.domain.id())
        })
        .unwrap_or(0);
        let faults = faults_total.saturating_sub(self.faults_base.load(Ordering::Relaxed));
        let (cycles_exit, multicalls, exits, cycles_validate) = sum_calls(&self.calls);
        let out = wire::Stats {
            size: (wire::STATS_SIZE as u32).into(),
            reserved: 0.into(),
            maps: s.maps.into(),
            unmaps: s.unmaps.into(),
            errors: s.errors.into(),
            multicalls: multicalls.into(),
            invalidations: s.invalidations.into(),
            waits: s.waits.into(),
            faults: faults.into(),
            exits: exits.into(),
            cycles_exit: cycles_exit.into(),
            cycles_validate: cycles_validate.into(),
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
            // The counters, not the gauges, atomically with the read (every shard held,
            // and every DMA call that counts holds its shard).
            for sh in shards.iter_mut() {
                sh.st.reset_stats();
            }
            for c in &self.calls {
                c.reset();
            }
            self.faults_base.store(faults_total, Ordering::Relaxed);
        }
        drop(shards);
        Return::ok(wire::STATS_SIZE as u64)
    }
}
