//! The Intel VMX backend: detection from the capability MSRs (IA32_VMX_BASIC, the TRUE_*
//! control MSRs, EPT/VPID capabilities, CR0/CR4 fixed bits), VMXON per CPU, and
//! [`VmxVcpu`]: a VMCS plus the guest's general-purpose registers, entered with
//! VMLAUNCH/VMRESUME and decoded on VM exit into the backend-neutral [`Exit`].
//!
//! The VMCS of a vCPU is set up on the CPU that runs it (its host state is that CPU's GDT,
//! TSS and GS base), at its first entry. Nothing here is visible outside [`crate::vm`]'s
//! vCPU layer.

pub mod ept;
pub mod vmcs;

use core::sync::atomic::{AtomicU64, Ordering};

use moat_x86arch::vmx::{
    self, entry_ctl, exit_ctl, feature_control, field, msr, pin, proc1, proc2, reason, Allowed,
    Basic, CrAccess, EptViolation, ExitReason, IoQualification,
};
use spin::Once;
use x86_64::registers::control::{Cr0, Cr2, Cr3, Cr4};

use crate::arch::x86;
use crate::mm::{frames, PhysAddr};
use crate::vm::vcpu::{
    Access, EntryState, Event, Exit, IoAccess, Reg, TagBitmap, Unsupported, VcpuError,
};

const CR4_VMXE: u64 = 1 << 13;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
const MSR_PAT: u32 = 0x277;
const MSR_FS_BASE: u32 = 0xc000_0100;
/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;
/// Bit 31 of the entry interruption and IDT-vectoring information: valid.
const EVENT_VALID: u64 = 1 << 31;
const MSR_GS_BASE: u32 = 0xc000_0101;

/// What the capability MSRs allow, and the controls the backend runs guests with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmxInfo {
    /// VMCS revision identifier.
    pub revision: u32,
    /// Pin-based controls.
    pub pin: u32,
    /// Primary processor-based controls.
    pub proc1: u32,
    /// Secondary processor-based controls.
    pub proc2: u32,
    /// VM-exit controls.
    pub exit: u32,
    /// VM-entry controls.
    pub entry: u32,
    /// CR0 fixed-0 / fixed-1.
    pub cr0_fixed: (u64, u64),
    /// CR4 fixed-0 / fixed-1.
    pub cr4_fixed: (u64, u64),
    /// INVEPT single-context is available.
    pub invept: bool,
    /// INVVPID single-context is available.
    pub invvpid: bool,
    /// Interrupt-window exiting can be turned on (else a requested interrupt waits for the
    /// next exit at which the guest can take it).
    pub interrupt_window: bool,
}

fn rdmsr(m: u32) -> u64 {
    // SAFETY: only called for the VMX capability MSRs after CPUID reported VMX (they exist
    // on every such CPU; TRUE_* only when IA32_VMX_BASIC bit 55 says so).
    unsafe { x86::rdmsr(m) }
}

/// Detects VMX with EPT, VPID and the controls the backend needs.
pub fn detect() -> Result<VmxInfo, Unsupported> {
    if x86::cpuid(1, 0).ecx & (1 << 5) == 0 {
        return Err(Unsupported::NoVirtualization);
    }
    let fc = rdmsr(msr::FEATURE_CONTROL);
    if fc & feature_control::LOCK != 0 && fc & feature_control::VMX_OUTSIDE_SMX == 0 {
        return Err(Unsupported::Vmx("VMX is disabled by firmware (IA32_FEATURE_CONTROL locked without VMX outside SMX: enable VT-x in the BIOS)"));
    }
    let basic = Basic::decode(rdmsr(msr::BASIC));
    if basic.region_size as u64 > crate::mm::PAGE_SIZE || !basic.write_back {
        return Err(Unsupported::Vmx(
            "VMCS regions larger than a page or not write-back",
        ));
    }
    let (pin_msr, proc_msr, exit_msr, entry_msr) = if basic.true_controls {
        (
            msr::TRUE_PINBASED_CTLS,
            msr::TRUE_PROCBASED_CTLS,
            msr::TRUE_EXIT_CTLS,
            msr::TRUE_ENTRY_CTLS,
        )
    } else {
        (
            msr::PINBASED_CTLS,
            msr::PROCBASED_CTLS,
            msr::EXIT_CTLS,
            msr::ENTRY_CTLS,
        )
    };
    let p1 = Allowed::decode(rdmsr(proc_msr));
    if !p1.allows(proc1::SECONDARY_CONTROLS) {
        return Err(Unsupported::Vmx("VMX without secondary controls (no EPT)"));
    }
    let p2a = Allowed::decode(rdmsr(msr::PROCBASED_CTLS2));
    let cap = rdmsr(msr::EPT_VPID_CAP);
    use vmx::ept_cap;
    if !p2a.allows(proc2::ENABLE_EPT | proc2::ENABLE_VPID)
        || cap & ept_cap::WALK_4 == 0
        || cap & ept_cap::WB == 0
    {
        return Err(Unsupported::Vmx(
            "VMX without EPT (4-level, write-back) or VPID",
        ));
    }
    let bad = |_| Unsupported::Vmx("VMX refuses a control the backend needs");
    let pin = Allowed::decode(rdmsr(pin_msr))
        .adjust(pin::EXTERNAL_INTERRUPT_EXITING | pin::NMI_EXITING)
        .map_err(bad)?;
    let proc1 = p1
        .adjust(
            proc1::HLT_EXITING
                | proc1::UNCONDITIONAL_IO_EXITING
                | proc1::SECONDARY_CONTROLS
                // Without these a guest's MOV to CR8 would set this CPU's own TPR.
                | proc1::CR8_LOAD_EXITING
                | proc1::CR8_STORE_EXITING,
        )
        .map_err(bad)?;
    // Instructions the host has and a guest may use: allowed through when the CPU can.
    let optional = [
        proc2::ENABLE_RDTSCP,
        proc2::ENABLE_INVPCID,
        proc2::ENABLE_XSAVES,
    ]
    .into_iter()
    .filter(|&b| p2a.allows(b))
    .fold(0, |a, b| a | b);
    let proc2 = p2a
        .adjust(proc2::ENABLE_EPT | proc2::ENABLE_VPID | optional)
        .map_err(bad)?;
    let exit = Allowed::decode(rdmsr(exit_msr))
        .adjust(
            exit_ctl::HOST_ADDRESS_SPACE_SIZE
                | exit_ctl::SAVE_EFER
                | exit_ctl::LOAD_EFER
                | exit_ctl::SAVE_PAT
                | exit_ctl::LOAD_PAT,
        )
        .map_err(bad)?;
    let entry = Allowed::decode(rdmsr(entry_msr))
        .adjust(entry_ctl::IA32E_MODE_GUEST | entry_ctl::LOAD_EFER | entry_ctl::LOAD_PAT)
        .map_err(bad)?;
    Ok(VmxInfo {
        interrupt_window: p1.allows(proc1::INTERRUPT_WINDOW_EXITING),
        revision: basic.revision,
        pin,
        proc1,
        proc2,
        exit,
        entry,
        cr0_fixed: (rdmsr(msr::CR0_FIXED0), rdmsr(msr::CR0_FIXED1)),
        cr4_fixed: (rdmsr(msr::CR4_FIXED0), rdmsr(msr::CR4_FIXED1)),
        invept: cap & (ept_cap::INVEPT | ept_cap::INVEPT_SINGLE)
            == ept_cap::INVEPT | ept_cap::INVEPT_SINGLE,
        invvpid: cap & (ept_cap::INVVPID | ept_cap::INVVPID_SINGLE)
            == ept_cap::INVVPID | ept_cap::INVVPID_SINGLE,
    })
}

