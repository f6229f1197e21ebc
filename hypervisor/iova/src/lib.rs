//! Lock-free per-CPU magazine IOVA allocator.
#![no_std]
