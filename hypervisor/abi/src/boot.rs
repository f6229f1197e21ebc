//! How a guest starts: the boot information the hypervisor leaves for it.
//!
//! The hypervisor enters a guest's vCPUs in 64-bit long mode at the ELF entry point with
//! RDI = guest-physical address of a [`BootInfo`] (64 bytes, little-endian) and RSI = the vCPU
//! index. The guest's RAM is guest-physical `[0, mem_size)`, identity-mapped by boot page
//! tables covering the first 4 GiB.

use zerocopy::little_endian::{U32, U64};

/// [`BootInfo::magic`]: the bytes `"MOATBOOT"`.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"MOATBOOT");
/// [`BootInfo::version`] of this layout.
pub const BOOT_VERSION: u32 = 1;
/// Bytes of a [`BootInfo`].
pub const BOOT_INFO_SIZE: usize = 64;

abi_struct! {
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
    pub struct BootInfo: BOOT_INFO_SIZE {
        /// [`BOOT_MAGIC`].
        pub magic: U64 @ 0,
        /// Layout version.
        pub version: U32 @ 8,
        /// Number of vCPUs.
        pub vcpus: U32 @ 12,
        /// Bytes of RAM at guest-physical 0.
        pub mem_size: U64 @ 16,
        /// TSC frequency in kHz.
        pub tsc_khz: U64 @ 24,
        /// Guest-physical address of the command line.
        pub cmdline_gpa: U64 @ 32,
        /// Its length in bytes.
        pub cmdline_len: U64 @ 40,
        /// The guest's name, NUL padded.
        pub name: [u8; 16] @ 48,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::{FromBytes, IntoBytes};

    #[test]
    fn known_bytes_and_round_trip() {
        let i = BootInfo {
            magic: BOOT_MAGIC.into(),
            version: BOOT_VERSION.into(),
            vcpus: 2.into(),
            mem_size: (64u64 << 20).into(),
            tsc_khz: 2_000_000.into(),
            cmdline_gpa: 0x1100.into(),
            cmdline_len: 9.into(),
            name: *b"g0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
        };
        let mut want = [0u8; BOOT_INFO_SIZE];
        want[0..8].copy_from_slice(b"MOATBOOT");
        want[8] = 1; // version
        want[12] = 2; // vcpus
        want[16..24].copy_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0]); // 64 MiB
        want[24..32].copy_from_slice(&[0x80, 0x84, 0x1e, 0, 0, 0, 0, 0]); // 2_000_000
        want[32..40].copy_from_slice(&[0x00, 0x11, 0, 0, 0, 0, 0, 0]);
        want[40] = 9;
        want[48..50].copy_from_slice(b"g0");
        assert_eq!(i.as_bytes(), &want[..]);
        assert_eq!(BootInfo::read_from_bytes(&want).unwrap(), i);
    }
}
