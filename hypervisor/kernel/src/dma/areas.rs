//! Guest pages registered with the hypervisor (batch areas, the fault ring): the checks every
//! registration makes with every vCPU shard held, and BATCH_REGISTER.

use super::*;

impl VtdDma {
    /// Publishes the registered areas (batch areas, the fault ring: never DMA targets) to
    /// every shard's copy. The caller holds every shard (`shards`).
    pub(super) fn publish_areas(&self, shards: &mut [MutexGuard<'_, Shard>]) {
        let areas = self.registered(None, true);
        for s in shards.iter_mut() {
            s.areas.clone_from(&areas);
        }
    }

    /// The registered areas as `(gpa, pages)`: every vCPU's batch area but `skip_batch`'s,
    /// and the fault ring when `ring`.
    pub(super) fn registered(&self, skip_batch: Option<usize>, ring: bool) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = (self.batch.iter().enumerate())
            .filter(|&(i, _)| Some(i) != skip_batch)
            .filter_map(|(_, b)| *b.lock())
            .collect();
        if ring {
            v.extend(self.ring.lock().as_ref().map(|r| (r.gpa, r.pages)));
        }
        v
    }

    /// The checks of every registration of guest pages (batch area, fault ring), in the
    /// ABI's order: page aligned (INVAL), at most `max_pages` (RANGE), guest RAM (FAULT), no
    /// overlap with the `others` registered areas (EXIST), no page mapped for DMA or still
    /// waiting for the invalidation of its unmap (BUSY).
    ///
    /// The caller holds every shard (`shards`) from these checks until it has published
    /// the area, so no MAP and no other registration can slip in between.
    pub(super) fn check_area(
        &self,
        shards: &[MutexGuard<'_, Shard>],
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
        if shards.iter().any(|s| s.st.gpa_busy(gpa, end)) {
            return Err(Status::Busy);
        }
        Ok(())
    }

    pub(super) fn batch_register(&self, vcpu: usize, a: &Args) -> Return {
        let (gpa, pages) = (a.0[0], a.0[1]);
        let slot = &self.batch[vcpu % self.batch.len()];
        if pages == 0 {
            let mut shards = self.all_shards();
            let r = match slot.lock().take() {
                Some(_) => Return::ok(0),
                None => Return::err(Status::Noent),
            };
            self.publish_areas(&mut shards);
            return r;
        }
        let me = vcpu % self.batch.len();
        // Checks and publication with every shard held (see `check_area`).
        let mut shards = self.all_shards();
        let others = self.registered(Some(me), true);
        if let Err(st) = self.check_area(&shards, gpa, pages, wire::MAX_BATCH_PAGES, &others) {
            return Return::err(st);
        }
        *slot.lock() = Some((gpa, pages));
        self.publish_areas(&mut shards);
        drop(shards);
        Return::ok(wire::batch_capacity(pages, self.limits.max_batch) as u64)
    }
}
