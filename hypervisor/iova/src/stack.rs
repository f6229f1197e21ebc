//! ABA-safe lock-free stack of indices (a Treiber stack with a tagged head).
//!
//! The stack stores no elements itself: it links indices of a caller-owned, type-stable array
//! through one [`AtomicU32`] per element (the [`Links`]). The head is one 64-bit word, the low 32
//! bits the top index and the high 32 bits a tag that every successful push or pop increments, so
//! a thread that read `head = (tag, A)` and `next(A) = B` cannot install a stale `B` after other
//! threads popped `A`, changed the stack and pushed `A` back: the tag no longer matches. (The tag
//! would have to wrap through all 2^32 values during one preempted pop for ABA to return.)
//!
//! Because the element array is never freed while the stack is in use, reading `next(A)` of an
//! element another thread just popped is a harmless stale read, never a use-after-free.

use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// The index meaning "no element" (empty stack, end of list).
pub const NIL: u32 = u32::MAX;

/// Access to the per-element link words of a stack's element array.
pub trait Links {
    /// The link word of element `index`, or `None` if `index` is outside the array.
    fn link(&self, index: u32) -> Option<&AtomicU32>;
}

/// A plain array of link words, for stacks whose elements live elsewhere (and for tests).
#[derive(Debug)]
pub struct LinkArray {
    links: alloc::boxed::Box<[AtomicU32]>,
}

impl LinkArray {
    /// An array of `len` link words (allocates; construction time only).
    pub fn new(len: usize) -> Self {
        let links = (0..len).map(|_| AtomicU32::new(NIL)).collect();
        Self { links }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.links.len()
    }

    /// Whether the array has no element.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }
}

impl Links for LinkArray {
    #[inline]
    fn link(&self, index: u32) -> Option<&AtomicU32> {
        self.links.get(index as usize)
    }
}

/// A lock-free LIFO of indices with an ABA tag in the head word.
#[derive(Debug)]
pub struct TaggedStack {
    head: AtomicU64,
}

impl Default for TaggedStack {
    fn default() -> Self {
        Self::new()
    }
}

#[inline]
fn pack(tag: u32, index: u32) -> u64 {
    (u64::from(tag) << 32) | u64::from(index)
}

#[inline]
fn unpack(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

impl TaggedStack {
    /// An empty stack.
    pub fn new() -> Self {
        Self {
            head: AtomicU64::new(pack(0, NIL)),
        }
    }

    /// Pushes element `index`. The caller must own `index` (it is on no stack); returns `false`
    /// without doing anything if `index` is not an element of `links`.
    pub fn push<L: Links + ?Sized>(&self, links: &L, index: u32) -> bool {
        let Some(link) = links.link(index) else {
            return false;
        };
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            let (tag, top) = unpack(head);
            link.store(top, Ordering::Relaxed);
            // Release: the element's contents and its link happen-before any pop that sees it.
            match self.head.compare_exchange_weak(
                head,
                pack(tag.wrapping_add(1), index),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => head = now,
            }
        }
    }

    /// Pops the top element, transferring its ownership to the caller.
    pub fn pop<L: Links + ?Sized>(&self, links: &L) -> Option<u32> {
        let mut head = self.head.load(Ordering::Acquire);
        loop {
            let (tag, top) = unpack(head);
            // A corrupt or foreign index reads as an empty stack rather than out of bounds.
            let link = links.link(top)?;
            // May be stale if `top` was popped meanwhile; the tagged CAS below then fails.
            let next = link.load(Ordering::Relaxed);
            match self.head.compare_exchange_weak(
                head,
                pack(tag.wrapping_add(1), next),
                Ordering::Acquire,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(top),
                Err(now) => head = now,
            }
        }
    }

    /// Whether the stack looked empty at the moment of the load.
    pub fn is_empty(&self) -> bool {
        unpack(self.head.load(Ordering::Relaxed)).1 == NIL
    }
}
