//! Submission and completion queue entries (NVMe base specification 1.4, sections 4.2 and
//! 4.6) and builders for the commands the driver issues.

/// Admin opcodes.
pub mod admin {
    /// Delete I/O Submission Queue.
    pub const DELETE_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_SQ: u8 = 0x01;
    /// Delete I/O Completion Queue.
    pub const DELETE_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Asynchronous Event Request.
    pub const ASYNC_EVENT: u8 = 0x0c;
}

/// NVM command set opcodes.
pub mod nvm {
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
}

/// Identify CNS values.
pub mod cns {
    /// Identify Namespace.
    pub const NAMESPACE: u32 = 0x00;
    /// Identify Controller.
    pub const CONTROLLER: u32 = 0x01;
}

/// Feature identifier: Number of Queues.
pub const FEATURE_NUMBER_OF_QUEUES: u32 = 0x07;

/// A submission queue entry: 64 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Command {
    /// Opcode (bits 0-7), fused (8-9), PSDT (14-15, 0 = PRPs), command identifier (16-31).
    pub cdw0: u32,
    /// Namespace identifier.
    pub nsid: u32,
    /// Reserved dwords 2-3.
    pub cdw2: [u32; 2],
    /// Metadata pointer.
    pub mptr: u64,
    /// PRP entry 1.
    pub prp1: u64,
    /// PRP entry 2 (a second page or a PRP list).
    pub prp2: u64,
    /// Command dwords 10-15.
    pub cdw10: [u32; 6],
}

const _: () = assert!(core::mem::size_of::<Command>() == 64);

impl Command {
    /// A command with `opcode` and everything else zero (the identifier is set at
    /// submission).
    pub const fn new(opcode: u8) -> Command {
        Command {
            cdw0: opcode as u32,
            nsid: 0,
            cdw2: [0; 2],
            mptr: 0,
            prp1: 0,
            prp2: 0,
            cdw10: [0; 6],
        }
    }

    /// The opcode.
    pub const fn opcode(&self) -> u8 {
        self.cdw0 as u8
    }

    /// The command identifier.
    pub const fn cid(&self) -> u16 {
        (self.cdw0 >> 16) as u16
    }

    /// The same command with identifier `cid`.
    pub const fn with_cid(mut self, cid: u16) -> Command {
        self.cdw0 = (self.cdw0 & 0xffff) | (cid as u32) << 16;
        self
    }

    /// The same command with its data at `prp1`/`prp2`.
    pub const fn with_prps(mut self, prp1: u64, prp2: u64) -> Command {
        self.prp1 = prp1;
        self.prp2 = prp2;
        self
    }

    /// Identify (`cns`) for namespace `nsid` into a 4 KiB buffer at `prp1`.
    pub const fn identify(cns: u32, nsid: u32, prp1: u64) -> Command {
        let mut c = Command::new(admin::IDENTIFY);
        c.nsid = nsid;
        c.prp1 = prp1;
        c.cdw10[0] = cns;
        c
    }

    /// Set Features: Number of Queues (`sq` and `cq` I/O queues wanted, 1-based).
    pub const fn set_queue_count(sq: u16, cq: u16) -> Command {
        let mut c = Command::new(admin::SET_FEATURES);
        c.cdw10[0] = FEATURE_NUMBER_OF_QUEUES;
        c.cdw10[1] = ((cq as u32 - 1) << 16) | (sq as u32 - 1);
        c
    }

    /// Create I/O Completion Queue `qid` of `entries` at `iova` (contiguous), with
    /// interrupts off, or on (IEN) at MSI-X table entry `interrupt`.
    pub const fn create_cq(qid: u16, entries: u16, iova: u64, interrupt: Option<u16>) -> Command {
        let mut c = Command::new(admin::CREATE_CQ);
        c.prp1 = iova;
        c.cdw10[0] = ((entries as u32 - 1) << 16) | qid as u32;
        // Physically contiguous (bit 0); IEN (bit 1) with the vector in bits 31:16.
        c.cdw10[1] = match interrupt {
            Some(iv) => (iv as u32) << 16 | 2 | 1,
            None => 1,
        };
        c
    }

    /// Create I/O Submission Queue `qid` of `entries` at `iova` (contiguous), completing on
    /// `cqid`.
    pub const fn create_sq(qid: u16, entries: u16, iova: u64, cqid: u16) -> Command {
        let mut c = Command::new(admin::CREATE_SQ);
        c.prp1 = iova;
        c.cdw10[0] = ((entries as u32 - 1) << 16) | qid as u32;
        c.cdw10[1] = ((cqid as u32) << 16) | 1;
        c
    }

    /// Delete I/O Submission Queue `qid`.
    pub const fn delete_sq(qid: u16) -> Command {
        let mut c = Command::new(admin::DELETE_SQ);
        c.cdw10[0] = qid as u32;
        c
    }

    /// Delete I/O Completion Queue `qid`.
    pub const fn delete_cq(qid: u16) -> Command {
        let mut c = Command::new(admin::DELETE_CQ);
        c.cdw10[0] = qid as u32;
        c
    }

