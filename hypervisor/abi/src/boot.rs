//! How a guest starts: the boot information the hypervisor leaves for it.
//!
//! The hypervisor enters a guest's vCPUs in 64-bit long mode at the ELF entry point with
//! RDI = guest-physical address of a [`BootInfo`] (64 bytes, little-endian) and RSI = the vCPU
//! index. The guest's RAM is guest-physical `[0, mem_size)`, identity-mapped by boot page
//! tables covering the first 4 GiB.

/// [`BootInfo::magic`]: the bytes `"MOATBOOT"`.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"MOATBOOT");
/// [`BootInfo::version`] of this layout.
pub const BOOT_VERSION: u32 = 1;
/// Bytes of a [`BootInfo`].
pub const BOOT_INFO_SIZE: usize = 64;

/// The boot information.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | `magic` ([`BOOT_MAGIC`]) |
/// | 8 | 4 | `version` ([`BOOT_VERSION`]) |
/// | 12 | 4 | `vcpus` |
/// | 16 | 8 | `mem_size`: bytes of RAM at guest-physical 0 |
/// | 24 | 8 | `tsc_khz`: TSC frequency (the guest's TSC is the host's) |
/// | 32 | 8 | `cmdline_gpa` |
/// | 40 | 8 | `cmdline_len` |
/// | 48 | 16 | `name`: the guest's name, NUL padded |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// Layout version.
    pub version: u32,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Bytes of RAM at guest-physical 0.
    pub mem_size: u64,
    /// TSC frequency in kHz.
    pub tsc_khz: u64,
    /// Guest-physical address of the command line.
    pub cmdline_gpa: u64,
    /// Its length in bytes.
    pub cmdline_len: u64,
    /// The guest's name, NUL padded.
    pub name: [u8; 16],
}

impl BootInfo {
    /// Encodes the 64 bytes.
    pub fn to_bytes(&self) -> [u8; BOOT_INFO_SIZE] {
        let mut b = [0u8; BOOT_INFO_SIZE];
        b[0..8].copy_from_slice(&self.magic.to_le_bytes());
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.vcpus.to_le_bytes());
        b[16..24].copy_from_slice(&self.mem_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.tsc_khz.to_le_bytes());
        b[32..40].copy_from_slice(&self.cmdline_gpa.to_le_bytes());
        b[40..48].copy_from_slice(&self.cmdline_len.to_le_bytes());
        b[48..64].copy_from_slice(&self.name);
        b
    }

    /// Decodes the 64 bytes.
    pub fn from_bytes(b: &[u8; BOOT_INFO_SIZE]) -> BootInfo {
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        let u32_at = |o: usize| {
            let mut x = [0u8; 4];
            x.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(x)
        };
        let mut name = [0u8; 16];
        name.copy_from_slice(&b[48..64]);
        BootInfo {
            magic: u64_at(0),
            version: u32_at(8),
            vcpus: u32_at(12),
            mem_size: u64_at(16),
            tsc_khz: u64_at(24),
            cmdline_gpa: u64_at(32),
            cmdline_len: u64_at(40),
            name,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_layout() {
        let i = BootInfo {
            magic: BOOT_MAGIC,
            version: BOOT_VERSION,
            vcpus: 2,
            mem_size: 64 << 20,
            tsc_khz: 2_000_000,
            cmdline_gpa: 0x1100,
            cmdline_len: 9,
            name: *b"g0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
        };
        let b = i.to_bytes();
        assert_eq!(&b[0..8], b"MOATBOOT");
        assert_eq!(u32::from_le_bytes([b[12], b[13], b[14], b[15]]), 2);
        assert_eq!(&b[48..50], b"g0");
        assert_eq!(BootInfo::from_bytes(&b), i);
    }
}
