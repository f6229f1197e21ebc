//! The backend-neutral vCPU layer: what the rest of the hypervisor sees of hardware
//! virtualisation. [`Backend`] says which extension the CPU has; [`Stage2`] is a guest's
//! second-stage address space; [`Vcpu`] is created in 64-bit long mode, runs until an [`Exit`],
//! and exposes registers, instruction completion and event injection. The backends are AMD
//! SVM ([`svm`]) and Intel VMX ([`vmx`]); no SVM or VMX type leaves this module.

use alloc::boxed::Box;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use moat_ptab::format::Format;
use moat_ptab::{NoSink, PageTable};

use super::{svm, vmx};
use crate::mm::paging::CONFIG;
use crate::mm::tables::HostTables;
use crate::mm::PhysAddr;

/// Why guests cannot run on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsupported {
    /// Neither SVM nor VMX.
    NoVirtualization,
    /// Intel VMX is present but cannot run guests here (why).
    Vmx(&'static str),
    /// No AMD SVM.
    NoSvm,
    /// SVM is disabled by firmware (VM_CR.SVMDIS).
    SvmDisabled,
    /// No nested paging.
    NoNestedPaging,
    /// Fewer than two ASIDs.
    NoAsids,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NoVirtualization => "the CPU has neither AMD SVM nor Intel VMX",
            Self::Vmx(why) => why,
            Self::NoSvm => "the CPU has no AMD SVM",
            Self::SvmDisabled => "AMD SVM is disabled by firmware (VM_CR.SVMDIS)",
            Self::NoNestedPaging => "AMD SVM without nested paging",
            Self::NoAsids => "AMD SVM with fewer than two ASIDs",
        })
    }
}

/// Errors creating address spaces and vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuError {
    /// No frames.
    OutOfMemory,
    /// Every address-space identifier is in use.
    NoAsid,
    /// A mapping was misaligned, out of range or overlapping.
    BadMapping,
}

impl fmt::Display for VcpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::OutOfMemory => "out of memory",
            Self::NoAsid => "no free address-space identifier",
            Self::BadMapping => "bad second-stage mapping",
        })
    }
}

/// The hardware virtualisation backend of this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// AMD SVM with nested paging.
    Svm(svm::SvmInfo),
    /// Intel VMX with EPT and VPID.
    Vmx(vmx::VmxInfo),
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Svm(i) => write!(
                f,
                "AMD SVM rev {} with nested paging, {} ASIDs, NRIPS {}, decode assists {}",
                i.revision,
                i.asids,
                if i.nrips { "yes" } else { "no" },
                if i.decode_assists { "yes" } else { "no" }
            ),
            Backend::Vmx(i) => write!(
                f,
                "Intel VMX (VMCS revision {}) with EPT and VPID, controls pin {:#x} proc {:#x} proc2 {:#x} exit {:#x} entry {:#x}",
                i.revision, i.pin, i.proc1, i.proc2, i.exit, i.entry
            ),
        }
    }
}

impl Backend {
    /// Detects the backend: SVM when present, else VMX.
    pub fn detect() -> Result<Backend, Unsupported> {
        match svm::detect() {
            Ok(i) => Ok(Backend::Svm(i)),
            Err(Unsupported::NoSvm) => vmx::detect().map(Backend::Vmx),
            Err(e) => Err(e),
        }
    }

    /// The hypercall instruction guests must use (CPUID `0x4000_0001` ECX).
    pub fn hypercall_instruction(&self) -> moat_abi::Instruction {
        match self {
            Backend::Svm(_) => moat_abi::Instruction::Vmmcall,
            Backend::Vmx(_) => moat_abi::Instruction::Vmcall,
        }
    }

    /// Turns the extension on for the calling CPU (idempotent).
    pub fn enable_this_cpu(&self) -> Result<(), VcpuError> {
        match self {
            Backend::Svm(_) => svm::enable_this_cpu(),
            Backend::Vmx(i) => vmx::enable_this_cpu(i),
        }
    }

