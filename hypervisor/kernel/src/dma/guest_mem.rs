//! Guest memory as the DMA service sees it: the partition's bounds-checked, volatile copies in
//! and out, and the pages a call may not hand to a device.

use super::*;

/// Guest RAM plus the pages the guest may not hand to a device right now (its batch areas).
pub(super) struct CallRam<'a> {
    pub(super) part: &'a Partition,
    pub(super) areas: &'a [(u64, u64)],
}

impl moat_dma::GuestRam for CallRam<'_> {
    fn size(&self) -> u64 {
        self.part.size
    }
    fn host_base(&self) -> moat_dma::PhysAddr {
        moat_dma::GuestRam::host_base(self.part)
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
    pub(super) fn check(&self, gpa: u64, len: usize) -> Result<u64, Status> {
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
    pub(super) fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), Status> {
        let hpa = self.check(gpa, buf.len())?;
        for (i, n) in accesses(hpa, buf.len()) {
            let at = hpa + i as u64;
            if n == 8 {
                // SAFETY: [hpa, hpa+len) lies inside the guest's partition (checked), which is
                // identity-mapped RAM the hypervisor owns for the guest's lifetime; `at` is
                // 8-byte aligned and the 8 bytes lie inside the range.
                let w = unsafe { core::ptr::read_volatile(at as *const u64) };
                buf[i..i + 8].copy_from_slice(&w.to_ne_bytes());
            } else {
                // SAFETY: as above, one byte inside the range.
                buf[i] = unsafe { core::ptr::read_volatile(at as *const u8) };
            }
        }
        Ok(())
    }

    /// Writes `bytes` into guest memory (volatile stores, aligned 8-byte words in one store:
    /// the guest may read them meanwhile and sees each word old or new).
    pub(super) fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), Status> {
        let hpa = self.check(gpa, bytes.len())?;
        for (i, n) in accesses(hpa, bytes.len()) {
            let at = hpa + i as u64;
            if n == 8 {
                let mut w = [0u8; 8];
                w.copy_from_slice(&bytes[i..i + 8]);
                // SAFETY: as in `read`; the guest owns these bytes and expects the hypervisor
                // to write them (a reply buffer or a batch entry's output fields).
                unsafe { core::ptr::write_volatile(at as *mut u64, u64::from_ne_bytes(w)) };
            } else {
                // SAFETY: as above, one byte inside the range.
                unsafe { core::ptr::write_volatile(at as *mut u8, bytes[i]) };
            }
        }
        Ok(())
    }
}

/// How `read` and `write` split `len` bytes at host address `hpa` into single accesses:
/// `(offset, 8)` for each naturally aligned 8-byte word wholly inside, `(offset, 1)` for every
/// other byte; in address order, covering each byte once.
fn accesses(hpa: u64, len: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut i = 0;
    core::iter::from_fn(move || {
        if i >= len {
            return None;
        }
        let n = if (hpa + i as u64).is_multiple_of(8) && len - i >= 8 {
            8
        } else {
            1
        };
        i += n;
        Some((i - n, n))
    })
}
