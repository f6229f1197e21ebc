//! Remapping-unit registers (VT-d specification, chapter 11): where they are, how wide, how
//! they may be accessed, and their values as types.
//!
//! Every register is a typed descriptor [`Reg<W, A>`]: its byte offset in the unit's register
//! page(s) (as reported by the DMAR DRHD structure), its width `W` (`u32` or `u64`) and its
//! access mode `A` ([`ReadOnly`], [`WriteOnly`], [`ReadWrite`]). The [`RegisterWindow`] trait
//! only accepts descriptors, and only the matching width and mode, so a wrong access does
//! not compile. Descriptors cannot be made from a bare offset outside this module: the fixed
//! registers are the constants below, the IOTLB registers come from [`IotlbRegs::new`]
//! (at `ECAP.IRO`) and the fault recording registers from [`FaultRecordRegs::new`] (at
//! `CAP.FRO`, index below `CAP.NFR`). The values are transparent wrappers (or `bitflags`
//! types) around the raw value, with `const fn` accessors for the fields the driver uses.
//!
//! ```
//! use moat_vtd::regs::{Capability, GlobalStatus, CAP, GCMD, GSTS};
//! use moat_vtd::RegisterWindow;
//!
//! fn status<R: RegisterWindow>(r: &mut R) -> (Capability, GlobalStatus) {
//!     r.write32(GCMD, 0);
//!     (Capability(r.read64(CAP)), GlobalStatus::from_bits_retain(r.read32(GSTS)))
//! }
//! ```
//!
//! A write to the read-only GSTS does not compile:
//!
//! ```compile_fail,E0277
//! fn bad<R: moat_vtd::RegisterWindow>(r: &mut R) {
//!     r.write32(moat_vtd::regs::GSTS, 0);
//! }
//! ```
//!
//! Nor a read of the write-only GCMD:
//!
//! ```compile_fail,E0277
//! fn bad<R: moat_vtd::RegisterWindow>(r: &mut R) -> u32 {
//!     r.read32(moat_vtd::regs::GCMD)
//! }
//! ```
//!
//! Nor a 32-bit read of the 64-bit CAP:
//!
//! ```compile_fail,E0308
//! fn bad<R: moat_vtd::RegisterWindow>(r: &mut R) -> u32 {
//!     r.read32(moat_vtd::regs::CAP)
//! }
//! ```
//!
//! Nor a register made up from an offset:
//!
//! ```compile_fail,E0451
//! use moat_vtd::regs::{ReadWrite, Reg};
//! fn bad<R: moat_vtd::RegisterWindow>(r: &mut R) -> u32 {
//!     let gsts: Reg<u32, ReadWrite> = Reg { offset: 0x1c, kind: core::marker::PhantomData };
//!     r.read32(gsts)
//! }
//! ```
//!
//! (rustdoc checks the error codes only on nightly; the reasons were checked by hand.)
//!
//! [`RegisterWindow`]: crate::RegisterWindow

use core::fmt;
use core::marker::PhantomData;

use bitflags::bitflags;

use crate::hw::PhysAddr;

/// Byte offsets of the fixed registers (the raw layout behind the typed descriptors).
pub mod offset {
    /// Version register (32-bit).
    pub const VER: usize = 0x00;
    /// Capability register (64-bit).
    pub const CAP: usize = 0x08;
    /// Extended capability register (64-bit).
    pub const ECAP: usize = 0x10;
    /// Global command register (32-bit, write only).
    pub const GCMD: usize = 0x18;
    /// Global status register (32-bit, read only).
    pub const GSTS: usize = 0x1c;
    /// Root table address register (64-bit).
    pub const RTADDR: usize = 0x20;
    /// Context command register (64-bit).
    pub const CCMD: usize = 0x28;
    /// Fault status register (32-bit).
    pub const FSTS: usize = 0x34;
    /// Fault event control register (32-bit).
    pub const FECTL: usize = 0x38;
    /// Fault event data register (32-bit).
    pub const FEDATA: usize = 0x3c;
    /// Fault event address register (32-bit).
    pub const FEADDR: usize = 0x40;
    /// Fault event upper address register (32-bit).
    pub const FEUADDR: usize = 0x44;
    /// Protected memory enable register (32-bit).
    pub const PMEN: usize = 0x64;
    /// Invalidation queue head register (64-bit).
    pub const IQH: usize = 0x80;
    /// Invalidation queue tail register (64-bit).
    pub const IQT: usize = 0x88;
    /// Invalidation queue address register (64-bit).
    pub const IQA: usize = 0x90;
    /// Invalidation completion status register (32-bit).
    pub const ICS: usize = 0x9c;
    /// Invalidation queue error record register (64-bit).
    pub const IQERCD: usize = 0xb0;
    /// Interrupt remapping table address register (64-bit).
    pub const IRTA: usize = 0xb8;
    /// Offset of the IVA register inside the IOTLB register block (at `ECAP.IRO`).
    pub const IVA_IN_IOTLB_BLOCK: usize = 0x0;
    /// Offset of the IOTLB invalidate register inside the IOTLB register block.
    pub const IOTLB_IN_IOTLB_BLOCK: usize = 0x8;
    /// Size in bytes of one fault recording register (at `CAP.FRO`).
    pub const FAULT_RECORD_LEN: usize = 16;
}

