//! PCI configuration space: ECAM access, enumeration, BAR sizing.
#![no_std]
