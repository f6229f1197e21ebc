//! Walking a guest's own 4-level page tables (long mode, CR4.LA57 clear) to turn a guest
//! virtual address into a guest-physical one, and fetching instruction bytes through them:
//! what the hypervisor does to read the instruction at RIP when the hardware gives it no
//! instruction bytes (no SVM decode assists, or VMX).
//!
//! Memory is read through a callback that answers `None` for a guest-physical address
//! outside the guest's partition: a bad guest pointer ends the walk with an error, never an
//! access outside the guest.

use crate::insn::MAX_LEN;

const PRESENT: u64 = 1;
const LARGE: u64 = 1 << 7;
/// Physical-address bits 51:12 of an entry.
const ADDR: u64 = 0x000f_ffff_ffff_f000;
const PAGE: u64 = 4096;

/// Why a guest virtual address did not translate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// The entry at this level (4 = PML4 .. 1 = PT) is not present.
    NotPresent(u8),
    /// A table (or the address it names) lies outside the guest's memory.
    OutsideGuest(u64),
    /// Not a canonical 48-bit address.
    NonCanonical(u64),
}

impl core::fmt::Display for WalkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotPresent(l) => write!(f, "level-{l} entry not present"),
            Self::OutsideGuest(a) => {
                write!(f, "guest-physical {a:#x} outside the guest's memory")
            }
            Self::NonCanonical(a) => write!(f, "non-canonical address {a:#x}"),
        }
    }
}

/// The guest-physical address of `va` under the page tables rooted at `cr3`; `read(gpa)`
/// reads the 8-byte entry at `gpa` of the guest's memory (`None` outside it).
pub fn translate(
    cr3: u64,
    va: u64,
    read: &mut dyn FnMut(u64) -> Option<u64>,
) -> Result<u64, WalkError> {
    if ((va as i64) << 16 >> 16) as u64 != va {
        return Err(WalkError::NonCanonical(va));
    }
    let mut table = cr3 & ADDR;
    for level in (1..=4u8).rev() {
        let shift = 12 + 9 * (u32::from(level) - 1);
        let at = table + 8 * ((va >> shift) & 511);
        let e = read(at).ok_or(WalkError::OutsideGuest(at))?;
        if e & PRESENT == 0 {
            return Err(WalkError::NotPresent(level));
        }
        // 1 GiB (PDPT) and 2 MiB (PD) pages.
        if (level == 2 || level == 3) && e & LARGE != 0 {
            let size = 1u64 << shift;
            return Ok((e & ADDR & !(size - 1)) | (va & (size - 1)));
        }
        table = e & ADDR;
    }
    Ok(table | (va & (PAGE - 1)))
}