mod sealed {
    pub trait Mode {}
    pub trait Width {}
}

/// Access mode: the register may only be read.
#[derive(Debug)]
pub enum ReadOnly {}
/// Access mode: the register may only be written (reads return nothing meaningful).
#[derive(Debug)]
pub enum WriteOnly {}
/// Access mode: the register may be read and written.
#[derive(Debug)]
pub enum ReadWrite {}

/// Access modes that allow reads ([`ReadOnly`], [`ReadWrite`]).
pub trait Readable: sealed::Mode {}
/// Access modes that allow writes ([`WriteOnly`], [`ReadWrite`]).
pub trait Writable: sealed::Mode {}

impl sealed::Mode for ReadOnly {}
impl sealed::Mode for WriteOnly {}
impl sealed::Mode for ReadWrite {}
impl Readable for ReadOnly {}
impl Readable for ReadWrite {}
impl Writable for WriteOnly {}
impl Writable for ReadWrite {}

/// Register widths: `u32` and `u64` (one access of that size).
pub trait Width: sealed::Width + Copy {}
impl sealed::Width for u32 {}
impl sealed::Width for u64 {}
impl Width for u32 {}
impl Width for u64 {}

/// One register of a remapping unit: byte offset in the register window, width `W`, access
/// mode `A`. Only this module makes them (see the module documentation).
pub struct Reg<W: Width, A: sealed::Mode> {
    offset: usize,
    kind: PhantomData<fn() -> (W, A)>,
}

impl<W: Width, A: sealed::Mode> Reg<W, A> {
    const fn at(offset: usize) -> Self {
        Self {
            offset,
            kind: PhantomData,
        }
    }
    /// Byte offset from the unit's register base (naturally aligned for `W`).
    pub const fn offset(self) -> usize {
        self.offset
    }
}

impl<W: Width, A: sealed::Mode> Clone for Reg<W, A> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<W: Width, A: sealed::Mode> Copy for Reg<W, A> {}
impl<W: Width, A: sealed::Mode> PartialEq for Reg<W, A> {
    fn eq(&self, other: &Self) -> bool {
        self.offset == other.offset
    }
}
impl<W: Width, A: sealed::Mode> Eq for Reg<W, A> {}
impl<W: Width, A: sealed::Mode> fmt::Debug for Reg<W, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Reg<{}, {}>({:#x})",
            core::any::type_name::<W>(),
            core::any::type_name::<A>()
                .rsplit("::")
                .next()
                .unwrap_or(""),
            self.offset
        )
    }
}

