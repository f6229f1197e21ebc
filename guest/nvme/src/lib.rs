//! `moat-nvme`: a `no_std`, allocation-free NVMe driver for Moat guests.
//!
//! It resets and enables the controller (CC/CSTS within CAP.TO), runs the admin queue
//! (Identify Controller and Namespace, Number of Queues, I/O queue creation and deletion),
//! and drives one I/O queue pair per vCPU: reads and writes with PRP entries and PRP list
//! pages, completions by polling the phase tag, timeouts and controller statuses as
//! [`Error`]s. Every byte of memory the controller reaches goes through the paravirtual DMA
//! driver ([`moat_pvdma`]) in [`Mapper`]: queues are mapped once for their lifetime, data
//! buffers per I/O. A poll cycle ([`IoQueue::cycle`]) makes one call under the `batched`
//! policy: one MULTICALL that unmaps the buffers of the completions it reaped and then maps
//! the buffers of the next submission burst; the completions are reported only after it
//! returned, when their buffers are unreachable for the controller.
//!
//! The pure parts (register fields, command and completion layouts, PRP building, the
//! rings' index and phase logic, status decoding) are host-tested; the rest runs in the test
//! guest under QEMU (`cargo xtask test nvme-`).
#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]

pub mod command;
mod controller;
mod dma;
mod error;
mod io;
mod platform;
pub mod prp;
pub mod queue;
pub mod regs;

pub use controller::{
    AdminMemory, Controller, Identity, Namespace, ADMIN_ENTRIES, ADMIN_PAGES, MAX_IO_QUEUES,
};
pub use dma::{Buffer, Exchange, Mapper, MapperStats, Mode};
pub use error::{Error, Status, StatusKind, Wait};
pub use io::{
    Cycle, Done, IoQueue, QueueMemory, Request, Staged, IO_ENTRIES, MAX_DEPTH, QUEUE_PAGES,
};
#[cfg(target_arch = "x86_64")]
pub use platform::Native;
pub use platform::Platform;
