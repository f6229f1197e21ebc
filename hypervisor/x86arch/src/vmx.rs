//! Intel VMX formats: the capability MSRs, the control adjustment they dictate, VMCS field
//! encodings, exit reasons and qualifications, and the VM-instruction error numbers.
//! (Intel SDM vol. 3, appendices A-C and chapter 25-28.)

use moat_frames::PhysAddr;

/// Capability MSRs.
pub mod msr {
    /// IA32_FEATURE_CONTROL: lock (bit 0), VMX outside SMX (bit 2).
    pub const FEATURE_CONTROL: u32 = 0x3a;
    /// IA32_VMX_BASIC.
    pub const BASIC: u32 = 0x480;
    /// IA32_VMX_PINBASED_CTLS.
    pub const PINBASED_CTLS: u32 = 0x481;
    /// IA32_VMX_PROCBASED_CTLS.
    pub const PROCBASED_CTLS: u32 = 0x482;
    /// IA32_VMX_EXIT_CTLS.
    pub const EXIT_CTLS: u32 = 0x483;
    /// IA32_VMX_ENTRY_CTLS.
    pub const ENTRY_CTLS: u32 = 0x484;
    /// IA32_VMX_CR0_FIXED0.
    pub const CR0_FIXED0: u32 = 0x486;
    /// IA32_VMX_CR0_FIXED1.
    pub const CR0_FIXED1: u32 = 0x487;
    /// IA32_VMX_CR4_FIXED0.
    pub const CR4_FIXED0: u32 = 0x488;
    /// IA32_VMX_CR4_FIXED1.
    pub const CR4_FIXED1: u32 = 0x489;
    /// IA32_VMX_PROCBASED_CTLS2.
    pub const PROCBASED_CTLS2: u32 = 0x48b;
    /// IA32_VMX_EPT_VPID_CAP.
    pub const EPT_VPID_CAP: u32 = 0x48c;
    /// IA32_VMX_TRUE_PINBASED_CTLS.
    pub const TRUE_PINBASED_CTLS: u32 = 0x48d;
    /// IA32_VMX_TRUE_PROCBASED_CTLS.
    pub const TRUE_PROCBASED_CTLS: u32 = 0x48e;
    /// IA32_VMX_TRUE_EXIT_CTLS.
    pub const TRUE_EXIT_CTLS: u32 = 0x48f;
    /// IA32_VMX_TRUE_ENTRY_CTLS.
    pub const TRUE_ENTRY_CTLS: u32 = 0x490;
}

/// IA32_FEATURE_CONTROL bits.
pub mod feature_control {
    /// Locked: no further writes until reset.
    pub const LOCK: u64 = 1 << 0;
    /// VMXON allowed outside SMX operation.
    pub const VMX_OUTSIDE_SMX: u64 = 1 << 2;
}

/// IA32_VMX_BASIC, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Basic {
    /// VMCS revision identifier (bits 30:0), written to the VMXON region and each VMCS.
    pub revision: u32,
    /// Bytes of the VMXON region and a VMCS (bits 44:32).
    pub region_size: u32,
    /// The TRUE_* control MSRs exist (bit 55).
    pub true_controls: bool,
    /// VMCS memory type write-back (bits 53:50 == 6).
    pub write_back: bool,
}

impl Basic {
    /// Decodes the MSR value.
    pub const fn decode(v: u64) -> Basic {
        Basic {
            revision: (v & 0x7fff_ffff) as u32,
            region_size: ((v >> 32) & 0x1fff) as u32,
            true_controls: v & (1 << 55) != 0,
            write_back: (v >> 50) & 0xf == 6,
        }
    }
}

/// A control capability MSR: bits that must be 1 (low half: "allowed 0-settings" are 0 ->
/// must be 1) and bits that may be 1 (high half).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowed {
    /// Bits that must be set.
    pub must_be_one: u32,
    /// Bits that may be set.
    pub may_be_one: u32,
}

/// Why a set of controls cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissingControls(pub u32);

