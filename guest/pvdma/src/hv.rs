//! The driver's view of the hypervisor: one trait, so the same driver runs in a guest (with
//! [`Native`]) and on the host against a model.

use moat_abi::{Args, Call, Return};

/// What the driver needs from its environment.
///
/// Memory accesses only ever target buffers the driver was given (the scratch buffer, the
/// batch area, the fault ring), by guest-physical address.
pub trait Hypervisor {
    /// `CPUID` with EAX = `leaf`, ECX = 0; returns EAX, EBX, ECX, EDX.
    fn cpuid(&mut self, leaf: u32) -> [u32; 4];
    /// Issues hypercall `call` with the argument registers `args` (RDI, RSI, RDX, R10, R8,
    /// R9) and returns RAX, RDX, R8, R9.
    fn hypercall(&mut self, call: Call, args: Args) -> Return;
    /// Reads guest-physical memory owned by the driver.
    fn read(&mut self, gpa: u64, buf: &mut [u8]);
    /// Writes guest-physical memory owned by the driver.
    fn write(&mut self, gpa: u64, data: &[u8]);
}

#[cfg(target_arch = "x86_64")]
pub use native::Native;

#[cfg(target_arch = "x86_64")]
mod native {
    use super::Hypervisor;
    use core::arch::asm;
    use core::sync::atomic::{fence, Ordering};
    use moat_abi::{Args, Call, Instruction, Return, CPUID_FEATURES_LEAF};

    /// The real thing inside a Moat guest: `CPUID`, `VMMCALL`/`VMCALL`, and memory accessed
    /// through an identity map (virtual address = guest-physical address).
    #[derive(Debug)]
    pub struct Native {
        insn: Instruction,
    }

    impl Native {
        /// A hypervisor handle using the instruction CPUID `0x4000_0001` names (VMMCALL if
        /// it names none).
        ///
        /// # Safety
        /// The caller runs as a Moat guest at CPL 0 with every buffer it will give the driver
        /// identity-mapped (virtual address = guest-physical address), readable and writable,
        /// and not otherwise accessed through Rust references while the driver uses it.
        pub unsafe fn new() -> Native {
            let r = core::arch::x86_64::__cpuid_count(CPUID_FEATURES_LEAF, 0);
            Native {
                insn: Instruction::from_raw(r.ecx).unwrap_or(Instruction::Vmmcall),
            }
        }
    }

    /// Bytes of the widest access [`Native`] copies shared areas with.
    const WORD: u64 = 8;

