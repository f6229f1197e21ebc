//! The virtual machine control block (AMD APM vol. 2, appendix B): a 4 KiB page with the
//! control area (intercepts, exit information, event injection, nested paging) at 0x000 and
//! the guest state save area at 0x400. Both are `#[repr(C)]` with every architectural offset
//! checked at compile time.

use core::mem::{offset_of, size_of};

use bitflags::bitflags;

bitflags! {
    /// Intercept vector 3 (control area offset 0x00C).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Intercept3: u32 {
        /// Physical maskable interrupt.
        const INTR = 1 << 0;
        /// Non-maskable interrupt.
        const NMI = 1 << 1;
        /// System management interrupt.
        const SMI = 1 << 2;
        /// INIT.
        const INIT = 1 << 3;
        /// CPUID.
        const CPUID = 1 << 18;
        /// INVD.
        const INVD = 1 << 22;
        /// HLT.
        const HLT = 1 << 24;
        /// INVLPGA.
        const INVLPGA = 1 << 26;
        /// IN/OUT through the I/O permission map.
        const IOIO_PROT = 1 << 27;
        /// RDMSR/WRMSR through the MSR permission map.
        const MSR_PROT = 1 << 28;
        /// Task switches.
        const TASK_SWITCH = 1 << 29;
        /// Shutdown (triple fault).
        const SHUTDOWN = 1 << 31;
    }
}

bitflags! {
    /// Intercept vector 4 (control area offset 0x010).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Intercept4: u32 {
        /// VMRUN (QEMU refuses VMRUN without it).
        const VMRUN = 1 << 0;
        /// VMMCALL: the hypercall instruction.
        const VMMCALL = 1 << 1;
        /// VMLOAD.
        const VMLOAD = 1 << 2;
        /// VMSAVE.
        const VMSAVE = 1 << 3;
        /// STGI.
        const STGI = 1 << 4;
        /// CLGI.
        const CLGI = 1 << 5;
        /// SKINIT.
        const SKINIT = 1 << 6;
        /// ICEBP.
        const ICEBP = 1 << 8;
        /// WBINVD.
        const WBINVD = 1 << 9;
        /// MONITOR.
        const MONITOR = 1 << 10;
        /// MWAIT.
        const MWAIT = 1 << 11;
        /// XSETBV.
        const XSETBV = 1 << 13;
    }
}

/// `#VMEXIT` codes the hypervisor decodes (APM vol. 2, appendix C).
pub mod exit_code {
    /// Exception `n` is `EXCP_BASE + n`.
    pub const EXCP_BASE: u64 = 0x40;
    /// Physical interrupt.
    pub const INTR: u64 = 0x60;
    /// NMI.
    pub const NMI: u64 = 0x61;
    /// SMI.
    pub const SMI: u64 = 0x62;
    /// INIT.
    pub const INIT: u64 = 0x63;
    /// CPUID.
    pub const CPUID: u64 = 0x72;
    /// HLT.
    pub const HLT: u64 = 0x78;
    /// I/O instruction.
    pub const IOIO: u64 = 0x7b;
    /// RDMSR or WRMSR.
    pub const MSR: u64 = 0x7c;
    /// Shutdown (triple fault).
    pub const SHUTDOWN: u64 = 0x7f;
    /// VMRUN.
    pub const VMRUN: u64 = 0x80;
    /// VMMCALL.
    pub const VMMCALL: u64 = 0x81;
    /// Nested page fault.
    pub const NPF: u64 = 0x400;
    /// VMRUN found the VMCB's guest state invalid.
    pub const INVALID: u64 = u64::MAX;
}

/// `TLB_CONTROL` values (offset 0x05C).
pub mod tlb_control {
    /// Do nothing.
    pub const NOTHING: u8 = 0;
    /// Flush this guest's ASID.
    pub const FLUSH_ASID: u8 = 3;
}

