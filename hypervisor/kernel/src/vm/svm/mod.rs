//! The AMD SVM backend: detection, per-CPU enable (EFER.SVME, host save area), the shared I/O
//! and MSR permission maps, ASIDs, and [`SvmVcpu`]: a VMCB plus the guest's general-purpose
//! registers, entered with `VMRUN` and decoded on `#VMEXIT`.
//!
//! Nothing here is visible outside [`crate::vm`]'s backend-neutral vCPU layer.

pub mod npt;
pub mod vmcb;

use raw_cpuid::CpuId;
use spin::Once;

use crate::arch::x86;
use crate::mm::{frames, PhysAddr, PAGE_SIZE};
use crate::vm::vcpu::{
    Access, EntryState, Event, Exit, IoAccess, Reg, TagBitmap, Unsupported, VcpuError,
};
use vmcb::{exit_code, EventInj, Intercept3, Intercept4, Segment, Vmcb};

const MSR_VM_CR: u32 = 0xc001_0114;
const MSR_VM_HSAVE_PA: u32 = 0xc001_0117;
const VM_CR_SVMDIS: u64 = 1 << 4;
const EFER_SVME: u64 = 1 << 12;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

/// What CPUID says about SVM on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SvmInfo {
    /// SVM revision.
    pub revision: u32,
    /// Number of ASIDs (ASID 0 is the host's).
    pub asids: u32,
    /// Nested paging.
    pub npt: bool,
    /// The VMCB's next-RIP field is filled on exits (NRIPS).
    pub nrips: bool,
}

/// Detects SVM with nested paging.
pub fn detect() -> Result<SvmInfo, Unsupported> {
    // CPUID 0x8000_0001 ECX.SVM and leaf 0x8000_000A, named by `raw_cpuid` (which, as AMD's
    // manual defines the bit, reads it on AuthenticAMD CPUs only).
    let Some(svm) = CpuId::new().get_svm_info() else {
        return Err(Unsupported::NoSvm);
    };
    // SAFETY: VM_CR exists on every CPU that reports SVM.
    if unsafe { x86::rdmsr(MSR_VM_CR) } & VM_CR_SVMDIS != 0 {
        return Err(Unsupported::SvmDisabled);
    }
    let info = SvmInfo {
        revision: u32::from(svm.revision()),
        asids: svm.supported_asids(),
        npt: svm.has_nested_paging(),
        nrips: svm.has_nrip(),
    };
    if !info.npt {
        return Err(Unsupported::NoNestedPaging);
    }
    if info.asids < 2 {
        return Err(Unsupported::NoAsids);
    }
    Ok(info)
}

/// Per-CPU SVM pages: the host save area (`VM_HSAVE_PA`) and the page VMSAVE/VMLOAD keep the
/// host's FS/GS/TR/LDTR/syscall state in across a guest run.
struct CpuPages {
    host_vmsave: PhysAddr,
}

static CPU_PAGES: [Once<CpuPages>; crate::arch::cpu::MAX_CPUS] =
    [const { Once::new() }; crate::arch::cpu::MAX_CPUS];

/// Turns SVM on for the calling CPU (idempotent).
pub fn enable_this_cpu() -> Result<(), VcpuError> {
    let cpu = crate::arch::cpu::current_index();
    let slot = CPU_PAGES.get(cpu).ok_or(VcpuError::OutOfMemory)?;
    if slot.is_completed() {
        return Ok(());
    }
    let hsave = frames::alloc_zeroed().ok_or(VcpuError::OutOfMemory)?;
    let host_vmsave = frames::alloc_zeroed().ok_or(VcpuError::OutOfMemory)?;
    // SAFETY: SVM was detected (see `detect`); setting EFER.SVME only enables the SVM
    // instructions, and the host save area is a zeroed page owned by this CPU forever.
    unsafe {
        x86::wrmsr(x86::msr::EFER, x86::rdmsr(x86::msr::EFER) | EFER_SVME);
        x86::wrmsr(MSR_VM_HSAVE_PA, hsave.as_u64());
    }
    slot.call_once(|| CpuPages { host_vmsave });
    Ok(())
}

/// The I/O and MSR permission maps, shared by every guest: all ones, so every port access and
/// every MSR access exits.
struct PermissionMaps {
    iopm: PhysAddr,
    msrpm: PhysAddr,
}

static MAPS: Once<Option<PermissionMaps>> = Once::new();