impl Allowed {
    /// Decodes a control capability MSR.
    pub const fn decode(v: u64) -> Allowed {
        Allowed {
            must_be_one: v as u32,
            may_be_one: (v >> 32) as u32,
        }
    }

    /// The control value: `wanted` plus what the CPU requires; `Err` names the wanted bits
    /// the CPU does not allow.
    pub const fn adjust(self, wanted: u32) -> Result<u32, MissingControls> {
        let missing = wanted & !self.may_be_one;
        if missing != 0 {
            return Err(MissingControls(missing));
        }
        Ok((wanted | self.must_be_one) & self.may_be_one)
    }

    /// Whether every bit of `bits` may be set.
    pub const fn allows(self, bits: u32) -> bool {
        bits & !self.may_be_one == 0
    }
}

/// A control register value made acceptable under VMX: the FIXED0 bits set, the bits FIXED1
/// does not allow cleared.
pub const fn fix_cr(value: u64, fixed0: u64, fixed1: u64) -> u64 {
    (value | fixed0) & fixed1
}

/// IA32_VMX_EPT_VPID_CAP bits the backend needs.
pub mod ept_cap {
    /// 4-level page walk.
    pub const WALK_4: u64 = 1 << 6;
    /// Write-back EPT paging structures.
    pub const WB: u64 = 1 << 14;
    /// 2 MiB EPT pages.
    pub const PAGE_2M: u64 = 1 << 16;
    /// INVEPT.
    pub const INVEPT: u64 = 1 << 20;
    /// Single-context INVEPT.
    pub const INVEPT_SINGLE: u64 = 1 << 25;
    /// INVVPID.
    pub const INVVPID: u64 = 1 << 32;
    /// Single-context INVVPID.
    pub const INVVPID_SINGLE: u64 = 1 << 41;
}

/// The EPT pointer (the VMCS field's hardware format) for a 4-level, write-back table at `root`.
pub const fn eptp(root: PhysAddr) -> u64 {
    (root.as_u64() & !0xfff) | (3 << 3) | 6
}

/// Pin-based controls.
pub mod pin {
    /// External interrupts exit.
    pub const EXTERNAL_INTERRUPT_EXITING: u32 = 1 << 0;
    /// NMIs exit.
    pub const NMI_EXITING: u32 = 1 << 3;
}

/// Primary processor-based controls.
pub mod proc1 {
    /// An exit as soon as the guest can take an external interrupt (RFLAGS.IF set, no
    /// interrupt shadow).
    pub const INTERRUPT_WINDOW_EXITING: u32 = 1 << 2;
    /// HLT exits.
    pub const HLT_EXITING: u32 = 1 << 7;
    /// MOV to CR8 exits (else it writes the processor's own TPR).
    pub const CR8_LOAD_EXITING: u32 = 1 << 19;
    /// MOV from CR8 exits.
    pub const CR8_STORE_EXITING: u32 = 1 << 20;
    /// Unconditional I/O exiting (every IN/OUT exits).
    pub const UNCONDITIONAL_IO_EXITING: u32 = 1 << 24;
    /// MSR bitmaps (without: every RDMSR/WRMSR exits).
    pub const USE_MSR_BITMAPS: u32 = 1 << 28;
    /// The secondary controls are used.
    pub const SECONDARY_CONTROLS: u32 = 1 << 31;
}

/// Secondary processor-based controls.
pub mod proc2 {
    /// EPT.
    pub const ENABLE_EPT: u32 = 1 << 1;
    /// RDTSCP does not #UD.
    pub const ENABLE_RDTSCP: u32 = 1 << 3;
    /// VPID.
    pub const ENABLE_VPID: u32 = 1 << 5;
    /// INVPCID does not #UD.
    pub const ENABLE_INVPCID: u32 = 1 << 12;
    /// XSAVES/XRSTORS do not #UD.
    pub const ENABLE_XSAVES: u32 = 1 << 20;
}

