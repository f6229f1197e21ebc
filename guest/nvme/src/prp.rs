//! Physical Region Page entries for one transfer (NVMe base specification 1.4, 4.3): PRP1 is
//! the first page; PRP2 is the second page, or (more than two pages) the IOVA of a PRP list
//! page holding the IOVAs of the second and later pages.

use crate::Error;

/// The memory page size the driver configures (CC.MPS = 0).
pub const PAGE: u64 = 4096;
/// PRP entries in one list page.
pub const LIST_ENTRIES: usize = (PAGE / 8) as usize;
/// Largest transfer one PRP list page describes.
pub const MAX_TRANSFER: u64 = (LIST_ENTRIES as u64 + 1) * PAGE;

/// A transfer's PRP entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prps {
    /// PRP1.
    pub prp1: u64,
    /// PRP2 (0 if unused).
    pub prp2: u64,
    /// Entries written into the list page (0: no list).
    pub list_entries: usize,
}

/// The PRPs of a transfer of `len` bytes at the IOVA-contiguous range starting at `iova`
/// (page aligned). Writes the list entries into `list` (the list page's contents) when the
/// transfer spans more than two pages; `list_iova` is where the device finds that page.
pub fn build(
    iova: u64,
    len: u64,
    list: &mut [u64; LIST_ENTRIES],
    list_iova: u64,
) -> Result<Prps, Error> {
    if len == 0
        || len > MAX_TRANSFER
        || !iova.is_multiple_of(PAGE)
        || !list_iova.is_multiple_of(PAGE)
    {
        return Err(Error::BadTransfer);
    }
    let pages = len.div_ceil(PAGE);
    let end = iova.checked_add(pages * PAGE).ok_or(Error::BadTransfer)?;
    let _ = end;
    Ok(match pages {
        1 => Prps {
            prp1: iova,
            prp2: 0,
            list_entries: 0,
        },
        2 => Prps {
            prp1: iova,
            prp2: iova + PAGE,
            list_entries: 0,
        },
        n => {
            let entries = (n - 1) as usize;
            for (k, e) in list.iter_mut().take(entries).enumerate() {
                *e = iova + (k as u64 + 1) * PAGE;
            }
            Prps {
                prp1: iova,
                prp2: list_iova,
                list_entries: entries,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages_of(p: &Prps, list: &[u64; LIST_ENTRIES], list_iova: u64, len: u64) -> Vec<u64> {
        let n = len.div_ceil(PAGE);
        let mut v = vec![p.prp1];
        match n {
            1 => assert_eq!(p.prp2, 0),
            2 => v.push(p.prp2),
            _ => {
                assert_eq!(p.prp2, list_iova);
                v.extend_from_slice(&list[..p.list_entries]);
            }
        }
        v
    }

    #[test]
    fn one_two_and_many_pages() {
        let mut list = [0u64; LIST_ENTRIES];
        let p = build(0x10_0000, 512, &mut list, 0x9000).unwrap();
        assert_eq!((p.prp1, p.prp2, p.list_entries), (0x10_0000, 0, 0));
        let p = build(0x10_0000, 8192, &mut list, 0x9000).unwrap();
        assert_eq!((p.prp1, p.prp2, p.list_entries), (0x10_0000, 0x10_1000, 0));
        let p = build(0x10_0000, 65536, &mut list, 0x9000).unwrap();
        assert_eq!((p.prp1, p.prp2, p.list_entries), (0x10_0000, 0x9000, 15));
        assert_eq!(list[0], 0x10_1000);
        assert_eq!(list[14], 0x10_f000);
    }

    #[test]
    fn refused_transfers() {
        let mut list = [0u64; LIST_ENTRIES];
        assert_eq!(build(0x1000, 0, &mut list, 0), Err(Error::BadTransfer));
        assert_eq!(build(0x1001, 512, &mut list, 0), Err(Error::BadTransfer));
        assert_eq!(build(0x1000, 512, &mut list, 0x10), Err(Error::BadTransfer));
        assert_eq!(
            build(0x1000, MAX_TRANSFER + PAGE, &mut list, 0x2000),
            Err(Error::BadTransfer)
        );
        assert_eq!(
            build(u64::MAX - 0xfff, 8192, &mut list, 0x2000),
            Err(Error::BadTransfer)
        );
        assert!(build(0x1000, MAX_TRANSFER, &mut list, 0x2000).is_ok());
    }

    proptest::proptest! {
        /// Every page of the transfer is described exactly once, in order.
        #[test]
        fn prps_cover_the_transfer(page in 1u64..1 << 30, len in 1u64..=MAX_TRANSFER) {
            let mut list = [0u64; LIST_ENTRIES];
            let iova = page * PAGE;
            let p = build(iova, len, &mut list, 0x7000).unwrap();
            let got = pages_of(&p, &list, 0x7000, len);
            let want: Vec<u64> = (0..len.div_ceil(PAGE)).map(|k| iova + k * PAGE).collect();
            proptest::prop_assert_eq!(got, want);
        }
    }
}