fn permission_maps() -> Option<&'static PermissionMaps> {
    MAPS.call_once(|| {
        let iopm = frames::alloc_contiguous(3, PAGE_SIZE)?;
        let msrpm = frames::alloc_contiguous(2, PAGE_SIZE)?;
        // SAFETY: freshly allocated, identity-mapped frames owned by these maps forever.
        unsafe {
            core::ptr::write_bytes(iopm.as_u64() as *mut u8, 0xff, 3 * PAGE_SIZE as usize);
            core::ptr::write_bytes(msrpm.as_u64() as *mut u8, 0xff, 2 * PAGE_SIZE as usize);
        }
        Some(PermissionMaps { iopm, msrpm })
    })
    .as_ref()
}

/// ASID allocator (ASID 0 is the host's).
static ASIDS: TagBitmap = TagBitmap::new();

/// Allocates an ASID below `limit` (from [`SvmInfo::asids`]).
pub fn alloc_asid(limit: u32) -> Option<u32> {
    ASIDS.alloc(limit)
}

/// Returns an ASID to the allocator.
pub fn free_asid(asid: u32) {
    ASIDS.free(asid);
}

/// Guest general-purpose registers VMRUN does not keep in the VMCB (RAX and RSP live there).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct Gprs {
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
    .section .text.moat_svm_run, "ax"
    .global moat_svm_run
    // moat_svm_run(gprs: *mut Gprs [rdi], vmcb_pa [rsi], host_vmsave_pa [rdx])
moat_svm_run:
    push rbp
    push rbx
    push r12
    push r13
    push r14
    push r15
    push rdi
    push rdx
    push rsi
    clgi
    // Host IF = 1 while the guest runs (GIF = 0 keeps interrupts out of this sequence): a
    // physical interrupt then makes the guest exit (INTR intercept with V_INTR_MASKING).
    sti
    mov rax, rdx
    vmsave rax
    mov rax, rsi
    vmload rax
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
    vmrun rax
    // #VMEXIT: RAX and RSP are the host's again, every other GPR is the guest's.
    vmsave rax
    push rdi
    mov rdi, [rsp + 24]
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
    mov rax, [rsp + 8]
    vmload rax
    // Back to the hypervisor's interrupts-off rule before GIF opens again; a pending
    // interrupt is taken by the exit handler (Exit::Interrupted).
    cli
    stgi
    add rsp, 24
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    ret
    "#,
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
    fn moat_svm_run(gprs: *mut Gprs, vmcb_pa: PhysAddr, host_vmsave_pa: PhysAddr);
}

/// Instruction lengths of the intercepted instructions the backend completes (without NRIPS,
/// as under QEMU TCG, the VMCB does not say).
const LEN_VMMCALL: u64 = 3;
const LEN_CPUID: u64 = 2;
const LEN_MSR: u64 = 2;
const LEN_HLT: u64 = 1;

/// One SVM virtual CPU.
pub struct SvmVcpu {
    vmcb: &'static mut Vmcb,
    vmcb_pa: PhysAddr,
    gprs: Gprs,
    nrips: bool,
    /// RIP after the instruction that caused the last exit, when known.
    next_rip: Option<u64>,
    first_run: bool,
}

impl Drop for SvmVcpu {
    /// Frees the VMCB page. Nothing refers to it once the vCPU stops: VMRUN is not running
    /// on it (the vCPU is dropped on the CPU that ran it, after its last exit), and a page
    /// reused as another vCPU's VMCB starts zeroed, so its clean bits make the CPU reload
    /// every field it might have cached for this address.
    fn drop(&mut self) {
        frames::free(self.vmcb_pa);
    }
}

