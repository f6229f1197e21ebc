//! Domains: domain-id allocation and the per-domain state the rest of Moat uses.

use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::error::Error;
use crate::gather::Gather;
use crate::hw::{DmaMemory, PhysAddr};
use crate::paging::{Access, PageTable, Translation};

/// Allocates domain ids of one unit: `1..2^bits`, never 0 (QEMU and caching-mode hardware
/// tag cached not-present entries with domain 0).
#[derive(Debug)]
pub struct DomainIdAllocator {
    bitmap: Vec<u64>,
    limit: u32,
    next: u32,
    used: u32,
}

impl DomainIdAllocator {
    /// An allocator for a `bits`-wide domain-id space (`CAP.ND`: 4 + 2*ND), clamped to
    /// 4..=16 bits.
    pub fn new(bits: u32) -> Self {
        let limit = 1u32 << bits.clamp(4, 16);
        Self {
            bitmap: vec![0; (limit as usize).div_ceil(64)],
            limit,
            next: 1,
            used: 0,
        }
    }

    /// Number of ids (including the reserved id 0).
    pub fn capacity(&self) -> u32 {
        self.limit
    }

    /// Number of ids currently allocated.
    pub fn in_use(&self) -> u32 {
        self.used
    }

    fn is_set(&self, id: u32) -> bool {
        self.bitmap[(id / 64) as usize] & (1 << (id % 64)) != 0
    }

    /// Allocates the next free id (next-fit, so a freed id is not reused at once).
    pub fn alloc(&mut self) -> Result<u16, Error> {
        for k in 0..self.limit {
            let id = (self.next + k) % self.limit;
            if id == 0 || self.is_set(id) {
                continue;
            }
            self.bitmap[(id / 64) as usize] |= 1 << (id % 64);
            self.next = (id + 1) % self.limit;
            self.used += 1;
            return Ok(id as u16);
        }
        Err(Error::DomainIdsExhausted)
    }

    /// Frees `id`; rejects 0, out-of-range and unallocated ids.
    pub fn free(&mut self, id: u16) -> Result<(), Error> {
        let i = id as u32;
        if i == 0 || i >= self.limit || !self.is_set(i) {
            return Err(Error::UnknownDomainId(id));
        }
        self.bitmap[(i / 64) as usize] &= !(1 << (i % 64));
        self.used -= 1;
        Ok(())
    }
}

/// One DMA remapping domain: a domain id on one unit and its second-level page tables.
///
/// Created by [`crate::Unit::create_domain`]; devices are attached through the unit. Map and
/// unmap change only the tables and record what must be invalidated in a [`Gather`]; the
/// caller then calls [`crate::Unit::flush`] (once per batch).
///
/// Map and unmap take `&self`: the tables are changed with atomic entry writes and new
/// tables are linked with compare-and-swap (see `moat_ptab`), so several CPUs may map and
/// unmap disjoint IOVA ranges of one domain at once, each with its own [`Gather`], without
/// a lock.
#[derive(Debug)]
pub struct Domain {
    pub(crate) unit_id: u32,
    pub(crate) did: u16,
    pub(crate) tables: PageTable,
    /// Devices attached (the unit's attach/detach keep it; the unit records which).
    pub(crate) devices: AtomicUsize,
}

impl Domain {
    /// The domain id on its unit (never 0).
    pub fn id(&self) -> u16 {
        self.did
    }

    /// The id of the unit the domain belongs to ([`crate::UnitConfig::id`]).
    pub fn unit_id(&self) -> u32 {
        self.unit_id
    }

    /// How many devices are attached to the domain.
    pub fn device_count(&self) -> usize {
        self.devices.load(Ordering::Relaxed)
    }

    /// The page tables (read-only view).
    pub fn tables(&self) -> &PageTable {
        &self.tables
    }

    /// An empty gather for this domain.
    pub fn gather(&self) -> Gather {
        Gather::new(self.unit_id, self.did)
    }

    #[inline]
    fn check_gather(&self, g: &Gather) -> Result<(), Error> {
        if g.domain_id() != self.did || g.unit_id() != self.unit_id {
            return Err(Error::WrongDomain);
        }
        Ok(())
    }

    /// Maps `[iova, iova + len)` to `[phys, phys + len)`. See [`PageTable::map`].
    ///
    /// On error the mapping is unchanged but `gather` may hold an invalidation of the leaves
    /// the failed call wrote and cleared again: the caller **must** flush `gather`
    /// successfully before it reuses those IOVAs (the tables the call installed stay linked;
    /// nothing leaks if the gather is flushed later with other work).
    #[inline]
    pub fn map<M: DmaMemory>(
        &self,
        mem: &M,
        iova: u64,
        phys: PhysAddr,
        len: u64,
        access: Access,
        gather: &mut Gather,
    ) -> Result<(), Error> {
        self.check_gather(gather)?;
        self.tables.map(mem, iova, phys, len, access, gather)
    }

    /// Identity-maps `[base, base + len)` (RMRR regions of devices in this domain).
    pub fn map_identity<M: DmaMemory>(
        &self,
        mem: &M,
        base: u64,
        len: u64,
        access: Access,
        gather: &mut Gather,
    ) -> Result<(), Error> {
        self.map(mem, base, PhysAddr::new(base), len, access, gather)
    }

    /// Unmaps `[iova, iova + len)`. See [`PageTable::unmap`].
    #[inline]
    pub fn unmap<M: DmaMemory>(
        &self,
        mem: &M,
        iova: u64,
        len: u64,
        gather: &mut Gather,
    ) -> Result<(), Error> {
        self.check_gather(gather)?;
        self.tables.unmap(mem, iova, len, gather)
    }

    /// Unlinks every empty table page into `gather` (to be freed by its flush). See
    /// [`PageTable::release_empty_tables`]: no map into the domain until that flush
    /// succeeded (for teardown, after the last unmap).
    pub fn release_empty_tables<M: DmaMemory>(
        &self,
        mem: &M,
        gather: &mut Gather,
    ) -> Result<usize, Error> {
        self.check_gather(gather)?;
        Ok(self.tables.release_empty_tables(mem, gather))
    }

    /// Looks `iova` up in the domain's tables.
    pub fn translate<M: DmaMemory>(&self, mem: &M, iova: u64) -> Option<Translation> {
        self.tables.translate(mem, iova)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_never_zero_and_bounded() {
        let mut a = DomainIdAllocator::new(4);
        assert_eq!(a.capacity(), 16);
        let ids: Vec<u16> = (0..15).map(|_| a.alloc().unwrap()).collect();
        assert_eq!(ids, (1..16).collect::<Vec<u16>>());
        assert_eq!(a.alloc(), Err(Error::DomainIdsExhausted));
        a.free(7).unwrap();
        assert_eq!(a.free(7), Err(Error::UnknownDomainId(7)));
        assert_eq!(a.free(0), Err(Error::UnknownDomainId(0)));
        assert_eq!(a.free(16), Err(Error::UnknownDomainId(16)));
        assert_eq!(a.alloc(), Ok(7));
        assert_eq!(a.in_use(), 15);
    }

    #[test]
    fn next_fit_does_not_reuse_immediately() {
        let mut a = DomainIdAllocator::new(16);
        assert_eq!(a.capacity(), 65536);
        let x = a.alloc().unwrap();
        a.free(x).unwrap();
        let y = a.alloc().unwrap();
        assert_ne!(x, y);
        assert_eq!(DomainIdAllocator::new(40).capacity(), 65536);
    }
}
