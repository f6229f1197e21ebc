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
//! | `Deferred` | immediately; the device may still use it until the flush queue is flushed, which happens when it holds `deferred_entries` unmaps or its oldest is `deferred_ns - slack_ns` old (checked on every call, inside batches too, and by [`DmaState::tick`]; see [`DmaState::deferred_deadline`]) | one per queue flush |
//!
//! **Release rule** (every policy): an unmapped range's IOVA goes back to the allocator, and its
//! guest pages stop being pinned for DMA, only after the invalidation that covers it has
//! completed ([`Iommu::flush`] returned `Ok`). A failed flush keeps everything pinned and is
//! retried by the next flush.
//!
//! **Errors change nothing**: every failing call leaves the mappings, the IOVA allocator and
//! the IOMMU's translations as before it. The one thing a failed MAP may leave behind is
//! invisible to the guest: if it wrote entries before failing (or its flush failed and it
//! cleared them again), those are cleared under a pending invalidation, and its IOVA stays
//! held ([`Counts::rolled_back`], not a mapping) until that invalidation completed.
//!
//! **Unconfirmed invalidations**: an UNMAP whose required invalidation the IOMMU did not
//! confirm took effect and returns [`Unmapped::Unsynced`], not an error (the ABI's BUSY for a
//! single UNMAP, the `unsynced` bit inside a MULTICALL).
//!
//! **Shards**: a guest with several vCPUs runs one [`DmaState`] per vCPU
//! ([`DmaState::with_shared`]): the records of the mappings that vCPU made, its pending set and
//! flush queue (its own deferred queue, bounds per vCPU), its counters. The shards share only
//! [`Shared`], kept with atomics: the quotas (live mappings, mapped pages, reserved before a
//! map and given back by its failure or unmap) and one bit per guest page in a live mapping
//! (claimed in ascending order, so two MAPs of overlapping pages never both succeed and never
//! both fail spuriously). An UNMAP on another vCPU than the MAP first moves the record
//! ([`DmaState::take_mapping`], [`DmaState::adopt`]). Every rule above holds per shard; the
//! checks that span the guest (quotas, a guest page mapped twice) hold through [`Shared`].
//!
//! The hardware is behind two traits the kernel implements: [`Iommu`] (one VT-d domain:
//! map, unmap into a pending set, flush = invalidate + wait) and [`IovaSource`] (the per-CPU
//! magazine allocator). Guest memory is the guest's contiguous partition ([`GuestRam`]).
#![forbid(unsafe_code)]
#![no_std]

extern crate alloc;

mod backend;
mod error;
mod live;
mod shared;
mod state;
mod sync;

pub use backend::{Access, Clock, GuestRam, Iommu, IovaSource, NoClock};
pub use error::Error;
/// Host-physical addresses (`moat-frames`' type, the one for all of Moat): what a mapping's
/// IOVAs translate to.
pub use moat_frames::PhysAddr;
pub use shared::Shared;
pub use state::{Counts, DmaState, Limits, Mapping, Phase, Policy, Stats, Unmapped, PAGE_SIZE};
