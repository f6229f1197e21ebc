//! The driver's error type: an ABI error status ([`moat_abi::Error`], declared once in
//! `moat-abi`), or one of the driver's own.

use moat_abi::Status;

/// Why a driver operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Error {
    /// The hypervisor returned this error status (for a call, or in a batch entry). AGAIN only
    /// appears if a hypervisor returns it where the ABI does not allow it to: the driver
    /// resumes preempted multicalls itself. BUSY: the IOMMU did not confirm an invalidation
    /// (retry [`crate::PvDma::sync`]), or pages are in use by DMA.
    Status(moat_abi::Error),
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
        match s.error() {
            Some(e) => Some(Error::Status(e)),
            None => None,
        }
    }

    /// The ABI status this error stands for, if it is one.
    pub const fn status(self) -> Option<Status> {
        match self {
            Error::Status(e) => Some(e.status()),
            _ => None,
        }
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

impl From<moat_abi::Error> for Error {
    fn from(e: moat_abi::Error) -> Error {
        Error::Status(e)
    }
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Status(s) => write!(f, "hypervisor returned {s}"),
            Error::NotMoat => f.write_str("not running on Moat"),
            Error::OldAbi { version } => {
                write!(f, "Moat ABI version {version} has no DMA interface")
            }
            Error::NoDma => f.write_str("no DMA interface for this guest"),
            Error::Protocol => f.write_str("the hypervisor broke the DMA ABI"),
            Error::NoBatch => f.write_str("no batch area registered"),
            Error::BatchNotEmpty => f.write_str("the batch has unsubmitted entries"),
            Error::BufferTooSmall => f.write_str("buffer too small"),
            Error::NoFaultRing => f.write_str("no fault ring registered"),
        }
    }
}
