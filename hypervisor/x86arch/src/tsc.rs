//! The TSC frequency the CPU states in CPUID (Intel): leaf 0x15 gives the TSC/crystal ratio
//! and (on most parts) the crystal frequency; leaf 0x16 the processor base frequency, which
//! equals the TSC frequency on parts with an invariant TSC and no stated crystal.

/// Where a TSC frequency came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TscSource {
    /// CPUID 0x15 with its crystal frequency (ECX).
    Cpuid15,
    /// CPUID 0x16's processor base frequency (EAX, MHz).
    Cpuid16,
    /// Measured against the PIT.
    Pit,
}

impl TscSource {
    /// A short name for the log.
    pub const fn name(self) -> &'static str {
        match self {
            TscSource::Cpuid15 => "CPUID 0x15 (crystal x ratio)",
            TscSource::Cpuid16 => "CPUID 0x16 (base frequency)",
            TscSource::Pit => "PIT calibration",
        }
    }
}

/// The TSC frequency in kHz stated by CPUID, if any: `max_leaf` is CPUID 0's EAX,
/// `leaf15` is (EAX denominator, EBX numerator, ECX crystal Hz) of leaf 0x15, `leaf16_eax` is
/// leaf 0x16's EAX (base MHz). Leaves above `max_leaf` are ignored (they return another
/// leaf's data); zero fields mean "not enumerated".
pub fn khz_from_cpuid(
    max_leaf: u32,
    leaf15: (u32, u32, u32),
    leaf16_eax: u32,
) -> Option<(u64, TscSource)> {
    if max_leaf >= 0x15 {
        let (den, num, crystal_hz) = leaf15;
        if den != 0 && num != 0 && crystal_hz != 0 {
            let hz = u64::from(crystal_hz) * u64::from(num) / u64::from(den);
            if hz >= 1000 {
                return Some((hz / 1000, TscSource::Cpuid15));
            }
        }
    }
    if max_leaf >= 0x16 {
        let mhz = leaf16_eax & 0xffff;
        if mhz != 0 {
            return Some((u64::from(mhz) * 1000, TscSource::Cpuid16));
        }
    }
    None
}

/// The frequency to use, from what CPUID states and what the PIT measured (`None`: the PIT
/// did not count, as on legacy-free machines). CPUID wins when it agrees with the measurement
/// within 10 % or when there is no measurement; when both exist and disagree (an emulator
/// whose TSC runs at its own pace, e.g. Bochs), the measurement wins and `disagree` is set.
pub fn choose(stated: Option<(u64, TscSource)>, measured: Option<u64>) -> Choice {
    match (stated, measured) {
        (Some((khz, source)), None) => Choice {
            khz,
            source,
            disagree: false,
            stated_khz: khz,
        },
        (Some((khz, source)), Some(m)) if khz.abs_diff(m) <= khz / 10 => Choice {
            khz,
            source,
            disagree: false,
            stated_khz: khz,
        },
        (Some((khz, _)), Some(m)) => Choice {
            khz: m.max(1),
            source: TscSource::Pit,
            disagree: true,
            stated_khz: khz,
        },
        (None, m) => Choice {
            khz: m.unwrap_or(0).max(1),
            source: TscSource::Pit,
            disagree: false,
            stated_khz: 0,
        },
    }
}

/// What [`choose`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// TSC kHz.
    pub khz: u64,
    /// Where it came from.
    pub source: TscSource,
    /// CPUID stated a frequency more than 10 % off the measurement (which was used).
    pub disagree: bool,
    /// What CPUID stated, kHz (0: nothing).
    pub stated_khz: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf15_with_crystal() {
        // A Skylake client: 24 MHz crystal, ratio 176/2 -> 2112 MHz.
        assert_eq!(
            khz_from_cpuid(0x16, (2, 176, 24_000_000), 2100),
            Some((2_112_000, TscSource::Cpuid15))
        );
    }

    #[test]
    fn leaf15_without_crystal_falls_back_to_leaf16() {
        // Skylake-X states the ratio but not the crystal: the base frequency is used.
        assert_eq!(
            khz_from_cpuid(0x16, (2, 200, 0), 3000),
            Some((3_000_000, TscSource::Cpuid16))
        );
        // Leaf 0x16's EAX upper bits are reserved.
        assert_eq!(
            khz_from_cpuid(0x16, (0, 0, 0), 0xabcd_0bb8),
            Some((3_000_000, TscSource::Cpuid16))
        );
    }

    #[test]
    fn choice_prefers_cpuid_unless_the_measurement_contradicts_it() {
        let stated = Some((3_000_000, TscSource::Cpuid16));
        let c = choose(stated, Some(2_950_000));
        assert_eq!(
            (c.khz, c.source, c.disagree),
            (3_000_000, TscSource::Cpuid16, false)
        );
        let c = choose(stated, None);
        assert_eq!(
            (c.khz, c.source, c.disagree),
            (3_000_000, TscSource::Cpuid16, false)
        );
        let c = choose(stated, Some(200_000));
        assert_eq!(
            (c.khz, c.source, c.disagree),
            (200_000, TscSource::Pit, true)
        );
        let c = choose(None, Some(2_000_000));
        assert_eq!(
            (c.khz, c.source, c.disagree),
            (2_000_000, TscSource::Pit, false)
        );
        assert_eq!(choose(None, None).khz, 1);
    }

    #[test]
    fn nothing_stated_means_calibrate() {
        assert_eq!(khz_from_cpuid(0x0d, (2, 176, 24_000_000), 2100), None);
        assert_eq!(khz_from_cpuid(0x15, (2, 176, 0), 2100), None);
        assert_eq!(khz_from_cpuid(0x16, (0, 5, 24_000_000), 0), None);
        assert_eq!(khz_from_cpuid(0x16, (1, 1, 999), 0), None);
    }
}