/// VM-exit controls.
pub mod exit_ctl {
    /// The host runs in 64-bit mode after an exit.
    pub const HOST_ADDRESS_SPACE_SIZE: u32 = 1 << 9;
    /// Save the guest's IA32_PAT.
    pub const SAVE_PAT: u32 = 1 << 18;
    /// Load the host's IA32_PAT.
    pub const LOAD_PAT: u32 = 1 << 19;
    /// Save the guest's IA32_EFER.
    pub const SAVE_EFER: u32 = 1 << 20;
    /// Load the host's IA32_EFER.
    pub const LOAD_EFER: u32 = 1 << 21;
}

/// VM-entry controls.
pub mod entry_ctl {
    /// The guest runs in IA-32e mode (long mode) after entry.
    pub const IA32E_MODE_GUEST: u32 = 1 << 9;
    /// Load the guest's IA32_PAT.
    pub const LOAD_PAT: u32 = 1 << 14;
    /// Load the guest's IA32_EFER.
    pub const LOAD_EFER: u32 = 1 << 15;
}

/// A VMCS field: its encoding (bits 14:13 width, 11:10 type, 9:1 index, 0 access type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field(pub u32);

/// The width of a field (encoding bits 14:13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    /// 16 bits.
    W16,
    /// 64 bits.
    W64,
    /// 32 bits.
    W32,
    /// Natural width (64 bits on a 64-bit host).
    Natural,
}

impl Field {
    /// The field's width.
    pub const fn width(self) -> Width {
        match (self.0 >> 13) & 3 {
            0 => Width::W16,
            1 => Width::W64,
            2 => Width::W32,
            _ => Width::Natural,
        }
    }

    /// Read-only (VM-exit information) fields have type 1 (encoding bits 11:10).
    pub const fn read_only(self) -> bool {
        (self.0 >> 10) & 3 == 1
    }
}

