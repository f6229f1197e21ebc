//! The paravirtual DMA service of one guest: what a MAP or UNMAP hypercall does once its
//! arguments have been copied out of guest memory and decoded.
//!
//! [`DmaState`] keeps the guest's live mappings and the unmaps whose invalidation has not
//! completed yet, enforces the checks and quotas, and applies the guest's protection
//! [`Policy`]:
//!
//! | policy | an UNMAP returns after | invalidations |
//! |---|---|---|
//! | `Passthrough` | immediately (guest RAM is direct-mapped; calls only check) | none |
//! | `Strict` | the invalidation covering it has completed | one per unmap |
//! | `Batched` | inside a batch: the batch's one invalidation at [`DmaState::end_batch`]; alone: as `Strict` | one per batch |
//! | `Deferred` | immediately; the device may still use it until the flush queue is flushed, which happens when it holds `deferred_entries` unmaps or its oldest is `deferred_ns` old ([`DmaState::tick`]) | one per queue flush |
//!
//! **Release rule** (every policy): an unmapped range's IOVA goes back to the allocator, and its
//! guest pages stop being pinned for DMA, only after the invalidation that covers it has
//! completed ([`Iommu::flush`] returned `Ok`). A failed flush keeps everything pinned and is
//! retried by the next flush.
//!
//! **Errors change nothing**: every failing call leaves the mappings, the pending list, the
//! IOVA allocator and the IOMMU exactly as before it.
//!
//! The hardware is behind two traits the kernel implements: [`Iommu`] (one VT-d domain:
//! map, unmap into a pending set, flush = invalidate + wait) and [`IovaSource`] (the per-CPU
//! magazine allocator). Guest memory is the guest's contiguous partition ([`GuestRam`]).
#![no_std]

extern crate alloc;

mod backend;
mod error;
mod state;

pub use backend::{Access, Clock, GuestRam, Iommu, IovaSource, NoClock};
pub use error::Error;
pub use state::{Counts, DmaState, Limits, Mapping, Phase, Policy, Stats, PAGE_SIZE};