/// Version register (`VER_REG`, [`Version`]).
pub const VER: Reg<u32, ReadOnly> = Reg::at(offset::VER);
/// Capability register (`CAP_REG`, [`Capability`]).
pub const CAP: Reg<u64, ReadOnly> = Reg::at(offset::CAP);
/// Extended capability register (`ECAP_REG`, [`ExtCapability`]).
pub const ECAP: Reg<u64, ReadOnly> = Reg::at(offset::ECAP);
/// Global command register (`GCMD_REG`, [`GlobalCommand`]; see [`gcmd_value`]).
pub const GCMD: Reg<u32, WriteOnly> = Reg::at(offset::GCMD);
/// Global status register (`GSTS_REG`, [`GlobalStatus`]).
pub const GSTS: Reg<u32, ReadOnly> = Reg::at(offset::GSTS);
/// Root table address register (`RTADDR_REG`, see [`rtaddr_legacy`]).
pub const RTADDR: Reg<u64, ReadWrite> = Reg::at(offset::RTADDR);
/// Context command register (`CCMD_REG`, see [`ccmd`]).
pub const CCMD: Reg<u64, ReadWrite> = Reg::at(offset::CCMD);
/// Fault status register (`FSTS_REG`, [`FaultStatus`]; error bits write-1-to-clear).
pub const FSTS: Reg<u32, ReadWrite> = Reg::at(offset::FSTS);
/// Fault event control register (`FECTL_REG`, [`FaultEventControl`]).
pub const FECTL: Reg<u32, ReadWrite> = Reg::at(offset::FECTL);
/// Fault event data register (`FEDATA_REG`: the MSI data).
pub const FEDATA: Reg<u32, ReadWrite> = Reg::at(offset::FEDATA);
/// Fault event address register (`FEADDR_REG`: low half of the MSI address).
pub const FEADDR: Reg<u32, ReadWrite> = Reg::at(offset::FEADDR);
/// Fault event upper address register (`FEUADDR_REG`: high half of the MSI address).
pub const FEUADDR: Reg<u32, ReadWrite> = Reg::at(offset::FEUADDR);
/// Protected memory enable register (`PMEN_REG`, [`ProtectedMemoryEnable`]).
pub const PMEN: Reg<u32, ReadWrite> = Reg::at(offset::PMEN);
/// Invalidation queue head register (`IQH_REG`, see [`queue_index`]).
pub const IQH: Reg<u64, ReadOnly> = Reg::at(offset::IQH);
/// Invalidation queue tail register (`IQT_REG`, see [`queue_pointer`]).
pub const IQT: Reg<u64, ReadWrite> = Reg::at(offset::IQT);
/// Invalidation queue address register (`IQA_REG`, see [`iqa_value`]).
pub const IQA: Reg<u64, ReadWrite> = Reg::at(offset::IQA);
/// Invalidation completion status register (`ICS_REG`, [`ICS_IWC`] write-1-to-clear).
pub const ICS: Reg<u32, ReadWrite> = Reg::at(offset::ICS);
/// Invalidation queue error record register (`IQERCD_REG`).
pub const IQERCD: Reg<u64, ReadOnly> = Reg::at(offset::IQERCD);
/// Interrupt remapping table address register (`IRTA_REG`, see
/// [`crate::intremap::irta_value`]).
pub const IRTA: Reg<u64, ReadWrite> = Reg::at(offset::IRTA);

/// The IOTLB registers of a unit, at the offset `ECAP.IRO` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IotlbRegs {
    base: usize,
}

impl IotlbRegs {
    /// The IOTLB register block of a unit with extended capabilities `ecap`.
    pub const fn new(ecap: ExtCapability) -> Self {
        Self {
            base: ecap.iotlb_register_offset(),
        }
    }
    /// Invalidate address register (`IVA_REG`, write only): see
    /// [`IotlbGranularity::address_word`].
    pub const fn iva(self) -> Reg<u64, WriteOnly> {
        Reg::at(self.base + offset::IVA_IN_IOTLB_BLOCK)
    }
    /// IOTLB invalidate register (`IOTLB_REG`): see [`iotlb_reg`].
    pub const fn iotlb(self) -> Reg<u64, ReadWrite> {
        Reg::at(self.base + offset::IOTLB_IN_IOTLB_BLOCK)
    }
}

/// One 128-bit fault recording register (`FRCD_REG`), at `CAP.FRO + 16 * index`, read as a
/// qword and two dwords (see [`frcd`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRecordRegs {
    base: usize,
}

impl FaultRecordRegs {
    /// Fault record `index` of a unit with capabilities `cap`; `None` unless
    /// `index < CAP.NFR`.
    pub const fn new(cap: Capability, index: usize) -> Option<Self> {
        if index >= cap.num_fault_records() {
            return None;
        }
        Some(Self {
            base: cap.fault_record_offset() + index * offset::FAULT_RECORD_LEN,
        })
    }
    /// Bits 63:0: fault information (the faulting page address in 63:12).
    pub const fn info(self) -> Reg<u64, ReadOnly> {
        Reg::at(self.base)
    }
    /// Bits 95:64: the source id (79:64).
    pub const fn source(self) -> Reg<u32, ReadOnly> {
        Reg::at(self.base + frcd::SID_DWORD)
    }
    /// Bits 127:96: F ([`frcd::F`], write 1 to clear), T ([`frcd::T`]) and the reason
    /// (103:96).
    pub const fn status(self) -> Reg<u32, ReadWrite> {
        Reg::at(self.base + frcd::HIGH_DWORD)
    }
}

/// Version register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct Version(pub u32);

impl Version {
    /// Major version number.
    pub const fn major(self) -> u8 {
        ((self.0 >> 4) & 0xf) as u8
    }
    /// Minor version number.
    pub const fn minor(self) -> u8 {
        (self.0 & 0xf) as u8
    }
}

