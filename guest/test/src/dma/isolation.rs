//! `dma-hold` and `dma-foreign`: two guests, neither device reaches the other's memory.

use super::*;

/// Pages `dma-hold` maps (pages 3..8 of this guest's test pages).
const HOLD_PAGES: usize = 5;

/// `dma-hold=MS` (two-guest scenario, the victim): maps pages 3..8 for DMA, holds them MS
/// milliseconds while the other guest's device tries their IOVAs, then checks they are intact.
pub fn hold(boot: &BootInfo, ms: u64) -> Outcome {
    let mut d = driver()?;
    let mut iovas = [0u64; HOLD_PAGES];
    for (k, iova) in iovas.iter_mut().enumerate() {
        fill(3 + k, 0xA0 + k as u8);
        *iova = d
            .map(gpa(3 + k), PAGE as u64, DmaFlags::READ_WRITE)
            .map_err(|_| "MAP failed")?;
    }
    let mut list = [0u8; 128];
    let mut w = Cursor(&mut list, 0);
    for iova in iovas {
        let _ = core::fmt::Write::write_fmt(&mut w, format_args!(" {iova:#x}"));
    }
    let n = w.1;
    println!(
        "dma-hold: pages mapped at IOVAs{}; holding {ms} ms",
        core::str::from_utf8(&list[..n]).unwrap_or("?")
    );
    delay_ms(boot, ms);
    let intact = (0..HOLD_PAGES).all(|k| holds(3 + k, 0xA0 + k as u8));
    for iova in iovas {
        d.unmap(iova, PAGE as u64).map_err(|_| "UNMAP failed")?;
    }
    println!(
        "dma-hold: after {ms} ms the pages are {}",
        if intact { "intact" } else { "MODIFIED" }
    );
    if intact {
        Ok(())
    } else {
        Err("another guest's device wrote into this guest's mapped pages")
    }
}

/// A `fmt::Write` into a byte buffer (drops what does not fit).
struct Cursor<'a>(&'a mut [u8], usize);

impl core::fmt::Write for Cursor<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.0.len() - self.1);
        self.0[self.1..self.1 + n].copy_from_slice(&s.as_bytes()[..n]);
        self.1 += n;
        Ok(())
    }
}

/// `dma-foreign=MS` (two-guest scenario, the attacker): after MS ms, programs its own edu to
/// write to IOVAs the other guest holds (the three after its own two mappings; the scenario
/// checks the other guest holds each), and to map memory outside its own RAM.
pub fn foreign(boot: &BootInfo, ms: u64) -> Outcome {
    let mut d = driver()?;
    let edu = Edu::find().ok_or("no edu device")?;
    delay_ms(boot, ms);
    let (src, own) = map_source_and_destination(&mut d, 0x5A)?;
    let loaded = edu.dma(src, false);
    // Its own mapping at the same IOVA values the other guest uses reaches its own page only.
    let mine = edu.dma(own, true) && holds(4, 0x5A);
    // IOVAs only the other guest has mapped: nothing in this guest's domain. Each DMA must
    // fault on its own.
    let mut faulted = [0u64; 3];
    for (k, n) in faulted.iter_mut().enumerate() {
        let iova = own + (k as u64 + 1) * PAGE as u64;
        let before = d.stats(false).map_err(|_| "STATS failed")?.faults.get();
        let _ = edu.dma(iova, true);
        // The fault reaches the counters through the hypervisor's fault handling: give it
        // up to 100 ms.
        for _ in 0..100 {
            *n = d.stats(false).map_err(|_| "STATS failed")?.faults.get() - before;
            if *n > 0 {
                break;
            }
            delay_ms(boot, 1);
        }
        println!("dma-foreign: write to IOVA {iova:#x}: {n} fault(s) in this guest's domain");
    }
    // The other guest's RAM is not this guest's RAM: beyond the end of its own.
    let (st, _) = raw(
        Call::DmaMap,
        [
            boot.mem_size.get(),
            4096,
            DmaFlags::READ_WRITE.bits() as u64,
            0,
            0,
            0,
        ],
    );
    println!(
        "dma-foreign: own IOVA {own:#x} reached its own page: {}; MAP of GPA {:#x} (past its RAM): {st:?}",
        loaded && mine,
        boot.mem_size.get()
    );
    d.unmap(src, PAGE as u64).map_err(|_| "UNMAP failed")?;
    d.unmap(own, PAGE as u64).map_err(|_| "UNMAP failed")?;
    if !(loaded && mine) || faulted.contains(&0) || st != Some(Status::Fault) {
        return Err("isolation between guests not shown");
    }
    Ok(())
}