    /// Read (`write` false) or Write of `blocks` (1..=65536) logical blocks from `lba` of
    /// namespace `nsid`; the PRPs are set at submission.
    pub const fn rw(write: bool, nsid: u32, lba: u64, blocks: u32) -> Command {
        let mut c = Command::new(if write { nvm::WRITE } else { nvm::READ });
        c.nsid = nsid;
        c.cdw10[0] = lba as u32;
        c.cdw10[1] = (lba >> 32) as u32;
        c.cdw10[2] = (blocks - 1) & 0xffff;
        c
    }

    /// The entry's 64 bytes, little-endian.
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(0, &self.cdw0.to_le_bytes());
        put(4, &self.nsid.to_le_bytes());
        put(8, &self.cdw2[0].to_le_bytes());
        put(12, &self.cdw2[1].to_le_bytes());
        put(16, &self.mptr.to_le_bytes());
        put(24, &self.prp1.to_le_bytes());
        put(32, &self.prp2.to_le_bytes());
        for (i, d) in self.cdw10.iter().enumerate() {
            put(40 + 4 * i, &d.to_le_bytes());
        }
        b
    }
}

/// A completion queue entry: 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Completion {
    /// Command-specific dword 0.
    pub dw0: u32,
    /// Submission queue head pointer.
    pub sq_head: u16,
    /// Submission queue identifier.
    pub sq_id: u16,
    /// Command identifier.
    pub cid: u16,
    /// Phase tag (bit 0) and status field (bits 1-15).
    pub status: u16,
}

impl Completion {
    /// Decodes the entry's 16 bytes (little-endian).
    pub fn from_bytes(b: &[u8; 16]) -> Completion {
        let w = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let dw2 = w(8);
        let dw3 = w(12);
        Completion {
            dw0: w(0),
            sq_head: dw2 as u16,
            sq_id: (dw2 >> 16) as u16,
            cid: dw3 as u16,
            status: (dw3 >> 16) as u16,
        }
    }

    /// The phase tag.
    pub const fn phase(&self) -> bool {
        self.status & 1 != 0
    }

    /// The status field without the phase tag: `Ok` or the controller's status.
    pub const fn result(&self) -> Result<(), crate::Status> {
        crate::Status::check(self.status >> 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_command_layout() {
        let c = Command::rw(false, 1, 0x1_2345_6789, 8)
            .with_cid(0x42)
            .with_prps(0x1000, 0x2000);
        let b = c.to_bytes();
        assert_eq!(b[0], nvm::READ);
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), 0x42);
        assert_eq!(u32::from_le_bytes([b[4], b[5], b[6], b[7]]), 1);
        assert_eq!(u64::from_le_bytes(b[24..32].try_into().unwrap()), 0x1000);
        assert_eq!(u64::from_le_bytes(b[32..40].try_into().unwrap()), 0x2000);
        assert_eq!(
            u32::from_le_bytes(b[40..44].try_into().unwrap()),
            0x2345_6789
        );
        assert_eq!(u32::from_le_bytes(b[44..48].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(b[48..52].try_into().unwrap()), 7);
        assert_eq!(c.cid(), 0x42);
        assert_eq!(c.opcode(), nvm::READ);
    }

    #[test]
    fn admin_commands() {
        let cq = Command::create_cq(3, 64, 0xabc000, None);
        assert_eq!(cq.opcode(), admin::CREATE_CQ);
        assert_eq!(cq.cdw10[0], (63 << 16) | 3);
        assert_eq!(cq.cdw10[1], 1);
        assert_eq!(cq.prp1, 0xabc000);
        // Interrupts on (IEN) at MSI-X entry 5.
        let cq = Command::create_cq(3, 64, 0xabc000, Some(5));
        assert_eq!(cq.cdw10[1], 5 << 16 | 3);
        let sq = Command::create_sq(3, 64, 0xdef000, 3);
        assert_eq!(sq.cdw10[1], (3 << 16) | 1);
        let id = Command::identify(cns::NAMESPACE, 1, 0x5000);
        assert_eq!((id.nsid, id.cdw10[0], id.prp1), (1, 0, 0x5000));
        let q = Command::set_queue_count(2, 2);
        assert_eq!(q.cdw10[..2], [7, 0x0001_0001]);
        assert_eq!(Command::delete_sq(2).cdw10[0], 2);
        assert_eq!(Command::delete_cq(2).opcode(), admin::DELETE_CQ);
    }

    #[test]
    fn completion_decoding() {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&0xdead_beefu32.to_le_bytes());
        b[8..12].copy_from_slice(&(5u32 | 2 << 16).to_le_bytes());
        // cid 9, phase 1, SCT 0, SC 0x80 (LBA out of range), DNR.
        let status: u16 = 1 | (0x80 << 1) | (1 << 15);
        b[12..16].copy_from_slice(&(9u32 | (status as u32) << 16).to_le_bytes());
        let c = Completion::from_bytes(&b);
        assert_eq!((c.dw0, c.sq_head, c.sq_id, c.cid), (0xdead_beef, 5, 2, 9));
        assert!(c.phase());
        let e = c.result().unwrap_err();
        assert_eq!(e.kind(), crate::StatusKind::LbaOutOfRange);
        assert!(e.do_not_retry());
    }
}
