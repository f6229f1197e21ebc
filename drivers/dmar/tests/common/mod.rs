//! Test helpers: the real QEMU tables and a small DMAR table builder.
#![allow(dead_code)]

/// QEMU 7.2 q35, `-device intel-iommu,intremap=off` (what `cargo xtask run` uses).
pub const QEMU_DMAR: &[u8] = include_bytes!("../data/qemu-7.2-q35-dmar.bin");
/// `-device intel-iommu,intremap=off,aw-bits=48,caching-mode=on`.
pub const QEMU_DMAR_AW48_CM: &[u8] = include_bytes!("../data/qemu-7.2-q35-dmar-aw48-cm.bin");
/// `-device intel-iommu,intremap=on,eim=off`.
pub const QEMU_DMAR_IR: &[u8] = include_bytes!("../data/qemu-7.2-q35-dmar-ir.bin");
/// `-device intel-iommu,intremap=off,device-iotlb=on`.
pub const QEMU_DMAR_ATS: &[u8] = include_bytes!("../data/qemu-7.2-q35-dmar-ats.bin");
/// `-device intel-iommu,intremap=off -device pcie-root-port,id=rp0,.. -device edu,bus=rp0`.
pub const QEMU_DMAR_ROOTPORT: &[u8] = include_bytes!("../data/qemu-7.2-q35-dmar-rootport.bin");

/// Sets the header length to the slice length and fixes the checksum.
pub fn fix_header(t: &mut [u8]) {
    let len = u32::try_from(t.len()).unwrap();
    t[4..8].copy_from_slice(&len.to_le_bytes());
    fix_checksum(t);
}

/// Recomputes the checksum byte so the table sums to 0.
pub fn fix_checksum(t: &mut [u8]) {
    t[9] = 0;
    let sum = t.iter().fold(0u8, |a, &b| a.wrapping_add(b));
    t[9] = 0u8.wrapping_sub(sum);
}

/// One device scope entry.
pub fn scope(kind: u8, enumeration_id: u8, start_bus: u8, path: &[(u8, u8)]) -> Vec<u8> {
    let mut s = vec![
        kind,
        (6 + 2 * path.len()) as u8,
        0,
        0,
        enumeration_id,
        start_bus,
    ];
    for &(d, f) in path {
        s.extend_from_slice(&[d, f]);
    }
    s
}

/// Builds DMAR tables structure by structure.
pub struct TableBuilder {
    bytes: Vec<u8>,
}

impl TableBuilder {
    /// A header with `haw_bits` address width and `flags`.
    pub fn new(haw_bits: u8, flags: u8) -> Self {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(b"DMAR");
        bytes.extend_from_slice(&[0; 4]); // length, set by build()
        bytes.push(1); // revision
        bytes.push(0); // checksum, set by build()
        bytes.extend_from_slice(b"MOATTS");
        bytes.extend_from_slice(b"TESTDMAR");
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(b"MOAT");
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.push(haw_bits - 1);
        bytes.push(flags);
        bytes.extend_from_slice(&[0; 10]);
        assert_eq!(bytes.len(), 48);
        Self { bytes }
    }

    /// Appends a structure: type, computed length, then `body` and `scopes`.
    pub fn structure(mut self, kind: u16, body: &[u8], scopes: &[Vec<u8>]) -> Self {
        let len = 4 + body.len() + scopes.iter().map(Vec::len).sum::<usize>();
        self.bytes.extend_from_slice(&kind.to_le_bytes());
        self.bytes
            .extend_from_slice(&u16::try_from(len).unwrap().to_le_bytes());
        self.bytes.extend_from_slice(body);
        for s in scopes {
            self.bytes.extend_from_slice(s);
        }
        self
    }

    pub fn drhd(self, flags: u8, segment: u16, base: u64, scopes: &[Vec<u8>]) -> Self {
        let mut body = vec![flags, 0];
        body.extend_from_slice(&segment.to_le_bytes());
        body.extend_from_slice(&base.to_le_bytes());
        self.structure(0, &body, scopes)
    }

    pub fn rmrr(self, segment: u16, base: u64, limit: u64, scopes: &[Vec<u8>]) -> Self {
        let mut body = vec![0, 0];
        body.extend_from_slice(&segment.to_le_bytes());
        body.extend_from_slice(&base.to_le_bytes());
        body.extend_from_slice(&limit.to_le_bytes());
        self.structure(1, &body, scopes)
    }

    pub fn atsr(self, flags: u8, segment: u16, scopes: &[Vec<u8>]) -> Self {
        let mut body = vec![flags, 0];
        body.extend_from_slice(&segment.to_le_bytes());
        self.structure(2, &body, scopes)
    }

    pub fn build(self) -> Vec<u8> {
        let mut t = self.bytes;
        fix_header(&mut t);
        t
    }
}
