//! Intel VT-d DMA remapping: register, table and descriptor formats and the unit driver.
//!
//! Layout:
//! - [`regs`]: typed registers (offset, width, read-only / write-only / read-write; the IOTLB
//!   and fault-record registers indexed from ECAP/CAP) and register values (VER, CAP, ECAP,
//!   GCMD/GSTS, ...);
//! - [`entry`]: legacy root and context entries, [`SourceId`], [`PagingLevels`];
//! - [`paging`]: second-level page tables (map, unmap, translate);
//! - [`gather`]: batching unmaps into the fewest invalidations;
//! - [`inval`]: invalidation descriptors, the queue, register-based invalidation;
//! - [`intremap`]: interrupt remapping: IRTEs with source-id validation, MSI formats, the
//!   IRTA value, interrupt entry cache invalidation;
//! - [`fault`]: fault record decoding and counters (DMA and interrupt remapping reasons);
//! - [`fault_queue`]: drained records per consumer (domain), bounded, with drop counts;
//! - [`domain`]: domain ids and [`Domain`];
//! - [`mod@unit`]: [`Unit`], one remapping unit: bring-up, attach/detach, flush, faults;
//! - [`hw`]: the traits the kernel implements ([`RegisterWindow`], [`DmaMemory`], [`Clock`]).
//!
//! The crate has no `unsafe`: every hardware access goes through the [`hw`] traits.
//!
//! # Using it from the kernel
//!
//! One [`Unit`] per DRHD (its register base from the DMAR table). The kernel provides:
//! - a [`RegisterWindow`] doing volatile 32/64-bit accesses at `base + reg.offset()` of the
//!   unit's uncached register page(s) (the driver names typed registers from [`regs`]);
//! - a [`DmaMemory`] handing out zeroed 4 KiB frames, doing volatile loads/stores at physical
//!   addresses inside them (identity map), and `clflush` + `mfence` for `flush_cache`
//!   (QEMU reports `ECAP.C = 0`, so it is called);
//! - a [`Clock`] in nanoseconds (TSC-based, or a per-call counter as a spin budget).
//!
//! ```text
//! let mut unit = Unit::new(regs, clock, UnitConfig::new(drhd_index))?;
//! unit.enable(&mut mem)?;                          // root, SRTP, global flush, QI, TE
//! unit.configure_fault_interrupt(msi_addr, msi_data); // optional; else poll
//! let mut dom = unit.create_domain(&mut mem)?;     // domain id != 0, empty tables
//! let mut g = dom.gather();
//! for rmrr in rmrrs_of(device) {                   // before attach: no window without it
//!     dom.map_identity(&mut mem, rmrr.base, rmrr.len, Access::READ | Access::WRITE, &mut g)?;
//! }
//! unit.attach(&mut mem, &mut dom, SourceId::new(bus, dev, func))?;
//! dom.map(&mut mem, iova, phys, len, Access::READ | Access::WRITE, &mut g)?;
//! unit.flush(&mut mem, &mut g)?;                   // needed with CM=1 or RWBF; cheap else
//! dom.unmap(&mut mem, iova, len, &mut g)?;         // many unmaps ...
//! let done = unit.flush(&mut mem, &mut g)?;        // ... one flush: fewest PSIs + one wait
//! free_iovas(done.unmapped);                       // only now may IOVAs/frames be reused
//! // A failed map leaves a leaf invalidation in `g`: flush it before reusing its IOVAs.
//! // Emptied tables stay linked (reused by later maps); at teardown, after the last unmap:
//! dom.release_empty_tables(&mut mem, &mut g)?;     // no map until this gather is flushed
//! unit.flush(&mut mem, &mut g)?;
//! unit.poll_faults(16, |rec| deliver(rec));        // from the fault MSI handler or a timer
//! ```
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod domain;
pub mod entry;
pub mod error;
pub mod fault;
pub mod fault_queue;
pub mod gather;
pub mod hw;
pub mod intremap;
pub mod inval;
pub mod paging;
pub mod regs;
pub mod unit;

pub use domain::Domain;
pub use entry::{PagingLevels, SourceId};
pub use error::Error;
pub use gather::Gather;
pub use hw::{Clock, DmaMemory, PhysAddr, RegisterWindow};
pub use paging::Access;
pub use unit::{Flushed, Queued, Submitted, Unit, UnitConfig};

#[cfg(test)]
mod fake_unit;
#[cfg(test)]
mod intremap_tests;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod unit_tests;