/// The VMCS fields the backend uses.
pub mod field {
    use super::Field;
    /// Virtual-processor identifier.
    pub const VPID: Field = Field(0x0000);
    /// Guest ES selector (the other selectors follow every 2).
    pub const GUEST_ES_SELECTOR: Field = Field(0x0800);
    /// Guest CS selector.
    pub const GUEST_CS_SELECTOR: Field = Field(0x0802);
    /// Guest SS selector.
    pub const GUEST_SS_SELECTOR: Field = Field(0x0804);
    /// Guest DS selector.
    pub const GUEST_DS_SELECTOR: Field = Field(0x0806);
    /// Guest FS selector.
    pub const GUEST_FS_SELECTOR: Field = Field(0x0808);
    /// Guest GS selector.
    pub const GUEST_GS_SELECTOR: Field = Field(0x080a);
    /// Guest LDTR selector.
    pub const GUEST_LDTR_SELECTOR: Field = Field(0x080c);
    /// Guest TR selector.
    pub const GUEST_TR_SELECTOR: Field = Field(0x080e);
    /// Host ES selector.
    pub const HOST_ES_SELECTOR: Field = Field(0x0c00);
    /// Host CS selector.
    pub const HOST_CS_SELECTOR: Field = Field(0x0c02);
    /// Host SS selector.
    pub const HOST_SS_SELECTOR: Field = Field(0x0c04);
    /// Host DS selector.
    pub const HOST_DS_SELECTOR: Field = Field(0x0c06);
    /// Host FS selector.
    pub const HOST_FS_SELECTOR: Field = Field(0x0c08);
    /// Host GS selector.
    pub const HOST_GS_SELECTOR: Field = Field(0x0c0a);
    /// Host TR selector.
    pub const HOST_TR_SELECTOR: Field = Field(0x0c0c);
    /// MSR bitmap address.
    pub const MSR_BITMAP: Field = Field(0x2004);
    /// EPT pointer.
    pub const EPT_POINTER: Field = Field(0x201a);
    /// Guest-physical address of an EPT violation or misconfiguration.
    pub const GUEST_PHYSICAL_ADDRESS: Field = Field(0x2400);
    /// VMCS link pointer (all ones: none).
    pub const VMCS_LINK_POINTER: Field = Field(0x2800);
    /// Guest IA32_PAT.
    pub const GUEST_PAT: Field = Field(0x2804);
    /// Guest IA32_EFER.
    pub const GUEST_EFER: Field = Field(0x2806);
    /// Host IA32_PAT.
    pub const HOST_PAT: Field = Field(0x2c00);
    /// Host IA32_EFER.
    pub const HOST_EFER: Field = Field(0x2c02);
    /// Pin-based controls.
    pub const PIN_CONTROLS: Field = Field(0x4000);
    /// Primary processor-based controls.
    pub const PROC_CONTROLS: Field = Field(0x4002);
    /// Exception bitmap.
    pub const EXCEPTION_BITMAP: Field = Field(0x4004);
    /// VM-exit controls.
    pub const EXIT_CONTROLS: Field = Field(0x400c);
    /// VM-exit MSR-store count.
    pub const EXIT_MSR_STORE_COUNT: Field = Field(0x400e);
    /// VM-exit MSR-load count.
    pub const EXIT_MSR_LOAD_COUNT: Field = Field(0x4010);
    /// VM-entry controls.
    pub const ENTRY_CONTROLS: Field = Field(0x4012);
    /// VM-entry MSR-load count.
    pub const ENTRY_MSR_LOAD_COUNT: Field = Field(0x4014);
    /// VM-entry interruption information.
    pub const ENTRY_INTERRUPTION_INFO: Field = Field(0x4016);
    /// VM-entry exception error code.
    pub const ENTRY_EXCEPTION_ERROR: Field = Field(0x4018);
    /// Secondary processor-based controls.
    pub const PROC_CONTROLS2: Field = Field(0x401e);
    /// VM-instruction error.
    pub const VM_INSTRUCTION_ERROR: Field = Field(0x4400);
    /// Exit reason.
    pub const EXIT_REASON: Field = Field(0x4402);
    /// VM-exit interruption information.
    pub const EXIT_INTERRUPTION_INFO: Field = Field(0x4404);
    /// VM-exit interruption error code.
    pub const EXIT_INTERRUPTION_ERROR: Field = Field(0x4406);
    /// IDT-vectoring information: the event whose delivery the exit interrupted.
    pub const IDT_VECTORING_INFO: Field = Field(0x4408);
    /// VM-exit instruction length.
    pub const EXIT_INSTRUCTION_LENGTH: Field = Field(0x440c);
    /// Guest ES limit (the other limits follow every 2).
    pub const GUEST_ES_LIMIT: Field = Field(0x4800);
    /// Guest GDTR limit.
    pub const GUEST_GDTR_LIMIT: Field = Field(0x4810);
    /// Guest IDTR limit.
    pub const GUEST_IDTR_LIMIT: Field = Field(0x4812);
    /// Guest ES access rights (the others follow every 2).
    pub const GUEST_ES_ACCESS_RIGHTS: Field = Field(0x4814);
    /// Guest interruptibility state.
    pub const GUEST_INTERRUPTIBILITY: Field = Field(0x4824);
    /// Guest activity state.
    pub const GUEST_ACTIVITY_STATE: Field = Field(0x4826);
    /// Guest IA32_SYSENTER_CS.
    pub const GUEST_SYSENTER_CS: Field = Field(0x482a);
    /// Host IA32_SYSENTER_CS.
    pub const HOST_SYSENTER_CS: Field = Field(0x4c00);
    /// CR0 guest/host mask.
    pub const CR0_MASK: Field = Field(0x6000);
    /// CR4 guest/host mask.
    pub const CR4_MASK: Field = Field(0x6002);
    /// CR0 read shadow.
    pub const CR0_READ_SHADOW: Field = Field(0x6004);
    /// CR4 read shadow.
    pub const CR4_READ_SHADOW: Field = Field(0x6006);
    /// Exit qualification.
    pub const EXIT_QUALIFICATION: Field = Field(0x6400);
    /// Guest-linear address.
    pub const GUEST_LINEAR_ADDRESS: Field = Field(0x640a);
    /// Guest CR0.
    pub const GUEST_CR0: Field = Field(0x6800);
    /// Guest CR3.
    pub const GUEST_CR3: Field = Field(0x6802);
    /// Guest CR4.
    pub const GUEST_CR4: Field = Field(0x6804);
    /// Guest ES base (the other bases follow every 2).
    pub const GUEST_ES_BASE: Field = Field(0x6806);
    /// Guest GDTR base.
    pub const GUEST_GDTR_BASE: Field = Field(0x6816);
    /// Guest IDTR base.
    pub const GUEST_IDTR_BASE: Field = Field(0x6818);
    /// Guest DR7.
    pub const GUEST_DR7: Field = Field(0x681a);
    /// Guest RSP.
    pub const GUEST_RSP: Field = Field(0x681c);
    /// Guest RIP.
    pub const GUEST_RIP: Field = Field(0x681e);
    /// Guest RFLAGS.
    pub const GUEST_RFLAGS: Field = Field(0x6820);
    /// Guest IA32_SYSENTER_ESP.
    pub const GUEST_SYSENTER_ESP: Field = Field(0x6824);
    /// Guest IA32_SYSENTER_EIP.
    pub const GUEST_SYSENTER_EIP: Field = Field(0x6826);
    /// Host CR0.
    pub const HOST_CR0: Field = Field(0x6c00);
    /// Host CR3.
    pub const HOST_CR3: Field = Field(0x6c02);
    /// Host CR4.
    pub const HOST_CR4: Field = Field(0x6c04);
    /// Host FS base.
    pub const HOST_FS_BASE: Field = Field(0x6c06);
    /// Host GS base.
    pub const HOST_GS_BASE: Field = Field(0x6c08);
    /// Host TR base.
    pub const HOST_TR_BASE: Field = Field(0x6c0a);
    /// Host GDTR base.
    pub const HOST_GDTR_BASE: Field = Field(0x6c0c);
    /// Host IDTR base.
    pub const HOST_IDTR_BASE: Field = Field(0x6c0e);
    /// Host IA32_SYSENTER_ESP.
    pub const HOST_SYSENTER_ESP: Field = Field(0x6c10);
    /// Host IA32_SYSENTER_EIP.
    pub const HOST_SYSENTER_EIP: Field = Field(0x6c12);
    /// Host RSP.
    pub const HOST_RSP: Field = Field(0x6c14);
    /// Host RIP.
    pub const HOST_RIP: Field = Field(0x6c16);