/// `V_INTR_MASKING` in `int_ctl`: the guest's RFLAGS.IF masks only virtual interrupts; physical
/// ones stay masked by the host's RFLAGS.IF (always 0 in Moat for now).
pub const V_INTR_MASKING: u64 = 1 << 24;
/// `V_TPR` in `int_ctl`: the guest's CR8 (with V_INTR_MASKING, MOV CR8 reaches only this).
pub const V_TPR_MASK: u64 = 0xf;
/// `V_IRQ` in `int_ctl`: a virtual interrupt is pending (cleared when the guest takes it).
pub const V_IRQ: u64 = 1 << 8;
/// `V_INTR_PRIO` in `int_ctl` (bits 19:16).
pub const V_INTR_PRIO_SHIFT: u32 = 16;
/// Mask of `V_INTR_PRIO`.
pub const V_INTR_PRIO_MASK: u64 = 0xf << V_INTR_PRIO_SHIFT;
/// `V_IGN_TPR` in `int_ctl`: the virtual interrupt ignores the guest's TPR.
pub const V_IGN_TPR: u64 = 1 << 20;
/// `V_INTR_VECTOR` (offset 0x64, bits 39:32 of the `int_ctl` qword).
pub const V_INTR_VECTOR_SHIFT: u32 = 32;
/// Mask of `V_INTR_VECTOR`.
pub const V_INTR_VECTOR_MASK: u64 = 0xff << V_INTR_VECTOR_SHIFT;

/// `EVENTINJ` / `EXITINTINFO` layout: vector, type, error-code-valid, valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventInj(pub u64);

impl EventInj {
    /// Type: external interrupt.
    pub const TYPE_INTR: u64 = 0;
    /// Type: NMI.
    pub const TYPE_NMI: u64 = 2;
    /// Type: exception.
    pub const TYPE_EXCEPTION: u64 = 3;
    const EV: u64 = 1 << 11;
    const VALID: u64 = 1 << 31;

    /// Whether the event is valid (for `EXITINTINFO`: an event whose delivery the exit
    /// interrupted).
    pub const fn valid(self) -> bool {
        self.0 & Self::VALID != 0
    }

    /// The event's type (`TYPE_*`).
    pub const fn kind(self) -> u64 {
        (self.0 >> 8) & 7
    }

    /// The event's vector.
    pub const fn vector(self) -> u8 {
        self.0 as u8
    }

    /// An event of `kind` with `vector` and an optional error code.
    pub const fn new(kind: u64, vector: u8, error: Option<u32>) -> Self {
        let mut v = vector as u64 | (kind & 7) << 8 | Self::VALID;
        if let Some(e) = error {
            v |= Self::EV | (e as u64) << 32;
        }
        EventInj(v)
    }
}

/// The control area (offsets 0x000-0x3FF).
#[repr(C)]
pub struct ControlArea {
    /// Intercept reads of CR0-CR15 (bit n = CRn).
    pub intercept_cr_read: u16,
    /// Intercept writes of CR0-CR15.
    pub intercept_cr_write: u16,
    /// Intercept reads of DR0-DR15.
    pub intercept_dr_read: u16,
    /// Intercept writes of DR0-DR15.
    pub intercept_dr_write: u16,
    /// Intercept exception vectors (bit n = vector n).
    pub intercept_exceptions: u32,
    /// Intercept vector 3: [`Intercept3`].
    pub intercept3: u32,
    /// Intercept vector 4: [`Intercept4`].
    pub intercept4: u32,
    /// Intercept vector 5.
    pub intercept5: u32,
    _reserved0: [u8; 0x3c - 0x18],
    /// PAUSE filter threshold.
    pub pause_filter_threshold: u16,
    /// PAUSE filter count.
    pub pause_filter_count: u16,
    /// Physical address of the I/O permission map (12 KiB).
    pub iopm_base_pa: u64,
    /// Physical address of the MSR permission map (8 KiB).
    pub msrpm_base_pa: u64,
    /// Added to the TSC the guest reads.
    pub tsc_offset: u64,
    /// Guest address-space identifier (never 0).
    pub guest_asid: u32,
    /// [`tlb_control`].
    pub tlb_control: u8,
    _reserved1: [u8; 3],
    /// Virtual interrupt control (V_TPR, V_IRQ, V_INTR_MASKING, ...).
    pub int_ctl: u64,
    /// Interrupt shadow (bit 0) and guest interrupt mask (bit 1).
    pub interrupt_shadow: u64,
    /// Why the guest exited.
    pub exit_code: u64,
    /// Exit-specific information 1.
    pub exit_info1: u64,
    /// Exit-specific information 2.
    pub exit_info2: u64,
    /// An event that was being delivered when the exit happened.
    pub exit_int_info: u64,
    /// Bit 0: nested paging enable.
    pub np_enable: u64,
    /// AVIC APIC BAR.
    pub avic_apic_bar: u64,
    /// GHCB physical address (SEV-ES).
    pub ghcb_pa: u64,
    /// Event to inject at the next VMRUN.
    pub event_inj: u64,
    /// Nested page table root (the guest's "CR3" of the second stage).
    pub n_cr3: u64,
    /// LBR virtualisation enable.
    pub lbr_virt_enable: u64,
    /// VMCB clean bits (0 = reload everything).
    pub vmcb_clean: u32,
    _reserved2: u32,
    /// Next sequential instruction pointer (only with the NRIPS feature).
    pub next_rip: u64,
    /// Number of instruction bytes fetched (decode assists).
    pub insn_len: u8,
    /// The instruction bytes fetched.
    pub insn_bytes: [u8; 15],
    _reserved3: [u8; 0x400 - 0xe0],
}