/// Per-CPU VMXON state.
struct CpuState {
    /// The VMCS currently loaded on this CPU (VMPTRLD), 0 for none.
    current: AtomicU64,
}

static CPUS: [Once<CpuState>; crate::arch::cpu::MAX_CPUS] =
    [const { Once::new() }; crate::arch::cpu::MAX_CPUS];

/// Enters VMX operation on the calling CPU (idempotent): locks IA32_FEATURE_CONTROL with VMX
/// on if firmware left it unlocked, sets CR0/CR4 to satisfy the fixed bits (CR4.VMXE and,
/// typically, CR0.NE), and executes VMXON on a fresh region.
pub fn enable_this_cpu(info: &VmxInfo) -> Result<(), VcpuError> {
    let cpu = crate::arch::cpu::current_index();
    let slot = CPUS.get(cpu).ok_or(VcpuError::OutOfMemory)?;
    if slot.is_completed() {
        return Ok(());
    }
    let region = frames::alloc_zeroed().ok_or(VcpuError::OutOfMemory)?;
    // SAFETY: the region is a zeroed, identity-mapped frame owned by this CPU forever; the
    // revision identifier goes in its first dword.
    unsafe { core::ptr::write_volatile(region.as_u64() as *mut u32, info.revision) };
    let fc = rdmsr(msr::FEATURE_CONTROL);
    // SAFETY: VMX was detected; the MSR is unlocked (else `detect` checked VMX outside SMX
    // is on), and locking it with VMX enabled is what firmware would do. CR0/CR4 get the
    // bits VMX operation requires (NE: native x87 errors, VMXE), which change nothing else
    // the hypervisor relies on. VMXON then runs on this CPU's own region.
    let r = unsafe {
        if fc & feature_control::LOCK == 0 {
            x86::wrmsr(
                msr::FEATURE_CONTROL,
                fc | feature_control::LOCK | feature_control::VMX_OUTSIDE_SMX,
            );
        }
        let cr0 = vmx::fix_cr(Cr0::read_raw(), info.cr0_fixed.0, info.cr0_fixed.1);
        asm_write_cr0(cr0);
        let cr4 = vmx::fix_cr(
            Cr4::read_raw() | CR4_VMXE,
            info.cr4_fixed.0,
            info.cr4_fixed.1,
        );
        asm_write_cr4(cr4);
        vmcs::vmxon(region)
    };
    if let Err(e) = r {
        log::error!("vmx: VMXON failed on cpu{cpu}: {}", e.describe());
        return Err(VcpuError::OutOfMemory);
    }
    slot.call_once(|| CpuState {
        current: AtomicU64::new(0),
    });
    Ok(())
}

/// The whole host CR3 (table address and the PCD/PWT bits).
fn read_cr3() -> u64 {
    let (frame, low) = Cr3::read_raw();
    frame.start_address().as_u64() | u64::from(low)
}

/// # Safety
/// `v` keeps paging, protection and write protection as the hypervisor runs them.
unsafe fn asm_write_cr0(v: u64) {
    // SAFETY: contract above.
    unsafe { core::arch::asm!("mov cr0, {}", in(reg) v, options(nostack)) };
}

