//! Pure decoders of x86 architectural formats: what the kernel reads from CPUID and MSRs is
//! turned into typed values here, where it is host-tested; the kernel only executes the
//! instructions.
//!
//! - [`tsc`]: the TSC frequency from CPUID leaves 0x15 / 0x16;
//! - [`vmx`]: Intel VMX capability MSRs, control adjustment, VMCS fields, exit decoding.
#![no_std]
#![forbid(unsafe_code)]

pub mod tsc;
pub mod vmx;