    /// The guest segment register fields of segment `i` (ES, CS, SS, DS, FS, GS, LDTR, TR in
    /// that order): selector, limit, access rights, base.
    pub const fn guest_segment(i: u32) -> (Field, Field, Field, Field) {
        (
            Field(GUEST_ES_SELECTOR.0 + 2 * i),
            Field(GUEST_ES_LIMIT.0 + 2 * i),
            Field(GUEST_ES_ACCESS_RIGHTS.0 + 2 * i),
            Field(GUEST_ES_BASE.0 + 2 * i),
        )
    }
}

/// Basic exit reasons (bits 15:0 of the exit reason).
pub mod reason {
    /// Exception or NMI.
    pub const EXCEPTION_NMI: u16 = 0;
    /// External interrupt.
    pub const EXTERNAL_INTERRUPT: u16 = 1;
    /// Triple fault.
    pub const TRIPLE_FAULT: u16 = 2;
    /// INIT signal.
    pub const INIT: u16 = 3;
    /// Interrupt window (the guest can take an external interrupt now).
    pub const INTERRUPT_WINDOW: u16 = 7;
    /// Start-up IPI.
    pub const SIPI: u16 = 4;
    /// CPUID.
    pub const CPUID: u16 = 10;
    /// HLT.
    pub const HLT: u16 = 12;
    /// VMCALL.
    pub const VMCALL: u16 = 18;
    /// CR access.
    pub const CR_ACCESS: u16 = 28;
    /// I/O instruction.
    pub const IO: u16 = 30;
    /// RDMSR.
    pub const RDMSR: u16 = 31;
    /// WRMSR.
    pub const WRMSR: u16 = 32;
    /// VM-entry failure: invalid guest state.
    pub const INVALID_GUEST_STATE: u16 = 33;
    /// VM-entry failure: MSR loading.
    pub const MSR_LOADING: u16 = 34;
    /// Machine-check event during entry.
    pub const MACHINE_CHECK: u16 = 41;
    /// EPT violation.
    pub const EPT_VIOLATION: u16 = 48;
    /// EPT misconfiguration.
    pub const EPT_MISCONFIG: u16 = 49;
    /// XSETBV.
    pub const XSETBV: u16 = 55;
}