/// # Safety
/// `v` keeps PAE and every feature bit the hypervisor uses.
unsafe fn asm_write_cr4(v: u64) {
    // SAFETY: contract above.
    unsafe { core::arch::asm!("mov cr4, {}", in(reg) v, options(nostack)) };
}

/// Descriptor-table register contents (SGDT/SIDT).
#[repr(C, packed)]
struct DescriptorTable {
    limit: u16,
    base: u64,
}

fn sgdt() -> DescriptorTable {
    let mut d = DescriptorTable { limit: 0, base: 0 };
    // SAFETY: SGDT stores 10 bytes into `d`.
    unsafe { core::arch::asm!("sgdt [{}]", in(reg) &mut d, options(nostack)) };
    d
}

fn sidt() -> DescriptorTable {
    let mut d = DescriptorTable { limit: 0, base: 0 };
    // SAFETY: SIDT stores 10 bytes into `d`.
    unsafe { core::arch::asm!("sidt [{}]", in(reg) &mut d, options(nostack)) };
    d
}

/// The base of the 64-bit TSS descriptor at `selector` in the GDT at `gdt`.
fn tss_base(gdt: u64, selector: u16) -> u64 {
    let at = gdt + u64::from(selector & !7);
    // SAFETY: the GDT is this CPU's own (identity mapped, static); a 64-bit TSS descriptor
    // is 16 bytes at the selector's index.
    let (lo, hi) = unsafe {
        (
            core::ptr::read_volatile(at as *const u64),
            core::ptr::read_volatile((at + 8) as *const u64),
        )
    };
    ((lo >> 16) & 0xff_ffff) | ((lo >> 32) & 0xff00_0000) | ((hi & 0xffff_ffff) << 32)
}

/// `selftest=vmx-entry`: how many of the next vCPU set-ups are broken on purpose (2: bad guest
/// state, then 1: bad control).
#[cfg(feature = "selftest")]
static BREAK_ENTRIES: core::sync::atomic::AtomicU8 = core::sync::atomic::AtomicU8::new(0);

/// Makes the next two vCPU entries fail on purpose: the first with an invalid guest state
/// (RFLAGS.VM set in 64-bit mode: a VM-entry failure, exit reason 33), the second with a
/// reserved pin-based control bit (VMfailValid, VM-instruction error 7).
#[cfg(feature = "selftest")]
pub fn selftest_break_entries() {
    log::info!(
        "selftest: the next two VMX entries are broken on purpose (guest state, then controls)"
    );
    BREAK_ENTRIES.store(2, Ordering::SeqCst);
}

/// VPID allocator (VPID 0 is the host's).
static VPIDS: TagBitmap = TagBitmap::new();

/// Allocates a VPID.
pub fn alloc_vpid() -> Option<u16> {
    VPIDS.alloc(64).map(|v| v as u16)
}

/// Returns a VPID.
pub fn free_vpid(vpid: u16) {
    VPIDS.free(u32::from(vpid));
}

/// Guest general-purpose registers (VMX keeps only RSP and RIP in the VMCS).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct Gprs {
    rax: u64,
    rbx: u64,
    rcx: u64,
    rdx: u64,
    rsi: u64,
    rdi: u64,
    rbp: u64,
    r8: u64,
    r9: u64,
    r10: u64,
    r11: u64,
    r12: u64,
    r13: u64,
    r14: u64,
    r15: u64,
}

core::arch::global_asm!(
    r#"
    .section .text.moat_vmx_run, "ax"
    .global moat_vmx_run
    // moat_vmx_run(gprs: *mut Gprs [rdi], launched [rsi]) -> rax: 0 after a VM exit,
    // 1 when VMLAUNCH/VMRESUME failed (RFLAGS CF/ZF; the error is in the VMCS).
moat_vmx_run:
    push rbp
    push rbx
    push r12
    push r13
    push r14
    push r15
    push rdi
    mov rax, {host_rsp}
    vmwrite rax, rsp
    lea rdx, [rip + 2f]
    mov rax, {host_rip}
    vmwrite rax, rdx
    // Flags from this compare survive the MOVs below.
    cmp rsi, 0
    mov rax, [rdi + {rax}]
    mov rbx, [rdi + {rbx}]
    mov rcx, [rdi + {rcx}]
    mov rdx, [rdi + {rdx}]
    mov rsi, [rdi + {rsi}]
    mov rbp, [rdi + {rbp}]
    mov r8, [rdi + {r8}]
    mov r9, [rdi + {r9}]
    mov r10, [rdi + {r10}]
    mov r11, [rdi + {r11}]
    mov r12, [rdi + {r12}]
    mov r13, [rdi + {r13}]
    mov r14, [rdi + {r14}]
    mov r15, [rdi + {r15}]
    mov rdi, [rdi + {rdi}]
    jne 1f
    vmlaunch
    jmp 3f
1:
    vmresume
3:
    // VMfail: the guest never ran; RSP is ours, the GPRs hold guest values.
    mov eax, 1
    jmp 4f
2:
    // VM exit: RSP as written to HOST_RSP (the saved gprs pointer on top).
    push rdi
    mov rdi, [rsp + 8]
    mov [rdi + {rax}], rax
    mov [rdi + {rbx}], rbx
    mov [rdi + {rcx}], rcx
    mov [rdi + {rdx}], rdx
    mov [rdi + {rsi}], rsi
    mov [rdi + {rbp}], rbp
    mov [rdi + {r8}], r8
    mov [rdi + {r9}], r9
    mov [rdi + {r10}], r10
    mov [rdi + {r11}], r11
    mov [rdi + {r12}], r12
    mov [rdi + {r13}], r13
    mov [rdi + {r14}], r14
    mov [rdi + {r15}], r15
    pop qword ptr [rdi + {rdi}]
    xor eax, eax
4:
    // Both ways out: drop the gprs pointer and restore the callee-saved registers.
    pop rdi
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    ret
    "#,
    host_rsp = const field::HOST_RSP.0,
    host_rip = const field::HOST_RIP.0,
    rax = const core::mem::offset_of!(Gprs, rax),
    rbx = const core::mem::offset_of!(Gprs, rbx),
    rcx = const core::mem::offset_of!(Gprs, rcx),
    rdx = const core::mem::offset_of!(Gprs, rdx),
    rsi = const core::mem::offset_of!(Gprs, rsi),
    rdi = const core::mem::offset_of!(Gprs, rdi),
    rbp = const core::mem::offset_of!(Gprs, rbp),
    r8 = const core::mem::offset_of!(Gprs, r8),
    r9 = const core::mem::offset_of!(Gprs, r9),
    r10 = const core::mem::offset_of!(Gprs, r10),
    r11 = const core::mem::offset_of!(Gprs, r11),
    r12 = const core::mem::offset_of!(Gprs, r12),
    r13 = const core::mem::offset_of!(Gprs, r13),
    r14 = const core::mem::offset_of!(Gprs, r14),
    r15 = const core::mem::offset_of!(Gprs, r15),
);