    fn read_bytes(gpa: u64, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: `Native::new`'s contract: the driver's buffers are identity-mapped and
            // readable; volatile because the hypervisor writes them behind the compiler.
            *b = unsafe { core::ptr::read_volatile((gpa as usize + i) as *const u8) };
        }
    }

    fn write_bytes(gpa: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            // SAFETY: `Native::new`'s contract: the driver's buffers are identity-mapped and
            // writable; volatile because the hypervisor reads them behind the compiler.
            unsafe { core::ptr::write_volatile((gpa as usize + i) as *mut u8, *b) };
        }
    }

    impl Hypervisor for Native {
        fn cpuid(&mut self, leaf: u32) -> [u32; 4] {
            let r = core::arch::x86_64::__cpuid_count(leaf, 0);
            [r.eax, r.ebx, r.ecx, r.edx]
        }

        fn hypercall(&mut self, call: Call, args: Args) -> Return {
            let [a0, a1, a2, a3, a4, a5] = args.0;
            let (rax, rdx, r8, r9): (u64, u64, u64, u64);
            // Orders the driver's writes to shared areas before the hypervisor reads them, and
            // its later reads after the hypervisor's writes.
            fence(Ordering::SeqCst);
            match self.insn {
                // SAFETY: VMCALL traps to Moat, which follows the ABI: it reads RAX and the six
                // argument registers, writes RAX, RDX, R8, R9, preserves every other register
                // and touches only guest memory the call names (buffers the driver owns).
                Instruction::Vmcall => unsafe {
                    asm!("vmcall", inout("rax") call.number() => rax, in("rdi") a0,
                         in("rsi") a1, inout("rdx") a2 => rdx, in("r10") a3,
                         inout("r8") a4 => r8, inout("r9") a5 => r9, options(nostack))
                },
                // SAFETY: as above, with VMMCALL (AMD SVM).
                Instruction::Vmmcall => unsafe {
                    asm!("vmmcall", inout("rax") call.number() => rax, in("rdi") a0,
                         in("rsi") a1, inout("rdx") a2 => rdx, in("r10") a3,
                         inout("r8") a4 => r8, inout("r9") a5 => r9, options(nostack))
                },
            }
            fence(Ordering::SeqCst);
            Return {
                rax,
                values: [rdx, r8, r9],
            }
        }

        // Shared areas (batch entries, headers, fault records) are 8-byte aligned multiples
        // of 8 bytes: they are copied a word at a time (one access instead of eight, which
        // matters on the batched I/O path: two 48-byte entries per I/O); any other span a
        // byte at a time.
        fn read(&mut self, gpa: u64, buf: &mut [u8]) {
            if gpa.is_multiple_of(WORD) {
                let len = buf.len();
                let mut words = buf.chunks_exact_mut(WORD as usize);
                for (i, w) in (&mut words).enumerate() {
                    let at = gpa as usize + i * WORD as usize;
                    // SAFETY: `new`'s contract: the driver's buffers are identity-mapped and
                    // readable; `at` is 8-byte aligned; volatile because the hypervisor
                    // writes them behind the compiler.
                    let v = unsafe { core::ptr::read_volatile(at as *const u64) };
                    w.copy_from_slice(&v.to_le_bytes());
                }
                let tail = words.into_remainder();
                return read_bytes(gpa + (len - tail.len()) as u64, tail);
            }
            read_bytes(gpa, buf)
        }

        fn write(&mut self, gpa: u64, data: &[u8]) {
            if gpa.is_multiple_of(WORD) {
                let words = data.chunks_exact(WORD as usize);
                let tail = words.remainder();
                for (i, w) in words.enumerate() {
                    let at = gpa as usize + i * WORD as usize;
                    let v = u64::from_le_bytes(w.try_into().unwrap_or_default());
                    // SAFETY: `new`'s contract: the driver's buffers are identity-mapped and
                    // writable; `at` is 8-byte aligned; volatile because the hypervisor reads
                    // them behind the compiler.
                    unsafe { core::ptr::write_volatile(at as *mut u64, v) };
                }
                let done = data.len() - tail.len();
                return write_bytes(gpa + done as u64, tail);
            }
            write_bytes(gpa, data)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Word and byte copies agree with a plain copy at every alignment and length, and
        /// touch nothing outside the span.
        #[test]
        fn copies_exactly_the_span_at_every_alignment() {
            let mut hv = Native {
                insn: Instruction::Vmmcall,
            };
            for off in 0..16usize {
                for len in 0..=48usize {
                    // 8-byte aligned backing store, so `off` sets the alignment.
                    let mut mem = [0u64; 10];
                    let base = mem.as_mut_ptr() as u64;
                    let data: [u8; 48] = core::array::from_fn(|i| (i as u8).wrapping_mul(7) ^ 0xa5);
                    hv.write(base + off as u64, &data[..len]);
                    let bytes: [u8; 80] =
                        core::array::from_fn(|i| (mem[i / 8] >> (8 * (i % 8))) as u8);
                    for (i, b) in bytes.iter().enumerate() {
                        let want = if (off..off + len).contains(&i) {
                            data[i - off]
                        } else {
                            0
                        };
                        assert_eq!(*b, want, "write off {off} len {len} byte {i}");
                    }
                    let mut back = [0x11u8; 49];
                    hv.read(base + off as u64, &mut back[..len]);
                    assert_eq!(&back[..len], &data[..len], "read off {off} len {len}");
                    assert_eq!(back[len], 0x11, "read past the span: off {off} len {len}");
                }
            }
        }
    }
}
