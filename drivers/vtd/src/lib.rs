//! Intel VT-d DMA remapping: register, table and descriptor formats and the unit driver.
#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod entry;
pub mod error;
pub mod gather;
pub mod hw;
pub mod paging;
pub mod regs;

#[cfg(test)]
mod testing;