/// Where each guest register lives (the general registers the VMCB does not hold are in
/// `gprs`): evaluates `$e` with `$p` a reference (`mut`: a mutable one) to `$r`'s place. The
/// one table [`SvmVcpu::reg`] and [`SvmVcpu::set_reg`] share.
macro_rules! reg_place {
    ($s:ident, $r:expr, mut $p:ident => $e:expr) => {
        reg_place!(@place $s, $r, [mut] $p => $e)
    };
    ($s:ident, $r:expr, $p:ident => $e:expr) => {
        reg_place!(@place $s, $r, [] $p => $e)
    };
    (@place $s:ident, $r:expr, [$($m:tt)?] $p:ident => $e:expr) => {{
        let g = & $($m)? $s.gprs;
        let save = & $($m)? $s.vmcb.save;
        let $p = match $r {
            Reg::Rax => & $($m)? save.rax,
            Reg::Rbx => & $($m)? g.rbx,
            Reg::Rcx => & $($m)? g.rcx,
            Reg::Rdx => & $($m)? g.rdx,
            Reg::Rsi => & $($m)? g.rsi,
            Reg::Rdi => & $($m)? g.rdi,
            Reg::Rbp => & $($m)? g.rbp,
            Reg::Rsp => & $($m)? save.rsp,
            Reg::R8 => & $($m)? g.r8,
            Reg::R9 => & $($m)? g.r9,
            Reg::R10 => & $($m)? g.r10,
            Reg::R11 => & $($m)? g.r11,
            Reg::R12 => & $($m)? g.r12,
            Reg::R13 => & $($m)? g.r13,
            Reg::R14 => & $($m)? g.r14,
            Reg::R15 => & $($m)? g.r15,
            Reg::Rip => & $($m)? save.rip,
            Reg::Rflags => & $($m)? save.rflags,
            Reg::Cr0 => & $($m)? save.cr0,
            Reg::Cr2 => & $($m)? save.cr2,
            Reg::Cr3 => & $($m)? save.cr3,
            Reg::Cr4 => & $($m)? save.cr4,
            Reg::Efer => & $($m)? save.efer,
        };
        $e
    }};
}

impl SvmVcpu {
    /// A vCPU in 64-bit long mode at `entry`, in the address space `npt_root` tagged `asid`.
    pub fn new(
        info: &SvmInfo,
        npt_root: PhysAddr,
        asid: u32,
        entry: &EntryState,
    ) -> Result<Self, VcpuError> {
        let maps = permission_maps().ok_or(VcpuError::OutOfMemory)?;
        let vmcb_pa = frames::alloc_zeroed().ok_or(VcpuError::OutOfMemory)?;
        // SAFETY: a zeroed, page-aligned frame owned by this vCPU alone; all-zero bytes are a
        // valid `Vmcb` (plain integers).
        let vmcb = unsafe { &mut *(vmcb_pa.as_u64() as *mut Vmcb) };
        let c = &mut vmcb.control;
        c.intercept3 = (Intercept3::INTR
            | Intercept3::NMI
            | Intercept3::SMI
            | Intercept3::INIT
            | Intercept3::CPUID
            | Intercept3::INVD
            | Intercept3::HLT
            | Intercept3::INVLPGA
            | Intercept3::IOIO_PROT
            | Intercept3::MSR_PROT
            | Intercept3::TASK_SWITCH
            | Intercept3::SHUTDOWN)
            .bits();
        c.intercept4 = (Intercept4::VMRUN
            | Intercept4::VMMCALL
            | Intercept4::VMLOAD
            | Intercept4::VMSAVE
            | Intercept4::STGI
            | Intercept4::CLGI
            | Intercept4::SKINIT
            | Intercept4::ICEBP
            | Intercept4::WBINVD
            | Intercept4::MONITOR
            | Intercept4::MWAIT
            | Intercept4::XSETBV)
            .bits();
        // #MC always comes to the hypervisor.
        c.intercept_exceptions = 1 << 18;
        c.iopm_base_pa = maps.iopm.as_u64();
        c.msrpm_base_pa = maps.msrpm.as_u64();
        c.guest_asid = asid;
        c.tlb_control = vmcb::tlb_control::FLUSH_ASID;
        c.int_ctl = vmcb::V_INTR_MASKING;
        c.np_enable = 1;
        c.n_cr3 = npt_root.as_u64();

        let s = &mut vmcb.save;
        let code = Segment::flat(entry.code_selector, vmcb::ATTR_CODE64);
        let data = Segment::flat(entry.data_selector, vmcb::ATTR_DATA);
        s.cs = code;
        s.ds = data;
        s.es = data;
        s.ss = data;
        s.fs = data;
        s.gs = data;
        s.gdtr = Segment {
            selector: 0,
            attrib: 0,
            limit: entry.gdt_limit as u32,
            base: entry.gdt_base,
        };
        s.idtr = Segment::default();
        s.ldtr = Segment::default();
        s.tr = Segment {
            selector: 0,
            attrib: vmcb::ATTR_TSS64,
            limit: 0x67,
            base: 0,
        };
        s.cpl = 0;
        s.efer = EFER_SVME | EFER_LME | EFER_LMA | EFER_NXE;
        // PE | MP | ET | NE | WP | PG
        s.cr0 = 1 | 1 << 1 | 1 << 4 | 1 << 5 | 1 << 16 | 1 << 31;
        // PAE | PGE | OSFXSR | OSXMMEXCPT
        s.cr4 = 1 << 5 | 1 << 7 | 1 << 9 | 1 << 10;
        s.cr3 = entry.cr3;
        s.dr6 = 0xffff_0ff0;
        s.dr7 = 0x400;
        s.rflags = 0x2;
        s.rip = entry.rip;
        s.rsp = entry.rsp;
        s.g_pat = 0x0007_0406_0007_0406;
        let gprs = Gprs {
            rdi: entry.rdi,
            rsi: entry.rsi,
            ..Gprs::default()
        };
        Ok(SvmVcpu {
            vmcb,
            vmcb_pa,
            gprs,
            nrips: info.nrips,
            next_rip: None,
            first_run: true,
        })
    }

