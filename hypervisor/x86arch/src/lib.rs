//! Pure decoders of x86 architectural formats: what the kernel reads from CPUID and MSRs is
//! turned into typed values here, where it is host-tested; the kernel only executes the
//! instructions.
//!
//! - [`tsc`]: the TSC frequency from CPUID leaves 0x15 / 0x16;
//! - [`vmx`]: Intel VMX capability MSRs, control adjustment, VMCS fields, exit decoding;
//! - [`insn`]: the `MOV` forms of an emulated MMIO access (instruction length, direction,
//!   width, register or immediate);
//! - [`walk`]: a guest's own page tables, to fetch the instruction at its RIP.
#![no_std]

pub mod insn;
pub mod tsc;
pub mod vmx;
pub mod walk;
