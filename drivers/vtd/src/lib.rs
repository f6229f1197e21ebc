//! Intel VT-d DMA remapping: register, table and descriptor formats and the unit driver.
#![no_std]
