//! Pure decoders of x86 architectural formats: what the kernel reads from CPUID and MSRs is
//! turned into typed values here, where it is host-tested; the kernel only executes the
//! instructions.
//!
//! - [`tsc`]: the TSC frequency from CPUID leaves 0x15 / 0x16;
//! - [`vmx`]: Intel VMX capability MSRs, control adjustment, VMCS fields, exit decoding;
//! - [`insn`]: the instruction forms of an emulated MMIO access (length, direction, width,
//!   register or immediate, ALU and compare results);
//! - [`walk`]: a guest's own page tables, to fetch the instruction at its RIP;
//! - [`lapic`]: the virtual local APIC guests get (x2APIC MSRs, priorities, timer).
#![no_std]
#![forbid(unsafe_code)]

pub mod insn;
pub mod lapic;
pub mod tsc;
pub mod vmx;
pub mod walk;