/// The name of a basic exit reason, for log lines.
pub const fn reason_name(r: u16) -> &'static str {
    match r {
        0 => "exception or NMI",
        1 => "external interrupt",
        2 => "triple fault",
        3 => "INIT",
        4 => "SIPI",
        7 => "interrupt window",
        8 => "NMI window",
        9 => "task switch",
        10 => "CPUID",
        11 => "GETSEC",
        12 => "HLT",
        13 => "INVD",
        14 => "INVLPG",
        15 => "RDPMC",
        16 => "RDTSC",
        18 => "VMCALL",
        19..=27 => "a VMX instruction",
        28 => "control-register access",
        29 => "debug-register access",
        30 => "I/O instruction",
        31 => "RDMSR",
        32 => "WRMSR",
        33 => "VM-entry failure: invalid guest state",
        34 => "VM-entry failure: MSR loading",
        36 => "MWAIT",
        37 => "monitor trap flag",
        39 => "MONITOR",
        40 => "PAUSE",
        41 => "VM-entry failure: machine-check event",
        43 => "TPR below threshold",
        44 => "APIC access",
        48 => "EPT violation",
        49 => "EPT misconfiguration",
        50 => "INVEPT",
        51 => "RDTSCP",
        53 => "INVVPID",
        54 => "WBINVD",
        55 => "XSETBV",
        _ => "an unhandled exit",
    }
}

/// An exit reason field, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitReason {
    /// Basic exit reason (bits 15:0).
    pub basic: u16,
    /// VM-entry failure (bit 31): the guest never ran.
    pub entry_failure: bool,
}

impl ExitReason {
    /// Decodes the 32-bit exit reason.
    pub const fn decode(v: u32) -> ExitReason {
        ExitReason {
            basic: v as u16,
            entry_failure: v & (1 << 31) != 0,
        }
    }
}

/// The exit qualification of an I/O instruction, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoQualification {
    /// Port.
    pub port: u16,
    /// Bytes (1, 2, 4).
    pub size: u8,
    /// IN (else OUT).
    pub input: bool,
    /// INS/OUTS.
    pub string: bool,
    /// REP prefix.
    pub rep: bool,
}

impl IoQualification {
    /// Decodes the qualification.
    pub const fn decode(q: u64) -> IoQualification {
        IoQualification {
            size: (q & 7) as u8 + 1,
            input: q & (1 << 3) != 0,
            string: q & (1 << 4) != 0,
            rep: q & (1 << 5) != 0,
            port: (q >> 16) as u16,
        }
    }
}

/// The exit qualification of a control-register access, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrAccess {
    /// The control register.
    pub cr: u8,
    /// MOV to CR (0), MOV from CR (1), CLTS (2), LMSW (3).
    pub kind: u8,
    /// The general-purpose register of a MOV (0 RAX, 1 RCX, 2 RDX, 3 RBX, 4 RSP, 5 RBP,
    /// 6 RSI, 7 RDI, 8-15 R8-R15).
    pub gpr: u8,
}

impl CrAccess {
    /// MOV to CR.
    pub const MOV_TO: u8 = 0;
    /// MOV from CR.
    pub const MOV_FROM: u8 = 1;

    /// Decodes the qualification.
    pub const fn decode(q: u64) -> CrAccess {
        CrAccess {
            cr: (q & 0xf) as u8,
            kind: ((q >> 4) & 3) as u8,
            gpr: ((q >> 8) & 0xf) as u8,
        }
    }
}

