//! The hardware the driver needs, as small traits the kernel implements.
//!
//! Keeping every raw access behind these traits makes all of the driver's logic host-testable
//! (the tests implement them with plain vectors and a register model) and keeps `unsafe` out
//! of this crate: the kernel's implementations are the only place that touches MMIO or
//! physical memory.

use crate::regs::{Readable, Reg, Writable};

/// The host-physical address type and the size of a page-table page, queue page and
/// translation granule: Moat's one of each (defined in `moat-frames`, re-exported by the
/// page-table engine).
pub use moat_ptab::{PhysAddr, PAGE_SIZE};

/// The MMIO register page(s) of one remapping unit.
///
/// Every access names a typed register ([`Reg`]): its width is the method's, and its access
/// mode must allow the access, so a write to a read-only register or a 32-bit read of a
/// 64-bit register does not compile (see [`crate::regs`]). `reg.offset()` is a byte offset
/// from the unit's register base (the DRHD `Register Base Address`), naturally aligned;
/// the IOTLB and fault recording offsets derive from `ECAP.IRO` and `CAP.FRO`. The kernel
/// implements the trait with volatile 32-/64-bit loads and stores on an uncached mapping of
/// the register pages, bounds-checked against the register-set size the DRHD reports.
pub trait RegisterWindow {
    /// Reads the 32-bit register `reg`.
    fn read32<A: Readable>(&mut self, reg: Reg<u32, A>) -> u32;
    /// Reads the 64-bit register `reg` (one 64-bit access).
    fn read64<A: Readable>(&mut self, reg: Reg<u64, A>) -> u64;
    /// Writes the 32-bit register `reg`.
    fn write32<A: Writable>(&mut self, reg: Reg<u32, A>, value: u32);
    /// Writes the 64-bit register `reg` (one 64-bit access).
    fn write64<A: Writable>(&mut self, reg: Reg<u64, A>, value: u64);
}

/// Physical memory for root/context/page tables, the invalidation queue and its status word.
///
/// Rather than handing out raw pointers, the trait offers typed, bounds-defined accessors, so
/// no `unsafe` is needed in the driver. The driver only accesses addresses inside frames it
/// obtained from [`DmaMemory::alloc_frame`] (or, for page-table pages,
/// [`moat_ptab::TableMemory::alloc_table`]) and not yet released with
/// [`DmaMemory::free_frame`], at naturally aligned offsets.
///
/// **Contract for implementations** (this is what keeps `#![forbid(unsafe_code)]` honest):
/// every method is safe, so it must be sound for *any* argument. The kernel's implementation
/// hands out frames that nothing else uses (no Rust reference points to them) and checks on
/// every access that the address lies in a frame it handed out for VT-d and did not take
/// back, panicking otherwise: a driver bug can corrupt the remapping structures, never
/// arbitrary memory. The page-table engine's accessors ([`moat_ptab::TableMemory`], a
/// supertrait) follow the same contract on the same frames, since the unit frees unlinked
/// table pages with [`DmaMemory::free_frame`].
pub trait DmaMemory: moat_ptab::TableMemory {
    /// Allocates one zero-filled, 4 KiB-aligned 4 KiB frame; `None` when out of memory
    /// (a table page of the engine's memory by default).
    fn alloc_frame(&mut self) -> Option<PhysAddr> {
        self.alloc_table()
    }
    /// Returns a frame obtained from `alloc_frame`. The driver calls this only after the
    /// remapping hardware can no longer reach the frame (the covering invalidation completed).
    fn free_frame(&mut self, frame: PhysAddr) {
        self.free_table(frame)
    }
    /// Volatile 64-bit load from `addr` (8-byte aligned, inside an allocated frame).
    fn read_u64(&self, addr: PhysAddr) -> u64 {
        self.load_entry(addr)
    }
    /// Volatile 64-bit store to `addr` (8-byte aligned, inside an allocated frame).
    fn write_u64(&mut self, addr: PhysAddr, value: u64) {
        self.store_entry(addr, value)
    }
    /// Volatile 32-bit load from `addr` (4-byte aligned, inside an allocated frame); used to
    /// poll invalidation-wait status words.
    fn read_u32(&self, addr: PhysAddr) -> u32;
    /// Volatile 32-bit store to `addr` (4-byte aligned, inside an allocated frame).
    fn write_u32(&mut self, addr: PhysAddr, value: u32);
    /// Writes back and invalidates the cache lines covering `[addr, addr + len)`
    /// (`clflush` per 64-byte line, then `mfence`). Called only for units whose `ECAP.C` is 0
    /// (page walks do not snoop the CPU caches): after table and descriptor writes, and
    /// before each read of the wait status word so a non-snooped hardware write is seen.
    fn flush_cache(&mut self, addr: PhysAddr, len: usize) {
        self.flush_entries(addr, len)
    }
}

/// A monotonic time source for bounded polls.
///
/// The kernel implements it with the TSC (scaled to nanoseconds) or, before the TSC is
/// calibrated, with a counter that advances by a fixed step per call (a spin budget).
pub trait Clock {
    /// Monotonic time in nanoseconds (any epoch).
    fn now_ns(&self) -> u64;
    /// Called between two polls of a register or status word; defaults to a spin hint.
    fn relax(&self) {
        core::hint::spin_loop();
    }
}

/// Polls `done` until it returns `Some` or `timeout_ns` passes on `clock`.
///
/// `done` is always evaluated at least once and once more after the deadline passed, so a
/// slow clock cannot make a completed operation look timed out.
pub(crate) fn poll_until<C: Clock, T>(
    clock: &C,
    timeout_ns: u64,
    mut done: impl FnMut() -> Option<T>,
) -> Option<T> {
    let start = clock.now_ns();
    loop {
        if let Some(v) = done() {
            return Some(v);
        }
        if clock.now_ns().wrapping_sub(start) > timeout_ns {
            return done();
        }
        clock.relax();
    }
}
