//! The CPUID a guest sees: Moat's hypervisor leaves (the discovery part of the ABI) and the host
//! leaves with the features a guest must not use hidden. The hypervisor answers every CPUID exit
//! with [`GuestCpu::leaf`]; the guest side reads the same leaves.
//!
//! Guests get a virtual local APIC in x2APIC mode (its MSRs are emulated): leaf 1 says x2APIC,
//! and leaves 0x15 / 0x16 state the TSC frequency and the APIC timer's input clock (the
//! "crystal": TSC / [`GuestCpu::timer_tsc_ratio`]), as Intel parts do. The xAPIC MMIO page and
//! TSC-deadline timer mode are not emulated: TSC-deadline is hidden.
//!
//! The APIC ID is the vCPU's own ([`GuestCpu::apic_id`], the ID its virtual APIC's ID register
//! reads): leaf 1 EBX bits 31:24 and the x2APIC ID in EDX of the topology leaves 0xB / 0x1F,
//! never the host CPU's it happens to run on.

use crate::hypercall::{signature_regs, Instruction, ABI_VERSION, CPUID_MAX_LEAF};
use crate::{CPUID_FEATURES_LEAF, CPUID_SIGNATURE_LEAF};

/// EAX, EBX, ECX, EDX of one CPUID leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuidRegs {
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

/// Leaf 1 ECX: a hypervisor is present.
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX bits a guest does not get: MONITOR/MWAIT (3), VMX (5), TSC-deadline timer (24).
pub const LEAF1_ECX_HIDDEN: u32 = 1 << 3 | 1 << 5 | 1 << 24;
/// Leaf 1 ECX: x2APIC, which every guest's virtual local APIC offers.
pub const LEAF1_ECX_X2APIC: u32 = 1 << 21;
/// The TSC / crystal leaf.
pub const TSC_LEAF: u32 = 0x15;
/// The frequency leaf (base, maximum, bus MHz).
pub const FREQUENCY_LEAF: u32 = 0x16;
/// Leaf 0x8000_0001 ECX bits a guest does not get: SVM (2).
pub const EXT1_ECX_HIDDEN: u32 = 1 << 2;
/// The extended topology leaves: EDX is the x2APIC ID (every subleaf).
pub const TOPOLOGY_LEAVES: [u32; 2] = [0xb, 0x1f];
/// Leaf 1 EBX: the initial APIC ID in bits 31:24.
pub const LEAF1_EBX_APIC_ID_SHIFT: u32 = 24;
/// The SVM feature leaf, all zero for a guest.
pub const SVM_LEAF: u32 = 0x8000_000a;
/// The range of hypervisor leaves; those above [`CPUID_MAX_LEAF`] read as zero.
pub const HYPERVISOR_LEAVES: core::ops::RangeInclusive<u32> = 0x4000_0000..=0x4000_00ff;

/// What one guest's CPUID says of the hypervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestCpu {
    /// The calls this guest has ([`crate::Call::bit`]).
    pub calls: u32,
    /// The instruction this guest makes hypercalls with (the one its vCPUs trap).
    pub instruction: Instruction,
    /// The TSC frequency the guest sees, kHz (0: unknown, leaves 0x15/0x16 then say nothing).
    pub tsc_khz: u64,
    /// TSC cycles per tick of the virtual APIC timer's input clock.
    pub timer_tsc_ratio: u32,
    /// The x2APIC ID of the vCPU asking (its index in the guest).
    pub apic_id: u32,
}

