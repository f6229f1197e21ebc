//! The driver's error type.

use core::fmt;

use crate::entry::SourceId;

/// Which hardware operation did not complete in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// GCMD.SRTP -> GSTS.RTPS.
    SetRootTablePointer,
    /// GCMD.TE -> GSTS.TES (enable or disable).
    TranslationEnable,
    /// GCMD.QIE -> GSTS.QIES (enable or disable).
    QueuedInvalidationEnable,
    /// GCMD.WBF -> GSTS.WBFS clear.
    WriteBufferFlush,
    /// CCMD.ICC clear.
    ContextCommand,
    /// IOTLB_REG.IVT clear.
    IotlbCommand,
    /// Invalidation wait descriptor status write.
    InvalidationWait,
    /// Free space in the invalidation queue (IQH not advancing).
    InvalidationQueueSpace,
    /// The invalidation queue draining (IQH reaching IQT) before queued invalidation is
    /// turned off.
    InvalidationQueueDrain,
    /// PMEN.PRS clear.
    ProtectedMemoryDisable,
    /// GCMD.SIRTP -> GSTS.IRTPS.
    SetInterruptRemapTablePointer,
    /// GCMD.IRE -> GSTS.IRES (enable or disable).
    InterruptRemappingEnable,
    /// GCMD.CFI -> GSTS.CFIS (enable or disable).
    CompatibilityFormatInterrupts,
}

/// Errors of the VT-d driver. No operation panics on bad input; each failure is one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The unit lacks something the driver needs (the text says what).
    Unsupported(&'static str),
    /// The frame allocator returned no frame.
    NoMemory,
    /// An address or length is not 4 KiB aligned, or a length is zero.
    Misaligned,
    /// The IOVA range exceeds the domain's address width, or the physical range exceeds
    /// 52 bits.
    OutOfRange,
    /// A mapping was requested with neither READ nor WRITE.
    NoAccess,
    /// Part of the requested IOVA range is already mapped (the map was rolled back).
    AlreadyMapped {
        /// First IOVA found mapped.
        iova: u64,
    },
    /// Part of the requested IOVA range is not mapped (nothing was unmapped).
    NotMapped {
        /// First IOVA found unmapped.
        iova: u64,
    },
    /// The unmap range covers only part of a superpage (nothing was unmapped): superpages
    /// are never split implicitly; unmap the whole superpage and map the rest again.
    PartialSuperpage {
        /// Base IOVA of the superpage.
        iova: u64,
        /// Size of the superpage in bytes.
        size: u64,
    },
    /// Every domain id of the unit is in use.
    DomainIdsExhausted,
    /// The domain id is not allocated (double free or foreign id).
    UnknownDomainId(u16),
    /// The device already has a present context entry.
    AlreadyAttached(SourceId),
    /// The device is not attached to this domain.
    NotAttached(SourceId),
    /// The domain still has devices attached.
    DomainInUse {
        /// Number of devices still attached.
        devices: usize,
    },
    /// The domain or gather belongs to another unit or domain.
    WrongDomain,
    /// The unit is not enabled (or already enabled, for `enable`).
    InvalidState(&'static str),
    /// A hardware operation did not complete before the timeout.
    Timeout(Operation),
    /// The invalidation queue reported an error the driver could not recover from.
    InvalidationQueue {
        /// Index of the faulting descriptor (IQH).
        index: usize,
        /// Low 64 bits of the faulting descriptor.
        lo: u64,
        /// High 64 bits of the faulting descriptor.
        hi: u64,
    },
    /// A register-based IOTLB invalidation reported IAIG = 0 (request not performed).
    IotlbInvalidationRefused,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unsupported(what) => write!(f, "VT-d unit unsupported: {what}"),
            Self::NoMemory => f.write_str("out of frames for VT-d tables"),
            Self::Misaligned => f.write_str("address or length not 4 KiB aligned or zero"),
            Self::OutOfRange => f.write_str("address range exceeds the supported width"),
            Self::NoAccess => f.write_str("mapping without READ or WRITE"),
            Self::AlreadyMapped { iova } => write!(f, "IOVA {iova:#x} already mapped"),
            Self::NotMapped { iova } => write!(f, "IOVA {iova:#x} not mapped"),
            Self::PartialSuperpage { iova, size } => {
                write!(
                    f,
                    "partial unmap of the {size:#x}-byte superpage at {iova:#x}"
                )
            }
            Self::DomainIdsExhausted => f.write_str("no free domain id"),
            Self::UnknownDomainId(d) => write!(f, "domain id {d} not allocated"),
            Self::AlreadyAttached(s) => write!(f, "device {s} already attached"),
            Self::NotAttached(s) => write!(f, "device {s} not attached to this domain"),
            Self::DomainInUse { devices } => write!(f, "domain still has {devices} devices"),
            Self::WrongDomain => f.write_str("domain or gather belongs elsewhere"),
            Self::InvalidState(s) => write!(f, "invalid unit state: {s}"),
            Self::Timeout(op) => write!(f, "VT-d operation {op:?} timed out"),
            Self::InvalidationQueue { index, lo, hi } => {
                write!(
                    f,
                    "invalidation queue error at {index}: {hi:#018x}_{lo:016x}"
                )
            }
            Self::IotlbInvalidationRefused => f.write_str("IOTLB invalidation refused"),
        }
    }
}
