//! PCI configuration space: ECAM addressing, typed header fields, capability
//! lists, enumeration and BAR sizing, and the configuration filter guests see
//! (`0xCF8`/`0xCFC` ports, assigned functions only).
//!
//! Pure logic over a [`ConfigAccess`] implementation: the kernel implements it
//! with volatile MMIO over identity-mapped ECAM; tests implement it with a
//! model of configuration space. No allocation.
//!
//! ```
//! use moat_pci::{enumerate, probe_bars, ConfigAccess};
//! fn list<C: ConfigAccess>(cfg: &C) {
//!     for f in enumerate(cfg, 0, 0..=255) {
//!         // f.bdf, f.header.vendor_id, f.header.class, ...
//!         for bar in probe_bars(cfg, f.bdf).unwrap_or_default().iter() {
//!             let _ = (bar.index, bar.kind, bar.address, bar.size);
//!         }
//!     }
//! }
//! ```
#![forbid(unsafe_code)]
#![no_std]
#![deny(missing_docs)]

mod bar;
mod bdf;
mod caps;
mod config;
mod enumerate;
mod filter;
mod msi;
mod msix;

pub use bar::{probe_bars, Bar, BarKind, Bars, MAX_BARS};
pub use bdf::{
    ecam_offset, port_io_address, Bdf, Ecam, CONFIG_SPACE_SIZE, MAX_DEVICE, MAX_FUNCTION,
    PORT_IO_ADDRESS, PORT_IO_DATA,
};
pub use caps::{
    cap_id, capabilities, ext_cap_id, extended_capabilities, find_capability, Capabilities,
    Capability, ExtendedCapabilities, ExtendedCapability, MAX_CAPABILITIES,
    MAX_EXTENDED_CAPABILITIES,
};
pub use config::{
    read_command, regs, update_command, write_command, BridgeBuses, ClassCode, Command,
    ConfigAccess, Header, HeaderLayout, HeaderType, Status,
};
pub use enumerate::{enumerate, enumerate_ecam, enumerate_into, Functions, PciFunction};
pub use filter::{
    decode_address, AssignError, AssignedDevice, ConfigPort, ConfigUpdate, MsiUpdate, MsixUpdate,
    Target, GUEST_COMMAND, PORT_ADDRESS, PORT_DATA, PORT_DATA_LAST,
};
pub use msi::{msi_target, GuestMsiTarget, MsiCapability, MsiRegister, VirtualMsi};
pub use msix::{
    dwords as msix_dwords, MsixAccess, MsixCapability, MsixEntry, MsixRegion, MsixRegister,
    TableAccessError, TrappedRange, VirtualMsixControl, VirtualMsixTable, ENTRY_SIZE, MAX_VECTORS,
};