    /// A new, empty second-stage address space.
    pub fn new_stage2(&self) -> Result<Stage2, VcpuError> {
        match self {
            Backend::Svm(i) => {
                let npt = svm::npt::Npt::new()?;
                let asid = svm::alloc_asid(i.asids).ok_or(VcpuError::NoAsid)?;
                Ok(Stage2 {
                    inner: Stage2Inner::Npt { npt, asid },
                })
            }
            Backend::Vmx(_) => {
                let ept = vmx::ept::Ept::new()?;
                let vpid = vmx::alloc_vpid().ok_or(VcpuError::NoAsid)?;
                Ok(Stage2 {
                    inner: Stage2Inner::Ept { ept, vpid },
                })
            }
        }
    }

    /// A vCPU of the guest whose address space is `space`, entering 64-bit mode at `entry`.
    pub fn new_vcpu(&self, space: &Stage2, entry: &EntryState) -> Result<Vcpu, VcpuError> {
        match (self, &space.inner) {
            (Backend::Svm(i), Stage2Inner::Npt { npt, asid }) => Ok(Vcpu {
                inner: VcpuInner::Svm(Box::new(svm::SvmVcpu::new(i, npt.root(), *asid, entry)?)),
            }),
            (Backend::Vmx(i), Stage2Inner::Ept { ept, vpid }) => Ok(Vcpu {
                inner: VcpuInner::Vmx(Box::new(vmx::VmxVcpu::new(i, ept.root(), *vpid, entry)?)),
            }),
            _ => Err(VcpuError::BadMapping),
        }
    }
}

enum Stage2Inner {
    Npt { npt: svm::npt::Npt, asid: u32 },
    Ept { ept: vmx::ept::Ept, vpid: u16 },
}

/// A guest's second-stage address space (guest-physical to host-physical).
pub struct Stage2 {
    inner: Stage2Inner,
}

/// How a guest-physical range is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemKind {
    /// RAM: read, write, execute, cached.
    Ram,
    /// Device registers: read, write, uncached, no execute.
    Mmio,
}

impl Stage2 {
    /// Maps guest-physical `[gpa, gpa + len)` to host-physical `[hpa, hpa + len)`.
    pub fn map(
        &mut self,
        gpa: u64,
        hpa: PhysAddr,
        len: u64,
        kind: MemKind,
    ) -> Result<(), VcpuError> {
        match &mut self.inner {
            Stage2Inner::Npt { npt, .. } => npt.map(gpa, hpa, len, svm::npt::flags(kind)),
            Stage2Inner::Ept { ept, .. } => ept.map(gpa, hpa, len, vmx::ept::attr(kind)),
        }
    }

    /// The host-physical address of `gpa`, if mapped.
    pub fn translate(&self, gpa: u64) -> Option<PhysAddr> {
        match &self.inner {
            Stage2Inner::Npt { npt, .. } => npt.translate(gpa),
            Stage2Inner::Ept { ept, .. } => ept.translate(gpa),
        }
    }
}

/// A guest's second-stage tables in the `moat_ptab` format `F` (NPT or EPT) over the host
/// table memory: what the two backends' stage-2 wrappers share.
pub struct Stage2Tables<F: Format> {
    tables: PageTable<F>,
}

impl<F: Format> Stage2Tables<F> {
    /// Empty tables (4 levels, 48-bit guest-physical addresses, 2 MiB pages).
    pub fn new() -> Result<Self, VcpuError> {
        Ok(Stage2Tables {
            tables: PageTable::new(&HostTables, CONFIG).map_err(|_| VcpuError::OutOfMemory)?,
        })
    }

    /// Physical address of the root table.
    pub fn root(&self) -> PhysAddr {
        self.tables.root()
    }

