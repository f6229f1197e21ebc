//! The global physical frame allocator: `moat-frames` over the multiboot2 memory map minus
//! everything boot data lives in, behind a spin lock.

use moat_boot::{BootInfo, MemoryKind};
use moat_frames::{Frame, FrameAllocator, MemoryMap, PhysAddr, PhysRange, RegionKind};
use spin::Mutex;

use super::PAGE_SIZE;

/// A range the allocator must never hand out.
#[derive(Debug, Clone, Copy)]
pub struct Reservation {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Why (for the boot log).
    pub what: &'static str,
}

static MAP: Mutex<MemoryMap> = Mutex::new(MemoryMap::new());
static FRAMES: Mutex<Option<FrameAllocator<'static>>> = Mutex::new(None);

/// What [`init`] set up.
#[derive(Debug, Clone, Copy)]
pub struct FramesReport {
    /// The page below 640 KiB kept for the AP start-up trampoline.
    pub trampoline: Option<PhysAddr>,
    /// Frames managed.
    pub total: u64,
    /// Frames free.
    pub free: u64,
    /// Reservations recorded.
    pub reservations: usize,
}

fn range(start: u64, end: u64) -> PhysRange {
    PhysRange::new(PhysAddr::new(start), PhysAddr::new(end.max(start)))
        .unwrap_or(PhysRange::from_start_len(PhysAddr::new(start), 0))
}

/// Builds the allocator from the memory map minus `reserved`, the first MiB (except one page
/// carved for the AP trampoline) and its own bitmap.
pub fn init(boot: &BootInfo, reserved: &[Reservation]) -> Result<FramesReport, &'static str> {
    let mut map = MAP.lock();
    for r in boot.memory_map() {
        let kind = match r.kind {
            MemoryKind::Usable => RegionKind::Usable,
            MemoryKind::Reserved => RegionKind::Reserved,
            MemoryKind::AcpiReclaimable => RegionKind::AcpiReclaimable,
            MemoryKind::AcpiNvs => RegionKind::AcpiNvs,
            MemoryKind::Defective => RegionKind::Bad,
        };
        if map
            .add_region(
                PhysRange::from_start_len(PhysAddr::new(r.start), r.len),
                kind,
            )
            .is_err()
        {
            log::warn!(
                "frames: memory-map region [{:#x}+{:#x}) beyond capacity: not used",
                r.start,
                r.len
            );
        }
    }
    for res in reserved {
        map.reserve(range(res.start, res.end), res.what)
            .map_err(|_| "too many reservations")?;
    }
    let trampoline = map
        .carve(
            PAGE_SIZE,
            PAGE_SIZE,
            range(0x1000, 0xA0000),
            "AP trampoline",
        )
        .ok()
        .map(|r| r.start());
    map.reserve(range(0, 0x10_0000), "first MiB")
        .map_err(|_| "too many reservations")?;
    // SAFETY: the boot page tables identity-map the first 4 GiB read-write, and the kernel's
    // own tables map all usable RAM read-write; the carved block is usable RAM that the map
    // reserves for the bitmap, so nothing else uses it.
    let alloc = unsafe {
        FrameAllocator::from_map(&mut map, range(0x10_0000, 1 << 32), |pa| {
            pa.as_u64() as *mut u8
        })
    }
    .map_err(|_| "no memory for the frame allocator's bitmap")?;
    let report = FramesReport {
        trampoline,
        total: alloc.total_frames(),
        free: alloc.free_frames(),
        reservations: map.reservations().len(),
    };
    *FRAMES.lock() = Some(alloc);
    Ok(report)
}

/// Logs the reservations (debug level).
pub fn log_reservations() {
    for r in MAP.lock().reservations() {
        log::debug!("frames: reserved {r}");
    }
}

/// Allocates one frame.
pub fn alloc() -> Option<PhysAddr> {
    FRAMES.lock().as_mut()?.allocate().ok().map(|f| f.start())
}

/// Allocates one zeroed frame.
pub fn alloc_zeroed() -> Option<PhysAddr> {
    let p = alloc()?;
    // SAFETY: the frame is identity-mapped RAM now owned by the caller.
    unsafe { core::ptr::write_bytes(p.as_u64() as *mut u8, 0, PAGE_SIZE as usize) };
    Some(p)
}

/// Allocates `count` contiguous frames aligned to `align` bytes.
pub fn alloc_contiguous(count: u64, align: u64) -> Option<PhysAddr> {
    FRAMES
        .lock()
        .as_mut()?
        .allocate_contiguous(count, align.max(PAGE_SIZE))
        .ok()
        .map(|f| f.start())
}

/// Frees one frame. A double free or a frame the allocator never owned is refused and logged.
pub fn free(phys: PhysAddr) {
    free_contiguous(phys, 1)
}

/// Frees `count` contiguous frames starting at `phys` (all or nothing).
pub fn free_contiguous(phys: PhysAddr, count: u64) {
    let Some(frame) = Frame::from_start(phys) else {
        log::error!("frames: free of unaligned address {phys:#x} refused");
        return;
    };
    if let Some(a) = FRAMES.lock().as_mut()
        && let Err(e) = a.free_contiguous(frame, count)
    {
        log::error!("frames: free of {count} frames at {phys:#x} refused: {e:?}");
    }
}

/// (total, free) frames.
pub fn stats() -> (u64, u64) {
    FRAMES
        .lock()
        .as_ref()
        .map_or((0, 0), |a| (a.total_frames(), a.free_frames()))
}