impl GuestCpu {
    /// Leaf `leaf` as the guest sees it; `host` gives the host's values of a non-hypervisor
    /// leaf (called only for those).
    pub fn leaf(&self, leaf: u32, host: impl FnOnce() -> CpuidRegs) -> CpuidRegs {
        if HYPERVISOR_LEAVES.contains(&leaf) {
            return self.hypervisor_leaf(leaf);
        }
        if leaf == TSC_LEAF || leaf == FREQUENCY_LEAF {
            return self.frequency_leaf(leaf);
        }
        let mut r = host();
        match leaf {
            // The basic leaves reach at least the frequency leaf.
            0 => r.eax = r.eax.max(FREQUENCY_LEAF),
            1 => {
                r.ecx = (r.ecx | LEAF1_ECX_HYPERVISOR | LEAF1_ECX_X2APIC) & !LEAF1_ECX_HIDDEN;
                r.ebx = (r.ebx & 0x00ff_ffff) | (self.apic_id & 0xff) << LEAF1_EBX_APIC_ID_SHIFT;
            }
            l if TOPOLOGY_LEAVES.contains(&l) => r.edx = self.apic_id,
            0x8000_0001 => r.ecx &= !EXT1_ECX_HIDDEN,
            SVM_LEAF => r = CpuidRegs::default(),
            _ => {}
        }
        r
    }

    /// Leaf 0x15 (EAX denominator 1, EBX numerator = the ratio, ECX the crystal in Hz) or
    /// 0x16 (EAX base and EBX maximum MHz = the TSC's, ECX bus MHz = the crystal's); all zero
    /// when the TSC frequency is unknown.
    fn frequency_leaf(&self, leaf: u32) -> CpuidRegs {
        let ratio = u64::from(self.timer_tsc_ratio);
        if self.tsc_khz == 0 || ratio == 0 {
            return CpuidRegs::default();
        }
        let crystal_hz = self.tsc_khz.saturating_mul(1000) / ratio;
        let sat = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        if leaf == TSC_LEAF {
            CpuidRegs {
                eax: 1,
                ebx: self.timer_tsc_ratio,
                ecx: sat(crystal_hz),
                edx: 0,
            }
        } else {
            let mhz = sat(self.tsc_khz / 1000);
            CpuidRegs {
                eax: mhz,
                ebx: mhz,
                ecx: sat(crystal_hz / 1_000_000),
                edx: 0,
            }
        }
    }

