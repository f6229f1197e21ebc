//! Parser for the ACPI DMA Remapping (DMAR) table, which describes Intel VT-d
//! remapping hardware: the units (DRHD) and the devices each one translates,
//! reserved memory regions (RMRR), ATS-capable root ports (ATSR) and more.
//!
//! Zero-copy and allocation-free: every type borrows the table's bytes. The
//! parser never reads out of bounds, never panics and always terminates on any
//! input; a malformed table is rejected with a [`DmarError`] saying what and
//! where, so the kernel can go on without remapping.
//!
//! ```
//! # fn demo(bytes: &[u8]) -> Result<(), moat_dmar::DmarError> {
//! use moat_dmar::{Dmar, NoBridges, PciFunction};
//! let dmar = Dmar::parse(bytes)?; // header + every structure and scope
//! for unit in dmar.drhds() {
//!     let _ = (unit.register_base(), unit.include_pci_all());
//! }
//! let unit = dmar.find_drhd(PciFunction::new(0, 0, 1, 0), &NoBridges);
//! # let _ = unit; Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![no_std]
#![deny(missing_docs)]

#[cfg(test)]
extern crate std;

mod bytes;
mod error;
mod lookup;
mod scope;
mod structures;
mod table;

pub use error::DmarError;
pub use lookup::{BridgeTopology, BusRange, NoBridges, PciFunction};
pub use scope::{DeviceScope, DeviceScopes, PathEntry, PathIter, ScopeType, SCOPE_HEADER_LEN};
pub use structures::{
    kind, min_length, Andd, Atsr, AtsrFlags, Drhd, DrhdFlags, RemappingStructure, Rhsa, Rmrr, Satc,
    SatcFlags, Sidp, Structures, STRUCTURE_HEADER_LEN,
};
pub use table::{Dmar, DmarFlags, Summary, HEADER_LEN, SIGNATURE};