    /// Maps guest-physical `[gpa, gpa + len)` to host-physical `[hpa, hpa + len)` with
    /// `attr`, using 2 MiB pages where both sides are aligned. Refuses to replace a mapping
    /// (and then leaves the tables as they were). An empty range at valid addresses is a
    /// no-op.
    pub fn map(
        &mut self,
        gpa: u64,
        hpa: PhysAddr,
        len: u64,
        attr: F::Attr,
    ) -> Result<(), VcpuError> {
        if len == 0
            && (gpa | hpa.as_u64()).is_multiple_of(crate::mm::PAGE_SIZE)
            && gpa <= 1 << CONFIG.va_bits
        {
            return Ok(());
        }
        self.tables
            .map(&HostTables, gpa, hpa, len, attr, &mut NoSink)
            .map_err(|e| match e {
                moat_ptab::Error::NoMemory => VcpuError::OutOfMemory,
                _ => VcpuError::BadMapping,
            })
    }

    /// The host-physical address `gpa` maps to, if any.
    pub fn translate(&self, gpa: u64) -> Option<PhysAddr> {
        self.tables.translate(&HostTables, gpa).map(|t| t.phys)
    }
}

/// Address-space tags (SVM ASIDs, VMX VPIDs) as a bitmap: bit n set = tag n in use. Tag 0 is
/// the host's and never handed out; at most 64 tags are tracked.
pub struct TagBitmap(AtomicU64);

impl TagBitmap {
    /// Only the host's tag in use.
    pub const fn new() -> Self {
        TagBitmap(AtomicU64::new(1))
    }

    /// Takes the lowest free tag below `limit` (and below 64).
    pub fn alloc(&self, limit: u32) -> Option<u32> {
        let limit = limit.min(64);
        let mut cur = self.0.load(Ordering::Relaxed);
        loop {
            let free = (1..limit).find(|&a| cur & (1 << a) == 0)?;
            match self
                .0
                .compare_exchange(cur, cur | 1 << free, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some(free),
                Err(now) => cur = now,
            }
        }
    }

    /// Returns `tag` (ignores the host's tag and tags out of range).
    pub fn free(&self, tag: u32) {
        if (1..64).contains(&tag) {
            self.0.fetch_and(!(1 << tag), Ordering::AcqRel);
        }
    }
}

impl Drop for Stage2 {
    fn drop(&mut self) {
        match &self.inner {
            Stage2Inner::Npt { asid, .. } => svm::free_asid(*asid),
            Stage2Inner::Ept { vpid, .. } => vmx::free_vpid(*vpid),
        }
    }
}

/// The architectural state a vCPU starts in: 64-bit long mode, paging on with `cr3`, flat
/// segments from the guest's GDT, interrupts off, no IDT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryState {
    /// Entry point.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// Guest page-table root (guest-physical).
    pub cr3: u64,
    /// GDT base (guest-physical = guest-virtual).
    pub gdt_base: u64,
    /// GDT limit.
    pub gdt_limit: u16,
    /// 64-bit code selector in that GDT.
    pub code_selector: u16,
    /// Data selector in that GDT.
    pub data_selector: u16,
    /// First argument (SysV ABI).
    pub rdi: u64,
    /// Second argument.
    pub rsi: u64,
}

/// Guest registers the exit handlers read and write (the whole set is the vCPU boundary's
/// API, whether or not today's handlers touch every one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs, dead_code)]
pub enum Reg {
    Rax,
    Rbx,
    Rcx,
    Rdx,
    Rsi,
    Rdi,
    Rbp,
    Rsp,
    R8,
    R9,
    R10,
    R11,
    R12,
    R13,
    R14,
    R15,
    Rip,
    Rflags,
    Cr0,
    Cr2,
    Cr3,
    Cr4,
    Efer,
}