const fn bits64(v: u64, lo: u32, width: u32) -> u64 {
    (v >> lo) & ((1u64 << width) - 1)
}

/// Capability register (`CAP_REG`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct Capability(pub u64);

impl Capability {
    /// ND (2:0): encoded number of domain ids.
    pub const fn nd(self) -> u8 {
        bits64(self.0, 0, 3) as u8
    }
    /// Width in bits of the domain-id space: `4 + 2 * ND` (ND values above 6 are reserved
    /// and treated as 6, i.e. 16 bits).
    pub const fn domain_id_bits(self) -> u32 {
        let nd = if self.nd() > 6 { 6 } else { self.nd() as u32 };
        4 + 2 * nd
    }
    /// Number of domain ids the unit supports (including the reserved id 0).
    pub const fn num_domains(self) -> u32 {
        1 << self.domain_id_bits()
    }
    /// AFL (3): advanced fault logging.
    pub const fn afl(self) -> bool {
        self.0 & (1 << 3) != 0
    }
    /// RWBF (4): software must flush the write buffer after table updates.
    pub const fn rwbf(self) -> bool {
        self.0 & (1 << 4) != 0
    }
    /// PLMR (5): protected low-memory region supported.
    pub const fn plmr(self) -> bool {
        self.0 & (1 << 5) != 0
    }
    /// PHMR (6): protected high-memory region supported.
    pub const fn phmr(self) -> bool {
        self.0 & (1 << 6) != 0
    }
    /// CM (7): caching mode; not-present and erroneous entries may be cached, so a
    /// not-present -> present change needs an invalidation.
    pub const fn caching_mode(self) -> bool {
        self.0 & (1 << 7) != 0
    }
    /// SAGAW (12:8): supported adjusted guest address widths (bit 1: 39-bit 3-level,
    /// bit 2: 48-bit 4-level, bit 3: 57-bit 5-level).
    pub const fn sagaw(self) -> u8 {
        bits64(self.0, 8, 5) as u8
    }
    /// Whether SAGAW advertises second-level tables with `levels` levels (3, 4 or 5).
    pub const fn supports_levels(self, levels: u8) -> bool {
        if levels < 2 || levels > 5 {
            return false;
        }
        self.sagaw() & (1 << (levels - 2)) != 0
    }
    /// MGAW (21:16) decoded: maximum guest address width in bits (field + 1).
    pub const fn mgaw(self) -> u32 {
        bits64(self.0, 16, 6) as u32 + 1
    }
    /// ZLR (22): zero-length reads supported.
    pub const fn zlr(self) -> bool {
        self.0 & (1 << 22) != 0
    }
    /// FRO (33:24) decoded: byte offset of the first fault recording register.
    pub const fn fault_record_offset(self) -> usize {
        (bits64(self.0, 24, 10) as usize) * 16
    }
    /// SLLPS (37:34): second-level large page support bits (bit 0: 2 MiB, bit 1: 1 GiB).
    pub const fn sllps(self) -> u8 {
        bits64(self.0, 34, 4) as u8
    }
    /// 2 MiB second-level superpages supported.
    pub const fn superpage_2m(self) -> bool {
        self.sllps() & 1 != 0
    }
    /// 1 GiB second-level superpages supported.
    pub const fn superpage_1g(self) -> bool {
        self.sllps() & 2 != 0
    }
    /// PSI (39): page-selective IOTLB invalidation supported.
    pub const fn psi(self) -> bool {
        self.0 & (1 << 39) != 0
    }
    /// NFR (47:40) decoded: number of fault recording registers (field + 1).
    pub const fn num_fault_records(self) -> usize {
        bits64(self.0, 40, 8) as usize + 1
    }
    /// MAMV (53:48): maximum address mask value for page-selective invalidation.
    pub const fn mamv(self) -> u8 {
        bits64(self.0, 48, 6) as u8
    }
    /// DWD (54): write draining supported.
    pub const fn dwd(self) -> bool {
        self.0 & (1 << 54) != 0
    }
    /// DRD (55): read draining supported.
    pub const fn drd(self) -> bool {
        self.0 & (1 << 55) != 0
    }
    /// FL1GP (56): first-level 1 GiB pages supported.
    pub const fn fl1gp(self) -> bool {
        self.0 & (1 << 56) != 0
    }
    /// PI (59): posted interrupts supported.
    pub const fn posted_interrupts(self) -> bool {
        self.0 & (1 << 59) != 0
    }
    /// ESRTPS (63): SRTP also invalidates all caches (absent in QEMU 7.2).
    pub const fn esrtps(self) -> bool {
        self.0 & (1 << 63) != 0
    }
}