/// The exit qualification of an EPT violation, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EptViolation {
    /// A data read.
    pub read: bool,
    /// A data write.
    pub write: bool,
    /// An instruction fetch.
    pub fetch: bool,
    /// The guest-physical address was mapped (readable, writable or executable): a
    /// permission fault rather than a missing translation.
    pub present: bool,
}

impl EptViolation {
    /// Decodes the qualification.
    pub const fn decode(q: u64) -> EptViolation {
        EptViolation {
            read: q & 1 != 0,
            write: q & 2 != 0,
            fetch: q & 4 != 0,
            present: q & (7 << 3) != 0,
        }
    }
}

/// What a VM-instruction error number means (SDM vol. 3, 31.4).
pub const fn instruction_error(n: u32) -> &'static str {
    match n {
        1 => "VMCALL executed in VMX root operation",
        2 => "VMCLEAR with invalid physical address",
        3 => "VMCLEAR with VMXON pointer",
        4 => "VMLAUNCH with non-clear VMCS",
        5 => "VMRESUME with non-launched VMCS",
        6 => "VMRESUME after VMXOFF",
        7 => "VM entry with invalid control field(s)",
        8 => "VM entry with invalid host-state field(s)",
        9 => "VMPTRLD with invalid physical address",
        10 => "VMPTRLD with VMXON pointer",
        11 => "VMPTRLD with incorrect VMCS revision identifier",
        12 => "VMREAD/VMWRITE from/to unsupported VMCS component",
        13 => "VMWRITE to read-only VMCS component",
        15 => "VMXON executed in VMX root operation",
        16 => "VM entry with invalid executive-VMCS pointer",
        17 => "VM entry with non-launched executive VMCS",
        18 => "VM entry with executive-VMCS pointer not VMXON pointer",
        19 => "VMCALL with non-clear VMCS",
        20 => "VMCALL with invalid VM-exit control fields",
        22 => "VMCALL with incorrect MSEG revision identifier",
        23 => "VMXOFF under dual-monitor treatment",
        24 => "VMCALL with invalid SMM-monitor features",
        25 => "VM entry with invalid VM-execution control fields in executive VMCS",
        26 => "VM entry with events blocked by MOV SS",
        28 => "invalid operand to INVEPT/INVVPID",
        _ => "unknown VM-instruction error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_decodes_revision_size_and_true_controls() {
        // Skylake: revision 4, 4 KiB regions, WB, TRUE controls.
        let b = Basic::decode(0x00da_0400_0000_0004);
        assert_eq!(b.revision, 4);
        assert_eq!(b.region_size, 0x400);
        assert!(b.true_controls);
        assert!(b.write_back);
        let b = Basic::decode(0x0018_1000_8000_0001);
        assert_eq!(
            (b.revision, b.region_size, b.true_controls, b.write_back),
            (1, 0x1000, false, true)
        );
    }

    #[test]
    fn adjust_adds_required_bits_and_refuses_forbidden_ones() {
        // must be 1: 0x16 (bits 1, 2, 4); may be 1: 0x7f.
        let a = Allowed::decode(0x0000_007f_0000_0016);
        assert_eq!(a.adjust(0x41), Ok(0x57));
        assert_eq!(a.adjust(0x80), Err(MissingControls(0x80)));
        assert!(a.allows(0x7f));
        assert!(!a.allows(0x100));
        // A real TRUE_PROCBASED_CTLS: HLT + unconditional I/O + secondary controls.
        let p = Allowed::decode(0xfff9_fffe_0401_e172);
        let want = proc1::HLT_EXITING | proc1::UNCONDITIONAL_IO_EXITING | proc1::SECONDARY_CONTROLS;
        let v = p.adjust(want).unwrap();
        assert_eq!(v & want, want);
        assert_eq!(v & p.must_be_one, p.must_be_one);
    }

    #[test]
    fn fixed_bits_force_and_clear() {
        // CR0: PE, NE, PG forced (fixed0 0x80000021), everything allowed (fixed1 all ones).
        assert_eq!(fix_cr(0x10, 0x8000_0021, u64::MAX), 0x8000_0031);
        // CR4: VMXE forced; bits above 0x3ff clear not allowed.
        assert_eq!(fix_cr(0xffff, 0x2000, 0x3fff), 0x3fff);
    }

    #[test]
    fn field_encodings_have_the_right_widths() {
        assert_eq!(field::VPID.width(), Width::W16);
        assert_eq!(field::GUEST_CS_SELECTOR.width(), Width::W16);
        assert_eq!(field::EPT_POINTER.width(), Width::W64);
        assert_eq!(field::GUEST_EFER.width(), Width::W64);
        assert_eq!(field::PIN_CONTROLS.width(), Width::W32);
        assert_eq!(field::EXIT_REASON.width(), Width::W32);
        assert_eq!(field::GUEST_RIP.width(), Width::Natural);
        assert_eq!(field::HOST_RIP.width(), Width::Natural);
        assert!(field::EXIT_REASON.read_only());
        assert!(field::VM_INSTRUCTION_ERROR.read_only());
        assert!(field::EXIT_QUALIFICATION.read_only());
        assert!(field::GUEST_PHYSICAL_ADDRESS.read_only());
        assert!(!field::GUEST_RIP.read_only());
        assert!(!field::PROC_CONTROLS2.read_only());
        // CS is segment 1, TR segment 7.
        assert_eq!(
            field::guest_segment(1),
            (Field(0x802), Field(0x4802), Field(0x4816), Field(0x6808))
        );
        assert_eq!(
            field::guest_segment(7),
            (Field(0x80e), Field(0x480e), Field(0x4822), Field(0x6814))
        );
    }

    #[test]
    fn cr_access_qualification_decodes() {
        // MOV CR8, R9: CR 8, type 0, register 9.
        assert_eq!(
            CrAccess::decode(0x908),
            CrAccess {
                cr: 8,
                kind: CrAccess::MOV_TO,
                gpr: 9
            }
        );
        // MOV RAX, CR8.
        assert_eq!(
            CrAccess::decode(0x18),
            CrAccess {
                cr: 8,
                kind: CrAccess::MOV_FROM,
                gpr: 0
            }
        );
    }

    #[test]
    fn exit_reasons_and_qualifications_decode() {
        let r = ExitReason::decode(0x8000_0021);
        assert_eq!(
            (r.basic, r.entry_failure),
            (reason::INVALID_GUEST_STATE, true)
        );
        assert_eq!(
            reason_name(r.basic),
            "VM-entry failure: invalid guest state"
        );
        assert_eq!(ExitReason::decode(18).basic, reason::VMCALL);
        assert_eq!(reason_name(48), "EPT violation");
        // OUT dx, al to 0x3f8: size 1, out, port 0x3f8.
        let io = IoQualification::decode(0x03f8_0000);
        assert_eq!(
            (io.port, io.size, io.input, io.string, io.rep),
            (0x3f8, 1, false, false, false)
        );
        // REP INSD from 0x1234.
        let io = IoQualification::decode(0x1234_0000 | 3 | 1 << 3 | 1 << 4 | 1 << 5);
        assert_eq!(
            (io.port, io.size, io.input, io.string, io.rep),
            (0x1234, 4, true, true, true)
        );
        let v = EptViolation::decode(0x182);
        assert_eq!(
            (v.read, v.write, v.fetch, v.present),
            (false, true, false, false)
        );
        let v = EptViolation::decode(0x181 | 1 << 3);
        assert_eq!(
            (v.read, v.write, v.fetch, v.present),
            (true, false, false, true)
        );
        assert_eq!(
            instruction_error(7),
            "VM entry with invalid control field(s)"
        );
        assert_eq!(
            instruction_error(8),
            "VM entry with invalid host-state field(s)"
        );
        assert_eq!(instruction_error(99), "unknown VM-instruction error");
    }

    #[test]
    fn eptp_is_four_level_write_back() {
        assert_eq!(eptp(PhysAddr::new(0x1234_5000)), 0x1234_501e);
    }
}