/// A segment register in the state save area.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    /// Selector.
    pub selector: u16,
    /// Attributes in SVM's packed form: type(4) S DPL(2) P AVL L D/B G.
    pub attrib: u16,
    /// Limit.
    pub limit: u32,
    /// Base.
    pub base: u64,
}

impl Segment {
    /// A flat segment with `selector` and packed `attrib`.
    pub const fn flat(selector: u16, attrib: u16) -> Self {
        Segment {
            selector,
            attrib,
            limit: 0xffff_ffff,
            base: 0,
        }
    }
}

/// Packed attributes: 64-bit code, present, DPL 0, execute/read, accessed.
pub const ATTR_CODE64: u16 = 0x029b;
/// Packed attributes: data, present, DPL 0, read/write, accessed, 4 KiB granularity, 32-bit.
pub const ATTR_DATA: u16 = 0x0c93;
/// Packed attributes: busy 64-bit TSS, present.
pub const ATTR_TSS64: u16 = 0x008b;

/// The state save area (offsets 0x400-0x697 of the VMCB).
#[repr(C)]
pub struct StateSave {
    /// ES.
    pub es: Segment,
    /// CS.
    pub cs: Segment,
    /// SS.
    pub ss: Segment,
    /// DS.
    pub ds: Segment,
    /// FS (loaded by VMLOAD).
    pub fs: Segment,
    /// GS (loaded by VMLOAD).
    pub gs: Segment,
    /// GDTR (base, limit).
    pub gdtr: Segment,
    /// LDTR (loaded by VMLOAD).
    pub ldtr: Segment,
    /// IDTR (base, limit).
    pub idtr: Segment,
    /// TR (loaded by VMLOAD).
    pub tr: Segment,
    _reserved0: [u8; 0xcb - 0xa0],
    /// Current privilege level.
    pub cpl: u8,
    _reserved1: u32,
    /// EFER (SVME must be set).
    pub efer: u64,
    _reserved2: [u8; 0x148 - 0xd8],
    /// CR4.
    pub cr4: u64,
    /// CR3.
    pub cr3: u64,
    /// CR0.
    pub cr0: u64,
    /// DR7.
    pub dr7: u64,
    /// DR6.
    pub dr6: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// RIP.
    pub rip: u64,
    _reserved3: [u8; 0x1d8 - 0x180],
    /// RSP.
    pub rsp: u64,
    _reserved4: [u8; 0x1f8 - 0x1e0],
    /// RAX.
    pub rax: u64,
    /// STAR (VMLOAD).
    pub star: u64,
    /// LSTAR (VMLOAD).
    pub lstar: u64,
    /// CSTAR (VMLOAD).
    pub cstar: u64,
    /// SFMASK (VMLOAD).
    pub sfmask: u64,
    /// KernelGSbase (VMLOAD).
    pub kernel_gs_base: u64,
    /// SYSENTER_CS (VMLOAD).
    pub sysenter_cs: u64,
    /// SYSENTER_ESP (VMLOAD).
    pub sysenter_esp: u64,
    /// SYSENTER_EIP (VMLOAD).
    pub sysenter_eip: u64,
    /// CR2.
    pub cr2: u64,
    _reserved5: [u8; 0x268 - 0x248],
    /// Guest PAT (used with nested paging).
    pub g_pat: u64,
    /// DBGCTL.
    pub dbgctl: u64,
    /// Last branch from.
    pub br_from: u64,
    /// Last branch to.
    pub br_to: u64,
    /// Last exception from.
    pub last_excp_from: u64,
    /// Last exception to.
    pub last_excp_to: u64,
}