/// Extended capability register (`ECAP_REG`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct ExtCapability(pub u64);

impl ExtCapability {
    /// C (0): page-walk coherency. When clear, software must flush table writes out of
    /// the CPU caches (`clflush`) before hardware may see them.
    pub const fn coherent(self) -> bool {
        self.0 & 1 != 0
    }
    /// QI (1): queued invalidation supported.
    pub const fn queued_invalidation(self) -> bool {
        self.0 & (1 << 1) != 0
    }
    /// DT (2): device-TLB supported.
    pub const fn device_tlb(self) -> bool {
        self.0 & (1 << 2) != 0
    }
    /// IR (3): interrupt remapping supported.
    pub const fn interrupt_remapping(self) -> bool {
        self.0 & (1 << 3) != 0
    }
    /// EIM (4): extended interrupt mode (x2APIC) supported.
    pub const fn eim(self) -> bool {
        self.0 & (1 << 4) != 0
    }
    /// PT (6): pass-through translation type supported.
    pub const fn pass_through(self) -> bool {
        self.0 & (1 << 6) != 0
    }
    /// SC (7): snoop control; bit 11 of second-level leaf entries (SNP) is only defined
    /// when set (reserved otherwise).
    pub const fn snoop_control(self) -> bool {
        self.0 & (1 << 7) != 0
    }
    /// IRO (17:8) decoded: byte offset of the IOTLB register block.
    pub const fn iotlb_register_offset(self) -> usize {
        (bits64(self.0, 8, 10) as usize) * 16
    }
    /// MHMV (23:20): maximum handle mask value for interrupt-entry-cache invalidation.
    pub const fn mhmv(self) -> u8 {
        bits64(self.0, 20, 4) as u8
    }
    /// SMTS (43): scalable-mode translation supported (this driver uses legacy mode).
    pub const fn scalable_mode(self) -> bool {
        self.0 & (1 << 43) != 0
    }
}

bitflags! {
    /// Global command register bits (`GCMD_REG`).
    ///
    /// TE, EAFL, QIE, IRE and CFI are *persistent* commands: their state is reflected in
    /// [`GlobalStatus`] and every write must carry the current state of all of them, or the
    /// write turns the others off. SRTP, SFL, WBF and SIRTP are *one-shot* commands.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct GlobalCommand: u32 {
        /// Translation enable (persistent).
        const TE = 1 << 31;
        /// Set root table pointer (one-shot).
        const SRTP = 1 << 30;
        /// Set fault log (one-shot).
        const SFL = 1 << 29;
        /// Enable advanced fault logging (persistent).
        const EAFL = 1 << 28;
        /// Write buffer flush (one-shot).
        const WBF = 1 << 27;
        /// Queued invalidation enable (persistent).
        const QIE = 1 << 26;
        /// Interrupt remapping enable (persistent).
        const IRE = 1 << 25;
        /// Set interrupt remap table pointer (one-shot).
        const SIRTP = 1 << 24;
        /// Compatibility format interrupts (persistent).
        const CFI = 1 << 23;
    }
}

bitflags! {
    /// Global status register bits (`GSTS_REG`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct GlobalStatus: u32 {
        /// Translation enabled.
        const TES = 1 << 31;
        /// Root table pointer latched.
        const RTPS = 1 << 30;
        /// Fault log pointer latched.
        const FLS = 1 << 29;
        /// Advanced fault logging enabled.
        const AFLS = 1 << 28;
        /// Write buffer flush still in progress (hardware clears it when done).
        const WBFS = 1 << 27;
        /// Queued invalidation enabled.
        const QIES = 1 << 26;
        /// Interrupt remapping enabled.
        const IRES = 1 << 25;
        /// Interrupt remap table pointer latched.
        const IRTPS = 1 << 24;
        /// Compatibility format interrupts.
        const CFIS = 1 << 23;
    }
}

/// Mask of the GSTS bits that mirror persistent GCMD commands (`GSTS & 0x96FF_FFFF`):
/// everything except the one-shot status bits RTPS, FLS, WBFS and IRTPS.
pub const GSTS_PERSISTENT_MASK: u32 = 0x96ff_ffff;

