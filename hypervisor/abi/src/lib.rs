//! # The Moat hypercall ABI (version 2), with the paravirtual DMA interface
//!
//! This crate is the one definition of the interface between the Moat hypervisor and its
//! guests: the hypervisor and guest drivers both build against it, and this documentation is
//! the specification a third party implements a guest driver from. Every structure shared
//! through guest memory is a `#[repr(C)]` struct of little-endian field types
//! (`zerocopy::little_endian::{U16, U32, U64, I64}`, alignment 1), so its bytes are the same on
//! any host: zerocopy's derives check that it has no padding and that every byte pattern is a
//! value ([`FromBytes`], [`IntoBytes`]), and each one's size and field offsets are asserted at
//! compile time. Its bytes are [`IntoBytes::as_bytes`]; a copy from bytes is
//! [`FromBytes::read_from_bytes`].
//!
//! A guest uses the DMA interface to make its own pages reachable by its assigned devices:
//! it hands the hypervisor guest-physical ranges and gets back I/O virtual addresses (IOVAs)
//! to program into the device. The hypervisor owns the IOMMU (Intel VT-d), chooses every IOVA,
//! and removes access again on UNMAP under the guest's protection policy.
//!
//! ## 1. Discovery
//!
//! 1. `CPUID.0x4000_0000`: EAX = highest hypervisor leaf ([`CPUID_MAX_LEAF`]),
//!    EBX, ECX, EDX = `"Moat"`, `"Moat"`, `"Moat"` ([`SIGNATURE`], [`is_moat_signature`]).
//! 2. `CPUID.0x4000_0001`: EAX = ABI version ([`ABI_VERSION`]; the DMA calls exist from
//!    version [`ABI_VERSION_DMA`] = 2), EBX = call bitmap (bit *n* set: call number *n*
//!    exists for this guest, [`Call::bit`]), ECX = hypercall instruction ([`Instruction`]:
//!    1 `VMMCALL`, 2 `VMCALL`), EDX = 0.
//! 3. A guest without an assigned device has the DMA bits (16..=23) clear, and the DMA calls
//!    return UNSUPP. A DMA driver needs the bits of [`Call::DMA_REQUIRED`].
//! 4. `DMA_QUERY` then reports the interface's parameters ([`dma::QueryHeader`]).
//!
//! ## 2. Register convention
//!
//! The guest executes the instruction from CPUID with the call number in RAX and arguments in
//! RDI, RSI, RDX, R10, R8, R9 ([`Args`], in that order). The hypervisor returns a [`Status`] in
//! RAX (0 or a negative code, [`Status::from_rax`]) and values in RDX, R8, R9 ([`Return`]).
//! The base calls (0..=3) write only RAX and RDX; the DMA calls write RAX, RDX, R8, R9 (0 for
//! values a call does not define) and preserve every other register. Argument registers a call
//! does not list are ignored. An unknown call number returns UNSUPP.
//!
//! | nr | call | RDI | RSI | RDX | returns RDX / R8 / R9 |
//! |---|---|---|---|---|---|
//! | 0 | VERSION | — | — | — | ABI version |
//! | 1 | CONSOLE_WRITE | gpa | len (≤ [`CONSOLE_MAX`]) | — | bytes written |
//! | 2 | EXIT | code | — | — | does not return |
//! | 3 | NOP | — | — | — | 0 |
//! | 16 | DMA_QUERY | buffer gpa (8-aligned) | buffer bytes | — | bytes of the full response |
//! | 17 | DMA_MAP | gpa | length | flags | IOVA |
//! | 18 | DMA_UNMAP | iova | length | 0 | bytes unmapped |
//! | 19 | DMA_MULTICALL | cursor | 0 | — | cursor / completed / stop (+ unsynced bit 8) |
//! | 20 | DMA_BATCH_REGISTER | area gpa (page-aligned) | pages (0 = unregister) | — | capacity in entries |
//! | 21 | DMA_SYNC | 0 | — | — | invalidations issued |
//! | 22 | DMA_STATS | buffer gpa (8-aligned) | buffer bytes | [`dma::StatsFlags`] | bytes written |
//! | 23 | DMA_FAULT_RING_REGISTER | ring gpa (page-aligned) | pages (0 = unregister) | vector (0 = polled) | capacity in records |
//!
//! On any error the values are 0, except MULTICALL (RDX = cursor, R9 = stop) and QUERY
//! (RDX = bytes needed).
//!
//! ## 3. The calls
//!
//! **`DMA_QUERY`** writes a [`dma::QueryHeader`] and then as many whole
//! [`dma::ReservedRegion`]s as fit (`regions_written` of `nr_regions`) into the buffer, and
//! returns in RDX the size of the full response. Errors: buffer not 8-aligned → INVAL;
//! fewer than 64 bytes → RANGE (RDX still = bytes needed); not guest RAM → FAULT.
//!
//! **`DMA_MAP`** maps `[gpa, gpa+length)` with `flags` ([`dma::DmaFlags`]) and returns the
//! IOVA the device uses for `gpa`; the mapping covers `[iova, iova+length)`. **`DMA_UNMAP`**
//! removes the mapping that starts at `iova`; `length` must be the mapping's whole length
//! (no partial unmap). Both are exactly a one-entry MULTICALL without the batch area: same
//! checks, same statuses, same policy rules (under `batched` a single UNMAP is a batch of one).
//! They run to completion (never AGAIN).
//!
//! **`DMA_BATCH_REGISTER`** registers `pages` contiguous guest pages at `gpa` (1..=
//! [`dma::MAX_BATCH_PAGES`]) as the calling vCPU's batch area, replacing its previous one;
//! `pages = 0` unregisters (NOENT if none). Returns the capacity
//! [`dma::batch_capacity`]`(pages, max_batch)`. Errors: `gpa` not page-aligned → INVAL;
//! `pages` too large → RANGE; not guest RAM → FAULT; overlaps another vCPU's batch area or the
//! fault ring → EXIST; overlaps pages currently mapped for DMA → BUSY. While registered, those
//! pages cannot be mapped (MAP → PERM). Each vCPU has its own area; a vCPU never runs another's.
//!
//! **`DMA_MULTICALL`** runs entries `cursor..count` of the calling vCPU's batch area
//! ([`dma::BatchHeader`] + [`dma::Entry`] array), in index order, and returns
//! ([`dma::MulticallReturn`]) RAX = status, RDX = the new cursor (first entry not completed),
//! R8 = entries completed by this call (`= RDX - cursor`), R9 = [`dma::MulticallStop`]:
//!
//! * `Done` (0): all ran OK; RAX = OK; RDX = `count`.
//! * `EntryFailed` (1): the entry at RDX failed with the status in RAX (also written into it);
//!   nothing after it ran. The failed entry changed nothing. To go on, resubmit with cursor
//!   RDX + 1 (skip it) or RDX (retry it, e.g. after freeing mappings on NOMEM).
//! * `Preempted` (2): RAX = AGAIN; the time budget ran out or an event is pending for the
//!   vCPU. At least one entry ran; the entry at RDX did not. Resubmit with cursor RDX.
//! * `Rejected` (3): nothing ran and nothing was written; RDX = the cursor passed in. RAX:
//!   no batch area → NOENT; RSI ≠ 0 → INVAL; header checks of [`dma::validate_batch`]
//!   (INVAL, UNSUPP, RANGE).
//!
//! R9 bit 8 (`unsynced`) may accompany `Done`, `EntryFailed` and `Preempted`: see section 4,
//! U4. Bits 9..=63 of R9 are 0.
//!
//! There is no hidden continuation state: a resubmission is an ordinary call, and the
//! hypervisor never runs an entry twice unless the guest resubmits it. The hypervisor copies
//! the header once per call and each entry once, before checking it, into its own memory; it
//! acts only on the copies, so concurrent changes to the area (another vCPU, a device) cannot
//! make it act on unchecked values. It writes back, for each entry it ran: `status`, `done`
//! and, for a MAP, `iova`. It never writes the header or entries it did not run.
//!
//! **`DMA_SYNC`** (RDI must be 0, else INVAL) completes every pending IOTLB invalidation of the
//! guest's domain (under `deferred`, the flush queue; in every policy, any invalidation an
//! earlier call reported as unconfirmed) and waits for it; RDX = invalidations issued (0 when
//! nothing was pending). BUSY: the IOMMU still did not confirm; call again.
//!
//! **`DMA_STATS`** writes a [`dma::Stats`] block. Errors: unknown flag → INVAL; buffer not
//! 8-aligned → INVAL; fewer than [`dma::STATS_SIZE`] bytes → RANGE; not guest RAM → FAULT;
//! feature [`dma::Features::STATS`] absent → UNSUPP.
//!
//! **`DMA_FAULT_RING_REGISTER`** registers `pages` (1..=[`dma::MAX_FAULT_RING_PAGES`]) guest
//! pages as the guest's fault ring (one per guest, any vCPU may register it; replaces the
//! previous one), initialises its header ([`dma::FaultRingHeader::new`]) and returns the
//! capacity [`dma::fault_ring_capacity`]. `pages = 0` unregisters (NOENT if none). RDX = 0:
//! polled only; 32..=255: that vector is injected into the registering vCPU whenever the ring
//! goes from empty to non-empty (once per batch of records the hypervisor publishes into an
//! empty ring; the guest takes it once its virtual local APIC is in x2APIC mode
//! (`IA32_APIC_BASE` EN|EXTD) and software-enabled (SVR bit 8), with the usual priorities, and
//! EOIs it through x2APIC MSR 0x80B). Errors: as BATCH_REGISTER, plus vector 1..=31 or > 255 →
//! INVAL, a vector without [`dma::Features::FAULT_IRQ`] or no [`dma::Features::FAULT_RING`] →
//! UNSUPP.
//!
//! ## 4. Status codes, and the order checks run in
//!
//! Entries (and MAP/UNMAP calls) are checked in this order; the first failure is reported and
//! leaves every piece of state (mappings, IOVAs, page tables, quotas, pins) exactly as before.
//!
//! | # | check (done by) | status |
//! |---|---|---|
//! | 1–7 | unknown op, reserved ≠ 0, unknown flag, MAP without rights / UNMAP with flags, MAP `iova` ≠ 0 / UNMAP `gpa` ≠ 0, length 0, unaligned address or length ([`dma::validate_entry`]) | INVAL |
//! | 8–10 | `address + length` overflows, length beyond the IOVA space, UNMAP end beyond `2^iova_width`, MAP longer than `max_map_pages` ([`dma::validate_entry`]) | RANGE |
//! | M1 | MAP: some page is not RAM owned by the guest (outside it, hypervisor or other guest memory, MMIO) (hypervisor) | FAULT |
//! | M2 | MAP: a page the guest may not give to a device: a registered batch area or fault ring, memory read-only to the guest while `flags` has WRITE (hypervisor) | PERM |
//! | M3 | MAP: quota of live mappings (`max_mappings`), of mapped pages, or of page-table pages (`max_pt_pages`) reached (hypervisor) | NOMEM |
//! | M4 | MAP: a page is part of a live mapping (a guest page is never mapped twice at once) (hypervisor) | EXIST |
//! | M5 | MAP: no IOVA range free, even after flushing pending invalidations (hypervisor) | NOMEM |
//! | M6 | MAP: the unit caches not-present entries (caching mode) or needs write-buffer flushing, and the IOMMU did not confirm the flush the new mapping needs; the mapping was removed again and the IOVA is held until that removal is invalidated (hypervisor) | BUSY |
//! | U1 | UNMAP: the range intersects a reserved region (MSI window, RMRR) (hypervisor) | PERM |
//! | U2 | UNMAP: no live mapping starts at `iova` (never mapped, or unmapped already) (hypervisor) | NOENT |
//! | U3 | UNMAP: the mapping at `iova` is not `length` bytes long (partial or spanning unmap) (hypervisor) | INVAL |
//! | U4 | UNMAP (strict, or batched outside a MULTICALL): the IOMMU did not confirm the invalidation in time (hypervisor) | BUSY |
//!
//! BUSY from an UNMAP (U4) is the one failure that is not a no-op, because the hardware,
//! not the request, failed: the mapping is gone from the page tables and from the guest's
//! mappings (a repeated UNMAP returns NOENT), but the device-side guarantee is not given yet;
//! the IOVA and pages stay held, and DMA_SYNC retries the invalidation (BUSY again while the
//! IOMMU still does not answer). In a MULTICALL the same situation is reported by the
//! `unsynced` bit of R9 ([`dma::MulticallReturn::unsynced`]), not by an entry status.
//!
//! BUSY from a MAP (M6) is a no-op for the guest (no mapping exists; retry later).
//!
//! AGAIN is only a MULTICALL status (preemption). BUSY otherwise refuses a registration over
//! pages mapped for DMA or whose unmap still waits for its invalidation. UNSUPP: unknown call, missing feature, unknown batch version. The
//! base calls keep their version-1 statuses.
//!
//! ## 5. IOVA lifetime per policy
//!
//! The policy is per guest, fixed by the host ([`dma::Policy`], reported by QUERY). In every
//! policy an IOVA is handed out again, and a guest frame stops being pinned for DMA, only
//! after the IOTLB invalidation covering its unmap has completed.
//!
//! * **passthrough**: all guest RAM is reachable by the guest's devices at IOVA = GPA
//!   ([`dma::Features::IOVA_IS_GPA`]). MAP and UNMAP run checks 1–10, M1 and M2 (UNMAP: on
//!   `[iova, iova+length)` as guest-physical) and keep no bookkeeping: MAP returns
//!   `iova = gpa`, UNMAP returns OK and the memory stays reachable; EXIST, NOENT, quotas and
//!   the partial-unmap check do not apply. Only isolation between guests is provided.
//! * **strict**: when an UNMAP (call or entry) has completed with OK, its IOVA range is
//!   unusable by the device: the hypervisor invalidated and waited before writing the entry's
//!   status (or returning from DMA_UNMAP).
//! * **batched**: the UNMAP entries of one MULTICALL are gathered into one invalidation and one
//!   wait, done before the call returns, whatever it returns (Done, EntryFailed, Preempted).
//!   When the MULTICALL returns (without `unsynced`), every UNMAP entry it completed is
//!   unusable by the device. A status another vCPU reads from the area before the call
//!   returns carries no guarantee. A DMA_UNMAP call is a batch of one (as strict).
//! * **deferred**: UNMAP clears the PTEs and queues the invalidation; a device may still reach
//!   the range through stale IOTLB entries until the queue is flushed. The queue is flushed at
//!   the latest when it holds `deferred_max_entries` unmaps or `deferred_max_us` microseconds
//!   after the oldest unmap in it (both from QUERY; the time bound is checked on every DMA
//!   call of the guest and by the hypervisor's timer), and on DMA_SYNC; after DMA_SYNC
//!   returns OK, every earlier UNMAP is unusable by the device.
//!
//! MAP never returns an IOVA of a mapping whose invalidation is pending, nor one inside a
//! reserved region. A guest page whose unmap is pending invalidation may be mapped again (it
//! is not live), under a new IOVA.
//!
//! ## 6. Fault ring
//!
//! The hypervisor reads and clears VT-d fault records and delivers those of the guest's domain
//! into its ring ([`dma::FaultRingHeader`], [`dma::FaultRecord`]). Producer side (hypervisor):
//! read `consumer` once; if `producer - consumer` (mod 2^32) ≥ `capacity` (full, or a corrupt
//! consumer), increment `dropped` and stop; else write the record into slot
//! `producer % capacity`, then publish `producer + 1` (release order: the record is visible
//! before the index). The hypervisor keeps its own copy of `producer` and `capacity` and never
//! reads them back. Consumer side (guest): read `producer` (acquire), read records
//! `consumer..producer`, then write `consumer = producer` (release). `dropped` is cumulative;
//! `seq` gaps show which faults were dropped. Without a ring, faults are only counted
//! (`faults` in STATS).
//!
//! ## 7. Quotas and reserved regions
//!
//! `max_mappings` bounds live mappings, `max_pt_pages` the page-table pages of the guest's
//! domain; both give NOMEM when reached, and both come back when mappings are unmapped and
//! their invalidations complete (under deferred, DMA_SYNC makes that immediate). Reserved
//! regions ([`dma::RegionKind`]) are IOVA ranges never handed out: the MSI window, RMRRs
//! (identity-mapped for firmware-required DMA) and ranges the hypervisor keeps.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[macro_use]
mod macros;

pub mod boot;
pub mod cpuid;
pub mod dma;
mod hypercall;
mod status;

pub use hypercall::{
    is_moat_signature, signature_regs, Args, Call, Instruction, Return, ABI_VERSION,
    ABI_VERSION_DMA, ARG_REGS, CALLS_ALL, CALLS_BASE, CONSOLE_MAX, CPUID_FEATURES_LEAF,
    CPUID_MAX_LEAF, CPUID_SIGNATURE_LEAF, RET_REGS, SIGNATURE,
};
pub use status::{Error, Status};
/// The byte-layout crate of every ABI structure: its traits give a structure's bytes
/// ([`IntoBytes::as_bytes`]) and a structure from bytes ([`FromBytes::read_from_bytes`]).
pub use zerocopy;
pub use zerocopy::{FromBytes, FromZeros, IntoBytes};

#[cfg(test)]
extern crate std;

#[cfg(test)]
mod tests;
