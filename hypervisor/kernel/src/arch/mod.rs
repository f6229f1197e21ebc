//! x86_64 architecture support: instructions, descriptor tables, exceptions, local APIC, TSC.

pub mod apic;
pub mod cpu;
pub mod idt;
pub mod tsc;
pub mod x86;
