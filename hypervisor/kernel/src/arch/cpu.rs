//! Per-CPU state: GDT, TSS with IST stacks, and the per-CPU block reached through `GS` base.

use core::arch::asm;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use super::x86;

/// Most CPUs the hypervisor brings up.
pub const MAX_CPUS: usize = 64;
/// Size of each IST stack (double fault, NMI, machine check).
pub const IST_STACK_SIZE: usize = 16 * 1024;

/// Kernel code selector.
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data selector.
pub const KERNEL_DS: u16 = 0x10;
/// TSS selector.
pub const TSS_SEL: u16 = 0x18;

/// 64-bit task state segment.
#[repr(C, packed(4))]
#[derive(Clone, Copy)]
pub struct Tss {
    _reserved0: u32,
    rsp: [u64; 3],
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}
const _: () = assert!(core::mem::size_of::<Tss>() == 104);

impl Tss {
    const fn new() -> Self {
        Self {
            _reserved0: 0,
            rsp: [0; 3],
            _reserved1: 0,
            ist: [0; 7],
            _reserved2: 0,
            _reserved3: 0,
            iomap_base: core::mem::size_of::<Tss>() as u16,
        }
    }
}

/// The per-CPU block. `GS` base points at it; the first field points at itself so
/// `mov rax, gs:[0]` yields its address.
#[repr(C, align(64))]
pub struct PerCpu {
    self_ptr: u64,
    /// Dense CPU index (0 = BSP).
    pub index: usize,
    /// Local APIC id.
    pub apic_id: AtomicU32,
    gdt: [u64; 5],
    tss: Tss,
}

impl PerCpu {
    const fn new() -> Self {
        Self {
            self_ptr: 0,
            index: 0,
            apic_id: AtomicU32::new(0),
            gdt: [0; 5],
            tss: Tss::new(),
        }
    }
}

#[repr(C, align(16))]
struct IstStacks([[u8; IST_STACK_SIZE]; MAX_CPUS]);

/// The per-CPU blocks; entry `i` is touched only by CPU `i` after [`init_this_cpu`].
static mut PERCPU: [PerCpu; MAX_CPUS] = [const { PerCpu::new() }; MAX_CPUS];
static mut IST_STACKS: IstStacks = IstStacks([[0; IST_STACK_SIZE]; MAX_CPUS]);
static ONLINE: AtomicUsize = AtomicUsize::new(0);

#[repr(C, packed(2))]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// Sets up GDT, TSS (IST1 for #DF/NMI/#MC), segment registers and `GS` base for CPU `index`
/// and loads the shared IDT. Called once on each CPU, by that CPU.
pub fn init_this_cpu(index: usize, apic_id: u32) {
    assert!(index < MAX_CPUS, "CPU index {index} >= MAX_CPUS");
    // SAFETY: each CPU initialises only its own entry, once, before anything else reads it
    // (nothing reads PERCPU[i] except CPU i through GS).
    let pc = unsafe { &mut *core::ptr::addr_of_mut!(PERCPU[index]) };
    // SAFETY: as above, IST stack `index` belongs to CPU `index` only.
    let ist_top =
        unsafe { core::ptr::addr_of_mut!(IST_STACKS.0[index]) as u64 } + IST_STACK_SIZE as u64;
    pc.self_ptr = pc as *const PerCpu as u64;
    pc.index = index;
    pc.apic_id.store(apic_id, Ordering::Relaxed);
    pc.tss.ist[0] = ist_top;
    let tss = &pc.tss as *const Tss as u64;
    let tss_limit = (core::mem::size_of::<Tss>() - 1) as u64;
    pc.gdt = [
        0,
        0x00af_9a00_0000_ffff, // 0x08: 64-bit code, DPL 0
        0x00cf_9200_0000_ffff, // 0x10: data
        // 0x18: 64-bit TSS (available), two slots
        tss_limit | ((tss & 0xff_ffff) << 16) | (0x89 << 40) | (((tss >> 24) & 0xff) << 56),
        tss >> 32,
    ];
    let gdtr = DescriptorPointer {
        limit: (core::mem::size_of_val(&pc.gdt) - 1) as u16,
        base: pc.gdt.as_ptr() as u64,
    };
    // SAFETY: the GDT above has valid code/data/TSS descriptors and lives forever (static);
    // reloading CS through a far return and the data segments with KERNEL_DS keeps executing
    // the same flat address space.
    unsafe {
        asm!(
            "lgdt [{gdtr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {ds:x}",
            "mov es, {ds:x}",
            "mov ss, {ds:x}",
            "ltr {tss:x}",
            gdtr = in(reg) &gdtr,
            cs = in(reg) KERNEL_CS as u64,
            ds = in(reg) KERNEL_DS as u64,
            tss = in(reg) TSS_SEL as u64,
            tmp = lateout(reg) _,
        );
        x86::wrmsr(x86::msr::GS_BASE, pc.self_ptr);
    }
    super::idt::load();
    ONLINE.fetch_add(1, Ordering::SeqCst);
}

/// The current CPU's index (0 before per-CPU set-up, i.e. on the BSP during early boot).
pub fn current_index() -> usize {
    // SAFETY: reading the GS base MSR has no side effects.
    if unsafe { x86::rdmsr(x86::msr::GS_BASE) } == 0 {
        return 0;
    }
    let p: u64;
    // SAFETY: GS base points at this CPU's PerCpu whose first field is its own address.
    unsafe { asm!("mov {}, gs:[0]", out(reg) p, options(readonly, nostack, preserves_flags)) };
    // SAFETY: p is the address of a live, 'static PerCpu.
    unsafe { (*(p as *const PerCpu)).index }
}

/// How many CPUs have completed [`init_this_cpu`].
pub fn online_count() -> usize {
    ONLINE.load(Ordering::SeqCst)
}