    /// A leaf in [`HYPERVISOR_LEAVES`].
    fn hypervisor_leaf(&self, leaf: u32) -> CpuidRegs {
        match leaf {
            CPUID_SIGNATURE_LEAF => {
                let [ebx, ecx, edx] = signature_regs();
                CpuidRegs {
                    eax: CPUID_MAX_LEAF,
                    ebx,
                    ecx,
                    edx,
                }
            }
            CPUID_FEATURES_LEAF => CpuidRegs {
                eax: ABI_VERSION,
                ebx: self.calls,
                ecx: self.instruction as u32,
                edx: 0,
            },
            _ => CpuidRegs::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{is_moat_signature, CALLS_ALL, CALLS_BASE};

    const HOST: CpuidRegs = CpuidRegs {
        eax: 0x1111_1111,
        ebx: 0x2222_2222,
        ecx: !(1 << 31),
        edx: 0x4444_4444,
    };

    fn cpu(calls: u32, instruction: Instruction) -> GuestCpu {
        GuestCpu {
            calls,
            instruction,
            tsc_khz: 2_500_000,
            timer_tsc_ratio: 64,
            apic_id: 0,
        }
    }

    #[test]
    fn hypervisor_leaves_carry_the_signature_version_calls_and_instruction() {
        let g = cpu(CALLS_ALL, Instruction::Vmcall);
        let never = || panic!("a hypervisor leaf must not read the host");
        let s = g.leaf(0x4000_0000, never);
        assert_eq!(s.eax, CPUID_MAX_LEAF);
        assert!(is_moat_signature(s.ebx, s.ecx, s.edx));
        let f = g.leaf(0x4000_0001, never);
        assert_eq!((f.eax, f.ebx, f.ecx, f.edx), (ABI_VERSION, CALLS_ALL, 2, 0));
        let f = cpu(CALLS_BASE, Instruction::Vmmcall).leaf(0x4000_0001, never);
        assert_eq!(
            (f.ebx, Instruction::from_raw(f.ecx)),
            (CALLS_BASE, Some(Instruction::Vmmcall))
        );
        for leaf in [0x4000_0002, 0x4000_0080, 0x4000_00ff] {
            assert_eq!(g.leaf(leaf, never), CpuidRegs::default(), "leaf {leaf:#x}");
        }
    }

    #[test]
    fn host_leaves_hide_virtualization_monitor_and_tsc_deadline_and_say_hypervisor_and_x2apic() {
        let g = cpu(CALLS_BASE, Instruction::Vmmcall);
        let l1 = g.leaf(1, || HOST);
        assert_eq!(l1.ecx & LEAF1_ECX_HIDDEN, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(
            l1.ecx | LEAF1_ECX_HIDDEN,
            u32::MAX,
            "only the hidden bits are cleared"
        );
        assert_eq!(
            (l1.eax, l1.ebx, l1.edx),
            (HOST.eax, HOST.ebx & 0x00ff_ffff, HOST.edx),
            "APIC ID 0 in EBX bits 31:24, the rest the host's"
        );
        let no_x2apic = CpuidRegs { ecx: 0, ..HOST };
        assert_eq!(
            g.leaf(1, || no_x2apic).ecx,
            LEAF1_ECX_HYPERVISOR | LEAF1_ECX_X2APIC,
            "x2APIC whatever the host has"
        );
        let e1 = g.leaf(0x8000_0001, || HOST);
        assert_eq!(e1.ecx, HOST.ecx & !EXT1_ECX_HIDDEN);
        assert_eq!(g.leaf(SVM_LEAF, || HOST), CpuidRegs::default());
        assert_eq!(g.leaf(0, || HOST), HOST);
        let old = CpuidRegs { eax: 0xd, ..HOST };
        assert_eq!(g.leaf(0, || old).eax, FREQUENCY_LEAF, "reaches leaf 0x16");
        assert_eq!(
            g.leaf(0x4000_0100, || HOST),
            HOST,
            "past the hypervisor range"
        );
    }

    #[test]
    fn apic_id_is_the_vcpus_own_in_leaf_1_and_the_topology_leaves() {
        let host = CpuidRegs {
            ebx: 0x0708_0910,
            edx: 0x55,
            ..HOST
        };
        for id in [0, 1, 3, 0x1ff] {
            let g = GuestCpu {
                apic_id: id,
                ..cpu(CALLS_BASE, Instruction::Vmmcall)
            };
            let l1 = g.leaf(1, || host);
            assert_eq!(l1.ebx >> 24, id & 0xff, "leaf 1, vCPU {id}");
            assert_eq!(l1.ebx & 0x00ff_ffff, 0x08_0910, "leaf 1 EBX's other fields");
            for leaf in TOPOLOGY_LEAVES {
                let t = g.leaf(leaf, || host);
                assert_eq!(t.edx, id, "leaf {leaf:#x}, vCPU {id}");
                assert_eq!((t.eax, t.ebx, t.ecx), (host.eax, host.ebx, host.ecx));
            }
            assert_eq!(g.leaf(0xa, || host).edx, host.edx, "other leaves untouched");
        }
    }

    #[test]
    fn frequency_leaves_state_the_tsc_and_the_timer_crystal() {
        let g = cpu(CALLS_BASE, Instruction::Vmcall);
        let never = || panic!("the frequency leaves are the hypervisor's");
        let l15 = g.leaf(TSC_LEAF, never);
        assert_eq!((l15.eax, l15.ebx, l15.ecx), (1, 64, 39_062_500));
        assert_eq!(
            u64::from(l15.ecx) * u64::from(l15.ebx) / u64::from(l15.eax),
            2_500_000_000
        );
        let l16 = g.leaf(FREQUENCY_LEAF, never);
        assert_eq!((l16.eax, l16.ebx, l16.ecx), (2500, 2500, 39));
        let unknown = GuestCpu { tsc_khz: 0, ..g };
        assert_eq!(unknown.leaf(TSC_LEAF, never), CpuidRegs::default());
    }
}
