//! Intel VT-d DMA remapping: register, table and descriptor formats and the unit driver.
//!
//! Layout:
//! - [`regs`]: register offsets and typed register values (VER, CAP, ECAP, GCMD/GSTS, ...);
//! - [`entry`]: legacy root and context entries, [`SourceId`], [`PagingLevels`];
//! - [`paging`]: second-level page tables (map, unmap, translate);
//! - [`gather`]: batching unmaps into the fewest invalidations;
//! - [`inval`]: invalidation descriptors, the queue, register-based invalidation;
//! - [`fault`]: fault record decoding and counters;
//! - [`domain`]: domain ids and [`Domain`];
//! - [`unit`]: [`Unit`], one remapping unit: bring-up, attach/detach, flush, faults;
//! - [`hw`]: the traits the kernel implements ([`RegisterWindow`], [`DmaMemory`], [`Clock`]).
//!
//! The crate has no `unsafe`: every hardware access goes through the [`hw`] traits.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod domain;
pub mod entry;
pub mod error;
pub mod fault;
pub mod gather;
pub mod hw;
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
pub use unit::{Flushed, Unit, UnitConfig};

#[cfg(test)]
mod fake_unit;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod unit_tests;