unsafe extern "C" {
    fn moat_vmx_run(gprs: *mut Gprs, launched: u64) -> u64;
}

impl Drop for VmxVcpu {
    /// Clears the VMCS (writing back whatever the CPU cached of it) and frees its page; a
    /// VMCS still active on another CPU (never the case: a vCPU stops where it ran) is kept
    /// rather than cleared from the wrong CPU.
    fn drop(&mut self) {
        if self.loaded {
            let cpu = crate::arch::cpu::current_index();
            if cpu != self.cpu {
                log::warn!(
                    "vmx: a VMCS active on cpu{} dropped on cpu{cpu}: its page is kept",
                    self.cpu
                );
                return;
            }
            // SAFETY: this CPU is in VMX operation and the VMCS is this vCPU's, active here.
            if unsafe { vmcs::vmclear(self.vmcs_pa) }.is_err() {
                log::warn!("vmx: VMCLEAR at vCPU teardown failed: its page is kept");
                return;
            }
            if let Some(state) = CPUS.get(cpu).and_then(|c| c.get()) {
                let _ = state.current.compare_exchange(
                    self.vmcs_pa.as_u64(),
                    0,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
        }
        frames::free(self.vmcs_pa);
    }
}

/// Access rights of a flat 64-bit code segment (type 0xb, S, P, L, G).
const AR_CODE64: u64 = 0xa09b;
/// Access rights of a flat data segment (type 3, S, P, D/B, G).
const AR_DATA: u64 = 0xc093;
/// Access rights of a busy 64-bit TSS (type 0xb, P).
const AR_TSS64: u64 = 0x8b;
/// Access rights of an unusable segment.
const AR_UNUSABLE: u64 = 1 << 16;

/// One VMX virtual CPU.
pub struct VmxVcpu {
    info: VmxInfo,
    vmcs_pa: PhysAddr,
    eptp: u64,
    vpid: u16,
    entry: EntryState,
    gprs: Gprs,
    /// VMLAUNCH done (then VMRESUME).
    launched: bool,
    /// The VMCS was set up on the CPU that runs it.
    loaded: bool,
    /// That CPU.
    cpu: usize,
    /// The guest's CR2 (VMX does not switch it).
    cr2: u64,
    /// RIP after the instruction that caused the last exit, when known.
    next_rip: Option<u64>,
    /// The last exit: (reason, qualification, guest-physical address).
    last: (u64, u64, u64),
    /// An external interrupt requested and not yet delivered.
    irq: Option<u8>,
    /// Interrupt-window exiting is on in the VMCS (written only when it changes).
    window: bool,
}

impl VmxVcpu {
    /// A vCPU in 64-bit long mode at `entry`, in the EPT at `ept_root` tagged `vpid`.
    pub fn new(
        info: &VmxInfo,
        ept_root: PhysAddr,
        vpid: u16,
        entry: &EntryState,
    ) -> Result<Self, VcpuError> {
        let vmcs_pa = frames::alloc_zeroed().ok_or(VcpuError::OutOfMemory)?;
        // SAFETY: a zeroed frame owned by this vCPU; the revision goes in its first dword.
        unsafe { core::ptr::write_volatile(vmcs_pa.as_u64() as *mut u32, info.revision) };
        Ok(VmxVcpu {
            info: *info,
            vmcs_pa,
            eptp: vmx::eptp(ept_root),
            vpid,
            entry: *entry,
            gprs: Gprs {
                rdi: entry.rdi,
                rsi: entry.rsi,
                ..Gprs::default()
            },
            launched: false,
            loaded: false,
            cpu: 0,
            cr2: 0,
            next_rip: None,
            last: (0, 0, 0),
            irq: None,
            window: false,
        })
    }

    /// Makes this vCPU's VMCS current on the calling CPU, setting it up the first time.
    fn load(&mut self) -> Result<(), &'static str> {
        let cpu = crate::arch::cpu::current_index();
        let Some(state) = CPUS.get(cpu).and_then(|c| c.get()) else {
            return Err("VMX is not enabled on this CPU");
        };
        if !self.loaded {
            // SAFETY: in VMX operation (CPU state exists); the VMCS page is this vCPU's, not
            // current anywhere yet.
            unsafe {
                vmcs::vmclear(self.vmcs_pa).map_err(|e| e.describe())?;
                vmcs::vmptrld(self.vmcs_pa).map_err(|e| e.describe())?;
            }
            state
                .current
                .store(self.vmcs_pa.as_u64(), Ordering::Relaxed);
            if let Err((f, e)) = self.setup() {
                log::error!(
                    "vmx: VMWRITE of field {:#06x} failed: {}",
                    f.0,
                    e.describe()
                );
                return Err("the VMCS could not be written");
            }
            // `setup` wrote the primary controls without interrupt-window exiting.
            self.window = false;
            if self.info.invept {
                // SAFETY: single-context INVEPT is supported (detect); drops translations a
                // previous owner of the same tables may have left.
                let _ = unsafe { vmcs::invept_single(self.eptp) };
            }
            if self.info.invvpid {
                // SAFETY: as above for the VPID, which is not 0.
                let _ = unsafe { vmcs::invvpid_single(self.vpid) };
            }
            self.loaded = true;
            self.cpu = cpu;
        } else if cpu != self.cpu {
            return Err("the vCPU moved to another CPU (its VMCS is active on the first one)");
        } else if state.current.load(Ordering::Relaxed) != self.vmcs_pa.as_u64() {
            // SAFETY: the VMCS is this vCPU's and only ever runs on this CPU.
            unsafe { vmcs::vmptrld(self.vmcs_pa).map_err(|e| e.describe())? };
            state
                .current
                .store(self.vmcs_pa.as_u64(), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Writes every VMCS field: controls, host state (this CPU), guest state (64-bit entry).
    fn setup(&self) -> Result<(), (vmx::Field, vmcs::VmFail)> {
        let i = &self.info;
        let e = &self.entry;
        let w = |f: vmx::Field, v: u64| {
            // SAFETY: the current VMCS is this vCPU's (`load`); every value below is checked
            // against the capability MSRs (controls) or is this CPU's own state (host).
            unsafe { vmcs::write(f, v) }.map_err(|err| (f, err))
        };
        // Controls.
        w(field::PIN_CONTROLS, u64::from(i.pin))?;
        w(field::PROC_CONTROLS, u64::from(i.proc1))?;
        w(field::PROC_CONTROLS2, u64::from(i.proc2))?;
        w(field::EXIT_CONTROLS, u64::from(i.exit))?;
        w(field::ENTRY_CONTROLS, u64::from(i.entry))?;
        w(field::EXCEPTION_BITMAP, 0)?;
        w(field::EXIT_MSR_STORE_COUNT, 0)?;
        w(field::EXIT_MSR_LOAD_COUNT, 0)?;
        w(field::ENTRY_MSR_LOAD_COUNT, 0)?;
        w(field::ENTRY_INTERRUPTION_INFO, 0)?;
        w(field::EPT_POINTER, self.eptp)?;
        w(field::VPID, u64::from(self.vpid))?;
        w(field::VMCS_LINK_POINTER, u64::MAX)?;
        // CR4.VMXE is forced on by the fixed bits: owned by the hypervisor, read as 0.
        w(field::CR0_MASK, 0)?;
        w(field::CR4_MASK, CR4_VMXE)?;
        w(field::CR0_READ_SHADOW, 0)?;

        // Host: this CPU as it runs now.
        let gdt = sgdt();
        let idt = sidt();
        let tr: u16;
        // SAFETY: STR only reads the task register.
        unsafe { core::arch::asm!("str {0:x}", out(reg) tr, options(nomem, nostack)) };
        w(field::HOST_CR0, Cr0::read_raw())?;
        w(field::HOST_CR3, read_cr3())?;
        w(field::HOST_CR4, Cr4::read_raw())?;
        w(
            field::HOST_CS_SELECTOR,
            u64::from(crate::arch::cpu::KERNEL_CS),
        )?;
        for f in [
            field::HOST_SS_SELECTOR,
            field::HOST_DS_SELECTOR,
            field::HOST_ES_SELECTOR,
        ] {
            w(f, u64::from(crate::arch::cpu::KERNEL_DS))?;
        }
        w(field::HOST_FS_SELECTOR, 0)?;
        w(field::HOST_GS_SELECTOR, 0)?;
        w(field::HOST_TR_SELECTOR, u64::from(tr))?;
        w(field::HOST_FS_BASE, rdmsr(MSR_FS_BASE))?;
        w(field::HOST_GS_BASE, rdmsr(MSR_GS_BASE))?;
        w(field::HOST_TR_BASE, tss_base(gdt.base, tr))?;
        w(field::HOST_GDTR_BASE, gdt.base)?;
        w(field::HOST_IDTR_BASE, idt.base)?;
        w(field::HOST_SYSENTER_CS, 0)?;
        w(field::HOST_SYSENTER_ESP, 0)?;
        w(field::HOST_SYSENTER_EIP, 0)?;
        w(field::HOST_EFER, rdmsr(x86::msr::EFER))?;
        w(field::HOST_PAT, rdmsr(MSR_PAT))?;

        // Guest: 64-bit long mode, flat segments from its GDT, interrupts off, no IDT.
        // PE | MP | ET | NE | WP | PG, and whatever else VMX fixes to 1.
        let cr0 = vmx::fix_cr(
            1 | 1 << 1 | 1 << 4 | 1 << 5 | 1 << 16 | 1 << 31,
            i.cr0_fixed.0,
            i.cr0_fixed.1,
        );
        // PAE | PGE | OSFXSR | OSXMMEXCPT.
        let cr4_guest = 1 << 5 | 1 << 7 | 1 << 9 | 1 << 10;
        let cr4 = vmx::fix_cr(cr4_guest | CR4_VMXE, i.cr4_fixed.0, i.cr4_fixed.1);
        w(field::CR4_READ_SHADOW, cr4 & !CR4_VMXE)?;
        w(field::GUEST_CR0, cr0)?;
        w(field::GUEST_CR3, e.cr3)?;
        w(field::GUEST_CR4, cr4)?;
        w(field::GUEST_EFER, EFER_LME | EFER_LMA | EFER_NXE)?;
        w(field::GUEST_PAT, 0x0007_0406_0007_0406)?;
        // ES, CS, SS, DS, FS, GS, LDTR, TR.
        for seg in 0..8u32 {
            let (sel, limit, ar, base) = field::guest_segment(seg);
            let (s, l, a) = match seg {
                1 => (e.code_selector, 0xffff_ffff, AR_CODE64),
                6 => (0, 0, AR_UNUSABLE),
                7 => (0, 0x67, AR_TSS64),
                _ => (e.data_selector, 0xffff_ffff, AR_DATA),
            };
            w(sel, u64::from(s))?;
            w(limit, l)?;
            w(ar, a)?;
            w(base, 0)?;
        }
        w(field::GUEST_GDTR_BASE, e.gdt_base)?;
        w(field::GUEST_GDTR_LIMIT, u64::from(e.gdt_limit))?;
        w(field::GUEST_IDTR_BASE, 0)?;
        w(field::GUEST_IDTR_LIMIT, 0)?;
        w(field::GUEST_DR7, 0x400)?;
        w(field::GUEST_RSP, e.rsp)?;
        w(field::GUEST_RIP, e.rip)?;
        w(field::GUEST_RFLAGS, 0x2)?;
        w(field::GUEST_ACTIVITY_STATE, 0)?;
        w(field::GUEST_INTERRUPTIBILITY, 0)?;
        w(field::GUEST_SYSENTER_CS, 0)?;
        w(field::GUEST_SYSENTER_ESP, 0)?;
        w(field::GUEST_SYSENTER_EIP, 0)?;
        #[cfg(feature = "selftest")]
        {
            let left = BREAK_ENTRIES.load(Ordering::SeqCst);
            if left > 0
                && BREAK_ENTRIES
                    .compare_exchange(left, left - 1, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                if left == 2 {
                    log::info!("selftest: this vCPU enters with RFLAGS.VM set in 64-bit mode");
                    w(field::GUEST_RFLAGS, 0x2 | 1 << 17)?;
                } else {
                    log::info!("selftest: this vCPU enters with reserved pin-based control bit 31");
                    w(field::PIN_CONTROLS, u64::from(i.pin) | 1 << 31)?;
                }
            }
        }
        Ok(())
    }

    /// Runs the guest until its next exit and decodes it.
    pub fn run(&mut self) -> Exit {
        if let Err(why) = self.load() {
            return Exit::Failed(why);
        }
        if let Err(e) = self.offer_interrupt() {
            return Exit::Failed(e.describe());
        }
        self.next_rip = None;
        let cr2_host = Cr2::read_raw();
        // The guest's CR2 is live in the register while it runs.
        // SAFETY: CR2 only holds the last page-fault address; the hypervisor does not fault.
        unsafe { core::arch::asm!("mov cr2, {}", in(reg) self.cr2, options(nostack)) };
        // SAFETY: VMX operation on this CPU with this vCPU's VMCS current (`load`), set up
        // with every guest state confined: EPT to its partition, I/O, MSRs, HLT, interrupts
        // and NMIs exiting; host state is this CPU's. The routine saves and restores every
        // callee-saved register; interrupts are disabled in the hypervisor.
        let failed = unsafe { moat_vmx_run(&mut self.gprs, u64::from(self.launched)) };
        self.cr2 = Cr2::read_raw();
        // SAFETY: as above, restoring the host's value.
        unsafe { core::arch::asm!("mov cr2, {}", in(reg) cr2_host, options(nostack)) };
        if failed != 0 {
            let err = vmcs::read(field::VM_INSTRUCTION_ERROR) as u32;
            log::error!(
                "vmx: {} failed: VM-instruction error {err} ({})",
                if self.launched {
                    "VMRESUME"
                } else {
                    "VMLAUNCH"
                },
                vmx::instruction_error(err)
            );
            self.last = (u64::from(err), 0, 0);
            return Exit::Failed(vmx::instruction_error(err));
        }
        self.launched = true;
        self.decode()
    }

    fn rip_plus_length(&mut self) {
        let rip = vmcs::read(field::GUEST_RIP);
        let len = vmcs::read(field::EXIT_INSTRUCTION_LENGTH);
        self.next_rip = Some(rip.wrapping_add(len));
    }

    /// Delivers the requested interrupt at this entry when the guest can take it (RFLAGS.IF,
    /// no STI/MOV-SS shadow, no other event being injected); otherwise asks for an exit at the
    /// interrupt window.
    fn offer_interrupt(&mut self) -> Result<(), vmcs::VmFail> {
        let mut window = false;
        if let Some(vector) = self.irq {
            let can = vmcs::read(field::GUEST_RFLAGS) & RFLAGS_IF != 0
                && vmcs::read(field::GUEST_INTERRUPTIBILITY) & 0b11 == 0
                && vmcs::read(field::ENTRY_INTERRUPTION_INFO) & EVENT_VALID == 0;
            if can {
                // SAFETY: this vCPU's VMCS is current; valid | type 0 (external interrupt) |
                // a vector >= 32 (the interrupt sources only request those) is a valid
                // injection while the guest's IF is set and nothing else is injected.
                unsafe {
                    vmcs::write(
                        field::ENTRY_INTERRUPTION_INFO,
                        EVENT_VALID | u64::from(vector),
                    )?
                };
                self.irq = None;
            } else {
                window = self.info.interrupt_window;
            }
        }
        if window == self.window {
            return Ok(());
        }
        let proc1 = self.info.proc1
            | if window {
                proc1::INTERRUPT_WINDOW_EXITING
            } else {
                0
            };
        // SAFETY: the primary controls the capability MSRs allowed, plus interrupt-window
        // exiting only when they allow it.
        unsafe { vmcs::write(field::PROC_CONTROLS, u64::from(proc1))? };
        self.window = window;
        Ok(())
    }

    /// Asks for external interrupt `vector` as soon as the guest can take it, replacing an
    /// outstanding request (`None` withdraws it).
    pub fn request_interrupt(&mut self, vector: Option<u8>) {
        self.irq = vector;
    }

    /// The vector of the outstanding request, if not delivered yet.
    pub fn requested_interrupt(&self) -> Option<u8> {
        self.irq
    }

    fn decode(&mut self) -> Exit {
        // An external interrupt whose delivery this exit interrupted (e.g. an EPT violation
        // on the guest's stack) is requested again, so it is not lost.
        let vectoring = vmcs::read(field::IDT_VECTORING_INFO);
        if vectoring & EVENT_VALID != 0 && (vectoring >> 8) & 7 == 0 && self.irq.is_none() {
            self.irq = Some(vectoring as u8);
        }
        let raw = vmcs::read(field::EXIT_REASON);
        let qual = vmcs::read(field::EXIT_QUALIFICATION);
        let r = ExitReason::decode(raw as u32);
        let gpa = if matches!(r.basic, reason::EPT_VIOLATION | reason::EPT_MISCONFIG) {
            vmcs::read(field::GUEST_PHYSICAL_ADDRESS)
        } else {
            0
        };
        self.last = (raw, qual, gpa);
        if r.entry_failure {
            log::error!(
                "vmx: VM entry failed: exit reason {} ({}), exit qualification {qual:#x}",
                r.basic,
                vmx::reason_name(r.basic)
            );
            return Exit::InvalidState;
        }
        match r.basic {
            reason::VMCALL => {
                self.rip_plus_length();
                Exit::Hypercall
            }
            reason::CPUID => {
                self.rip_plus_length();
                Exit::Cpuid
            }
            reason::HLT => {
                self.rip_plus_length();
                Exit::Halt
            }
            reason::RDMSR | reason::WRMSR => {
                self.rip_plus_length();
                Exit::Msr {
                    write: r.basic == reason::WRMSR,
                }
            }
            reason::IO => {
                self.rip_plus_length();
                let q = IoQualification::decode(qual);
                Exit::Io(IoAccess {
                    port: q.port,
                    size: q.size,
                    write: !q.input,
                    string: q.string,
                    rep: q.rep,
                })
            }
            reason::EPT_VIOLATION => {
                let v = EptViolation::decode(qual);
                Exit::NestedPageFault {
                    gpa,
                    access: Access {
                        present: v.present,
                        write: v.write,
                        fetch: v.fetch,
                    },
                }
            }
            reason::CR_ACCESS => {
                let a = CrAccess::decode(qual);
                if a.cr == 8 && (a.kind == CrAccess::MOV_TO || a.kind == CrAccess::MOV_FROM) {
                    self.rip_plus_length();
                    Exit::Cr8 {
                        write: a.kind == CrAccess::MOV_TO,
                        gpr: a.gpr,
                    }
                } else {
                    Exit::Unsupported {
                        what: "control-register access",
                        code: qual,
                    }
                }
            }
            reason::EPT_MISCONFIG => Exit::Unsupported {
                what: "EPT misconfiguration",
                code: gpa,
            },
            reason::TRIPLE_FAULT => Exit::TripleFault,
            reason::EXTERNAL_INTERRUPT | reason::INIT | reason::SIPI | reason::INTERRUPT_WINDOW => {
                Exit::Interrupted
            }
            reason::EXCEPTION_NMI => {
                let info = vmcs::read(field::EXIT_INTERRUPTION_INFO);
                // Type 2: NMI.
                if (info >> 8) & 7 == 2 {
                    Exit::Interrupted
                } else {
                    Exit::Exception {
                        vector: info as u8,
                        error: vmcs::read(field::EXIT_INTERRUPTION_ERROR),
                    }
                }
            }
            other => Exit::Unsupported {
                what: vmx::reason_name(other),
                code: u64::from(other),
            },
        }
    }

    /// Advances RIP past the instruction that caused the last exit; an STI or MOV-SS
    /// shadow that instruction was in (`sti; hlt`) ends with it, as it would have on the
    /// processor (left in place, an interrupt waiting for the window would come one
    /// instruction late, or never when that instruction is a CLI).
    pub fn complete_instruction(&mut self) -> bool {
        match self.next_rip.take() {
            Some(r) => {
                self.set_reg(Reg::Rip, r);
                let state = vmcs::read(field::GUEST_INTERRUPTIBILITY);
                if state & 0b11 != 0 {
                    // SAFETY: this vCPU's VMCS is current (an exit was just handled on this
                    // CPU); clearing the STI/MOV-SS blocking bits is always a valid state.
                    let _ = unsafe { vmcs::write(field::GUEST_INTERRUPTIBILITY, state & !0b11) };
                }
                true
            }
            None => false,
        }
    }

    fn vmcs_field(r: Reg) -> Option<vmx::Field> {
        Some(match r {
            Reg::Rsp => field::GUEST_RSP,
            Reg::Rip => field::GUEST_RIP,
            Reg::Rflags => field::GUEST_RFLAGS,
            Reg::Cr0 => field::GUEST_CR0,
            Reg::Cr3 => field::GUEST_CR3,
            Reg::Cr4 => field::GUEST_CR4,
            Reg::Efer => field::GUEST_EFER,
            _ => return None,
        })
    }

    /// Reads a guest register (before the first entry: the entry state).
    pub fn reg(&self, r: Reg) -> u64 {
        let g = &self.gprs;
        if let Some(f) = Self::vmcs_field(r) {
            if !self.loaded {
                return match r {
                    Reg::Rsp => self.entry.rsp,
                    Reg::Rip => self.entry.rip,
                    Reg::Cr3 => self.entry.cr3,
                    Reg::Rflags => 2,
                    Reg::Efer => EFER_LME | EFER_LMA | EFER_NXE,
                    _ => 0,
                };
            }
            let v = vmcs::read(f);
            return if r == Reg::Cr4 { v & !CR4_VMXE } else { v };
        }
        match r {
            Reg::Rax => g.rax,
            Reg::Rbx => g.rbx,
            Reg::Rcx => g.rcx,
            Reg::Rdx => g.rdx,
            Reg::Rsi => g.rsi,
            Reg::Rdi => g.rdi,
            Reg::Rbp => g.rbp,
            Reg::R8 => g.r8,
            Reg::R9 => g.r9,
            Reg::R10 => g.r10,
            Reg::R11 => g.r11,
            Reg::R12 => g.r12,
            Reg::R13 => g.r13,
            Reg::R14 => g.r14,
            Reg::R15 => g.r15,
            Reg::Cr2 => self.cr2,
            _ => 0,
        }
    }

    /// Writes a guest register (before the first entry only the general-purpose ones and RIP
    /// and RSP take effect).
    pub fn set_reg(&mut self, r: Reg, v: u64) {
        if let Some(f) = Self::vmcs_field(r) {
            if !self.loaded {
                match r {
                    Reg::Rsp => self.entry.rsp = v,
                    Reg::Rip => self.entry.rip = v,
                    _ => {}
                }
                return;
            }
            let v = match r {
                Reg::Rflags => v | 0x2,
                Reg::Cr4 => v | CR4_VMXE,
                _ => v,
            };
            // SAFETY: this vCPU's VMCS is current (it is loaded and runs only here); a guest
            // register value cannot affect the host (a bad one fails the next entry).
            let _ = unsafe { vmcs::write(f, v) };
            return;
        }
        let g = &mut self.gprs;
        match r {
            Reg::Rax => g.rax = v,
            Reg::Rbx => g.rbx = v,
            Reg::Rcx => g.rcx = v,
            Reg::Rdx => g.rdx = v,
            Reg::Rsi => g.rsi = v,
            Reg::Rdi => g.rdi = v,
            Reg::Rbp => g.rbp = v,
            Reg::R8 => g.r8 = v,
            Reg::R9 => g.r9 = v,
            Reg::R10 => g.r10 = v,
            Reg::R11 => g.r11 = v,
            Reg::R12 => g.r12 = v,
            Reg::R13 => g.r13 = v,
            Reg::R14 => g.r14 = v,
            Reg::R15 => g.r15 = v,
            Reg::Cr2 => self.cr2 = v,
            _ => {}
        }
    }

    /// Queues an exception for delivery at the next entry. Interrupts and NMIs are not
    /// delivered by this backend yet (there is no virtual interrupt source on VMX).
    pub fn inject(&mut self, e: Event) {
        let Event::Exception { vector, error } = e else {
            log::warn!("vmx: {e:?} not delivered: interrupt injection is not implemented on VMX");
            return;
        };
        // Valid | type 3 (hardware exception) | deliver error code | vector.
        let info = 1u64 << 31 | 3 << 8 | u64::from(error.is_some()) << 11 | u64::from(vector);
        // SAFETY: this vCPU's VMCS is current; an exception with a matching error-code bit
        // is a valid injection.
        unsafe {
            let _ = vmcs::write(field::ENTRY_INTERRUPTION_INFO, info);
            let _ = vmcs::write(field::ENTRY_EXCEPTION_ERROR, u64::from(error.unwrap_or(0)));
        }
    }

    /// The raw exit reason, qualification and guest-physical address of the last exit.
    pub fn raw_exit(&self) -> (u64, u64, u64) {
        self.last
    }
}