/// The value to write to GCMD to issue `set` (and keep everything else as it is) or to
/// turn `set` off (`enable == false`), given the current raw GSTS value.
///
/// One-shot status bits are masked out of `gsts` so they are never re-issued.
pub const fn gcmd_value(gsts: u32, cmd: GlobalCommand, enable: bool) -> u32 {
    let base = gsts & GSTS_PERSISTENT_MASK;
    if enable {
        base | cmd.bits()
    } else {
        base & !cmd.bits()
    }
}

/// Root table address register value (legacy translation table mode).
pub const fn rtaddr_legacy(root_table: PhysAddr) -> u64 {
    root_table.as_u64() & !0xfff
}

/// Granularity of a context-cache invalidation (register or descriptor encoding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextGranularity {
    /// Every context entry of the unit.
    Global,
    /// Every context entry tagged with a domain id.
    Domain(u16),
    /// One device: domain id, source id and function mask (0..=3).
    Device {
        /// Domain id the entry was tagged with.
        did: u16,
        /// Source id (bus:dev.fn) of the device.
        sid: u16,
        /// Function mask: how many low bits of the function number are ignored.
        fm: u8,
    },
}

impl ContextGranularity {
    /// The 2-bit granularity code (1 global, 2 domain, 3 device).
    pub const fn code(self) -> u64 {
        match self {
            Self::Global => 1,
            Self::Domain(_) => 2,
            Self::Device { .. } => 3,
        }
    }
    const fn did(self) -> u16 {
        match self {
            Self::Global => 0,
            Self::Domain(d) => d,
            Self::Device { did, .. } => did,
        }
    }
    const fn sid_fm(self) -> (u16, u8) {
        match self {
            Self::Device { sid, fm, .. } => (sid, fm & 3),
            _ => (0, 0),
        }
    }
}

/// Context command register (`CCMD_REG`) helpers.
pub mod ccmd {
    use super::ContextGranularity;
    /// ICC (63): invalidate context cache; hardware clears it when the invalidation is done.
    pub const ICC: u64 = 1 << 63;

    /// CCMD value that starts a context-cache invalidation of the given granularity.
    pub const fn encode(g: ContextGranularity) -> u64 {
        let (sid, fm) = g.sid_fm();
        ICC | (g.code() << 61) | ((fm as u64) << 32) | ((sid as u64) << 16) | g.did() as u64
    }
    /// CAIG (60:59): the granularity actually performed.
    pub const fn actual_granularity(v: u64) -> u8 {
        ((v >> 59) & 3) as u8
    }
}

/// Granularity of an IOTLB invalidation (register or descriptor encoding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IotlbGranularity {
    /// Every IOTLB entry of the unit.
    Global,
    /// Every entry of a domain.
    Domain(u16),
    /// A naturally aligned block of `2^am` pages of a domain.
    Page {
        /// Domain id.
        did: u16,
        /// Page-aligned IOVA of the block (aligned to `2^am` pages).
        addr: u64,
        /// Address mask: log2 of the number of 4 KiB pages covered.
        am: u8,
        /// Invalidation hint: only leaf entries changed, paging-structure caches may stay.
        ih: bool,
    },
}

impl IotlbGranularity {
    /// The 2-bit granularity code (1 global, 2 domain, 3 page).
    pub const fn code(self) -> u64 {
        match self {
            Self::Global => 1,
            Self::Domain(_) => 2,
            Self::Page { .. } => 3,
        }
    }
    /// Domain id the invalidation is tagged with (0 for global).
    pub const fn did(self) -> u16 {
        match self {
            Self::Global => 0,
            Self::Domain(d) => d,
            Self::Page { did, .. } => did,
        }
    }
    /// The address/mask/hint word (IVA register and high half of the descriptor).
    pub const fn address_word(self) -> u64 {
        match self {
            Self::Page { addr, am, ih, .. } => {
                (addr & !0xfff) | ((ih as u64) << 6) | (am as u64 & 0x3f)
            }
            _ => 0,
        }
    }
}

/// IOTLB invalidate register (`IOTLB_REG`, at `ECAP.IRO + 8`) helpers.
pub mod iotlb_reg {
    use super::IotlbGranularity;
    /// IVT (63): invalidate IOTLB; hardware clears it when the invalidation is done.
    pub const IVT: u64 = 1 << 63;
    /// DR (49): drain reads.
    pub const DR: u64 = 1 << 49;
    /// DW (48): drain writes.
    pub const DW: u64 = 1 << 48;

