//! [`Shared`]: what the per-vCPU [`crate::DmaState`] shards of one guest share, kept with
//! atomics so that no vCPU waits for another on the common path: the guest-wide quota
//! counters (live mappings, mapped pages) and one bit per guest page in a live mapping.
//!
//! Claims are made in ascending page order (word by word), so two MAPs of overlapping guest
//! ranges racing on two vCPUs never both fail: the lower contested word decides, as lock
//! ordering would. A claim that loses gives back exactly the bits it set.
//!
//! The quota counters live on their own cache line: every vCPU updates them, while the page
//! bitmap's pointer (read by every claim) stays in a line nobody writes. A shard inside a
//! MULTICALL reserves quota for several maps at once and returns what it did not use at the
//! end of the batch (see `DmaState`'s batch credit), so these counters are written a few
//! times per batch, not on every map and unmap.

use alloc::vec::Vec;

use crate::state::{Limits, PAGE_SIZE};
use crate::sync::{AtomicU64, AtomicUsize, Ordering};

/// Guest-wide DMA accounting shared by a guest's shards.
#[derive(Debug)]
pub struct Shared {
    /// Bit `p` set: guest page `p` is in a live mapping.
    gpa: Vec<AtomicU64>,
    quota: Quota,
}

/// The guest-wide quota counters: live mappings and their pages, plus what shards reserved
/// for the rest of their batch.
#[derive(Debug)]
#[repr(align(64))]
struct Quota {
    mappings: AtomicUsize,
    mapped_pages: AtomicU64,
}

/// Bit masks of the words covering pages `[first, end)`: `(word index, mask)` pairs.
fn words(first: u64, end: u64) -> impl Iterator<Item = (usize, u64)> {
    let (w0, w1) = (first / 64, end.div_ceil(64));
    (w0..w1).map(move |w| {
        let lo = first.max(w * 64) - w * 64;
        let hi = end.min(w * 64 + 64) - w * 64;
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        (w as usize, mask)
    })
}

/// The word and mask of pages `[first, first + pages)` when they lie in one word (the
/// common MAP: up to 64 pages, not crossing a 256 KiB boundary); `None` otherwise
/// ([`words`] then).
#[inline(always)]
fn one_word(first: u64, pages: u64) -> Option<(usize, u64)> {
    let lo = first % 64;
    if pages == 0 || lo + pages > 64 {
        return None;
    }
    Some(((first / 64) as usize, u64::MAX >> (64 - pages) << lo))
}

impl Shared {
    /// Accounting for a guest of `ram_bytes` of RAM (its pages are the ones that can be
    /// mapped).
    pub fn new(ram_bytes: u64) -> Self {
        let pages = ram_bytes.div_ceil(PAGE_SIZE);
        Self {
            gpa: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            quota: Quota {
                mappings: AtomicUsize::new(0),
                mapped_pages: AtomicU64::new(0),
            },
        }
    }

    /// Live mappings of the guest (every shard), plus what shards inside a MULTICALL hold
    /// for the rest of their batch (none once every shard is held).
    pub fn mappings(&self) -> usize {
        self.quota.mappings.load(Ordering::Acquire)
    }

    /// Pages in live mappings of the guest (every shard), as [`Self::mappings`].
    pub fn mapped_pages(&self) -> u64 {
        self.quota.mapped_pages.load(Ordering::Acquire)
    }

    /// Reserves `n` mappings of `pages` pages in all against the quotas; false (and nothing
    /// reserved) when they do not fit.
    pub(crate) fn reserve(&self, n: usize, pages: u64, limits: &Limits) -> bool {
        let m = self.quota.mappings.fetch_add(n, Ordering::AcqRel);
        let p = self.quota.mapped_pages.fetch_add(pages, Ordering::AcqRel);
        if m + n > limits.max_mappings || p + pages > limits.max_mapped_pages {
            self.unreserve(n, pages);
            return false;
        }
        true
    }

    /// Gives back what [`Self::reserve`] took (or part of it).
    pub(crate) fn unreserve(&self, n: usize, pages: u64) {
        self.quota.mappings.fetch_sub(n, Ordering::AcqRel);
        self.quota.mapped_pages.fetch_sub(pages, Ordering::AcqRel);
    }

    /// Marks guest pages `[gpa, gpa + pages)` as mapped; false (nothing changed) when one of
    /// them already is, or lies beyond the guest's RAM.
    #[inline]
    pub(crate) fn claim(&self, gpa: u64, pages: u64) -> bool {
        let first = gpa / PAGE_SIZE;
        if let Some((w, mask)) = one_word(first, pages) {
            // The common case, a range within one word: one atomic, nothing to give back
            // on a loss (only bits that were clear are set, and `old` tells which).
            let Some(word) = self.gpa.get(w) else {
                return false;
            };
            let old = word.fetch_or(mask, Ordering::AcqRel);
            if old & mask != 0 {
                word.fetch_and(!(mask & !old), Ordering::AcqRel);
                return false;
            }
            return true;
        }
        self.claim_words(first, first + pages)
    }

