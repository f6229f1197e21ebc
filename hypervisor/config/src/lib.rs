//! Typed configuration parsed from the hypervisor command line.
#![no_std]
