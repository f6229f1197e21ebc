//! Errors: the controller's completion status decoded ([`Status`]), and everything else that
//! can go wrong ([`Error`]).

/// A non-success completion status (the status field without the phase tag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status(pub u16);

/// What a [`Status`] means, for the codes the driver tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusKind {
    /// Generic 0x01: Invalid Command Opcode.
    InvalidOpcode,
    /// Generic 0x02: Invalid Field in Command.
    InvalidField,
    /// Generic 0x04: Data Transfer Error (the device's DMA failed, e.g. an IOMMU fault).
    DataTransferError,
    /// Generic 0x06: Internal Error.
    InternalError,
    /// Generic 0x07: Command Abort Requested.
    AbortRequested,
    /// Generic 0x0B: Invalid Namespace or Format.
    InvalidNamespace,
    /// Generic 0x13: PRP Offset Invalid.
    PrpOffsetInvalid,
    /// Generic 0x80: LBA Out of Range.
    LbaOutOfRange,
    /// Generic 0x81: Capacity Exceeded.
    CapacityExceeded,
    /// Command specific 0x01: Invalid Queue Identifier.
    InvalidQueueId,
    /// Command specific 0x02: Invalid Queue Size.
    InvalidQueueSize,
    /// Media and data integrity errors (status code type 2).
    Media(u8),
    /// Path related (status code type 3).
    Path(u8),
    /// Any other code: status code type and status code.
    Other {
        /// Status code type.
        sct: u8,
        /// Status code.
        sc: u8,
    },
}

impl Status {
    /// `Ok` for a zero status field (without the phase tag), else the status.
    pub const fn check(field: u16) -> Result<(), Status> {
        if field & 0x7ff == 0 {
            Ok(())
        } else {
            Err(Status(field))
        }
    }

    /// Status code.
    pub const fn sc(self) -> u8 {
        self.0 as u8
    }

    /// Status code type.
    pub const fn sct(self) -> u8 {
        ((self.0 >> 8) & 7) as u8
    }

    /// Do Not Retry.
    pub const fn do_not_retry(self) -> bool {
        self.0 & (1 << 14) != 0
    }

    /// The decoded meaning.
    pub const fn kind(self) -> StatusKind {
        match (self.sct(), self.sc()) {
            (0, 0x01) => StatusKind::InvalidOpcode,
            (0, 0x02) => StatusKind::InvalidField,
            (0, 0x04) => StatusKind::DataTransferError,
            (0, 0x06) => StatusKind::InternalError,
            (0, 0x07) => StatusKind::AbortRequested,
            (0, 0x0b) => StatusKind::InvalidNamespace,
            (0, 0x13) => StatusKind::PrpOffsetInvalid,
            (0, 0x80) => StatusKind::LbaOutOfRange,
            (0, 0x81) => StatusKind::CapacityExceeded,
            (1, 0x01) => StatusKind::InvalidQueueId,
            (1, 0x02) => StatusKind::InvalidQueueSize,
            (2, sc) => StatusKind::Media(sc),
            (3, sc) => StatusKind::Path(sc),
            (sct, sc) => StatusKind::Other { sct, sc },
        }
    }
}

impl core::fmt::Display for Status {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{:?} (SCT {:#x} SC {:#04x}{})",
            self.kind(),
            self.sct(),
            self.sc(),
            if self.do_not_retry() { ", DNR" } else { "" }
        )
    }
}

/// What the driver waited for when its time ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wait {
    /// CSTS.RDY to clear after CC.EN was cleared (CAP.TO).
    Disable,
    /// CSTS.RDY to set after CC.EN was set (CAP.TO).
    Enable,
    /// An admin command's completion.
    Admin,
    /// An I/O command's completion.
    Io,
}

/// Why a driver operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Error {
    /// The controller completed the command with an error status.
    Controller(Status),
    /// Nothing happened within the time allowed.
    Timeout(Wait),
    /// CSTS.CFS: the controller hit a fatal error.
    Fatal,
    /// The registers read as all ones: no device decodes the BAR.
    Absent,
    /// The controller lacks something the driver needs (NVM command set, 4 KiB pages).
    Unsupported(&'static str),
    /// The paravirtual DMA driver refused a map or unmap.
    Dma(moat_pvdma::Error),
    /// The namespace does not exist or has an unsupported format.
    NoNamespace,
    /// A transfer that is empty, too large for one PRP list, or not whole blocks.
    BadTransfer,
    /// Every command slot of the queue is in use.
    QueueFull,
    /// A completion names a command that is not outstanding.
    BadCompletion,
    /// More queues than the driver or the controller supports.
    TooManyQueues,
}

impl From<moat_pvdma::Error> for Error {
    fn from(e: moat_pvdma::Error) -> Error {
        Error::Dma(e)
    }
}

impl From<Status> for Error {
    fn from(s: Status) -> Error {
        Error::Controller(s)
    }
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Controller(s) => write!(f, "controller status {s}"),
            Error::Timeout(w) => write!(f, "timed out waiting for {w:?}"),
            Error::Fatal => f.write_str("controller fatal status (CSTS.CFS)"),
            Error::Absent => f.write_str("no controller decodes the BAR"),
            Error::Unsupported(what) => write!(f, "controller lacks {what}"),
            Error::Dma(e) => write!(f, "PV DMA: {e}"),
            Error::NoNamespace => f.write_str("no usable namespace"),
            Error::BadTransfer => f.write_str("transfer size not supported"),
            Error::QueueFull => f.write_str("queue full"),
            Error::BadCompletion => f.write_str("completion for a command not outstanding"),
            Error::TooManyQueues => f.write_str("too many queues"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_decoding() {
        assert_eq!(Status::check(0), Ok(()));
        // Only the DNR/More bits set: still success (no code).
        assert_eq!(Status::check(1 << 14), Ok(()));
        let s = Status::check(0x04).unwrap_err();
        assert_eq!(s.kind(), StatusKind::DataTransferError);
        assert!(!s.do_not_retry());
        assert_eq!(Status(0x101).kind(), StatusKind::InvalidQueueId);
        assert_eq!(Status(0x102 | 1 << 14).kind(), StatusKind::InvalidQueueSize);
        assert_eq!(Status(0x281).kind(), StatusKind::Media(0x81));
        assert_eq!(Status(0x360).kind(), StatusKind::Path(0x60));
        assert_eq!(Status(0x7ff).kind(), StatusKind::Other { sct: 7, sc: 0xff });
        assert_eq!(Status(0x0b).kind(), StatusKind::InvalidNamespace);
        assert_eq!(Status(0x01).kind(), StatusKind::InvalidOpcode);
    }

    proptest::proptest! {
        #[test]
        fn every_nonzero_code_is_an_error(field in 0u16..0x8000) {
            let r = Status::check(field);
            proptest::prop_assert_eq!(r.is_ok(), field & 0x7ff == 0);
            if let Err(s) = r {
                proptest::prop_assert_eq!(s.sct(), ((field >> 8) & 7) as u8);
                proptest::prop_assert_eq!(s.sc(), field as u8);
            }
        }
    }
}
