//! The guest's fault ring: FAULT_RING_REGISTER, moving the VT-d faults of the guest's domain into
//! it (with FAULT_IRQ: the registered vector raised on the registering vCPU when a batch of
//! records lands in an empty ring), and reporting what the devices of a stopped guest still
//! tried.

use super::*;

/// The guest's registered fault ring: the producer side is kept here and never read back.
pub(super) struct FaultRing {
    pub(super) gpa: u64,
    pub(super) pages: u64,
    pub(super) capacity: u32,
    pub(super) producer: u32,
    pub(super) seq: u64,
    pub(super) dropped: u64,
    /// FAULT_IRQ: (vCPU, vector), when registered with a vector.
    pub(super) irq: Option<(usize, u8)>,
}

impl VtdDma {
    /// Moves the VT-d faults of this guest's domain from its queue in the hypervisor's fault
    /// log into the guest's fault ring (or only counts them when it has none); records the
    /// queue had to drop (it was full) count as the ring's drops. Called on the guest's exits
    /// and DMA calls (which also runs a fault drain an interrupt left pending).
    pub fn deliver_faults(&self) {
        // Nothing was queued for anyone since this guest's queue was last found empty: skip
        // the fault log's lock (shared by every guest) on the common path.
        crate::iommu::follow_up();
        let generation = crate::iommu::fault_generation();
        if self.fault_gen.load(Ordering::Acquire) == generation {
            return;
        }
        let Some(taken) = crate::iommu::take_domain_faults(self.unit, self.did) else {
            return;
        };
        if taken.records.is_empty() && taken.dropped == 0 {
            // Records queued since `generation` bump it again: the next call looks.
            self.fault_gen.store(generation, Ordering::Release);
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
        let was_empty = r.producer == consumer;
        let before = r.producer;
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
        // One interrupt per batch that makes the ring non-empty.
        if let (Some((vcpu, vector)), true) = (r.irq, was_empty && r.producer != before) {
            self.fault_irq.store(
                1 << 63 | (vcpu as u64) << 8 | u64::from(vector),
                Ordering::Release,
            );
        }
    }

    /// The FAULT_IRQ due, if any: (vCPU, vector), cleared by this call. The vCPU loop raises
    /// it as a virtual interrupt.
    pub fn take_fault_irq(&self) -> Option<(usize, u8)> {
        let v = self.fault_irq.swap(0, Ordering::AcqRel);
        (v != 0).then_some(((v >> 8 & 0xffff) as usize, v as u8))
    }

    pub(super) fn fault_ring_register(&self, vcpu: usize, a: &Args) -> Return {
        let (gpa, pages, vector) = (a.0[0], a.0[1], a.0[2]);
        if (1..32).contains(&vector) || vector > 255 {
            return Return::err(Status::Inval);
        }
        let irq = (vector != 0).then_some((vcpu, vector as u8));
        if pages == 0 {
            let mut shards = self.all_shards();
            let r = match self.ring.lock().take() {
                Some(_) => Return::ok(0),
                None => Return::err(Status::Noent),
            };
            self.publish_areas(&mut shards);
            return r;
        }
        // Checks and publication with every shard held (see `check_area`).
        let mut shards = self.all_shards();
        let others = self.registered(None, false);
        if let Err(st) = self.check_area(&shards, gpa, pages, wire::MAX_FAULT_RING_PAGES, &others) {
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
            irq,
        });
        self.publish_areas(&mut shards);
        drop(shards);
        Return::ok(capacity as u64)
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
}