    /// Runs the guest until its next exit and decodes it.
    pub fn run(&mut self) -> Exit {
        let cpu = crate::arch::cpu::current_index();
        let Some(pages) = CPU_PAGES.get(cpu).and_then(|p| p.get()) else {
            return Exit::Failed("SVM is not enabled on this CPU");
        };
        self.vmcb.control.tlb_control = if self.first_run {
            vmcb::tlb_control::FLUSH_ASID
        } else {
            vmcb::tlb_control::NOTHING
        };
        self.first_run = false;
        self.next_rip = None;
        // SAFETY: SVM is enabled on this CPU with its host save area (`enable_this_cpu`); the
        // VMCB is a page owned by this vCPU, set up by `new` with VMRUN intercepted, a valid
        // ASID and nested paging confining the guest to its partition; `host_vmsave` is this
        // CPU's page. The routine saves and restores every callee-saved register and the
        // host's VMSAVE state; interrupts are disabled in the hypervisor.
        unsafe { moat_svm_run(&mut self.gprs, self.vmcb_pa, pages.host_vmsave) };
        self.decode()
    }

    fn rip_plus(&mut self, len: u64) {
        let rip = self.vmcb.save.rip;
        self.next_rip = Some(if self.nrips && self.vmcb.control.next_rip != 0 {
            self.vmcb.control.next_rip
        } else {
            rip.wrapping_add(len)
        });
    }

    fn decode(&mut self) -> Exit {
        self.redeliver_interrupted();
        let c = &self.vmcb.control;
        let (code, info1, info2) = (c.exit_code, c.exit_info1, c.exit_info2);
        match code {
            exit_code::VMMCALL => {
                self.rip_plus(LEN_VMMCALL);
                Exit::Hypercall
            }
            exit_code::CPUID => {
                self.rip_plus(LEN_CPUID);
                Exit::Cpuid
            }
            exit_code::HLT => {
                self.rip_plus(LEN_HLT);
                Exit::Halt
            }
            exit_code::MSR => {
                self.rip_plus(LEN_MSR);
                Exit::Msr {
                    write: info1 & 1 != 0,
                }
            }
            exit_code::IOIO => {
                // EXITINFO2 holds the next RIP for I/O exits whatever NRIPS says.
                self.next_rip = Some(info2);
                let size = if info1 & (1 << 4) != 0 {
                    1
                } else if info1 & (1 << 5) != 0 {
                    2
                } else {
                    4
                };
                Exit::Io(IoAccess {
                    port: (info1 >> 16) as u16,
                    size,
                    write: info1 & 1 == 0,
                    string: info1 & (1 << 2) != 0,
                    rep: info1 & (1 << 3) != 0,
                })
            }
            exit_code::NPF => Exit::NestedPageFault {
                gpa: info2,
                access: Access {
                    present: info1 & 1 != 0,
                    write: info1 & (1 << 1) != 0,
                    fetch: info1 & (1 << 4) != 0,
                },
            },
            exit_code::SHUTDOWN => Exit::TripleFault,
            exit_code::INTR | exit_code::NMI | exit_code::SMI | exit_code::INIT => {
                Exit::Interrupted
            }
            exit_code::INVALID => Exit::InvalidState,
            c if (exit_code::EXCP_BASE..exit_code::EXCP_BASE + 32).contains(&c) => {
                Exit::Exception {
                    vector: (c - exit_code::EXCP_BASE) as u8,
                    error: info1,
                }
            }
            exit_code::VMRUN => Exit::Unsupported {
                what: "VMRUN (nested virtualisation)",
                code,
            },
            other => Exit::Unsupported {
                what: unsupported_name(other),
                code: other,
            },
        }
    }