/// A whole VMCB: one page, 4 KiB aligned.
#[repr(C, align(4096))]
pub struct Vmcb {
    /// Control area.
    pub control: ControlArea,
    /// Guest state.
    pub save: StateSave,
    _reserved: [u8; 0x1000 - 0x400 - size_of::<StateSave>()],
}

const _: () = {
    assert!(size_of::<ControlArea>() == 0x400);
    assert!(offset_of!(ControlArea, intercept3) == 0x00c);
    assert!(offset_of!(ControlArea, intercept4) == 0x010);
    assert!(offset_of!(ControlArea, pause_filter_threshold) == 0x03c);
    assert!(offset_of!(ControlArea, iopm_base_pa) == 0x040);
    assert!(offset_of!(ControlArea, msrpm_base_pa) == 0x048);
    assert!(offset_of!(ControlArea, tsc_offset) == 0x050);
    assert!(offset_of!(ControlArea, guest_asid) == 0x058);
    assert!(offset_of!(ControlArea, tlb_control) == 0x05c);
    assert!(offset_of!(ControlArea, int_ctl) == 0x060);
    assert!(offset_of!(ControlArea, exit_code) == 0x070);
    assert!(offset_of!(ControlArea, exit_info1) == 0x078);
    assert!(offset_of!(ControlArea, exit_info2) == 0x080);
    assert!(offset_of!(ControlArea, exit_int_info) == 0x088);
    assert!(offset_of!(ControlArea, np_enable) == 0x090);
    assert!(offset_of!(ControlArea, event_inj) == 0x0a8);
    assert!(offset_of!(ControlArea, n_cr3) == 0x0b0);
    assert!(offset_of!(ControlArea, vmcb_clean) == 0x0c0);
    assert!(offset_of!(ControlArea, next_rip) == 0x0c8);
    assert!(offset_of!(ControlArea, insn_len) == 0x0d0);
    assert!(size_of::<Segment>() == 16);
    assert!(offset_of!(StateSave, cs) == 0x010);
    assert!(offset_of!(StateSave, gdtr) == 0x060);
    assert!(offset_of!(StateSave, tr) == 0x090);
    assert!(offset_of!(StateSave, cpl) == 0x0cb);
    assert!(offset_of!(StateSave, efer) == 0x0d0);
    assert!(offset_of!(StateSave, cr4) == 0x148);
    assert!(offset_of!(StateSave, cr0) == 0x158);
    assert!(offset_of!(StateSave, rflags) == 0x170);
    assert!(offset_of!(StateSave, rip) == 0x178);
    assert!(offset_of!(StateSave, rsp) == 0x1d8);
    assert!(offset_of!(StateSave, rax) == 0x1f8);
    assert!(offset_of!(StateSave, kernel_gs_base) == 0x220);
    assert!(offset_of!(StateSave, cr2) == 0x240);
    assert!(offset_of!(StateSave, g_pat) == 0x268);
    assert!(offset_of!(StateSave, last_excp_to) == 0x290);
    assert!(offset_of!(Vmcb, save) == 0x400);
    assert!(size_of::<Vmcb>() == 0x1000);
};