impl Reg {
    /// The general-purpose register with instruction encoding `n` (0 RAX, 1 RCX, 2 RDX,
    /// 3 RBX, 4 RSP, 5 RBP, 6 RSI, 7 RDI, 8-15 R8-R15; only the low 4 bits count).
    pub fn from_gpr(n: u8) -> Reg {
        const ORDER: [Reg; 16] = [
            Reg::Rax,
            Reg::Rcx,
            Reg::Rdx,
            Reg::Rbx,
            Reg::Rsp,
            Reg::Rbp,
            Reg::Rsi,
            Reg::Rdi,
            Reg::R8,
            Reg::R9,
            Reg::R10,
            Reg::R11,
            Reg::R12,
            Reg::R13,
            Reg::R14,
            Reg::R15,
        ];
        ORDER[usize::from(n & 0xf)]
    }
}

/// An event to deliver to the guest at its next entry (the exit handlers inject exceptions;
/// device interrupts go through [`Vcpu::request_interrupt`], which waits for the guest's
/// interrupt window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(dead_code)]
pub enum Event {
    /// A hardware exception with an optional error code.
    Exception {
        /// Vector (0-31).
        vector: u8,
        /// Error code, for the vectors that push one.
        error: Option<u32>,
    },
    /// An external interrupt.
    Interrupt(u8),
    /// A non-maskable interrupt.
    Nmi,
}

/// What a nested page fault was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// The translation was present (a permission fault) rather than missing.
    pub present: bool,
    /// A write.
    pub write: bool,
    /// An instruction fetch.
    pub fetch: bool,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.fetch {
            "fetch"
        } else if self.write {
            "write"
        } else {
            "read"
        };
        let why = if self.present {
            "permission"
        } else {
            "not mapped"
        };
        write!(f, "{kind}, {why}")
    }
}

/// A port I/O exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoAccess {
    /// Port.
    pub port: u16,
    /// Operand size in bytes (1, 2, 4).
    pub size: u8,
    /// OUT (else IN).
    pub write: bool,
    /// INS/OUTS.
    pub string: bool,
    /// REP prefix.
    pub rep: bool,
}

/// Why the guest stopped running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// VMMCALL/VMCALL: a hypercall.
    Hypercall,
    /// CPUID (leaf in RAX, subleaf in RCX).
    Cpuid,
    /// RDMSR or WRMSR (MSR in RCX).
    Msr {
        /// WRMSR.
        write: bool,
    },
    /// IN/OUT.
    Io(IoAccess),
    /// HLT.
    Halt,
    /// MOV to or from CR8 (the task priority), with the general-purpose register's
    /// encoding ([`Reg::from_gpr`]); VMX only (SVM keeps CR8 in V_TPR, see
    /// [`Vcpu::guest_cr8`]).
    Cr8 {
        /// MOV to CR8.
        write: bool,
        /// The register.
        gpr: u8,
    },
    /// A guest-physical access the second stage does not allow.
    NestedPageFault {
        /// Faulting guest-physical address.
        gpa: u64,
        /// What the access was.
        access: Access,
    },
    /// Shutdown: the guest triple-faulted.
    TripleFault,
    /// An intercepted exception.
    Exception {
        /// Vector.
        vector: u8,
        /// Error code or exit information.
        error: u64,
    },
    /// A physical interrupt, NMI, SMI or INIT arrived; nothing for the guest.
    Interrupted,
    /// The hardware refused the guest state.
    InvalidState,
    /// An exit the hypervisor does not handle.
    Unsupported {
        /// What it was.
        what: &'static str,
        /// The backend's raw exit code.
        code: u64,
    },
    /// The vCPU could not be entered at all.
    Failed(&'static str),
}

enum VcpuInner {
    Svm(Box<svm::SvmVcpu>),
    Vmx(Box<vmx::VmxVcpu>),
}

/// A virtual CPU.
pub struct Vcpu {
    inner: VcpuInner,
}

impl Vcpu {
    /// Runs the guest until it exits.
    pub fn run(&mut self) -> Exit {
        match &mut self.inner {
            VcpuInner::Svm(v) => v.run(),
            VcpuInner::Vmx(v) => v.run(),
        }
    }

