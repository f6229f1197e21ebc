//! Why a DMA call failed. One variant per ABI status code (the kernel maps them 1:1).

use core::fmt;

/// A failed call. Nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Malformed arguments: zero or unaligned length, unknown access, a partial unmap.
    Inval,
    /// The guest may not do this (e.g. map the MSI window or a reserved region).
    Perm,
    /// No mapping starts at that IOVA.
    Noent,
    /// The guest pages are already mapped.
    Exist,
    /// Outside the guest's RAM, or the range wraps around.
    Range,
    /// Out of IOVA space, quota or page-table memory.
    Nomem,
    /// Transient: try again (e.g. the invalidation did not complete in time; state kept).
    Again,
    /// A guest address the guest does not own.
    Fault,
    /// Not supported under this policy or configuration.
    Unsupp,
    /// The IOMMU did not answer; the call may be retried.
    Busy,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Error::Inval => "invalid argument",
            Error::Perm => "not permitted",
            Error::Noent => "no such mapping",
            Error::Exist => "already mapped",
            Error::Range => "outside the guest's memory",
            Error::Nomem => "out of IOVA space, quota or table memory",
            Error::Again => "try again",
            Error::Fault => "bad guest address",
            Error::Unsupp => "not supported",
            Error::Busy => "the IOMMU is busy",
        })
    }
}
