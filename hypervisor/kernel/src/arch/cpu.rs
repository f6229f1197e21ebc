//! Per-CPU state: GDT, TSS with IST stacks, and the per-CPU block reached through `GS` base.

use core::arch::asm;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::registers::model_specific::GsBase;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

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

/// Null, code, data and the two slots of the TSS descriptor.
type Gdt = GlobalDescriptorTable<5>;

/// The per-CPU block. `GS` base points at it; the first field points at itself so
/// `mov rax, gs:[0]` yields its address.
#[repr(C, align(64))]
pub struct PerCpu {
    self_ptr: u64,
    /// Dense CPU index (0 = BSP).
    pub index: usize,
    /// Local APIC id.
    pub apic_id: AtomicU32,
    gdt: Gdt,
    tss: TaskStateSegment,
}

impl PerCpu {
    const fn new() -> Self {
        Self {
            self_ptr: 0,
            index: 0,
            apic_id: AtomicU32::new(0),
            gdt: Gdt::empty(),
            tss: TaskStateSegment::new(),
        }
    }
}

#[repr(C, align(16))]
struct IstStacks([[u8; IST_STACK_SIZE]; MAX_CPUS]);

/// The per-CPU blocks; entry `i` is touched only by CPU `i` after [`init_this_cpu`].
static mut PERCPU: [PerCpu; MAX_CPUS] = [const { PerCpu::new() }; MAX_CPUS];
static mut IST_STACKS: IstStacks = IstStacks([[0; IST_STACK_SIZE]; MAX_CPUS]);
static ONLINE: AtomicUsize = AtomicUsize::new(0);

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
    pc.tss.interrupt_stack_table[0] = VirtAddr::new(ist_top);
    let tss: &'static TaskStateSegment = &pc.tss;
    let mut gdt = Gdt::empty();
    let cs = gdt.append(Descriptor::kernel_code_segment());
    let ds = gdt.append(Descriptor::kernel_data_segment());
    let tr = gdt.append(Descriptor::tss_segment(tss));
    assert_eq!([cs.0, ds.0, tr.0], [KERNEL_CS, KERNEL_DS, TSS_SEL]);
    pc.gdt = gdt;
    let gdt: &'static Gdt = &pc.gdt;
    gdt.load();
    // SAFETY: the GDT just loaded holds a 64-bit code, a data and an available TSS descriptor
    // at these selectors, and lives forever (static, never written again); reloading CS and
    // the data segments keeps executing in the same flat address space.
    unsafe {
        CS::set_reg(cs);
        DS::set_reg(ds);
        ES::set_reg(ds);
        SS::set_reg(ds);
        load_tss(tr);
    }
    GsBase::write(VirtAddr::new(pc.self_ptr));
    super::idt::load();
    ONLINE.fetch_add(1, Ordering::SeqCst);
}

/// The current CPU's index (0 before per-CPU set-up, i.e. on the BSP during early boot).
pub fn current_index() -> usize {
    if GsBase::read().is_null() {
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