    /// [`Self::claim`] of pages `[first, end)` word by word, in ascending order.
    #[inline(never)]
    fn claim_words(&self, first: u64, end: u64) -> bool {
        if end.div_ceil(64) > self.gpa.len() as u64 {
            return false;
        }
        for (w, mask) in words(first, end) {
            let old = self.gpa[w].fetch_or(mask, Ordering::AcqRel);
            if old & mask != 0 {
                // Lost: give back the bits this claim set, in this word and the ones below.
                self.gpa[w].fetch_and(!(mask & !old), Ordering::AcqRel);
                for (v, m) in words(first, end).take_while(|&(v, _)| v < w) {
                    self.gpa[v].fetch_and(!m, Ordering::AcqRel);
                }
                return false;
            }
        }
        true
    }

    /// Clears what a successful [`Self::claim`] of the same range set.
    #[inline]
    pub(crate) fn unclaim(&self, gpa: u64, pages: u64) {
        let first = gpa / PAGE_SIZE;
        if let Some((w, mask)) = one_word(first, pages) {
            let old = self.gpa[w].fetch_and(!mask, Ordering::AcqRel);
            debug_assert_eq!(old & mask, mask, "unclaim of pages that were not claimed");
            return;
        }
        self.unclaim_words(first, first + pages);
    }

    /// [`Self::unclaim`] of pages `[first, end)` word by word.
    #[inline(never)]
    fn unclaim_words(&self, first: u64, end: u64) {
        for (w, mask) in words(first, end) {
            let old = self.gpa[w].fetch_and(!mask, Ordering::AcqRel);
            debug_assert_eq!(old & mask, mask, "unclaim of pages that were not claimed");
        }
    }

    /// Whether any page of guest-physical `[gpa, end)` is in a live mapping.
    pub fn gpa_mapped(&self, gpa: u64, end: u64) -> bool {
        if end <= gpa {
            return false;
        }
        let (first, last) = (gpa / PAGE_SIZE, end.div_ceil(PAGE_SIZE));
        words(first, last).any(|(w, mask)| {
            self.gpa
                .get(w)
                .is_some_and(|x| x.load(Ordering::Acquire) & mask != 0)
        })
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn masks_cover_exactly_the_range() {
        let v: Vec<_> = words(3, 5).collect();
        assert_eq!(v, [(0, 0b11000)]);
        let v: Vec<_> = words(60, 130).collect();
        assert_eq!(v, [(0, 0xF << 60), (1, u64::MAX), (2, 0b11)]);
        let v: Vec<_> = words(64, 128).collect();
        assert_eq!(v, [(1, u64::MAX)]);
    }

    #[test]
    fn one_word_masks() {
        assert_eq!(one_word(3, 2), Some((0, 0b11000)));
        assert_eq!(one_word(64, 64), Some((1, u64::MAX)));
        assert_eq!(one_word(127, 1), Some((1, 1 << 63)));
        assert_eq!(one_word(63, 2), None, "crosses a word");
        assert_eq!(one_word(0, 65), None);
        assert_eq!(one_word(5, 0), None);
        for (first, pages) in [(0u64, 1u64), (3, 2), (64, 64), (127, 1), (70, 10)] {
            let v: Vec<_> = words(first, first + pages).collect();
            assert_eq!(v, [one_word(first, pages).unwrap()], "{first} + {pages}");
        }
    }

    proptest::proptest! {
        /// Against a model (one bool per page): claims within a word and across words, some
        /// overlapping earlier ones, win exactly when no page is taken and then set exactly
        /// their pages; losses change nothing; unclaims clear exactly their pages.
        #[test]
        fn claims_match_a_model(ops in proptest::collection::vec((0u64..250, 1u64..140, proptest::bool::ANY), 1..200)) {
            let pages_total = 512u64;
            let s = Shared::new(pages_total * PAGE_SIZE);
            let mut model = [false; 512];
            let mut held: Vec<(u64, u64)> = Vec::new();
            for (first, n, release) in ops {
                if release && !held.is_empty() {
                    let (f, n) = held.remove((first as usize) % held.len());
                    s.unclaim(f * PAGE_SIZE, n);
                    model[f as usize..(f + n) as usize].fill(false);
                } else {
                    let fits = first + n <= pages_total;
                    let free = fits && model[first as usize..(first + n) as usize].iter().all(|b| !b);
                    proptest::prop_assert_eq!(s.claim(first * PAGE_SIZE, n), free);
                    if free {
                        model[first as usize..(first + n) as usize].fill(true);
                        held.push((first, n));
                    }
                }
                for p in 0..pages_total {
                    let a = p * PAGE_SIZE;
                    proptest::prop_assert_eq!(s.gpa_mapped(a, a + PAGE_SIZE), model[p as usize], "page {}", p);
                }
            }
        }
    }

    #[test]
    fn claims_are_exclusive_and_given_back() {
        let s = Shared::new(1 << 20);
        assert!(s.claim(0x3000, 100));
        assert!(!s.claim(0x1000, 3), "overlaps page 3");
        assert!(s.claim(0x1000, 2), "the failed claim gave its pages back");
        assert!(
            !s.claim(0x66000, 2),
            "page 0x67 is the last of the first claim"
        );
        assert!(s.gpa_mapped(0x66000, 0x67000));
        assert!(!s.gpa_mapped(0x67000, 0x68000));
        s.unclaim(0x3000, 100);
        assert!(!s.gpa_mapped(0x3000, 0x67000));
        assert!(s.claim(0x3000, 100));
        assert!(!s.claim((1 << 20) - 0x1000, 2), "beyond RAM");
    }

    #[test]
    fn quota_reservations_are_exact() {
        let l = Limits {
            max_mappings: 2,
            max_mapped_pages: 10,
            ..Limits::DEFAULT
        };
        let s = Shared::new(1 << 20);
        assert!(s.reserve(1, 4, &l));
        assert!(!s.reserve(1, 7, &l));
        assert!(s.reserve(1, 6, &l));
        assert!(!s.reserve(1, 0, &l));
        assert_eq!((s.mappings(), s.mapped_pages()), (2, 10));
        s.unreserve(1, 4);
        assert_eq!((s.mappings(), s.mapped_pages()), (1, 6));
        assert!(!s.reserve(2, 1, &l), "two more mappings do not fit");
        assert!(s.reserve(1, 4, &l));
        assert_eq!((s.mappings(), s.mapped_pages()), (2, 10));
    }
}

/// Loom models of the claim protocol: `RUSTFLAGS="--cfg loom" cargo test -p moat-dma --lib
/// --release loom`.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use alloc::sync::Arc;