    /// IOTLB_REG value for an invalidation of granularity `g`.
    pub const fn encode(g: IotlbGranularity, drain_reads: bool, drain_writes: bool) -> u64 {
        let mut v = IVT | (g.code() << 60) | ((g.did() as u64) << 32);
        if drain_reads {
            v |= DR;
        }
        if drain_writes {
            v |= DW;
        }
        v
    }
    /// IAIG (58:57): the granularity actually performed (0 means the request failed).
    pub const fn actual_granularity(v: u64) -> u8 {
        ((v >> 57) & 3) as u8
    }
}

bitflags! {
    /// Fault status register bits (`FSTS_REG`). All bits but PPF and FRI are
    /// write-1-to-clear.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct FaultStatus: u32 {
        /// Primary fault overflow: a fault arrived while every record was full.
        const PFO = 1 << 0;
        /// Primary pending fault: at least one fault record has F set (read only).
        const PPF = 1 << 1;
        /// Advanced fault overflow.
        const AFO = 1 << 2;
        /// Advanced pending fault.
        const APF = 1 << 3;
        /// Invalidation queue error: hardware stopped at a bad descriptor (IQH).
        const IQE = 1 << 4;
        /// Invalidation completion error (device-TLB).
        const ICE = 1 << 5;
        /// Invalidation time-out error (device-TLB).
        const ITE = 1 << 6;
        /// Fault record index (15:8), kept so `from_bits_retain` round-trips.
        const FRI_MASK = 0xff << 8;
    }
}

impl FaultStatus {
    /// FRI (15:8): index of the first fault record to look at.
    pub const fn fault_record_index(self) -> usize {
        ((self.bits() >> 8) & 0xff) as usize
    }
    /// The write-1-to-clear error bits.
    pub const W1C: Self = Self::PFO
        .union(Self::AFO)
        .union(Self::APF)
        .union(Self::IQE)
        .union(Self::ICE)
        .union(Self::ITE);
}

bitflags! {
    /// Fault event control register (`FECTL_REG`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct FaultEventControl: u32 {
        /// Interrupt mask: no fault event interrupt is sent while set.
        const IM = 1 << 31;
        /// Interrupt pending (read only).
        const IP = 1 << 30;
    }
}

bitflags! {
    /// Protected memory enable register (`PMEN_REG`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct ProtectedMemoryEnable: u32 {
        /// Enable protected memory regions.
        const EPM = 1 << 31;
        /// Protected region status (read only).
        const PRS = 1 << 0;
    }
}

/// Invalidation queue address register value: base (4 KiB aligned), 128-bit descriptors,
/// queue size `2^qs` pages (`2^(qs + 8)` descriptors).
pub const fn iqa_value(base: PhysAddr, qs: u8) -> u64 {
    (base.as_u64() & !0xfff) | (qs as u64 & 7)
}

/// IQH/IQT register value for descriptor index `index` (128-bit descriptors).
pub const fn queue_pointer(index: usize) -> u64 {
    (index as u64) << 4
}

/// Descriptor index from an IQH/IQT register value (128-bit descriptors, bits 18:4).
pub const fn queue_index(reg: u64) -> usize {
    ((reg >> 4) & 0x7fff) as usize
}

/// Invalidation completion status register: IWC (0), write 1 to clear.
pub const ICS_IWC: u32 = 1;

/// Fault recording register bits (128 bits, read as four dwords or two qwords).
pub mod frcd {
    /// Byte offset inside a record of the dword holding F, T and the reason.
    pub const HIGH_DWORD: usize = 12;
    /// Byte offset inside a record of the dword holding the source id.
    pub const SID_DWORD: usize = 8;
    /// F (127, bit 31 of the high dword): fault recorded; write 1 to clear.
    pub const F: u32 = 1 << 31;
    /// T (126, bit 30 of the high dword): 0 = write request, 1 = read request.
    pub const T: u32 = 1 << 30;
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU_CAP: Capability = Capability(0xd2_008c_2226_0206);
    const QEMU_ECAP: ExtCapability = ExtCapability(0xf0_0f4a);

    #[test]
    fn qemu_7_2_capability_decodes() {
        let c = QEMU_CAP;
        assert_eq!(c.nd(), 6);
        assert_eq!(c.domain_id_bits(), 16);
        assert_eq!(c.num_domains(), 65536);
        assert!(!c.rwbf());
        assert!(!c.caching_mode());
        assert_eq!(c.sagaw(), 0b010);
        assert!(c.supports_levels(3));
        assert!(!c.supports_levels(4));
        assert!(!c.supports_levels(9));
        assert_eq!(c.mgaw(), 39);
        assert!(!c.zlr());
        assert_eq!(c.fault_record_offset(), 0x220);
        assert!(c.superpage_2m());
        assert!(c.superpage_1g());
        assert!(c.psi());
        assert_eq!(c.num_fault_records(), 1);
        assert_eq!(c.mamv(), 18);
        assert!(c.dwd());
        assert!(c.drd());
        assert!(!c.esrtps());
    }

