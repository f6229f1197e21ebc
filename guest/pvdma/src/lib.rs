//! Guest-side driver for the Moat paravirtual DMA interface.
//!
//! The driver makes a guest's buffers DMA-able for its assigned devices through the hypercalls
//! specified in [`moat_abi`]: it discovers the interface ([`discover`]), maps and unmaps single
//! buffers ([`PvDma::map`], [`PvDma::unmap`]) and scatter-gather lists ([`PvDma::map_sg`],
//! [`PvDma::unmap_sg`]), and batches requests in a per-vCPU batch area that is submitted with
//! one MULTICALL when it is full or on [`PvDma::flush`] / [`PvDma::sync`]. It resumes
//! multicalls the hypervisor preempted from the returned cursor, so no entry ever runs twice,
//! and reports every queued request exactly once through a completion callback. Faults can be
//! polled from the fault ring ([`PvDma::poll_faults`]).
//!
//! It is generic over [`Hypervisor`] (CPUID, one hypercall, access to the driver's own guest
//! memory): [`Native`] is the implementation for a guest (VMMCALL/VMCALL, identity-mapped
//! memory); the tests use a host-side model of the hypervisor service.
//!
//! One [`PvDma`] serves one vCPU (the batch area is per vCPU); discover once and build the
//! others with [`PvDma::new`] from the same [`Discovery`].
//!
//! No allocation: the batch lives in guest memory the caller provides, completions go to a
//! caller closure, and scatter-gather results to a caller slice.
#![no_std]
#![warn(missing_docs)]

mod discovery;
mod driver;
mod error;
mod hv;

pub use discovery::{discover, Discovery, MAX_REGIONS};
pub use driver::{
    BatchArea, Completion, FaultPoll, FaultRingArea, FlushReport, GuestBuffer, PvDma, Segment,
    Sink, Ticket,
};
pub use error::Error;
pub use hv::Hypervisor;
#[cfg(target_arch = "x86_64")]
pub use hv::Native;
pub use moat_abi;
