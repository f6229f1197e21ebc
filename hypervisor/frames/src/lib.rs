//! Physical memory regions and the physical frame allocator.
#![no_std]
