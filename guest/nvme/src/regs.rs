//! Controller registers (NVMe base specification 1.4, section 3.1): offsets and the typed
//! values of CAP, CC, CSTS and AQA.

/// Controller Capabilities (64-bit).
pub const CAP: usize = 0x00;
/// Version.
pub const VS: usize = 0x08;
/// Interrupt Mask Set.
pub const INTMS: usize = 0x0c;
/// Controller Configuration.
pub const CC: usize = 0x14;
/// Controller Status.
pub const CSTS: usize = 0x1c;
/// Admin Queue Attributes.
pub const AQA: usize = 0x24;
/// Admin Submission Queue base (64-bit).
pub const ASQ: usize = 0x28;
/// Admin Completion Queue base (64-bit).
pub const ACQ: usize = 0x30;
/// First doorbell.
pub const DOORBELLS: usize = 0x1000;

/// CAP: what the controller supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap(pub u64);

impl Cap {
    /// Largest queue the controller supports, in entries (MQES + 1).
    pub const fn max_queue_entries(self) -> u32 {
        (self.0 & 0xffff) as u32 + 1
    }
    /// Whether queues must be physically contiguous (CQR).
    pub const fn contiguous_queues_required(self) -> bool {
        self.0 & (1 << 16) != 0
    }
    /// Worst-case time for CSTS.RDY to follow CC.EN, in milliseconds (TO, 500 ms units; at
    /// least 500 ms even if the controller reports 0).
    pub const fn timeout_ms(self) -> u64 {
        let to = (self.0 >> 24) & 0xff;
        if to == 0 {
            500
        } else {
            to * 500
        }
    }
    /// Doorbell stride in bytes (4 << DSTRD).
    pub const fn doorbell_stride(self) -> usize {
        4 << ((self.0 >> 32) & 0xf)
    }
    /// Whether the NVM command set is supported (CSS bit 0).
    pub const fn nvm_command_set(self) -> bool {
        (self.0 >> 37) & 1 != 0
    }
    /// Smallest memory page size, bytes (2 ^ (12 + MPSMIN)).
    pub const fn min_page_size(self) -> u64 {
        1 << (12 + ((self.0 >> 48) & 0xf))
    }
    /// Largest memory page size, bytes (2 ^ (12 + MPSMAX)).
    pub const fn max_page_size(self) -> u64 {
        1 << (12 + ((self.0 >> 52) & 0xf))
    }
}

/// CC: the configuration the driver writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cc(pub u32);

impl Cc {
    /// Enable.
    pub const EN: u32 = 1;
    /// Enabled, NVM command set, 4 KiB pages, round-robin arbitration, no shutdown, 64-byte
    /// submission and 16-byte completion entries.
    pub const fn enabled_4k() -> Cc {
        Cc(Self::EN | (6 << 16) | (4 << 20))
    }
    /// Whether EN is set.
    pub const fn enabled(self) -> bool {
        self.0 & Self::EN != 0
    }
    /// The same value with EN clear.
    pub const fn disabled(self) -> Cc {
        Cc(self.0 & !Self::EN)
    }
}

/// CSTS: controller status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Csts(pub u32);

impl Csts {
    /// Ready.
    pub const fn ready(self) -> bool {
        self.0 & 1 != 0
    }
    /// Controller Fatal Status.
    pub const fn fatal(self) -> bool {
        self.0 & 2 != 0
    }
    /// Whether the register reads as all ones (the device is gone or not decoding).
    pub const fn absent(self) -> bool {
        self.0 == u32::MAX
    }
}

/// AQA for admin queues of `sq` and `cq` entries (2..=4096 each).
pub const fn aqa(sq: u32, cq: u32) -> u32 {
    ((cq - 1) & 0xfff) << 16 | ((sq - 1) & 0xfff)
}

/// Offset of the submission queue `qid`'s tail doorbell.
pub const fn sq_doorbell(qid: u16, stride: usize) -> usize {
    DOORBELLS + (2 * qid as usize) * stride
}

/// Offset of the completion queue `qid`'s head doorbell.
pub const fn cq_doorbell(qid: u16, stride: usize) -> usize {
    DOORBELLS + (2 * qid as usize + 1) * stride
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_fields_of_qemu_7_2() {
        // QEMU 7.2's nvme: MQES 0x7ff, CQR, TO 0xf, DSTRD 0, CSS NVM (+ more), MPSMAX 4.
        let cap = Cap(0x0040_0030_0f01_07ff | (1 << 37));
        assert_eq!(cap.max_queue_entries(), 0x800);
        assert!(cap.contiguous_queues_required());
        assert_eq!(cap.timeout_ms(), 7500);
        assert_eq!(cap.doorbell_stride(), 4);
        assert!(cap.nvm_command_set());
        assert_eq!(cap.min_page_size(), 4096);
        assert_eq!(cap.max_page_size(), 4096 << 4);
        assert_eq!(Cap(0).timeout_ms(), 500);
        assert_eq!(Cap(3 << 32).doorbell_stride(), 32);
    }

    #[test]
    fn cc_and_doorbells() {
        let cc = Cc::enabled_4k();
        assert!(cc.enabled());
        assert_eq!(cc.0, 0x0046_0001);
        assert!(!cc.disabled().enabled());
        assert_eq!(aqa(16, 32), 0x001f_000f);
        assert_eq!(sq_doorbell(0, 4), 0x1000);
        assert_eq!(cq_doorbell(0, 4), 0x1004);
        assert_eq!(sq_doorbell(2, 4), 0x1010);
        assert_eq!(cq_doorbell(2, 16), 0x1050);
        assert!(Csts(u32::MAX).absent());
        assert!(Csts(3).fatal() && Csts(3).ready());
    }
}
