//! The driver's error type: one variant per ABI error status, plus the driver's own.

use moat_abi::Status;

/// Why a driver operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Error {
    /// INVAL: malformed request (unknown flag, no rights, zero or unaligned length or address,
    /// partial unmap, bad batch header).
    Inval,
    /// PERM: guest memory that may not be given to a device, or a reserved IOVA region.
    Perm,
    /// NOENT: no live mapping starts at that IOVA (never mapped or already unmapped), or no
    /// batch area/fault ring registered on the hypervisor side.
    Noent,
    /// EXIST: the guest pages are part of a live mapping.
    Exist,
    /// RANGE: overflowing or too long range, count or cursor out of range, buffer too small.
    Range,
    /// NOMEM: quota or IOVA space exhausted; the request did nothing.
    Nomem,
    /// AGAIN: preempted. The driver resumes preempted multicalls itself, so this only appears
    /// if a hypervisor returns it where the ABI does not allow it to.
    Again,
    /// FAULT: guest-physical memory the guest does not own.
    Fault,
    /// UNSUPP: the call or feature does not exist for this guest.
    Unsupp,
    /// BUSY: the IOMMU did not confirm an invalidation (retry [`crate::PvDma::sync`]), or
    /// pages are in use by DMA.
    Busy,
    /// CPUID has no Moat signature: not running on Moat.
    NotMoat,
    /// The hypervisor's ABI version predates the DMA interface.
    OldAbi {
        /// The version CPUID reported.
        version: u32,
    },
    /// The hypervisor does not offer the DMA calls to this guest (no assigned device).
    NoDma,
    /// The hypervisor broke the ABI (an undefined status, inconsistent MULTICALL registers, a
    /// malformed QUERY response or fault ring).
    Protocol,
    /// A batch operation without a registered batch area.
    NoBatch,
    /// The operation needs an empty batch (flush or sync first).
    BatchNotEmpty,
    /// A caller-supplied buffer is too small.
    BufferTooSmall,
    /// Fault polling without a registered fault ring.
    NoFaultRing,
}

impl Error {
    /// The error for a non-OK status (`None` for [`Status::Ok`]).
    pub const fn from_status(s: Status) -> Option<Error> {
        Some(match s {
            Status::Ok => return None,
            Status::Inval => Error::Inval,
            Status::Perm => Error::Perm,
            Status::Noent => Error::Noent,
            Status::Exist => Error::Exist,
            Status::Range => Error::Range,
            Status::Nomem => Error::Nomem,
            Status::Again => Error::Again,
            Status::Fault => Error::Fault,
            Status::Unsupp => Error::Unsupp,
            Status::Busy => Error::Busy,
        })
    }

    /// The ABI status this error stands for, if it is one.
    pub const fn status(self) -> Option<Status> {
        Some(match self {
            Error::Inval => Status::Inval,
            Error::Perm => Status::Perm,
            Error::Noent => Status::Noent,
            Error::Exist => Status::Exist,
            Error::Range => Status::Range,
            Error::Nomem => Status::Nomem,
            Error::Again => Status::Again,
            Error::Fault => Status::Fault,
            Error::Unsupp => Status::Unsupp,
            Error::Busy => Status::Busy,
            _ => return None,
        })
    }

    /// Decodes a raw status from RAX or an entry: `Ok(())`, the error, or
    /// [`Error::Protocol`] for a value the ABI does not define.
    pub const fn check_raw(raw: i64) -> Result<(), Error> {
        match Status::from_raw(raw) {
            None => Err(Error::Protocol),
            Some(s) => match Error::from_status(s) {
                None => Ok(()),
                Some(e) => Err(e),
            },
        }
    }
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.status() {
            Some(s) => write!(f, "hypervisor returned {s}"),
            None => match self {
                Error::NotMoat => f.write_str("not running on Moat"),
                Error::OldAbi { version } => {
                    write!(f, "Moat ABI version {version} has no DMA interface")
                }
                Error::NoDma => f.write_str("no DMA interface for this guest"),
                Error::Protocol => f.write_str("the hypervisor broke the DMA ABI"),
                Error::NoBatch => f.write_str("no batch area registered"),
                Error::BatchNotEmpty => f.write_str("the batch has unsubmitted entries"),
                Error::BufferTooSmall => f.write_str("buffer too small"),
                _ => f.write_str("no fault ring registered"),
            },
        }
    }
}
