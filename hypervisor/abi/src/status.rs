//! Status codes: returned in RAX by every call and stored in every batch entry.

macro_rules! statuses {
    ($($(#[$doc:meta])* $name:ident = $n:literal, $text:literal;)*) => {
        /// A hypercall or batch-entry status. `0` is success, errors are small negative numbers.
        ///
        /// The numbers are ABI (they predate the DMA interface and are shared by every call).
        /// When several checks fail for one request, the status of the first failing check in
        /// the order documented for that call wins (see [`crate::dma::validate_entry`] and the
        /// crate docs' *Status codes* table).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(i64)]
        pub enum Status {
            /// Success.
            Ok = 0,
            $($(#[$doc])* $name = $n,)*
        }

        /// A status other than [`Status::Ok`]: the error half of a [`Status`], with the same
        /// variants and numbers (one list declares both). The hypervisor's DMA service
        /// (`moat-dma`) fails with it and the guest driver (`moat-pvdma`) wraps it.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(i64)]
        pub enum Error {
            $($(#[$doc])* $name = $n,)*
        }

        impl Error {
            /// Every error, in numeric order from `Inval` downwards.
            pub const ALL: [Error; [$($n),*].len()] = [$(Error::$name),*];

            /// The status this error is.
            #[inline]
            pub const fn status(self) -> Status {
                match self {
                    $(Error::$name => Status::$name,)*
                }
            }
        }

        impl Status {
            /// Every status, in numeric order from `Ok` downwards.
            pub const ALL: [Status; 1 + Error::ALL.len()] = [Status::Ok, $(Status::$name),*];

            /// The error this status is; `None` for [`Status::Ok`].
            #[inline]
            pub const fn error(self) -> Option<Error> {
                match self {
                    Status::Ok => None,
                    $(Status::$name => Some(Error::$name),)*
                }
            }

            /// Short upper-case name, as in the specification (`"NOENT"`).
            pub const fn name(self) -> &'static str {
                match self {
                    Status::Ok => "OK",
                    $(Status::$name => $text,)*
                }
            }
        }
    };
}

statuses! {
    /// Malformed request: unknown op, unknown or missing flags, a non-zero reserved field, a
    /// zero or unaligned length or address, a bad batch header.
    Inval = -1, "INVAL";
    /// Well formed but not permitted for this guest: guest memory that may not be given to a
    /// device (a registered batch area or fault ring, read-only memory with `WRITE`), an IOVA in
    /// a reserved region (MSI window, RMRR).
    Perm = -2, "PERM";
    /// No such object: `UNMAP` of an IOVA at which no live mapping starts (never mapped or
    /// already unmapped), `MULTICALL` without a registered batch area.
    Noent = -3, "NOENT";
    /// Already exists: `MAP` of guest pages that are part of a live mapping; registering an
    /// area over another registered area.
    Exist = -4, "EXIST";
    /// Out of range: an address or length that overflows 64 bits or exceeds the IOVA width,
    /// `UNMAP` whose length differs from the mapping's, a batch count above the maximum, a
    /// cursor past the count, a buffer too small.
    Range = -5, "RANGE";
    /// Out of resources: the guest's quota of mappings or page-table pages, or the IOVA space,
    /// is exhausted (after pending invalidations were flushed). The entry did nothing.
    Nomem = -6, "NOMEM";
    /// The call stopped early (time budget or a pending event) and must be resubmitted from
    /// the returned cursor. Only `MULTICALL` returns it.
    Again = -7, "AGAIN";
    /// A guest-physical address that is not RAM owned by the calling guest (outside its
    /// memory, hypervisor memory, another guest's memory, MMIO).
    Fault = -8, "FAULT";
    /// Unknown call number, a call or feature this hypervisor or this guest does not have, an
    /// unsupported structure version.
    Unsupp = -9, "UNSUPP";
    /// The pages are in use in a way that excludes the request: registering a batch area or
    /// fault ring over guest pages that are currently mapped for DMA.
    Busy = -10, "BUSY";
}

// The numbers are 0, -1, -2, ... in the order of `ALL`: `from_raw` indexes by them.
const _: () = {
    let mut i = 0;
    while i < Status::ALL.len() {
        assert!(Status::ALL[i] as i64 == -(i as i64));
        i += 1;
    }
};

impl Status {
    /// The value in RAX / in a batch entry's `status` field.
    #[inline]
    pub const fn raw(self) -> i64 {
        self as i64
    }

    /// Decodes a raw status; `None` for a value the ABI does not define.
    #[inline]
    pub const fn from_raw(raw: i64) -> Option<Status> {
        if raw > 0 || raw <= -(Status::ALL.len() as i64) {
            return None;
        }
        Some(Status::ALL[(-raw) as usize])
    }

    /// Decodes RAX as returned by the hypervisor (two's complement in a 64-bit register).
    #[inline]
    pub const fn from_rax(rax: u64) -> Option<Status> {
        Status::from_raw(rax as i64)
    }

    /// `Ok(())` for [`Status::Ok`], `Err(self)` otherwise.
    #[inline]
    pub const fn result(self) -> Result<(), Status> {
        match self {
            Status::Ok => Ok(()),
            s => Err(s),
        }
    }
}

impl core::fmt::Display for Status {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} ({})", self.name(), self.raw())
    }
}

impl Error {
    /// Short upper-case name, as in the specification (`"NOENT"`).
    pub const fn name(self) -> &'static str {
        self.status().name()
    }

    /// The value in RAX / in a batch entry's `status` field.
    #[inline]
    pub const fn raw(self) -> i64 {
        self as i64
    }
}

impl From<Error> for Status {
    #[inline]
    fn from(e: Error) -> Status {
        e.status()
    }
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.status().fmt(f)
    }
}
