//! Discovery (CPUID leaves), call numbers and the register convention.

use crate::status::Status;

/// CPUID leaf with the highest hypervisor leaf in EAX and [`SIGNATURE`] in EBX, ECX, EDX.
pub const CPUID_SIGNATURE_LEAF: u32 = 0x4000_0000;
/// CPUID leaf with the ABI version in EAX, the call bitmap in EBX ([`Call::bit`]) and the
/// hypercall instruction in ECX ([`Instruction`]).
pub const CPUID_FEATURES_LEAF: u32 = 0x4000_0001;
/// Highest hypervisor CPUID leaf (EAX of [`CPUID_SIGNATURE_LEAF`]).
pub const CPUID_MAX_LEAF: u32 = CPUID_FEATURES_LEAF;
/// `"MoatMoatMoat"`, EBX then ECX then EDX, each little-endian.
pub const SIGNATURE: [u8; 12] = *b"MoatMoatMoat";

/// ABI version of this crate (EAX of [`CPUID_FEATURES_LEAF`], [`Call::Version`], and
/// `abi_version` of the `DMA_QUERY` response).
///
/// Version 1: the base calls (0..=3). Version 2: adds the paravirtual DMA calls (16..=23).
/// Versions only grow by compatible additions (new calls, new feature bits, fields taken from
/// reserved space); a guest accepts any version `>=` the one it was written for and checks the
/// call bitmap for the calls it uses.
pub const ABI_VERSION: u32 = 2;
/// First ABI version with the paravirtual DMA calls.
pub const ABI_VERSION_DMA: u32 = 2;

/// The `SIGNATURE` as the three CPUID registers (EBX, ECX, EDX).
pub const fn signature_regs() -> [u32; 3] {
    let s = SIGNATURE;
    [
        u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        u32::from_le_bytes([s[4], s[5], s[6], s[7]]),
        u32::from_le_bytes([s[8], s[9], s[10], s[11]]),
    ]
}

/// Whether EBX, ECX, EDX of leaf `0x4000_0000` carry the Moat signature.
pub const fn is_moat_signature(ebx: u32, ecx: u32, edx: u32) -> bool {
    let r = signature_regs();
    r[0] == ebx && r[1] == ecx && r[2] == edx
}

abi_enum! {
    /// The hypercall instruction (ECX of [`CPUID_FEATURES_LEAF`]; `from_raw` decodes ECX).
    pub enum Instruction: u32 {
        /// `VMMCALL` (AMD SVM), bytes `0f 01 d9`.
        Vmmcall = 1,
        /// `VMCALL` (Intel VMX), bytes `0f 01 c1`.
        Vmcall = 2,
    }
}

abi_enum! {
    /// Call numbers (RAX on entry; `from_raw` decodes RAX, [`Call::ALL`] is in numeric order).
    pub enum Call: u64 {
        /// `0`: returns the ABI version in RDX.
        Version = 0,
        /// `1`: writes RSI bytes at guest-physical RDI to the console; RDX = bytes written.
        /// RANGE if RSI > [`CONSOLE_MAX`], FAULT if the bytes are not guest RAM.
        ConsoleWrite = 1,
        /// `2`: stops the calling vCPU with exit code RDI. Does not return.
        Exit = 2,
        /// `3`: does nothing (round-trip measurements).
        Nop = 3,
        /// `16`: paravirtual DMA discovery, see [`crate::dma::QueryHeader`].
        DmaQuery = 16,
        /// `17`: map one guest range for the guest's devices; the IOVA comes back in RDX.
        DmaMap = 17,
        /// `18`: unmap one mapping.
        DmaUnmap = 18,
        /// `19`: run the entries of the calling vCPU's batch area.
        DmaMulticall = 19,
        /// `20`: register (or unregister) the calling vCPU's batch area.
        DmaBatchRegister = 20,
        /// `21`: complete every pending IOTLB invalidation of the guest's domain.
        DmaSync = 21,
        /// `22`: read (and optionally reset) the guest's DMA counters.
        DmaStats = 22,
        /// `23`: register (or unregister) the guest's fault ring.
        DmaFaultRingRegister = 23,
    }
}

/// Most bytes one [`Call::ConsoleWrite`] takes.
pub const CONSOLE_MAX: u64 = 4096;

impl Call {
    /// The paravirtual DMA calls a driver needs at minimum (all but STATS and the fault ring).
    pub const DMA_REQUIRED: [Call; 6] = [
        Call::DmaQuery,
        Call::DmaMap,
        Call::DmaUnmap,
        Call::DmaMulticall,
        Call::DmaBatchRegister,
        Call::DmaSync,
    ];

    /// The number in RAX.
    #[inline]
    pub const fn number(self) -> u64 {
        self as u64
    }

    /// Decodes RAX; `None` for a number no call has (the hypervisor returns UNSUPP).
    #[inline]
    pub const fn from_number(n: u64) -> Option<Call> {
        Call::from_raw(n)
    }

    /// This call's bit in the call bitmap (EBX of [`CPUID_FEATURES_LEAF`]): bit *n* for call
    /// number *n*. A call whose bit is clear returns UNSUPP.
    #[inline]
    pub const fn bit(self) -> u32 {
        1 << self as u32
    }
}

/// Call bitmap of the base calls (ABI version 1).
pub const CALLS_BASE: u32 =
    Call::Version.bit() | Call::ConsoleWrite.bit() | Call::Exit.bit() | Call::Nop.bit();
/// Call bitmap of every call this ABI version defines (every call of [`Call::ALL`]).
pub const CALLS_ALL: u32 = {
    let mut bits = 0;
    let mut i = 0;
    while i < Call::ALL.len() {
        bits |= Call::ALL[i].bit();
        i += 1;
    }
    bits
};

/// The argument registers of a hypercall, in this order: RDI, RSI, RDX, R10, R8, R9.
///
/// Base calls use only the first three. A call ignores the argument registers it does not
/// list; arguments it lists as "must be 0" are checked (INVAL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Args(pub [u64; 6]);

/// Names of the argument registers, index-aligned with [`Args`].
pub const ARG_REGS: [&str; 6] = ["rdi", "rsi", "rdx", "r10", "r8", "r9"];
/// Names of the value registers, index-aligned with [`Return::values`].
pub const RET_REGS: [&str; 3] = ["rdx", "r8", "r9"];

impl Args {
    /// Arguments from up to six values.
    pub const fn new(a: [u64; 6]) -> Args {
        Args(a)
    }
}

/// What a hypercall returns: the status in RAX and three values in RDX, R8, R9.
///
/// The base calls write only RAX and RDX (every other register is preserved). The DMA calls
/// write RAX, RDX, R8 and R9 (values a call does not define are 0) and preserve every other
/// register. A guest's hypercall stub therefore declares RAX, RDX, R8, R9 as outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Return {
    /// RAX as returned: a [`Status`] in two's complement.
    pub rax: u64,
    /// RDX, R8, R9.
    pub values: [u64; 3],
}

impl Return {
    /// A return with `status` and values.
    pub const fn new(status: Status, values: [u64; 3]) -> Return {
        Return {
            rax: status.raw() as u64,
            values,
        }
    }

    /// A success with RDX = `value`.
    pub const fn ok(value: u64) -> Return {
        Return::new(Status::Ok, [value, 0, 0])
    }

    /// A failure (all values 0).
    pub const fn err(status: Status) -> Return {
        Return::new(status, [0, 0, 0])
    }

    /// The decoded status; `None` if RAX holds no ABI status (a broken hypervisor).
    pub const fn status(&self) -> Option<Status> {
        Status::from_rax(self.rax)
    }
}