    /// Two vCPUs claim overlapping ranges of pages, `a` here and `b` on another thread:
    /// never both win, never both lose, and afterwards words 0 and 1 hold exactly the
    /// winner's bits (`if_a` or `if_b`).
    fn claim_race(a: (u64, u64), b: (u64, u64), if_a: (u64, u64), if_b: (u64, u64)) {
        loom::model(move || {
            let s = Arc::new(Shared::new(256 * PAGE_SIZE));
            let s2 = s.clone();
            let t = loom::thread::spawn(move || s2.claim(b.0 * PAGE_SIZE, b.1));
            let won_a = s.claim(a.0 * PAGE_SIZE, a.1);
            let won_b = t.join().unwrap();
            assert!(
                won_a ^ won_b,
                "exactly one claim wins (a {won_a}, b {won_b})"
            );
            let words = (
                s.gpa[0].load(Ordering::Relaxed),
                s.gpa[1].load(Ordering::Relaxed),
            );
            assert_eq!(words, if won_a { if_a } else { if_b });
        });
    }

    /// Pages 62..66 and 64..70, across a word boundary (word by word).
    #[test]
    fn overlapping_claims() {
        claim_race((62, 4), (64, 6), (0b11 << 62, 0b11), (0, 0b11_1111));
    }

    /// Pages 64..68 and 66..70, inside one word (the single-atomic path): the loser's
    /// give-back clears only bits it set itself.
    #[test]
    fn overlapping_claims_in_one_word() {
        claim_race((64, 4), (66, 4), (0, 0b1111), (0, 0b11_1100));
    }

    /// Runs `a` here and `b` on another thread against one [`Shared`] with a quota of `max`
    /// mappings; each returns how many one-page mappings it kept. `check` sees both; the
    /// counters must equal their sum afterwards.
    fn race(
        max: usize,
        a: fn(&Shared, &Limits) -> usize,
        b: fn(&Shared, &Limits) -> usize,
        check: fn(usize, usize),
    ) {
        loom::model(move || {
            let l = Limits {
                max_mappings: max,
                ..Limits::DEFAULT
            };
            let s = Arc::new(Shared::new(4 * PAGE_SIZE));
            let s2 = s.clone();
            let t = loom::thread::spawn(move || b(&s2, &l));
            let x = a(&s, &l);
            let y = t.join().unwrap();
            check(x, y);
            assert_eq!(s.mappings(), x + y);
            assert_eq!(s.mapped_pages(), (x + y) as u64);
        });
    }

    /// A quota of one mapping: two racing reservations never both succeed, and the
    /// counters are exact afterwards.
    #[test]
    fn racing_reservations() {
        let one = |s: &Shared, l: &Limits| s.reserve(1, 1, l) as usize;
        race(1, one, one, |x, y| assert!(x + y <= 1));
    }

    /// A batch's credit against a single map, quota of two mappings: the batch reserves two at
    /// once and keeps them; never more than the quota is held, one of them fits whatever the
    /// order, and the counters end exact.
    #[test]
    fn batch_credit_against_a_map() {
        race(
            2,
            |s, l| s.reserve(1, 1, l) as usize,
            |s, l| 2 * s.reserve(2, 2, l) as usize,
            |x, y| {
                assert!(x + y <= 2, "over the quota: {x} + {y}");
                assert!(x + y >= 1, "one of them fits whatever the order");
            },
        );
    }
}