    /// Moves RIP past the instruction that caused the last exit and ends an STI / MOV-SS
    /// interrupt shadow that instruction was in (false when that exit has no instruction to
    /// complete).
    pub fn complete_instruction(&mut self) -> bool {
        match &mut self.inner {
            VcpuInner::Svm(v) => v.complete_instruction(),
            VcpuInner::Vmx(v) => v.complete_instruction(),
        }
    }

    /// Reads a register.
    pub fn reg(&self, r: Reg) -> u64 {
        match &self.inner {
            VcpuInner::Svm(v) => v.reg(r),
            VcpuInner::Vmx(v) => v.reg(r),
        }
    }

    /// Writes a register.
    pub fn set_reg(&mut self, r: Reg, value: u64) {
        match &mut self.inner {
            VcpuInner::Svm(v) => v.set_reg(r, value),
            VcpuInner::Vmx(v) => v.set_reg(r, value),
        }
    }

    /// Injects an interrupt or exception at the next entry.
    pub fn inject(&mut self, e: Event) {
        match &mut self.inner {
            VcpuInner::Svm(v) => v.inject(e),
            VcpuInner::Vmx(v) => v.inject(e),
        }
    }

    /// Sets the external interrupt the backend delivers as soon as the guest can take it
    /// (RFLAGS.IF set, no interrupt shadow), replacing any request still outstanding (`None`
    /// withdraws it): SVM sets V_IRQ (the hardware waits for the window); VMX injects at
    /// the entry when it can, else turns on interrupt-window exiting. Called before every
    /// entry with the virtual APIC's current choice.
    pub fn request_interrupt(&mut self, vector: Option<u8>) {
        match &mut self.inner {
            VcpuInner::Svm(v) => v.request_interrupt(vector),
            VcpuInner::Vmx(v) => v.request_interrupt(vector),
        }
    }

    /// The vector of the outstanding [`Vcpu::request_interrupt`], if the guest has not taken
    /// it yet (read after an exit: a request no longer outstanding was delivered).
    pub fn requested_interrupt(&self) -> Option<u8> {
        match &self.inner {
            VcpuInner::Svm(v) => v.requested_interrupt(),
            VcpuInner::Vmx(v) => v.requested_interrupt(),
        }
    }

    /// The bytes of the instruction behind the last exit when the hardware provides them
    /// (SVM decode assists on a nested page fault); `None` otherwise: the caller fetches
    /// them through the guest's page tables.
    pub fn instruction_bytes(&self) -> Option<&[u8]> {
        match &self.inner {
            VcpuInner::Svm(v) => v.instruction_bytes(),
            VcpuInner::Vmx(_) => None,
        }
    }

    /// Gives the guest's CR8 (its task priority, bits 7:4) before an entry where the
    /// hardware keeps it (SVM's V_TPR, which also holds back a requested interrupt of no
    /// higher priority); VMX traps every CR8 access instead ([`Exit::Cr8`]).
    pub fn set_guest_cr8(&mut self, cr8: u64) {
        if let VcpuInner::Svm(v) = &mut self.inner {
            v.set_tpr(cr8);
        }
    }

    /// The guest's CR8 after an exit, where the hardware kept it (SVM: the guest may have
    /// written it without an exit); `None` where every access exits (VMX).
    pub fn guest_cr8(&self) -> Option<u64> {
        match &self.inner {
            VcpuInner::Svm(v) => Some(v.tpr()),
            VcpuInner::Vmx(_) => None,
        }
    }

    /// Whether the guest has interrupts enabled (RFLAGS.IF).
    pub fn interrupts_enabled(&self) -> bool {
        self.reg(Reg::Rflags) & (1 << 9) != 0
    }

    /// The backend's raw exit record, for log lines.
    pub fn raw_exit(&self) -> (u64, u64, u64) {
        match &self.inner {
            VcpuInner::Svm(v) => v.raw_exit(),
            VcpuInner::Vmx(v) => v.raw_exit(),
        }
    }
}