    /// An event whose delivery this exit interrupted (`EXITINTINFO`: e.g. a nested page
    /// fault on the guest's stack or IDT while the processor delivered it) is delivered
    /// again, so it is not lost: an external interrupt (V_IRQ is already clear: the processor
    /// had taken it) is requested again through V_IRQ, so it still counts as not delivered
    /// (QEMU records a hardware interrupt as an "exception" with its vector >= 32, which is
    /// no exception: treated the same); an exception or NMI is injected again at the next
    /// entry. A software interrupt is not: its INT instruction runs again.
    fn redeliver_interrupted(&mut self) {
        let info = EventInj(self.vmcb.control.exit_int_info);
        if !info.valid() {
            return;
        }
        match info.kind() {
            EventInj::TYPE_INTR => {
                self.request_interrupt(info.vector());
            }
            EventInj::TYPE_EXCEPTION if info.vector() >= 32 => {
                self.request_interrupt(info.vector());
            }
            EventInj::TYPE_EXCEPTION | EventInj::TYPE_NMI => {
                self.vmcb.control.event_inj = info.0;
            }
            _ => {}
        }
    }

    /// Advances RIP past the instruction that caused the last exit.
    pub fn complete_instruction(&mut self) -> bool {
        match self.next_rip.take() {
            Some(r) => {
                self.vmcb.save.rip = r;
                true
            }
            None => false,
        }
    }

    /// Reads a guest register.
    pub fn reg(&self, r: Reg) -> u64 {
        reg_place!(self, r, p => *p)
    }

    /// Writes a guest register (RFLAGS keeps its reserved bit 1; EFER keeps SVME, which VMRUN
    /// requires).
    pub fn set_reg(&mut self, r: Reg, v: u64) {
        let v = match r {
            Reg::Rflags => v | 0x2,
            Reg::Efer => v | EFER_SVME,
            _ => v,
        };
        reg_place!(self, r, mut p => *p = v)
    }

    /// Queues an event for delivery at the next entry.
    pub fn inject(&mut self, e: Event) {
        let ev = match e {
            Event::Exception { vector, error } => {
                EventInj::new(EventInj::TYPE_EXCEPTION, vector, error)
            }
            Event::Interrupt(v) => EventInj::new(EventInj::TYPE_INTR, v, None),
            Event::Nmi => EventInj::new(EventInj::TYPE_NMI, 2, None),
        };
        self.vmcb.control.event_inj = ev.0;
    }

    /// Requests virtual interrupt `vector` through V_IRQ (priority 15, TPR ignored): the
    /// processor delivers it when the guest's RFLAGS.IF allows and clears V_IRQ when it is
    /// taken. `false` while an earlier request is still outstanding.
    pub fn request_interrupt(&mut self, vector: u8) -> bool {
        let c = &mut self.vmcb.control;
        if c.int_ctl & vmcb::V_IRQ != 0 {
            return false;
        }
        c.int_ctl = (c.int_ctl & !(vmcb::V_INTR_PRIO_MASK | vmcb::V_INTR_VECTOR_MASK))
            | vmcb::V_IRQ
            | vmcb::V_IGN_TPR
            | (0xf << vmcb::V_INTR_PRIO_SHIFT)
            | (u64::from(vector) << vmcb::V_INTR_VECTOR_SHIFT);
        true
    }

    /// The vector of an outstanding V_IRQ request.
    pub fn requested_interrupt(&self) -> Option<u8> {
        let i = self.vmcb.control.int_ctl;
        (i & vmcb::V_IRQ != 0).then_some((i >> vmcb::V_INTR_VECTOR_SHIFT) as u8)
    }

    /// The raw exit code and information of the last exit (for diagnostics).
    pub fn raw_exit(&self) -> (u64, u64, u64) {
        let c = &self.vmcb.control;
        (c.exit_code, c.exit_info1, c.exit_info2)
    }
}

fn unsupported_name(code: u64) -> &'static str {
    match code {
        0x00..=0x0f => "CR read",
        0x10..=0x1f => "CR write",
        0x20..=0x3f => "DR access",
        0x76 => "INVD",
        0x7a => "INVLPGA",
        0x7d => "task switch",
        0x82 => "VMLOAD",
        0x83 => "VMSAVE",
        0x84 => "STGI",
        0x85 => "CLGI",
        0x86 => "SKINIT",
        0x88 => "ICEBP",
        0x89 => "WBINVD",
        0x8a => "MONITOR",
        0x8b => "MWAIT",
        0x8d => "XSETBV",
        _ => "an unhandled exit",
    }
}
