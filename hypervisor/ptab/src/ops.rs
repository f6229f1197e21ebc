//! Random map/unmap/flush/release sequences for model tests of page tables built on the
//! engine (this crate's own and the VT-d driver's), as proptest strategies.

use std::collections::BTreeMap;
use std::format;

use proptest::prelude::*;

/// One step of a model test, in 4 KiB pages.
#[derive(Clone, Debug)]
pub enum Op {
    /// Maps `pages` pages at `page` to `phys_page`, writable or read-only.
    Map {
        /// First IOVA/VA page.
        page: u64,
        /// Length in pages.
        pages: u64,
        /// First physical page.
        phys_page: u64,
        /// Writable.
        write: bool,
    },
    /// Unmaps `pages` pages at `page`.
    Unmap {
        /// First page.
        page: u64,
        /// Length in pages.
        pages: u64,
    },
    /// Unmaps exactly the range of the n-th successful map (modulo their number), as a DMA
    /// client unmapping its own mappings does.
    UnmapNth(usize),
    /// A completed flush: the pending table pages are freed.
    Flush,
    /// Teardown-style release of the empty tables, then a flush.
    Release,
}

impl Op {
    /// Turns [`Op::UnmapNth`] into the [`Op::Unmap`] of that entry of `maps` ((page, pages)
    /// of the successful maps), or [`Op::Flush`] if there is none; other steps are unchanged.
    pub fn resolve(self, maps: &[(u64, u64)]) -> Op {
        match self {
            Op::UnmapNth(n) if !maps.is_empty() => {
                let (page, pages) = maps[n % maps.len()];
                Op::Unmap { page, pages }
            }
            Op::UnmapNth(_) => Op::Flush,
            op => op,
        }
    }
}

/// Steps with IOVAs within 8 MiB, so 2 MiB superpages and table sharing happen often.
pub fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..2048, 1u64..600, 0u64..4096, any::<bool>()).prop_map(
            |(page, pages, phys_page, write)| {
                let page = if page % 3 == 0 { page & !511 } else { page };
                let phys_page = if page % 512 == 0 { phys_page & !511 } else { phys_page };
                Op::Map { page, pages, phys_page, write }
            }
        ),
        4 => (0u64..2048, 1u64..1100).prop_map(|(page, pages)| {
            // Often a whole number of 2 MiB spans, so tables get unlinked.
            if page % 3 == 0 {
                Op::Unmap { page: page & !511, pages: (pages + 511) & !511 }
            } else {
                Op::Unmap { page, pages: pages % 600 + 1 }
            }
        }),
        3 => any::<usize>().prop_map(Op::UnmapNth),
        1 => Just(Op::Flush),
        1 => Just(Op::Release),
    ]
}

/// The page-granular model of a model test: page -> (physical page, writable).
pub type Model = BTreeMap<u64, (u64, bool)>;

/// Checks byte `offset` of every page below `pages` against `model`: a page the model lacks
/// does not translate (`translate(address)` is `None`), a mapped one translates and
/// `check(translation, expected physical address, writable)` holds.
pub fn translations_match<T>(
    model: &Model,
    pages: u64,
    offset: u64,
    translate: impl Fn(u64) -> Option<T>,
    check: impl Fn(T, u64, bool) -> Result<(), TestCaseError>,
) -> Result<(), TestCaseError> {
    for p in 0..pages {
        let t = translate(p * 4096 + offset);
        match model.get(&p) {
            None => prop_assert!(t.is_none(), "page {:#x} translates, not mapped", p),
            Some(&(phys, write)) => {
                let t = t.ok_or_else(|| {
                    TestCaseError::fail(format!("page {p:#x} mapped, does not translate"))
                })?;
                check(t, phys * 4096 + offset, write)?;
            }
        }
    }
    Ok(())
}