    #[test]
    fn qemu_7_2_ext_capability_decodes() {
        let e = QEMU_ECAP;
        assert!(!e.coherent());
        assert!(e.queued_invalidation());
        assert!(!e.device_tlb());
        assert!(e.interrupt_remapping());
        assert!(!e.eim());
        assert!(e.pass_through());
        assert!(!e.snoop_control());
        assert_eq!(e.iotlb_register_offset(), 0xf0);
        assert_eq!(e.mhmv(), 0xf);
        assert!(!e.scalable_mode());
    }

    #[test]
    fn indexed_registers_follow_iro_fro_and_nfr() {
        let iotlb = IotlbRegs::new(QEMU_ECAP);
        assert_eq!(iotlb.iva().offset(), 0xf0);
        assert_eq!(iotlb.iotlb().offset(), 0xf8);
        let r = FaultRecordRegs::new(QEMU_CAP, 0).unwrap();
        assert_eq!(r.info().offset(), 0x220);
        assert_eq!(r.source().offset(), 0x228);
        assert_eq!(r.status().offset(), 0x22c);
        assert_eq!(
            FaultRecordRegs::new(QEMU_CAP, 1),
            None,
            "QEMU has one record"
        );
        // NFR = 8: records 0..8 at FRO + 16 * i, none past them.
        let cap = Capability(QEMU_CAP.0 | (7 << 40));
        assert_eq!(
            FaultRecordRegs::new(cap, 7).unwrap().status().offset(),
            0x220 + 7 * 16 + 12
        );
        assert_eq!(FaultRecordRegs::new(cap, 8), None);
        assert_eq!(GSTS.offset(), 0x1c);
        assert_eq!(std::format!("{GSTS:?}"), "Reg<u32, ReadOnly>(0x1c)");
    }

    #[test]
    fn gcmd_carries_persistent_and_drops_one_shot_bits() {
        let gsts = (GlobalStatus::QIES | GlobalStatus::RTPS | GlobalStatus::WBFS).bits();
        let v = gcmd_value(gsts, GlobalCommand::TE, true);
        assert_eq!(v, (GlobalCommand::TE | GlobalCommand::QIE).bits());
        let v = gcmd_value(v, GlobalCommand::TE, false);
        assert_eq!(v, GlobalCommand::QIE.bits());
        let v = gcmd_value(gsts, GlobalCommand::SRTP, true);
        assert_eq!(v, (GlobalCommand::SRTP | GlobalCommand::QIE).bits());
        assert_eq!(GSTS_PERSISTENT_MASK & GlobalStatus::RTPS.bits(), 0);
        assert_eq!(
            GSTS_PERSISTENT_MASK & GlobalStatus::TES.bits(),
            GlobalStatus::TES.bits()
        );
    }

    #[test]
    fn ccmd_and_iotlb_register_encodings() {
        assert_eq!(
            ccmd::encode(ContextGranularity::Global),
            (1 << 63) | (1 << 61)
        );
        assert_eq!(
            ccmd::encode(ContextGranularity::Device {
                did: 5,
                sid: 0x0108,
                fm: 0
            }),
            (1 << 63) | (3 << 61) | (0x0108 << 16) | 5
        );
        assert_eq!(
            iotlb_reg::encode(IotlbGranularity::Domain(7), true, false),
            (1 << 63) | (2 << 60) | (7 << 32) | (1 << 49)
        );
        let p = IotlbGranularity::Page {
            did: 1,
            addr: 0x20_0000,
            am: 9,
            ih: true,
        };
        assert_eq!(p.address_word(), 0x20_0000 | (1 << 6) | 9);
        assert_eq!(iotlb_reg::actual_granularity(1 << 57), 1);
        assert_eq!(ccmd::actual_granularity(3 << 59), 3);
    }

    #[test]
    fn fault_status_and_queue_pointers() {
        let f = FaultStatus::from_bits_retain(0x0302);
        assert!(f.contains(FaultStatus::PPF));
        assert_eq!(f.fault_record_index(), 3);
        assert_eq!(queue_pointer(255), 0xff0);
        assert_eq!(queue_index(0xff0), 255);
        assert_eq!(iqa_value(PhysAddr::new(0x1234_5000), 0), 0x1234_5000);
        assert_eq!(Version(0x10).major(), 1);
    }
}