/// Reads up to [`MAX_LEN`] instruction bytes at `rip` into `buf`: page by page, stopping at
/// the first page that does not translate (the bytes read so far are kept: the decoder says
/// whether they suffice). `byte(gpa)` reads one byte of guest memory. Returns how many bytes
/// were read, or the first page's error.
pub fn fetch(
    cr3: u64,
    rip: u64,
    buf: &mut [u8; MAX_LEN],
    read: &mut dyn FnMut(u64) -> Option<u64>,
    byte: &mut dyn FnMut(u64) -> Option<u8>,
) -> Result<usize, WalkError> {
    let mut n = 0;
    while n < MAX_LEN {
        let va = rip.wrapping_add(n as u64);
        let gpa = match translate(cr3, va, read) {
            Ok(g) => g,
            Err(e) if n == 0 => return Err(e),
            Err(_) => break,
        };
        let in_page = (PAGE - (va & (PAGE - 1))) as usize;
        for k in 0..in_page.min(MAX_LEN - n) {
            match byte(gpa + k as u64) {
                Some(b) => buf[n] = b,
                None if n == 0 => return Err(WalkError::OutsideGuest(gpa)),
                None => return Ok(n),
            }
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// A guest memory of `size` bytes, sparse.
    struct Mem {
        size: u64,
        bytes: BTreeMap<u64, u8>,
    }

    impl Mem {
        fn new(size: u64) -> Self {
            Mem {
                size,
                bytes: BTreeMap::new(),
            }
        }
        fn put64(&mut self, at: u64, v: u64) {
            for (i, b) in v.to_le_bytes().iter().enumerate() {
                self.bytes.insert(at + i as u64, *b);
            }
        }
        fn get(&self, at: u64) -> Option<u8> {
            (at < self.size).then(|| self.bytes.get(&at).copied().unwrap_or(0))
        }
        fn get64(&self, at: u64) -> Option<u64> {
            let mut v = 0u64;
            for i in 0..8 {
                v |= u64::from(self.get(at + i)?) << (8 * i);
            }
            Some(v)
        }
    }

    /// Tables at 0x1000 (PML4), 0x2000 (PDPT), 0x3000 (PD), 0x4000 (PT): `va` mapped by a
    /// 4 KiB page to `pa`, and the 2 MiB page at 1 GiB mapped to 0x20_0000, the 1 GiB page at
    /// 512 GiB to 0x4000_0000.
    fn tables(va: u64, pa: u64) -> Mem {
        let mut m = Mem::new(1 << 40);
        m.put64(0x1000 + 8 * ((va >> 39) & 511), 0x2000 | 3);
        m.put64(0x2000 + 8 * ((va >> 30) & 511), 0x3000 | 3);
        m.put64(0x3000 + 8 * ((va >> 21) & 511), 0x4000 | 3);
        m.put64(0x4000 + 8 * ((va >> 12) & 511), pa | 3);
        m
    }

    proptest! {
        #[test]
        fn four_kib_pages_translate(page in 0u64..(1 << 27), off in 0u64..4096, pa in 1u64..(1 << 28)) {
            // Keep the walk's table pages apart from the page itself.
            let va = (page + 16) << 12 | off;
            let m = tables(va & !0xfff, pa << 12);
            let r = translate(0x1000, va, &mut |a| m.get64(a));
            prop_assert_eq!(r, Ok(pa << 12 | off));
        }
    }

    #[test]
    fn large_pages_and_errors() {
        let mut m = Mem::new(1 << 32);
        m.put64(0x1000, 0x2000 | 3);
        m.put64(0x2000 + 8, 0x3000 | 3);
        m.put64(0x3000, 0x20_0000 | 3 | LARGE);
        m.put64(0x2000 + 8 * 2, 0x4000_0000 | 3 | LARGE);
        let mut rd = |a: u64| m.get64(a);
        assert_eq!(
            translate(0x1000, (1 << 30) + 0x1234, &mut rd),
            Ok(0x20_1234)
        );
        assert_eq!(
            translate(0x1000, (2 << 30) + 0x12_3456, &mut rd),
            Ok(0x4012_3456)
        );
        assert_eq!(
            translate(0x1000, 3 << 30, &mut rd),
            Err(WalkError::NotPresent(3))
        );
        assert_eq!(
            translate(0x1000, 1 << 47, &mut rd),
            Err(WalkError::NonCanonical(1 << 47))
        );
        // A PDPT pointer outside the guest.
        m.put64(0x1000 + 8, 0x1_0000_0000 | 3);
        let mut rd = |a: u64| m.get64(a);
        assert_eq!(
            translate(0x1000, 1 << 39, &mut rd),
            Err(WalkError::OutsideGuest(0x1_0000_0000))
        );
    }

    #[test]
    fn fetch_crosses_pages_and_stops_at_a_hole() {
        // va 0x10_0ffc (4 bytes before a page end) -> 0x5ffc; the next page -> 0x7000.
        let mut m = tables(0x10_0000, 0x5000);
        m.put64(0x4000 + 8 * 0x101, 0x7000 | 3);
        for i in 0..4 {
            m.bytes.insert(0x5ffc + i, 0x10 + i as u8);
        }
        for i in 0..11 {
            m.bytes.insert(0x7000 + i, 0x20 + i as u8);
        }
        let mut buf = [0u8; MAX_LEN];
        let n = fetch(0x1000, 0x10_0ffc, &mut buf, &mut |a| m.get64(a), &mut |a| {
            m.get(a)
        });
        assert_eq!(n, Ok(15));
        assert_eq!(&buf[..5], &[0x10, 0x11, 0x12, 0x13, 0x20]);
        // The second page unmapped: 4 bytes.
        m.put64(0x4000 + 8 * 0x101, 0);
        let n = fetch(0x1000, 0x10_0ffc, &mut buf, &mut |a| m.get64(a), &mut |a| {
            m.get(a)
        });
        assert_eq!(n, Ok(4));
        // RIP itself unmapped: the walk's error.
        assert_eq!(
            fetch(0x1000, 0x10_1000, &mut buf, &mut |a| m.get64(a), &mut |a| m
                .get(a)),
            Err(WalkError::NotPresent(1))
        );
    }
}
